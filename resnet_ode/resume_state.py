"""The resume state read back: checked, its run's values taken through the gate, and the
training state restored from it (--resume), or recognised as a finished run's leftover.

Only a resumed run, or one that finds a finished run's files, imports this module.
"""
from __future__ import annotations

import math
import pickle
from typing import Optional

import numpy as np
import torch

from . import gate
from .checkpoints import load_torch
from .errors import UsageError
from .evaluation import first_line
from .random_state import set_rng_state
from .safe_pickle import UnsafePickle, load_results
from .training_state import RESUME_FORMAT, Progress

# What a resume state of this project holds, and the type of each entry.
RESUME_STATE_ENTRIES = {'format': int, 'args': dict, 'facts': dict, 'parts': dict, 'optimizer': dict,
                        'scheduler': dict, 'data_generators': list, 'rng': dict, 'progress': list,
                        'epoch': int, 'elapsed': (int, float), 'position': (dict, type(None))}


def load(resume: str, config):
    """The resume state of this run (its --save and --seeds), checked, and the Config it
    continues: the stored values, with only where it runs taken from the command line, through
    the gate. A flag given now that contradicts the stored run is refused."""
    state = load_torch(resume, 'resume state')
    _check_resume_state(state, resume, config)
    _check_resume_flags(config, state['args'])
    values = {**state['args'], **{key: getattr(config, key) for key in gate.RESUME_MAY_CHANGE}}
    try:
        stored = gate.validate(config.rules, values, gate.RESUME_STATE)
    except UsageError as exc:
        _refuse(resume, exc)
    return state, stored


def _refuse(resume: str, why):
    """Refuse the resume state at `resume` in one line that says what is wrong with it."""
    raise UsageError(f'resume state {resume} is not a resume state of this project ({why})') from None


def _check_resume_state(state, resume: str, config):
    """The resume state has the shape this project writes and is the state of this run (its
    --save and --seeds): anything else is refused in one line, before it is used."""
    if not isinstance(state, dict):
        _refuse(resume, f'a {type(state).__name__}, not a dict')
    if state.get('format') != RESUME_FORMAT:
        _refuse(resume, f'format {state.get("format")!r}; this version writes {RESUME_FORMAT}')
    for key, kind in RESUME_STATE_ENTRIES.items():
        if key not in state:
            _refuse(resume, f'no {key!r}')
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            _refuse(resume, f'{key!r} is a {type(state[key]).__name__}')
    stored, seeds = state['args'], getattr(config, 'seeds', None)
    if stored.get('save') != config.save or (stored.get('seeds') or None) != (seeds or None):
        _refuse(resume, f'it is the state of --save {stored.get("save")!r} --seeds {stored.get("seeds")!r}')
    members = len(seeds) if seeds else 1
    if len(state['progress']) != members or len(state['data_generators']) != members:
        _refuse(resume, f'{len(state["progress"])} member(s) recorded for {members}')
    for progress in state['progress']:
        if not isinstance(progress, dict) or set(progress) != set(vars(Progress())):  # as state_dict saves it
            _refuse(resume, 'its progress records are not this project\'s')
    epochs = stored.get('epochs')
    if not isinstance(epochs, int) or not 0 <= state['epoch'] <= epochs:
        _refuse(resume, f'epoch {state["epoch"]} of {epochs!r}')
    if not math.isfinite(state['elapsed']):
        _refuse(resume, 'its elapsed time is not finite')


def _check_resume_flags(config, stored: dict):
    """--resume continues the stored run as it was started: a flag given now that says otherwise
    (say --layers 5 for a 2-layer run) is refused, not silently ignored."""
    differing = sorted(dest for dest in config.given - set(gate.RESUME_MAY_CHANGE)
                       if dest in stored and stored[dest] != getattr(config, dest))
    if differing:
        listed = ', '.join(f'--{dest} {_shown(getattr(config, dest))} (the run has {_shown(stored[dest])})'
                           for dest in differing)
        raise UsageError(f'--resume continues the run as it was started, and these flags differ '
                         f'from it: {listed}; drop them, or start a new run with another --save')


def _shown(value) -> str:
    return ' '.join(map(str, value)) if isinstance(value, list) else str(value)


def is_leftover(resume: str, members) -> bool:
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


def restore(training, state: dict) -> Optional[dict]:
    """Continue from a resume state; returns where an interrupted epoch stopped, if it did.

    Its shape was checked when it was loaded (load, above); what does not fit the network its
    arguments build (a tensor of another shape, an edited argument) is refused here, in one
    line, before anything is written."""
    try:
        for name, module in training.exp.parts.items():
            module.load_state_dict(state['parts'][name])
        training.optimizer.load_state_dict(state['optimizer'])
        training.scheduler.load_state_dict(state['scheduler'])
        for generator, saved in zip(training.generators, state['data_generators']):
            generator.set_state(saved.to(generator.get_state().device))
        set_rng_state(state['rng'])
        position = state['position']
        if position is not None:
            _check_position(position, len(training.members), len(training.exp.train_set))
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        _refuse(training.resume_path, f'it does not fit the network its arguments build: {first_line(exc)}')
    for member, saved in zip(training.members, state['progress']):
        member.progress = Progress(**saved)
    training.epoch, training.elapsed = state['epoch'], state['elapsed']
    started_with = str(state.get('code_version', 'unknown'))
    # a run continued under other code says so
    training.code_version = (started_with if started_with.endswith(training.code_version)
                             else f'{started_with}, resumed under {training.code_version}')
    return position


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
