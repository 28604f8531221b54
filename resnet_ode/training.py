"""The training loop, shared by the MNIST and CIFAR-10 experiments.

`fit` runs a whole experiment the way pytorch-cifar's loop reads: evaluate before training, then
for every epoch train with plain SGD, step the learning-rate schedule, evaluate, save the resume
state and the best checkpoint, and log; at the end write the results pickle in the release's
schema. On SIGINT/SIGTERM it finishes the current step, saves the resume state and exits
130/143; a non-finite loss ends the run with its curves so far (exit 3).

A run may train several seeds at once as one model (MNIST's --seeds): its *members*. Each member
has its own data order, curves, best checkpoint and pickle, exactly those of the single run of
its seed; a member whose loss becomes non-finite stops updating and the others go on.

The loop knows no dataset or residual type by name: a script describes its run in an
`Experiment` (network, data, transforms, evaluation chunk, how the training error is sampled).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import saving
from .data import DeviceDataset
from .errors import EXIT_DIVERGED, EXIT_OK, EXIT_WRITE_FAILED, WriteFailed, describe_write_error
from .evaluation import evaluate
from .faults import fault_point
from .signals import StopRequest
from .training_state import TrainingState

# On CUDA, reading the loss forces a host-device sync; do it every this many steps (for the
# progress bar and the divergence check) instead of every step. On CPU it costs nothing.
CUDA_SYNC_EVERY = 50


@dataclass
class Experiment:
    """What a script hands to `fit`: the network, its data, and what its records say.

    model: float images -> logits; with K members, (K*B, ...) -> (K*B, classes), member k's batch
    the k-th block of B. `parts` are the modules saved in the resume state (by name),
    `parameters` the trained ones. train_transform(images_u8, generator) makes a training batch,
    eval_transform(images_u8) an evaluation batch. train_eval_sample(generator) returns
    (images, labels, transform) for train_classif. facts: what the run's record states beyond
    its arguments (num_parameters; for MNIST, where A and B came from).
    With K > 1 members: member_parts(k) gives member k's checkpoint content (part name -> state
    dict) and freeze_members(ks) sets those members' gradients to zero.
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
    members: int = 1
    member_parts: Optional[Callable] = None
    freeze_members: Optional[Callable] = None


# ---------------------------------------------------------------------------------------------
# One epoch of training
# ---------------------------------------------------------------------------------------------

@dataclass
class EpochOutcome:
    losses: torch.Tensor        # (members, steps run) device tensor, global batch means
    status: str                 # 'done' | 'diverged' (every member) | 'interrupted'
    position: Optional[dict] = None  # where an interrupted epoch stopped (resume state)
    diverged: dict = field(default_factory=dict)  # member -> losses kept, for members that diverged


