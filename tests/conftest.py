"""Shared helpers: run the real command line in a temporary folder, find the real MNIST."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI exports the shared data folder; a developer may have it beside the repository.
MNIST_ROOT = os.environ.get('MNIST_DATA_ROOT') or str(REPO.parent / 'shared' / 'data')
HAVE_MNIST = os.path.isfile(os.path.join(MNIST_ROOT, 'MNIST', 'raw', 'train-images-idx3-ubyte'))
needs_mnist = pytest.mark.skipif(
    not HAVE_MNIST, reason=f'real MNIST not found in {MNIST_ROOT}/MNIST/raw (set MNIST_DATA_ROOT)')


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
