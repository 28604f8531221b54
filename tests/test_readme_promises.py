"""What the README promises and no other test checked, one test each. In-process (main(parse_args(
[...]))) wherever the process boundary is not what is tested."""
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import CIFAR_experiments
import MNIST_experiments
import models
import reproduce
from conftest import MNIST_RAW_FILES, REPO, folder_snapshot, load_results, start_process
from resnet_ode import faults

SMALL = ['--synthetic', '--subset', '256', '--layers', '2', '--in_channels', '4', '--dim_int', '4',
         '--batch_size', '64', '--embedding_dir', 'none']
CURVES = ('train_loss', 'train_classif', 'test_classif')


def _mnist(folder, monkeypatch, *argv) -> int:
    monkeypatch.chdir(folder)
    return MNIST_experiments.main(MNIST_experiments.get_args_parser().parse_args([*map(str, argv)]))


def _cifar(folder, monkeypatch, *argv) -> int:
    monkeypatch.chdir(folder)
    return CIFAR_experiments.main(CIFAR_experiments.get_args_parser().parse_args([*map(str, argv)]))


def _one_error_line(err: str) -> str:
    assert 'Traceback' not in err
    lines = [line for line in err.splitlines() if not line.startswith('warning:')]
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0]


def _same_run(folder_a, folder_b, save_a, save_b, prefix='MNIST'):
    """Two runs' curves, best epochs and best checkpoints, bit for bit."""
    a = load_results(folder_a / f'{prefix}_experiments' / save_a)
    b = load_results(folder_b / f'{prefix}_experiments' / save_b)
    for key in CURVES:
        assert np.array_equal(a[key], b[key]), key
    assert a['best_epoch'] == b['best_epoch']
    load = lambda folder, save: torch.load(folder / f'{prefix}_checkpoint' / save.replace('.pkl', '.pth'),
                                           weights_only=True)
    checkpoint_a, checkpoint_b = load(folder_a, save_a), load(folder_b, save_b)
    parts = [key for key, value in checkpoint_a.items() if isinstance(value, dict) and key not in ('args', 'facts')]
    assert parts
    for part in parts:
        for name, tensor in checkpoint_a[part].items():
            assert torch.equal(tensor, checkpoint_b[part][name]), (part, name)
    return a


# --- pretraining that diverges: exit 3, nothing written ------------------------------------------

def test_diverging_pretraining_exits_3_and_writes_nothing(tmp_path, monkeypatch, capsys):
    status = _mnist(tmp_path, monkeypatch, *SMALL, '--epochs', '1', '--pretrain', '2',
                    '--pretrain_lr', '1e30', '--seed', '0', '--save', 'p.pkl')
    captured = capsys.readouterr()
    assert status == 3
    assert captured.err.startswith('error: pretraining diverged (non-finite loss) in pass 1 at '
                                   '--pretrain_lr 1e+30; lower it. Nothing was written')
    assert len(captured.err.splitlines()) == 1
    assert 'pretraining pass 1/2 done' not in captured.out
    assert folder_snapshot(tmp_path) == []  # no pickle, checkpoint, resume state, lock or folder


# --- --test_batch_size never changes results -----------------------------------------------------

@pytest.mark.parametrize('script', ['MNIST', 'CIFAR'])
def test_test_batch_size_never_changes_results(tmp_path, monkeypatch, script):
    if script == 'MNIST':
        run, argv = _mnist, [*SMALL, '--epochs', '2', '--train_error_images', '100', '--seed', '3']
    else:
        run, argv = _cifar, ['--synthetic', '--subset', '8', '--layers', '1', '--epochs', '1',
                             '--batch_size', '8', '--lr_init', '0.05', '--seed', '3']
    # 7 does not divide the evaluation sets: every chunk size differs from the default's one chunk.
    assert run(tmp_path, monkeypatch, *argv, '--test_batch_size', '7', '--save', 'small.pkl') == 0
    assert run(tmp_path, monkeypatch, *argv, '--save', 'default.pkl') == 0
    results = _same_run(tmp_path, tmp_path, 'small.pkl', 'default.pkl', script)
    assert len(set(results['test_classif'].tolist())) > 1 or len(set(results['train_classif'].tolist())) > 1


