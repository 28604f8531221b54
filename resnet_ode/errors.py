"""Exit statuses, the errors that end a command, and the one-line report of each (a bad flag's too).

The ground floor of the package: it imports nothing of the project's, so every module can raise
these and every script can turn them into one line and an exit status.

Exit statuses (README, docs/reliability.md): 0 success; 1 a sweep with a failed run; 2 bad
input or a refusal (one line on stderr, nothing written); 3 training diverged (the curves so far
are written); 4 a file could not be written mid-run (--resume continues); 130 SIGINT, 143 SIGTERM;
141 the reader of its output went away (`... | head`).
"""
from __future__ import annotations

import argparse
import errno
import os
import select
import signal
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED, EXIT_WRITE_FAILED = 0, 1, 2, 3, 4
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + signal number, the shell's convention
EXIT_FOR_SIGNAL = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141: what the shell reports for a C tool ended by SIGPIPE
# How a run refuses a --save that another process holds; the sweep reads it in a run's log to
# tell "running elsewhere" from a failure.
RUNNING_ELSEWHERE = 'another process is running'


class UsageError(Exception):
    """Bad input or a refusal: one line on stderr, exit status 2, nothing written."""


class DataError(UsageError):
    """A dataset that is missing, unreachable or corrupt; the message says how to fix it."""


class EmbeddingError(UsageError):
    """A release embedding file that is missing, unusable or not the release's."""


class DownloadError(UsageError):
    """A download that failed, or a file in the way: nothing was written."""


class PretrainingStopped(Exception):
    """Pretraining diverged (exit 3) or was interrupted (130/143); nothing was written."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class NothingToDo(Exception):
    """The command has nothing left to do (--resume of a finished run): one line on stdout, 0."""


class WriteFailed(Exception):
    """A file of the run could not be written (a full disk, a read-only folder): exit status 4.
    The training loop words the line, since it knows what the run has saved so far."""

    def __init__(self, path: str, error: OSError):
        super().__init__(f'cannot write {path} ({describe_write_error(error)})')
        self.path, self.error = path, error


def describe_write_error(error: OSError) -> str:
    """What a failed write means, in words: which condition, from its errno."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f'{error.strerror}: the disk is full'
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f'{error.strerror}: the folder is read-only or not writable'
    return error.strerror or str(error)


class Interrupted(BaseException):
    """SIGINT/SIGTERM before training started: raised wherever the process was, waiting
    included. A BaseException, like KeyboardInterrupt, so that no handler meant for errors (a
    failed download, say) mistakes it for one."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return EXIT_FOR_SIGNAL[self.signum]


def one_line_errors(main):
    """Wrap a script's main(args): each error above becomes one line and its exit status."""
    def wrapped(args):
        try:
            return main(args)
        except UsageError as exc:
            print(f'error: {exc}', file=sys.stderr)
            return EXIT_USAGE
        except WriteFailed as exc:
            print(f'error: {exc}', file=sys.stderr)
            return EXIT_WRITE_FAILED
        except NothingToDo as exc:
            print(exc)
            return EXIT_OK
        except Interrupted as exc:
            print(f'interrupted by {exc}: the run had not started training, nothing of it was '
                  f'written; rerun the same command', file=sys.stderr)
            return exc.exit_status
    wrapped.__name__, wrapped.__doc__ = main.__name__, main.__doc__
    return wrapped


def run_command(main, parse_args):
    """A script's `if __name__ == '__main__'`: exit with main(parse_args())'s status. When the
    reader of the output goes away early (`python reproduce.py ... --dry_run | head`), the command
    ends quietly with status 141, as a C tool ended by SIGPIPE does, instead of a BrokenPipeError
    traceback. A training run stopped so keeps the resume state of its last saved epoch."""
    try:
        status = main(parse_args())
        sys.stdout.flush()  # output still buffered meets the closed pipe here, not at exit
    except BrokenPipeError:
        if not _reader_gone(sys.stdout):
            raise  # some other pipe broke: that is an error, with its traceback
        # Python flushes stdout once more as it exits; let that flush go to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = EXIT_BROKEN_PIPE
    sys.exit(status)


def _reader_gone(stream) -> bool:
    """Whether `stream` is a pipe whose reading end is closed: poll() reports POLLERR on such a
    pipe's writing end, and not on a terminal, a file or a pipe still read."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), 0)  # POLLERR is always reported; ask for nothing else
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor behind the stream
        return False


# ---------------------------------------------------------------------------------------------
# Command lines: one line for a bad flag
# ---------------------------------------------------------------------------------------------

_NOT_GIVEN = object()


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints its whole usage block on an error; a bad flag gets one line here.

    It also records which flags the command line gave (in any spelling: long, short or
    abbreviated) as `args._given`, so that --resume can refuse flags that differ from the run's,
    and it can read back values that an earlier run stored (parse_stored).
    """

    def __init__(self, *args, **kwargs):
        self.flags = {}  # destination -> the option string that sets it (first spelling)
        self._raise_errors = False
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.default != argparse.SUPPRESS:
            self.flags[action.dest] = action.option_strings[0] if action.option_strings else None
        return action

    def error(self, message):
        if self._raise_errors:
            raise UsageError(message)
        self.exit(EXIT_USAGE, f'{self.prog}: error: {message} (see --help)\n')

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        # argparse leaves an attribute that is already set alone, so a second parse over
        # placeholders shows which destinations the command line itself set.
        probe = argparse.Namespace(**{dest: _NOT_GIVEN for dest in self.flags})
        super().parse_known_args(args, probe)
        parsed._given = frozenset(dest for dest, value in vars(probe).items()
                                  if value is not _NOT_GIVEN and not dest.startswith('_'))
        return parsed, extras

    def parse_raising(self, argv: list) -> argparse.Namespace:
        """parse_args, with a bad flag raised as UsageError instead of ending the process."""
        self._raise_errors = True
        try:
            return self.parse_args(argv)
        finally:
            self._raise_errors = False

    def parse_stored(self, values: dict) -> argparse.Namespace:
        """The values an earlier run stored (a checkpoint's or resume state's arguments), read
        as the command line that gives them, so that each is checked as a flag is: a value that
        no command line gives (text where a number belongs, an unknown choice, a number stored
        as text) raises UsageError naming it. Stored names that are no flag are left out."""
        argv = []
        for dest, value in values.items():
            if dest not in self.flags:
                continue
            words = self._words(dest, value)
            try:
                parsed = getattr(self.parse_raising(words), dest)
            except UsageError:
                parsed = _NOT_GIVEN
            if type(parsed) is not type(value) or parsed != value:
                raise UsageError(f'its {dest} is {value!r}, which the command line never gives')
            argv += words
        return self.parse_raising(argv)

    def _words(self, dest: str, value) -> list:
        """The command-line words that set `dest` to `value`."""
        flag = self.flags[dest]
        if value is None or value is False:
            return []
        if value is True:
            return [flag]
        if isinstance(value, list):
            return [flag, *map(str, value)]
        return [f'{flag}={value}']
