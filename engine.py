"""The training engine shared by MNIST_experiments.py and CIFAR_experiments.py.

`fit` runs a whole experiment the way pytorch-cifar's loop reads: evaluate before training, then
for every epoch train, evaluate, save the resume state and the best checkpoint, and log; at the
end write the results pickle in the release's schema (`results_record`). On SIGINT/SIGTERM it
finishes the current step, saves the resume state and exits 130/143; a non-finite loss ends the
run with its curves so far (exit 3).

A run may train several seeds at once as one model (MNIST's --seeds): its *members*. Each
member has its own data order, curves, best checkpoint and pickle, exactly those of the single
run of its seed; a member whose loss becomes non-finite stops updating and the others go on.
A single run is the case of one member.

The engine knows no dataset or residual type by name: a script describes its run in an
`Experiment` (network, data, transforms, evaluation chunk, how the training error is sampled).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import distributed
import protocol
from cli import (EXIT_DIVERGED, EXIT_OK, EXIT_WRITE_FAILED, FLOAT32_MAX, UsageError, WriteFailed,
                 check_stored_args, decay_warning, describe_write_error, pick_device)
from common import METRICS_SUFFIX
from data import DeviceDataset
from runstate import (CHECKPOINT_FORMAT, RESUME_FORMAT, RunClaim, RunPaths, StopRequest, fault_point,
                      load_torch, plain_args, prepare_run, rng_state, save_results, save_text, save_torch,
                      set_rng_state)

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
# Evaluation and one epoch of training
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def count_errors(model, images_u8, labels, transform, chunk, members: int = 1) -> torch.Tensor:
    """Misclassified images per member, a (members,) device tensor (no host sync). Every member
    sees the same images."""
    wrong = torch.zeros(members, dtype=torch.long, device=labels.device)
    for start in range(0, labels.shape[0], chunk):
        images = transform(images_u8[start:start + chunk])
        if members > 1:
            images = images.repeat(members, *([1] * (images.dim() - 1)))
        logits = model(images).unflatten(0, (members, -1))
        wrong += (logits.argmax(-1) != labels[start:start + chunk]).sum(-1)
    return wrong


def evaluate(exp: Experiment, generator, dist) -> tuple[list, list]:
    """Each member's (train error, test error) in [0, 1], in eval mode. One host sync for all."""
    exp.model.eval()
    images, labels, transform = exp.train_eval_sample(generator)
    test = exp.test_set
    wrong_train = count_errors(exp.model, dist.shard(images), dist.shard(labels), transform,
                               exp.eval_chunk, exp.members)
    fault_point('evaluation')
    wrong_test = count_errors(exp.model, dist.shard(test.images), dist.shard(test.labels),
                              exp.eval_transform, exp.eval_chunk, exp.members)
    wrong_train, wrong_test = dist.all_reduce_sum(torch.stack([wrong_train, wrong_test])).tolist()
    return [w / labels.shape[0] for w in wrong_train], [w / len(test) for w in wrong_test]


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

@dataclass
class Progress:
    """What a member has measured so far (saved in the resume state). Index 0 of the error
    curves is before training."""
    train_loss: list = field(default_factory=list)
    train_classif: list = field(default_factory=list)
    test_classif: list = field(default_factory=list)
    epoch_times: list = field(default_factory=list)
    learning_rates: list = field(default_factory=list)  # the rate of each epoch trained
    evaluated_at: list = field(default_factory=list)    # wall-clock time (s) of each evaluation
    best_error: float = math.inf
    best_epoch: Optional[int] = None
    diverged_epoch: Optional[int] = None


@dataclass
class Member:
    """One seed of a run: the arguments and files the single run of that seed has, its progress."""
    args: object
    paths: RunPaths
    progress: Progress = field(default_factory=Progress)


