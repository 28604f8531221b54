"""torchrun on CPU with gloo and 2 processes: same maths as one process on the global batch."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import models
from conftest import REPO, load_results, run_script, start_process
from resnet_ode import distributed

pytestmark = pytest.mark.slow  # torchrun: several processes and a rendezvous per test

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def _torchrun(*args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE')}
    return subprocess.run([*TORCHRUN, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:  # held open together, so the ports differ
        for sock in sockets:
            sock.bind(('127.0.0.1', 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    """One torchrun of tests/ddp_first_step.py: the first step's gradient (ddp.pt), then every
    rank's pretrained A and B (rank0.pt, rank1.pt)."""
    folder = tmp_path_factory.mktemp('two_ranks')
    ranks = _torchrun(REPO / 'tests' / 'ddp_first_step.py', folder / 'ddp.pt', folder / 'rank', cwd=folder)
    assert ranks.returncode == 0, ranks.stderr
    return folder


def test_first_step_gradient_equals_one_process(tmp_path, two_ranks):
    import ddp_first_step
    ddp_first_step.first_step(tmp_path / 'single.pt', distributed.SINGLE)  # one process: this one
    one = torch.load(tmp_path / 'single.pt', weights_only=True)
    two = torch.load(two_ranks / 'ddp.pt', weights_only=True)
    assert torch.count_nonzero(one['grads'][0]) > 0
    for g_one, g_two in zip(one['grads'], two['grads']):
        # Summation order differs (two half-batch sums, then an all-reduce): float tolerance.
        torch.testing.assert_close(g_two, g_one, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(two['loss'], one['loss'], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('script, extra', [
    ('MNIST_experiments.py', ['--layers', '3', '--in_channels', '8', '--dim_int', '4']),
])
def test_one_epoch_under_two_ranks_matches_one_process(tmp_path, script, extra):
    common = ['--synthetic', '--subset', '1024', '--epochs', '1', '--seed', '2', *extra]
    ranks = _torchrun(REPO / script, *common, '--save', 'ddp.pkl', cwd=tmp_path)
    assert ranks.returncode == 0, ranks.stderr
    single = run_script(script, *common, '--save', 'one.pkl', cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    folder = tmp_path / 'MNIST_experiments'
    ddp, one = load_results(folder / 'ddp.pkl'), load_results(folder / 'one.pkl')
    assert sorted(p.name for p in folder.iterdir()) == [  # rank 0 wrote once
        'ddp.metrics.jsonl', 'ddp.pkl', 'one.metrics.jsonl', 'one.pkl']
    assert ddp['train_loss'].shape == (4,) and ddp['world_size'] == 2
    # Not bit-exact: each global batch is summed as two half-batches plus an all-reduce, so the
    # gradients differ in the last float bits and 4 SGD steps carry that forward. 1e-4 relative
    # is far above that rounding and far below any real difference in the maths.
    np.testing.assert_allclose(ddp['train_loss'], one['train_loss'], rtol=1e-4)
    np.testing.assert_allclose(ddp['test_classif'], one['test_classif'], atol=2 / 1024)
    np.testing.assert_allclose(ddp['train_classif'], one['train_classif'], atol=2 / 1024)


BAD_FLAGS = [['--layers', '0'], ['--batch_size', '255']]


@pytest.mark.parametrize('bad', BAD_FLAGS)
def test_bad_flag_exits_2_on_each_rank_before_any_collective(tmp_path, bad):
    # Both ranks are started by hand with torchrun's environment, each pointed at its own unused
    # port, so they can never meet: a rank that reached init_process_group would wait there and
    # the test would time out instead of seeing status 2.
    # (Under torchrun itself the agent stops the slower rank as soon as one fails, so whether the
    # second rank gets to print its own line there is a race; this test removes the race.)
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    env.update(WORLD_SIZE='2', MASTER_ADDR='127.0.0.1')
    ports = _free_ports(2)
    procs = [start_process([sys.executable, str(REPO / 'MNIST_experiments.py'), '--synthetic',
                               *bad, '--save', 'x.pkl'], cwd=tmp_path, text=True,
                              env={**env, 'RANK': str(rank), 'LOCAL_RANK': str(rank),
                                   'MASTER_PORT': str(ports[rank])},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in (0, 1)]
    try:
        for rank, proc in enumerate(procs):
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 2, (rank, stderr)
            assert len(stderr.splitlines()) == 1 and stderr.startswith('error:'), (rank, stderr)
    finally:
        for proc in procs:
            proc.kill()
    assert not (tmp_path / 'MNIST_experiments').exists()


def test_bad_flag_under_torchrun_fails_with_status_2_without_hanging(tmp_path):
    # One bad flag under torchrun itself (both are checked on each rank above): the batch that
    # only two processes make wrong.
    proc = _torchrun(REPO / 'MNIST_experiments.py', '--synthetic', *BAD_FLAGS[1], '--save', 'x.pkl',
                     cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    # One line per rank that got to print before torchrun stopped the others; all the same line.
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, proc.stderr
    assert 'exitcode  : 2' in proc.stderr, proc.stderr  # the root cause torchrun reports
    assert not (tmp_path / 'MNIST_experiments').exists()


def test_pretrained_embedding_is_identical_on_every_rank(two_ranks):
    rank0, rank1 = (torch.load(two_ranks / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)

        initial = models.mnist_input_network(4).state_dict()
    assert not torch.equal(initial['0.weight'], rank0['input_net']['0.weight'])  # it was trained
    for part in ('input_net', 'output_net'):
        for key, value in rank0[part].items():
            assert torch.equal(value, rank1[part][key]), (part, key)
