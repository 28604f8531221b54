"""What a run keeps on disk and reads back: its file paths and the rules about existing files,
torch files written atomically and loaded safely, random-number states, signal handling, and
the fault points the tests use to kill a run at chosen instants.

Every file is written atomically (common.atomic_write), so a kill at any instant leaves the old
file or the new one. Everything is loaded with weights_only=True: tensors and plain values only.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import random
import signal
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import distributed
from cli import EXIT_FOR_SIGNAL, UsageError, checkpoint_path, given_flags
from common import atomic_write, missing_ancestors

RESUME_FORMAT = 2  # 2: progress and facts saved as dicts
CHECKPOINT_FORMAT = 1
# What may change between a run and its --resume: where it runs, not what it computes.
RESUME_MAY_CHANGE = ('device', 'data_root', 'resume', 'test_batch_size')

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
    """torch.load with weights_only=True: tensors and plain Python values only, no code runs.

    A failure says which of three things is wrong with the file: it is not a torch.save file at
    all, it needs code that weights_only loading refuses, or it is truncated or corrupt.
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on its way to failing
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UsageError(f'{what} {path} does not exist') from None
    except Exception as exc:
        raise UsageError(_why_unloadable(path, what, exc)) from None


def _why_unloadable(path: str, what: str, exc: Exception) -> str:
    text = str(exc)
    marker = 'Unsupported global: GLOBAL '
    if marker in text:
        name = text.split(marker, 1)[1].split()[0]
        return (f'refusing to load {what} {path}: it needs {name}, which a checkpoint of this '
                f'project never holds (weights_only loading); nothing of it was run')
    start = _first_bytes(path)
    if not start.startswith(ZIP_MAGIC):  # torch.save writes a zip archive
        kind = 'a plain pickle, such as a results file' if start[:1] == b'\x80' else 'unknown format'
        return f'{what} {path} is not a torch.save file ({kind})'
    if 'Weights only load failed' in text:
        return (f'refusing to load {what} {path}: it holds objects that weights_only loading does '
                f'not allow; nothing of it was run')
    first = text.strip().splitlines()[0][:120] if text.strip() else type(exc).__name__
    return f'{what} {path} is truncated or corrupt ({type(exc).__name__}: {first})'


ZIP_MAGIC = b'PK\x03\x04'  # a zip archive's first bytes; a pickle of protocol >= 2 starts with 0x80


def _first_bytes(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read(4)


def plain_args(args) -> dict:
    """The arguments as a dict of plain values (safe for weights_only loading)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if not k.startswith('_')}


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
    _check_resume_flags(args, state['args'])
    stored = argparse.Namespace(**state['args'])
    for key in RESUME_MAY_CHANGE:
        setattr(stored, key, getattr(args, key))
    return stored, run_paths(stored, folder_prefix), state


def _check_resume_flags(args, stored: dict):
    """--resume continues the stored run as it was started: a flag given now that says otherwise
    (say --layers 5 for a 2-layer run) is refused, not silently ignored."""
    differing = sorted(dest for dest in given_flags(args) - set(RESUME_MAY_CHANGE)
                       if dest in stored and stored[dest] != getattr(args, dest))
    if differing:
        listed = ', '.join(f'--{dest} {_shown(getattr(args, dest))} (the run has {_shown(stored[dest])})'
                           for dest in differing)
        raise UsageError(f'--resume continues the run as it was started, and these flags differ '
                         f'from it: {listed}; drop them, or start a new run with another --save')


def _shown(value) -> str:
    return ' '.join(map(str, value)) if isinstance(value, list) else str(value)


# ---------------------------------------------------------------------------------------------
# Claiming a run's files
# ---------------------------------------------------------------------------------------------

class RunClaim:
    """A run's hold on its files while it runs, taken before any work (rank 0 only).

    lock(): an exclusive lock on '<results_dir>/.<save stem>.lock', so that a second process with
    the same --save is refused at once instead of silently overwriting the first one's files.
    The kernel drops the lock when the process ends, however it ends.
    make_folders(): creates the results and checkpoint folders and writes a probe file in each,
    so that a place that cannot be written is refused before the data is even loaded.
    release(failed): removes the lock file, and after a refusal also what the claim created.
    """

    def __init__(self):
        self.active = not distributed.launched_by_torchrun() or int(os.environ['RANK']) == 0
        self.created, self.lock_path, self.lock_fd, self.lock_created = [], None, None, False

    def lock(self, results_path: str, flag_text: str):
        if not self.active:
            return
        folder = os.path.dirname(results_path) or '.'
        self._make_folder(folder, '--results_dir')
        stem = os.path.splitext(os.path.basename(results_path))[0]
        self.lock_path = os.path.join(folder, f'.{stem}.lock')
        for _ in range(10):  # the file can be removed by a holder finishing between open and lock
            self.lock_created = not os.path.exists(self.lock_path)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.lock_path = None
                raise UsageError(f'another process is running {flag_text} (it holds '
                                 f'{os.path.join(folder, f".{stem}.lock")}); wait for it to finish, '
                                 f'or choose another --save') from None
            if _same_file(fd, self.lock_path):
                self.lock_fd = fd
                return
            os.close(fd)
        raise UsageError(f'could not lock {self.lock_path}: it keeps being replaced')

    def make_folders(self, paths: 'RunPaths'):
        if self.active:
            self._make_folder(os.path.dirname(paths.results) or '.', '--results_dir')
            self._make_folder(os.path.dirname(paths.checkpoint) or '.', '--checkpoint')

    def _make_folder(self, folder: str, flag: str):
        missing = missing_ancestors(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            self.created.extend(path for path in missing if path not in self.created)
            os.remove(tempfile.mkstemp(prefix='.probe.', dir=folder)[1])
        except OSError as exc:
            raise UsageError(f'{flag}: cannot write in {folder} ({exc.strerror or exc})') from None

    def release(self, failed: bool):
        if self.lock_fd is not None:
            if failed and not self.lock_created:
                pass  # the lock file was there before this run; leave it as it was
            else:
                with contextlib.suppress(OSError):
                    os.remove(self.lock_path)
            os.close(self.lock_fd)  # removed first, then unlocked: see lock()
            self.lock_fd = None
        if failed:
            for folder in reversed(self.created):  # deepest first; only if still empty
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


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
