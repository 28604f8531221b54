"""Tests of reproduce.py: command list, resume, scheduler, and a tiny real sweep."""

import json
import os
import pickle
import shlex
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import reproduce
from conftest import run_script, start_process
from resnet_ode import figure_grid, scheduler, sweep

MNIST_CONFIGS_1A = [f'{m}_l{L}_p0' for m in ('RKHS', 'SHL') for L in (5, 10, 20)]


def _dry_run(capsys, argv):
    """Run with --dry_run; return (status, commands as argv lists, comment lines)."""
    # After the figure name, so that it stays before any '--'.
    status = reproduce.main(reproduce.parse_args(argv[:1] + ['--dry_run'] + argv[1:]))
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(line) for line in lines if line and not line.startswith('#')]
    comments = [line for line in lines if line.startswith('#')]
    return status, commands, comments


def _flag(command, name):
    return command[command.index(name) + 1]


def test_parse_args_passthrough():
    args = reproduce.parse_args(['figure1a', '--num_seeds', '3', '--', '--epochs', '2', '--synthetic'])
    assert args.figure == 'figure1a' and args.num_seeds == 3
    assert args.passthrough == ['--epochs', '2', '--synthetic']
    assert reproduce.parse_args(['1b']).figure == reproduce.parse_args(['fig1b']).figure == 'figure1b'
    assert reproduce.parse_args(['figure1a', '--seeds', '4']).num_seeds == 4  # the deprecated spelling
    assert reproduce.parse_args(['all']).passthrough == []


def test_dry_run_figure1a(capsys, tmp_path):
    status, commands, comments = _dry_run(
        capsys, ['figure1a', '--seeds', '2', '--results_root', str(tmp_path),
                 '--', '--epochs', '3', '--subset', '2048'])
    assert status == 0
    assert len(commands) == 6 * 2
    names = set()
    for command in commands:
        assert command[0] == sys.executable
        assert command[1] == str(REPO / 'MNIST_experiments.py')
        name = _flag(command, '--save')[:-len('.pkl')]
        names.add(name)
        assert _flag(command, '--results_dir') == 'MNIST_experiments/fig1a'
        assert _flag(command, '--checkpoint') == f'MNIST_checkpoint/fig1a/{name}.pth'
        assert _flag(command, '--seed') == name.rsplit('_s', 1)[1]
        assert _flag(command, '--model') == name.split('_')[0]
        assert _flag(command, '--layers') == name.split('_')[1][1:]
        assert _flag(command, '--pretrain') == '0'
        assert _flag(command, '--embedding_seed') == '0'
        assert '--device' not in command
        assert command[-4:] == ['--epochs', '3', '--subset', '2048']
    assert names == {f'{c}_s{s}' for c in MNIST_CONFIGS_1A for s in (0, 1)}
    assert any('embedding_seed 0' in line for line in comments)
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_dry_run_vary_embedding_and_other_figures(capsys, tmp_path):
    root = ['--results_root', str(tmp_path)]
    _, commands, _ = _dry_run(capsys, ['figure1b', '--seeds', '1', '--vary_embedding',
                                       '--embedding_seed', '7'] + root)
    assert len(commands) == 6
    assert all('--embedding_seed' not in c and _flag(c, '--pretrain') == '3' for c in commands)

    _, commands, _ = _dry_run(capsys, ['figure2', '--seeds', '2', '--seed_start', '3',
                                       '--embedding_seed', '7'] + root)
    saves = {_flag(c, '--save') for c in commands}
    # C=32 is Figure 1a's RKHS L=20 run, in Figure 1a's folder, as in the release
    assert saves == {f'RKHS_l20_{c}_s{s}.pkl' for c in ('p0', 'c8', 'c4') for s in (3, 4)}
    for command in commands:
        tag = _flag(command, '--save').split('_')[2]
        channels = '32' if tag == 'p0' else tag[1:]
        assert _flag(command, '--in_channels') == _flag(command, '--dim_int') == channels
        assert _flag(command, '--embedding_seed') == '7'
        assert _flag(command, '--results_dir') == ('MNIST_experiments/fig1a' if tag == 'p0'
                                                   else 'MNIST_experiments/fig2')

    _, commands, _ = _dry_run(capsys, ['figure3', '--seeds', '1', '--gpus', '0,1'] + root)
    assert len(commands) == 6
    for command in commands:
        assert command[1] == str(REPO / 'CIFAR_experiments.py')
        assert _flag(command, '--results_dir') == 'CIFAR_experiments/fig3'
        assert _flag(command, '--checkpoint').startswith('CIFAR_checkpoint/fig3/')
        assert '--embedding_seed' not in command
        assert _flag(command, '--device') == 'cuda'
    assert {_flag(c, '--save') for c in commands} == {
        f'{m}_l{L}_s0.pkl' for m in ('RKHS', 'SHL') for L in (1, 10, 20)}

    _, commands, _ = _dry_run(capsys, ['all', '--seeds', '2'] + root)
    assert len(commands) == (6 + 6 + 2 + 6) * 2  # Figure 2's C=32 runs once, as Figure 1a's


