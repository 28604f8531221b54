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
import io
import math
import os
import pickle
import random
import signal
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import distributed
from cli import (EXIT_FOR_SIGNAL, Interrupted, NothingToDo, UsageError, WriteFailed,
                 checkpoint_path, given_flags)
from common import (FAULT_ENV, RUNNING_ELSEWHERE, NotARegularFile, UnsafePickle, atomic_write,  # noqa: F401
                    batch_states, fault_point, load_results, missing_ancestors, open_regular,
                    resume_state_name, torch_load_failure)

RESUME_FORMAT = 2  # 2: progress and facts saved as dicts
CHECKPOINT_FORMAT = 1
# What may change between a run and its --resume: where it runs, not what it computes.
RESUME_MAY_CHANGE = ('device', 'data_root', 'resume', 'test_batch_size')

# ---------------------------------------------------------------------------------------------
# Torch files
# ---------------------------------------------------------------------------------------------

def save_torch(obj, path, fault: str = 'write-checkpoint'):
    """torch.save, atomically. The file is serialised in memory first: torch's own writer turns a
    full disk into 'unexpected pos ...', while a plain write of the bytes says ENOSPC.
    A failed write raises cli.WriteFailed. `fault`: the name of its fault point (tests)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_bytes(buffer.getbuffer(), path, fault)


def save_results(record: dict, path: str):
    """A results pickle, atomically (see save_torch)."""
    _write_bytes(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL), path, 'write-results')


def save_text(text: str, path: str):
    """A text file (the metrics file), atomically (see save_torch)."""
    _write_bytes(text.encode(), path, 'write-metrics')


def _write_bytes(data, path: str, fault: str):
    def write(f):
        fault_point(fault, path)
        f.write(data)
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise WriteFailed(path, exc) from None


def load_torch(path: str, what: str):
    """torch.load with weights_only=True: tensors and plain Python values only, no code runs.

    Only a regular file is opened (a FIFO would block forever). A failure says which of three
    things is wrong with the file: it is not a torch.save file at all, it needs code that
    weights_only loading refuses, or it is truncated or corrupt.
    """
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise UsageError(f'{what} {path} does not exist') from None
    except NotARegularFile as exc:
        raise UsageError(f'{what} {path} is {exc.strerror}') from None
    except OSError as exc:
        raise UsageError(f'{what} {path} cannot be read ({exc.strerror or exc})') from None
    try:
        with f, warnings.catch_warnings():  # torch warns about pickle protocols on its way to failing
            warnings.simplefilter('ignore')
            return torch.load(f, map_location='cpu', weights_only=True)
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
    """The resume state of a run; with --seeds, of the batch of these seeds (a name that no single
    run's state can have: common.resume_state_name)."""
    stem = os.path.splitext(args.save)[0]
    return os.path.join(args.results_dir, resume_state_name(stem, getattr(args, 'seeds', None)))


def _seeds_text(seeds) -> str:
    return ' '.join(map(str, seeds))


def _batch_hint(args) -> str:
    """'; ... holds the interrupted batch of --seeds ...' for each batch state of this --save:
    what a run without those --seeds (or with others) should mention."""
    found = batch_states(args.results_dir, os.path.splitext(args.save)[0])
    return ''.join(f'; {path} holds the interrupted batch of --save {args.save} --seeds '
                   f'{_seeds_text(seeds)}: continue it with --seeds {_seeds_text(seeds)} --resume'
                   for path, seeds in found)


def prepare_run(args, folder_prefix: str, claim: 'RunClaim', check_stored=None):
    """Claim the run's files, apply the existing-file rules; on --resume, load the resume state
    and take the run's arguments from it.

    check_stored(namespace): the script's validation, applied to the arguments stored in a resume
    state (a UsageError there means the file is not a resume state of this project).
    Returns (args, members, resume path, resume_state or None). Raises UsageError before anything
    is written, or NothingToDo when --resume finds the run finished.
    """
    members = member_runs(args, folder_prefix)
    resume = resume_path(args)
    claim.lock([paths.results for _, paths in members], f'--save {args.save}', '--save', '--results_dir')
    if getattr(args, 'seeds', None):  # a single run's state is covered by its results lock
        claim.lock([resume], f'--save {args.save} --seeds {_seeds_text(args.seeds)}', '--save',
                   '--results_dir')
    claim.lock([paths.checkpoint for _, paths in members], 'the checkpoint', '--checkpoint',
               '--checkpoint')
    written = [paths.results for _, paths in members if os.path.lexists(paths.results)]
    if len(written) == len(members):
        _refuse_finished_run(args, members, resume, written, claim.active)
    if not args.resume:
        if written:
            hint = (f'; {resume} holds the rest of its batch: continue it with --resume, which '
                    f'writes the missing members' if os.path.lexists(resume) else '')
            raise UsageError(f'{written[0]} exists; results are never overwritten: choose another '
                             f'--save or move the file{hint}')
        if os.path.lexists(resume):
            raise UsageError(f'{resume} holds an interrupted run of this --save'
                             f'{" and --seeds" if getattr(args, "seeds", None) else ""}; continue '
                             f'it with --resume, or delete it to start this run over')
        for _, paths in members:
            if os.path.lexists(paths.checkpoint):
                raise UsageError(f'checkpoint {paths.checkpoint} exists and belongs to another '
                                 f'run; pass another --checkpoint or move it{_batch_hint(args)}')
        claim.make_folders([paths for _, paths in members])
        return args, members, resume, None
    if not os.path.lexists(resume):
        raise UsageError(f'--resume: no resume state {resume} for --save {args.save}'
                         f'{" --seeds " + _seeds_text(args.seeds) if getattr(args, "seeds", None) else ""}'
                         f'{_batch_hint(args)}')
    state = load_torch(resume, 'resume state')
    _check_resume_state(state, resume, args)
    _check_resume_flags(args, state['args'])
    # A flag added since the run started is absent from its state: its default then, which is
    # what the code did before the flag existed.
    stored = argparse.Namespace(**{**plain_args(args), **state['args']})
    for key in RESUME_MAY_CHANGE:
        setattr(stored, key, getattr(args, key))
    if check_stored is not None:
        try:
            check_stored(stored)
        except UsageError as exc:
            raise UsageError(f'resume state {resume} is not a resume state of this project '
                             f'({exc})') from None
    members = member_runs(stored, folder_prefix)
    claim.make_folders([paths for _, paths in members])
    for path in written:  # a batch killed while it wrote its members' pickles (see Run.finish)
        print(f'{path} was written before the interruption: kept; writing the other members')
    return stored, members, resume, state


def _refuse_finished_run(args, members, resume, written, remove: bool):
    """Every results file of the run exists. A resume state left beside them by a kill between
    the last pickle and its removal is removed (when it is the state of the run that wrote
    them; by rank 0 only, `remove`); then --resume has nothing to do, and a fresh run is
    refused. The stale lock file such a kill leaves is removed when the claim is released."""
    removed = os.path.lexists(resume) and _is_leftover_state(resume, members)
    if removed and remove:
        with contextlib.suppress(FileNotFoundError):
            os.remove(resume)
    note = (f'; removed {resume}, which the finished run had left behind (killed before it '
            f'could remove it)' if removed else '')
    if args.resume and removed:
        raise NothingToDo(f'--resume: the run of --save {args.save} had finished: '
                          f'{", ".join(written)} written{note}')
    raise UsageError(f'{written[0]} exists; results are never overwritten: choose another --save '
                     f'or move the file{note}')


def _is_leftover_state(resume: str, members) -> bool:
    """Whether the resume state is the one the run that wrote these pickles saved last: same seed,
    and the same test-error curve (a pickle holds the curve of the state it was written from)."""
    try:
        state = load_torch(resume, 'resume state')
        progress = state['progress']
        if len(progress) != len(members):
            return False
        seeds = state['args'].get('seeds') or [state['args']['seed']]
        for (_, paths), saved, seed in zip(members, progress, seeds):
            results = load_results(paths.results)
            if (not isinstance(results, dict) or results.get('seed') != seed
                    or not np.array_equal(np.asarray(results.get('test_classif')),
                                          np.asarray(saved['test_classif'], dtype=np.float32))):
                return False
        return True
    except (UsageError, UnsafePickle, OSError, KeyError, TypeError, IndexError, ValueError,
            AttributeError, EOFError, pickle.UnpicklingError):
        return False


# What a resume state of this project holds, and the type of each entry.
RESUME_STATE_ENTRIES = {'format': int, 'args': dict, 'facts': dict, 'parts': dict, 'optimizer': dict,
                        'scheduler': dict, 'data_generators': list, 'rng': dict, 'progress': list,
                        'epoch': int, 'elapsed': (int, float), 'position': (dict, type(None))}
PROGRESS_ENTRIES = ('train_loss', 'train_classif', 'test_classif', 'epoch_times', 'best_error',
                    'best_epoch', 'diverged_epoch')
# Recorded since the metrics file: a state saved before lacks them, and is continued without.
PROGRESS_ENTRIES_LATER = ('learning_rates', 'evaluated_at')


def _check_resume_state(state, resume: str, args):
    """The resume state has the shape this project writes and is the state of this run (its
    --save and --seeds): anything else is refused in one line, before it is used."""
    def refuse(why):
        raise UsageError(f'resume state {resume} is not a resume state of this project ({why})')

    if not isinstance(state, dict):
        refuse(f'a {type(state).__name__}, not a dict')
    if state.get('format') != RESUME_FORMAT:
        refuse(f'format {state.get("format")!r}; this version writes {RESUME_FORMAT}')
    for key, kind in RESUME_STATE_ENTRIES.items():
        if key not in state:
            refuse(f'no {key!r}')
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            refuse(f'{key!r} is a {type(state[key]).__name__}')
    stored = state['args']
    seeds = getattr(args, 'seeds', None)
    if stored.get('save') != args.save or (stored.get('seeds') or None) != (seeds or None):
        refuse(f'it is the state of --save {stored.get("save")!r} --seeds {stored.get("seeds")!r}')
    members = len(seeds) if seeds else 1
    if len(state['progress']) != members or len(state['data_generators']) != members:
        refuse(f'{len(state["progress"])} member(s) recorded for {members}')
    for progress in state['progress']:
        if not isinstance(progress, dict) or not (
                set(PROGRESS_ENTRIES) <= set(progress) <= set(PROGRESS_ENTRIES + PROGRESS_ENTRIES_LATER)):
            refuse('its progress records are not this project\'s')
    epochs = stored.get('epochs')
    if not isinstance(epochs, int) or not 0 <= state['epoch'] <= epochs:
        refuse(f'epoch {state["epoch"]} of {epochs!r}')
    if not math.isfinite(state['elapsed']):
        refuse('its elapsed time is not finite')


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

    lock(): an exclusive lock beside each file the run will write and no other run may write:
    '<results_dir>/.<save stem>.lock' for each results file (which covers a single run's resume
    state too), '.<name>.lock' beside a --seeds run's batch state and beside each checkpoint. A
    second process that would write one of them (the same --save, or the same checkpoint from
    another --results_dir) is refused at once instead of silently overwriting the first one's
    files. The kernel drops the locks when the process ends, however it ends.
    make_folders(): creates the results and checkpoint folders and writes a probe file in each,
    so that a place that cannot be written is refused before the data is even loaded.
    release(failed): removes the lock files, and after a refusal also what the claim created.
    """

    def __init__(self):
        self.active = not distributed.launched_by_torchrun() or int(os.environ['RANK']) == 0
        self.created, self.locks = [], []  # folders made; (path, fd)

    def lock(self, paths: list[str], holder: str, flag: str, folder_flag: str):
        """Lock each of `paths` (its lock file beside it, in a folder made if missing). `holder`
        and `flag` word the refusal (who holds it, which flag to change); `folder_flag` names
        the flag of the folder when it cannot be made or written."""
        for path in paths if self.active else ():
            folder = os.path.dirname(path) or '.'
            self._make_folder(folder, folder_flag)
            lock_path = os.path.join(folder, lock_name(path))
            if any(os.path.abspath(held) == os.path.abspath(lock_path) for held, _ in self.locks):
                continue  # two of this run's files share a lock file: held already
            what = holder if holder != 'the checkpoint' else f'checkpoint {path}'
            self.locks.append(_locked(lock_path, what, flag))

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
        # A lock file is removed whoever created it: holding its lock proves that no other
        # process uses it (one left by a killed run is stale). In a folder that became read-only
        # it stays, unlocked, and the next run takes it over.
        for path, fd in self.locks:
            with contextlib.suppress(OSError):
                os.remove(path)
            os.close(fd)  # removed first, then unlocked: see _locked
        self.locks = []
        if failed:
            for folder in reversed(self.created):  # deepest first; only if still empty
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


def lock_name(path: str) -> str:
    """The lock file's name for a file the run writes: '.<stem>.lock' for a results pickle (as
    since the first version, so that runs of older code see the same lock), '.<name>.lock' for
    anything else."""
    name = os.path.basename(path)
    return f'.{name[:-len(".pkl")] if name.endswith(".pkl") else name}.lock'


def _locked(path: str, holder: str, flag: str) -> tuple[str, int]:
    """An exclusive, non-blocking flock on `path` (created if missing): (path, fd)."""
    for _ in range(10):  # a holder that finishes removes the file between our open and our lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, 'O_NOCTTY', 0), 0o666)
        except OSError as exc:
            if os.path.isdir(path):
                raise UsageError(f'{flag}: cannot lock {path}: a folder is there, where this run '
                                 f'keeps its lock file; move it away') from None
            raise UsageError(f'{flag}: cannot create the lock file {path} '
                             f'({exc.strerror or exc})') from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f'{RUNNING_ELSEWHERE} {holder} (it holds {path}); wait for '
                             f'it to finish, or choose another {flag}') from None
        except OSError as exc:  # a FIFO or device at the lock path, say
            os.close(fd)
            raise UsageError(f'{flag}: cannot lock {path} ({exc.strerror or exc})') from None
        if _same_file(fd, path):
            return path, fd
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
    """SIGINT/SIGTERM while a run is under way.

    Until defer() is called (the start of training or pretraining), the first signal ends the
    process at once: it raises cli.Interrupted wherever the process is, waiting included (on a
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