class Run:
    """The moving parts of one run: optimiser, learning-rate schedule, each member's data-order
    generator and progress, and the files it writes."""

    def __init__(self, exp: Experiment, started: 'Started'):
        self.exp, self.args, self.dist = exp, started.args, started.dist
        self.resume_path = started.resume_path
        self.members = [Member(args, paths) for args, paths in started.members]
        self.optimizer = torch.optim.SGD(exp.parameters, lr=self.args.lr_init)  # plain SGD, as the release
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(self.args.decay_steps), gamma=self.args.decay_rate)
        self.generators = [torch.Generator(device=exp.train_set.labels.device).manual_seed(m.args.seed)
                           for m in self.members]
        self.epoch, self.elapsed, self.started = 0, 0.0, time.perf_counter()  # epochs done
        self.code_version = started.code_version

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.started

    def live(self) -> list[int]:
        return [k for k, m in enumerate(self.members) if m.progress.diverged_epoch is None]

    def named(self, k: int, text: str) -> str:
        return text if len(self.members) == 1 else f'seed {self.members[k].args.seed}: {text}'

    def restore(self, state: dict) -> Optional[dict]:
        """Continue from a resume state; returns where an interrupted epoch stopped, if it did.

        Its shape was checked when it was loaded (runstate); what does not fit the network its
        arguments build (a tensor of another shape, an edited argument) is refused here, in one
        line, before anything is written."""
        try:
            for name, module in self.exp.parts.items():
                module.load_state_dict(state['parts'][name])
            self.optimizer.load_state_dict(state['optimizer'])
            self.scheduler.load_state_dict(state['scheduler'])
            for generator, saved in zip(self.generators, state['data_generators']):
                generator.set_state(saved.to(generator.get_state().device))
            set_rng_state(state['rng'])
            position = state['position']
            if position is not None:
                _check_position(position, len(self.members), len(self.exp.train_set))
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            raise UsageError(f'resume state {self.resume_path} is not a resume state of this project '
                             f'(it does not fit the network its arguments build: '
                             f'{_first_line(exc)})') from None
        for member, saved in zip(self.members, state['progress']):
            member.progress = Progress(**saved)
            # A state saved before learning rates and evaluation times were recorded: unknown
            # (None) for the epochs it holds, so that later entries keep their epoch's index.
            if 'learning_rates' not in saved:
                member.progress.learning_rates = [None] * state['epoch']
            if 'evaluated_at' not in saved:
                member.progress.evaluated_at = [None] * len(member.progress.test_classif)
        self.epoch, self.elapsed = state['epoch'], state['elapsed']
        started_with = str(state.get('code_version', 'unknown'))
        if not started_with.endswith(self.code_version):  # a run continued under other code says so
            self.code_version = f'{started_with}, resumed under {self.code_version}'
        else:
            self.code_version = started_with
        what = self.members[0].paths.results if len(self.members) == 1 else self.resume_path
        self.dist.print(f'resuming {what} at epoch {self.epoch + 1}'
                        + (f', step {position["step"]}' if position else ''))
        return position

    def save_resume(self, position: Optional[dict] = None):
        if self.dist.is_main:
            save_torch({
                'format': RESUME_FORMAT, 'args': plain_args(self.args), 'facts': self.exp.facts,
                'parts': {name: m.state_dict() for name, m in self.exp.parts.items()},
                'optimizer': self.optimizer.state_dict(), 'scheduler': self.scheduler.state_dict(),
                'data_generators': [g.get_state() for g in self.generators], 'rng': rng_state(),
                'progress': [vars(m.progress) for m in self.members], 'epoch': self.epoch,
                'elapsed': self.seconds(), 'position': position, 'code_version': self.code_version,
            }, self.resume_path, fault='write-state')
            fault_point('resume')
            self.write_metrics()  # after the state: a metrics file never runs ahead of what is saved

    def save_checkpoints(self, members: list[int]):
        for k in members if self.dist.is_main else ():
            member, exp = self.members[k], self.exp
            parts = (exp.member_parts(k) if exp.member_parts is not None
                     else {name: m.state_dict() for name, m in exp.parts.items()})
            save_torch({
                'format': CHECKPOINT_FORMAT, 'dataset': exp.dataset, 'args': plain_args(member.args),
                'epoch': member.progress.best_epoch, 'test_error': member.progress.best_error,
                'results_file': member.paths.results, 'facts': exp.facts, **parts,
            }, member.paths.checkpoint)
            fault_point('checkpoint')

    def evaluate(self, epoch_start: Optional[float] = None) -> list[int]:
        """Evaluate, record and log the live members after `self.epoch` epochs; returns those at
        their best so far (strictly lower test error; epoch 0 is the first best). An epoch's time,
        from epoch_start, includes its evaluations."""
        train_errors, test_errors = evaluate(self.exp, self.generators[0], self.dist)
        seconds = None if epoch_start is None else time.perf_counter() - epoch_start
        improved = []
        for k in self.live():
            progress = self.members[k].progress
            progress.train_classif.append(train_errors[k])
            progress.test_classif.append(test_errors[k])
            if test_errors[k] < progress.best_error:
                progress.best_error, progress.best_epoch = test_errors[k], self.epoch
                improved.append(k)
            if seconds is not None:
                progress.epoch_times.append(seconds)
            progress.evaluated_at.append(time.time())
        self.dist.print(self._evaluation_line(train_errors, test_errors, seconds))
        return improved

    def _evaluation_line(self, train_errors, test_errors, seconds) -> str:
        head = f'epoch {self.epoch}/{self.args.epochs}: '
        tail = '(before training)' if seconds is None else f'({seconds:.1f} s)'
        if seconds is not None:
            head += f'lr {self.members[self.live()[0]].progress.learning_rates[-1]:.3g}, '
        if len(self.members) == 1:
            progress = self.members[0].progress
            loss = '' if seconds is None else f'loss {self.epoch_loss(0, self.epoch):.4f}, '
            best = '' if seconds is None else f', best {100 * progress.best_error:.2f}%'
            return (f'{head}{loss}train error {100 * train_errors[0]:.2f}%, test error '
                    f'{100 * test_errors[0]:.2f}%{best} {tail}')
        errors = ', '.join(f's{self.members[k].args.seed} {100 * test_errors[k]:.2f}%'
                           + ('' if seconds is None else f' (loss {self.epoch_loss(k, self.epoch):.4f})')
                           for k in self.live())
        return f'{head}test error {errors} {tail}'

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.exp.train_set) / self.args.batch_size)

    def epoch_loss(self, k: int, epoch: int) -> float:
        """Member k's mean training loss over epoch `epoch` (1-based; the steps it ran)."""
        steps = self.steps_per_epoch()
        losses = self.members[k].progress.train_loss[(epoch - 1) * steps:epoch * steps]
        return float(np.mean(losses)) if losses else float('nan')

    def write_metrics(self):
        """Rewrite each member's metrics file, <save stem>.metrics.jsonl beside its pickle, from its
        progress: a header line (the run and its protocol), then one line per evaluation (epoch,
        learning rate, mean training loss, errors, seconds, wall-clock time). Written atomically
        at every epoch, so that it can be read while the run goes; rebuilt from the resume state
        on --resume, so that it never repeats or misses an epoch."""
        for k, member in enumerate(self.members) if self.dist.is_main else ():
            progress, args = member.progress, member.args
            header = {'run': os.path.basename(member.paths.results), 'dataset': self.exp.dataset,
                      **{key: getattr(args, name) for key, name in RELEASE_KEYS_FROM_ARGS if hasattr(args, name)},
                      'seed': args.seed, 'protocol': member_protocol(self, member)}
            lines = [header]
            steps = self.steps_per_epoch()
            for epoch, (train, test) in enumerate(zip(progress.train_classif, progress.test_classif)):
                lines.append({
                    'epoch': epoch, 'iterations': min(epoch * steps, len(progress.train_loss)),
                    'lr': progress.learning_rates[epoch - 1] if 0 < epoch <= len(progress.learning_rates) else None,
                    'train_loss': self.epoch_loss(k, epoch) if epoch else None,
                    'train_error': train, 'test_error': test,
                    'epoch_seconds': progress.epoch_times[epoch - 1] if 0 < epoch <= len(progress.epoch_times) else None,
                    'time': (time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(progress.evaluated_at[epoch]))
                             if epoch < len(progress.evaluated_at) and progress.evaluated_at[epoch] is not None
                             else None)})
            text = ''.join(json.dumps(line, allow_nan=True) + '\n' for line in lines)
            save_text(text, metrics_path(member.paths.results))

    def record_losses(self, outcome: EpochOutcome, epoch: int):
        """Append the epoch's losses and learning rate of each live member; mark those that
        diverged in it."""
        for k in self.live():
            self.members[k].progress.learning_rates.append(self.optimizer.param_groups[0]['lr'])
            keep = outcome.diverged.get(k)
            self.members[k].progress.train_loss.extend(outcome.losses[k, :keep].tolist())
            if keep is not None:
                self.members[k].progress.diverged_epoch = epoch + 1
                self.dist.print(self.named(k, f'training diverged (non-finite loss) in epoch '
                                              f'{epoch + 1}; curves so far are kept, the best '
                                              f'checkpoint is from epoch '
                                              f'{self.members[k].progress.best_epoch}'))

    def interrupted(self, stop: StopRequest) -> int:
        self.dist.print(f'interrupted by {stop.name}: resume state saved to {self.resume_path}; '
                        f'continue with --resume')
        return stop.exit_status

    def finish(self) -> int:
        """Write each member's results pickle (rank 0), remove the resume state; the exit status
        (3 if any member diverged).

        A member whose pickle exists already keeps it: a batch killed between two of its
        members' pickles is continued with --resume, which writes the missing ones."""
        self.write_metrics()  # the last epoch's loss of a member that diverged in it
        for member in self.members:
            if self.dist.is_main:
                if os.path.lexists(member.paths.results):
                    continue
                save_results(results_record(self, member), member.paths.results)
                fault_point('results')
            self.dist.print(f'results written to {member.paths.results}')
        if self.dist.is_main and os.path.exists(self.resume_path):
            try:
                os.remove(self.resume_path)
            except OSError as exc:
                raise WriteFailed(self.resume_path, exc) from None
        return EXIT_OK if len(self.live()) == len(self.members) else EXIT_DIVERGED

    def write_failed(self, exc: WriteFailed) -> int:
        """A file could not be written (a full disk, a folder turned read-only): one line that
        says which and how to continue; exit status 4."""
        saved = os.path.exists(self.resume_path)
        how = (f'the run so far is saved in {self.resume_path}: make room (or the folder '
               f'writable again) and continue with --resume' if saved else
               'nothing of the run was saved yet: make room (or the folder writable) and rerun '
               'the same command')
        print(f'error: cannot write {exc.path} ({describe_write_error(exc.error)}); {how}',
              file=sys.stderr)
        return EXIT_WRITE_FAILED

    def lr_overflows(self) -> bool:
        """Whether the learning rate, after its decays, is beyond float32: the next update would
        overflow the weights (torch refuses to even apply it)."""
        lr = self.optimizer.param_groups[0]['lr']
        return not (math.isfinite(lr) and lr <= FLOAT32_MAX)

    def diverge_on_lr(self, epoch: int):
        """Every live member diverges in `epoch` (1-based) before its first step: its rate is no
        longer a float32 number. Recorded as any divergence: curves so far, exit status 3."""
        lr = self.optimizer.param_groups[0]['lr']
        for k in self.live():
            self.members[k].progress.diverged_epoch = epoch
        self.dist.print(f'training diverged: the learning rate reached {lr:.3g} by its decays, beyond '
                        f'float32, before epoch {epoch}; curves so far are kept')


