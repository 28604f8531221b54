"""The training engine shared by MNIST_experiments.py and CIFAR_experiments.py.

One `fit` runs a whole experiment: evaluation before training and after every epoch, SGD
epochs over device-resident data, the best checkpoint, a resume state after every epoch (and
on SIGINT/SIGTERM), divergence handling, and the results pickle in the release's schema.

Files are written atomically (temporary file in the same folder, fsync, os.replace), so a kill
at any instant leaves the old file or the new one. Everything is loaded with weights_only=True.

Exit statuses (documented in the README): 0 success, 2 bad input or refusal, 3 training
diverged (the pickle is still written, with diverged=True), 130 SIGINT, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import platform
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import distributed
from data import DataError, DeviceDataset
from embeddings import EmbeddingError

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED = 0, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + signal number, the shell's convention
EXIT_FOR_SIGNAL = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}

RESUME_FORMAT = 1
CHECKPOINT_FORMAT = 1
TRAIN_EVAL_SIZE = 10_000  # train_classif is measured on 10,000 training images, as in the release
# Evaluation batch size caps per device type: results do not depend on it (eval-mode BatchNorm
# uses running statistics); on a 2-core CPU, chunks of ~2,000 MNIST images ran faster than 10,000.
EVAL_CHUNK = {'MNIST': {'cpu': 2000, 'cuda': 10_000}, 'CIFAR10': {'cpu': 500, 'cuda': 2500}}
# On CUDA, reading the loss forces a host-device sync; do it every this many steps (for the
# progress bar and the divergence check) instead of every step. On CPU it costs nothing.
CUDA_SYNC_EVERY = 50


def eval_chunk(dataset: str, device: torch.device, test_batch_size: int) -> int:
    """The evaluation chunk for this device, never above --test_batch_size."""
    return min(test_batch_size, EVAL_CHUNK[dataset].get(device.type, EVAL_CHUNK[dataset]['cpu']))


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


class UsageError(Exception):
    """Bad command line or a refusal: one line on stderr, exit status 2, nothing written."""


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints its whole usage block on an error; a bad flag gets one line here."""

    def error(self, message):
        self.exit(EXIT_USAGE, f'{self.prog}: error: {message} (see --help)\n')


def add_common_arguments(parser: argparse.ArgumentParser, *, layers: int, epochs: int,
                         lr_init: float, decay_steps: list, decay_rate: float, dataset: str):
    """The flags both scripts share. The one-dash short forms are the release's own spellings,
    so that a command line written for the release runs here unchanged."""
    results_dir, checkpoint_dir = f'{dataset}_experiments', f'{dataset}_checkpoint'
    parser.add_argument('--model', '-m', default='RKHS', choices=['RKHS', 'SHL'],
                        help='RKHS: fixed random hidden layers; SHL: trained hidden layers (default RKHS)')
    parser.add_argument('--layers', '-l', type=int, default=layers, help=f'(default {layers})')
    parser.add_argument('--epochs', '-e', type=int, default=epochs,
                        help=f'training epochs; 0 evaluates the initial model (default {epochs})')
    parser.add_argument('--lr_init', '-lr', type=float, default=lr_init,
                        help=f'initial SGD learning rate (default {lr_init})')
    parser.add_argument('--decay_steps', '-ds', type=int, nargs='*', default=decay_steps,
                        help=f'epochs at which the rate is multiplied by --decay_rate (default {decay_steps})')
    parser.add_argument('--decay_rate', '-dr', type=float, default=decay_rate,
                        help=f'factor of each decay (default {decay_rate})')
    parser.add_argument('--batch_size', '-bs', type=int, default=256, help='SGD batch size, global (default 256)')
    parser.add_argument('--test_batch_size', '-tbs', type=int, default=10_000,
                        help='upper bound of the evaluation batch; never changes results (default 10000)')
    parser.add_argument('--save', '-s', default='experiment.pkl',
                        help='results file name (a plain name ending in .pkl) in --results_dir; '
                             'an existing file is never overwritten (default experiment.pkl)')
    parser.add_argument('--results_dir', default=results_dir,
                        help=f'folder of the results pickle and resume state (default {results_dir})')
    parser.add_argument('--checkpoint', default=None,
                        help=f'best-model checkpoint path (default {checkpoint_dir}/<save name>.pth)')
    parser.add_argument('--data_root', default='data',
                        help='dataset folder; downloaded there when missing (default data)')
    parser.add_argument('--device', default=None,
                        help='torch device, e.g. cpu, cuda, cuda:1 (default cuda if available, else cpu)')
    parser.add_argument('--seed', type=int, default=None,
                        help='random seed; drawn and recorded when not given. With a seed, CPU runs '
                             'are bit-for-bit repeatable')
    parser.add_argument('--subset', type=int, default=None,
                        help='use only the first N training and N test images (quick checks)')
    parser.add_argument('--synthetic', action='store_true',
                        help='random learnable images of the dataset\'s shape instead of the dataset')
    parser.add_argument('--evaluate', default=None, metavar='CKPT',
                        help='load a checkpoint, print its test error, write nothing')
    parser.add_argument('--resume', action='store_true',
                        help='continue the interrupted run of the same --save from its resume state')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the training forward pass (GPU; off by default)')
    return parser


