"""The protocol record that every run writes: everything its numbers depend on beyond its
configuration.

A run's *configuration* is what a figure draws as one curve (dataset, model, L, channels,
pretraining passes). Its *protocol* is how that curve was made: schedule, batch size, the
training-error sample, data, integrator, processes, and where the input and output networks A
and B came from. Two runs of one configuration are comparable only when their protocols agree.

This module owns that record. The experiment scripts write it into every results pickle
(`build`, under the key 'protocol'); the sweep, the figures and the comparison with the release
read it back with `read` (which also reads the release's own stored pickles, which carry no
record) and compare records with `differences`. None of them keeps its own list of fields.

Torch-free, so that the sweep runner and the plotting script start fast.
"""
from __future__ import annotations

import subprocess

from . import embeddings

# CIFAR-10's train_classif, as the release measured it: on this many training images, drawn anew
# at each evaluation and augmented (MNIST's sample is a flag, --train_error_images).
CIFAR_TRAIN_ERROR_IMAGES = 10_000

# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def embedding_record(facts: dict) -> dict | None:
    """Where A and B came from, from a run's facts: the release's files with their SHA-256, or
    the seed they were drawn from (MNIST); None for CIFAR-10, which has no embedding."""
    if facts.get('embedding_files'):
        return {'source': 'files', 'files': list(facts['embedding_files']),
                'sha256': list(facts['embedding_sha256']),
                'release': embeddings.is_release(facts)}
    if 'embedding_seed' in facts:
        return {'source': 'drawn', 'seed': facts['embedding_seed']}
    return None


def build(config, dataset: str, facts: dict) -> dict:
    """The protocol record of a run from its values and facts (embedding, code version, the
    number of processes)."""
    mnist = dataset == 'MNIST'
    embedding = embedding_record(facts) if mnist else None
    drawn_and_pretrained = mnist and embedding['source'] == 'drawn' and config.pretrain > 0
    world_size = int(facts.get('world_size', 1))
    return {
        'dataset': dataset, 'epochs': int(config.epochs), 'lr_init': float(config.lr_init),
        'decay_steps': sorted(int(step) for step in config.decay_steps),
        'decay_rate': float(config.decay_rate), 'batch_size': int(config.batch_size),
        'train_error_images': int(config.train_error_images if mnist else CIFAR_TRAIN_ERROR_IMAGES),
        'train_error_sample': 'first' if mnist else 'random',
        'subset': config.subset, 'synthetic': bool(config.synthetic),
        'method': config.method if mnist else None,
        'time_weights': config.time_weights if mnist else None,
        'amp': bool(getattr(config, 'amp', False)),
        'pretrain': int(config.pretrain) if mnist else None,
        'pretrain_lr': float(config.pretrain_lr) if drawn_and_pretrained else None,
        'embedding': embedding,
        'world_size': world_size,
        # BatchNorm synchronised across processes: only CIFAR's network has BatchNorm to train
        'sync_bn': None if mnist else bool(getattr(config, 'sync_bn', False) and world_size > 1),
        'integrator': config.integrator if mnist else None,
        'code_version': facts.get('code_version', 'unknown'),
        'torch_version': facts.get('torch_version', 'unknown'),
    }


def code_version(folder: str | None = None) -> str:
    """The git commit of the code in `folder` (default: this repository), with ' (uncommitted
    changes)' when tracked files differ from it; 'unknown' when it is not a git checkout."""
    folder = folder or embeddings.REPO_DIR
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
# The synthetic experiment (synthetic_experiments.py)
# ---------------------------------------------------------------------------------------------

# A synthetic run's configuration is (model, num_layers, q, r, nu): what its figure draws as one
# curve. Its protocol is the rest: the data it draws and how it trains. The same idea as above:
# runs are averaged or reused only when every deciding field agrees.
SYNTHETIC = 'SYNTHETIC'


def build_synthetic(config, method: str, facts: dict) -> dict:
    """The protocol record of a synthetic run. method: the scheme it integrated with (the
    script's --method release means midpoint); facts: code_version, torch_version."""
    return {
        'dataset': SYNTHETIC, 'epochs': int(config.epochs), 'learning_rate': float(config.learning_rate),
        'method': method, 'time_weights': config.time_weights,
        'dataset_size': int(config.dataset_size), 'data_dim': int(config.data_dim),
        'sigma': float(config.sigma), 'matrix': config.matrix, 'alpha': float(config.alpha),
        'integrator': config.integrator,
        'code_version': facts.get('code_version', 'unknown'),
        'torch_version': facts.get('torch_version', 'unknown'),
    }
