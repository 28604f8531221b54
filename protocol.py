"""The protocol record: everything a run's numbers depend on beyond its configuration.

A run's *configuration* is what a figure draws as one curve (dataset, model, L, channels,
pretraining passes). Its *protocol* is how that curve was made: schedule, batch size, the
training-error sample, data, integrator, and where the input and output networks A and B came
from. Two runs of one configuration are comparable only when their protocols agree.

This module owns that record. The experiment scripts write it into every results pickle
(`build`, under the key 'protocol'); the sweep (reproduce.py), the figures (plot_figures.py)
and the comparison with the release (release_runs.py) read it back with `read`, which also
understands pickles that predate it and the release's own stored pickles, and compare records
with `differences`. None of them keeps its own list of fields.

Torch-free, so that the sweep runner and the plotting script start fast.
"""
from __future__ import annotations

import os
import subprocess

import embeddings

# Fields that decide whether two runs are comparable. A sweep reuses an existing pickle only when
# all of these match what it would run; figures and tables never average runs that differ in one.
DECIDING = ('dataset', 'epochs', 'lr_init', 'decay_steps', 'decay_rate', 'batch_size',
            'train_error_images', 'train_error_sample', 'subset', 'synthetic', 'method',
            'time_weights', 'amp', 'pretrain', 'pretrain_lr', 'embedding')
# Recorded, shown, but never a reason to redo or separate runs: the fixed integrator computes
# what torchdiffeq's odeint computes (tested bit for bit), and a sweep continued after a code or
# torch upgrade keeps its finished runs.
INFORMATIVE = ('integrator', 'code_version', 'torch_version')
FIELDS = DECIDING + INFORMATIVE

# What the release used, for pickles that carry no record: its stored runs' protocol (MNIST: 40
# epochs with x0.2 at 35, and train_classif on the first 1,000 training images, as its stored
# values show; CIFAR-10: 300 epochs with x0.1 at 260 and 10,000 random augmented images).
RELEASE = {
    'MNIST': dict(epochs=40, lr_init=0.5, decay_steps=[35], decay_rate=0.2, batch_size=256,
                  train_error_images=1000, train_error_sample='first', method='midpoint',
                  time_weights='release', integrator='torchdiffeq'),
    'CIFAR10': dict(epochs=300, lr_init=3e-3, decay_steps=[260], decay_rate=0.1, batch_size=256,
                    train_error_images=10_000, train_error_sample='random', method=None,
                    time_weights=None, integrator=None),
}
# Before the record existed, this project measured MNIST's train_classif on 10,000 images.
PROJECT_BEFORE_RECORD_TRAIN_IMAGES = 10_000


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def embedding_record(facts: dict) -> dict | None:
    """Where A and B came from, from a run's facts: the release's files with their SHA-256, or
    the seed they were drawn from (MNIST); None for CIFAR-10, which has no embedding."""
    if facts.get('embedding_files'):
        return {'source': 'files', 'files': list(facts['embedding_files']),
                'sha256': list(facts['embedding_sha256']),
                'release': all(embeddings.RELEASE_SHA256.get(name) == digest for name, digest
                               in zip(facts['embedding_files'], facts['embedding_sha256']))}
    if 'embedding_seed' in facts:
        return {'source': 'drawn', 'seed': facts['embedding_seed']}
    return None


def build(args, dataset: str, facts: dict) -> dict:
    """The protocol record of a run from its arguments and facts (embedding, code version)."""
    mnist = dataset == 'MNIST'
    embedding = embedding_record(facts) if mnist else None
    drawn_and_pretrained = mnist and embedding['source'] == 'drawn' and args.pretrain > 0
    return {
        'dataset': dataset, 'epochs': int(args.epochs), 'lr_init': float(args.lr_init),
        'decay_steps': sorted(int(step) for step in args.decay_steps),
        'decay_rate': float(args.decay_rate), 'batch_size': int(args.batch_size),
        'train_error_images': int(args.train_error_images if mnist else RELEASE[dataset]['train_error_images']),
        'train_error_sample': 'first' if mnist else 'random',
        'subset': args.subset, 'synthetic': bool(args.synthetic),
        'method': args.method if mnist else None,
        'time_weights': args.time_weights if mnist else None,
        'amp': bool(getattr(args, 'amp', False)),
        'pretrain': int(args.pretrain) if mnist else None,
        'pretrain_lr': float(args.pretrain_lr) if drawn_and_pretrained else None,
        'embedding': embedding,
        'integrator': args.integrator if mnist else None,
        'code_version': facts.get('code_version', 'unknown'),
        'torch_version': facts.get('torch_version', 'unknown'),
    }


