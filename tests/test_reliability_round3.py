"""Reliability, round 3 (issue 19): no native crash from a file, no run that no command can
finish, no lost checkpoint, no hang, one line for every refusal. One section per item of the
issue; each test failed on the code before the fix it covers (the hangs by timing out).

In-process runs (MNIST_experiments.main) where only the outcome matters; real processes where
the exit status, the one stderr line, a signal or a kill is what is tested.
"""
import contextlib
import errno
import fcntl
import os
import pickle
import pickletools
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import CIFAR_experiments
import MNIST_experiments
import models
import reproduce
from conftest import MNIST_ROOT, REPO, folder_snapshot, load_results, run_script, start_process
from resnet_ode import embeddings, errors, faults, figure_grid, files, gate, mnist, run_files, safe_pickle, sweep

SMALL = ['--synthetic', '--subset', '256', '--layers', '2', '--in_channels', '4', '--dim_int', '4',
         '--batch_size', '64', '--embedding_dir', 'none']
CURVES = ('train_loss', 'train_classif', 'test_classif')


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



# --- 1. a crafted results pickle: no native crash, refused in one warning ------------------------

class _CraftedDtype:
    """Pickles as numpy.dtype('V8') followed by a BUILD whose state declares one field of object
    type while its flags (0) say that the dtype holds no objects."""

    def __reduce__(self):
        return (np.dtype, ('V8', False, True),
                (3, '|', None, ('f0',), {'f0': (np.dtype('O'), 0)}, 8, 1, 0))


class _CraftedArray:
    """Pickles as numpy's own _reconstruct + BUILD of a one-element array of that dtype whose 8
    bytes, read as the object field, are an attacker-chosen pointer."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        return (_reconstruct, (np.ndarray, (0,), b'b'), (1, (1,), _CraftedDtype(), False, b'\x41' * 8))


def _crafted_results_pickle() -> bytes:
    data = pickle.dumps({'model': 'RKHS', 'num_layers': 5, 'test_classif': _CraftedArray()}, protocol=4)
    names = {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
    # only globals the restricted unpickler has always allowed: numpy's rebuilders, nothing else
    assert {'numpy._core.multiarray', '_reconstruct', 'numpy', 'ndarray', 'dtype'} <= names
    assert not names & {'builtins', 'os', 'subprocess', 'eval', 'exec'}
    return data


def test_the_crafted_pickle_really_crashes_a_plain_unpickler(tmp_path):
    """The file is the issue's: plain pickle (in another process) dies of a segmentation fault."""
    path = tmp_path / 'crafted.pkl'
    path.write_bytes(_crafted_results_pickle())
    code = f'import pickle; print(pickle.load(open({str(path)!r}, "rb"))["test_classif"])'
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, timeout=120)
    assert proc.returncode == -11  # SIGSEGV


def test_a_crafted_dtype_is_refused_by_the_results_unpickler(tmp_path):
    path = tmp_path / 'crafted.pkl'
    path.write_bytes(_crafted_results_pickle())
    with pytest.raises(safe_pickle.UnsafePickle, match="numpy dtype 'V8'"):
        safe_pickle.load_results(str(path))


class _Dtype:
    def __init__(self, name, state):
        self.name, self.state = name, state

    def __reduce__(self):
        return (np.dtype, (self.name, False, True), self.state)


class _Array:
    def __init__(self, dtype, shape, raw):
        self.dtype, self.shape, self.raw = dtype, shape, raw

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        return (_reconstruct, (np.ndarray, (0,), b'b'), (1, self.shape, self.dtype, False, self.raw))


PLAIN_F4_STATE = (3, '<', None, None, None, -1, -1, 0)


