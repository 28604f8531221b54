"""What a run writes as it goes: its resume state and metrics after every epoch, the best
checkpoint of each member, and at the end the results pickle in the release's schema.

Every file is written atomically (rank 0 only); a failed write raises WriteFailed.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time

import numpy as np
import torch

from . import protocol
from .checkpoints import save_checkpoint, save_torch
from .errors import WriteFailed
from .faults import fault_point
from .files import save_pickle, write_bytes

# The release's keys that come from the arguments (pickle key, argument), where the script has
# that argument (CIFAR's has no in_channels, dim_int or pretrain).
RELEASE_KEYS_FROM_ARGS = (('model', 'model'), ('num_layers', 'layers'), ('in_channels', 'in_channels'),
                          ('dim_int', 'dim_int'), ('pretrain_pass', 'pretrain'), ('batch_size', 'batch_size'))
# This project's additions that are arguments, recorded under their own names where present.
EXTRA_KEYS_FROM_ARGS = ('method', 'time_weights', 'integrator', 'pretrain_lr', 'subset', 'synthetic',
                        'amp', 'channels_last', 'epochs', 'lr_init', 'decay_steps', 'decay_rate', 'seed',
                        'train_error_images')


def save_resume(state, position=None):
    """The resume state, then the metrics: a metrics file never runs ahead of what is saved."""
    if state.dist.is_main:
        save_torch(state.state_dict(position), state.resume_path, fault='write-state')
        fault_point('resume')
        write_metrics(state)


def save_checkpoints(state, members: list[int]):
    """The best checkpoint of each member in `members` (those at their best now)."""
    exp = state.exp
    for k in members if state.dist.is_main else ():
        member = state.members[k]
        parts = (exp.member_parts(k) if exp.member_parts is not None
                 else {name: m.state_dict() for name, m in exp.parts.items()})
        save_checkpoint(member.paths.checkpoint, member.config, exp.dataset, member.progress.best_epoch,
                        member.progress.best_error, member.paths.results, exp.facts, parts)


def write_results(state):
    """Each member's results pickle (rank 0), then the resume state goes. A member whose pickle
    exists already keeps it: a batch killed between two of its members' pickles is continued
    with --resume, which writes the missing ones."""
    write_metrics(state)  # the last epoch's loss of a member that diverged in it
    for member in state.members:
        if state.dist.is_main:
            if os.path.lexists(member.paths.results):
                continue
            save_pickle(results_record(state, member), member.paths.results)
            fault_point('results')
        state.dist.print(f'results written to {member.paths.results}')
    if state.dist.is_main and os.path.exists(state.resume_path):
        try:
            os.remove(state.resume_path)
        except OSError as exc:
            raise WriteFailed(state.resume_path, exc) from None


def results_record(state, member) -> dict:
    """Every key of a member's results pickle: the release's schema, then this project's additions.

    The release's: model, num_layers, (MNIST) in_channels, dim_int, pretrain_pass, batch_size,
    train_loss (per iteration), train_classif and test_classif (index 0 before training),
    computation_time (s), num_parameters. Plain numpy arrays and Python values only, so the
    pickle loads without torch. A member's record is its seed's single run's, plus the facts
    (batched_with: how many members trained together, when there were several), plus 'protocol':
    everything its numbers depend on beyond the configuration (protocol.build).
    """
    config, progress, exp = member.config, member.progress, state.exp
    record = {key: getattr(config, name) for key, name in RELEASE_KEYS_FROM_ARGS if hasattr(config, name)}
    record.update(
        train_loss=np.asarray(progress.train_loss, dtype=np.float32),
        train_classif=np.asarray(progress.train_classif, dtype=np.float32),
        test_classif=np.asarray(progress.test_classif, dtype=np.float32),
        computation_time=float(state.seconds()), num_parameters=exp.facts['num_parameters'])
    record.update({key: getattr(config, key) for key in EXTRA_KEYS_FROM_ARGS if hasattr(config, key)})
    record.update({key: value for key, value in exp.facts.items() if key != 'num_parameters'})
    record.update(
        dataset=exp.dataset, diverged=progress.diverged_epoch is not None,
        diverged_epoch=progress.diverged_epoch, epoch_times=[float(t) for t in progress.epoch_times],
        best_test_classif=float(progress.best_error) if math.isfinite(progress.best_error) else None,
        best_epoch=progress.best_epoch, checkpoint=member.paths.checkpoint,
        device=str(exp.train_set.labels.device), world_size=state.dist.world_size,
        torch_version=str(torch.__version__), torchvision_version=_torchvision_version(),
        python_version=platform.python_version())
    record['protocol'] = member_protocol(state, member)
    return record


def member_protocol(state, member) -> dict:
    return protocol.build(member.config, state.exp.dataset, {
        **state.exp.facts, 'code_version': state.code_version, 'torch_version': str(torch.__version__),
        'world_size': state.dist.world_size})


def _torchvision_version():
    try:
        import torchvision
        return str(torchvision.__version__)
    except Exception:  # the pickle is still worth writing without it
        return None


def write_metrics(state):
    """Rewrite each member's metrics file, <save stem>.metrics.jsonl beside its pickle, from its
    progress: a header line (the run and its protocol, no 'epoch'), then one line per evaluation
    (epoch, iterations so far, learning rate, mean training loss, errors, seconds, time).
    Written atomically at every epoch, so that it can be read while the run goes; rebuilt from
    the resume state on --resume, so that it never repeats or misses an epoch."""
    for k, member in enumerate(state.members) if state.dist.is_main else ():
        progress, config = member.progress, member.config
        header = {'run': os.path.basename(member.paths.results), 'dataset': state.exp.dataset,
                  **{key: getattr(config, name) for key, name in RELEASE_KEYS_FROM_ARGS if hasattr(config, name)},
                  'seed': config.seed, 'protocol': member_protocol(state, member)}
        lines = [header] + [_epoch_line(state, k, epoch) for epoch in range(len(progress.test_classif))]
        text = ''.join(json.dumps(line, allow_nan=True) + '\n' for line in lines)
        write_bytes(text.encode(), member.paths.metrics, 'write-metrics')


def _epoch_line(state, k: int, epoch: int) -> dict:
    progress, steps = state.members[k].progress, state.steps_per_epoch()
    trained = 0 < epoch <= len(progress.learning_rates)
    evaluated = epoch < len(progress.evaluated_at) and progress.evaluated_at[epoch] is not None
    return {
        'epoch': epoch, 'iterations': min(epoch * steps, len(progress.train_loss)),
        'lr': progress.learning_rates[epoch - 1] if trained else None,
        'train_loss': state.epoch_loss(k, epoch) if epoch else None,
        'train_error': progress.train_classif[epoch], 'test_error': progress.test_classif[epoch],
        'epoch_seconds': progress.epoch_times[epoch - 1] if 0 < epoch <= len(progress.epoch_times) else None,
        'time': (time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(progress.evaluated_at[epoch]))
                 if evaluated else None)}
