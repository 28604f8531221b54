"""models.py: parameter counts, initialisation, time interpolation, integration exactness."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchdiffeq

import models

STAGES = {'euler': 1, 'midpoint': 2, 'rk4': 4}
MODELS = ('RKHS', 'SHL')


# --- parameter counts (the reference runs' numbers) -------------------------------------------

@pytest.mark.parametrize('model, layers, channels, expected', [
    ('RKHS', 5, 32, 55_296), ('RKHS', 10, 32, 101_376), ('RKHS', 20, 32, 193_536),
    ('RKHS', 20, 8, 12_096), ('RKHS', 20, 4, 3_024),
    ('SHL', 5, 32, 110_592), ('SHL', 10, 32, 202_752), ('SHL', 20, 32, 387_072),
])
def test_ode_block_parameter_count(model, layers, channels, expected):
    block = models.ResidualODEBlock(model, channels, channels, layers)
    assert models.count_trainable_parameters(block) == expected
    per_node = channels * channels * 9 * (1 if model == 'RKHS' else 2)
    assert expected == (layers + 1) * per_node


@pytest.mark.parametrize('model, layers, expected', [
    ('RKHS', 1, 5_858_122), ('RKHS', 10, 11_166_538), ('RKHS', 20, 17_064_778),
    ('SHL', 1, 9_986_890), ('SHL', 10, 20_603_722), ('SHL', 20, 32_400_202),
])
def test_cifar_parameter_count(model, layers, expected):
    assert models.count_trainable_parameters(models.CifarResNet(model, layers)) == expected


# --- initialisation -----------------------------------------------------------------------------

@pytest.mark.parametrize('model', MODELS)
@pytest.mark.parametrize('method', models.METHODS)
@pytest.mark.parametrize('time_weights', models.TIME_WEIGHTS)
def test_block_is_identity_at_initialisation(model, method, time_weights):
    block = models.ResidualODEBlock(model, 6, 5, 4, method, time_weights)
    x = torch.randn(3, 6, 5, 5)
    assert torch.equal(block(x), x)


def test_cifar_blocks_start_as_their_shortcut():
    net = models.CifarResNet('SHL', 1)
    block = net.layer3[0]
    x = torch.randn(2, 128, 8, 8)
    block.eval()
    assert torch.equal(block(x), block.shortcut(x))
    for blk in net.modules():
        if isinstance(blk, models.ResidualBlock):
            assert torch.count_nonzero(blk.conv2.weight) == 0


def test_rkhs_hidden_layers_are_fixed_and_correctly_scaled():
    torch.manual_seed(0)
    block = models.ResidualODEBlock('RKHS', 32, 32, 3)
    omega = block.func.omega.weight
    assert not any(p is omega for p in block.parameters())
    assert abs(omega.var().item() - 1 / (3 * 32)) < 0.1 / (3 * 32)
    before = omega.clone()
    optimizer = torch.optim.SGD([p for p in block.parameters() if p.requires_grad], lr=1.0)
    x = torch.randn(4, 32, 5, 5)
    block(x).square().sum().backward()
    optimizer.step()
    assert torch.equal(omega, before)
    assert torch.count_nonzero(block.func.output_weight) > 0  # W did move

    net = models.CifarResNet('RKHS', 1)
    conv1 = net.layer3[0].conv1.weight
    assert isinstance(net.layer3[0].conv1, models.FixedConv2d)
    assert abs(conv1.var().item() - 1 / (9 * 128)) < 0.1 / (9 * 128)


# --- time interpolation -----------------------------------------------------------------------

def _set_nodes(module, generator):
    """Give every trained node a known random value (the output layers start at zero)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def _rkhs_by_hand(func, t_nodes, x):
    """Blend the outputs of two convolutions: the release's way of computing the same maths."""
    hidden = F.relu(F.conv2d(x, func.omega.weight, padding=1))
    return sum(w * F.conv2d(hidden, func.output_weight[i], padding=1) for i, w in t_nodes)


def _shl_by_hand(func, t_nodes, x):
    out = 0
    for i, w in t_nodes:
        out = out + w * F.conv2d(F.relu(F.conv2d(x, func.hidden_weight[i], padding=1)),
                                 func.output_weight[i], padding=1)
    return out


BY_HAND = {'RKHS': _rkhs_by_hand, 'SHL': _shl_by_hand}


