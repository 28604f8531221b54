"""benchmarks/: the scripts run at tiny sizes, the release-style baseline computes what the project
computes (same loss and gradients from the same weights), and the FLOP count is right."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import models
from benchmarks import measure
from benchmarks import release_style as rs
from conftest import start_process

pytestmark = pytest.mark.slow  # whole benchmark processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {'euler': 1, 'midpoint': 2, 'rk4': 4}


def _run(script, *flags):
    env = dict(os.environ, OMP_NUM_THREADS='1')  # two small jobs side by side on a small machine
    return start_process([sys.executable, os.path.join(ROOT, 'benchmarks', script), *flags,
                             '--device', 'cpu'], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _check_report(proc, row_a, row_b, ratio):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return _check_output(out, row_a, row_b, ratio)


def _check_output(out, row_a, row_b, ratio):
    assert re.search(rf'^\| {re.escape(row_a)}.*\|$', out, re.M), out
    assert re.search(rf'^\| {re.escape(row_b)}.*\|$', out, re.M), out
    match = re.search(rf'^{re.escape(ratio)}: ([0-9.]+)x$', out, re.M)
    assert match and float(match.group(1)) > 0, out
    return out


def test_benchmark_scripts_run_at_tiny_sizes(capsys):
    """bench_mnist.py and bench_cifar.py as subprocesses, while bench_mnist --whole_process runs
    in this process (it starts MNIST_experiments.py and release_style.py itself)."""
    from benchmarks import bench_mnist

    mnist = _run('bench_mnist.py', '--synthetic', '--subset', '256', '--layers', '2',
                 '--batch_size', '128', '--warmup_steps', '0')
    cifar = _run('bench_cifar.py', '--synthetic', '--subset', '8', '--layers', '1',
                 '--batch_size', '8', '--warmup_steps', '0', '--pipelines', 'a,b,c',
                 '--channels_last', '--amp')
    threads = torch.get_num_threads()
    try:
        status = bench_mnist.main(['--synthetic', '--subset', '128', '--layers', '1',
                                   '--batch_size', '128', '--whole_process', '--threads', '1',
                                   '--device', 'cpu'])
    finally:
        torch.set_num_threads(threads)
    whole = capsys.readouterr().out
    assert status == 0, whole
    _check_output(whole, 'a: release_style.py', 'b: MNIST_experiments.py',
                  'speedup b/a, whole process (data load, evaluation, 1 epoch, evaluation), best runs')
    assert 'speedup b/a, whole process (data load, evaluation, 1 epoch, evaluation), medians' in whole
    out = _check_report(mnist, 'a: release-style', 'b: project', 'speedup b/a, epoch incl. evals')
    assert 'speedup b/a, training images/s' in out and 'train GFLOP/s' in out
    assert 'CPU: ' in out and f'torch {torch.__version__}' in out and 'device: cpu' in out
    out = _check_report(cifar, 'a: torchvision-style', 'b: project', 'speedup b/a, epoch incl. evals')
    _check_output(out, 'b: project', 'c: project with speed options', 'speedup c/b, epoch incl. evals')
    assert 'channels_last True, amp True' in out  # the config line: c's speed options


@pytest.mark.parametrize('script, flags', [
    ('bench_mnist.py', ['--pipelines', 'b,c']), ('bench_mnist.py', ['--compile']),
    ('bench_cifar.py', ['--pipelines', 'b,c']), ('bench_cifar.py', ['--amp']),
])
def test_pipeline_c_and_its_options_go_together(capsys, script, flags):
    """Refused by the parser (argparse's exit 2), before anything is built: in this process."""
    import importlib
    bench = importlib.import_module(f'benchmarks.{script[:-len(".py")]}')
    with pytest.raises(SystemExit) as refusal:
        bench.main(['--synthetic', *flags, '--device', 'cpu'])
    err = capsys.readouterr().err
    assert refusal.value.code == 2 and 'pipeline c is b with' in err, err


def _weighted_nets(model, method, seed=0):
    torch.manual_seed(seed)
    net = models.MNISTODENet(model, 6, 5, 4, method, 'release', 'fixed')
    net.freeze_embedding()
    with torch.no_grad():  # the output layers start at zero; make every node count
        for p in net.ode_block.parameters():
            p.normal_(0, 0.3)
    return net, rs.release_net_from(net)


@pytest.mark.parametrize('model', list(models.RESIDUALS))
@pytest.mark.parametrize('method', models.METHODS)
def test_release_style_matches_project(model, method):
    """Same batch, same weights: odeint + blended outputs == fixed integrator + interpolated
    weights, loss and gradients, to float tolerance."""
    net, release = _weighted_nets(model, method)
    images, labels = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    net.train()
    release.train()
    net.ode_block.nfe = 0
    loss = F.cross_entropy(net(images), labels)
    loss.backward()
    release_loss = F.cross_entropy(release(images), labels)
    release_loss.backward()
    # The release-style path really went through odeint, one f call per stage per step.
    assert release.ode_block.nfe == net.ode_block.schedule.num_evaluations
    assert release.ode_block.nfe == STAGES[method] * len(net.ode_block.schedule.step_sizes)
    with torch.no_grad():  # the weighted block does something: the identity block gives another loss
        identity = net.output_net(net.input_net(images))
    assert abs(loss.item() - F.cross_entropy(identity, labels).item()) > 1e-3
    torch.testing.assert_close(release_loss, loss, rtol=1e-5, atol=1e-6)
    project_params = dict(net.ode_block.named_parameters())
    for name, p in release.ode_block.named_parameters():
        grad = project_params[name].grad
        assert grad is not None and p.grad is not None and grad.abs().max() > 0
        torch.testing.assert_close(p.grad, grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()))