@pytest.mark.parametrize('value, why', [
    # a plain type string, but a state with fields or other flags: the state is never trusted
    (_Array(_Dtype('f4', (3, '|', None, ('f0',), {'f0': (np.dtype('f4'), 0)}, 4, 1, 0)), (1,), b'\0' * 4),
     'with the state'),
    (_Array(_Dtype('f8', (3, '<', None, None, None, 8, 8, 1)), (1,), b'\0' * 8), 'with the state'),
    # declared size and bytes that disagree (numpy would read past the buffer otherwise)
    (_Array(_Dtype('f4', PLAIN_F4_STATE), (1000,), b'\0' * 8), 'declares 4000 bytes'),
    (_Array(_Dtype('f4', PLAIN_F4_STATE), (-1,), b''), 'as an array shape'),
    # arrays that numpy pickles itself but a results file never holds
    (np.array([object()], dtype=object)[:0], "dtype 'O8'"),
    (np.array(['text']), "dtype 'U4'"),
    (np.zeros(2, dtype='i4,f8'), "dtype 'V12'"),
    (np.datetime64('2022-01-01'), "dtype 'M8'"),
])
def test_every_array_and_dtype_is_checked(tmp_path, value, why):
    path = tmp_path / 'x.pkl'
    path.write_bytes(pickle.dumps({'test_classif': value}, protocol=4))
    with pytest.raises(safe_pickle.UnsafePickle, match=why):
        safe_pickle.load_results(str(path))


@pytest.mark.parametrize('protocol', [3, 4, 5])
def test_plain_values_and_numeric_arrays_load_unchanged(tmp_path, protocol):
    value = {'f4': np.arange(5, dtype=np.float32), 'big_endian': np.arange(3, dtype='>f8'),
             'fortran': np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
             'flags': np.array([True, False]), 'complex': np.complex64(1 + 2j), 'empty': np.zeros((0, 3), np.uint8),
             'scalar': np.float64(2.5), 'list': [1, None, 'x', np.int64(7)], 'pair': (1, 2.0), 'nested': {'a': [[1.5]]}}
    path = tmp_path / 'x.pkl'
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    loaded = safe_pickle.load_results(str(path))
    assert loaded.keys() == value.keys()
    for key in ('f4', 'big_endian', 'fortran', 'flags', 'empty'):
        assert loaded[key].dtype == value[key].dtype and loaded[key].shape == value[key].shape, key
        np.testing.assert_array_equal(loaded[key], value[key])
    assert loaded['fortran'].flags.f_contiguous and loaded['f4'].flags.writeable
    assert type(loaded['scalar']) is np.float64 and loaded['scalar'] == 2.5
    assert loaded['complex'] == np.complex64(1 + 2j)
    assert loaded['list'] == [1, None, 'x', 7] and loaded['pair'] == (1, 2.0) and loaded['nested'] == {'a': [[1.5]]}


RELEASE_RUNS = os.path.join(MNIST_ROOT, 'release_runs')


@pytest.mark.skipif(not os.path.isdir(RELEASE_RUNS), reason=f'no stored release runs in {RELEASE_RUNS}')
def test_all_335_release_pickles_load_exactly_as_plain_pickle_reads_them():
    paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(RELEASE_RUNS)
                   for name in names if name.endswith('.pkl'))
    assert len(paths) == 335
    for path in paths:
        loaded = safe_pickle.load_results(path)
        with open(path, 'rb') as f:
            expected = pickle.load(f)  # the release's own files: trusted here, as a reference
        assert loaded.keys() == expected.keys(), path
        for key, value in expected.items():
            if isinstance(value, np.ndarray):
                assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), (path, key)
            else:
                assert type(loaded[key]) is type(value) and loaded[key] == value, (path, key)


