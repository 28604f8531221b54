"""A run's training state: optimiser, learning-rate schedule, data order and what each member has
measured, and how it is saved to and restored from a resume state.

A run may train several seeds at once as one model (MNIST's --seeds): its *members*. Each member
has its own data-order generator and progress, exactly those of the single run of its seed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .random_state import rng_state

RESUME_FORMAT = 2  # the layout of the resume state (resume_state.py reads it back)


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
    """One seed of a run: the values and files the single run of that seed has, its progress."""
    config: object
    paths: object  # its run_files.RunPaths
    progress: Progress = field(default_factory=Progress)


class TrainingState:
    """Plain SGD with a multi-step learning-rate schedule, as the release; each member's data
    order (a generator seeded with its seed); the epochs done and the time spent."""

    def __init__(self, exp, started):
        self.exp, self.config, self.dist = exp, started.config, started.dist
        self.resume_path = started.resume_path
        self.members = [Member(config, paths) for config, paths in started.members]
        self.optimizer = torch.optim.SGD(exp.parameters, lr=self.config.lr_init)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=self.config.decay_steps, gamma=self.config.decay_rate)
        self.generators = [torch.Generator(device=exp.train_set.labels.device).manual_seed(m.config.seed)
                           for m in self.members]
        self.epoch, self.elapsed, self.started = 0, 0.0, time.perf_counter()  # epochs done
        self.code_version = started.code_version

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.started

    def live(self) -> list[int]:
        """The members still training (not diverged)."""
        return [k for k, m in enumerate(self.members) if m.progress.diverged_epoch is None]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]['lr']

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.exp.train_set) / self.config.batch_size)

    def epoch_loss(self, k: int, epoch: int) -> float:
        """Member k's mean training loss over epoch `epoch` (1-based; the steps it ran)."""
        steps = self.steps_per_epoch()
        losses = self.members[k].progress.train_loss[(epoch - 1) * steps:epoch * steps]
        return float(np.mean(losses)) if losses else float('nan')

    def record_evaluation(self, train_errors, test_errors, seconds) -> list[int]:
        """Record each live member's errors after `self.epoch` epochs; returns those at their best
        so far (strictly lower test error; epoch 0 is the first best)."""
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
        return improved

    def record_losses(self, losses: torch.Tensor, diverged: dict, epoch: int) -> list[int]:
        """Append the epoch's losses and learning rate of each live member; mark those that
        diverged in it (diverged: member -> losses kept) and return them."""
        newly = []
        for k in self.live():
            progress = self.members[k].progress
            progress.learning_rates.append(self.lr)
            keep = diverged.get(k)
            progress.train_loss.extend(losses[k, :keep].tolist())
            if keep is not None:
                progress.diverged_epoch = epoch + 1
                newly.append(k)
        return newly

    def lr_overflows(self) -> bool:
        """Whether the learning rate, after its decays, is beyond float32: the next update would
        overflow the weights (torch refuses to even apply it)."""
        from .gate import FLOAT32_MAX
        return not (math.isfinite(self.lr) and self.lr <= FLOAT32_MAX)

    def state_dict(self, position: Optional[dict] = None) -> dict:
        """What --resume needs: everything above, the network's parts, and the random state."""
        return {
            'format': RESUME_FORMAT, 'args': self.config.as_dict(), 'facts': self.exp.facts,
            'parts': {name: m.state_dict() for name, m in self.exp.parts.items()},
            'optimizer': self.optimizer.state_dict(), 'scheduler': self.scheduler.state_dict(),
            'data_generators': [g.get_state() for g in self.generators], 'rng': rng_state(),
            'progress': [vars(m.progress) for m in self.members], 'epoch': self.epoch,
            'elapsed': self.seconds(), 'position': position, 'code_version': self.code_version,
        }
