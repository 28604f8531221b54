"""The command line both experiment scripts share: flags, validation, exit statuses, errors.

Exit statuses (documented in the README): 0 success, 2 bad input or refusal (one line on
stderr, nothing written), 3 training diverged (the pickle is still written, with
diverged=True), 4 a file could not be written mid-run (a full disk, a folder turned read-only:
one line says which, and --resume continues), 130 SIGINT, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys

import torch

import models
from common import EXIT_USAGE, OneLineArgumentParser  # noqa: F401 (the scripts' parser)
from common import BATCH_RESUME_SUFFIX, RESUME_SUFFIX, resume_state_name
from data import DataError
from embeddings import EmbeddingError

EXIT_OK, EXIT_DIVERGED, EXIT_WRITE_FAILED = 0, 3, 4
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + signal number, the shell's convention
EXIT_FOR_SIGNAL = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class UsageError(Exception):
    """Bad command line or a refusal: one line on stderr, exit status 2, nothing written."""


class NothingToDo(Exception):
    """The command has nothing left to do (--resume of a run that had finished): one line on
    stdout, exit status 0."""


class WriteFailed(Exception):
    """A file of the run could not be written (full disk, read-only folder...): exit status 4.
    path: the file being written; error: the OSError. The engine words the line, since it knows
    what the run has saved so far."""

    def __init__(self, path: str, error: OSError):
        super().__init__(f'cannot write {path} ({describe_write_error(error)})')
        self.path, self.error = path, error


def describe_write_error(error: OSError) -> str:
    """What a failed write means, in words: which condition, from its errno."""
    import errno
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f'{error.strerror}: the disk is full'
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f'{error.strerror}: the folder is read-only or not writable'
    return error.strerror or str(error)


class Interrupted(BaseException):
    """SIGINT/SIGTERM before training started (runstate.StopRequest): raised wherever the process
    was, waiting included. A BaseException, like KeyboardInterrupt, so that no handler meant
    for errors (a failed download, say) mistakes it for one."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return EXIT_FOR_SIGNAL[self.signum]


def given_flags(args) -> frozenset:
    """The destinations the command line set explicitly (empty for a hand-made Namespace)."""
    return getattr(args, '_given', frozenset())


def add_common_arguments(parser: argparse.ArgumentParser, *, layers: int, epochs: int,
                         lr_init: float, decay_steps: list, decay_rate: float, folder_prefix: str,
                         release_tbs_is_test_batch_size: bool = True):
    """The flags both scripts share. The one-dash short forms are the release's own spellings,
    so that a command line written for the release runs here unchanged.

    release_tbs_is_test_batch_size: whether the release's -tbs is just --test_batch_size here
    (CIFAR-10); MNIST_experiments.py gives -tbs the release's second meaning too."""
    results_dir, checkpoint_dir = f'{folder_prefix}_experiments', f'{folder_prefix}_checkpoint'
    add = parser.add_argument
    add('--model', '-m', default='RKHS', choices=list(models.RESIDUALS),
        help='RKHS: fixed random hidden layers; SHL: trained hidden layers (default RKHS)')
    add('--layers', '-l', type=int, default=layers,
        help=f'L: residual steps of the ODE block (MNIST), or blocks of the third stage (CIFAR-10) '
             f'(default {layers})')
    add('--epochs', '-e', type=int, default=epochs,
        help=f'training epochs; 0 evaluates the initial model (default {epochs})')
    add('--lr_init', '-lr', type=float, default=lr_init,
        help=f'initial SGD learning rate (default {lr_init})')
    add('--decay_steps', '-ds', type=int, nargs='*', default=decay_steps,
        help=f'epochs at which the rate is multiplied by --decay_rate (default {decay_steps})')
    add('--decay_rate', '-dr', type=float, default=decay_rate,
        help=f'factor of each decay (default {decay_rate})')
    add('--batch_size', '-bs', type=int, default=256, help='SGD batch size, global (default 256)')
    add('--test_batch_size', *(['-tbs'] if release_tbs_is_test_batch_size else []), type=int,
        default=10_000,
        help='upper bound of the evaluation batch; never changes results (default 10000)')
    add('--save', '-s', default='experiment.pkl',
        help='results file name (a plain name ending in .pkl) in --results_dir; an existing file is '
             'never overwritten (default experiment.pkl)')
    add('--results_dir', default=results_dir,
        help=f'folder of the results pickle and resume state (default {results_dir})')
    add('--checkpoint', default=None,
        help=f'best-model checkpoint path (default {checkpoint_dir}/<save name>.pth)')
    add('--data_root', default='data', help='dataset folder; downloaded there when missing (default data)')
    add('--device', default=None,
        help='torch device, e.g. cpu, cuda, cuda:1 (default cuda if available, else cpu)')
    add('--seed', type=int, default=None,
        help='random seed; drawn and recorded when not given. With a seed and one CPU thread '
             '(OMP_NUM_THREADS=1), runs are bit-for-bit repeatable')
    add('--subset', type=int, default=None,
        help='use only the first N training and N test images (quick checks)')
    add('--synthetic', action='store_true',
        help='random learnable images of the dataset\'s shape instead of the dataset')
    add('--evaluate', default=None, metavar='CKPT',
        help='load a checkpoint, print its test error, write nothing')
    add('--resume', action='store_true',
        help='continue the interrupted run of the same --save from its resume state')
    add('--compile', action='store_true', help='torch.compile the training forward pass (GPU; off by default)')
    return parser