def test_plot_figures_skips_the_crafted_pickle_with_one_warning_and_plots_the_rest(tmp_path):
    folder = tmp_path / 'runs'
    folder.mkdir()
    for seed in (0, 1):
        files.save_pickle({'model': 'RKHS', 'num_layers': 5, 'in_channels': 32, 'dim_int': 32,
                            'pretrain_pass': 0, 'batch_size': 256,
                            'train_loss': np.linspace(2, 0.1, 40, dtype=np.float32),
                            'train_classif': np.linspace(0.9, 0.1, 5, dtype=np.float32),
                            'test_classif': np.linspace(0.9, 0.1 + seed / 100, 5, dtype=np.float32),
                            'computation_time': 10.0, 'num_parameters': 55296}, str(folder / f'good{seed}.pkl'))
    (folder / 'crafted.pkl').write_bytes(_crafted_results_pickle())
    proc = run_script('plot_figures.py', folder, '--figure', '1a', '--out_dir', tmp_path / 'figures',
                      cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    warnings = [line for line in proc.stderr.splitlines() if 'crafted.pkl' in line]
    assert len(warnings) == 1 and 'refused to unpickle it' in warnings[0], proc.stderr
    assert (tmp_path / 'figures' / 'figure1a.png').stat().st_size > 10_000


def test_a_fifo_named_like_a_pickle_fails_at_once(tmp_path):
    os.mkfifo(tmp_path / 'a.pkl')
    code = ('from resnet_ode import safe_pickle\ntry:\n    safe_pickle.load_results("a.pkl")\nexcept OSError as exc:\n'
            '    print(type(exc).__name__, exc)\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('NotARegularFile') and 'a FIFO' in proc.stdout


# --- 2. checkpoint paths are claimed too ----------------------------------------------------------

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


# --- 3 and 15. killed between the pickles and the state's removal ---------------------------------

BATCH = [*SMALL, '--epochs', '2', '--seeds', '1', '2', '--save', 'm.pkl']
SINGLE = [*SMALL, '--epochs', '2', '--seed', '3', '--save', 'x.pkl']


@pytest.fixture(scope='module')
def finished_references(tmp_path_factory):
    """The batch and the single run, uninterrupted."""
    cwd = tmp_path_factory.mktemp('references')
    for argv in (BATCH, SINGLE):
        proc = run_script('MNIST_experiments.py', *argv, cwd=cwd)
        assert proc.returncode == 0, proc.stderr
    return cwd / 'MNIST_experiments'


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


# --- 5 and 17. a batch's state cannot collide with a single run's, and is found -------------------

BATCH_357 = [*SMALL, '--epochs', '2', '--seeds', '3', '5', '7', '--save', 'q.pkl']


@pytest.fixture(scope='module')
def interrupted_batch(tmp_path_factory):
    cwd = tmp_path_factory.mktemp('interrupted_batch')
    proc = run_script('MNIST_experiments.py', *BATCH_357, cwd=cwd, env={faults.FAULT_ENV: 'step@3:SIGTERM'})
    assert proc.returncode == 143, proc.stderr
    assert sorted(p.name for p in (cwd / 'MNIST_experiments').iterdir()) == [
        'q_s3-5-7.batch-resume.pt', 'q_s3.metrics.jsonl', 'q_s5.metrics.jsonl', 'q_s7.metrics.jsonl']
    return cwd


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


# --- 7. no hang on a FIFO, /dev/zero, or a signal outside a training step -------------------------

@pytest.mark.parametrize('kind', ['dev_zero', 'fifo', 'folder'])
def test_download_refuses_a_release_name_that_is_not_a_regular_file(tmp_path, kind):
    folder = tmp_path / 'emb'
    folder.mkdir()
    target = folder / '8channels_0pass_input_embedding.pt'
    {'dev_zero': lambda: target.symlink_to('/dev/zero'), 'fifo': lambda: os.mkfifo(target),
     'folder': target.mkdir}[kind]()
    proc = run_script('resnet_ode.embeddings', '--download', '--dir', folder, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert str(target) in line and 'not a regular file' in line and 'move it away' in line


def test_resume_refuses_a_fifo_as_its_state(tmp_path):
    (tmp_path / 'MNIST_experiments').mkdir()
    os.mkfifo(tmp_path / 'MNIST_experiments' / 'f.resume.pt')
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'f.pkl', '--resume', cwd=tmp_path,
                      timeout=120)
    assert proc.returncode == 2
    assert 'resume state MNIST_experiments/f.resume.pt is not a regular file but a FIFO' in _error_line(proc.stderr)


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


# --- 8. embedding files of allowed classes, but corrupt -------------------------------------------

def _corrupt_self_containing(net):
    net.add_module('5', net)


def _corrupt_int_buffer(net):
    net[1].running_mean = net[1].running_mean.long()


def _corrupt_state_dict_attribute(net):
    net.__dict__['state_dict'] = torch.zeros(1)


def _corrupt_sparse_weight(net):
    net[0]._parameters['weight'] = nn.Parameter(net[0].weight.detach().to_sparse(), requires_grad=False)


def _corrupt_nan(net):
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float('nan')


def _corrupt_inf(net):
    with torch.no_grad():
        net[3].bias[0] = float('inf')


def _corrupt_negative_variance(net):
    net[1].running_var[0] = -1.0


def _corrupt_int64_weight(net):
    net[0]._parameters['weight'] = nn.Parameter(net[0].weight.detach().long(), requires_grad=False)


def _corrupt_complex_weight(net):
    net[3]._parameters['weight'] = nn.Parameter(net[3].weight.detach().to(torch.complex64))


@pytest.mark.parametrize('corrupt, why', [
    (_corrupt_self_containing, 'contains itself'),
    (_corrupt_int_buffer, '1.running_mean holds torch.int64, not torch.float32'),
    (_corrupt_state_dict_attribute, "attribute 'state_dict' that hides its class's"),
    (_corrupt_sparse_weight, '0.weight is stored as a torch.sparse_coo tensor'),
    (_corrupt_nan, '0.weight holds NaN or infinite values'),
    (_corrupt_inf, '3.bias holds NaN or infinite values'),
    (_corrupt_negative_variance, '1.running_var holds negative values'),
    (_corrupt_int64_weight, '0.weight holds torch.int64'),
    (_corrupt_complex_weight, '3.weight holds torch.complex64'),
])
def test_a_corrupt_embedding_file_exits_2_as_corrupt(tmp_path, monkeypatch, capsys, corrupt, why):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / 'emb'
    folder.mkdir()
    torch.manual_seed(0)
    input_net, output_net = models.mnist_input_network(8), models.mnist_output_network(8)
    corrupt(input_net)
    names = embeddings.file_names(8, 0)
    torch.save({'model': input_net, 'loss': torch.tensor(0.5)}, folder / names[0])
    torch.save({'model': output_net, 'loss': torch.tensor(0.5)}, folder / names[1])
    status = _main(['--synthetic', '--subset', '64', '--layers', '1', '--in_channels', '8', '--dim_int', '4',
                    '--epochs', '0', '--seed', '0', '--embedding_dir', 'emb', '--save', 'e.pkl'])
    assert status == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f'error: embedding file {os.path.join("emb", names[0])} is corrupt (') and why in line, line
    assert folder_snapshot(tmp_path) == ['emb', f'emb/{names[0]}', f'emb/{names[1]}']


# --- 10. absurd numbers: refused up front, or a divergence ---------------------------------------

@pytest.mark.parametrize('flags', [['--lr_init', '1e39'], ['--decay_rate', '1e308'], ['--lr_init', '1e-46'],
                                   ['--pretrain_lr', '1e39']])
def test_rates_beyond_float32_are_refused_up_front(tmp_path, monkeypatch, capsys, flags):
    monkeypatch.chdir(tmp_path)
    assert _main([*SMALL, '--epochs', '1', '--seed', '0', '--save', 'f.pkl', *flags]) == 2
    assert 'is outside the range of float32' in _error_line(capsys.readouterr().err)
    assert folder_snapshot(tmp_path) == []


def test_a_rate_that_decays_beyond_float32_is_a_divergence(tmp_path, monkeypatch, capsys):
    """Epoch 1 (one step from W = 0) is finite; its decay makes the rate 6e38, which no float32
    update can apply: the run ends as diverged in epoch 2 with its curves, exit 3, no state."""
    monkeypatch.chdir(tmp_path)
    status = _main([*SMALL, '--subset', '128', '--batch_size', '128', '--epochs', '3', '--lr_init', '2',
                    '--decay_rate', '3e38', '--decay_steps', '1', '--seed', '0', '--save', 'd.pkl'])
    assert status == 3
    assert 'the learning rate reached 6e+38 by its decays, beyond float32, before epoch 2' in capsys.readouterr().out
    results = load_results(tmp_path / 'MNIST_experiments' / 'd.pkl')
    assert results['diverged'] is True and results['diverged_epoch'] == 2
    assert results['train_loss'].shape == (1,) and results['test_classif'].shape == (2,)
    assert sorted(p.name for p in (tmp_path / 'MNIST_experiments').iterdir()) == ['d.metrics.jsonl', 'd.pkl']


@pytest.mark.parametrize('script', ['MNIST_experiments.py', 'CIFAR_experiments.py'])
def test_a_network_that_cannot_fit_in_memory_is_refused_in_one_line(tmp_path, script):
    proc = run_script(script, '--synthetic', '--layers', '100000000', '--epochs', '1', '--save', 'big.pkl',
                      cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert line.startswith('error: --layers 100000000') and 'more than this machine\'s memory' in line
    assert folder_snapshot(tmp_path) == []


# --- 11. paths that used to fail after work had started -------------------------------------------

def test_the_save_length_limit_counts_bytes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _main([*SMALL, '--epochs', '0', '--seed', '0', '--save', '€' * 80 + '.pkl']) == 2
    line = _error_line(capsys.readouterr().err)
    assert 'is too long (244 bytes;' in line, line  # 84 characters, 80 of them 3 bytes each
    assert folder_snapshot(tmp_path) == []


def test_a_folder_at_the_lock_path_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'MNIST_experiments' / '.k.lock').mkdir(parents=True)
    assert _main([*SMALL, '--epochs', '0', '--seed', '0', '--save', 'k.pkl']) == 2
    line = _error_line(capsys.readouterr().err)
    assert line == (f'error: --save: cannot lock {os.path.join("MNIST_experiments", ".k.lock")}: a folder is '
                    f'there, where this run keeps its lock file; move it away')
    assert folder_snapshot(tmp_path) == ['MNIST_experiments', 'MNIST_experiments/.k.lock']


# --- 12 and 17. embeddings.py: unwritable places and usage errors ---------------------------------

@pytest.mark.parametrize('make_dir, text', [
    (lambda tmp: tmp / 'a_file', 'is not a folder'),
    (lambda tmp: tmp / 'a_file' / 'below', 'cannot write in'),
    (lambda tmp: '/proc/no_such_folder', 'cannot write in'),
    (lambda tmp: '', 'must name a folder'),
])
def test_download_to_an_unwritable_place_is_one_line(tmp_path, monkeypatch, capsys, make_dir, text):
    (tmp_path / 'a_file').write_text('not a folder')
    monkeypatch.setattr(embeddings, 'DOWNLOAD_URL', 'http://127.0.0.1:9/')  # never reached
    status = embeddings.main(embeddings.get_args_parser().parse_args(['--download', '--dir', str(make_dir(tmp_path))]))
    assert status == 2
    assert text in _error_line(capsys.readouterr().err)
    assert folder_snapshot(tmp_path) == ['a_file']


def test_embeddings_status_of_a_file_is_an_error(tmp_path, capsys):
    (tmp_path / 'a_file').write_text('not a folder')
    assert embeddings.main(embeddings.get_args_parser().parse_args(['--dir', str(tmp_path / 'a_file')])) == 2
    assert _error_line(capsys.readouterr().err) == f'error: --dir {tmp_path / "a_file"} is not a folder'


def test_embeddings_usage_errors_are_one_line(tmp_path):
    proc = run_script('resnet_ode.embeddings', '--no_such_flag', cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == ('python -m resnet_ode.embeddings: error: unrecognized arguments: --no_such_flag '
                           '(see --help)\n')


def test_the_embedding_folder_is_ignored_by_git():
    if shutil.which('git') is None or not (REPO / '.git').exists():
        pytest.skip('not a git checkout')
    proc = subprocess.run(['git', 'check-ignore', '-q', 'MNIST_pretrained_models/8channels_0pass_input_embedding.pt'],
                          cwd=REPO)
    assert proc.returncode == 0


# --- 13. a full disk or a read-only folder mid-run ------------------------------------------------

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


# --- 14. inconsistent checkpoints and resume states -----------------------------------------------

@pytest.fixture(scope='module')
def stopped_run(tmp_path_factory):
    """A run stopped mid-epoch: its resume state and its checkpoint of epoch 0."""
    cwd = tmp_path_factory.mktemp('stopped')
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '2', '--seed', '4', '--save', 'y.pkl',
                      cwd=cwd, env={faults.FAULT_ENV: 'step@2:SIGTERM'})
    assert proc.returncode == 143, proc.stderr
    return cwd


def _edit_layers(content):
    content['args']['layers'] = 3


def _drop_args(content):
    del content['args']


def _rk45(content):
    content['args']['method'] = 'rk45'


def _drop_block(content):
    (content['parts'] if 'parts' in content else content).pop('ode_block')


def _only_format_2(content):
    content.clear()
    content['format'] = 2
    content['dataset'] = 'MNIST'


EDITS = [(_edit_layers, 'it does not fit the network'), (_drop_args, ''), (_rk45, "its method is 'rk45'"),
         (_drop_block, ''), (_only_format_2, '')]


@pytest.mark.parametrize('edit, why', EDITS)
def test_an_inconsistent_checkpoint_is_refused_in_one_line(stopped_run, tmp_path, monkeypatch, capsys, edit, why):
    monkeypatch.chdir(tmp_path)
    checkpoint = torch.load(stopped_run / 'MNIST_checkpoint' / 'y.pth', weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, tmp_path / 'edited.pth')
    assert _main(['--evaluate', 'edited.pth', '--synthetic', '--subset', '256']) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith('error: edited.pth is not a checkpoint of this project (') and why in line, line


@pytest.mark.parametrize('edit, why', EDITS)
def test_an_inconsistent_resume_state_is_refused_in_one_line(stopped_run, tmp_path, monkeypatch, capsys, edit, why):
    cwd = _copy(stopped_run, tmp_path)
    monkeypatch.chdir(cwd)
    path = cwd / 'MNIST_experiments' / 'y.resume.pt'
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    before = folder_snapshot(cwd)
    assert _main(['--synthetic', '--save', 'y.pkl', '--resume']) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f'error: resume state {os.path.join("MNIST_experiments", "y.resume.pt")} is not a '
                           f'resume state of this project (') and why in line, line
    assert folder_snapshot(cwd) == before


