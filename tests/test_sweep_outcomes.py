"""What a sweep reports, and what it refuses before it starts: runs held or finished by another
sweep, runs killed by a signal, absurd counts, bad flags after "--", files set aside."""
import json
import os
import pickle
import subprocess
import sys
import time

import pytest

import reproduce
from conftest import REPO, run_script, start_process

# Runs of a few seconds each: RKHS L=5 on 512 synthetic images.
QUICK = ['--', '--synthetic', '--subset', '512', '--epochs', '3']


def _sweep(tmp_path, *argv, env=None, process=False):
    return run_script('reproduce.py', 'figure1a', '--configs', 'RKHS_l5_p0', '--no_plot',
                      '--results_root', tmp_path, *argv, cwd=tmp_path, env=env, process=process)


@pytest.mark.slow
def test_two_sweeps_on_one_root_share_the_work_and_neither_fails(tmp_path):
    command = [sys.executable, str(REPO / 'reproduce.py'), 'figure1a', '--configs', 'RKHS_l5_p0',
               '--num_seeds', '2', '--no_plot', '--results_root', str(tmp_path), *QUICK[:-1], '12']
    first = start_process(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / 'MNIST_experiments' / 'fig1a' / 'logs' / 'RKHS_l5_p0_s0.log'
    deadline = time.time() + 120
    while not (log.exists() and 'epoch 0/' in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out, err = first.communicate(timeout=600)
    assert (first.returncode, second.returncode) == (0, 0), (err, second.stderr)
    assert 'running elsewhere' in second.stdout and 'FAILED' not in out + second.stdout
    folder = tmp_path / 'MNIST_experiments' / 'fig1a'
    assert sorted(p.name for p in folder.glob('*.pkl')) == ['RKHS_l5_p0_s0.pkl', 'RKHS_l5_p0_s1.pkl']
    for name in ('RKHS_l5_p0_s0', 'RKHS_l5_p0_s1'):  # one attempt each, its lines after its header
        text = (folder / 'logs' / f'{name}.log').read_text()
        assert text.count('# ---- attempt started') == 1 and f'results written to MNIST_experiments/fig1a/{name}.pkl' in text


def test_a_run_held_by_another_process_is_running_elsewhere_not_failed(tmp_path, monkeypatch):
    """The child's own refusal, read from its own attempt's lines of the log."""
    folder = tmp_path / 'MNIST_experiments' / 'fig1a'
    folder.mkdir(parents=True)
    import fcntl
    fd = os.open(folder / '.RKHS_l5_p0_s0.lock', os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a direct run of that --save holds
    try:
        proc = _sweep(tmp_path, '--num_seeds', '1', *QUICK)
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '1 run(s) are running in another process' in proc.stdout and 'FAILED' not in proc.stdout


@pytest.mark.slow
def test_a_run_killed_by_a_signal_is_reported_as_such_and_the_rerun_resumes_it(tmp_path):
    proc = _sweep(tmp_path, '--num_seeds', '1', *QUICK, env={'RESNET_ODE_FAULT': 'step@3'})  # the run dies, not the sweep
    assert proc.returncode == 1
    assert ('RKHS_l5_p0_s0: killed by SIGKILL; rerun the sweep to resume it from its last saved epoch; log: '
            in proc.stdout), proc.stdout
    again = _sweep(tmp_path, '--num_seeds', '1', *QUICK)
    assert again.returncode == 0 and '# resume RKHS_l5_p0_s0' in again.stdout, again.stdout + again.stderr


@pytest.mark.parametrize('flag, value', [('--num_seeds', '1000000000000'), ('--jobs', str(10 ** 22)),
                                         ('--per_gpu', '0'), ('--batch_seeds', str(10 ** 9))])
def test_absurd_counts_are_refused_in_one_line_before_anything_is_written(tmp_path, flag, value):
    proc = run_script('reproduce.py', 'figure1a', flag, value, '--results_root', tmp_path / 'root', cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == '' and 'Traceback' not in proc.stderr
    assert proc.stderr.count('\n') == 1 and proc.stderr.startswith(f'error: {flag} must be between 1 and ')
    assert not (tmp_path / 'root').exists()
    dry = run_script('reproduce.py', 'figure1a', flag, value, '--dry_run', cwd=tmp_path)
    assert dry.returncode == 2 and dry.stderr == proc.stderr


@pytest.mark.parametrize('passthrough, message', [
    (['--no_such_flag'], 'error: after "--", for MNIST_experiments.py: unrecognized arguments: --no_such_flag\n'),
    (['--epochs', 'many'], 'error: after "--", for MNIST_experiments.py: argument --epochs/-e: invalid int '
                           'value: \'many\'\n'),
    (['--epochs', '-1'], 'error: after "--", for MNIST_experiments.py: --epochs must be >= 0, got -1\n'),
    (['--lr_init', '1e300'], 'error: after "--", for MNIST_experiments.py: --lr_init 1e+300 is outside the range '
                             'of float32, the precision of the weights it scales (about 1.4e-45 to 3.403e+38)\n'),
])
def test_a_bad_flag_after_the_separator_gets_one_line_that_names_the_script(tmp_path, passthrough, message):
    proc = run_script('reproduce.py', 'figure1a', '--dry_run', '--', *passthrough, cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, '', message)


def test_dry_run_with_move_aside_shows_what_it_would_move_and_moves_nothing(tmp_path):
    folder = tmp_path / 'MNIST_experiments' / 'fig1a'
    folder.mkdir(parents=True)
    stale = REPO / 'results' / 'MNIST_experiments' / 'fig1a' / 'RKHS_l5_p0_s0.pkl'
    with open(stale, 'rb') as f:
        data = pickle.load(f)
    data['protocol'] = dict(data['protocol'], epochs=7)
    with open(folder / 'RKHS_l5_p0_s0.pkl', 'wb') as f:
        pickle.dump(data, f)
    (folder / 'RKHS_l5_p0_s0.metrics.jsonl').write_text('{}\n')
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*'))
    proc = _sweep(tmp_path, '--num_seeds', '1', '--dry_run', '--move_aside')
    assert proc.returncode == 0, proc.stderr
    moves = [line for line in proc.stdout.splitlines() if line.startswith('# would move')]
    assert [line.split()[3] for line in moves] == ['MNIST_experiments/fig1a/RKHS_l5_p0_s0.pkl',
                                                   'MNIST_experiments/fig1a/RKHS_l5_p0_s0.metrics.jsonl']
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*')) == before


def test_move_aside_takes_the_metrics_file_along(tmp_path):
    folder = tmp_path / 'MNIST_experiments' / 'fig1a'
    folder.mkdir(parents=True)
    with open(REPO / 'results' / 'MNIST_experiments' / 'fig1a' / 'RKHS_l5_p0_s0.pkl', 'rb') as f:
        data = pickle.load(f)
    data['protocol'] = dict(data['protocol'], epochs=7)
    with open(folder / 'RKHS_l5_p0_s1.pkl', 'wb') as f:
        pickle.dump(dict(data, seed=1), f)
    (folder / 'RKHS_l5_p0_s1.metrics.jsonl').write_text('{}\n')
    proc = _sweep(tmp_path, '--seed_start', '1', '--num_seeds', '1', '--move_aside', *QUICK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    aside = next(tmp_path.glob('set_aside_*'))
    assert (aside / 'MNIST_experiments' / 'fig1a' / 'RKHS_l5_p0_s1.metrics.jsonl').read_text() == '{}\n'
    assert json.loads((folder / 'RKHS_l5_p0_s1.metrics.jsonl').read_text().splitlines()[0])['seed'] == 1


def test_the_synthetic_sweep_prints_no_mnist_embedding_line(tmp_path):
    proc = run_script('reproduce.py', 'synthetic', '--configs', 'SHL_q2_r2', '--num_seeds', '1', '--no_plot',
                      '--results_root', tmp_path, '--', '--epochs', '5', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 'MNIST embedding' not in proc.stdout and '1 run(s) to do' in proc.stdout
    dry = run_script('reproduce.py', 'synthetic', '--dry_run', cwd=tmp_path)
    assert dry.returncode == 0 and 'MNIST embedding' not in dry.stdout


def test_parse_args_is_what_the_command_line_gives():
    args = reproduce.parse_args(['figure1a', '--num_seeds', '3', '--', '--epochs', '2'])
    assert (args.figure, args.num_seeds, args.passthrough) == ('figure1a', 3, ['--epochs', '2'])
