"""A run's files are claimed, locked and written safely, and a failed write is one line.

One run per --save and per checkpoint, a checkpoint that may not replace a results file or a
resume state, a batch's state that cannot collide with a single run's; an unwritable folder is
refused before any work, and a full disk or a read-only folder mid-run leaves a state to resume.
"""
import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import MNIST_experiments
import reproduce
from conftest import REPO, SINGLE, SMALL, folder_snapshot, load_results, run_script, start_process
from resnet_ode import errors, faults, figure_grid, gate, mnist, run_files, sweep

CURVES = ('train_loss', 'train_classif', 'test_classif')


def _one_line_error(proc):
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith('warning:')]
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    return lines[0]


def _error_line(stderr: str) -> str:
    """The single 'error: ...' line of stderr (warnings aside), with no traceback."""
    assert 'Traceback' not in stderr, stderr
    lines = [line for line in stderr.splitlines() if not line.startswith('warning:')]
    assert len(lines) == 1 and lines[0].startswith('error: '), stderr
    return lines[0]


def _main(argv, script=MNIST_experiments) -> int:
    """The script's main, in this process, as its command line would call it."""
    return script.main(script.get_args_parser().parse_args([str(a) for a in argv]))


def _copy(template, tmp_path):
    target = tmp_path / 'run'
    shutil.copytree(template, target, symlinks=True)
    return target


def _same_curves(path, reference_path):
    done, expected = load_results(path), load_results(reference_path)
    for key in CURVES:
        np.testing.assert_array_equal(done[key], expected[key], err_msg=key)