def test_the_checkpoints_this_code_writes_still_load(stopped_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(stopped_run)
    assert _main(['--evaluate', 'MNIST_checkpoint/y.pth', '--synthetic', '--subset', '256']) == 0
    assert 'test error' in capsys.readouterr().out


# --- 16. --evaluate refuses the flags it ignores; devices that do not exist -----------------------

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


def test_write_failures_name_their_errno():
    assert errors.describe_write_error(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))).endswith('the disk is full')
    assert errors.describe_write_error(OSError(errno.EACCES, 'Permission denied')) == (
        'Permission denied: the folder is read-only or not writable')


# --- a resume state of an earlier, unreleased layout (no learning rates, no evaluation times) ----

def test_a_state_of_an_earlier_layout_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """States written before the metrics file lack progress['learning_rates'] and ['evaluated_at'];
    no such state was ever released, so it is refused like any other foreign state, untouched."""
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '3', '--seed', '4', '--save', 'o.pkl',
                      cwd=tmp_path, env={faults.FAULT_ENV: 'step@6:SIGTERM'})  # 4 steps per epoch
    assert proc.returncode == 143, proc.stderr
    path = tmp_path / 'MNIST_experiments' / 'o.resume.pt'
    state = torch.load(path, weights_only=True)
    for progress in state['progress']:
        del progress['learning_rates'], progress['evaluated_at']
    torch.save(state, path)
    before = path.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert _main(['--synthetic', '--save', 'o.pkl', '--resume']) == 2
    assert _error_line(capsys.readouterr().err) == (
        "error: resume state MNIST_experiments/o.resume.pt is not a resume state of this project "
        "(its progress records are not this project's)")
    assert path.read_bytes() == before and not (tmp_path / 'MNIST_experiments' / 'o.pkl').exists()
