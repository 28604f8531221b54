"""Reliability, round 2: what a careful user or a hostile input found, one theme per section.
Each test failed on the code before the fix it covers."""
import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import plot_figures
from conftest import REPO, folder_snapshot, load_results, run_script, start_process
from resnet_ode import files, safe_pickle

SMALL = ['--synthetic', '--subset', '256', '--layers', '2', '--in_channels', '4', '--dim_int', '4',
         '--batch_size', '64', '--embedding_dir', 'none']


def _one_line_error(proc):
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith('warning:')]
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    return lines[0]


# --- 1. two runs with the same --save at once ----------------------------------------------------

@pytest.mark.slow
def test_two_runs_with_the_same_save_one_wins_and_nothing_is_lost(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE')}
    procs = {seed: start_process([sys.executable, str(REPO / 'MNIST_experiments.py'), *SMALL,
                                     '--epochs', '3', '--seed', str(seed), '--save', 'race.pkl'],
                                    cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
             for seed in (1, 2)}
    outcomes = {seed: (proc.wait(timeout=300), proc.stderr.read()) for seed, proc in procs.items()}
    statuses = sorted(status for status, _ in outcomes.values())
    assert statuses == [0, 2], outcomes
    winner = next(seed for seed, (status, _) in outcomes.items() if status == 0)
    loser_err = next(err for status, err in outcomes.values() if status == 2)
    assert len([line for line in loser_err.splitlines() if line.startswith('error:')]) == 1
    results = load_results(tmp_path / 'MNIST_experiments' / 'race.pkl')
    assert results['seed'] == winner and results['test_classif'].shape == (4,)
    checkpoint = torch.load(tmp_path / 'MNIST_checkpoint' / 'race.pth', weights_only=True)
    assert checkpoint['args']['seed'] == winner
    assert folder_snapshot(tmp_path) == ['MNIST_checkpoint', 'MNIST_checkpoint/race.pth',
                                         'MNIST_experiments', 'MNIST_experiments/race.metrics.jsonl',
                                         'MNIST_experiments/race.pkl']
    header = json.loads((tmp_path / 'MNIST_experiments' / 'race.metrics.jsonl').read_text().splitlines()[0])
    assert header['seed'] == winner


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_holds_the_save(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE')}
    first = start_process([sys.executable, str(REPO / 'MNIST_experiments.py'), *SMALL,
                              '--subset', '2048', '--epochs', '1000', '--seed', '1', '--save', 'held.pkl'],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        resume = tmp_path / 'MNIST_experiments' / 'held.resume.pt'
        deadline = time.time() + 120
        while not resume.exists() and time.time() < deadline:  # the first one is training
            time.sleep(0.2)
        assert resume.exists()
        for extra in ([], ['--resume']):  # neither a fresh start nor a resume may cut in
            second = run_script('MNIST_experiments.py', *SMALL, '--epochs', '30', '--seed', '2',
                                '--save', 'held.pkl', *extra, cwd=tmp_path)
            assert second.returncode == 2
            assert 'another process is running --save held.pkl' in _one_line_error(second)
    finally:
        first.terminate()
        first.wait(timeout=120)
    assert first.returncode == 143  # stopped cleanly, its resume state saved
    assert load_results_or_none(tmp_path / 'MNIST_experiments' / 'held.pkl') is None
    assert torch.load(resume, weights_only=True)['args']['seed'] == 1


def load_results_or_none(path):
    return load_results(path) if os.path.exists(path) else None


# --- 2. --resume refuses flags that differ from the stored run -----------------------------------

@pytest.fixture
def interrupted_run(tmp_path):
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '2', '--seed', '3', '--save', 'x.pkl',
                      cwd=tmp_path, env={'RESNET_ODE_FAULT': 'step@3:SIGTERM'})
    assert proc.returncode == 143, proc.stderr
    return tmp_path


@pytest.mark.parametrize('flags, named', [
    (['--layers', '5', '--lr_init', '0.1'], ['--layers 5 (the run has 2)', '--lr_init 0.1 (the run has 0.5)']),
    (['--lay', '5'], ['--layers 5 (the run has 2)']),                 # an abbreviation counts
    (['-l', '20'], ['--layers 20 (the run has 2)']),                  # so does a short alias
    (['--model', 'SHL', '--epochs', '4'], ['--epochs 4 (the run has 2)', '--model SHL (the run has RKHS)']),
])
def test_resume_refuses_flags_that_differ_from_the_run(interrupted_run, flags, named):
    state = interrupted_run / 'MNIST_experiments' / 'x.resume.pt'
    before = state.read_bytes()
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'x.pkl', '--resume', *flags,
                      cwd=interrupted_run)
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert all(text in line for text in named), line
    assert state.read_bytes() == before


def test_resume_accepts_the_runs_own_values_and_where_it_runs(interrupted_run):
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'x.pkl', '--resume',
                      '--layers', '2', '--seed', '3', '--device', 'cpu', '--test_batch_size', '7',
                      cwd=interrupted_run)
    assert proc.returncode == 0, proc.stderr
    assert load_results(interrupted_run / 'MNIST_experiments' / 'x.pkl')['num_layers'] == 2


# --- 4. no tracebacks after start; nothing left behind -------------------------------------------

def _write_mnist(raw, bad_label=None, bad_magic=False):
    """Files of the right sizes in the idx format; zeros, with a chosen defect."""
    raw.mkdir(parents=True)
    for name, header in (('train-images-idx3-ubyte', (2051, 60000, 28, 28)),
                         ('train-labels-idx1-ubyte', (2049, 60000)),
                         ('t10k-images-idx3-ubyte', (2051, 10000, 28, 28)),
                         ('t10k-labels-idx1-ubyte', (2049, 10000))):
        if bad_magic and name.startswith('t10k-images'):
            header = (2049, *header[1:])
        body = bytearray(np.prod(header[1:]))
        if bad_label is not None and name == 'train-labels-idx1-ubyte':
            body[123] = bad_label
        (raw / name).write_bytes(b''.join(v.to_bytes(4, 'big') for v in header) + bytes(body))


def test_a_label_outside_0_to_9_is_named(tmp_path):
    _write_mnist(tmp_path / 'data' / 'MNIST' / 'raw', bad_label=12)
    proc = run_script('MNIST_experiments.py', '--data_root', 'data', '--epochs', '1', '--save', 'l.pkl',
                      cwd=tmp_path)
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert 'train-labels-idx1-ubyte holds label 12 at image 123, outside 0..9' in line
    assert [p for p in folder_snapshot(tmp_path) if not p.startswith('data')] == []


def test_a_corrupt_header_is_named_as_such(tmp_path):
    _write_mnist(tmp_path / 'data' / 'MNIST' / 'raw', bad_magic=True)
    proc = run_script('MNIST_experiments.py', '--data_root', 'data', '--save', 'h.pkl', cwd=tmp_path)
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert 't10k-images-idx3-ubyte has a corrupt header (2049 10000 28 28, expected 2051' in line
    assert not (tmp_path / 'MNIST_experiments').exists()


@pytest.mark.parametrize('flags', [
    ['--save', 'a' * 240 + '.pkl'],
    ['--save', 'ok.pkl', '--checkpoint', 'ckpt/' + 'c' * 250 + '.pth'],
])
def test_names_the_file_system_cannot_hold_are_refused_at_start(tmp_path, flags):
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '1', *flags, cwd=tmp_path)
    assert proc.returncode == 2 and 'too long' in _one_line_error(proc)
    assert folder_snapshot(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs Linux /proc')
@pytest.mark.parametrize('flags, flag', [
    (['--results_dir', '/proc/no_such_folder'], '--results_dir'),
    (['--checkpoint', '/proc/no_such_folder/x.pth'], '--checkpoint'),
])
def test_an_unwritable_folder_is_refused_before_any_work(tmp_path, flags, flag):
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '1', '--save', 'p.pkl', *flags,
                      cwd=tmp_path)
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert line.startswith(f'error: {flag} ')  # as root: cannot write in it; else: not writable
    assert folder_snapshot(tmp_path) == []  # no results folder, no stale resume state
    again = run_script('MNIST_experiments.py', *SMALL, '--epochs', '0', '--save', 'p.pkl', cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # nothing blocks the corrected rerun


# --- 5. SIGINT/SIGTERM during pretraining ---------------------------------------------------------

@pytest.mark.parametrize('signal_name, status', [('SIGTERM', 143), ('SIGINT', 130)])
def test_interrupted_pretraining_says_what_was_lost_and_leaves_nothing(tmp_path, signal_name, status):
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '1', '--pretrain', '2',
                      '--save', 'p.pkl', cwd=tmp_path,
                      env={'RESNET_ODE_FAULT': f'pretraining@3:{signal_name}'})
    assert proc.returncode == status, proc.stderr
    assert f'interrupted by {signal_name} during pretraining pass 1: nothing was saved' in proc.stdout
    assert 'Traceback' not in proc.stderr
    assert folder_snapshot(tmp_path) == []
    rerun = run_script('MNIST_experiments.py', *SMALL, '--epochs', '0', '--pretrain', '1',
                       '--save', 'p.pkl', cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr


# --- 6. results pickles are read without running code --------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def _good_run(seed):
    rng = np.random.default_rng(seed)
    return {'model': 'RKHS', 'num_layers': 5, 'in_channels': 32, 'dim_int': 32, 'pretrain_pass': 0,
            'batch_size': 256, 'train_loss': rng.random(400).astype(np.float32) + 0.1,
            'train_classif': np.linspace(0.9, 0.1, 5, dtype=np.float32),
            'test_classif': np.linspace(0.9, 0.1, 5, dtype=np.float32) + np.float32(0.01 * seed),
            'computation_time': 12.5, 'num_parameters': 55296}


def test_plotting_skips_a_crafted_pickle_and_plots_the_rest(tmp_path, capsys):
    folder = tmp_path / 'MNIST_experiments'
    folder.mkdir()
    for seed in (0, 1):
        with open(folder / f'good{seed}.pkl', 'wb') as f:
            pickle.dump(_good_run(seed), f)
    marker = tmp_path / 'pwned'
    with open(folder / 'evil.pkl', 'wb') as f:
        pickle.dump({'model': 'RKHS', 'evil': _RunsCode(str(marker))}, f)
    status = plot_figures.main(plot_figures.get_args_parser().parse_args(
        [str(folder), '--figure', '1a', '--out_dir', str(tmp_path / 'figures')]))
    captured = capsys.readouterr()
    assert status == 0 and not marker.exists()
    assert f'skipping {folder / "evil.pkl"}: refused to unpickle it' in captured.err
    assert 'it asks for io.open' in captured.err
    assert (tmp_path / 'figures' / 'figure1a.png').stat().st_size > 10_000
    assert 'loaded 2 run(s)' in captured.out


def _as_numpy1_pickle(obj, protocol):
    """The same bytes numpy 1 would have written: its module was numpy.core, not numpy._core."""
    data = pickle.dumps(obj, protocol=protocol)
    if protocol == 3:  # GLOBAL opcodes: text lines
        return data.replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n')
    old, new = b'\x8c\x16numpy._core.multiarray', b'\x8c\x15numpy.core.multiarray'
    count = data.count(old)
    data = data.replace(old, new)
    assert data[2:3] == b'\x95'  # one FRAME; its length shrinks by a byte per replacement
    length = int.from_bytes(data[3:11], 'little') - count
    return data[:3] + length.to_bytes(8, 'little') + data[11:]


@pytest.mark.parametrize('protocol', [3, 4])
def test_release_style_pickles_load(tmp_path, protocol):
    """The release wrote dicts of str, int, float and numpy arrays (tensor.numpy()) with numpy 1
    and Python's default protocol; those globals, and only those, are allowed."""
    run = _good_run(3)
    path = tmp_path / 'release.pkl'
    path.write_bytes(_as_numpy1_pickle(run, protocol))
    assert b'numpy.core.multiarray' in path.read_bytes()
    loaded = safe_pickle.load_results(str(path))
    assert loaded.keys() == run.keys()
    np.testing.assert_array_equal(loaded['train_loss'], run['train_loss'])
    assert loaded['train_loss'].dtype == np.float32


def test_project_pickles_load_and_anything_else_is_refused(tmp_path):
    path = tmp_path / 'x.pkl'
    files.save_pickle({'a': np.arange(3, dtype=np.float32), 'b': np.float64(2.5), 'c': [1, None]}, str(path))
    loaded = safe_pickle.load_results(str(path))
    assert loaded['b'] == 2.5 and loaded['c'] == [1, None]
    for evil in (_RunsCode(str(tmp_path / 'm')), {'f': os.system}, np.save):
        path.write_bytes(pickle.dumps(evil))
        with pytest.raises(safe_pickle.UnsafePickle):
            safe_pickle.load_results(str(path))
    assert not (tmp_path / 'm').exists()


# --- 7. messages that say what is wrong with which file ------------------------------------------

def test_a_corrupt_resume_state_is_called_corrupt(interrupted_run):
    state = interrupted_run / 'MNIST_experiments' / 'x.resume.pt'
    state.write_bytes(state.read_bytes()[:2000])
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'x.pkl', '--resume',
                      cwd=interrupted_run)
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert f'resume state {os.path.join("MNIST_experiments", "x.resume.pt")} is truncated or corrupt' in line
    assert 'refusing' not in line