@pytest.mark.parametrize('figure', ['figure1a', 'figure1b', 'figure2', 'figure3'])
@pytest.mark.parametrize('protocol', [None, 'stored', 'readme'])
def test_protocol_flags_in_every_command(capsys, tmp_path, figure, protocol):
    argv = [figure, '--seeds', '2', '--results_root', str(tmp_path)]
    argv += ['--protocol', protocol] if protocol else []
    _, commands, _ = _dry_run(capsys, argv)
    if figure == 'figure3':
        expected = ['--epochs', '300', '--decay_steps', '260', '--decay_rate', '0.1']
    elif protocol == 'readme':
        expected = ['--epochs', '30', '--decay_steps', '25', '--decay_rate', '0.1']
    else:  # the release's stored runs: 40 epochs, x0.2 at 35
        expected = ['--epochs', '40', '--decay_steps', '35', '--decay_rate', '0.2']
    assert commands and all(shlex.join(expected) in shlex.join(c) for c in commands)


def test_passthrough_epochs_overrides_the_protocol(capsys, tmp_path):
    _, commands, _ = _dry_run(capsys, ['figure1a', '--seeds', '1', '--results_root', str(tmp_path),
                                       '--', '--epochs', '1'])
    import MNIST_experiments
    args = MNIST_experiments.get_args_parser().parse_args(commands[0][2:])
    assert (args.epochs, args.decay_steps, args.decay_rate) == (1, [35], 0.2)


def test_embedding_dir_passed_to_mnist_runs_and_reported(capsys, tmp_path):
    folder = tmp_path / 'emb'
    folder.mkdir()
    for part in ('input', 'output'):  # only the 8-channel files are there
        (folder / f'8channels_0pass_{part}_embedding.pt').write_bytes(b'')
    argv = ['figure2', '--num_seeds', '1', '--embedding_dir', str(folder), '--results_root', str(tmp_path / 'r')]
    # Given explicitly, the folder must hold every file the release shipped for the sweep's runs:
    # refused before anything runs, naming the missing files (32 channels, 0 passes)
    status = reproduce.main(reproduce.parse_args(argv[:1] + ['--dry_run'] + argv[1:]))
    err = capsys.readouterr().err
    assert status == 2 and err.count('\n') == 1 and '32channels_0pass_input_embedding.pt' in err
    assert not (tmp_path / 'r').exists()
    for part in ('input', 'output'):
        (folder / f'32channels_0pass_{part}_embedding.pt').write_bytes(b'')
    _, commands, comments = _dry_run(capsys, argv)
    assert all(_flag(c, '--embedding_dir') == str(folder) for c in commands)
    line = next(c for c in comments if c.startswith('# MNIST embedding'))
    assert line == (f'# MNIST embedding: release files from {folder} for 32 channels/0 passes, 8 channels/0 '
                    f'passes; --embedding_seed 0 for 4 channels/0 passes')


@pytest.mark.parametrize('figure, passthrough, flag', [
    ('figure1a', ['--layers', '2'], '--layers'),
    ('figure1a', ['-l', '2', '--epochs', '1'], '--layers'),       # the release's short alias
    ('figure1a', ['--lay', '2'], '--layers'),                     # an abbreviation argparse accepts
    ('figure1b', ['--model=SHL'], '--model'),
    ('figure2', ['--in_channels', '8'], '--in_channels'),
    ('figure1a', ['-p', '1'], '--pretrain'),
    ('figure3', ['--layers', '5'], '--layers'),
    ('figure1a', ['--embedding_dir', 'x'], '--embedding_dir'),
])
def test_grid_flags_after_the_double_dash_are_refused(capsys, tmp_path, figure, passthrough, flag):
    status = reproduce.main(reproduce.parse_args([figure, '--dry_run', '--results_root', str(tmp_path),
                                                  '--', *passthrough]))
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ''
    assert f'error: {flag} is set' in captured.err
    assert list(tmp_path.iterdir()) == []