def fit(exp: Experiment, started: 'Started') -> int:
    """Train, evaluate, checkpoint and pickle one run. Returns the exit status."""
    started.stop.defer()  # from here a signal finishes the step and saves (see StopRequest)
    run = Run(exp, started)
    try:
        return _fit(run, exp, started)
    except WriteFailed as exc:
        return run.write_failed(exc)


def _fit(run: Run, exp: Experiment, started: 'Started') -> int:
    args, resume_state, dist, stop = started.args, started.resume_state, started.dist, started.stop
    position = run.restore(resume_state) if resume_state is not None else None
    if decay_warning(args):
        dist.print(decay_warning(args), file=sys.stderr)
    # SIGINT/SIGTERM are recorded by `stop` from here on: a step finishes, the state is saved.
    if resume_state is None:
        improved = run.evaluate()  # epoch 0: the model before training, every member's first best
        run.save_resume()
        run.save_checkpoints(improved)
    elif position is None:
        # A kill may have come between the resume state and the checkpoints it was followed by:
        # write again the checkpoints of the members at their best now (same content).
        run.save_checkpoints([k for k in run.live() if run.members[k].progress.best_epoch == run.epoch])
    for epoch in range(run.epoch, args.epochs):
        if run.lr_overflows():
            run.diverge_on_lr(epoch + 1)
            return run.finish()
        epoch_start = time.perf_counter()
        diverged = [k for k in range(len(run.members)) if k not in run.live()]
        outcome = train_one_epoch(exp, run.optimizer, run.generators, args.batch_size, dist, stop,
                                  f'epoch {epoch + 1}/{args.epochs}', position, diverged)
        position = None
        if outcome.status == 'interrupted':
            run.save_resume(outcome.position)
            return run.interrupted(stop)
        run.record_losses(outcome, epoch)
        if not run.live():
            return run.finish()
        run.scheduler.step()
        dist.sync_buffers(exp.model)  # BatchNorm statistics of rank 0, so ranks evaluate alike
        run.epoch = epoch + 1
        improved = run.evaluate(epoch_start)
        run.save_resume()
        run.save_checkpoints(improved)
        if dist.any(stop.requested) and epoch + 1 < args.epochs:
            return run.interrupted(stop)
    return run.finish()