def test_evaluate_on_a_results_pickle_says_so_in_one_line(tmp_path):
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '0', '--seed', '1', '--save', 'r.pkl',
                      cwd=tmp_path)
    assert proc.returncode == 0
    proc = run_script('MNIST_experiments.py', '--evaluate', 'MNIST_experiments/r.pkl', '--synthetic',
                      cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == ('error: checkpoint MNIST_experiments/r.pkl is not a torch.save file '
                           '(a plain pickle, such as a results file)\n')


# --- 8. a failed download removes every folder it created ----------------------------------------

def test_failed_download_removes_the_parent_folders_it_created(tmp_path):
    proc = run_script('MNIST_experiments.py', '--data_root', 'a/b/c', '--epochs', '0', '--save', 'x.pkl',
                      cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and 'could not be downloaded' in _one_line_error(proc)
    assert folder_snapshot(tmp_path) == []


# --- 9. values that were accepted in silence -----------------------------------------------------

@pytest.mark.parametrize('flags, text', [
    (['--decay_steps', '0'], 'a decay at 0 would act before training'),
    (['--decay_steps', '5', '5'], 'lists epoch 5 more than once'),
    (['--subset', '60001'], '--subset 60001 is more than the 60,000 training images'),
    (['--save', 'two\nlines.pkl'], 'no control characters'),
])
def test_meaningless_values_are_refused(tmp_path, flags, text):
    proc = run_script('MNIST_experiments.py', '--synthetic', '--epochs', '1', '--save', 'v.pkl', *flags,
                      cwd=tmp_path)
    assert proc.returncode == 2 and text in _one_line_error(proc)
    assert folder_snapshot(tmp_path) == []


def test_a_decay_after_the_last_epoch_is_warned_about_once(tmp_path):
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '1', '--decay_steps', '1', '3',
                      '--seed', '0', '--save', 'w.pkl', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith('warning:')]
    assert warnings == ['warning: --decay_steps 1 3 at or after --epochs 1: those decays never happen']
    assert load_results(tmp_path / 'MNIST_experiments' / 'w.pkl')['lr_init'] == 0.5
