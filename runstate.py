"""What a run keeps on disk and reads back: its file paths and the rules about existing files,
torch files written atomically and loaded safely, random-number states and signal handling.
The fault points the tests use to kill a run at chosen instants are common.fault_point's,
imported here for the engine.

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
from common import (FAULT_ENV, RUNNING_ELSEWHERE, atomic_write, fault_point, missing_ancestors,  # noqa: F401
                    resume_state_name, torch_load_failure)

RESUME_FORMAT = 2  # 2: progress and facts saved as dicts
CHECKPOINT_FORMAT = 1
# What may change between a run and its --resume: where it runs, not what it computes.
RESUME_MAY_CHANGE = ('device', 'data_root', 'resume', 'test_batch_size')

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
    kind, detail = torch_load_failure(path, exc)
    if kind == 'global':
        return (f'refusing to load {what} {path}: it needs {detail}, which a checkpoint of this '
                f'project never holds (weights_only loading); nothing of it was run')
    if kind == 'not_torch':
        return f'{what} {path} is not a torch.save file ({detail})'
    if kind == 'refused':
        return (f'refusing to load {what} {path}: it holds objects that weights_only loading does '
                f'not allow; nothing of it was run')
    return f'{what} {path} is truncated or corrupt ({detail})'


def plain_args(args) -> dict:
    """The arguments as a dict of plain values (safe for weights_only loading)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if not k.startswith('_')}


# ---------------------------------------------------------------------------------------------
# Run paths and the existing-file rules
# ---------------------------------------------------------------------------------------------

@dataclass
class RunPaths:
    """A single run's results pickle and best checkpoint (its resume state: resume_path)."""
    results: str
    checkpoint: str


def run_paths(args, folder_prefix: str) -> RunPaths:
    return RunPaths(results=os.path.join(args.results_dir, args.save),
                    checkpoint=checkpoint_path(args, folder_prefix))


def member_runs(args, folder_prefix: str) -> list[tuple[argparse.Namespace, RunPaths]]:
    """The single runs a command line makes: itself, or with --seeds S1 .. SK one per seed, with
    the arguments and files that `--seed Sk --save <stem>_s<Sk>.pkl` would have had."""
    seeds = getattr(args, 'seeds', None)
    if not seeds:
        return [(args, run_paths(args, folder_prefix))]
    stem = os.path.splitext(args.save)[0]
    checkpoint_stem = os.path.splitext(checkpoint_path(args, folder_prefix))[0]
    members = []
    for seed in seeds:
        member = argparse.Namespace(**vars(args))
        member.seed, member.seeds = seed, None
        member.save, member.checkpoint = f'{stem}_s{seed}.pkl', f'{checkpoint_stem}_s{seed}.pth'
        members.append((member, run_paths(member, folder_prefix)))
    return members


def resume_path(args) -> str:
    """The resume state of a run; with --seeds, of the batch of these seeds."""
    return os.path.join(args.results_dir, resume_state_name(os.path.splitext(args.save)[0],
                                                            getattr(args, 'seeds', None)))


def prepare_run(args, folder_prefix: str, claim: 'RunClaim'):
    """Claim the run's files, apply the existing-file rules; on --resume, load the resume state
    and take the run's arguments from it.

    Returns (args, members, resume path, resume_state or None). Raises UsageError before anything
    is written.
    """
    members = member_runs(args, folder_prefix)
    claim.lock([paths.results for _, paths in members], f'--save {args.save}')
    resume = resume_path(args)
    for _, paths in members:
        if os.path.exists(paths.results):
            raise UsageError(f'{paths.results} exists; results are never overwritten: choose '
                             f'another --save or move the file')
    if not args.resume:
        if os.path.exists(resume):
            raise UsageError(f'{resume} holds an interrupted run of --save {args.save}; continue '
                             f'it with --resume, or delete it to start over')
        for _, paths in members:
            if os.path.exists(paths.checkpoint):
                raise UsageError(f'checkpoint {paths.checkpoint} exists and belongs to another '
                                 f'run; pass another --checkpoint or move it')
        claim.make_folders([paths for _, paths in members])
        return args, members, resume, None
    if not os.path.exists(resume):
        raise UsageError(f'--resume: no resume state {resume} for --save {args.save}')
    state = load_torch(resume, 'resume state')
    if not isinstance(state, dict) or state.get('format') != RESUME_FORMAT:
        raise UsageError(f'{resume} is not a resume state of this version')
    _check_resume_flags(args, state['args'])
    # A flag added since the run started is absent from its state: its default then, which is
    # what the code did before the flag existed.
    stored = argparse.Namespace(**{**plain_args(args), **state['args']})
    for key in RESUME_MAY_CHANGE:
        setattr(stored, key, getattr(args, key))
    members = member_runs(stored, folder_prefix)
    claim.make_folders([paths for _, paths in members])
    return stored, members, resume, state


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

    lock(): an exclusive lock on '<results_dir>/.<save stem>.lock' for each results file, so
    that a second process with the same --save (or the same member of a --seeds run) is refused
    at once instead of silently overwriting the first one's files. The kernel drops the locks
    when the process ends, however it ends.
    make_folders(): creates the results and checkpoint folders and writes a probe file in each,
    so that a place that cannot be written is refused before the data is even loaded.
    release(failed): removes the lock files, and after a refusal also what the claim created.
    """

    def __init__(self):
        self.active = not distributed.launched_by_torchrun() or int(os.environ['RANK']) == 0
        self.created, self.locks = [], []  # folders made; (path, fd, created by this run)

    def lock(self, results_paths: list[str], flag_text: str):
        for results_path in results_paths if self.active else ():
            folder = os.path.dirname(results_path) or '.'
            self._make_folder(folder, '--results_dir')
            stem = os.path.splitext(os.path.basename(results_path))[0]
            self.locks.append(_locked(os.path.join(folder, f'.{stem}.lock'), flag_text))

    def make_folders(self, paths: list['RunPaths']):
        folders = [(os.path.dirname(p.results) or '.', '--results_dir') for p in paths]
        folders += [(os.path.dirname(p.checkpoint) or '.', '--checkpoint') for p in paths]
        for folder, flag in dict.fromkeys(folders) if self.active else ():
            self._make_folder(folder, flag)

    def _make_folder(self, folder: str, flag: str):
        missing = missing_ancestors(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            self.created.extend(path for path in missing if path not in self.created)
            fd, probe = tempfile.mkstemp(prefix='.probe.', dir=folder)
            os.close(fd)
            os.remove(probe)
        except OSError as exc:
            raise UsageError(f'{flag}: cannot write in {folder} ({exc.strerror or exc})') from None

    def release(self, failed: bool):
        for path, fd, created in self.locks:
            if created or not failed:  # a lock file that was there before a refusal stays
                with contextlib.suppress(OSError):
                    os.remove(path)
            os.close(fd)  # removed first, then unlocked: see _locked
        self.locks = []
        if failed:
            for folder in reversed(self.created):  # deepest first; only if still empty
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


def _locked(path: str, flag_text: str) -> tuple[str, int, bool]:
    """An exclusive, non-blocking flock on `path` (created if missing): (path, fd, created)."""
    for _ in range(10):  # a holder that finishes removes the file between our open and our lock
        created = not os.path.exists(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f'{RUNNING_ELSEWHERE} {flag_text} (it holds {path}); wait for '
                             f'it to finish, or choose another --save') from None
        if _same_file(fd, path):
            return path, fd, created
        os.close(fd)
    raise UsageError(f'could not lock {path}: it keeps being replaced')


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