def code_version(folder: str | None = None) -> str:
    """The git commit of the code in `folder` (default: this repository), with ' (uncommitted
    changes)' when tracked files differ from it; 'unknown' when it is not a git checkout."""
    folder = folder or os.path.dirname(os.path.abspath(__file__))
    try:
        def git(*command):
            return subprocess.run(['git', '-C', folder, *command], capture_output=True, text=True,
                                  timeout=20, check=True).stdout.strip()
        commit = git('rev-parse', 'HEAD')
        dirty = git('status', '--porcelain', '--untracked-files=no')
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return commit + (' (uncommitted changes)' if dirty else '') if commit else 'unknown'


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read(data: dict, dataset: str) -> tuple[dict, tuple]:
    """The protocol of a results pickle, and the fields that were not recorded but assumed.

    A pickle of this project carries its record. An older pickle of this project carries the
    same facts as separate keys (epochs, lr_init, ...; its train_classif was measured on 10,000
    images). The release's stored pickles carry none: they are read with the release's values
    (RELEASE), and every field so filled in is listed in the second value.
    """
    recorded = data.get('protocol')
    if isinstance(recorded, dict) and all(key in recorded for key in DECIDING):
        return _checked({key: recorded.get(key, 'unknown') for key in FIELDS}), ()
    release = RELEASE.get(dataset, RELEASE['MNIST'])
    project = 'epochs' in data or 'dataset' in data  # this project's keys, before the record
    protocol, assumed = {'dataset': dataset}, []
    for key in ('epochs', 'lr_init', 'decay_steps', 'decay_rate', 'batch_size', 'method',
                'time_weights', 'integrator'):
        if data.get(key) is not None:
            protocol[key] = data[key]
        else:
            protocol[key] = release[key]
            assumed.append(key)
    protocol['decay_steps'] = sorted(int(step) for step in protocol['decay_steps'])
    protocol['train_error_sample'] = release['train_error_sample']
    if project and dataset == 'MNIST':
        protocol['train_error_images'] = PROJECT_BEFORE_RECORD_TRAIN_IMAGES
    else:
        protocol['train_error_images'] = release['train_error_images']
        assumed.append('train_error_images')
    protocol['subset'] = data.get('subset')
    protocol['synthetic'] = bool(data.get('synthetic', False))
    protocol['amp'] = bool(data.get('amp', False))
    mnist = dataset == 'MNIST'
    protocol['pretrain'] = data.get('pretrain_pass') if mnist else None
    protocol['embedding'], protocol['pretrain_lr'] = None, None
    if mnist:
        if project:
            protocol['embedding'] = embedding_record(
                {key: data[key] for key in ('embedding_files', 'embedding_sha256', 'embedding_seed')
                 if key in data})
            drawn = protocol['embedding'] is None or protocol['embedding']['source'] == 'drawn'
            protocol['pretrain_lr'] = data.get('pretrain_lr') if drawn and protocol['pretrain'] else None
        else:
            protocol['embedding'] = release_embedding(data.get('in_channels'), protocol['pretrain'])
            assumed.append('embedding')
    protocol['code_version'] = 'release' if not project else 'unknown'
    protocol['torch_version'] = data.get('torch_version', 'unknown')
    return _checked(protocol), tuple(assumed)


_NUMBER = (int, float)