@contextlib.contextmanager
def _held_lock(path):
    """Another process's lock on `path`, as a running run holds it (created with its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(holder)


# --- two runs with the same --save at once --------------------------------------------------------

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


# --- checkpoint paths are claimed too -------------------------------------------------------------

def test_existing_checkpoint_of_another_run_is_not_overwritten(tmp_path):
    folder = tmp_path / 'MNIST_checkpoint'
    folder.mkdir()
    (folder / 'mine.pth').write_bytes(b'another run')
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'other.pkl',
                      '--checkpoint', 'MNIST_checkpoint/mine.pth', cwd=tmp_path)
    assert proc.returncode == 2
    assert (folder / 'mine.pth').read_bytes() == b'another run'
    assert not (tmp_path / 'MNIST_experiments').exists()


def _start_long_run(cwd, *extra):
    """A run that trains for a long time, and the path of its resume state once it exists."""
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE')}
    proc = start_process([sys.executable, str(REPO / 'MNIST_experiments.py'), *SMALL, '--subset', '2048',
                             '--epochs', '1000', '--seed', '1', *extra], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


def _wait_for(path, proc, seconds=180):
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert path.exists(), 'the first run never saved its state'


@pytest.mark.slow
def test_the_same_save_in_another_results_dir_is_refused_at_once(tmp_path):
    first = _start_long_run(tmp_path, '--results_dir', 'A', '--save', 'x.pkl')
    try:
        _wait_for(tmp_path / 'A' / 'x.resume.pt', first)
        second = run_script('MNIST_experiments.py', *SMALL, '--epochs', '1', '--seed', '2',
                            '--results_dir', 'B', '--save', 'x.pkl', cwd=tmp_path)
        assert second.returncode == 2
        line = _error_line(second.stderr)
        assert 'another process is running checkpoint MNIST_checkpoint/x.pth' in line, line
        assert 'choose another --checkpoint' in line
    finally:
        first.terminate()
        first.wait(timeout=120)
    assert first.returncode == 143
    assert not (tmp_path / 'B').exists()  # the refused run left nothing
    assert torch.load(tmp_path / 'MNIST_checkpoint' / 'x.pth', weights_only=True)['args']['results_dir'] == 'A'


@pytest.mark.parametrize('checkpoint, text', [
    ('MNIST_experiments/c.pkl', 'may not end in .pkl'),                # its own results file
    ('MNIST_experiments/c.resume.pt', 'may not end in .pkl, .resume.pt'),  # its own resume state
    ('A/other.pkl', 'may not end in .pkl'),                            # another run's results file
    ('MNIST_experiments/q_s1-2.batch-resume.pt', '.batch-resume.pt'),   # a batch's resume state
    ('newdir/', 'must name a file'),                                   # a folder-like path
    ('existing_folder', 'must name a file'),
])
def test_a_checkpoint_that_could_replace_a_results_file_or_state_is_refused(tmp_path, monkeypatch,
                                                                             capsys, checkpoint, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'A').mkdir()
    (tmp_path / 'A' / 'other.pkl').write_bytes(b'another run\'s results')
    (tmp_path / 'existing_folder').mkdir()
    before = folder_snapshot(tmp_path)
    assert _main([*SMALL, '--epochs', '1', '--seed', '0', '--save', 'c.pkl', '--checkpoint', checkpoint]) == 2
    assert text in _error_line(capsys.readouterr().err)
    assert folder_snapshot(tmp_path) == before
    assert (tmp_path / 'A' / 'other.pkl').read_bytes() == b'another run\'s results'


def test_a_held_checkpoint_lock_refuses_the_run(tmp_path, monkeypatch, capsys):
    """The lock beside the checkpoint is taken, whatever --save says."""
    monkeypatch.chdir(tmp_path)
    with _held_lock(tmp_path / 'ck' / '.shared.pth.lock'):
        assert _main([*SMALL, '--epochs', '0', '--seed', '0', '--save', 'own.pkl',
                      '--checkpoint', 'ck/shared.pth']) == 2
    assert 'another process is running checkpoint ck/shared.pth' in _error_line(capsys.readouterr().err)
    assert not (tmp_path / 'MNIST_experiments').exists()


def test_a_folder_at_the_lock_path_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'MNIST_experiments' / '.k.lock').mkdir(parents=True)
    assert _main([*SMALL, '--epochs', '0', '--seed', '0', '--save', 'k.pkl']) == 2
    line = _error_line(capsys.readouterr().err)
    assert line == (f'error: --save: cannot lock {os.path.join("MNIST_experiments", ".k.lock")}: a folder is '
                    f'there, where this run keeps its lock file; move it away')
    assert folder_snapshot(tmp_path) == ['MNIST_experiments', 'MNIST_experiments/.k.lock']


# --- a batch's state cannot collide with a single run's, and is locked ----------------------------



def test_a_single_run_named_like_the_batch_state_leaves_it_alone(interrupted_batch, tmp_path):
    cwd = _copy(interrupted_batch, tmp_path)
    state = cwd / 'MNIST_experiments' / 'q_s3-5-7.batch-resume.pt'
    before = state.read_bytes()
    single = run_script('MNIST_experiments.py', *SMALL, '--epochs', '1', '--seed', '3',
                        '--save', 'q_s3-5-7.pkl', cwd=cwd)
    assert single.returncode == 0, single.stderr
    assert state.read_bytes() == before
    resumed = run_script('MNIST_experiments.py', '--synthetic', '--save', 'q.pkl', '--seeds', '3', '5', '7',
                         '--resume', cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in (cwd / 'MNIST_experiments').iterdir()) == [
        'q_s3-5-7.metrics.jsonl', 'q_s3-5-7.pkl', 'q_s3.metrics.jsonl', 'q_s3.pkl',
        'q_s5.metrics.jsonl', 'q_s5.pkl', 'q_s7.metrics.jsonl', 'q_s7.pkl']


def test_the_batch_state_is_locked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with _held_lock(tmp_path / 'MNIST_experiments' / '.q_s3-5.batch-resume.pt.lock'):
        assert _main([*SMALL, '--epochs', '0', '--seeds', '3', '5', '--save', 'q.pkl']) == 2
    assert 'another process is running --save q.pkl --seeds 3 5' in _error_line(capsys.readouterr().err)


def test_state_names_stay_short_and_reproduce_computes_the_same_name():
    assert gate.resume_state_name('q', [3, 5, 7]) == 'q_s3-5-7.batch-resume.pt'
    assert gate.resume_state_name('q', list(range(100))) == 'q_s0to99.batch-resume.pt'
    assert gate.resume_state_name('q') == 'q.resume.pt'
    for seeds in ([3, 5, 7], [0, 1], [5, 3], list(range(100)), [1, 2, 3, 9, 20, 21, 22, 23]):
        assert gate.parse_seed_list_text(gate.seed_list_text(seeds)) == seeds
    args = reproduce.parse_args(['figure1a', '--num_seeds', '20', '--batch_seeds', '20', '--dry_run'])
    for seeds in ([0], list(range(20))):
        run = sweep.make_run('figure1a', figure_grid.figure_grid('figure1a')[0], seeds, args)
        config = gate.validate(mnist.RULES, run.args, gate.SWEEP)
        assert run.resume_state == run_files.resume_path(config)


def test_a_hundred_consecutive_seeds_pass_and_a_long_seed_list_is_refused_up_front(capsys):
    many = MNIST_experiments.get_args_parser().parse_args([*SMALL, '--save', 'q.pkl', '--seeds', *map(str, range(100))])
    gate.validate(mnist.RULES, many)  # 'q_s0to99.batch-resume.pt': no ceiling at 75 seeds
    scattered = [str(10 ** 15 + 7 * k) for k in range(20)]
    assert _main([*SMALL, '--save', 'q.pkl', '--seeds', *scattered]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: --seeds: the name of the batch's resume state") and 'too long' in line


# --- an unwritable folder, refused before any work ------------------------------------------------

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


# --- a full disk or a read-only folder mid-run ----------------------------------------------------



@pytest.mark.parametrize('fault, failed, state_left', [
    ('write-state@2:ENOSPC', 'x.resume.pt', True),   # the state after epoch 1: the disk is full
    ('write-results@1:EROFS', 'x.pkl', True),        # the results pickle: the folder became read-only
    ('write-state@1:ENOSPC', 'x.resume.pt', False),  # the very first write: nothing saved yet
])
def test_a_write_that_fails_mid_run_is_one_line_and_resume_finishes(tmp_path, finished_references,
                                                                    fault, failed, state_left):
    proc = run_script('MNIST_experiments.py', *SINGLE, cwd=tmp_path, env={faults.FAULT_ENV: fault})
    assert proc.returncode == errors.EXIT_WRITE_FAILED == 4, proc.stderr
    line = _error_line(proc.stderr)
    path = os.path.join('MNIST_experiments', failed)
    reason = ('No space left on device: the disk is full' if 'ENOSPC' in fault else
              'Read-only file system: the folder is read-only or not writable')
    assert line.startswith(f'error: cannot write {path} ({reason}); '), line
    results = tmp_path / 'MNIST_experiments'
    left = folder_snapshot(tmp_path)
    assert 'MNIST_experiments/.x.lock' not in left  # the lock is released, its file removed
    assert not [name for name in left if name.endswith('.tmp')]
    if not state_left:
        assert [name for name in left if '.' in name] == []  # no file at all
        assert line.endswith('nothing of the run was saved yet: make room (or the folder writable) and '
                             'rerun the same command')
        return
    assert line.endswith(f'the run so far is saved in {os.path.join("MNIST_experiments", "x.resume.pt")}: '
                         f'make room (or the folder writable again) and continue with --resume')
    resumed = run_script('MNIST_experiments.py', '--synthetic', '--save', 'x.pkl', '--resume', cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _same_curves(results / 'x.pkl', finished_references / 'x.pkl')


def test_write_failures_name_their_errno():
    assert errors.describe_write_error(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))).endswith('the disk is full')
    assert errors.describe_write_error(OSError(errno.EACCES, 'Permission denied')) == (
        'Permission denied: the folder is read-only or not writable')