def checkpoint_path(args, folder_prefix: str) -> str:
    """--checkpoint, or <prefix>_checkpoint/<save name>.pth."""
    stem = os.path.splitext(args.save)[0]
    return args.checkpoint or os.path.join(f'{folder_prefix}_checkpoint', f'{stem}.pth')


def positive_float32(name, value):
    """A rate: positive, finite, and within float32's range, since it scales float32 weights (a
    larger one overflows in the first update; a smaller one rounds to 0 and nothing trains)."""
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f'--{name} must be positive and finite, got {value}')
    if value > FLOAT32_MAX or float(torch.tensor(value, dtype=torch.float32)) == 0:
        raise UsageError(f'--{name} {value} is outside the range of float32, the precision of the '
                         f'weights it scales (about 1.4e-45 to {FLOAT32_MAX:.4g})')


def _at_least(name, value, low):
    if value is not None and value < low:
        raise UsageError(f'--{name} must be >= {low}, got {value}')


def _check_writable_folder(flag, folder):
    """The folder exists and is writable, or can be created: checked without creating anything."""
    path = os.path.abspath(folder or '.')
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not os.path.isdir(path):
        raise UsageError(f'{flag}: {path} is not a folder, so {folder} cannot be created')
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f'{flag}: {path} is not writable')