def _existing(tmp_path, argv, names, **changes):
    """Write, for the runs called `names` of the sweep `argv`, the results pickles (or, for a name
    ending in .resume.pt, the resume state) that the run would write, with its protocol record;
    `changes` alter that record (a run made another way)."""
    import torch

    args = reproduce.parse_args(argv[:1] + ['--results_root', str(tmp_path)] + argv[1:])
    figures = figure_grid.FIGURES if args.figure == 'all' else (args.figure,)
    by_name = {run.name: run for figure in figures for run in sweep.build_runs(figure, args, str(tmp_path))}
    for name in names:
        run = by_name[name.replace('.resume.pt', '')]
        record = dict(sweep.of_command('MNIST', run.args), **changes)
        if name.endswith('.resume.pt'):
            import MNIST_experiments
            parsed = MNIST_experiments.get_args_parser().parse_args(run.args)
            parsed = {k: v for k, v in vars(parsed).items() if not k.startswith('_')}
            parsed.update(changes)
            path = tmp_path / run.resume_state
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({'format': 2, 'args': parsed, 'facts': {'embedding_seed': 0, 'embedding_files': None,
                                                               'embedding_sha256': None}}, path)
            continue
        for pickle_path in run.pickles:
            path = tmp_path / pickle_path
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, 'wb') as handle:
                pickle.dump({'model': run.config.model, 'num_layers': run.config.layers,
                             'test_classif': [0.9], 'protocol': record}, handle)


def test_dry_run_skips_existing_runs_of_its_protocol(capsys, tmp_path):
    _existing(tmp_path, ['figure1a', '--num_seeds', '2'], ['RKHS_l5_p0_s0', 'SHL_l20_p0_s1'])
    _, commands, comments = _dry_run(capsys, ['figure1a', '--num_seeds', '2', '--results_root', str(tmp_path)])
    assert len(commands) == 10
    skipped = [line for line in comments if line.startswith('# skip')]
    assert [line.split()[2] for line in skipped] == ['RKHS_l5_p0_s0:', 'SHL_l20_p0_s1:']
    assert 'RKHS_l5_p0_s0.pkl' not in {_flag(c, '--save') for c in commands}
    assert not any('--resume' in c for c in commands)


def test_a_quick_look_never_stands_in_for_the_full_run(capsys, tmp_path):
    """A one-epoch look on 512 images, then the full sweep: refused, naming the file and fields."""
    quick = ['figure1a', '--num_seeds', '1', '--', '--subset', '512', '--epochs', '1']
    _existing(tmp_path, quick, ['RKHS_l5_p0_s0'])
    full = ['figure1a', '--num_seeds', '2', '--results_root', str(tmp_path)]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
    status = reproduce.main(reproduce.parse_args(full[:1] + ['--dry_run'] + full[1:]))
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ''
    first, last = captured.err.splitlines()
    assert first == ('error: MNIST_experiments/fig1a/RKHS_l5_p0_s0.pkl was not made with this sweep\'s '
                     'protocol: epochs 1 (this sweep: 40); subset 512 (this sweep: None)')
    assert last.startswith('error: 1 existing file(s) of another protocol; nothing was run')
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before
    # --move_aside moves it (and its checkpoint) into a dated folder; nothing is deleted
    checkpoint = tmp_path / 'MNIST_checkpoint' / 'fig1a' / 'RKHS_l5_p0_s0.pth'
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b'ckpt')
    monkey_run = scheduler.run_all
    try:
        scheduler.run_all = lambda runs, root, slots: False  # run nothing here
        status = reproduce.main(reproduce.parse_args(full + ['--move_aside', '--no_plot']))
    finally:
        scheduler.run_all = monkey_run
    assert status == 0
    moved = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob('set_aside_*/**/*') if p.is_file())
    assert [path.split('/', 1)[1] for path in moved] == ['MNIST_checkpoint/fig1a/RKHS_l5_p0_s0.pth',
                                                          'MNIST_experiments/fig1a/RKHS_l5_p0_s0.pkl']
    assert not checkpoint.exists()