def default_checkpoint(args, dataset: str) -> str:
    stem = os.path.splitext(args.save)[0]
    return args.checkpoint or os.path.join(f'{dataset}_checkpoint', f'{stem}.pth')


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


def validate_common_args(args, dataset: str):
    """Every rule that can be checked before touching data or building a model."""
    _at_least('layers', args.layers, 1)
    _at_least('batch_size', args.batch_size, 1)
    _at_least('test_batch_size', args.test_batch_size, 1)
    _at_least('subset', args.subset, 1)
    _at_least('epochs', args.epochs, 0)
    _positive_finite('lr_init', args.lr_init)
    _positive_finite('decay_rate', args.decay_rate)
    if any(step < 0 for step in args.decay_steps):
        raise UsageError(f'--decay_steps must be non-negative epochs, got {args.decay_steps}')
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise UsageError(f'--seed must be in [0, 2^63), got {args.seed}')
    save = args.save
    if (os.path.basename(save) != save or '/' in save or '\\' in save or save.startswith('.')
            or not save.endswith('.pkl') or len(save) <= len('.pkl')):
        raise UsageError(f'--save must be a plain file name ending in .pkl (no folders, no ..), '
                         f'got {save!r}')
    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError:
        raise UsageError(f'--device: unknown device {args.device!r}') from None
    if device is not None and device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {args.device}: CUDA is not available on this machine')
    if device is not None and device.type not in ('cpu', 'cuda'):
        raise UsageError(f'--device must be cpu or cuda[:N], got {args.device!r}')
    if args.evaluate is not None:
        if not os.path.isfile(args.evaluate):
            raise UsageError(f'--evaluate: no such checkpoint file {args.evaluate}')
        return
    _check_writable_folder('--results_dir', args.results_dir)
    _check_writable_folder('--checkpoint', os.path.dirname(default_checkpoint(args, dataset)))


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


# ---------------------------------------------------------------------------------------------
# Files: atomic writes and safe loads
# ---------------------------------------------------------------------------------------------

