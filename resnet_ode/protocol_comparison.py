"""Protocol records read back and compared: which runs may be averaged, reused or set side by side.

A pickle of this project carries its record (protocol.build); the release's stored pickles carry
none and are read with the release's values. Two runs are comparable only when every deciding
field agrees. Torch-free, so that the sweep runner and the plotting script start fast.
"""
from __future__ import annotations

import argparse

from . import embeddings
from .protocol import CIFAR_TRAIN_ERROR_IMAGES, SYNTHETIC, build

# Fields that decide whether two runs are comparable. A sweep reuses an existing pickle only when
# all of these match what it would run; figures and tables never average runs that differ in one.
# world_size and sync_bn: a run over several processes normalises its batches per process
# (CIFAR's BatchNorm, unless --sync_bn), so its numbers differ from a single process's.
DECIDING = ('dataset', 'epochs', 'lr_init', 'decay_steps', 'decay_rate', 'batch_size',
            'train_error_images', 'train_error_sample', 'subset', 'synthetic', 'method',
            'time_weights', 'amp', 'pretrain', 'pretrain_lr', 'embedding', 'world_size', 'sync_bn')
# Recorded, shown, but never a reason to redo or separate runs: the fixed integrator computes
# what torchdiffeq's odeint computes (tested bit for bit on MNIST's block), and a sweep continued
# after a code or torch upgrade keeps its finished runs.
INFORMATIVE = ('integrator', 'code_version', 'torch_version')
FIELDS = DECIDING + INFORMATIVE
# Fields added to the record after runs were committed with it: their value in those runs
# (each ran in one process, and no MNIST run has BatchNorm in its trained part).
ADDED_LATER = {'world_size': 1, 'sync_bn': None}

SYNTHETIC_DECIDING = ('dataset', 'epochs', 'learning_rate', 'method', 'time_weights',
                      'dataset_size', 'data_dim', 'sigma', 'matrix', 'alpha')

# What the release used, for pickles that carry no record: its stored runs' protocol (MNIST: 40
# epochs with x0.2 at 35, and train_classif on the first 1,000 training images, as its stored
# values show; CIFAR-10: 300 epochs with x0.1 at 260 and 10,000 random augmented images). Every
# stored run ran in one process.
RELEASE = {
    'MNIST': dict(epochs=40, lr_init=0.5, decay_steps=[35], decay_rate=0.2, batch_size=256,
                  train_error_images=1000, train_error_sample='first', method='midpoint',
                  time_weights='release', integrator='torchdiffeq', sync_bn=None),
    'CIFAR10': dict(epochs=300, lr_init=3e-3, decay_steps=[260], decay_rate=0.1, batch_size=256,
                    train_error_images=CIFAR_TRAIN_ERROR_IMAGES, train_error_sample='random', method=None,
                    time_weights=None, integrator=None, sync_bn=False),
}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read(data: dict, dataset: str) -> tuple[dict, tuple]:
    """The protocol of a results pickle, and the fields that were not recorded but assumed.

    A pickle of this project carries its record (a field added to the record later takes the
    value every committed run had). The release's stored pickles carry none: they are read with
    the release's values (RELEASE), and every field so filled in is listed in the second value.
    """
    recorded = data.get('protocol')
    if isinstance(recorded, dict) and all(key in recorded or key in ADDED_LATER for key in DECIDING):
        added = {key: value for key, value in ADDED_LATER.items() if key not in recorded}
        if 'world_size' in added and data.get('world_size') is not None:
            added['world_size'] = data['world_size']
        if 'sync_bn' in added and dataset == 'CIFAR10':
            added['sync_bn'] = False
        return _checked({key: {**recorded, **added}.get(key, 'unknown') for key in FIELDS}), ()
    release = RELEASE.get(dataset, RELEASE['MNIST'])
    protocol, assumed = {'dataset': dataset}, []
    for key in ('epochs', 'lr_init', 'decay_steps', 'decay_rate', 'batch_size', 'method',
                'time_weights', 'integrator'):
        if data.get(key) is not None:
            protocol[key] = data[key]
        else:
            protocol[key] = release[key]
            assumed.append(key)
    protocol['decay_steps'] = sorted(int(step) for step in protocol['decay_steps'])
    protocol.update(train_error_sample=release['train_error_sample'],
                    train_error_images=release['train_error_images'], subset=None, synthetic=False,
                    amp=False, world_size=1, sync_bn=release['sync_bn'], pretrain_lr=None,
                    code_version='release', torch_version='unknown')
    assumed.append('train_error_images')
    mnist = dataset == 'MNIST'
    protocol['pretrain'] = data.get('pretrain_pass') if mnist else None
    protocol['embedding'] = release_embedding(data.get('in_channels'), protocol['pretrain']) if mnist else None
    if mnist:
        assumed.append('embedding')
    return _checked(protocol), tuple(assumed)


