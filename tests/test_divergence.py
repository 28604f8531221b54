"""A run that diverges ends with exit status 3, its curves kept and marked as diverged.

A loss that becomes NaN or infinite, or a learning rate that its decays push beyond float32.
"""

import numpy as np
import torch

import MNIST_experiments
from conftest import load_results, run_script

SMALL = ['--synthetic', '--subset', '256', '--layers', '2', '--in_channels', '4', '--dim_int', '4',
         '--batch_size', '64', '--embedding_dir', 'none']


def _main(argv, script=MNIST_experiments) -> int:
    """The script's main, in this process, as its command line would call it."""
    return script.main(script.get_args_parser().parse_args([str(a) for a in argv]))


def test_divergence_keeps_curves_and_exits_3(tmp_path):
    proc = run_script('MNIST_experiments.py', '--synthetic', '--subset', '500', '--layers', '2',
                      '--in_channels', '4', '--dim_int', '4', '--epochs', '3', '--batch_size', '100',
                      '--lr_init', '1e30', '--seed', '1', '--save', 'd.pkl', cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    results = load_results(tmp_path / 'MNIST_experiments' / 'd.pkl')
    assert results['diverged'] is True and results['diverged_epoch'] == 1
    assert not np.isfinite(results['train_loss'][-1])
    assert np.isfinite(results['train_loss'][:-1]).all()
    checkpoint = torch.load(tmp_path / 'MNIST_checkpoint' / 'd.pth', weights_only=True)
    assert checkpoint['epoch'] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint['ode_block'].values())


def test_a_rate_that_decays_beyond_float32_is_a_divergence(tmp_path, monkeypatch, capsys):
    """Epoch 1 (one step from W = 0) is finite; its decay makes the rate 6e38, which no float32
    update can apply: the run ends as diverged in epoch 2 with its curves, exit 3, no state."""
    monkeypatch.chdir(tmp_path)
    status = _main([*SMALL, '--subset', '128', '--batch_size', '128', '--epochs', '3', '--lr_init', '2',
                    '--decay_rate', '3e38', '--decay_steps', '1', '--seed', '0', '--save', 'd.pkl'])
    assert status == 3
    assert 'the learning rate reached 6e+38 by its decays, beyond float32, before epoch 2' in capsys.readouterr().out
    results = load_results(tmp_path / 'MNIST_experiments' / 'd.pkl')
    assert results['diverged'] is True and results['diverged_epoch'] == 2
    assert results['train_loss'].shape == (1,) and results['test_classif'].shape == (2,)
    assert sorted(p.name for p in (tmp_path / 'MNIST_experiments').iterdir()) == ['d.metrics.jsonl', 'd.pkl']