def _check_position(position: dict, members: int, train_size: int):
    """Where an interrupted epoch stopped: a step within the epoch, and each member's data order
    a permutation of the training set (a crafted one would index out of it)."""
    permutation, step, losses = position['permutation'], position['step'], position['losses']
    if (not isinstance(step, int) or not isinstance(permutation, torch.Tensor)
            or tuple(permutation.shape) != (members, train_size) or not isinstance(losses, torch.Tensor)
            or tuple(losses.shape) != (members, step) or not isinstance(position['diverged'], dict)):
        raise ValueError('its position in the interrupted epoch is malformed')
    if not 0 <= step <= train_size or not torch.equal(
            torch.sort(permutation, dim=1).values, torch.arange(train_size).expand(members, -1)):
        raise ValueError('its data order is not a permutation of the training set')


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:160] if text else type(exc).__name__)


# ---------------------------------------------------------------------------------------------
# The results pickle
# ---------------------------------------------------------------------------------------------

# The release's keys that come from the arguments (pickle key, argument), where the script has
# that argument (CIFAR's has no in_channels, dim_int or pretrain).
RELEASE_KEYS_FROM_ARGS = (('model', 'model'), ('num_layers', 'layers'), ('in_channels', 'in_channels'),
                          ('dim_int', 'dim_int'), ('pretrain_pass', 'pretrain'), ('batch_size', 'batch_size'))