@pytest.mark.parametrize('model', MODELS)
def test_reference_is_the_papers_formula(model):
    """Each type's `reference` is its equation as written in the paper (models.py docstring)."""
    func = models.RESIDUALS[model](3, 5, 4, 'linear')
    _set_nodes(func, torch.Generator().manual_seed(4))
    x = torch.randn(2, 3, 5, 5)
    for nodes in ([(2, 1.0)], [(1, 0.25), (2, 0.75)], [(3, -0.5), (4, 1.5)]):
        torch.testing.assert_close(func.reference(x, nodes), BY_HAND[model](func, nodes, x),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('model', MODELS)
def test_linear_interpolation_at_nodes_and_mid_intervals(model):
    N = 4
    func = models.RESIDUALS[model](3, 5, N, 'linear')
    _set_nodes(func, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 5, 5)
    for k in range(N + 1):  # at node times, f uses node k alone
        expected = func.reference(x, [(k, 1.0)])
        torch.testing.assert_close(func(torch.tensor(k / N), x), expected, rtol=1e-5, atol=1e-6)
    for k in range(N):
        for s in (0.25, 0.5, 0.75):  # the fast path (stacked kernels for SHL) against the formula
            expected = func.reference(x, [(k, 1 - s), (k + 1, s)])
            torch.testing.assert_close(func(torch.tensor((k + s) / N), x), expected,
                                       rtol=1e-5, atol=1e-6)


def test_rkhs_release_extrapolates_at_half_steps():
    N = 5
    func = models.RKHSField(3, 4, N, 'release')
    _set_nodes(func, torch.Generator().manual_seed(2))
    x = torch.randn(2, 3, 5, 5)
    t = torch.tensor(2.5 / N)  # t_2 + h/2: the release uses -1/2 W_1 + 3/2 W_2
    expected = func.reference(x, [(1, -0.5), (2, 1.5)])
    torch.testing.assert_close(func(t, x), expected, rtol=1e-5, atol=1e-6)


def _release_formula_float32(t, N, model):
    """The release's index and weights, recomputed here in numpy float32."""
    u = np.float32(t) * np.float32(N)
    k = int(np.float32(u - np.float32(1))) if model == 'RKHS' else int(u)
    if k >= N:
        return N, N, 1.0, 0.0
    w0 = np.float32(np.float32(np.float32(1) - u) + np.float32(k))
    w1 = np.float32(u - np.float32(k))
    return k % (N + 1), k + 1, float(w0), float(w1)


@pytest.mark.parametrize('model', MODELS)
@pytest.mark.parametrize('method', models.METHODS)
@pytest.mark.parametrize('N', [5, 20])
def test_release_schedule_pinned_to_the_release_formula(model, method, N):
    recorded = []

    def f(t, y):
        recorded.append(t.item())
        return torch.zeros_like(y)

    torchdiffeq.odeint(f, torch.zeros(()), torch.tensor([0.0, 1.0]), method=method,
                       options={'step_size': 1 / N})
    schedule = models.build_schedule(N, method, 'release', models.RESIDUALS[model].release_index_shift)
    assert list(schedule.times) == recorded
    for t, pair, weights in zip(recorded, schedule.node_pairs, schedule.node_weights):
        assert (*pair, *weights) == _release_formula_float32(t, N, model)
    if model == 'RKHS' and method != 'rk4':
        # A consequence: the last node W_N never carries weight in training.
        assert all(w == 0.0 for pair, ws in zip(schedule.node_pairs, schedule.node_weights)
                   for i, w in zip(pair, ws) if i == N)
    if model == 'RKHS' and method == 'midpoint':
        half_steps = schedule.node_weights[3::2]  # t_n + h/2 for n >= 1
        assert all(abs(w0 + 0.5) < 1e-5 and abs(w1 - 1.5) < 1e-5 for w0, w1 in half_steps)


def test_node_snapping_for_every_stage_up_to_1000_steps():
    """Float32 stage times land in the right interval: (k, s) gives the exact point n + c."""
    thirds = (np.float32(1 / 3), np.float32(2 / 3))
    for N in list(range(1, 160)) + [333, 499, 500, 997, 999, 1000]:
        grid = torch.linspace(0, 1, N + 1).numpy()
        t0, t1 = grid[:-1], grid[1:]
        dt = t1 - t0
        stage_times = {0.0: t0, 0.5: t0 + np.float32(0.5) * dt, 1 / 3: t0 + dt * thirds[0],
                       2 / 3: t0 + dt * thirds[1], 1.0: t1}
        for c, times in stage_times.items():
            for n, t in enumerate(times):
                k, _, w0, s = models.linear_coefficients(float(t), N)
                exact = n + c
                if c in (0.0, 1.0):  # a node is hit exactly, whichever interval names it
                    assert k + s == exact and s in (0.0, 1.0), (N, n, c, k, s)
                else:
                    assert k == n and abs(s - c) < 1e-3, (N, n, c, k, s)


# --- integration ------------------------------------------------------------------------------

@pytest.mark.parametrize('integrator', models.INTEGRATORS)
@pytest.mark.parametrize('method', models.METHODS)
def test_function_evaluation_counts(integrator, method):
    N = 6
    block = models.ResidualODEBlock('SHL', 2, 2, N, method, 'linear', integrator)
    block(torch.randn(1, 2, 5, 5))
    assert block.nfe == STAGES[method] * N


@pytest.mark.parametrize('integrator', models.INTEGRATORS)
@pytest.mark.parametrize('N', [3, 7, 61, 1000])
def test_exactly_n_steps_for_awkward_n(integrator, N):
    schedule = models.linear_schedule(N, 'euler')
    assert len(schedule.step_sizes) == N and all(dt == 1 / N for dt in schedule.step_sizes)
    block = models.ResidualODEBlock('RKHS', 1, 1, N, 'euler', 'linear', integrator)
    block(torch.randn(1, 1, 2, 2))
    assert block.nfe == N


def test_torchdiffeq_step_size_grid_can_add_a_step():
    """Why the linear schedule builds its own grid: step_size=1/N rounds into N+1 steps."""
    extra = [N for N in range(1, 200)
             if len(models.torchdiffeq_step_size_calls(N, 'euler')[1]) != N]
    assert extra, 'expected torchdiffeq to add a rounding step for some N'
    assert all(len(models.linear_schedule(N, 'euler').step_sizes) == N for N in extra)


@pytest.mark.parametrize('model', MODELS)
@pytest.mark.parametrize('method', models.METHODS)
@pytest.mark.parametrize('time_weights', models.TIME_WEIGHTS)
def test_fixed_integrator_matches_torchdiffeq_odeint(model, method, time_weights):
    """Outputs and gradients of the fast path equal torchdiffeq.odeint on the same field."""
    torch.manual_seed(0)
    block = models.ResidualODEBlock(model, 4, 3, 5, method, time_weights)
    _set_nodes(block.func, torch.Generator().manual_seed(3))
    x = torch.randn(2, 4, 5, 5)

    def run(integrator):
        block.zero_grad()
        block.integrator = integrator
        out = block(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in block.parameters()]

    out_fixed, grads_fixed = run('fixed')
    t, options = block.odeint_times('cpu')
    block.zero_grad()
    out_ref = torchdiffeq.odeint(block.func, x, t, method=method, options=options)[-1]
    out_ref.square().sum().backward()
    grads_ref = [p.grad.clone() for p in block.parameters()]
    torch.testing.assert_close(out_fixed, out_ref.detach(), rtol=1e-5, atol=1e-6)
    for g_fixed, g_ref in zip(grads_fixed, grads_ref):
        torch.testing.assert_close(g_fixed, g_ref, rtol=1e-4, atol=1e-5)
    if time_weights == 'release':  # same grid, same field: bit-identical
        assert torch.equal(out_fixed, out_ref.detach())


def _linear_ode_error(method, N):
    """y' = (1 + t) A y, y(0) = y0, so y(1) = expm(1.5 A) y0. Float64."""
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=generator, dtype=torch.float64) * 0.5
    y0 = torch.randn(4, dtype=torch.float64, generator=generator)
    schedule = models.linear_schedule(N, method)
    field = lambda e, y: (1 + schedule.times[e]) * (A @ y)
    y1 = models.integrate_fixed_grid(field, y0, schedule.step_sizes, method)
    exact = torch.linalg.matrix_exp(1.5 * A) @ y0
    return (y1 - exact).norm().item()