def _checked(protocol: dict) -> dict:
    """The record with its types checked, so that it can be compared and hashed; a ValueError
    names the first field that a run of this project could not have written."""
    def number(value, integer=False, optional=False):
        if value is None and optional:
            return value
        kinds = (int,) if integer else (int, float)
        value = value.item() if hasattr(value, 'item') else value  # a numpy scalar
        if isinstance(value, bool) or not isinstance(value, kinds) or value != value:
            raise ValueError
        return value

    def flag(value, optional=False):
        if (value is None and optional) or isinstance(value, bool):
            return value
        raise ValueError

    checks = {
        'epochs': lambda v: number(v, integer=True), 'lr_init': number, 'decay_rate': number,
        'decay_steps': lambda v: [number(step, integer=True) for step in v],
        'batch_size': lambda v: number(v, integer=True),
        'train_error_images': lambda v: number(v, integer=True),
        'subset': lambda v: number(v, integer=True, optional=True),
        'pretrain': lambda v: number(v, integer=True, optional=True),
        'pretrain_lr': lambda v: number(v, optional=True),
        'world_size': lambda v: number(v, integer=True),
        'synthetic': flag, 'amp': flag, 'sync_bn': lambda v: flag(v, optional=True),
        'embedding': _checked_embedding,
    }
    checked = dict(protocol)
    for key, value in protocol.items():
        try:
            if key in checks:
                checked[key] = checks[key](value)
            elif not (value is None or isinstance(value, str)):
                raise ValueError
        except (ValueError, TypeError):
            raise ValueError(f'its protocol record\'s {key} is {value!r:.60}, which no run writes') from None
    return checked


def _checked_embedding(value):
    if value is None:
        return None
    if not isinstance(value, dict) or value.get('source') not in ('files', 'drawn'):
        raise ValueError
    if value['source'] == 'files':
        files, digests = value.get('files'), value.get('sha256')
        if not (isinstance(files, list) and isinstance(digests, list)
                and all(isinstance(item, str) for item in files + digests)):
            raise ValueError
        return {'source': 'files', 'files': list(files), 'sha256': list(digests),
                'release': value.get('release') is True}
    seed = value.get('seed')
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError
    return {'source': 'drawn', 'seed': seed}


def release_embedding(channels, passes) -> dict:
    """The embedding a stored run of the release started from: its files for the (channels,
    passes) pairs it shipped, else one drawn by its own script (Figure 2's 4 channels)."""
    try:
        names = embeddings.file_names(int(channels), int(passes))
    except (TypeError, ValueError, OverflowError):
        names = ()
    if names and all(name in embeddings.RELEASE_SHA256 for name in names):
        return {'source': 'files', 'files': list(names),
                'sha256': [embeddings.RELEASE_SHA256[name] for name in names], 'release': True}
    return {'source': 'drawn', 'seed': None}


