"""Crafted or special files are read safely: no code runs, no native crash, no hang, one line.

Results pickles, checkpoints, resume states, MNIST data files and embedding files: a crafted one
is refused without running its code, a FIFO or a truncated, corrupt or foreign file is named
in one line (a warning where plotting skips it), and the files the release and this code wrote
still load.
"""
import os
import pickle
import pickletools
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import MNIST_experiments
import models
import plot_figures
from conftest import MNIST_ROOT, REPO, SMALL, folder_snapshot, run_script
from resnet_ode import embeddings, faults, files, safe_pickle


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


class _RunsCode:
    """Unpickling this would run code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


# --- crafted checkpoints are refused and their code never runs ------------------------------------

@pytest.mark.parametrize('use', ['evaluate', 'resume'])
def test_crafted_checkpoint_is_refused_and_its_code_never_runs(tmp_path, use):
    marker = tmp_path / 'pwned'
    payload = {'format': 1, 'dataset': 'MNIST', 'args': {}, 'evil': _RunsCode(str(marker))}
    if use == 'evaluate':
        path = tmp_path / 'evil.pth'
        argv = ['--evaluate', 'evil.pth']
    else:
        (tmp_path / 'MNIST_experiments').mkdir()
        path = tmp_path / 'MNIST_experiments' / 'r.resume.pt'
        argv = ['--save', 'r.pkl', '--resume']
    torch.save(payload, path)
    proc = run_script('MNIST_experiments.py', '--synthetic', *argv, cwd=tmp_path)
    assert proc.returncode == 2 and 'refusing to load' in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not marker.exists()


# --- results pickles are read without running code ------------------------------------------------

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


# --- a crafted results pickle: no native crash, refused in one warning ----------------------------

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


# --- no hang on a FIFO ----------------------------------------------------------------------------

def test_a_fifo_named_like_a_pickle_fails_at_once(tmp_path):
    os.mkfifo(tmp_path / 'a.pkl')
    code = ('from resnet_ode import safe_pickle\ntry:\n    safe_pickle.load_results("a.pkl")\nexcept OSError as exc:\n'
            '    print(type(exc).__name__, exc)\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('NotARegularFile') and 'a FIFO' in proc.stdout


def test_resume_refuses_a_fifo_as_its_state(tmp_path):
    (tmp_path / 'MNIST_experiments').mkdir()
    os.mkfifo(tmp_path / 'MNIST_experiments' / 'f.resume.pt')
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'f.pkl', '--resume', cwd=tmp_path,
                      timeout=120)
    assert proc.returncode == 2
    assert 'resume state MNIST_experiments/f.resume.pt is not a regular file but a FIFO' in _error_line(proc.stderr)


# --- MNIST data files: truncated or corrupt, named, no traceback, nothing left behind -------------

def test_truncated_data_file_is_named(tmp_path):
    raw = tmp_path / 'data' / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for name in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                 't10k-labels-idx1-ubyte'):
        (raw / name).write_bytes(b'\x00' * 1000)  # far too short
    proc = run_script('MNIST_experiments.py', '--data_root', tmp_path / 'data', '--save', 'x.pkl',
                      cwd=tmp_path)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert 'train-images-idx3-ubyte' in proc.stderr and 'truncated or corrupt' in proc.stderr
    assert not (tmp_path / 'MNIST_experiments').exists()


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


# --- messages that say what is wrong with which file ----------------------------------------------

@pytest.fixture
def interrupted_run(tmp_path):
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '2', '--seed', '3', '--save', 'x.pkl',
                      cwd=tmp_path, env={'RESNET_ODE_FAULT': 'step@3:SIGTERM'})
    assert proc.returncode == 143, proc.stderr
    return tmp_path


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


# --- inconsistent checkpoints and resume states ---------------------------------------------------

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


# --- a resume state of an earlier, unreleased layout (no learning rates, no evaluation times) -----

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


# --- embedding files of allowed classes, but corrupt ----------------------------------------------

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