def train_one_epoch(exp, optimizer, generators, batch_size, dist, stop: StopRequest, desc: str,
                    position: Optional[dict] = None, frozen=()) -> EpochOutcome:
    """One pass of SGD, each member over a fresh permutation from its own generator (or the rest
    of an interrupted pass).

    Each rank takes its share of every global batch; the loss is scaled so that DDP's gradient
    average equals the gradient of the global batch mean, whatever the shares' sizes. The members
    listed in `frozen` diverged earlier: carried along, never updated. A member whose loss turns
    non-finite joins them; the epoch ends early only when no member is left.
    """
    train, members = exp.train_set, len(generators)
    device, num_steps = train.labels.device, math.ceil(len(train) / batch_size)
    losses = torch.full((members, num_steps), float('nan'), device=device)
    if position is None:
        permutations = torch.stack([torch.randperm(len(train), device=device, generator=g)
                                    for g in generators])
        start, diverged = 0, {}
    else:
        permutations, start = position['permutation'].to(device), position['step']
        losses[:, :start] = position['losses'].to(device)
        diverged = dict(position['diverged'])
    frozen = set(frozen) | set(diverged)
    # 'is None', not 'or': a compiled module's truth test calls len() on the model, which fails.
    forward = exp.model if exp.training_forward is None else exp.training_forward
    exp.model.train()
    sync_every, checked = (1 if device.type == 'cpu' else CUDA_SYNC_EVERY), start
    progress = _progress(range(start, num_steps), desc, dist)
    for step in progress:
        batch = permutations[:, step * batch_size:(step + 1) * batch_size]  # (members, b)
        # The whole global batch is transformed on every rank, so that every rank draws the same
        # augmentation numbers and the shared generator stays in step across ranks.
        images = dist.shard(exp.train_transform(train.images[batch.flatten()], generators[0]))
        labels = dist.shard(train.labels[batch.flatten()]).unflatten(0, (members, -1))
        loss_sums = _member_loss_sums(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        (loss_sums.sum() * (dist.world_size / batch.shape[1])).backward()
        if frozen:
            exp.freeze_members(sorted(frozen))
        optimizer.step()
        fault_point('step')
        losses[:, step] = dist.all_reduce_sum(loss_sums.detach()) / batch.shape[1]
        at_sync = (step + 1 - checked) >= sync_every or step + 1 == num_steps
        if at_sync:
            newly = _first_non_finite(losses[:, checked:step + 1], frozen, checked)
            diverged.update(newly)
            frozen |= set(newly)
            if len(frozen) == members:
                return EpochOutcome(losses[:, :step + 1], 'diverged', None, diverged)
            checked = step + 1
            _show(progress, losses[sorted(set(range(members)) - frozen)[0], step], optimizer)
        # One process reads its own flag every step; ranks agree on stopping at sync points.
        if stop.requested if dist.world_size == 1 else at_sync and dist.any(stop.requested):
            return EpochOutcome(losses[:, :step + 1], 'interrupted',
                                {'step': step + 1, 'losses': losses[:, :step + 1].cpu(),
                                 'permutation': permutations.cpu(), 'diverged': diverged}, diverged)
    return EpochOutcome(losses, 'done', None, diverged)


def _member_loss_sums(logits, labels) -> torch.Tensor:
    """Each member's summed cross-entropy, (members,). One member: the plain reduction='sum'
    (the single run's exact arithmetic); several: one kernel for all, then a sum per member."""
    if labels.shape[0] == 1:
        return F.cross_entropy(logits, labels[0], reduction='sum').unsqueeze(0)
    per_image = F.cross_entropy(logits, labels.flatten(), reduction='none')
    return per_image.unflatten(0, labels.shape).sum(1)


def _first_non_finite(window, frozen, offset) -> dict:
    """Members not yet frozen with a non-finite loss in `window` -> losses to keep (through the
    first non-finite one). One host sync when all is well."""
    finite = torch.isfinite(window)
    if bool(finite.all()):
        return {}
    return {k: offset + int((~finite[k]).nonzero()[0]) + 1 for k in range(window.shape[0])
            if k not in frozen and not bool(finite[k].all())}


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

def fit(exp: Experiment, started) -> int:
    """Train, evaluate, checkpoint and pickle one run. Returns the exit status."""
    started.stop.defer()  # from here a signal finishes the step and saves (see StopRequest)
    state = TrainingState(exp, started)
    try:
        return _fit(state, exp, started)
    except WriteFailed as exc:
        return _write_failed(state, exc)


def _fit(state: TrainingState, exp: Experiment, started) -> int:
    config, dist, stop = started.config, started.dist, started.stop
    position = _resume(state, started.resume_state) if started.resume_state is not None else None
    warning = decay_warning(config)
    if warning:
        dist.print(warning, file=sys.stderr)
    if started.resume_state is None:  # epoch 0: the model before training, every member's first best
        improved = _evaluate(state)
        saving.save_resume(state)
        saving.save_checkpoints(state, improved)
    elif position is None:
        # A kill may have come between the resume state and the checkpoints it was followed by:
        # write again the checkpoints of the members at their best now (same content).
        saving.save_checkpoints(state, [k for k in state.live()
                                        if state.members[k].progress.best_epoch == state.epoch])
    for epoch in range(state.epoch, config.epochs):
        if state.lr_overflows():
            return _diverge_on_lr(state, epoch + 1)
        epoch_start = time.perf_counter()
        frozen = [k for k in range(len(state.members)) if k not in state.live()]
        outcome = train_one_epoch(exp, state.optimizer, state.generators, config.batch_size, dist, stop,
                                  f'epoch {epoch + 1}/{config.epochs}', position, frozen)
        position = None
        if outcome.status == 'interrupted':
            saving.save_resume(state, outcome.position)
            return _interrupted(state, stop)
        _record_losses(state, outcome, epoch)
        if not state.live():
            return _finish(state)
        state.scheduler.step()
        dist.sync_buffers(exp.model)  # BatchNorm statistics of rank 0, so ranks evaluate alike
        state.epoch = epoch + 1
        improved = _evaluate(state, epoch_start)
        saving.save_resume(state)
        saving.save_checkpoints(state, improved)
        if dist.any(stop.requested) and epoch + 1 < config.epochs:
            return _interrupted(state, stop)
    return _finish(state)


def _resume(state: TrainingState, saved: dict) -> Optional[dict]:
    from .resume_state import restore  # only a resumed run restores one
    position = restore(state, saved)
    what = state.members[0].paths.results if len(state.members) == 1 else state.resume_path
    state.dist.print(f'resuming {what} at epoch {state.epoch + 1}'
                     + (f', step {position["step"]}' if position else ''))
    return position


def decay_warning(config) -> str | None:
    """A decay given at or after the last epoch never acts: worth a warning, not a refusal (a
    shortened run of a longer protocol, such as --epochs 1 of the 40-epoch one, is a normal thing
    to do). The default decay of a short run needs no warning."""
    late = [step for step in config.decay_steps if step >= config.epochs]
    if config.epochs == 0 or not late or 'decay_steps' not in config.given:
        return None  # a default decay beyond a short run: plainly a shortened protocol
    return (f'warning: --decay_steps {" ".join(map(str, late))} at or after --epochs {config.epochs}: '
            f'{"that decay never happens" if len(late) == 1 else "those decays never happen"}')


# ---------------------------------------------------------------------------------------------
# Recording, and the lines a run prints
# ---------------------------------------------------------------------------------------------

def _named(state, k: int, text: str) -> str:
    return text if len(state.members) == 1 else f'seed {state.members[k].config.seed}: {text}'


def _evaluate(state: TrainingState, epoch_start: Optional[float] = None) -> list[int]:
    """Evaluate, record and log the live members after `state.epoch` epochs; returns those at
    their best so far. An epoch's time, from epoch_start, includes its evaluations."""
    train_errors, test_errors = evaluate(state.exp, state.generators[0], state.dist)
    seconds = None if epoch_start is None else time.perf_counter() - epoch_start
    improved = state.record_evaluation(train_errors, test_errors, seconds)
    state.dist.print(_evaluation_line(state, train_errors, test_errors, seconds))
    return improved


def _evaluation_line(state, train_errors, test_errors, seconds) -> str:
    head = f'epoch {state.epoch}/{state.config.epochs}: '
    tail = '(before training)' if seconds is None else f'({seconds:.1f} s)'
    if seconds is not None:
        head += f'lr {state.members[state.live()[0]].progress.learning_rates[-1]:.3g}, '
    if len(state.members) == 1:
        progress = state.members[0].progress
        loss = '' if seconds is None else f'loss {state.epoch_loss(0, state.epoch):.4f}, '
        best = '' if seconds is None else f', best {100 * progress.best_error:.2f}%'
        return (f'{head}{loss}train error {100 * train_errors[0]:.2f}%, test error '
                f'{100 * test_errors[0]:.2f}%{best} {tail}')
    errors = ', '.join(f's{state.members[k].config.seed} {100 * test_errors[k]:.2f}%'
                       + ('' if seconds is None else f' (loss {state.epoch_loss(k, state.epoch):.4f})')
                       for k in state.live())
    return f'{head}test error {errors} {tail}'


def _record_losses(state, outcome, epoch: int):
    for k in state.record_losses(outcome.losses, outcome.diverged, epoch):
        state.dist.print(_named(state, k, f'training diverged (non-finite loss) in epoch {epoch + 1}; '
                                          f'curves so far are kept, the best checkpoint is from epoch '
                                          f'{state.members[k].progress.best_epoch}'))


# ---------------------------------------------------------------------------------------------
# How a run ends
# ---------------------------------------------------------------------------------------------

def _finish(state) -> int:
    """The results pickles; exit status 3 if any member diverged."""
    saving.write_results(state)
    return EXIT_OK if len(state.live()) == len(state.members) else EXIT_DIVERGED


def _interrupted(state, stop: StopRequest) -> int:
    state.dist.print(f'interrupted by {stop.name}: resume state saved to {state.resume_path}; '
                     f'continue with --resume')
    return stop.exit_status


def _diverge_on_lr(state, epoch: int) -> int:
    """Every live member diverges in `epoch` (1-based) before its first step: its rate is no
    longer a float32 number. Recorded as any divergence: curves so far, exit status 3."""
    for k in state.live():
        state.members[k].progress.diverged_epoch = epoch
    state.dist.print(f'training diverged: the learning rate reached {state.lr:.3g} by its decays, '
                     f'beyond float32, before epoch {epoch}; curves so far are kept')
    return _finish(state)


def _write_failed(state, exc: WriteFailed) -> int:
    """A file could not be written (a full disk, a folder turned read-only): one line that says
    which and how to continue; exit status 4."""
    saved = os.path.exists(state.resume_path)
    how = (f'the run so far is saved in {state.resume_path}: make room (or the folder writable '
           f'again) and continue with --resume' if saved else
           'nothing of the run was saved yet: make room (or the folder writable) and rerun the '
           'same command')
    print(f'error: cannot write {exc.path} ({describe_write_error(exc.error)}); {how}', file=sys.stderr)
    return EXIT_WRITE_FAILED
