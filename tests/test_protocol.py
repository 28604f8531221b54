"""The protocol record (protocol.py): every pickle carries it, and a run never leaves the paper's
starting point in silence (where A and B come from, whatever the working directory)."""
import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CIFAR_experiments
import MNIST_experiments
from conftest import REPO, folder_snapshot, load_results, start_process
from resnet_ode import embeddings, protocol, protocol_comparison

TINY = ['--synthetic', '--subset', '64', '--layers', '1', '--in_channels', '4', '--dim_int', '4',
        '--batch_size', '32', '--epochs', '2', '--decay_steps', '1', '--seed', '3']


def _main(module, argv, cwd):
    """Run a script's main in-process in `cwd`: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = module.main(module.get_args_parser().parse_args([str(a) for a in argv]))
    finally:
        os.chdir(previous)
    return status, out.getvalue(), err.getvalue()


def test_every_pickle_records_its_protocol(tmp_path):
    status, _, err = _main(MNIST_experiments, TINY + ['--embedding_dir', 'none', '--embedding_seed', '5',
                                                      '--pretrain', '1', '--save', 'm.pkl'], tmp_path)
    assert status == 0, err
    record = load_results(tmp_path / 'MNIST_experiments' / 'm.pkl')['protocol']
    version = protocol.code_version()
    assert record == {
        'dataset': 'MNIST', 'epochs': 2, 'lr_init': 0.5, 'decay_steps': [1], 'decay_rate': 0.1,
        'batch_size': 32, 'train_error_images': 10_000, 'train_error_sample': 'first', 'subset': 64,
        'synthetic': True, 'method': 'midpoint', 'time_weights': 'release', 'amp': False, 'pretrain': 1,
        'pretrain_lr': 0.01, 'embedding': {'source': 'drawn', 'seed': 5}, 'world_size': 1, 'sync_bn': None,
        'integrator': 'fixed',
        'code_version': version, 'torch_version': record['torch_version']}
    assert version == 'unknown' or len(version.split()[0]) == 40  # a commit, said dirty when it is
    import torch
    assert record['torch_version'] == torch.__version__
    status, _, err = _main(CIFAR_experiments, ['--synthetic', '--subset', '16', '--layers', '1', '--epochs', '1',
                                               '--batch_size', '8', '--seed', '1', '--save', 'c.pkl'], tmp_path)
    assert status == 0, err
    record = load_results(tmp_path / 'CIFAR_experiments' / 'c.pkl')['protocol']
    assert (record['dataset'], record['epochs'], record['decay_steps'], record['train_error_images'],
            record['train_error_sample'], record['embedding'], record['method']) == (
        'CIFAR10', 1, [260], 10_000, 'random', None, None)
    # read back as the sweep and the figures read it: no field assumed
    assert protocol_comparison.read(load_results(tmp_path / 'CIFAR_experiments' / 'c.pkl'), 'CIFAR10') == (record, ())


def test_the_release_tbs_sets_the_training_error_sample(tmp_path):
    status, _, err = _main(MNIST_experiments, TINY + ['--embedding_dir', 'none', '-tbs', '16', '--save', 't.pkl'],
                           tmp_path)
    assert status == 0, err
    results = load_results(tmp_path / 'MNIST_experiments' / 't.pkl')
    assert results['protocol']['train_error_images'] == 16
    assert all((value * 16).is_integer() for value in results['train_classif'])  # errors of 16 images
    status, _, err = _main(MNIST_experiments, TINY + ['-tbs', '16', '--train_error_images', '8', '--save', 'u.pkl'],
                           tmp_path)
    assert status == 2 and err.count('\n') == 1 and 'contradicts --train_error_images 8' in err


def _release_pair(folder: Path, channels=4, passes=0):
    """Release-format A and B (this project's own networks, saved as the release saved them)."""
    import torch

    import models
    folder.mkdir(parents=True, exist_ok=True)
    for part, net in zip(('input', 'output'), (models.mnist_input_network(channels),
                                               models.mnist_output_network(channels))):
        torch.save({'model': net, 'loss': torch.tensor(0.0)},
                   folder / f'{channels}channels_{passes}pass_{part}_embedding.pt')


@pytest.mark.parametrize('case', ['misspelt folder', 'a file', 'only the input file', 'link to /dev/zero',
                                  'link to a folder'])
def test_an_unusable_embedding_dir_is_refused(tmp_path, case):
    """Given explicitly, --embedding_dir must hold the run's two files as readable regular files:
    otherwise one line, exit 2, nothing written (it used to draw A and B in silence)."""
    folder = tmp_path / 'emb'
    _release_pair(folder, channels=8)
    name = '8channels_0pass_output_embedding.pt'
    if case == 'misspelt folder':
        folder = tmp_path / 'emd'
    elif case == 'a file':
        folder = Path('/etc/passwd')
    elif case == 'only the input file':
        (folder / name).unlink()
    else:
        (folder / name).unlink()
        (folder / name).symlink_to('/dev/zero' if case == 'link to /dev/zero' else tmp_path)
    work = tmp_path / 'work'
    work.mkdir()
    argv = TINY[:TINY.index('--in_channels')] + ['--in_channels', '8', '--dim_int', '8'] + \
        TINY[TINY.index('--dim_int') + 2:] + ['--embedding_dir', folder, '--save', 'x.pkl']
    status, out, err = _main(MNIST_experiments, argv, work)
    assert status == 2 and err.count('\n') == 1, err
    expected = {'misspelt folder': f'--embedding_dir {folder} holds no 8channels_0pass_input_embedding.pt',
                'a file': '--embedding_dir /etc/passwd is not a folder',
                'only the input file': f'embedding file {folder / name} is missing, while',
                'link to /dev/zero': f'embedding file {folder / name} is not a regular file',
                'link to a folder': f'embedding file {folder / name} is not a regular file'}[case]
    assert expected in err
    assert folder_snapshot(work) == []


def test_the_default_folder_without_the_files_warns_that_the_start_differs(tmp_path, monkeypatch):
    monkeypatch.setattr(embeddings, 'DEFAULT_PATH', str(tmp_path / 'MNIST_pretrained_models'))
    parser = MNIST_experiments.get_args_parser()
    args = parser.parse_args(TINY[:TINY.index('--in_channels')] + ['--in_channels', '8', '--dim_int', '8'] +
                             TINY[TINY.index('--dim_int') + 2:] + ['--save', 'w.pkl'])
    args.embedding_dir = embeddings.DEFAULT_PATH  # the parser read the default before the patch
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = MNIST_experiments.main(args)
    finally:
        os.chdir(previous)
    assert status == 0
    warning, = [line for line in err.getvalue().splitlines() if line.startswith('WARNING')]
    assert warning.startswith('WARNING: this run does NOT start where the paper\'s runs started')
    assert 'python -m resnet_ode.embeddings --download' in warning and '--embedding_dir' in warning
    assert load_results(tmp_path / 'MNIST_experiments' / 'w.pkl')['protocol']['embedding'] == {
        'source': 'drawn', 'seed': 3}


@pytest.mark.slow
def test_a_run_from_another_working_directory_starts_where_the_paper_started(tmp_path, mnist_root, release_dir):
    """The default --embedding_dir is the repository's folder, whatever the working directory: a
    copy of the scripts with the release's files beside them, run from elsewhere, starts at
    87.46% test error as the stored runs did (93.55% from a drawn embedding)."""
    repo = tmp_path / 'repo'
    repo.mkdir()
    for path in REPO.glob('*.py'):
        shutil.copy(path, repo)
    shutil.copytree(REPO / 'resnet_ode', repo / 'resnet_ode', ignore=shutil.ignore_patterns('__pycache__'))
    (repo / 'MNIST_pretrained_models').symlink_to(release_dir)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    proc = __import__('subprocess').run(
        [sys.executable, str(repo / 'MNIST_experiments.py'), '--layers', '1', '--epochs', '0', '--seed', '0',
         '--data_root', mnist_root, '--save', 'e.pkl'], cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert 'loaded the release embedding' in proc.stdout and 'WARNING' not in proc.stderr
    results = load_results(elsewhere / 'MNIST_experiments' / 'e.pkl')
    assert round(float(results['test_classif'][0]), 4) == 0.8746


@pytest.mark.slow
def test_the_metrics_file_grows_while_the_run_goes(tmp_path):
    """Read mid-run (the run paused by SIGSTOP at its third step, in epoch 2): the header and the
    lines of epochs 0 and 1; at the end one line per epoch, equal to the pickle's curves."""
    import signal
    import subprocess
    argv = TINY + ['--epochs', '4', '--decay_steps', '2', '--embedding_dir', 'none', '--save', 'g.pkl']
    path = tmp_path / 'MNIST_experiments' / 'g.metrics.jsonl'
    env = dict(os.environ, RESNET_ODE_FAULT='step@3:SIGSTOP')
    process = start_process([sys.executable, str(REPO / 'MNIST_experiments.py'), *argv], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if open(f'/proc/{process.pid}/stat').read().split()[2] == 'T':
                break
            time.sleep(0.05)
        mid = [json.loads(line) for line in path.read_text().splitlines()]
        assert [line.get('epoch') for line in mid[1:]] == [0, 1]
        assert mid[2]['lr'] == 0.5 and mid[2]['train_loss'] > 0 and mid[0]['run'] == 'g.pkl'
    finally:
        process.send_signal(signal.SIGCONT)
        out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    header, *epochs = [json.loads(line) for line in path.read_text().splitlines()]
    assert header['protocol']['decay_steps'] == [2]
    assert [line['epoch'] for line in epochs] == [0, 1, 2, 3, 4]
    assert [line['lr'] for line in epochs] == [None, 0.5, 0.5, pytest.approx(0.05), pytest.approx(0.05)]
    results = load_results(tmp_path / 'MNIST_experiments' / 'g.pkl')
    assert [line['test_error'] for line in epochs] == pytest.approx(list(results['test_classif']))
    steps = 2  # 64 images in batches of 32
    assert [line['train_loss'] for line in epochs[1:]] == pytest.approx(
        [float(np.mean(results['train_loss'][e * steps:(e + 1) * steps])) for e in range(4)])
    assert 'epoch 3/4: lr 0.05, loss ' in out  # the log line shows them too


def test_evaluate_says_what_the_recorded_error_was_measured_on(tmp_path):
    status, _, err = _main(MNIST_experiments, TINY + ['--embedding_dir', 'none', '--save', 'v.pkl'], tmp_path)
    assert status == 0, err
    status, out, _ = _main(MNIST_experiments, ['--evaluate', tmp_path / 'MNIST_checkpoint' / 'v.pth',
                                               '--synthetic', '--subset', '64'], tmp_path)
    assert status == 0
    assert 'on 64 test images (checkpoint of epoch' in out and 'recorded' in out
    assert out.rstrip().endswith('on 64 synthetic test images)')