@pytest.mark.parametrize('method, order', [('euler', 1), ('midpoint', 2), ('rk4', 4)])
def test_convergence_order_on_a_linear_ode(method, order):
    errors = [_linear_ode_error(method, N) for N in (8, 16, 32)]
    for coarse, fine in zip(errors, errors[1:]):
        assert math.log2(coarse / fine) == pytest.approx(order, abs=0.3)


# --- shapes -------------------------------------------------------------------------------------

def test_mnist_network_shapes():
    net = models.MNISTODENet('SHL', in_channels=8, dim_int=4, layers=3)
    assert net.input_net(torch.zeros(5, 1, 28, 28)).shape == (5, 8, 5, 5)
    assert net(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


@pytest.mark.parametrize('model', MODELS)
def test_cifar_network_shapes(model):
    net = models.CifarResNet(model, 1)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize('model', MODELS)
def test_compiled_network_matches_eager_without_recompiling(model):
    """torch.compile (as --compile uses it) traces the network once and computes the same thing.

    The aot_eager backend runs the same Dynamo capture and guards as the default inductor backend,
    without the C++ build. A guard on a changing Python value (the nfe counter once was one)
    recompiled the model every step; error_on_recompile turns that into a failure here.
    """
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = models.MNISTODENet(model, 4, 3, 3, 'midpoint', 'release')
    _set_nodes(net.ode_block.func, torch.Generator().manual_seed(3))
    compiled = torch.compile(net, backend='aot_eager')
    images = torch.rand(3, 8, 1, 28, 28, generator=torch.Generator().manual_seed(1))

    def step(forward, batch):
        net.zero_grad()
        out = forward(batch)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in net.ode_block.parameters()]

    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in images:
            out_compiled, grads_compiled = step(compiled, batch)
            out_eager, grads_eager = step(net, batch)
            torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-6)
            for g_compiled, g_eager in zip(grads_compiled, grads_eager):
                torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# --- the residual-type registry -----------------------------------------------------------------