# This project's additions that are arguments, recorded under their own names where present.
EXTRA_KEYS_FROM_ARGS = ('method', 'time_weights', 'integrator', 'pretrain_lr', 'subset', 'synthetic',
                        'amp', 'channels_last', 'epochs', 'lr_init', 'decay_steps', 'decay_rate', 'seed',
                        'train_error_images')


def results_record(run: Run, member: Member) -> dict:
    """Every key of a member's results pickle: the release's schema, then this project's additions.

    The release's: model, num_layers, (MNIST) in_channels, dim_int, pretrain_pass, batch_size,
    train_loss (per iteration), train_classif and test_classif (index 0 before training),
    computation_time (s), num_parameters. Plain numpy arrays and Python values only, so the
    pickle loads without torch. A member's record is its seed's single run's, plus the facts
    (batched_with: how many members trained together, when there were several), plus 'protocol':
    everything its numbers depend on beyond the configuration (protocol.build).
    """
    args, progress, exp = member.args, member.progress, run.exp
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
        dataset=exp.dataset, diverged=progress.diverged_epoch is not None,
        diverged_epoch=progress.diverged_epoch, epoch_times=[float(t) for t in progress.epoch_times],
        best_test_classif=float(progress.best_error) if math.isfinite(progress.best_error) else None,
        best_epoch=progress.best_epoch, checkpoint=member.paths.checkpoint,
        device=str(exp.train_set.labels.device), world_size=run.dist.world_size,
        torch_version=str(torch.__version__), torchvision_version=_torchvision_version(),
        python_version=platform.python_version())
    record['protocol'] = member_protocol(run, member)
    return record


def member_protocol(run: Run, member: Member) -> dict:
    return protocol.build(member.args, run.exp.dataset, {
        **run.exp.facts, 'code_version': run.code_version, 'torch_version': str(torch.__version__)})


def metrics_path(results_path: str) -> str:
    """The per-epoch metrics file beside a results pickle: <stem>.metrics.jsonl."""
    return os.path.splitext(results_path)[0] + METRICS_SUFFIX


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
    """A run that has claimed its files: its (possibly stored) arguments, its members (each a
    single run's arguments and paths), its resume state, device, process group, and the record of
    SIGINT/SIGTERM, active from the start."""
    args: object
    members: list
    resume_path: str
    resume_state: Optional[dict]
    device: torch.device
    dist: object
    stop: StopRequest
    code_version: str = 'unknown'