def test_interrupted_run_is_resumed_only_at_the_sweeps_protocol(capsys, tmp_path):
    _existing(tmp_path, ['figure1a', '--num_seeds', '2'], ['SHL_l10_p0_s1.resume.pt'])
    _, commands, comments = _dry_run(capsys, ['figure1a', '--num_seeds', '2', '--results_root', str(tmp_path)])
    resumed = [c for c in commands if '--resume' in c]
    assert [_flag(c, '--save') for c in resumed] == ['SHL_l10_p0_s1.pkl']
    assert any(line.startswith('# resume SHL_l10_p0_s1') for line in comments)
    _existing(tmp_path, ['figure1a', '--num_seeds', '2'], ['SHL_l10_p0_s1.resume.pt'], batch_size=64)
    status = reproduce.main(reproduce.parse_args(['figure1a', '--dry_run', '--num_seeds', '2',
                                                  '--results_root', str(tmp_path)]))
    assert status == 2 and 'SHL_l10_p0_s1.resume.pt was not made with this sweep\'s protocol: batch_size ' \
        '64 (this sweep: 256)' in capsys.readouterr().err


def test_bad_arguments():
    assert reproduce.main(reproduce.parse_args(['figure1a', '--seeds', '0', '--dry_run'])) == 2
    for flag in ('--save', '--results_dir=x', '--embedding_seed'):
        args = reproduce.parse_args(['figure1a', '--dry_run', '--', flag, 'x'])
        assert reproduce.main(args) == 2
    with pytest.raises(SystemExit):
        reproduce.parse_args(['figure9'])
    with pytest.raises(SystemExit):
        reproduce.parse_args(['figure1a', '--gpus', 'a,b'])


# A stand-in for MNIST_experiments.py: writes a small pickle in the release
# schema (plus what it saw), fails for SHL L=20 and diverges for SHL L=10 seed 0.
FAKE_SCRIPT = textwrap.dedent('''
    import argparse, os, pickle, sys
    import numpy as np
    parser = argparse.ArgumentParser()
    for flag in ('--model', '--results_dir', '--save', '--checkpoint', '--device'):
        parser.add_argument(flag)
    for flag in ('--layers', '--seed', '--embedding_seed', '--pretrain', '--in_channels',
                 '--dim_int', '--epochs'):
        parser.add_argument(flag, type=int)
    args, _ = parser.parse_known_args()
    print('fake run', args.model, args.layers, args.seed)
    if args.model == 'SHL' and args.layers == 20:
        print('simulated crash', file=sys.stderr)
        sys.exit(1)
    diverged = args.model == 'SHL' and args.layers == 10 and args.seed == 0
    epochs = 1 if diverged else 3
    rng = np.random.default_rng(args.seed)
    data = dict(model=args.model, num_layers=args.layers, in_channels=args.in_channels,
                dim_int=args.dim_int, pretrain_pass=args.pretrain, batch_size=8,
                train_loss=np.exp(-np.arange(40 * epochs) / 30) + 0.1 * rng.random(40 * epochs),
                train_classif=np.linspace(0.9, 0.1, epochs + 1),
                test_classif=np.linspace(0.9, 0.2, epochs + 1) + 0.01 * rng.random(),
                computation_time=1.0, num_parameters=10, diverged=diverged, seed=args.seed,
                argv=sys.argv[1:], cwd=os.getcwd(),
                cuda_visible_devices=os.environ.get('CUDA_VISIBLE_DEVICES'),
                omp_num_threads=os.environ.get('OMP_NUM_THREADS'))
    with open(os.path.join(args.results_dir, args.save), 'wb') as handle:
        pickle.dump(data, handle)
    sys.exit(3 if diverged else 0)
''')


def _add_the_real_records(folder):
    """Give each fake run's pickle the protocol record the real script would have written for its
    command line, so that a rerun skips it. Computed here, once: importing the real script in
    every fake process would cost each one seconds of torch import."""
    for path in folder.glob('*.pkl'):
        with open(path, 'rb') as handle:
            run = pickle.load(handle)
        run['protocol'] = sweep.of_command('MNIST', run['argv'])
        with open(path, 'wb') as handle:
            pickle.dump(run, handle)