def _has_control_characters(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _check_save_name(save: str):
    if (os.path.basename(save) != save or '/' in save or '\\' in save or save.startswith('.')
            or not save.endswith('.pkl') or len(save) <= len('.pkl') or _has_control_characters(save)):
        raise UsageError(f'--save must be a plain file name ending in .pkl (no folders, no .., no '
                         f'control characters), got {save!r}')


# What a checkpoint may never be called: the names of results files, resume states and lock
# files, so that a --checkpoint can never replace one (its own run's, or another run's).
NOT_CHECKPOINT_SUFFIXES = ('.pkl', RESUME_SUFFIX, BATCH_RESUME_SUFFIX, '.lock')


def _check_checkpoint(path: str | None):
    """A --checkpoint names a file (not a folder) that is not a results file, a resume state or
    a lock file, so that writing it can never replace one of those."""
    if path is None:
        return
    if (not path or path.endswith(('/', os.sep)) or os.path.basename(path) in ('.', '..')
            or os.path.isdir(path)):
        raise UsageError(f'--checkpoint must name a file, such as {os.path.join(path or ".", "run.pth")}; '
                         f'got the folder {path!r}')
    if path.endswith(NOT_CHECKPOINT_SUFFIXES):
        raise UsageError(f'--checkpoint {path}: a checkpoint may not end in '
                         f'{", ".join(NOT_CHECKPOINT_SUFFIXES)}, the names of results files, '
                         f'resume states and locks (it would replace one); use .pth')
    if _has_control_characters(path):
        raise UsageError(f'--checkpoint may not hold control characters, got {path!r}')


# An atomic write's temporary file is named '.<name>.<8 random characters>.tmp' (mkstemp).
TEMPORARY_NAME_EXTRA = len('.') + len('.') + 8 + len('.tmp')


def derived_names(args, folder_prefix: str) -> list[tuple[str, str]]:
    """Every file a run writes, as (folder, file name): results, resume state, locks, checkpoint;
    with --seeds, those of each member (<stem>_s<S>) and the batch's resume state and its lock."""
    stem = os.path.splitext(args.save)[0]
    checkpoint = checkpoint_path(args, folder_prefix)
    checkpoint_folder = os.path.dirname(checkpoint) or '.'
    checkpoint_stem = os.path.splitext(os.path.basename(checkpoint))[0]
    results = args.results_dir
    seeds = getattr(args, 'seeds', None)
    if not seeds:
        return [(results, args.save), (results, resume_state_name(stem)), (results, f'.{stem}.lock'),
                (checkpoint_folder, os.path.basename(checkpoint)),
                (checkpoint_folder, f'.{os.path.basename(checkpoint)}.lock')]
    state = resume_state_name(stem, seeds)
    names = [(results, state), (results, f'.{state}.lock')]
    for seed in seeds:
        names += [(results, f'{stem}_s{seed}.pkl'), (results, f'.{stem}_s{seed}.lock'),
                  (checkpoint_folder, f'{checkpoint_stem}_s{seed}.pth'),
                  (checkpoint_folder, f'.{checkpoint_stem}_s{seed}.pth.lock')]
    return names


def _check_name_lengths(args, folder_prefix: str):
    """Refuse a --save, --checkpoint or --seeds whose files the file system could not create.
    File systems count bytes, not characters ('€' is 3 bytes in UTF-8)."""
    for folder, name in derived_names(args, folder_prefix):
        size, limit = len(os.fsencode(name)), _name_max(folder) - TEMPORARY_NAME_EXTRA
        if size <= limit:
            continue
        if BATCH_RESUME_SUFFIX in name:
            raise UsageError(f'--seeds: the name of the batch\'s resume state, {name[:40]}..., is '
                             f'too long ({size} bytes; this file system allows {limit} here): give '
                             f'fewer seeds, or consecutive ones (written as a range, 0to19)')
        raise UsageError(f'--save/--checkpoint: the file name {name[:40]}... is too long '
                         f'({size} bytes; this file system allows {limit} here)')


def _name_max(folder) -> int:
    path = os.path.abspath(folder or '.')
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return os.pathconf(path, 'PC_NAME_MAX')
    except (OSError, ValueError, AttributeError):
        return 255


def _check_decay_steps(steps):
    if any(step < 1 for step in steps):
        raise UsageError(f'--decay_steps are epochs >= 1 (a decay at 0 would act before training), '
                         f'got {steps}')
    repeated = sorted({step for step in steps if steps.count(step) > 1})
    if repeated:
        raise UsageError(f'--decay_steps lists epoch {repeated[0]} more than once (each listing '
                         f'multiplies the rate again), got {steps}')


def _check_device(name):
    try:
        device = torch.device(name) if name else None
    except RuntimeError:
        raise UsageError(f'--device: unknown device {name!r}') from None
    if device is None:
        return
    if device.type not in ('cpu', 'cuda'):
        raise UsageError(f'--device must be cpu or cuda[:N], got {name!r}')
    if device.type == 'cpu' and device.index not in (None, 0):
        raise UsageError(f'--device {name}: there is one CPU device, cpu')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: CUDA is not available on this machine')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f'--device {name}: this machine has {torch.cuda.device_count()} CUDA '
                         f'device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}')


# The flags --evaluate reads; it takes everything else from the checkpoint, so any other flag
# given with it would be ignored in silence.
EVALUATE_READS = frozenset(('evaluate', 'device', 'data_root', 'test_batch_size', 'subset', 'synthetic'))


def _check_evaluate_flags(args):
    ignored = sorted(given_flags(args) - EVALUATE_READS)
    if ignored:
        raise UsageError(f'--evaluate takes the network from the checkpoint and writes nothing, so '
                         f'it would ignore {", ".join("--" + dest for dest in ignored)}: drop '
                         f'{"it" if len(ignored) == 1 else "them"}')