class LinearField(models.ResidualField):
    """A third residual type, only for this test: f(t, x) = W(t) * x, no hidden layer."""

    name = 'LIN'
    release_index_shift = 0

    def __init__(self, dim, dim_int, num_steps, time_weights='release'):
        super().__init__(dim, dim_int, num_steps, time_weights)
        self.output_weight = torch.nn.Parameter(torch.zeros(num_steps + 1, dim, dim, 3, 3))

    def reference(self, x, nodes):
        return models.conv3x3(x, sum(w * self.output_weight[i] for i, w in nodes))

    def prepare(self, index, weight, slots):
        return (self.output_weight[index] * weight[:, :, None, None, None, None]).sum(1)

    def evaluate(self, x, prepared, e):
        self.count_evaluation()
        return models.conv3x3(x, prepared[e])

    @staticmethod
    def cifar_first_conv(in_planes, planes, stride):
        return torch.nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)


def test_a_new_residual_type_is_one_class_and_one_registry_entry(monkeypatch, tmp_path):
    monkeypatch.setitem(models.RESIDUALS, 'LIN', LinearField)
    block = models.ResidualODEBlock('LIN', 4, 4, 3, 'midpoint', 'release')
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(block(x), x)  # identity at initialisation, as the contract's zero nodes give
    _set_nodes(block.func, torch.Generator().manual_seed(5))
    t, options = block.odeint_times('cpu')
    assert torch.equal(block(x), torchdiffeq.odeint(block.func, x, t, method='midpoint', options=options)[-1])
    torch.testing.assert_close(block.func(torch.tensor(0.5), x),
                               block.func.reference(x, [(1, 0.5), (2, 0.5)]), rtol=1e-5, atol=1e-6)
    assert models.CifarResNet('LIN', 1)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)

    import MNIST_experiments  # the script offers it as --model LIN and trains it
    monkeypatch.chdir(tmp_path)
    args = MNIST_experiments.get_args_parser().parse_args(
        ['--model', 'LIN', '--synthetic', '--subset', '64', '--layers', '2', '--in_channels', '4',
         '--dim_int', '4', '--epochs', '1', '--batch_size', '32', '--seed', '0',
         '--embedding_dir', 'none', '--save', 'lin.pkl'])
    assert MNIST_experiments.main(args) == 0
    import pickle
    with open(tmp_path / 'MNIST_experiments' / 'lin.pkl', 'rb') as f:
        results = pickle.load(f)
    assert results['model'] == 'LIN' and results['num_parameters'] == 3 * 4 * 4 * 9
    assert results['train_loss'].shape == (2,)