@pytest.mark.slow
def test_sweep_with_fake_script(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler, 'gpu_problems', lambda gpus: [])  # no GPU needed: nothing runs on one
    scripts = tmp_path / 'scripts'
    scripts.mkdir()
    (scripts / 'MNIST_experiments.py').write_text(FAKE_SCRIPT)
    monkeypatch.setattr(sweep, 'SCRIPT_DIR', str(scripts))
    root = tmp_path / 'root'
    argv = ['figure1a', '--seeds', '2', '--results_root', str(root), '--gpus', '0,1',
            '--per_gpu', '2', '--batch_seeds', '1', '--', '--epochs', '3']

    status = reproduce.main(reproduce.parse_args(argv))
    out = capsys.readouterr().out
    assert status == 1  # SHL L=20 fails for both seeds
    results = root / 'MNIST_experiments' / 'fig1a'
    written = sorted(p.stem for p in results.glob('*.pkl'))
    assert written == sorted(f'{c}_s{s}' for c in MNIST_CONFIGS_1A if c != 'SHL_l20_p0'
                             for s in (0, 1))
    assert '2 run(s) FAILED' in out
    for seed in (0, 1):
        log = results / 'logs' / f'SHL_l20_p0_s{seed}.log'
        assert str(log) in out
        assert 'simulated crash' in log.read_text()
    assert 'diverged (pickle written' in out and 'SHL_l10_p0_s0' in out
    assert 'sweep wall time' in out
    assert (results / 'figure1a.png').stat().st_size > 10_000
    # a failed run's line quotes its log's last line; a progress line follows every run
    assert 'failed SHL_l20_p0_s0 (exit 1, ' in out and ': simulated crash (log: ' in out
    assert out.count('progress: ') == 12 and 'progress: 12 done' not in out
    assert 'progress: 10 done, 0 running, 0 waiting, 2 failed of 12' in out

    with open(results / 'RKHS_l5_p0_s1.pkl', 'rb') as handle:
        run = pickle.load(handle)
    assert Path(run['cwd']).resolve() == root.resolve()
    assert run['cuda_visible_devices'] in ('0', '1')
    assert run['omp_num_threads'] == os.environ.get('OMP_NUM_THREADS')  # GPU runs: threads left alone
    # Our flags first, pass-through last so that it can override them.
    assert run['argv'][-6:] == ['--embedding_seed', '0', '--device', 'cuda', '--epochs', '3']

    manifest = json.loads((results / 'sweep.json').read_text())
    last = manifest['invocations'][-1]
    assert last['argv'] == argv
    assert len(last['runs']) == 12
    assert all('--embedding_seed' in r['command'] for r in last['runs'])
    statuses = {r['name']: r['status'] for r in last['runs']}
    assert statuses['SHL_l10_p0_s0'] == 'diverged' and statuses['SHL_l20_p0_s0'] == 'failed'

    # Rerun: finished and diverged runs are skipped, only the failed ones run again.
    _add_the_real_records(results)
    status = reproduce.main(reproduce.parse_args(argv[:1] + ['--no_plot'] + argv[1:]))
    out = capsys.readouterr().out
    assert status == 1
    assert out.count('# skip') == 10
    assert out.count(' start ') == 2
    assert len(json.loads((results / 'sweep.json').read_text())['invocations']) == 2


