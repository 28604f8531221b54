"""Fault injection through the real command line: kills, signals, bad input, crafted files."""
import numpy as np
import pytest
import torch

from conftest import folder_snapshot, load_results, run_script

RUN = ['--synthetic', '--subset', '500', '--layers', '3', '--in_channels', '8', '--dim_int', '4',
       '--epochs', '3', '--batch_size', '100', '--lr_init', '0.5', '--seed', '5', '--save', 'r.pkl']
CURVES = ('train_loss', 'train_classif', 'test_classif')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp('reference')
    proc = run_script('MNIST_experiments.py', *RUN, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return (load_results(cwd / 'MNIST_experiments' / 'r.pkl'),
            torch.load(cwd / 'MNIST_checkpoint' / 'r.pth', weights_only=True))


def _assert_same_run(cwd, reference):
    results, checkpoint = reference
    resumed = load_results(cwd / 'MNIST_experiments' / 'r.pkl')
    for key in CURVES:
        assert np.array_equal(resumed[key], results[key]), key
    resumed_ckpt = torch.load(cwd / 'MNIST_checkpoint' / 'r.pth', weights_only=True)
    assert resumed_ckpt['epoch'] == checkpoint['epoch']
    for key, value in checkpoint['ode_block'].items():
        assert torch.equal(resumed_ckpt['ode_block'][key], value)
    assert not (cwd / 'MNIST_experiments' / 'r.resume.pt').exists()


@pytest.mark.parametrize('fault, status', [
    ('step@7', -9),                 # SIGKILL in the second epoch
    ('evaluation@3', -9),           # SIGKILL between the two evaluations after epoch 2
    ('checkpoint@2', -9),           # SIGKILL right after a best-checkpoint write
    ('resume@1', -9),               # SIGKILL right after the first resume state
    ('step@8:SIGINT', 130),         # Ctrl-C mid-epoch: saves where it stopped
    ('step@3:SIGTERM', 143),
])
@pytest.mark.slow
def test_interrupted_then_resumed_run_is_bit_identical(tmp_path, reference, fault, status):
    proc = run_script('MNIST_experiments.py', *RUN, cwd=tmp_path, env={'RESNET_ODE_FAULT': fault})
    assert proc.returncode == status, proc.stderr
    assert not (tmp_path / 'MNIST_experiments' / 'r.pkl').exists()
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'r.pkl', '--resume',
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _assert_same_run(tmp_path, reference)


def test_resume_without_state_is_an_error(tmp_path):
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'r.pkl', '--resume', cwd=tmp_path)
    assert proc.returncode == 2 and 'no resume state' in proc.stderr
    assert folder_snapshot(tmp_path) == []


BAD_COMMAND_LINES = [
    ['--layers', '0'], ['--layers', 'five'], ['--in_channels', '0'], ['--dim_int', '-3'],
    ['--batch_size', '0'], ['--test_batch_size', '0'], ['--subset', '0'], ['--epochs', '-1'],
    ['--pretrain', '-2'], ['--lr_init', '0'], ['--lr_init', 'nan'], ['--lr_init', 'inf'],
    ['--pretrain_lr', '-1'], ['--decay_rate', '0'], ['--decay_steps', '-5'],
    ['--decay_steps', '2.5'], ['--method', 'dopri5'], ['--model', 'MLP'],
    ['--time_weights', 'cubic'], ['--save', '../escape.pkl'], ['--save', 'sub/dir.pkl'],
    ['--save', 'results.txt'], ['--save', '..'], ['--seed', '-1'], ['--device', 'tpu'],
    ['--evaluate', 'missing.pth'], ['--results_dir', 'blocker/inside'], ['--no_such_flag'],
    ['--decay_steps', '0'], ['--decay_steps', '3', '3'], ['--subset', '60001'], ['--save', 'a\nb.pkl'],
    ['--save', 'x' * 250 + '.pkl'],
]


def test_bad_command_lines_exit_2_with_one_line_and_write_nothing(tmp_path):
    # In this process (run_script), except the first two: the real exit status and stderr of a
    # process, which the in-process cases stand for.
    for number, argv in enumerate(BAD_COMMAND_LINES):
        cwd = tmp_path / f'case{number}'
        cwd.mkdir()
        (cwd / 'blocker').write_text('a file where a folder would have to be')
        proc = run_script('MNIST_experiments.py', '--synthetic', *argv, cwd=cwd, process=number < 2)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert 'Traceback' not in proc.stderr, argv
        assert len(proc.stderr.strip().splitlines()) == 1, (argv, proc.stderr)
        assert folder_snapshot(cwd) == ['blocker'], argv


class _RunsCode:
    """Unpickling this would run code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


@pytest.mark.parametrize('use', ['evaluate', 'resume'])
def test_crafted_checkpoint_is_refused_and_its_code_never_runs(tmp_path, use):
    marker = tmp_path / 'pwned'
    payload = {'format': 1, 'dataset': 'MNIST', 'args': {}, 'evil': _RunsCode(str(marker))}
    if use == 'evaluate':
        path = tmp_path / 'evil.pth'
        argv = ['--evaluate', 'evil.pth']
    else:
        (tmp_path / 'MNIST_experiments').mkdir()
        path = tmp_path / 'MNIST_experiments' / 'r.resume.pt'
        argv = ['--save', 'r.pkl', '--resume']
    torch.save(payload, path)
    proc = run_script('MNIST_experiments.py', '--synthetic', *argv, cwd=tmp_path)
    assert proc.returncode == 2 and 'refusing to load' in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not marker.exists()


def test_truncated_data_file_is_named(tmp_path):
    raw = tmp_path / 'data' / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for name in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                 't10k-labels-idx1-ubyte'):
        (raw / name).write_bytes(b'\x00' * 1000)  # far too short
    proc = run_script('MNIST_experiments.py', '--data_root', tmp_path / 'data', '--save', 'x.pkl',
                      cwd=tmp_path)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert 'train-images-idx3-ubyte' in proc.stderr and 'truncated or corrupt' in proc.stderr
    assert not (tmp_path / 'MNIST_experiments').exists()


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


def test_existing_checkpoint_of_another_run_is_not_overwritten(tmp_path):
    folder = tmp_path / 'MNIST_checkpoint'
    folder.mkdir()
    (folder / 'mine.pth').write_bytes(b'another run')
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'other.pkl',
                      '--checkpoint', 'MNIST_checkpoint/mine.pth', cwd=tmp_path)
    assert proc.returncode == 2
    assert (folder / 'mine.pth').read_bytes() == b'another run'
    assert not (tmp_path / 'MNIST_experiments').exists()