# --- a resume may change --data_root --------------------------------------------------------------

def _mnist_copy(root, mnist_root):
    """A data root of its own: MNIST/raw/ holding links to the real files."""
    raw = root / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for name in MNIST_RAW_FILES:
        (raw / name).symlink_to(os.path.join(mnist_root, 'MNIST', 'raw', name))


def test_a_resume_may_change_the_data_root(tmp_path, monkeypatch, mnist_root):
    argv = ['--data_root', 'first', '--subset', '256', '--layers', '1', '--in_channels', '4',
            '--dim_int', '4', '--batch_size', '64', '--epochs', '2', '--seed', '4',
            '--embedding_dir', 'none', '--save', 'moved.pkl']
    _mnist_copy(tmp_path / 'first', mnist_root)
    monkeypatch.setattr(faults, 'counts', {})
    monkeypatch.setenv(faults.FAULT_ENV, 'step@6:SIGTERM')  # in the second epoch
    assert _mnist(tmp_path, monkeypatch, *argv) == 143
    monkeypatch.delenv(faults.FAULT_ENV)
    assert (tmp_path / 'MNIST_experiments' / 'moved.resume.pt').exists()
    os.rename(tmp_path / 'first', tmp_path / 'second')  # the data moved: the old root is gone
    assert _mnist(tmp_path, monkeypatch, '--save', 'moved.pkl', '--resume', '--data_root', 'second') == 0
    whole = tmp_path / 'whole'
    whole.mkdir()
    _mnist_copy(whole / 'data', mnist_root)
    assert _mnist(whole, monkeypatch, *argv[2:], '--data_root', 'data') == 0
    results = _same_run(tmp_path, whole, 'moved.pkl', 'moved.pkl')
    assert results['train_loss'].shape == (8,)


# --- --seeds is refused under torchrun ------------------------------------------------------------

