"""The training engine shared by MNIST_experiments.py and CIFAR_experiments.py.

`fit` runs a whole experiment the way pytorch-cifar's loop reads: evaluate before training, then
for every epoch train, evaluate, save the resume state and the best checkpoint, and log; at the
end write the results pickle in the release's schema (`results_record`). On SIGINT/SIGTERM it
finishes the current step, saves the resume state and exits 130/143; a non-finite loss ends the
run with its curves so far (exit 3).

The engine knows no dataset or residual type by name: a script describes its run in an
`Experiment` (network, data, transforms, evaluation chunk, how the training error is sampled).
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import distributed
from cli import EXIT_DIVERGED, EXIT_OK, UsageError, decay_warning, pick_device
from common import save_pickle
from data import DeviceDataset
from runstate import (CHECKPOINT_FORMAT, RESUME_FORMAT, RunClaim, RunPaths, StopRequest, fault_point,
                      load_torch, plain_args, prepare_run, rng_state, save_torch, set_rng_state)

TRAIN_EVAL_SIZE = 10_000  # train_classif is measured on 10,000 training images, as in the release
# On CUDA, reading the loss forces a host-device sync; do it every this many steps (for the
# progress bar and the divergence check) instead of every step. On CPU it costs nothing.
CUDA_SYNC_EVERY = 50


def eval_chunk(caps: dict, device: torch.device, test_batch_size: int) -> int:
    """The evaluation chunk for this device type (caps: {'cpu': n, 'cuda': m}), at most
    --test_batch_size. Results never depend on it (eval-mode BatchNorm uses running statistics)."""
    return min(test_batch_size, caps.get(device.type, caps['cpu']))


@dataclass
class Experiment:
    """What a script hands to `fit`: the network, its data, and what its records say.

    model: float images -> logits; `parts` are the modules saved in checkpoints (by name),
    `parameters` the trained ones. train_transform(images_u8, generator) makes a training batch,
    eval_transform(images_u8) an evaluation batch. train_eval_sample(generator) returns
    (images, labels, transform) for train_classif. facts: what the run's record states beyond
    its arguments (num_parameters; for MNIST, where A and B came from).
    """
    dataset: str
    model: nn.Module
    parts: dict
    parameters: list
    train_set: DeviceDataset
    test_set: DeviceDataset
    train_transform: Callable
    eval_transform: Callable
    train_eval_sample: Callable
    eval_chunk: int
    facts: dict
    training_forward: Optional[Callable] = None  # e.g. a compiled model; defaults to model


# ---------------------------------------------------------------------------------------------
# Evaluation and one epoch of training
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def count_errors(model, images_u8, labels, transform, chunk) -> torch.Tensor:
    """Number of misclassified images, as a device tensor (no host sync)."""
    wrong = torch.zeros((), dtype=torch.long, device=labels.device)
    for start in range(0, labels.shape[0], chunk):
        logits = model(transform(images_u8[start:start + chunk]))
        wrong += (logits.argmax(1) != labels[start:start + chunk]).sum()
    return wrong


def evaluate(exp: Experiment, generator, dist) -> tuple[float, float]:
    """(train error, test error) in [0, 1], in eval mode. One host sync for both."""
    exp.model.eval()
    images, labels, transform = exp.train_eval_sample(generator)
    test = exp.test_set
    wrong_train = count_errors(exp.model, dist.shard(images), dist.shard(labels), transform,
                               exp.eval_chunk)
    fault_point('evaluation')
    wrong_test = count_errors(exp.model, dist.shard(test.images), dist.shard(test.labels),
                              exp.eval_transform, exp.eval_chunk)
    wrong_train, wrong_test = dist.all_reduce_sum(torch.stack([wrong_train, wrong_test])).tolist()
    return wrong_train / labels.shape[0], wrong_test / len(test)


@dataclass
class EpochOutcome:
    losses: torch.Tensor        # (steps run,) device tensor, global batch means
    status: str                 # 'done' | 'diverged' | 'interrupted'
    position: Optional[dict] = None  # where an interrupted epoch stopped (resume state)


def train_one_epoch(exp, optimizer, generator, batch_size, dist, stop: StopRequest,
                    desc: str, position: Optional[dict] = None) -> EpochOutcome:
    """One pass of SGD over a fresh permutation (or the rest of an interrupted one).

    Each rank takes its share of every global batch; the loss is scaled so that DDP's gradient
    average equals the gradient of the global batch mean, whatever the shares' sizes.
    """
    train = exp.train_set
    device = train.labels.device
    num_steps = math.ceil(len(train) / batch_size)
    losses = torch.full((num_steps,), float('nan'), device=device)
    if position is None:
        permutation, start = torch.randperm(len(train), device=device, generator=generator), 0
    else:
        permutation, start = position['permutation'].to(device), position['step']
        losses[:start] = position['losses'].to(device)
    # 'is None', not 'or': a compiled module's truth test calls len() on the model, which fails.
    forward = exp.model if exp.training_forward is None else exp.training_forward
    exp.model.train()
    sync_every, checked = (1 if device.type == 'cpu' else CUDA_SYNC_EVERY), start
    progress = _progress(range(start, num_steps), desc, dist)
    for step in progress:
        batch = permutation[step * batch_size:(step + 1) * batch_size]
        # The whole global batch is transformed on every rank, so that every rank draws the same
        # augmentation numbers and the shared generator stays in step across ranks.
        images = dist.shard(exp.train_transform(train.images[batch], generator))
        loss_sum = F.cross_entropy(forward(images), dist.shard(train.labels[batch]), reduction='sum')
        optimizer.zero_grad(set_to_none=True)
        (loss_sum * (dist.world_size / batch.shape[0])).backward()
        optimizer.step()
        fault_point('step')
        losses[step] = dist.all_reduce_sum(loss_sum.detach()) / batch.shape[0]
        at_sync = (step + 1 - checked) >= sync_every or step + 1 == num_steps
        if at_sync:
            finite = torch.isfinite(losses[checked:step + 1])
            if not bool(finite.all()):
                return EpochOutcome(losses[:checked + int((~finite).nonzero()[0]) + 1], 'diverged')
            checked = step + 1
            _show(progress, losses[step], optimizer)
        # One process reads its own flag every step; ranks agree on stopping at sync points.
        if stop.requested if dist.world_size == 1 else at_sync and dist.any(stop.requested):
            return EpochOutcome(losses[:step + 1], 'interrupted',
                                {'step': step + 1, 'losses': losses[:step + 1].cpu(),
                                 'permutation': permutation.cpu()})
    return EpochOutcome(losses, 'done')


def _progress(iterable, desc, dist):
    if not dist.is_main:
        return iterable
    from tqdm import tqdm
    # disable=None: a bar on a terminal, nothing in log files.
    return tqdm(iterable, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def _show(progress, loss, optimizer):
    if hasattr(progress, 'set_postfix'):
        progress.set_postfix(loss=f'{loss.item():.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.3g}',
                             refresh=False)


# ---------------------------------------------------------------------------------------------
# fit: the whole run
# ---------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """What a run has measured so far (saved in the resume state). index 0 of the error curves is
    before training; `epoch` counts the epochs done."""
    train_loss: list = field(default_factory=list)
    train_classif: list = field(default_factory=list)
    test_classif: list = field(default_factory=list)
    epoch_times: list = field(default_factory=list)
    best_error: float = math.inf
    best_epoch: Optional[int] = None
    epoch: int = 0
    elapsed: float = 0.0  # seconds spent before this process (earlier segments of a resumed run)


class Run:
    """The moving parts of one run: optimiser, learning-rate schedule, data-order generator,
    progress, and the files it writes."""

    def __init__(self, exp: Experiment, args, paths, dist):
        self.exp, self.args, self.paths, self.dist = exp, args, paths, dist
        self.optimizer = torch.optim.SGD(exp.parameters, lr=args.lr_init)  # plain SGD, as the release
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(args.decay_steps), gamma=args.decay_rate)
        self.generator = torch.Generator(device=exp.train_set.labels.device)
        self.generator.manual_seed(args.seed)
        self.progress = Progress()
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return self.progress.elapsed + time.perf_counter() - self.started

    def restore(self, state: dict) -> Optional[dict]:
        """Continue from a resume state; returns where an interrupted epoch stopped, if it did."""
        for name, module in self.exp.parts.items():
            module.load_state_dict(state['parts'][name])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.generator.set_state(state['data_generator'].to(self.generator.get_state().device))
        set_rng_state(state['rng'])
        self.progress = Progress(**state['progress'])
        position = state['position']
        self.dist.print(f'resuming {self.paths.results} at epoch {self.progress.epoch + 1}'
                        + (f', step {position["step"]}' if position else ''))
        return position

    def save_resume(self, position: Optional[dict] = None):
        if self.dist.is_main:
            save_torch({
                'format': RESUME_FORMAT, 'args': plain_args(self.args), 'facts': self.exp.facts,
                'parts': {name: m.state_dict() for name, m in self.exp.parts.items()},
                'optimizer': self.optimizer.state_dict(), 'scheduler': self.scheduler.state_dict(),
                'data_generator': self.generator.get_state(), 'rng': rng_state(),
                'progress': dict(vars(self.progress), elapsed=self.seconds()), 'position': position,
            }, self.paths.resume)
            fault_point('resume')

    def save_checkpoint(self):
        if self.dist.is_main:
            save_torch({
                'format': CHECKPOINT_FORMAT, 'dataset': self.exp.dataset, 'args': plain_args(self.args),
                'epoch': self.progress.best_epoch, 'test_error': self.progress.best_error,
                'results_file': self.paths.results, 'facts': self.exp.facts,
                **{name: m.state_dict() for name, m in self.exp.parts.items()},
            }, self.paths.checkpoint)
            fault_point('checkpoint')

    def evaluate(self, epoch_start: Optional[float] = None) -> bool:
        """Evaluate, record and log the model after `progress.epoch` epochs; True if it is the
        best so far (strictly lower test error; epoch 0 is the first best). An epoch's time,
        from epoch_start, includes its evaluations."""
        progress, epoch = self.progress, self.progress.epoch
        train_error, test_error = evaluate(self.exp, self.generator, self.dist)
        progress.train_classif.append(train_error)
        progress.test_classif.append(test_error)
        is_best = test_error < progress.best_error
        if is_best:
            progress.best_error, progress.best_epoch = test_error, epoch
        message = f'epoch {epoch}/{self.args.epochs}: train error {100 * train_error:.2f}%, ' \
                  f'test error {100 * test_error:.2f}%'
        if epoch_start is None:
            self.dist.print(f'{message} (before training)')
        else:
            progress.epoch_times.append(time.perf_counter() - epoch_start)
            self.dist.print(f'{message}, best {100 * progress.best_error:.2f}% '
                            f'({progress.epoch_times[-1]:.1f} s)')
        return is_best

    def interrupted(self, stop: StopRequest) -> int:
        self.dist.print(f'interrupted by {stop.name}: resume state saved to {self.paths.resume}; '
                        f'continue with --resume')
        return stop.exit_status

    def finish(self, diverged_epoch: Optional[int] = None) -> int:
        """Write the results pickle (rank 0), remove the resume state; the exit status."""
        if diverged_epoch is not None:
            self.dist.print(f'training diverged (non-finite loss) in epoch {diverged_epoch}; curves '
                            f'so far are kept, the best checkpoint is from epoch {self.progress.best_epoch}')
        if self.dist.is_main:
            save_pickle(results_record(self, diverged_epoch), self.paths.results)
            if os.path.exists(self.paths.resume):
                os.remove(self.paths.resume)
        self.dist.print(f'results written to {self.paths.results}')
        return EXIT_OK if diverged_epoch is None else EXIT_DIVERGED


def fit(exp: Experiment, started: Started) -> int:
    """Train, evaluate, checkpoint and pickle one run. Returns the exit status."""
    args, resume_state, dist, stop = started.args, started.resume_state, started.dist, started.stop
    run = Run(exp, args, started.paths, dist)
    position = run.restore(resume_state) if resume_state is not None else None
    if decay_warning(args):
        dist.print(decay_warning(args), file=sys.stderr)
    # SIGINT/SIGTERM are recorded by `stop` from start_run on: a step finishes, the state is saved.
    if resume_state is None:
        run.evaluate()  # epoch 0: the model before training
        run.save_resume()
        run.save_checkpoint()
    elif position is None and run.progress.best_epoch == run.progress.epoch:
        # The restored model is the best so far; a kill may have come between the resume
        # state and the checkpoint, so write the checkpoint again (same content).
        run.save_checkpoint()
    for epoch in range(run.progress.epoch, args.epochs):
        epoch_start = time.perf_counter()
        outcome = train_one_epoch(exp, run.optimizer, run.generator, args.batch_size, dist, stop,
                                  f'epoch {epoch + 1}/{args.epochs}', position)
        position = None
        if outcome.status == 'interrupted':
            run.save_resume(outcome.position)
            return run.interrupted(stop)
        run.progress.train_loss.extend(outcome.losses.tolist())
        if outcome.status == 'diverged':
            return run.finish(diverged_epoch=epoch + 1)
        run.scheduler.step()
        dist.sync_buffers(exp.model)  # BatchNorm statistics of rank 0, so ranks evaluate alike
        run.progress.epoch = epoch + 1
        is_best = run.evaluate(epoch_start)
        run.save_resume()
        if is_best:
            run.save_checkpoint()
        if dist.any(stop.requested) and epoch + 1 < args.epochs:
            return run.interrupted(stop)
    return run.finish()


# ---------------------------------------------------------------------------------------------
# The results pickle
# ---------------------------------------------------------------------------------------------

# The release's keys that come from the arguments (pickle key, argument), where the script has
# that argument (CIFAR's has no in_channels, dim_int or pretrain).
RELEASE_KEYS_FROM_ARGS = (('model', 'model'), ('num_layers', 'layers'), ('in_channels', 'in_channels'),
                          ('dim_int', 'dim_int'), ('pretrain_pass', 'pretrain'), ('batch_size', 'batch_size'))
# This project's additions that are arguments, recorded under their own names where present.
EXTRA_KEYS_FROM_ARGS = ('method', 'time_weights', 'integrator', 'pretrain_lr', 'subset', 'synthetic',
                        'amp', 'channels_last', 'epochs', 'lr_init', 'decay_steps', 'decay_rate', 'seed')


def results_record(run: Run, diverged_epoch: Optional[int]) -> dict:
    """Every key of the results pickle: the release's schema, then this project's additions.

    The release's: model, num_layers, (MNIST) in_channels, dim_int, pretrain_pass, batch_size,
    train_loss (per iteration), train_classif and test_classif (index 0 before training),
    computation_time (s), num_parameters. Plain numpy arrays and Python values only, so the
    pickle loads without torch.
    """
    args, progress, exp = run.args, run.progress, run.exp
    record = {key: getattr(args, name) for key, name in RELEASE_KEYS_FROM_ARGS if hasattr(args, name)}
    record.update(
        train_loss=np.asarray(progress.train_loss, dtype=np.float32),
        train_classif=np.asarray(progress.train_classif, dtype=np.float32),
        test_classif=np.asarray(progress.test_classif, dtype=np.float32),
        computation_time=float(run.seconds()), num_parameters=exp.facts['num_parameters'])
    record.update({key: getattr(args, key) for key in EXTRA_KEYS_FROM_ARGS if hasattr(args, key)})
    record['decay_steps'] = list(args.decay_steps)
    record.update({key: value for key, value in exp.facts.items() if key != 'num_parameters'})
    record.update(
        dataset=exp.dataset, diverged=diverged_epoch is not None, diverged_epoch=diverged_epoch,
        epoch_times=[float(t) for t in progress.epoch_times],
        best_test_classif=float(progress.best_error) if math.isfinite(progress.best_error) else None,
        best_epoch=progress.best_epoch, checkpoint=run.paths.checkpoint,
        device=str(exp.train_set.labels.device), world_size=run.dist.world_size,
        torch_version=str(torch.__version__), torchvision_version=_torchvision_version(),
        python_version=platform.python_version())
    return record


def _torchvision_version():
    try:
        import torchvision
        return str(torchvision.__version__)
    except Exception:  # the pickle is still worth writing without it
        return None


# ---------------------------------------------------------------------------------------------
# Starting a run, its data, and --evaluate
# ---------------------------------------------------------------------------------------------

@dataclass
class Started:
    """A run that has claimed its files: its (possibly stored) arguments, paths, resume state,
    device, process group, and the record of SIGINT/SIGTERM, active from the start."""
    args: object
    paths: RunPaths
    resume_state: Optional[dict]
    device: torch.device
    dist: object
    stop: StopRequest


@contextlib.contextmanager
def start_run(args, folder_prefix: str):
    """Claim the run's files, apply the existing-file rules, join the process group, draw the seed.

    The claim (lock and folders) comes before any work, so that a second process with the same
    --save, or a folder that cannot be written, is refused at once. If the run then fails (a
    refusal, missing data, any exception), what the claim created is removed again.
    """
    claim = RunClaim()
    failed = True
    with StopRequest() as stop:
        try:
            claim.lock(os.path.join(args.results_dir, args.save), f'--save {args.save}')
            args, paths, resume_state = prepare_run(args, folder_prefix)
            claim.make_folders(paths)
            dist = distributed.setup(args, pick_device(args))
            try:
                if args.seed is None:  # drawn once, on rank 0, and recorded in the pickle
                    args.seed = dist.broadcast_int(random.SystemRandom().randrange(2 ** 31))
                device = dist.device if dist.world_size > 1 else pick_device(args)
                yield Started(args, paths, resume_state, device, dist, stop)
                failed = False
            finally:
                dist.close()
        finally:
            claim.release(failed)


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
