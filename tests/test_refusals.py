"""Bad input is refused up front: one line on stderr, exit status 2, nothing written.

Malformed flags, names the file system cannot hold, values that mean nothing, numbers beyond
float32 or memory, flags --evaluate would ignore. In-process runs (MNIST_experiments.main) where
only the outcome matters; real processes where the exit status and the one stderr line are tested.
"""

import pytest
import torch

import CIFAR_experiments
import MNIST_experiments
from conftest import SMALL, folder_snapshot, load_results, run_script


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


# --- malformed command lines, and names the file system cannot hold -------------------------------

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


@pytest.mark.parametrize('flags', [
    ['--save', 'a' * 240 + '.pkl'],
    ['--save', 'ok.pkl', '--checkpoint', 'ckpt/' + 'c' * 250 + '.pth'],
])
def test_names_the_file_system_cannot_hold_are_refused_at_start(tmp_path, flags):
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '1', *flags, cwd=tmp_path)
    assert proc.returncode == 2 and 'too long' in _one_line_error(proc)
    assert folder_snapshot(tmp_path) == []


def test_the_save_length_limit_counts_bytes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _main([*SMALL, '--epochs', '0', '--seed', '0', '--save', '€' * 80 + '.pkl']) == 2
    line = _error_line(capsys.readouterr().err)
    assert 'is too long (244 bytes;' in line, line  # 84 characters, 80 of them 3 bytes each
    assert folder_snapshot(tmp_path) == []


# --- values that were accepted in silence ---------------------------------------------------------

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


# --- absurd numbers: refused up front -------------------------------------------------------------

@pytest.mark.parametrize('flags', [['--lr_init', '1e39'], ['--decay_rate', '1e308'], ['--lr_init', '1e-46'],
                                   ['--pretrain_lr', '1e39']])
def test_rates_beyond_float32_are_refused_up_front(tmp_path, monkeypatch, capsys, flags):
    monkeypatch.chdir(tmp_path)
    assert _main([*SMALL, '--epochs', '1', '--seed', '0', '--save', 'f.pkl', *flags]) == 2
    assert 'is outside the range of float32' in _error_line(capsys.readouterr().err)
    assert folder_snapshot(tmp_path) == []


@pytest.mark.parametrize('script', ['MNIST_experiments.py', 'CIFAR_experiments.py'])
def test_a_network_that_cannot_fit_in_memory_is_refused_in_one_line(tmp_path, script):
    proc = run_script(script, '--synthetic', '--layers', '100000000', '--epochs', '1', '--save', 'big.pkl',
                      cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert line.startswith('error: --layers 100000000') and 'more than this machine\'s memory' in line
    assert folder_snapshot(tmp_path) == []


# --- --evaluate refuses the flags it ignores; devices that do not exist ---------------------------

@pytest.mark.parametrize('flags, named', [
    (['--layers', '5'], '--layers'), (['--model', 'SHL'], '--model'), (['--seeds', '1', '2'], '--seeds'),
    (['--layers', '5', '--lr_init', '0.1'], '--layers, --lr_init'),
])
def test_evaluate_refuses_flags_it_would_ignore(stopped_run, monkeypatch, capsys, flags, named):
    monkeypatch.chdir(stopped_run)
    assert _main(['--evaluate', 'MNIST_checkpoint/y.pth', '--synthetic', *flags]) == 2
    assert f'so it would ignore {named}: drop' in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize('device', ['cpu:99', 'cpu:1'])
def test_a_cpu_index_other_than_0_is_refused(tmp_path, monkeypatch, capsys, device):
    monkeypatch.chdir(tmp_path)
    assert _main([*SMALL, '--epochs', '0', '--save', 'd.pkl', '--device', device]) == 2
    assert _error_line(capsys.readouterr().err) == f'error: --device {device}: there is one CPU device, cpu'
    assert folder_snapshot(tmp_path) == []


def test_cifar_evaluate_refuses_flags_it_would_ignore(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({'format': 1}, tmp_path / 'c.pth')
    assert _main(['--evaluate', 'c.pth', '--synthetic', '--layers', '20'], CIFAR_experiments) == 2
    assert 'so it would ignore --layers: drop it' in _error_line(capsys.readouterr().err)
