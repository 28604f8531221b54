"""Shared helpers: run the real command line in a temporary folder, find the real MNIST and the
release's embedding files."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI exports the shared data folder; a developer may have it beside the repository.
DATA_ROOT_ENV = 'MNIST_DATA_ROOT'
MNIST_ROOT = os.environ.get(DATA_ROOT_ENV) or str(REPO.parent / 'shared' / 'data')
MNIST_RAW_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                   't10k-labels-idx1-ubyte')
RELEASE_DIR = os.path.join(MNIST_ROOT, 'MNIST_pretrained_models')


def require_files(paths, what: str):
    """Skip a test whose data is not on this machine, unless MNIST_DATA_ROOT is set: then the
    data is declared present, and a missing file fails the test instead of skipping it in
    silence."""
    missing = [str(path) for path in paths if not os.path.isfile(path)]
    if not missing:
        return
    message = f'{what}: {missing[0]} is missing' + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else '')
    if os.environ.get(DATA_ROOT_ENV):
        pytest.fail(f'{message}, although {DATA_ROOT_ENV} is set', pytrace=False)
    pytest.skip(f'{message} (set {DATA_ROOT_ENV})')


@pytest.fixture
def mnist_root():
    """The folder holding MNIST/raw/ with the four official files."""
    require_files([os.path.join(MNIST_ROOT, 'MNIST', 'raw', name) for name in MNIST_RAW_FILES],
                  'real MNIST')
    return MNIST_ROOT


@pytest.fixture
def release_dir():
    """The folder holding the release's 48 embedding files."""
    import embeddings

    require_files([os.path.join(RELEASE_DIR, name) for name in sorted(embeddings.RELEASE_SHA256)],
                  'the release\'s embedding files')
    return RELEASE_DIR


def run_script(script, *args, cwd, env=None, timeout=600):
    """Run one of the repository's scripts as a user would, in `cwd`."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop('RANK', None)
    full_env.pop('WORLD_SIZE', None)
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def load_results(path):
    """Through the restricted unpickler that plot_figures.py uses: every results file the tests
    read proves that it loads without running code."""
    import common
    return common.load_results(path)


def folder_snapshot(folder):
    """Every file and folder under `folder`, for 'nothing was written' checks."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob('*'))