@pytest.mark.slow
def test_cpu_runs_side_by_side_share_the_cores(capsys, tmp_path, monkeypatch):
    """--jobs 2 on 4 cores: each run gets OMP_NUM_THREADS=2, said in its log; a user's own
    setting is kept; one run at a time is left alone."""
    scripts = tmp_path / 'scripts'
    scripts.mkdir()
    (scripts / 'MNIST_experiments.py').write_text(FAKE_SCRIPT)
    monkeypatch.setattr(sweep, 'SCRIPT_DIR', str(scripts))
    monkeypatch.setattr(scheduler, 'usable_cpus', lambda: 4)
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)

    def threads_of_each_run(root, jobs):
        argv = ['figure2', '--num_seeds', '1', '--results_root', str(root), '--jobs', str(jobs), '--no_plot']
        assert reproduce.main(reproduce.parse_args(argv)) == 0
        capsys.readouterr()
        results = root / 'MNIST_experiments' / 'fig2'
        threads = set()
        for path in results.glob('*.pkl'):
            with open(path, 'rb') as handle:
                threads.add(pickle.load(handle)['omp_num_threads'])
        return threads, results

    threads, results = threads_of_each_run(tmp_path / 'two', 2)
    assert threads == {'2'}
    assert all('# OMP_NUM_THREADS=2\n' in log.read_text() for log in (results / 'logs').glob('*.log'))
    assert threads_of_each_run(tmp_path / 'one', 1)[0] == {None}
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    threads, results = threads_of_each_run(tmp_path / 'mine', 2)
    assert threads == {'3'}
    assert not any('OMP_NUM_THREADS' in log.read_text() for log in (results / 'logs').glob('*.log'))


def test_missing_script_is_an_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, 'SCRIPT_DIR', str(tmp_path / 'nowhere'))
    status = reproduce.main(reproduce.parse_args(['figure3', '--seeds', '1',
                                                  '--results_root', str(tmp_path / 'r')]))
    assert status == 2
    assert 'experiment script not found' in capsys.readouterr().err


@pytest.mark.skipif(not (REPO / 'MNIST_experiments.py').exists(),
                    reason='MNIST_experiments.py is not in the repository yet')
@pytest.mark.slow
def test_tiny_real_sweep(capsys, tmp_path):
    # Two configurations, one per core: the real scripts, end to end (the list of all six is
    # the dry runs' business).
    argv = ['figure1a', '--seeds', '1', '--jobs', '2', '--configs', 'RKHS_l5_p0,SHL_l5_p0',
            '--results_root', str(tmp_path), '--', '--synthetic', '--subset', '128', '--epochs', '1']
    status = reproduce.main(reproduce.parse_args(argv))
    out = capsys.readouterr().out
    logs = sorted((tmp_path / 'MNIST_experiments' / 'fig1a' / 'logs').glob('*.log'))
    assert status == 0, out + ''.join(log.read_text()[-2000:] for log in logs)
    pickles = sorted((tmp_path / 'MNIST_experiments' / 'fig1a').glob('*.pkl'))
    assert [p.stem for p in pickles] == ['RKHS_l5_p0_s0', 'SHL_l5_p0_s0']
    for path, model in zip(pickles, ('RKHS', 'SHL')):
        with open(path, 'rb') as handle:
            run = pickle.load(handle)
        assert (run['model'], run['num_layers'], run['seed']) == (model, 5, 0)
        assert len(run['test_classif']) == 2  # before training + 1 epoch
        assert run.get('embedding_seed', 0) == 0

    status = reproduce.main(reproduce.parse_args(argv[:1] + ['--no_plot'] + argv[1:]))
    out = capsys.readouterr().out
    assert status == 0
    assert out.count('# skip') == 2
    assert ' start ' not in out


# --- several seeds per process, and shards ------------------------------------------------------

def test_batch_seeds_groups_each_configurations_seeds(capsys, tmp_path):
    _, commands, _ = _dry_run(capsys, ['figure1a', '--seeds', '5', '--batch_seeds', '4',
                                       '--results_root', str(tmp_path)])
    assert len(commands) == 6 * 2
    for command in commands:
        config = _flag(command, '--save')[:-len('.pkl')]
        if '--seeds' in command:  # members write the single runs' names: <config>_s<seed>.pkl
            assert command[command.index('--seeds') + 1:command.index('--seeds') + 5] == ['0', '1', '2', '3']
            assert _flag(command, '--checkpoint') == f'MNIST_checkpoint/fig1a/{config}.pth'
        else:
            assert _flag(command, '--seed') == '4' and config.endswith('_s4')
    _, commands, _ = _dry_run(capsys, ['figure1b', '--seeds', '5', '--gpus', '0', '--results_root', str(tmp_path)])
    assert len(commands) == 6 and all(command.count('--seeds') == 1 for command in commands)
    _, commands, _ = _dry_run(capsys, ['figure3', '--seeds', '2', '--batch_seeds', '2',
                                       '--results_root', str(tmp_path)])
    assert len(commands) == 12 and not any('--seeds' in command for command in commands)  # CIFAR: one seed


