"""A run's files: where they go, who holds them, and the rules about files already there.

A run claims its files before any work (RunClaim: a lock beside each), so that a second process
with the same --save is refused at once. It never overwrites results; an interrupted run leaves a
resume state, which --resume continues (resume_state.py reads it).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass

from . import gate
from .distributed import launched_by_torchrun
from .errors import RUNNING_ELSEWHERE, NothingToDo, UsageError
from .files import missing_ancestors, open_regular, write_probe


@dataclass(frozen=True)
class RunPaths:
    """A single run's results pickle, metrics file and best checkpoint."""
    results: str
    metrics: str
    checkpoint: str


def run_paths(config) -> RunPaths:
    stem = os.path.splitext(config.save)[0]
    return RunPaths(results=os.path.join(config.results_dir, config.save),
                    metrics=os.path.join(config.results_dir, gate.metrics_name(stem)),
                    checkpoint=gate.checkpoint_path(config))


def member_runs(config) -> list[tuple[gate.Config, RunPaths]]:
    """The single runs a command line makes: itself, or with --seeds S1 .. SK one per seed, with
    the values and files that `--seed Sk --save <stem>_s<Sk>.pkl` would have had."""
    seeds = getattr(config, 'seeds', None)
    if not seeds:
        return [(config, run_paths(config))]
    stem = os.path.splitext(config.save)[0]
    checkpoint_stem = os.path.splitext(gate.checkpoint_path(config))[0]
    members = []
    for seed in seeds:
        member = config.replace(seed=seed, seeds=None, save=f'{stem}_s{seed}.pkl',
                                checkpoint=f'{checkpoint_stem}_s{seed}.pth')
        members.append((member, run_paths(member)))
    return members


def resume_path(config) -> str:
    """The resume state of a run; with --seeds, of the batch of these seeds."""
    stem = os.path.splitext(config.save)[0]
    return os.path.join(config.results_dir, gate.resume_state_name(stem, getattr(config, 'seeds', None)))


def batch_states(folder: str, stem: str) -> list[tuple[str, list[int]]]:
    """The resume states of interrupted --seeds runs of --save <stem>.pkl in `folder`, with their
    seeds, sorted by name: what a run without --seeds, or with other seeds, should mention."""
    prefix = f'{stem}_s'
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    found = []
    for name in names:
        if name.startswith(prefix) and name.endswith(gate.BATCH_RESUME_SUFFIX):
            seeds = gate.parse_seed_list_text(name[len(prefix):-len(gate.BATCH_RESUME_SUFFIX)])
            if seeds:
                found.append((os.path.join(folder, name), seeds))
    return found


def _seeds_text(seeds) -> str:
    return ' '.join(map(str, seeds))


def _batch_hint(config) -> str:
    """'; ... holds the interrupted batch of --seeds ...' for each batch state of this --save."""
    found = batch_states(config.results_dir, os.path.splitext(config.save)[0])
    return ''.join(f'; {path} holds the interrupted batch of --save {config.save} --seeds '
                   f'{_seeds_text(seeds)}: continue it with --seeds {_seeds_text(seeds)} --resume'
                   for path, seeds in found)


# ---------------------------------------------------------------------------------------------
# The existing-file rules
# ---------------------------------------------------------------------------------------------

def prepare_run(config, claim: 'RunClaim'):
    """Claim the run's files and apply the existing-file rules; on --resume, load the resume
    state and take the run's values from it, through the gate.

    Returns (config, resume path, resume state or None). Raises UsageError before anything is
    written, or NothingToDo when --resume finds the run finished.
    """
    members, resume = member_runs(config), resume_path(config)
    seeds = getattr(config, 'seeds', None)
    claim.lock([paths.results for _, paths in members], f'--save {config.save}', '--save', '--results_dir')
    if seeds:  # a single run's state is covered by its results lock
        claim.lock([resume], f'--save {config.save} --seeds {_seeds_text(seeds)}', '--save', '--results_dir')
    claim.lock([paths.checkpoint for _, paths in members], 'the checkpoint', '--checkpoint', '--checkpoint')
    written = [paths.results for _, paths in members if os.path.lexists(paths.results)]
    if len(written) == len(members):
        _refuse_finished_run(config, members, resume, written, claim.active)
    _refuse_odd_metrics(members)
    if not config.resume:
        _refuse_existing_files(config, members, resume, written)
        claim.make_folders([paths for _, paths in members])
        return config, resume, None
    if not os.path.lexists(resume):
        raise UsageError(f'--resume: no resume state {resume} for --save {config.save}'
                         f'{" --seeds " + _seeds_text(seeds) if seeds else ""}{_batch_hint(config)}')
    from . import resume_state  # only a resumed run reads a resume state
    state, stored = resume_state.load(resume, config)
    claim.make_folders([paths for _, paths in member_runs(stored)])
    for path in written:  # a batch killed while it wrote its members' pickles
        print(f'{path} was written before the interruption: kept; writing the other members')
    return stored, resume, state


