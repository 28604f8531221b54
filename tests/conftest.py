"""Shared helpers: run the real command line in a temporary folder, find the real MNIST and the
release's embedding files."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI exports the shared data folder; a developer may have it beside the repository.
DATA_ROOT_ENV = 'MNIST_DATA_ROOT'
MNIST_ROOT = os.environ.get(DATA_ROOT_ENV) or str(REPO.parent / 'shared' / 'data')
MNIST_RAW_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                   't10k-labels-idx1-ubyte')
RELEASE_DIR = os.path.join(MNIST_ROOT, 'MNIST_pretrained_models')


def require_files(paths, what: str):
    """Skip a test whose data is not on this machine, unless MNIST_DATA_ROOT is set: then the
    data is declared present, and a missing file fails the test instead of skipping it in
    silence."""
    missing = [str(path) for path in paths if not os.path.isfile(path)]
    if not missing:
        return
    message = f'{what}: {missing[0]} is missing' + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else '')
    if os.environ.get(DATA_ROOT_ENV):
        pytest.fail(f'{message}, although {DATA_ROOT_ENV} is set', pytrace=False)
    pytest.skip(f'{message} (set {DATA_ROOT_ENV})')


@pytest.fixture
def mnist_root():
    """The folder holding MNIST/raw/ with the four official files."""
    require_files([os.path.join(MNIST_ROOT, 'MNIST', 'raw', name) for name in MNIST_RAW_FILES],
                  'real MNIST')
    return MNIST_ROOT


@pytest.fixture
def release_dir():
    """The folder holding the release's 48 embedding files."""
    from resnet_ode import embeddings

    require_files([os.path.join(RELEASE_DIR, name) for name in sorted(embeddings.RELEASE_SHA256)],
                  'the release\'s embedding files')
    return RELEASE_DIR


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: a test that takes more than a few seconds on 2 CPU cores '
                                       '(real MNIST, whole processes, signals); deselect with -m "not slow"')


# The scripts run_script runs in this process when the process boundary is not what is tested:
# importing torch in a new interpreter costs about a second, and most tests start several runs.
# A script is a file of the repository's top level, or a module of the package run with -m
# ('resnet_ode.embeddings').
IN_PROCESS_SCRIPTS = ('MNIST_experiments.py', 'CIFAR_experiments.py', 'synthetic_experiments.py',
                      'resnet_ode.embeddings', 'plot_figures.py', 'reproduce.py', 'release_runs.py')


def _needs_a_process(script, env) -> bool:
    """A fault that kills or stops the process (SIGKILL, the default, or SIGSTOP) would kill or
    stop pytest itself; a SIGINT/SIGTERM fault is handled by the run, as in its own process."""
    if script not in IN_PROCESS_SCRIPTS:
        return True
    spec = (env or {}).get('RESNET_ODE_FAULT')
    if not spec:
        return False
    action = spec.partition('@')[2].partition(':')[2]
    return action in ('', 'SIGKILL', 'SIGSTOP')


def run_main(script, *args, cwd, env=None, threads=None):
    """Run a script's main(parse_args(args)) in this process, in `cwd`, with `env` added to the
    environment and `threads` torch threads if given: what a subprocess does, without starting an
    interpreter. Like a lone process it sees no RANK or WORLD_SIZE, and a fault point only if
    `env` sets one. Returns an object with returncode, stdout and stderr, as subprocess.run does:
    argparse's exits give their status, an uncaught exception status 1 with its traceback on
    stderr. The environment, working directory and thread count are restored afterwards."""
    import contextlib
    import importlib
    import io
    import traceback
    from types import SimpleNamespace

    import torch

    from resnet_ode import faults
    module = importlib.import_module(script[:-len('.py')] if script.endswith('.py') else script)
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    saved_env, previous, saved_threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    for key in ('RANK', 'WORLD_SIZE', 'RESNET_ODE_FAULT'):
        os.environ.pop(key, None)
    os.environ.update({key: value for key, value in (env or {}).items()
                       if key not in ('RANK', 'WORLD_SIZE')})
    if threads is not None:
        torch.set_num_threads(threads)
    faults.counts.clear()  # each run counts its fault points from zero, as a new process
    saved_argv, sys.argv = sys.argv, [script, *argv]  # argparse names the program from argv[0]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                # reproduce.py's own parse_args splits the flags after '--' off
                parsed = (module.parse_args(argv) if hasattr(module, 'parse_args')
                          else module.get_args_parser().parse_args(argv))
                status = module.main(parsed)
            except SystemExit as exc:  # argparse's refusals and --help
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:
                traceback.print_exc()
                status = 1
    finally:
        os.chdir(previous)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
        faults.counts.clear()
    return SimpleNamespace(returncode=status, stdout=out.getvalue(), stderr=err.getvalue())


