"""The command line both experiment scripts share: flags, validation, exit statuses, errors.

Exit statuses (documented in the README): 0 success, 2 bad input or refusal (one line on
stderr, nothing written), 3 training diverged (the pickle is still written, with
diverged=True), 130 SIGINT, 143 SIGTERM.
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
from data import DataError
from embeddings import EmbeddingError

EXIT_OK, EXIT_DIVERGED = 0, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + signal number, the shell's convention
EXIT_FOR_SIGNAL = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}


class UsageError(Exception):
    """Bad command line or a refusal: one line on stderr, exit status 2, nothing written."""


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
        help='random seed; drawn and recorded when not given. With a seed, CPU runs are bit-for-bit '
             'repeatable')
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


def _positive_finite(name, value):
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f'--{name} must be positive and finite, got {value}')


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


def _check_save_name(save: str):
    if (os.path.basename(save) != save or '/' in save or '\\' in save or save.startswith('.')
            or not save.endswith('.pkl') or len(save) <= len('.pkl')
            or any(ord(c) < 32 or ord(c) == 127 for c in save)):
        raise UsageError(f'--save must be a plain file name ending in .pkl (no folders, no .., no '
                         f'control characters), got {save!r}')


# An atomic write's temporary file is named '.<name>.<8 random characters>.tmp' (mkstemp).
TEMPORARY_NAME_EXTRA = len('.') + len('.') + 8 + len('.tmp')


def derived_names(args, folder_prefix: str) -> list[str]:
    """Every file name a run writes: results, resume state, lock, checkpoint; with --seeds, those
    of each member (<stem>_s<S>) and the batch's resume state (<stem>_s<S1>-...-<SK>)."""
    stem = os.path.splitext(args.save)[0]
    checkpoint = os.path.splitext(os.path.basename(checkpoint_path(args, folder_prefix)))[0]
    seeds = getattr(args, 'seeds', None)
    if not seeds:
        return [args.save, f'{stem}.resume.pt', f'.{stem}.lock', f'{checkpoint}.pth']
    names = [f'{stem}_s{"-".join(map(str, seeds))}.resume.pt']
    for seed in seeds:
        names += [f'{stem}_s{seed}.pkl', f'.{stem}_s{seed}.lock', f'{checkpoint}_s{seed}.pth']
    return names


def _check_name_lengths(args, folder_prefix: str):
    """Refuse a --save or --checkpoint whose files the file system could not create."""
    limit = _name_max(args.results_dir)
    longest = max(derived_names(args, folder_prefix), key=len)
    if len(longest) + TEMPORARY_NAME_EXTRA > limit:
        raise UsageError(f'--save/--checkpoint: the file name {longest[:40]}... is too long '
                         f'({len(longest)} characters; this file system allows '
                         f'{limit - TEMPORARY_NAME_EXTRA} here)')


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
    if device is not None and device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: CUDA is not available on this machine')
    if device is not None and device.type not in ('cpu', 'cuda'):
        raise UsageError(f'--device must be cpu or cuda[:N], got {name!r}')


def validate_common_args(args, folder_prefix: str, train_size: int):
    """Every rule that can be checked before touching data or building a model.

    train_size: the full training set's size, the most --subset can take.
    """
    for name in ('layers', 'batch_size', 'test_batch_size', 'subset'):
        _at_least(name, getattr(args, name), 1)
    if args.subset is not None and args.subset > train_size:
        raise UsageError(f'--subset {args.subset} is more than the {train_size:,} training images')
    _at_least('epochs', args.epochs, 0)
    _positive_finite('lr_init', args.lr_init)
    _positive_finite('decay_rate', args.decay_rate)
    _check_decay_steps(args.decay_steps)
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise UsageError(f'--seed must be in [0, 2^63), got {args.seed}')
    _check_save_name(args.save)
    _check_device(args.device)
    if args.evaluate is not None:
        if not os.path.isfile(args.evaluate):
            raise UsageError(f'--evaluate: no such checkpoint file {args.evaluate}')
        return
    _check_writable_folder('--results_dir', args.results_dir)
    _check_writable_folder('--checkpoint', os.path.dirname(checkpoint_path(args, folder_prefix)))
    _check_name_lengths(args, folder_prefix)


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
    """Turn UsageError, DataError and EmbeddingError into one line on stderr and exit status 2."""
    def wrapped(args):
        try:
            return main(args)
        except (UsageError, DataError, EmbeddingError) as exc:
            print(f'error: {exc}', file=sys.stderr)
            return EXIT_USAGE
    wrapped.__name__, wrapped.__doc__ = main.__name__, main.__doc__
    return wrapped