@contextlib.contextmanager
def start_run(args, folder_prefix: str, check_stored=None):
    """Claim the run's files, apply the existing-file rules, join the process group, draw the seed.

    The claim (locks and folders) comes before any work, so that a second process with the same
    --save, or a folder that cannot be written, is refused at once. If the run then fails (a
    refusal, missing data, any exception), what the claim created is removed again.
    check_stored(namespace): the script's checks of the arguments a resume state holds.
    """
    claim = RunClaim()
    failed = True
    with StopRequest() as stop:
        try:
            args, members, resume_path, resume_state = prepare_run(args, folder_prefix, claim,
                                                                   check_stored)
            dist = distributed.setup(args, pick_device(args))
            try:
                if args.seed is None and len(members) == 1 and not getattr(args, 'seeds', None):
                    # drawn once, on rank 0, and recorded in the pickle
                    args.seed = dist.broadcast_int(random.SystemRandom().randrange(2 ** 31))
                device = dist.device if dist.world_size > 1 else pick_device(args)
                yield Started(args, members, resume_path, resume_state, device, dist, stop,
                              protocol.code_version())
                failed = False
            finally:
                dist.close(together=not failed)
        finally:
            stop.defer()  # a signal now must not cut the release short
            claim.release(failed)


def load_datasets(args, dist, load_real: Callable, image_shape: tuple, full_sizes: tuple):
    """Train and test sets on the CPU: synthetic or real (rank 0 downloads first), cut to --subset."""
    fault_point('data')
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


def load_checkpoint(path, dataset: str, parser, required: tuple, parts: tuple, check_args=None):
    """A best-model checkpoint of this project for `dataset`, checked before use: its format, its
    arguments (those in `required` present, each of a value the command line accepts, then
    check_args(namespace), the script's checks), and its parts (`parts`, state dicts).
    Returns (checkpoint, arguments as a Namespace), or raises a one-line UsageError."""
    checkpoint = load_torch(path, 'checkpoint')
    if not isinstance(checkpoint, dict) or checkpoint.get('dataset') != dataset:
        raise UsageError(f'{path} is not a checkpoint of this project for {dataset}')

    def refuse(why):
        raise UsageError(f'{path} is not a checkpoint of this project ({why})')

    if checkpoint.get('format') != CHECKPOINT_FORMAT:
        refuse(f'format {checkpoint.get("format")!r}; this version writes {CHECKPOINT_FORMAT}')
    try:
        stored = check_stored_args(parser, checkpoint.get('args'), required)
        if check_args is not None:
            check_args(stored)
    except UsageError as exc:
        refuse(str(exc))
    for name in parts:
        if not isinstance(checkpoint.get(name), dict):
            refuse(f'no {name}')
    if not isinstance(checkpoint.get('epoch'), int) or isinstance(checkpoint.get('epoch'), bool):
        refuse(f'its epoch is {checkpoint.get("epoch")!r}')
    if not isinstance(checkpoint.get('test_error'), float):
        refuse(f'its test error is {checkpoint.get("test_error")!r}')
    return checkpoint, stored


def _recorded_images(stored: dict, full: int) -> str:
    """What the checkpoint's own run measured its test error on: --subset cuts the test set too."""
    if stored.get('synthetic'):
        return f'{stored.get("subset") or "the synthetic"} synthetic test images'
    subset = stored.get('subset')
    return f'its first {min(subset, full):,} test images (--subset)' if subset else f'{full:,} test images'


def evaluate_checkpoint(model, checkpoint: dict, parts: dict, test_set, transform, chunk,
                        path: str) -> int:
    """--evaluate: load the checkpoint's parts, print the test error, write nothing."""
    try:
        for name, module in parts.items():
            module.load_state_dict(checkpoint[name])
    except (RuntimeError, TypeError, KeyError, ValueError, AttributeError) as exc:
        raise UsageError(f'{path} is not a checkpoint of this project (it does not fit the network '
                         f'its arguments build: {_first_line(exc)})') from None
    model.eval()
    error = count_errors(model, test_set.images, test_set.labels, transform, chunk).item() / len(test_set)
    stored = checkpoint.get('args', {})
    print(f'test error {100 * error:.4f}% on {len(test_set):,} test images (checkpoint of epoch '
          f'{checkpoint["epoch"]}, whose run recorded {100 * checkpoint["test_error"]:.4f}% on '
          f'{_recorded_images(stored, len(test_set))})')
    return EXIT_OK