def test_a_batch_skips_done_members_and_resumes_its_state(capsys, tmp_path):
    argv = ['figure2', '--num_seeds', '4', '--batch_seeds', '4']
    _existing(tmp_path, ['figure2', '--num_seeds', '4'], ['RKHS_l20_c8_s0', 'RKHS_l20_c8_s1'] +
              [f'RKHS_l20_c4_s{seed}' for seed in range(4)])
    _existing(tmp_path, argv, ['RKHS_l20_p0_s0-1-2-3.resume.pt'])  # its batch's state
    _, commands, comments = _dry_run(capsys, argv + ['--results_root', str(tmp_path)])
    by_config = {_flag(c, '--save'): c for c in commands}
    assert sorted(by_config) == ['RKHS_l20_c8.pkl', 'RKHS_l20_p0.pkl']
    assert by_config['RKHS_l20_p0.pkl'][-1] == '--resume'
    members = by_config['RKHS_l20_c8.pkl']
    assert members[members.index('--seeds') + 1:members.index('--seeds') + 3] == ['2', '3']
    assert any(line.startswith('# skip RKHS_l20_c4_s0-1-2-3') for line in comments)
    # Rerun with another --batch_seeds (say, the CPU default of 1): the saved batch of four is
    # continued as it was saved, not abandoned
    _, commands, _ = _dry_run(capsys, ['figure2', '--num_seeds', '4', '--results_root', str(tmp_path)])
    resumed = [c for c in commands if '--resume' in c]
    assert len(resumed) == 1 and resumed[0][resumed[0].index('--seeds') + 1:][:4] == ['0', '1', '2', '3']