def _parent_death_signal():
    """prctl(PR_SET_PDEATHSIG, SIGKILL), looked up here in the parent: between fork and exec the
    child only calls it (no dlopen there, whose locks another thread may hold). None off Linux."""
    if not sys.platform.startswith('linux'):
        return None
    import ctypes
    import functools
    import signal
    return functools.partial(ctypes.CDLL(None, use_errno=True).prctl, 1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


_SET_PARENT_DEATH_SIGNAL = _parent_death_signal()


def _die_with_pytest():
    """In a child, before it runs: SIGKILL it when pytest dies, so that a test session killed
    halfway never leaves a run behind (the lock holders train for 1000 epochs)."""
    if _SET_PARENT_DEATH_SIGNAL is not None:
        _SET_PARENT_DEATH_SIGNAL()


def start_process(command, **kwargs):
    """subprocess.Popen for the tests: the child dies with pytest."""
    return subprocess.Popen([str(part) for part in command], preexec_fn=_die_with_pytest, **kwargs)


def run_script(script, *args, cwd, env=None, timeout=600, process=False):
    """Run one of the repository's scripts as a user would, in `cwd`: in its own process when
    `process` is set or a fault will kill it (see _needs_a_process), else in this one (run_main),
    which gives the same exit status, stdout and stderr."""
    if not process and not _needs_a_process(script, env):
        return run_main(script, *args, cwd=cwd, env=env)
    full_env = dict(os.environ, **(env or {}))
    full_env.pop('RANK', None)
    full_env.pop('WORLD_SIZE', None)
    command = [str(REPO / script)] if script.endswith('.py') else ['-m', script]
    if not script.endswith('.py'):
        full_env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), full_env.get('PYTHONPATH')]))
    return subprocess.run([sys.executable, *command, *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_die_with_pytest)


def load_results(path):
    """Through the restricted unpickler that plot_figures.py uses: every results file the tests
    read proves that it loads without running code."""
    from resnet_ode.safe_pickle import load_results
    return load_results(path)


def folder_snapshot(folder):
    """Every file and folder under `folder`, for 'nothing was written' checks."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob('*'))

# ---------------------------------------------------------------------------------------------
# Runs that several test files start from, made once per session (tests copy them, never change them)
# ---------------------------------------------------------------------------------------------

SMALL = ['--synthetic', '--subset', '256', '--layers', '2', '--in_channels', '4', '--dim_int', '4',
         '--batch_size', '64', '--embedding_dir', 'none']
BATCH = [*SMALL, '--epochs', '2', '--seeds', '1', '2', '--save', 'm.pkl']
SINGLE = [*SMALL, '--epochs', '2', '--seed', '3', '--save', 'x.pkl']
BATCH_357 = [*SMALL, '--epochs', '2', '--seeds', '3', '5', '7', '--save', 'q.pkl']
FAULT_ENV = 'RESNET_ODE_FAULT'


@pytest.fixture(scope='session')
def finished_references(tmp_path_factory):
    """The batch and the single run, uninterrupted."""
    cwd = tmp_path_factory.mktemp('references')
    for argv in (BATCH, SINGLE):
        proc = run_script('MNIST_experiments.py', *argv, cwd=cwd)
        assert proc.returncode == 0, proc.stderr
    return cwd / 'MNIST_experiments'


@pytest.fixture(scope='session')
def interrupted_batch(tmp_path_factory):
    cwd = tmp_path_factory.mktemp('interrupted_batch')
    proc = run_script('MNIST_experiments.py', *BATCH_357, cwd=cwd, env={FAULT_ENV: 'step@3:SIGTERM'})
    assert proc.returncode == 143, proc.stderr
    assert sorted(p.name for p in (cwd / 'MNIST_experiments').iterdir()) == [
        'q_s3-5-7.batch-resume.pt', 'q_s3.metrics.jsonl', 'q_s5.metrics.jsonl', 'q_s7.metrics.jsonl']
    return cwd


@pytest.fixture(scope='session')
def stopped_run(tmp_path_factory):
    """A run stopped mid-epoch: its resume state and its checkpoint of epoch 0."""
    cwd = tmp_path_factory.mktemp('stopped')
    proc = run_script('MNIST_experiments.py', *SMALL, '--epochs', '2', '--seed', '4', '--save', 'y.pkl',
                      cwd=cwd, env={FAULT_ENV: 'step@2:SIGTERM'})
    assert proc.returncode == 143, proc.stderr
    return cwd