def _refuse_existing_files(config, members, resume, written):
    """A new run never overwrites results, takes over an interrupted run, or writes over another
    run's checkpoint or metrics."""
    if written:
        hint = (f'; {resume} holds the rest of its batch: continue it with --resume, which '
                f'writes the missing members' if os.path.lexists(resume) else '')
        raise UsageError(f'{written[0]} exists; results are never overwritten: choose another '
                         f'--save or move the file{hint}')
    if os.path.lexists(resume):
        raise UsageError(f'{resume} holds an interrupted run of this --save'
                         f'{" and --seeds" if getattr(config, "seeds", None) else ""}; continue '
                         f'it with --resume, or delete it (and the run\'s checkpoint and metrics file) to start '
                         f'this run over')
    for member, paths in members:
        if os.path.lexists(paths.checkpoint):
            raise UsageError(f'checkpoint {paths.checkpoint} exists and belongs to another '
                             f'run; pass another --checkpoint or move it{_batch_hint(config)}')
        if os.path.lexists(paths.metrics) and not _metrics_of(paths.metrics, member):
            raise UsageError(f'{paths.metrics} exists and belongs to another run (the metrics of a '
                             f'run of this --save); choose another --save or move the file')


def _metrics_of(path: str, member) -> bool:
    """Whether the metrics file at `path` is this run's: its header names this --save and seed
    (left by an interrupted batch whose member this run is, say), so that it may be rewritten."""
    try:
        with open_regular(path) as f:
            header = json.loads(f.readline(1 << 20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(header, dict) and header.get('run') == member.save and header.get('seed') == member.seed


def _refuse_odd_metrics(members):
    """Something other than a file where a run writes its metrics (a folder, a FIFO) would fail
    the run only after its first epoch: refused before any work."""
    for _, paths in members:
        if os.path.lexists(paths.metrics) and not os.path.isfile(paths.metrics):
            raise UsageError(f'{paths.metrics} is not a regular file, and this run writes its metrics '
                             f'there; move it away')


def _refuse_finished_run(config, members, resume, written, remove: bool):
    """Every results file of the run exists. A resume state left beside them by a kill between
    the last pickle and its removal is removed (when it is the state of the run that wrote them;
    by rank 0 only, `remove`). Then --resume has nothing to do, and a fresh run is refused."""
    from . import resume_state  # only a finished run's leftovers are read
    removed = os.path.lexists(resume) and resume_state.is_leftover(resume, members)
    if removed and remove:
        with contextlib.suppress(FileNotFoundError):
            os.remove(resume)
    note = (f'; removed {resume}, which the finished run had left behind (killed before it '
            f'could remove it)' if removed else '')
    if config.resume and (removed or not os.path.lexists(resume)):
        raise NothingToDo(f'--resume: the run of --save {config.save} has finished; its results are '
                          f'in {", ".join(written)}{note}')
    raise UsageError(f'{written[0]} exists; results are never overwritten: choose another --save '
                     f'or move the file{note}')


# ---------------------------------------------------------------------------------------------
# Claiming a run's files
# ---------------------------------------------------------------------------------------------

class RunClaim:
    """A run's hold on its files while it runs, taken before any work (rank 0 only).

    lock(): an exclusive lock beside each file the run will write and no other run may write:
    '<results_dir>/.<save stem>.lock' for each results file (which covers a single run's resume
    state and metrics too), '.<name>.lock' beside a --seeds run's batch state and beside each
    checkpoint. The kernel drops the locks when the process ends, however it ends.
    make_folders(): creates the results and checkpoint folders and writes a probe file in each,
    so that a place that cannot be written is refused before the data is even loaded.
    release(failed): removes the lock files, and after a refusal also what the claim created.
    """

    def __init__(self):
        self.active = not launched_by_torchrun() or int(os.environ['RANK']) == 0
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

    def make_folders(self, paths: list[RunPaths]):
        folders = [(os.path.dirname(p.results) or '.', '--results_dir') for p in paths]
        folders += [(os.path.dirname(p.checkpoint) or '.', '--checkpoint') for p in paths]
        for folder, flag in dict.fromkeys(folders) if self.active else ():
            self._make_folder(folder, flag)

    def _make_folder(self, folder: str, flag: str):
        missing = missing_ancestors(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            self.created.extend(path for path in missing if path not in self.created)
            write_probe(folder)
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
    """The lock file's name for a file the run writes: '.<stem>.lock' for a results pickle,
    '.<name>.lock' for anything else."""
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
