"""Signals: SIGINT/SIGTERM end a run cleanly, at the end of a training step.

Before training starts, the first signal ends the process at once (nothing of the run has been
written yet). From then on it is only recorded: the loop finishes its step, saves the resume
state and exits 130/143, so that no file is cut mid-write. A second signal kills at once.
"""
from __future__ import annotations

import signal

from .errors import EXIT_FOR_SIGNAL, Interrupted


class StopRequest:
    """SIGINT/SIGTERM while a run is under way.

    Until defer() is called (the start of training or pretraining), the first signal ends the
    process at once: it raises errors.Interrupted wherever the process is, waiting included (on a
    lock, a download, a FIFO), and nothing of the run has been written yet. From defer() on it is
    only recorded: the training loop finishes its step, saves the resume state and exits 130/143
    (it checks `requested` after every step), so that no file is cut mid-write. A second signal
    kills at once either way.
    """

    def __init__(self):
        self.signum = None
        self.deferring = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        for sig, handler in self._previous.items():  # a second Ctrl-C is not swallowed
            signal.signal(sig, handler)
        if not self.deferring:
            raise Interrupted(signum)

    def defer(self):
        """From now on a signal is recorded and acted on by the loop that checks `requested`."""
        self.deferring = True

    def __enter__(self):
        for sig in EXIT_FOR_SIGNAL:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return EXIT_FOR_SIGNAL[self.signum]
