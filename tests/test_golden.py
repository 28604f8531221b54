"""Golden runs: seeded CPU runs of both scripts whose exact outputs are pinned in tests/golden/.

A refactor must leave these bit-identical: every pickle value (timing and version keys aside) and
every tensor of the best checkpoint. A change that alters results on purpose (a new random
stream, say) regenerates the files, alone in its own commit, with the reason in the message:

    python tests/test_golden.py --regenerate
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / 'golden'
# Wall-clock and environment facts: they differ from run to run by nature.
UNPINNED_KEYS = {'computation_time', 'epoch_times', 'torch_version', 'torchvision_version',
                 'python_version'}
MNIST_SMALL = ['--synthetic', '--subset', '384', '--in_channels', '8', '--dim_int', '4',
               '--batch_size', '128', '--lr_init', '0.5']
RUNS = {
    # RKHS, the default method, a drawn embedding, a decay inside the run.
    'mnist_rkhs': ('MNIST_experiments.py', [*MNIST_SMALL, '--layers', '3', '--epochs', '3',
                                            '--decay_steps', '2', '--seed', '5',
                                            '--embedding_dir', 'none']),
    # SHL, rk4, a pretrained embedding from its own seed.
    'mnist_shl_pretrained': ('MNIST_experiments.py', [*MNIST_SMALL, '--model', 'SHL', '--layers', '2',
                                                      '--method', 'rk4', '--epochs', '2',
                                                      '--pretrain', '1', '--pretrain_lr', '0.05',
                                                      '--seed', '6', '--embedding_seed', '2',
                                                      '--embedding_dir', 'none']),
    # Euler with the linear schedule, A and B loaded from release-format files.
    'mnist_files_linear': ('MNIST_experiments.py', [*MNIST_SMALL, '--layers', '4', '--method', 'euler',
                                                    '--time_weights', 'linear', '--epochs', '2',
                                                    '--seed', '7', '--embedding_dir', 'emb']),
    'cifar_shl': ('CIFAR_experiments.py', ['--synthetic', '--subset', '64', '--model', 'SHL',
                                           '--layers', '1', '--epochs', '2', '--batch_size', '32',
                                           '--lr_init', '0.05', '--seed', '8']),
}


def _write_embedding_files(folder: Path):
    """Release-format A and B for 8 channels, 0 passes, drawn from a fixed seed."""
    sys.path.insert(0, str(REPO))
    import models

    folder.mkdir(exist_ok=True)
    generator_state = torch.get_rng_state()
    torch.manual_seed(123)
    nets = (models.mnist_input_network(8), models.mnist_output_network(8))
    torch.set_rng_state(generator_state)
    for part, net in zip(('input', 'output'), nets):
        torch.save({'model': net, 'loss': torch.tensor(0.0)}, folder / f'8channels_0pass_{part}_embedding.pt')


def _plain(value):
    """A JSON-exact form of a pickle value: arrays keep dtype, shape and every float's bits."""
    if isinstance(value, np.ndarray):
        return {'dtype': str(value.dtype), 'shape': list(value.shape),
                'values': [float(v) for v in value.ravel()]}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, float):
        return {'float': value.hex()}
    return value


def _tensor_digest(state: dict) -> dict:
    return {key: hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest()
            + f' {tuple(value.shape)} {value.dtype}' for key, value in sorted(state.items())
            if isinstance(value, torch.Tensor)}


def run_and_summarise(name: str, cwd: Path) -> dict:
    script, argv = RUNS[name]
    if '--embedding_dir' in argv and argv[argv.index('--embedding_dir') + 1] == 'emb':
        _write_embedding_files(cwd / 'emb')
    env = dict(os.environ, OMP_NUM_THREADS='1')  # one thread: the same summation order everywhere
    for key in ('RANK', 'WORLD_SIZE', 'RESNET_ODE_FAULT'):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(REPO / script), *argv, '--save', f'{name}.pkl'],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    folder = 'MNIST' if script.startswith('MNIST') else 'CIFAR'
    with open(cwd / f'{folder}_experiments' / f'{name}.pkl', 'rb') as f:
        import pickle
        results = pickle.load(f)
    checkpoint = torch.load(cwd / f'{folder}_checkpoint' / f'{name}.pth', weights_only=True)
    parts = {key: _tensor_digest(value) for key, value in checkpoint.items()
             if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())}
    # The protocol record's code and torch versions change with every commit and install.
    results['protocol'] = {key: value for key, value in results['protocol'].items()
                           if key not in ('code_version', 'torch_version')}
    return {'pickle': {key: _plain(value) for key, value in sorted(results.items())
                       if key not in UNPINNED_KEYS},
            'checkpoint_epoch': checkpoint['epoch'], 'checkpoint_tensors': parts}


@pytest.mark.parametrize('name', sorted(RUNS))
def test_golden_run_is_bit_identical(tmp_path, name):
    expected = json.loads((GOLDEN / f'{name}.json').read_text())
    actual = json.loads(json.dumps(run_and_summarise(name, tmp_path)))
    assert sorted(actual['pickle']) == sorted(expected['pickle'])  # the same keys, none added
    for key in expected['pickle']:
        assert actual['pickle'][key] == expected['pickle'][key], key
    assert actual['checkpoint_epoch'] == expected['checkpoint_epoch']
    assert actual['checkpoint_tensors'] == expected['checkpoint_tensors']


if __name__ == '__main__':
    import tempfile

    if sys.argv[1:] != ['--regenerate']:
        sys.exit('usage: python tests/test_golden.py --regenerate')
    GOLDEN.mkdir(exist_ok=True)
    for run in sorted(RUNS):
        with tempfile.TemporaryDirectory() as folder:
            summary = run_and_summarise(run, Path(folder))
        (GOLDEN / f'{run}.json').write_text(json.dumps(summary, indent=1, sort_keys=True) + '\n')
        print(f'wrote {GOLDEN / run}.json')
