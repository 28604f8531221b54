"""MNIST_experiments.py end to end, through the real command line."""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import models
from conftest import folder_snapshot, load_results, run_script

RELEASE_KEYS = {'model': str, 'num_layers': int, 'in_channels': int, 'dim_int': int,
                'pretrain_pass': int, 'batch_size': int, 'train_loss': np.ndarray,
                'train_classif': np.ndarray, 'test_classif': np.ndarray,
                'computation_time': float, 'num_parameters': int}


def _check_schema(results, epochs, steps_per_epoch):
    for key, kind in RELEASE_KEYS.items():
        assert isinstance(results[key], kind), key
    assert results['train_loss'].shape == (epochs * steps_per_epoch,)
    assert results['train_classif'].shape == results['test_classif'].shape == (epochs + 1,)
    for curve in ('train_classif', 'test_classif'):
        assert np.all((results[curve] >= 0) & (results[curve] <= 1))


SYNTHETIC_RUN = ['--synthetic', '--subset', '600', '--model', 'SHL', '--layers', '3',
                 '--in_channels', '8', '--dim_int', '4', '--epochs', '2', '--pretrain', '1',
                 '--batch_size', '100', '--lr_init', '0.5', '--seed', '3', '--save', 'run.pkl']


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory):
    """One short synthetic run shared by several checks (SHL, 2 epochs, pretraining)."""
    cwd = tmp_path_factory.mktemp('mnist_synthetic')
    proc = run_script('MNIST_experiments.py', *SYNTHETIC_RUN, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd, proc


def test_pickle_schema_and_parameter_count(synthetic_run):
    cwd, proc = synthetic_run
    results = load_results(cwd / 'MNIST_experiments' / 'run.pkl')
    _check_schema(results, epochs=2, steps_per_epoch=6)
    assert results['num_parameters'] == (3 + 1) * 8 * 4 * 9 * 2
    assert results['model'] == 'SHL' and results['pretrain_pass'] == 1
    assert results['time_weights'] == 'release' and results['seed'] == 3
    assert results['diverged'] is False
    assert re.search(r'epoch 2/2: lr [\d.e-]+, loss [\d.]+, train error [\d.]+%, test error [\d.]+%, best', proc.stdout)


def test_results_unpickle_without_torch(synthetic_run):
    cwd, _ = synthetic_run
    code = ('import sys, pickle\n'
            'class Block:\n'
            '    def find_spec(self, name, path=None, target=None):\n'
            '        if name.split(".")[0] in ("torch", "torchvision", "models", "engine"):\n'
            '            raise ImportError("blocked " + name)\n'
            'sys.meta_path.insert(0, Block())\n'
            f'd = pickle.load(open({str(cwd / "MNIST_experiments" / "run.pkl")!r}, "rb"))\n'
            'assert "torch" not in sys.modules\n'
            'print(len(d["train_loss"]))\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '12'


def test_checkpoint_loads_weights_only_and_evaluate_matches(synthetic_run):
    cwd, _ = synthetic_run
    results = load_results(cwd / 'MNIST_experiments' / 'run.pkl')
    checkpoint = torch.load(cwd / 'MNIST_checkpoint' / 'run.pth', weights_only=True)
    assert set(checkpoint) >= {'input_net', 'ode_block', 'output_net', 'args', 'epoch', 'test_error'}
    assert checkpoint['test_error'] == pytest.approx(float(results['test_classif'].min()), abs=1e-7)
    before = folder_snapshot(cwd)
    proc = run_script('MNIST_experiments.py', '--evaluate', 'MNIST_checkpoint/run.pth',
                      '--synthetic', '--subset', '600', cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    printed = float(re.search(r'test error ([\d.]+)%', proc.stdout).group(1))
    assert printed == pytest.approx(100 * float(results['test_classif'].min()), abs=1e-4)
    assert folder_snapshot(cwd) == before


@pytest.mark.slow
def test_pretraining_changes_embedding_then_training_leaves_it_untouched(synthetic_run, tmp_path):
    cwd, _ = synthetic_run
    final = torch.load(cwd / 'MNIST_checkpoint' / 'run.pth', weights_only=True)
    assert final['epoch'] > 0  # the best model is a trained one, so the comparison means something
    # The same command, stopped (SIGTERM) right after the epoch-0 checkpoint: A and B as
    # pretraining left them. The run stops at its next step, before any other checkpoint.
    proc = run_script('MNIST_experiments.py', *SYNTHETIC_RUN, cwd=tmp_path,
                      env={'RESNET_ODE_FAULT': 'checkpoint@1:SIGTERM'})
    assert proc.returncode == 143, proc.stderr
    pretrained = torch.load(tmp_path / 'MNIST_checkpoint' / 'run.pth', weights_only=True)
    assert pretrained['epoch'] == 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # --embedding_seed defaults to --seed
        initial = models.mnist_input_network(8).state_dict()
    assert not torch.equal(initial['0.weight'], pretrained['input_net']['0.weight'])
    for part in ('input_net', 'output_net'):  # parameters and BatchNorm statistics alike
        for key, value in pretrained[part].items():
            assert torch.equal(value, final[part][key]), (part, key)
    assert not torch.equal(pretrained['ode_block']['func.output_weight'],
                           final['ode_block']['func.output_weight'])


def test_existing_results_file_is_refused_and_left_byte_identical(tmp_path):
    folder = tmp_path / 'MNIST_experiments'
    folder.mkdir()
    existing = folder / 'taken.pkl'
    existing.write_bytes(b'precious results')
    before = folder_snapshot(tmp_path)
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'taken.pkl', cwd=tmp_path)
    assert proc.returncode == 2
    assert existing.read_bytes() == b'precious results'
    assert folder_snapshot(tmp_path) == before
    assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_offline_error_names_the_folder_without_traceback(tmp_path):
    proc = run_script('MNIST_experiments.py', '--data_root', tmp_path / 'nowhere', '--epochs', '0',
                      '--save', 'x.pkl', cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1
    assert 'MNIST/raw' in message and 'train-images-idx3-ubyte' in message and '--data_root' in message
    assert folder_snapshot(tmp_path) == []  # not even the folders the download attempt made


def test_failed_download_keeps_an_existing_root_as_it_was(tmp_path):
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'notes.txt').write_text('mine')
    proc = run_script('MNIST_experiments.py', '--data_root', 'data', '--epochs', '0',
                      '--save', 'x.pkl', cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith('error: MNIST is not in data/MNIST/raw')
    assert folder_snapshot(tmp_path) == ['data', 'data/notes.txt']


@pytest.mark.slow
def test_real_mnist_subset_end_to_end(tmp_path, mnist_root):
    proc = run_script('MNIST_experiments.py', '--data_root', mnist_root, '--subset', '2048',
                      '--layers', '5', '--epochs', '1', '--batch_size', '64', '--seed', '0',
                      '--save', 'real.pkl',
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = load_results(tmp_path / 'MNIST_experiments' / 'real.pkl')
    _check_schema(results, epochs=1, steps_per_epoch=32)
    assert results['num_parameters'] == 55_296
    assert results['test_classif'][1] < results['test_classif'][0]  # it learns
    assert results['train_loss'][-8:].mean() < results['train_loss'][:8].mean()


@pytest.mark.slow
def test_compile_flag_trains_the_same_curves(tmp_path):
    """--compile (torch.compile, inductor) through the real command line, against eager."""
    common = ['--synthetic', '--subset', '512', '--layers', '2', '--in_channels', '8',
              '--dim_int', '4', '--batch_size', '128', '--epochs', '1', '--seed', '3']
    compiled = run_script('MNIST_experiments.py', *common, '--compile', '--save', 'c.pkl', cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    eager = run_script('MNIST_experiments.py', *common, '--save', 'e.pkl', cwd=tmp_path)
    assert eager.returncode == 0, eager.stderr
    folder = tmp_path / 'MNIST_experiments'
    with_compile, without = load_results(folder / 'c.pkl'), load_results(folder / 'e.pkl')
    assert with_compile['train_loss'].shape == (4,)
    # Inductor fuses and reorders float operations, so not bit-identical; 4 SGD steps stay
    # within 1e-4 relative, far below any difference in the maths.
    np.testing.assert_allclose(with_compile['train_loss'], without['train_loss'], rtol=1e-4)
    np.testing.assert_allclose(with_compile['test_classif'], without['test_classif'], atol=2 / 512)


@pytest.mark.parametrize('content', [{'dataset': 'CIFAR10', 'epoch': 0}, torch.zeros(3)])
def test_evaluate_refuses_a_file_that_is_not_an_mnist_checkpoint(tmp_path, content):
    torch.save(content, tmp_path / 'other.pth')
    before = folder_snapshot(tmp_path)
    proc = run_script('MNIST_experiments.py', '--evaluate', 'other.pth', '--synthetic', cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == 'error: other.pth is not a checkpoint of this project for MNIST\n'
    assert folder_snapshot(tmp_path) == before
