"""What a run keeps on disk and reads back: its file paths and the rules about existing files,
torch files written atomically and loaded safely, random-number states, signal handling, and
the fault points the tests use to kill a run at chosen instants.

Every file is written atomically (common.atomic_write), so a kill at any instant leaves the old
file or the new one. Everything is loaded with weights_only=True: tensors and plain values only.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
from dataclasses import dataclass

import numpy as np
import torch

from cli import EXIT_FOR_SIGNAL, UsageError, checkpoint_path
from common import atomic_write

RESUME_FORMAT = 2  # 2: progress and facts saved as dicts
CHECKPOINT_FORMAT = 1
# What may change between a run and its --resume: where it runs, not what it computes.
RESUME_MAY_CHANGE = ('device', 'data_root', 'resume')

# Fault injection for the test suite only: "<point>@<n>[:<SIGNAL>]" sends the signal (default
# SIGKILL) to this process the n-th time it reaches the point. Unset in normal runs.
FAULT_ENV = 'RESNET_ODE_FAULT'
_fault_counts: dict = {}


def fault_point(name: str):
    spec = os.environ.get(FAULT_ENV)
    if not spec or not spec.startswith(name + '@'):
        return
    count, _, signame = spec[len(name) + 1:].partition(':')
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(count):
        os.kill(os.getpid(), getattr(signal, signame or 'SIGKILL'))


# ---------------------------------------------------------------------------------------------
# Torch files
# ---------------------------------------------------------------------------------------------

def save_torch(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str, what: str):
    """torch.load with weights_only=True: tensors and plain Python values only, no code runs."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UsageError(f'{what} {path} does not exist') from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UsageError(f'refusing to load {what} {path}: not a plain tensor checkpoint '
                         f'({first})') from None


def plain_args(args) -> dict:
    """The arguments as a dict of plain values (safe for weights_only loading)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


# ---------------------------------------------------------------------------------------------
# Run paths and the existing-file rules
# ---------------------------------------------------------------------------------------------

@dataclass
class RunPaths:
    results: str
    checkpoint: str
    resume: str


def run_paths(args, folder_prefix: str) -> RunPaths:
    stem = os.path.splitext(args.save)[0]
    return RunPaths(results=os.path.join(args.results_dir, args.save),
                    checkpoint=checkpoint_path(args, folder_prefix),
                    resume=os.path.join(args.results_dir, f'{stem}.resume.pt'))


def prepare_run(args, folder_prefix: str):
    """Apply the existing-file rules; on --resume, load the resume state and its arguments.

    Returns (args, paths, resume_state or None). Raises UsageError before anything is written.
    """
    paths = run_paths(args, folder_prefix)
    if os.path.exists(paths.results):
        raise UsageError(f'{paths.results} exists; results are never overwritten: choose another '
                         f'--save or move the file')
    if not args.resume:
        if os.path.exists(paths.resume):
            raise UsageError(f'{paths.resume} holds an interrupted run of --save {args.save}; '
                             f'continue it with --resume, or delete it to start over')
        if os.path.exists(paths.checkpoint):
            raise UsageError(f'checkpoint {paths.checkpoint} exists and belongs to another run; '
                             f'pass another --checkpoint or move it')
        return args, paths, None
    if not os.path.exists(paths.resume):
        raise UsageError(f'--resume: no resume state {paths.resume} for --save {args.save}')
    state = load_torch(paths.resume, 'resume state')
    if not isinstance(state, dict) or state.get('format') != RESUME_FORMAT:
        raise UsageError(f'{paths.resume} is not a resume state of this version')
    stored = argparse.Namespace(**state['args'])
    for key in RESUME_MAY_CHANGE:
        setattr(stored, key, getattr(args, key))
    return stored, run_paths(stored, folder_prefix), state


# ---------------------------------------------------------------------------------------------
# Random state
# ---------------------------------------------------------------------------------------------

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        'python': [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------
# Signals: finish the current step, save, exit 130/143
# ---------------------------------------------------------------------------------------------

class StopRequest:
    """Records SIGINT/SIGTERM instead of dying mid-write; a second signal kills at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        for sig, handler in self._previous.items():  # a second Ctrl-C is not swallowed
            signal.signal(sig, handler)

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