@pytest.mark.parametrize('count', [1, 3, 7])
def test_shards_run_every_command_exactly_once(capsys, tmp_path, count):
    base = ['all', '--seeds', '3', '--batch_seeds', '2', '--results_root', str(tmp_path)]
    _, everything, _ = _dry_run(capsys, base)
    parts = [_dry_run(capsys, base + ['--shard', f'{index}/{count}'])[1] for index in range(1, count + 1)]
    assert sorted(map(shlex.join, everything)) == sorted(shlex.join(c) for part in parts for c in part)
    assert all(len(part) >= len(everything) // count for part in parts)  # balanced


def test_bad_shards_and_batch_sizes_are_refused():
    for text in ('0/3', '4/3', '1-3', 'a/b'):
        with pytest.raises(SystemExit):
            reproduce.parse_args(['figure1a', '--shard', text])
    assert reproduce.main(reproduce.parse_args(['figure1a', '--dry_run', '--batch_seeds', '0'])) == 2


@pytest.mark.slow
def test_tiny_batched_sweep(capsys, tmp_path):
    argv = ['figure2', '--seeds', '2', '--batch_seeds', '2', '--jobs', '2', '--results_root', str(tmp_path),
            '--embedding_dir', 'none', '--', '--synthetic', '--subset', '64', '--epochs', '1']
    status = reproduce.main(reproduce.parse_args(argv))
    out = capsys.readouterr().out
    assert status == 0, out
    folder = tmp_path / 'MNIST_experiments' / 'fig2'
    names = sorted(p.name for p in folder.glob('*.pkl'))
    assert names == sorted(f'RKHS_l20_c{c}_s{s}.pkl' for c in (8, 4) for s in (0, 1))
    assert sorted(p.name for p in (folder.parent / 'fig1a').glob('*.pkl')) == [
        'RKHS_l20_p0_s0.pkl', 'RKHS_l20_p0_s1.pkl']  # C=32: Figure 1a's runs
    assert out.count(' start ') == 3  # one process per configuration
    with open(folder / 'RKHS_l20_c8_s1.pkl', 'rb') as handle:
        run = pickle.load(handle)
    assert run['seed'] == 1 and run['batched_with'] == 2 and run['in_channels'] == 8
    assert (folder / 'figure2.png').stat().st_size > 10_000  # the figure, beside its runs


# --- reliability: two sweeps on one root, refusals before anything runs ------------------------

@pytest.mark.slow
def test_a_run_held_by_another_process_is_running_elsewhere_and_its_log_is_kept(capsys, tmp_path):
    """A second sweep meets a run that another process holds (here a run paused by SIGSTOP at its
    first step, its lock held): 'running elsewhere', not a failure; the shared log is appended to,
    never truncated."""
    import signal
    import subprocess
    argv = ['figure2', '--num_seeds', '1', '--configs', 'RKHS_l20_c4', '--results_root', str(tmp_path),
            '--no_plot', '--', '--synthetic', '--subset', '64', '--epochs', '1']
    args = reproduce.parse_args(argv)
    run, = sweep.build_runs('figure2', args, str(tmp_path))
    log = tmp_path / run.log
    log.parent.mkdir(parents=True)
    log.write_text('# the first process\'s log\n')
    env = dict(os.environ, RESNET_ODE_FAULT='step@1:SIGSTOP', PYTHONUNBUFFERED='1')
    with open(log, 'a') as handle:
        holder = start_process(run.command(), cwd=tmp_path, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        lock = tmp_path / 'MNIST_experiments' / 'fig2' / '.RKHS_l20_c4_s0.lock'
        for _ in range(600):  # until it has stopped itself at its first step, holding the lock
            if lock.exists() and open(f'/proc/{holder.pid}/stat').read().split()[2] == 'T':
                break
            time.sleep(0.1)
        status = reproduce.main(reproduce.parse_args(argv))
        out = capsys.readouterr().out
        assert status == 0, out
        assert 'running elsewhere RKHS_l20_c4_s0' in out and 'FAILED' not in out
        assert '1 run(s) are running in another process' in out
        text = log.read_text()
        assert text.startswith('# the first process\'s log\n') and '\x00' not in text
        assert text.count('# ---- attempt started') == 1  # the second sweep's attempt, appended
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()


@pytest.mark.parametrize('argv, message', [
    (['--embedding_seed', '-5'], '--embedding_seed must be in [0, 2^63)'),
    (['--seed_start', '9223372036854775807', '--num_seeds', '2'],
     '--seed_start and --num_seeds must keep every seed in [0, 2^63)'),
    (['--shard', '40/40'], '--shard 40/40: the sweep has only 6 run(s)'),
    (['--configs', 'RKHS_l7_p0'], '--configs: RKHS_l7_p0 is not a configuration of figure1a'),
    (['--', '--help'], '--help after "--" would go to every run'),
])
def test_nonsense_is_refused_before_anything_runs(capsys, tmp_path, argv, message):
    status = reproduce.main(reproduce.parse_args(['figure1a', '--num_seeds', '1', '--results_root',
                                                  str(tmp_path / 'r')] + argv))
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ''
    assert captured.err.count('\n') == 1 and message in captured.err
    assert not (tmp_path / 'r').exists()


def test_gpus_without_cuda_are_refused(capsys, tmp_path, monkeypatch):
    import torch
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    status = reproduce.main(reproduce.parse_args(['figure1a', '--gpus', '0', '--results_root', str(tmp_path)]))
    assert status == 2 and '--gpus 0: this machine has 0 CUDA device(s)' in capsys.readouterr().err


def test_unwritable_places_are_one_line(tmp_path):
    (tmp_path / 'file').write_text('x')
    # /proc: a place no process may create files in, root included (file modes do not stop root)
    for root, why in ((tmp_path / 'file', 'is not a folder'), (tmp_path / 'file' / 'under', 'is not a folder'),
                      ('/proc/x', 'is not writable')):
        proc = run_script('reproduce.py', 'figure1a', '--results_root', root, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and why in proc.stderr, proc.stderr
        proc = run_script('plot_figures.py', str(tmp_path), '--out_dir', root, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and why in proc.stderr, proc.stderr


def test_usage_errors_are_one_line(tmp_path):
    for script, argv in (('reproduce.py', ['figure9']), ('reproduce.py', ['figure1a', '--shard', '1-3']),
                         ('plot_figures.py', ['--figure', '7']), ('release_runs.py', ['--nonsense'])):
        proc = run_script(script, *argv, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and proc.stdout == '', (script, proc.stderr)
        if 'figure9' in argv or '7' in argv:  # the figure's own message, not argparse's generic one
            assert "unknown figure" in proc.stderr and "choose from 1a, 1b, 2, 3" in proc.stderr, proc.stderr