def of_file(path: str, dataset: str) -> tuple[dict | None, str | None]:
    """The record of an existing results pickle or resume state: (record, None), or (None, why it
    cannot be read as a run of this project). A resume state is read with torch.load's
    weights_only loading: plain values only."""
    try:
        if path.endswith('.pkl'):
            from .safe_pickle import load_results
            data = load_results(path)
            if dataset == SYNTHETIC:  # no release-era pickles to read: the record or nothing
                if not isinstance(data.get('protocol'), dict):
                    raise ValueError('no protocol record')
                return data['protocol'], None
            return read(data, dataset)[0], None
        from .checkpoints import load_torch
        state = load_torch(path, 'resume state')
        return build(argparse.Namespace(**state['args']), dataset, state['facts']), None
    except Exception as exc:  # unreadable, crafted, or not this project's
        return None, f'cannot be read as a run of this project ({type(exc).__name__}: {str(exc)[:80]})'


# ---------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------

def _start(embedding, exact: bool):
    """The embedding as compared: exactly (files and their bytes, or the drawn seed), or by kind
    for grouping (files by their bytes; every drawn one alike, as a spread like the run seed)."""
    if not isinstance(embedding, dict):
        return None
    if embedding.get('source') == 'files':
        return ('files', tuple(embedding.get('sha256') or ()))
    return ('drawn', embedding.get('seed')) if exact else ('drawn',)


def _comparable(key, value, exact=True):
    if key == 'embedding':
        return _start(value, exact)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, float) and value.is_integer() and key not in ('lr_init', 'decay_rate', 'pretrain_lr'):
        return int(value)
    return value


def differences(have: dict, want: dict, exact: bool = True) -> list[tuple[str, object, object]]:
    """The deciding fields in which `have` differs from `want`: (field, have's, want's).

    exact=False compares a drawn embedding by kind only (for grouping runs into curves)."""
    deciding = SYNTHETIC_DECIDING if SYNTHETIC in (have.get('dataset'), want.get('dataset')) else DECIDING
    return [(key, have.get(key), want.get(key)) for key in deciding
            if _comparable(key, have.get(key), exact) != _comparable(key, want.get(key), exact)]


def group_key(protocol: dict) -> tuple:
    """A hashable key that is equal for runs that may be averaged into one curve."""
    return tuple(_comparable(key, protocol.get(key), exact=False) for key in DECIDING)


def show(key: str, value) -> str:
    """One field's value as a person reads it."""
    if key == 'embedding':
        if not isinstance(value, dict):
            return 'none'
        if value.get('source') == 'files':
            return ('the release\'s files' if value.get('release') else
                    'files that are not the release\'s (' + ', '.join(value.get('files') or ()) + ')')
        return 'drawn' + ('' if value.get('seed') is None else f' from seed {value["seed"]}')
    if key == 'decay_steps' and isinstance(value, (list, tuple)):
        return ' '.join(map(str, value)) or 'none'
    return str(value)


def describe(protocol: dict, fields=DECIDING) -> str:
    """A short text of the protocol (or of some of its fields), for legends and tables."""
    parts = []
    for key in fields:
        value = protocol.get(key)
        if key == 'decay_steps':
            parts.append(f'x{protocol.get("decay_rate")}@{show(key, value)}')
        elif key == 'decay_rate' and 'decay_steps' in fields:
            continue
        elif key == 'embedding':
            parts.append(f'embedding {show(key, value)}')
        elif key in ('subset', 'pretrain_lr', 'sync_bn') and value is None:
            continue
        elif key == 'world_size':
            if value not in (1, None):
                parts.append(f'{value} processes')
        elif key in ('synthetic', 'amp', 'sync_bn'):
            if value:
                parts.append(key)
        else:
            parts.append(f'{key} {show(key, value)}')
    return ', '.join(parts)


def is_drawn_where_release_had_files(protocol: dict, channels, passes) -> bool:
    """A run that started from a drawn embedding where the release's runs started from its files
    (every MNIST pair except Figure 2's 4 channels): it does not start where the paper started."""
    embedding = protocol.get('embedding')
    return (protocol.get('dataset') == 'MNIST' and isinstance(embedding, dict)
            and embedding.get('source') == 'drawn' and embeddings.release_ships(channels, passes))