def validate_common_args(args, folder_prefix: str, train_size: int):
    """Every rule that can be checked before touching data or building a model.

    train_size: the full training set's size, the most --subset can take.
    """
    if args.evaluate is not None:
        _check_evaluate_flags(args)
    for name in ('layers', 'batch_size', 'test_batch_size', 'subset'):
        _at_least(name, getattr(args, name), 1)
    if args.subset is not None and args.subset > train_size:
        raise UsageError(f'--subset {args.subset} is more than the {train_size:,} training images')
    _at_least('epochs', args.epochs, 0)
    positive_float32('lr_init', args.lr_init)
    positive_float32('decay_rate', args.decay_rate)
    _check_decay_steps(args.decay_steps)
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise UsageError(f'--seed must be in [0, 2^63), got {args.seed}')
    _check_save_name(args.save)
    _check_device(args.device)
    if args.evaluate is not None:
        if not os.path.isfile(args.evaluate):
            raise UsageError(f'--evaluate: no such checkpoint file {args.evaluate}')
        return
    _check_checkpoint(args.checkpoint)
    _check_writable_folder('--results_dir', args.results_dir)
    _check_writable_folder('--checkpoint', os.path.dirname(checkpoint_path(args, folder_prefix)))
    _check_name_lengths(args, folder_prefix)


def check_stored_args(parser: argparse.ArgumentParser, stored, required) -> argparse.Namespace:
    """The arguments a checkpoint or resume state holds, checked as argparse checks the command
    line's (type, choices), so that a file with an edited or missing one is refused in one line
    instead of failing deep inside. `required`: the destinations that must be there. Returns
    the parser's defaults updated with the stored values; raises UsageError saying what is wrong
    (the caller names the file)."""
    if not isinstance(stored, dict):
        raise UsageError(f'its arguments are a {type(stored).__name__}, not a dict')
    missing = [dest for dest in required if dest not in stored]
    if missing:
        raise UsageError(f'its arguments lack {", ".join(missing)}')
    for action in parser._actions:
        if action.dest not in stored or action.dest == argparse.SUPPRESS:
            continue
        value = stored[action.dest]
        if value is None and action.default is None:
            continue
        if action.nargs in ('*', '+') and not isinstance(value, list):
            raise UsageError(f'its {action.dest} is {value!r}, not a list')
        for item in value if action.nargs in ('*', '+') else [value]:
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                ok = isinstance(item, bool)
            elif action.type in (int, float):
                ok = isinstance(item, (int, float) if action.type is float else int) and not isinstance(item, bool)
            else:
                ok = isinstance(item, str)
            if not ok or (action.choices is not None and item not in action.choices):
                raise UsageError(f'its {action.dest} is {item!r}, which the command line never accepts')
    defaults = {action.dest: action.default for action in parser._actions
                if action.dest != argparse.SUPPRESS}
    return argparse.Namespace(**{**defaults, **stored})


def memory_limit(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) of the memory a run on `device` can use at most: the GPU's, or the
    machine's RAM (or the container's limit, when lower)."""
    if device.type == 'cuda':
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f'{device}\'s memory'
    limit = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    try:
        with open('/sys/fs/cgroup/memory.max') as f:
            text = f.read().strip()
        if text.isdigit():
            limit = min(limit, int(text))
    except OSError:
        pass
    return limit, 'this machine\'s memory'


def check_fits_in_memory(what: str, needed: int, device: torch.device):
    """Refuse, before anything is allocated, a network whose parameters, gradients and one
    batch's activations alone exceed the memory of the device (an estimate from below)."""
    limit, where = memory_limit(device)
    if needed > limit:
        raise UsageError(f'{what}: the network would need at least {needed / 2 ** 30:,.1f} GiB '
                         f'(parameters, gradients and one batch\'s activations), more than '
                         f'{where} ({limit / 2 ** 30:,.1f} GiB)')


def decay_warning(args) -> str | None:
    """A decay given at or after the last epoch never acts: worth a warning, not a refusal (a
    shortened run of a longer protocol, such as --epochs 1 of the 40-epoch one, is a normal thing
    to do). The default decay of a short run needs no warning."""
    late = [step for step in args.decay_steps if step >= args.epochs]
    if args.epochs == 0 or not late or 'decay_steps' not in given_flags(args):
        return None  # a default decay beyond a short run: plainly a shortened protocol
    return (f'warning: --decay_steps {" ".join(map(str, late))} at or after --epochs {args.epochs}: '
            f'{"that decay never happens" if len(late) == 1 else "those decays never happen"}')


def pick_device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def cli_errors(main):
    """Turn UsageError, DataError and EmbeddingError into one line on stderr and exit status 2;
    WriteFailed into one line and 4; Interrupted (a signal before training) into one line and
    130/143; NothingToDo into one line on stdout and 0."""
    def wrapped(args):
        try:
            return main(args)
        except (UsageError, DataError, EmbeddingError) as exc:
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
