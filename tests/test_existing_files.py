"""The rules about files already there: a run's metrics file is claimed like its pickle and
checkpoint, and --resume of a run that has finished says where its results are."""
import os

from conftest import folder_snapshot, run_script

SMALL = ['--synthetic', '--subset', '64', '--layers', '1', '--in_channels', '4', '--dim_int', '4',
         '--batch_size', '32', '--seed', '0']


def test_a_folder_where_the_metrics_go_is_refused_before_any_work(tmp_path):
    metrics = tmp_path / 'MNIST_experiments' / 'm.metrics.jsonl'
    metrics.mkdir(parents=True)
    before = folder_snapshot(tmp_path)
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '2', '--save', 'm.pkl', cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr == ('error: MNIST_experiments/m.metrics.jsonl is not a regular file, and this run writes '
                           'its metrics there; move it away\n')
    assert folder_snapshot(tmp_path) == before  # no resume state, no checkpoint


def test_a_foreign_metrics_file_is_never_overwritten(tmp_path):
    metrics = tmp_path / 'MNIST_experiments' / 'm.metrics.jsonl'
    metrics.parent.mkdir()
    metrics.write_text('another run\'s metrics\n')
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '1', '--save', 'm.pkl', cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == ('error: MNIST_experiments/m.metrics.jsonl exists and belongs to another run (the '
                           'metrics of a run of this --save); choose another --save or move the file\n')
    assert metrics.read_text() == 'another run\'s metrics\n'


def test_resume_with_a_folder_where_the_metrics_go_is_refused_before_any_work(tmp_path):
    stopped = run_script('MNIST_experiments.py', *SMALL, '--epochs', '2', '--save', 'm.pkl', cwd=tmp_path,
                         env={'RESNET_ODE_FAULT': 'step@3:SIGTERM'})
    assert stopped.returncode == 143, stopped.stderr
    metrics = tmp_path / 'MNIST_experiments' / 'm.metrics.jsonl'
    metrics.unlink()
    metrics.mkdir()
    state = tmp_path / 'MNIST_experiments' / 'm.resume.pt'
    before = state.read_bytes()
    proc = run_script('MNIST_experiments.py', '--save', 'm.pkl', '--resume', '--synthetic', cwd=tmp_path)
    assert proc.returncode == 2 and 'is not a regular file, and this run writes its metrics there' in proc.stderr
    assert state.read_bytes() == before
    metrics.rmdir()
    proc = run_script('MNIST_experiments.py', '--save', 'm.pkl', '--resume', '--synthetic', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_resume_of_a_finished_run_says_where_its_results_are(tmp_path):
    done = run_script('MNIST_experiments.py', *SMALL, '--epochs', '1', '--save', 'f.pkl', cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    before = folder_snapshot(tmp_path)
    proc = run_script('MNIST_experiments.py', '--save', 'f.pkl', '--resume', '--synthetic', cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, '')
    assert proc.stdout == ('--resume: the run of --save f.pkl has finished; its results are in '
                           'MNIST_experiments/f.pkl\n')
    assert folder_snapshot(tmp_path) == before
    again = run_script('MNIST_experiments.py', *SMALL, '--epochs', '1', '--save', 'f.pkl', cwd=tmp_path)
    assert again.returncode == 2 and 'results are never overwritten' in again.stderr  # a new run is refused


def test_resume_of_a_finished_batch_says_where_each_result_is(tmp_path):
    argv = [arg for arg in SMALL if arg not in ('--seed', '0')]
    done = run_script('MNIST_experiments.py', *argv, '--epochs', '1', '--seeds', '3', '4', '--save', 'b.pkl',
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    proc = run_script('MNIST_experiments.py', '--save', 'b.pkl', '--seeds', '3', '4', '--resume', '--synthetic',
                      cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == (
        '--resume: the run of --save b.pkl has finished; its results are in MNIST_experiments/b_s3.pkl, '
        'MNIST_experiments/b_s4.pkl\n')
    assert os.path.exists(tmp_path / 'MNIST_checkpoint' / 'b_s4.pth')