def atomic_write(path: str, write: Callable) -> None:
    """write(file) into a temporary file beside `path`, fsync it, then os.replace it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_torch(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_pickle(obj, path):
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))


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


def run_paths(args, dataset: str) -> RunPaths:
    stem = os.path.splitext(args.save)[0]
    return RunPaths(results=os.path.join(args.results_dir, args.save),
                    checkpoint=default_checkpoint(args, dataset),
                    resume=os.path.join(args.results_dir, f'{stem}.resume.pt'))


def prepare_run(args, dataset: str):
    """Apply the existing-file rules; on --resume, load the resume state and its arguments.

    Returns (args, paths, resume_state or None). Raises UsageError before anything is written.
    """
    paths = run_paths(args, dataset)
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
    # The run's definition comes from the state; where it runs may change.
    for key in ('device', 'data_root', 'resume'):
        setattr(stored, key, getattr(args, key))
    return stored, run_paths(stored, dataset), state


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


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------

@dataclass
class Experiment:
    """What a script hands to `fit`: the network, its data, and the release's pickle fields.

    model: images (float) -> logits; `parts` are the modules saved in checkpoints (by name);
    `parameters` the trained ones. train_transform(images_u8, generator) makes a training batch,
    eval_transform(images_u8) an evaluation batch. If train_eval_random, train_classif is measured
    on TRAIN_EVAL_SIZE random training images through train_transform (the CIFAR release);
    otherwise on the first TRAIN_EVAL_SIZE in dataset order through eval_transform (MNIST).
    """
    dataset: str
    model: nn.Module
    parts: dict
    parameters: list
    train_set: DeviceDataset
    test_set: DeviceDataset
    train_transform: Callable
    eval_transform: Callable
    train_eval_random: bool
    results: dict                     # the release's keys known before training
    extras: dict = field(default_factory=dict)
    training_forward: Optional[Callable] = None  # e.g. a compiled model; defaults to model


@torch.no_grad()
def count_errors(model, images_u8, labels, transform, chunk) -> torch.Tensor:
    """Number of misclassified images, as a device tensor (no host sync)."""
    wrong = torch.zeros((), dtype=torch.long, device=labels.device)
    for start in range(0, labels.shape[0], chunk):
        logits = model(transform(images_u8[start:start + chunk]))
        wrong += (logits.argmax(1) != labels[start:start + chunk]).sum()
    return wrong


def evaluate(exp: Experiment, generator, chunk, dist) -> tuple[float, float]:
    """(train error, test error) in [0, 1], in eval mode. One host sync for both."""
    exp.model.eval()
    train = exp.train_set
    if exp.train_eval_random:
        # Drawn on every rank from the same generator, so the ranks agree on the images.
        index = torch.randperm(len(train), device=train.labels.device, generator=generator)
        index = index[:TRAIN_EVAL_SIZE]
        images = exp.train_transform(train.images[index], generator)
        labels, transform = train.labels[index], (lambda x: x)
    else:
        images, labels = train.images[:TRAIN_EVAL_SIZE], train.labels[:TRAIN_EVAL_SIZE]
        transform = exp.eval_transform
    n_train, n_test = labels.shape[0], len(exp.test_set)
    rank_images, rank_labels = dist.shard(images), dist.shard(labels)
    test_images, test_labels = dist.shard(exp.test_set.images), dist.shard(exp.test_set.labels)
    wrong_train = count_errors(exp.model, rank_images, rank_labels, transform, chunk)
    fault_point('evaluation')
    wrong_test = count_errors(exp.model, test_images, test_labels, exp.eval_transform, chunk)
    wrong = torch.stack([wrong_train, wrong_test])
    wrong_train, wrong_test = dist.all_reduce_sum(wrong).tolist()
    return wrong_train / n_train, wrong_test / n_test


@dataclass
class EpochOutcome:
    losses: torch.Tensor        # (steps run,) device tensor, global batch means
    status: str                 # 'done' | 'diverged' | 'interrupted'
    next_step: int = 0
    permutation: Optional[torch.Tensor] = None


def train_one_epoch(exp, optimizer, generator, batch_size, dist, stop: StopRequest,
                    desc: str, position: Optional[dict] = None) -> EpochOutcome:
    """One pass of SGD over a fresh permutation (or the rest of an interrupted one).

    Each rank takes its share of every global batch; the loss is scaled so that DDP's gradient
    average equals the gradient of the global batch mean, whatever the shares' sizes.
    """
    train = exp.train_set
    device = train.labels.device
    n = len(train)
    num_steps = math.ceil(n / batch_size)
    if position is None:
        permutation = torch.randperm(n, device=device, generator=generator)
        start, losses = 0, torch.full((num_steps,), float('nan'), device=device)
    else:
        permutation = position['permutation'].to(device)
        start = position['step']
        losses = torch.full((num_steps,), float('nan'), device=device)
        losses[:start] = position['losses'].to(device)
    # 'is None', not 'or': a compiled module's truth test calls len() on the model, which fails.
    forward = exp.model if exp.training_forward is None else exp.training_forward
    exp.model.train()
    sync_every = 1 if device.type == 'cpu' else CUDA_SYNC_EVERY
    checked = start
    progress = _progress(range(start, num_steps), desc, dist)
    for step in progress:
        batch = permutation[step * batch_size:(step + 1) * batch_size]
        global_count = batch.shape[0]
        # The whole global batch is transformed on every rank, so that every rank draws the same
        # augmentation numbers and the shared generator stays in step across ranks.
        images = dist.shard(exp.train_transform(train.images[batch], generator))
        loss_sum = F.cross_entropy(forward(images), dist.shard(train.labels[batch]), reduction='sum')
        optimizer.zero_grad(set_to_none=True)
        (loss_sum * (dist.world_size / global_count)).backward()
        optimizer.step()
        fault_point('step')
        losses[step] = dist.all_reduce_sum(loss_sum.detach()) / global_count
        at_sync = (step + 1 - checked) >= sync_every or step + 1 == num_steps
        if at_sync:
            window = losses[checked:step + 1]
            if not bool(torch.isfinite(window).all()):
                first_bad = checked + int((~torch.isfinite(window)).nonzero()[0])
                return EpochOutcome(losses[:first_bad + 1], 'diverged')
            checked = step + 1
            if hasattr(progress, 'set_postfix'):
                progress.set_postfix(loss=f'{losses[step].item():.4f}',
                                     lr=f'{optimizer.param_groups[0]["lr"]:.3g}', refresh=False)
        # One process reads its own flag every step; ranks agree on stopping at sync points.
        if (stop.requested if dist.world_size == 1 else at_sync and dist.any(stop.requested)):
            return EpochOutcome(losses[:step + 1], 'interrupted', step + 1, permutation)
    return EpochOutcome(losses, 'done')


def _progress(iterable, desc, dist):
    if not dist.is_main:
        return iterable
    from tqdm import tqdm
    # disable=None: a bar on a terminal, nothing in log files.
    return tqdm(iterable, desc=desc, leave=False, disable=None, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# fit: the whole run
# ---------------------------------------------------------------------------------------------

@dataclass
class Curves:
    train_loss: list = field(default_factory=list)
    train_classif: list = field(default_factory=list)
    test_classif: list = field(default_factory=list)
    epoch_times: list = field(default_factory=list)


def fit(exp: Experiment, args, paths: RunPaths, resume_state: Optional[dict],
        dist=None) -> int:
    """Train, evaluate, checkpoint and pickle one run. Returns the exit status."""
    dist = dist or distributed.SINGLE
    device = exp.train_set.labels.device
    optimizer = torch.optim.SGD(exp.parameters, lr=args.lr_init)  # plain SGD, as the release
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(args.decay_steps),
                                                     gamma=args.decay_rate)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    chunk = eval_chunk(exp.dataset, device, args.test_batch_size)
    curves, position = Curves(), None
    best_error, best_epoch, elapsed, start_epoch = math.inf, None, 0.0, 0

    if resume_state is not None:
        for name, module in exp.parts.items():
            module.load_state_dict(resume_state['parts'][name])
        optimizer.load_state_dict(resume_state['optimizer'])
        scheduler.load_state_dict(resume_state['scheduler'])
        generator.set_state(resume_state['data_generator'].to(generator.get_state().device))
        set_rng_state(resume_state['rng'])
        curves = Curves(**{k: list(v) for k, v in resume_state['curves'].items()})
        best_error, best_epoch = resume_state['best_error'], resume_state['best_epoch']
        elapsed, start_epoch = resume_state['elapsed'], resume_state['epoch']
        position = resume_state['position']
        dist.print(f'resuming {paths.results} at epoch {start_epoch + 1}'
                   + (f', step {position["step"]}' if position else ''))

    def save_resume(epoch, position=None):
        if not dist.is_main:
            return
        save_torch({
            'format': RESUME_FORMAT, 'args': plain_args(args), 'epoch': epoch,
            'parts': {name: m.state_dict() for name, m in exp.parts.items()},
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'data_generator': generator.get_state(), 'rng': rng_state(),
            'curves': {k: list(v) for k, v in vars(curves).items()},
            'best_error': best_error, 'best_epoch': best_epoch,
            'elapsed': elapsed + (time.perf_counter() - segment_start), 'position': position,
            'extras': exp.extras,
        }, paths.resume)
        fault_point('resume')

    def save_checkpoint(epoch, test_error):
        if not dist.is_main:
            return
        save_torch({
            'format': CHECKPOINT_FORMAT, 'dataset': exp.dataset, 'args': plain_args(args),
            'epoch': epoch, 'test_error': test_error, 'results_file': paths.results,
            'extras': exp.extras, **{name: m.state_dict() for name, m in exp.parts.items()},
        }, paths.checkpoint)
        fault_point('checkpoint')

    def finish(status: str, diverged_epoch=None) -> int:
        results = dict(exp.results)
        results.update(
            train_loss=np.asarray(curves.train_loss, dtype=np.float32),
            train_classif=np.asarray(curves.train_classif, dtype=np.float32),
            test_classif=np.asarray(curves.test_classif, dtype=np.float32),
            computation_time=float(elapsed + time.perf_counter() - segment_start),
        )
        results.update(exp.extras)
        results.update(
            dataset=exp.dataset, epochs=args.epochs, lr_init=args.lr_init,
            decay_steps=list(args.decay_steps), decay_rate=args.decay_rate, seed=args.seed,
            diverged=status == 'diverged', diverged_epoch=diverged_epoch,
            epoch_times=[float(t) for t in curves.epoch_times],
            best_test_classif=float(best_error) if math.isfinite(best_error) else None,
            best_epoch=best_epoch, checkpoint=paths.checkpoint, device=str(device),
            world_size=dist.world_size, torch_version=str(torch.__version__),
            torchvision_version=_torchvision_version(), python_version=platform.python_version(),
        )
        if dist.is_main:
            save_pickle(results, paths.results)
            if os.path.exists(paths.resume):
                os.remove(paths.resume)
        dist.print(f'results written to {paths.results}')
        return EXIT_DIVERGED if status == 'diverged' else EXIT_OK

    segment_start = time.perf_counter()
    with StopRequest() as stop:
        if resume_state is None:
            train_error, test_error = evaluate(exp, generator, chunk, dist)
            curves.train_classif.append(train_error)
            curves.test_classif.append(test_error)
            best_error, best_epoch = test_error, 0
            dist.print(f'epoch 0/{args.epochs}: train error {100 * train_error:.2f}%, '
                       f'test error {100 * test_error:.2f}% (before training)')
            save_resume(0)
            save_checkpoint(0, test_error)
        elif position is None and best_epoch == start_epoch:
            # The restored model is the best so far; a kill may have come between the resume
            # state and the checkpoint, so write the checkpoint again (same content).
            save_checkpoint(best_epoch, best_error)
        for epoch in range(start_epoch, args.epochs):
            epoch_start = time.perf_counter()
            outcome = train_one_epoch(exp, optimizer, generator, args.batch_size, dist, stop,
                                      f'epoch {epoch + 1}/{args.epochs}', position)
            position = None
            if outcome.status == 'interrupted':
                save_resume(epoch, {'step': outcome.next_step, 'losses': outcome.losses.cpu(),
                                    'permutation': outcome.permutation.cpu()})
                dist.print(f'interrupted by {signal.Signals(stop.signum).name}: resume state saved '
                           f'to {paths.resume}; continue with --resume')
                return EXIT_FOR_SIGNAL[stop.signum]
            curves.train_loss.extend(outcome.losses.tolist())
            if outcome.status == 'diverged':
                dist.print(f'training diverged (non-finite loss) in epoch {epoch + 1}; '
                           f'curves so far are kept, the best checkpoint is from epoch {best_epoch}')
                return finish('diverged', diverged_epoch=epoch + 1)
            scheduler.step()
            dist.sync_buffers(exp.model)  # BatchNorm statistics of rank 0, so ranks evaluate alike
            train_error, test_error = evaluate(exp, generator, chunk, dist)
            curves.train_classif.append(train_error)
            curves.test_classif.append(test_error)
            curves.epoch_times.append(time.perf_counter() - epoch_start)
            if test_error < best_error:
                best_error, best_epoch = test_error, epoch + 1
                save_checkpoint(epoch + 1, test_error)
            dist.print(f'epoch {epoch + 1}/{args.epochs}: train error {100 * train_error:.2f}%, '
                       f'test error {100 * test_error:.2f}%, best {100 * best_error:.2f}% '
                       f'({curves.epoch_times[-1]:.1f} s)')
            save_resume(epoch + 1)
            if dist.any(stop.requested) and epoch + 1 < args.epochs:
                dist.print(f'interrupted by {signal.Signals(stop.signum).name}: resume state saved '
                           f'to {paths.resume}; continue with --resume')
                return EXIT_FOR_SIGNAL[stop.signum]
        return finish('done')


def _torchvision_version():
    try:
        import torchvision
        return str(torchvision.__version__)
    except Exception:  # the pickle is still worth writing without it
        return None


def start_run(args, folder: str):
    """The existing-file rules, the device, the process group and the seed, in that order.

    Returns (args, paths, resume_state, device, dist); the caller closes dist when done.
    """
    args, paths, resume_state = prepare_run(args, folder)
    device = pick_device(args)
    dist = distributed.setup(args, device)
    if dist.world_size > 1:
        device = dist.device
    if args.seed is None:  # drawn once, on rank 0, and recorded in the pickle
        args.seed = dist.broadcast_int(random.SystemRandom().randrange(2 ** 31))
    return args, paths, resume_state, device, dist


def load_datasets(args, dist, load_real: Callable, image_shape: tuple, full_sizes: tuple):
    """Train and test sets on the CPU: synthetic or real (rank 0 downloads first), cut to --subset."""
    if args.synthetic:
        n_train, n_test = (min(args.subset or size, size) for size in full_sizes)
        from data import synthetic_dataset
        return synthetic_dataset(image_shape, n_train, n_test)
    if not dist.is_main:
        dist.barrier()  # so that ranks never write the same download at once
    try:
        train, test = load_real(args.data_root)
    finally:
        if dist.is_main:
            dist.barrier()
    if args.subset:
        train, test = train.head(args.subset), test.head(args.subset)
    return train, test


def load_checkpoint(path, dataset: str) -> dict:
    """A best-model checkpoint of this project for `dataset`, or a UsageError."""
    checkpoint = load_torch(path, 'checkpoint')
    if not isinstance(checkpoint, dict) or checkpoint.get('dataset') != dataset:
        raise UsageError(f'{path} is not a checkpoint of this project for {dataset}')
    return checkpoint


def evaluate_checkpoint(model, checkpoint: dict, parts: dict, test_set, transform, chunk) -> int:
    """--evaluate: load the checkpoint's parts, print the test error, write nothing."""
    for name, module in parts.items():
        module.load_state_dict(checkpoint[name])
    model.eval()
    error = count_errors(model, test_set.images, test_set.labels, transform, chunk).item() / len(test_set)
    print(f'test error {100 * error:.4f}% on {len(test_set)} images (checkpoint of epoch '
          f'{checkpoint["epoch"]}, recorded {100 * checkpoint["test_error"]:.4f}%)')
    return EXIT_OK