def test_seeds_is_refused_under_torchrun(tmp_path, monkeypatch, capsys):
    argv = [*SMALL, '--epochs', '0', '--seeds', '1', '2', '--save', 's.pkl']
    monkeypatch.setenv('RANK', '0')       # what torchrun sets in every process it starts,
    monkeypatch.setenv('WORLD_SIZE', '2')  # and what distributed.launched_by_torchrun reads
    assert _mnist(tmp_path, monkeypatch, *argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith('error: --seeds is for one process; under torchrun')
    assert folder_snapshot(tmp_path) == []
    monkeypatch.delenv('RANK')
    monkeypatch.delenv('WORLD_SIZE')
    assert _mnist(tmp_path, monkeypatch, *argv) == 0  # the same command, not under torchrun


# --- a --seeds run's locks stop a single run of one of its seeds while it runs --------------------

@pytest.mark.slow
def test_a_seeds_runs_locks_stop_a_single_run_of_its_seed(tmp_path, monkeypatch, capsys):
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', faults.FAULT_ENV)}
    holder = start_process([sys.executable, str(REPO / 'MNIST_experiments.py'), *SMALL,
                               '--subset', '2048', '--epochs', '1000', '--seeds', '1', '2',
                               '--save', 'batch.pkl'], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The single run of seed 2 has the member's results file and its own checkpoint path, so
    # that only the lock on the member's results can refuse it (no file of it exists yet).
    single = [*SMALL, '--epochs', '0', '--seed', '2', '--save', 'batch_s2.pkl',
              '--checkpoint', 'elsewhere/batch_s2.pth']
    try:
        state = tmp_path / 'MNIST_experiments' / 'batch_s1-2.batch-resume.pt'
        deadline = time.time() + 120
        while not state.exists() and time.time() < deadline:  # it is training
            time.sleep(0.2)
        assert state.exists() and holder.poll() is None
        assert not (tmp_path / 'MNIST_experiments' / 'batch_s2.pkl').exists()
        assert _mnist(tmp_path, monkeypatch, *single) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith('error: another process is running --save batch_s2.pkl (it holds ')
        assert line.endswith('.batch_s2.lock); wait for it to finish, or choose another --save')
        assert not (tmp_path / 'elsewhere').exists()
    finally:
        holder.terminate()
        holder.wait(timeout=120)
    assert holder.returncode == 143
    assert _mnist(tmp_path, monkeypatch, *single) == 0  # once it has stopped, nothing refuses it


# --- the --embedding_seed default is the first of --seeds -----------------------------------------

def test_embedding_seed_defaults_to_the_first_of_seeds(tmp_path, monkeypatch):
    assert _mnist(tmp_path, monkeypatch, *SMALL, '--epochs', '0', '--seeds', '7', '4', '--save', 'e.pkl') == 0
    drawn = {}
    for seed in (7, 4):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            drawn[seed] = (models.mnist_input_network(4).state_dict(), models.mnist_output_network(4).state_dict())
    for member in (7, 4):  # the first listed, not the smallest
        assert load_results(tmp_path / 'MNIST_experiments' / f'e_s{member}.pkl')['embedding_seed'] == 7
        checkpoint = torch.load(tmp_path / 'MNIST_checkpoint' / f'e_s{member}.pth', weights_only=True)
        for part, state in zip(('input_net', 'output_net'), drawn[7]):
            for name, tensor in state.items():
                assert torch.equal(checkpoint[part][name], tensor), (member, part, name)
        assert not torch.equal(checkpoint['input_net']['0.weight'], drawn[4][0]['0.weight'])


# --- reproduce.py --gpus: 20 seeds per process ----------------------------------------------------

def test_gpus_implies_20_seeds_per_process(capsys, tmp_path):
    """23 seeds: groups of 20 and 3 with --gpus (neither 20 nor the old default 5 can hide it);
    one process per seed without."""
    def commands(*extra):
        status = reproduce.main(reproduce.parse_args(['figure1a', '--dry_run', '--num_seeds', '23',
                                                      '--results_root', str(tmp_path), *extra]))
        assert status == 0
        return [shlex.split(line) for line in capsys.readouterr().out.splitlines()
                if line and not line.startswith('#')]

    def seed_groups(command):
        if '--seed' in command:
            return [int(command[command.index('--seed') + 1])]
        start = command.index('--seeds') + 1
        end = next((i for i in range(start, len(command)) if command[i].startswith('--')), len(command))
        return [int(seed) for seed in command[start:end]]

    on_gpus = commands('--gpus', '0')
    assert len(on_gpus) == 6 * 2
    for config in range(6):
        first, rest = on_gpus[2 * config], on_gpus[2 * config + 1]
        assert seed_groups(first) == list(range(20)) and seed_groups(rest) == [20, 21, 22]
        assert first[first.index('--device') + 1] == 'cuda'
    on_cpu = commands()
    assert len(on_cpu) == 6 * 23 and all('--seeds' not in command for command in on_cpu)
    assert [len(seed_groups(c)) for c in commands('--gpus', '0', '--batch_seeds', '9')[:3]] == [9, 9, 5]
    assert list(tmp_path.iterdir()) == []


# --- a kill during a file write leaves the old file intact ----------------------------------------

@pytest.mark.slow
def test_a_kill_during_a_write_leaves_the_old_file_and_the_run_resumes(tmp_path, monkeypatch):
    argv = [*SMALL, '--epochs', '2', '--seed', '9', '--save', 'w.pkl']
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE')}
    # The writes of a run: resume state, metrics file and checkpoint after the evaluation before
    # training (1, 2, 3), then the resume state after epoch 1 (4): killed in 4, its new content
    # complete on disk and not yet renamed over the old.
    killed = subprocess.run([sys.executable, str(REPO / 'MNIST_experiments.py'), *argv], cwd=tmp_path,
                            env={**env, faults.FAULT_ENV: 'write@4'}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr
    folder = tmp_path / 'MNIST_experiments'
    old = torch.load(folder / 'w.resume.pt', weights_only=True)
    assert old['epoch'] == 0 and old['position'] is None  # the state written before, whole
    temporary = [path for path in folder.iterdir() if path.name.startswith('.w.resume.pt.')]
    assert len(temporary) == 1 and temporary[0].suffix == '.tmp'
    assert torch.load(temporary[0], weights_only=True)['epoch'] == 1  # the new one was complete
    assert _mnist(tmp_path, monkeypatch, '--synthetic', '--save', 'w.pkl', '--resume') == 0
    whole = tmp_path / 'whole'
    whole.mkdir()
    assert _mnist(whole, monkeypatch, *argv) == 0
    _same_run(tmp_path, whole, 'w.pkl', 'w.pkl')


# --- the README's quick start, its metrics snippet, and which protocol is which -------------------

def _readme_block(after: str, fence: str = '```') -> str:
    """The first code block of README.md after the line containing `after`."""
    text = (REPO / 'README.md').read_text()
    start = text.index(fence, text.index(after)) + len(fence)
    start = text.index('\n', start) + 1
    return text[start:text.index(fence, start)]


@pytest.mark.slow
def test_the_quick_start_prints_what_the_readme_shows(tmp_path, mnist_root, release_dir):
    """One thread, as the README says: its printed lines, the time and the folder aside."""
    commands = _readme_block('## Quick start').splitlines()
    run = next(line for line in commands if line.startswith('OMP_NUM_THREADS=1 python MNIST_experiments.py'))
    argv = shlex.split(run.split('#')[0])[2:]  # after 'OMP_NUM_THREADS=1 python'
    proc = subprocess.run([sys.executable, str(REPO / argv[0]), *argv[1:], '--data_root', mnist_root,
                           '--embedding_dir', release_dir], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    expected = _readme_block('and prints').splitlines()

    def comparable(line):
        line = line.replace(os.path.dirname(release_dir), '...')  # the README's .../MNIST_pretrained_models
        return line.rsplit(' (', 1)[0] if line.startswith('epoch 1/1') else line
    printed = [comparable(line) for line in proc.stdout.splitlines()]
    assert printed == [comparable(line) for line in expected]


def test_the_readmes_metrics_snippet_reads_a_run_of_the_script(tmp_path, monkeypatch):
    assert _mnist(tmp_path, monkeypatch, *SMALL, '--epochs', '2', '--seed', '0', '--save', 'smoke.pkl') == 0
    snippet = _readme_block('run in progress from it:')
    assert 'header, *epochs' in snippet
    namespace = {}
    exec(snippet.replace('print(', 'result = ('), namespace)  # noqa: S102 (the README's own code)
    epochs_of_protocol, test_errors = namespace['result']
    record = load_results(tmp_path / 'MNIST_experiments' / 'smoke.pkl')
    assert epochs_of_protocol == 2 and test_errors == [float(x) for x in record['test_classif']]


def test_help_and_readme_say_which_protocol_is_which(capsys):
    with pytest.raises(SystemExit):
        MNIST_experiments.get_args_parser().parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert 'the protocol of the release\'s README (30 epochs, x0.1 at epoch 25)' in text
    assert 'use 40 epochs, x0.2 at 35 and --train_error_images 1000' in text
    readme = ' '.join((REPO / 'README.md').read_text().split())
    assert 'defaults to the protocol of the release\'s README (30 epochs, x0.1 at epoch 25)' in readme


def test_the_readme_says_where_a_sweep_finds_mnist_offline():
    main_job = (REPO / 'README.md').read_text().split('## The main job')[1].split('## ')[0]
    assert 'python reproduce.py figure1a -- --data_root <folder holding MNIST/raw>' in main_job
