"""Signals and kills: an interrupted run stops cleanly, and --resume finishes it bit-identically.

SIGKILL, SIGINT and SIGTERM at chosen points (RESNET_ODE_FAULT), during training, pretraining,
data loading, or between the results pickles and the resume state's removal; --resume refuses
flags or seeds that are not the interrupted run's, in one line, its state untouched.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import MNIST_experiments
from conftest import BATCH, REPO, SINGLE, SMALL, folder_snapshot, load_results, run_script, start_process
from resnet_ode import faults, files

RUN = ['--synthetic', '--subset', '500', '--layers', '3', '--in_channels', '8', '--dim_int', '4',
       '--epochs', '3', '--batch_size', '100', '--lr_init', '0.5', '--seed', '5', '--save', 'r.pkl']
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


# --- killed or stopped anywhere, then resumed: the same run, bit for bit --------------------------

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


# --- SIGINT/SIGTERM during pretraining ------------------------------------------------------------

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


# --- a signal outside a training step -------------------------------------------------------------

@pytest.mark.parametrize('signal_name, status', [('SIGTERM', 143), ('SIGINT', 130)])
def test_a_signal_before_training_ends_the_run_at_once(tmp_path, signal_name, status):
    """The signal arrives while the run loads its data (fault point 'data'): it ends there, with
    one line, and leaves nothing (no resume state of a run that never trained)."""
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '2', '--seed', '0', '--save', 's.pkl',
                      cwd=tmp_path, env={faults.FAULT_ENV: f'data@1:{signal_name}'})
    assert proc.returncode == status, proc.stderr
    assert proc.stderr.strip() == (f'interrupted by {signal_name}: the run had not started training, '
                                   f'nothing of it was written; rerun the same command')
    assert folder_snapshot(tmp_path) == []


# --- killed between the pickles and the state's removal -------------------------------------------



@pytest.fixture(scope='module')
def batch_killed_after_first_pickle(tmp_path_factory):
    cwd = tmp_path_factory.mktemp('batch_killed')
    proc = run_script('MNIST_experiments.py', *BATCH, cwd=cwd, env={faults.FAULT_ENV: 'results@1'})
    assert proc.returncode == -9, proc.stderr
    return cwd


@pytest.mark.slow
def test_a_batch_killed_between_its_pickles_is_finished_by_resume(batch_killed_after_first_pickle,
                                                                  finished_references, tmp_path):
    cwd = _copy(batch_killed_after_first_pickle, tmp_path)
    results = cwd / 'MNIST_experiments'
    assert (results / 'm_s1.pkl').exists() and not (results / 'm_s2.pkl').exists()
    first_bytes = (results / 'm_s1.pkl').read_bytes()
    fresh = run_script('MNIST_experiments.py', *BATCH, cwd=cwd)  # a fresh start is refused...
    assert fresh.returncode == 2
    assert 'continue it with --resume, which writes the missing members' in _error_line(fresh.stderr)
    resumed = run_script('MNIST_experiments.py', '--synthetic', '--save', 'm.pkl', '--seeds', '1', '2',
                         '--resume', cwd=cwd)  # ...and --resume writes what is missing
    assert resumed.returncode == 0, resumed.stderr
    assert 'm_s1.pkl was written before the interruption: kept' in resumed.stdout
    assert (results / 'm_s1.pkl').read_bytes() == first_bytes
    _same_curves(results / 'm_s2.pkl', finished_references / 'm_s2.pkl')
    assert sorted(p.name for p in results.iterdir()) == ['m_s1.metrics.jsonl', 'm_s1.pkl',
                                                         'm_s2.metrics.jsonl', 'm_s2.pkl']


@pytest.fixture(scope='module')
def single_killed_after_its_pickle(tmp_path_factory):
    cwd = tmp_path_factory.mktemp('single_killed')
    proc = run_script('MNIST_experiments.py', *SINGLE, cwd=cwd, env={faults.FAULT_ENV: 'results@1'})
    assert proc.returncode == -9, proc.stderr
    assert sorted(p.name for p in (cwd / 'MNIST_experiments').iterdir()) == [
        '.x.lock', 'x.metrics.jsonl', 'x.pkl', 'x.resume.pt']
    return cwd


@pytest.mark.parametrize('resume', [False, True])
def test_the_state_and_lock_a_finished_run_left_are_cleaned_up(single_killed_after_its_pickle,
                                                               tmp_path, resume):
    cwd = _copy(single_killed_after_its_pickle, tmp_path)
    results = cwd / 'MNIST_experiments'
    pickle_bytes = (results / 'x.pkl').read_bytes()
    argv = ['--synthetic', '--save', 'x.pkl', '--resume'] if resume else SINGLE
    proc = run_script('MNIST_experiments.py', *argv, cwd=cwd)
    removed = (f'removed {os.path.join("MNIST_experiments", "x.resume.pt")}, which the finished run had '
               f'left behind')
    if resume:  # nothing left to do: exit 0, saying so
        assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
        assert '--resume: the run of --save x.pkl has finished; its results are in' in proc.stdout and removed in proc.stdout
    else:  # the results are still never overwritten
        assert proc.returncode == 2
        line = _error_line(proc.stderr)
        assert 'x.pkl exists; results are never overwritten' in line and removed in line
    assert sorted(p.name for p in results.iterdir()) == ['x.metrics.jsonl', 'x.pkl']
    assert (results / 'x.pkl').read_bytes() == pickle_bytes


def test_a_state_that_is_not_the_finished_runs_is_kept(single_killed_after_its_pickle, tmp_path):
    """A results file that did not come from the state beside it: the state is not deleted."""
    cwd = _copy(single_killed_after_its_pickle, tmp_path)
    results = cwd / 'MNIST_experiments'
    record = load_results(results / 'x.pkl')
    record['test_classif'] = record['test_classif'] + np.float32(0.01)
    files.save_pickle(record, str(results / 'x.pkl'))
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'x.pkl', '--resume', cwd=cwd)
    assert proc.returncode == 2 and 'x.pkl exists' in _error_line(proc.stderr)
    assert (results / 'x.resume.pt').exists()


# --- --resume without a state, or with flags that differ from the stored run ----------------------

def test_resume_without_state_is_an_error(tmp_path):
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'r.pkl', '--resume', cwd=tmp_path)
    assert proc.returncode == 2 and 'no resume state' in proc.stderr
    assert folder_snapshot(tmp_path) == []


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


# --- --resume finds an interrupted batch's state --------------------------------------------------



@pytest.mark.parametrize('seeds', [[], ['--seeds', '3', '5']])
def test_resume_without_the_batch_seeds_names_the_batch_state(interrupted_batch, tmp_path, monkeypatch,
                                                              capsys, seeds):
    cwd = _copy(interrupted_batch, tmp_path)
    monkeypatch.chdir(cwd)
    before = folder_snapshot(cwd)
    assert _main(['--synthetic', '--save', 'q.pkl', '--resume', *seeds]) == 2
    line = _error_line(capsys.readouterr().err)
    assert (f'{os.path.join("MNIST_experiments", "q_s3-5-7.batch-resume.pt")} holds the interrupted batch '
            f'of --save q.pkl --seeds 3 5 7: continue it with --seeds 3 5 7 --resume') in line
    assert 'delete' not in line
    assert folder_snapshot(cwd) == before


@pytest.mark.parametrize('command', [
    ['reproduce.py', 'figure1a', '--num_seeds', '20', '--dry_run'],   # 120 command lines
    ['-m', 'resnet_ode.embeddings', '--dir', 'empty'],                # 48 files, each "missing"
])
def test_a_reader_that_goes_away_ends_the_command_quietly_with_141(tmp_path, command):
    """`... | head`: the pipe is closed before the command writes; it ends with the status of a
    tool ended by SIGPIPE (128 + 13), no traceback, and nothing written."""
    (tmp_path / 'empty').mkdir()
    script = [str(REPO / command[0])] if command[0].endswith('.py') else command[:2]
    before = folder_snapshot(tmp_path)
    proc = start_process([sys.executable, *script, *command[len(script):]], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, 'PYTHONPATH': str(REPO)})
    proc.stdout.close()  # the reader is gone before the first line
    stderr = proc.stderr.read()
    assert (proc.wait(timeout=120), stderr) == (141, '')
    assert folder_snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_run_whose_reader_goes_away_keeps_its_saved_epoch_and_resumes(tmp_path):
    """`python MNIST_experiments.py ... | head -3`: the run stops at its next line, status 141,
    with the resume state of epoch 0, and --resume finishes it."""
    proc = start_process([sys.executable, REPO / 'MNIST_experiments.py', *RUN], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    head = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert head[2].startswith('epoch 0/3: ') and proc.wait(timeout=120) == 141
    assert 'Traceback' not in stderr and (tmp_path / 'MNIST_experiments' / 'r.resume.pt').is_file()
    resumed = run_script('MNIST_experiments.py', *RUN, '--resume', cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert load_results(tmp_path / 'MNIST_experiments' / 'r.pkl')['train_loss'].shape == (15,)


def test_a_broken_pipe_other_than_stdout_is_an_error_with_its_traceback():
    """Only a reader of stdout that went away ends the command quietly with 141; any other
    BrokenPipeError inside a command is raised as it was."""
    from resnet_ode.errors import run_command

    def main(_args):
        raise BrokenPipeError(32, 'Broken pipe', 'some other pipe')
    with pytest.raises(BrokenPipeError, match='some other pipe'):
        run_command(main, lambda: None)