def _checked(protocol: dict) -> dict:
    """The record with its types checked, so that it can be compared and hashed; a ValueError
    names the first field that a run of this project could not have written."""
    def number(value, integer=False, optional=False):
        if value is None and optional:
            return value
        kinds = (int,) if integer else _NUMBER
        if isinstance(value, bool) or not isinstance(value, kinds) and not hasattr(value, 'item'):
            raise ValueError
        value = value.item() if hasattr(value, 'item') else value
        if isinstance(value, bool) or not isinstance(value, kinds) or value != value:
            raise ValueError
        return value

    checks = {
        'epochs': lambda v: number(v, integer=True), 'lr_init': number, 'decay_rate': number,
        'decay_steps': lambda v: [number(step, integer=True) for step in v],
        'batch_size': lambda v: number(v, integer=True),
        'train_error_images': lambda v: number(v, integer=True),
        'subset': lambda v: number(v, integer=True, optional=True),
        'pretrain': lambda v: number(v, integer=True, optional=True),
        'pretrain_lr': lambda v: number(v, optional=True),
        'synthetic': lambda v: bool(v) if isinstance(v, bool) else _fail(),
        'amp': lambda v: bool(v) if isinstance(v, bool) else _fail(),
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


def _fail():
    raise ValueError


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
    except (TypeError, ValueError):
        names = ()
    if names and all(name in embeddings.RELEASE_SHA256 for name in names):
        return {'source': 'files', 'files': list(names),
                'sha256': [embeddings.RELEASE_SHA256[name] for name in names], 'release': True}
    return {'source': 'drawn', 'seed': None}


def release_ships(channels, passes) -> bool:
    """Whether the release shipped embedding files for this MNIST (channels, passes) pair, so
    that its runs started from them and a drawn start is a deviation."""
    return release_embedding(channels, passes)['source'] == 'files'


SCRIPTS = {'MNIST': 'MNIST_experiments', 'CIFAR10': 'CIFAR_experiments'}  # SYNTHETIC added below


def of_command(dataset: str, argv: list) -> dict:
    """The record that MNIST_experiments.py or CIFAR_experiments.py would write when run with
    `argv`: its flags read by the script's own parser, and the embedding files it would load.
    Imports the script, hence torch; raises embeddings.EmbeddingError as the run would."""
    import importlib

    # Imported by name at call time: the scripts import this module, so a plain import would
    # be a cycle.
    module = importlib.import_module(SCRIPTS[dataset])
    args = module.get_args_parser().parse_args(argv)
    if dataset == SYNTHETIC:
        return build_synthetic(args, module.integration_method(args), {})
    facts = {}
    if dataset == 'MNIST':
        module.apply_release_tbs(args)
        explicit = 'embedding_dir' in args._given
        paths = embeddings.find(args.embedding_dir, args.in_channels, args.pretrain,
                                required=explicit and embeddings.release_ships(args.in_channels, args.pretrain))
        facts = embeddings.describe(paths) if paths else {
            'embedding_seed': args.embedding_seed if args.embedding_seed is not None
            else (args.seeds[0] if args.seeds else args.seed)}
    return build(args, dataset, facts)


def of_file(path: str, dataset: str) -> tuple[dict | None, str | None]:
    """The record of an existing results pickle or resume state: (record, None), or (None, why it
    cannot be read as a run of this project). A resume state is read with torch.load's
    weights_only loading: plain values only."""
    try:
        if path.endswith('.pkl'):
            import common
            data = common.load_results(path)
            if dataset == SYNTHETIC:  # no release-era pickles to read: the record or nothing
                if not isinstance(data.get('protocol'), dict):
                    raise ValueError('no protocol record')
                return data['protocol'], None
            return read(data, dataset)[0], None
        import argparse
        import torch
        state = torch.load(path, map_location='cpu', weights_only=True)
        stored = argparse.Namespace(**{'train_error_images': 10_000, 'amp': False,  # older states
                                       **state['args']})
        return build(stored, dataset, state['facts']), None
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
            steps = show(key, value)
            parts.append(f'x{protocol.get("decay_rate")}@{steps}')
        elif key == 'decay_rate' and 'decay_steps' in fields:
            continue
        elif key == 'embedding':
            parts.append(f'embedding {show(key, value)}')
        elif key in ('subset', 'pretrain_lr') and value is None:
            continue
        elif key in ('synthetic', 'amp'):
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
            and embedding.get('source') == 'drawn' and release_ships(channels, passes))


# ---------------------------------------------------------------------------------------------
# The synthetic experiment (synthetic_experiments.py)
# ---------------------------------------------------------------------------------------------

# A synthetic run's configuration is (model, num_layers, q, r, nu): what its figure draws as one
# curve. Its protocol is the rest: the data it draws and how it trains. The same idea as above:
# runs are averaged or reused only when every deciding field agrees.
SYNTHETIC = 'SYNTHETIC'
SCRIPTS[SYNTHETIC] = 'synthetic_experiments'
SYNTHETIC_DECIDING = ('dataset', 'epochs', 'learning_rate', 'method', 'time_weights',
                      'dataset_size', 'data_dim', 'sigma', 'matrix', 'alpha')
SYNTHETIC_INFORMATIVE = ('integrator', 'code_version', 'torch_version')


def build_synthetic(args, method: str, facts: dict) -> dict:
    """The protocol record of a synthetic run. method: the scheme it integrated with (the
    script's --method release means midpoint); facts: code_version, torch_version."""
    return {
        'dataset': SYNTHETIC, 'epochs': int(args.epochs), 'learning_rate': float(args.learning_rate),
        'method': method, 'time_weights': args.time_weights,
        'dataset_size': int(args.dataset_size), 'data_dim': int(args.data_dim),
        'sigma': float(args.sigma), 'matrix': args.matrix, 'alpha': float(args.alpha),
        'integrator': args.integrator,
        'code_version': facts.get('code_version', 'unknown'),
        'torch_version': facts.get('torch_version', 'unknown'),
    }