def test_release_style_takes_project_weights_strictly():
    net, release = _weighted_nets('SHL', 'midpoint')
    project_state = net.state_dict()
    release_state = release.state_dict()
    assert set(project_state) == set(release_state)
    for key, value in project_state.items():
        assert torch.equal(release_state[key], value)


def _aten_conv_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()['Global']
    return sum(v for k, v in counts.items() if 'convolution' in str(k))


@pytest.mark.parametrize('which', ['project-RKHS', 'release-RKHS', 'project-SHL', 'cifar-RKHS'])
def test_conv_flop_count_matches_torch_flop_counter(which):
    """The analytic count (forward + input/weight gradients as needed) equals what torch's
    FlopCounterMode sees in the aten convolution and convolution_backward calls."""
    torch.manual_seed(0)
    if which.startswith('cifar'):
        net = models.CifarResNet('RKHS', 1)
        images = torch.randn(2, 3, 32, 32)
    else:
        model = which.split('-')[1]
        net, release = _weighted_nets(model, 'midpoint')
        net = release if which.startswith('release') else net
        images = torch.rand(2, 1, 28, 28)
    net.train()

    def step():
        logits = net(images)
        logits.sum().backward()

    with measure.ConvFlopCounter() as ours:
        logits = net(images)
    logits.sum().backward()
    expected = _aten_conv_flops(step)
    assert ours.total == expected
    if which == 'project-RKHS':  # the formula by hand: C=6, dim_int=5, 2 images
        conv = 2 * 6 * 5 * 9 * 5 * 5                      # 2*Cin*Cout*9*H*W, Omega and W alike
        input_net = 2 * 1 * 6 * 16 * 13 * 13 + 2 * 6 * 6 * 16 * 5 * 5  # frozen: forward only
        evaluations = net.ode_block.schedule.num_evaluations
        # first evaluation: A(x) needs no gradient, so Omega 1x and W 2x (weight gradient only);
        # then Omega 2x (input gradient) and W 3x.
        per_image = input_net + 3 * conv + 5 * conv * (evaluations - 1)
        assert ours.total == 2 * per_image


def test_seed_batching_benchmark_runs_and_reports_every_k():
    proc = _run('bench_seeds.py', '--synthetic', '--subset', '256', '--layers', '1', '--in_channels', '4',
                '--dim_int', '4', '--ks', '1,3')
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    rows = re.findall(r'^\| (\d+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+)x \|$', out, re.M)
    assert [row[0] for row in rows] == ['1', '3']
    for k, batched_s, batched_rate, sequential_s, sequential_rate, ratio in rows:
        # seconds are printed to 0.01 s: the rate must match them within that rounding
        assert abs(int(k) - float(batched_rate) * float(batched_s)) <= 0.0051 * float(batched_rate) + 0.001
        assert abs(int(k) - float(sequential_rate) * float(sequential_s)) <= 0.0051 * float(sequential_rate) + 0.001
        assert float(ratio) > 0
    assert re.search(r'single run, seed 2: [0-9.]+ s', out)  # K single runs for the largest K
