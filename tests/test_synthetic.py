"""The synthetic experiment (synthetic_experiments.py): the release's computation reproduced to
1e-6, its flags and pickle keys, refusals, divergence, interruption, and the fixed defects."""
import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchdiffeq

from conftest import REPO, folder_snapshot, load_results, run_script

sys.path.insert(0, str(REPO))
import models
import synthetic_experiments
from resnet_ode import plotting, protocol, recorded_runs

RELEASE_KEYS = {'model', 'matrix', 'num_layers', 'N', 'q', 'r', 'train loss', 'test loss',
                'computation_time', 'num_parameters'}


def run_main(tmp_path, *argv):
    """The script's main, in-process, writing into tmp_path/out (unless argv says where); (status,
    pickle or None)."""
    args = synthetic_experiments.get_args_parser().parse_args(
        ['--results_dir', str(tmp_path / 'out'), *map(str, argv)])
    status = synthetic_experiments.main(args)
    path = tmp_path / 'out' / args.save
    return status, (load_results(path) if path.exists() else None)


# ---------------------------------------------------------------------------------------------
# A transcription of the release's synthetic.py computation (rbarboni/FlowResNets), written
# for this test: its ODE functions as torchdiffeq calls them, its nn.Linear layers (whose
# constructors draw from the global RNG), its odeint call and its full-batch SGD loop.
# ---------------------------------------------------------------------------------------------

class ReleaseRKHSFunction(nn.Module):
    """f(t, x) = W(t) ReLU(Omega x) as the release's RKHS_ODEfunc computes it: the outputs of
    nodes k and k+1 blended, with k = int(tN - 1)."""

    def __init__(self, q, r, layers, nu):
        super().__init__()
        self.features = nn.Linear(q, r, bias=False)
        if nu >= 0:
            gaussian = torch.randn(r, q)
            chi2 = torch.distributions.chi2.Chi2(df=2 * nu).sample(sample_shape=(r,))
            omega = gaussian / torch.sqrt(chi2 / (2 * nu))[:, None]
            omega = (omega - torch.mean(omega, axis=0)[None, :]) / r ** 0.5
        else:
            omega = torch.randn(r, q) / r ** 0.5
        self.features.weight = nn.Parameter(omega, requires_grad=False)
        self.layers = layers
        self.nodes = nn.ModuleList(nn.Linear(r, q, bias=False) for _ in range(layers + 1))
        for node in self.nodes:
            node.weight = nn.Parameter(torch.zeros_like(node.weight))

    def forward(self, t, x):
        k = int(t * self.layers - 1)
        hidden = F.relu(self.features(x))
        if k >= self.layers:
            return self.nodes[k](hidden)
        return ((1 - t * self.layers + k) * self.nodes[k](hidden)
                + (t * self.layers - k) * self.nodes[k + 1](hidden))


class ReleaseSHLFunction(nn.Module):
    """The release's SHL_ODEfunc, with its shapes: it runs only when q = r."""

    def __init__(self, q, r, layers):
        super().__init__()
        self.layers = layers
        self.outer = nn.ModuleList(nn.Linear(q, r, bias=False) for _ in range(layers + 1))
        self.inner = nn.ModuleList(nn.Linear(r, q, bias=False) for _ in range(layers + 1))
        for node in self.outer:
            node.weight = nn.Parameter(torch.zeros_like(node.weight))

    def node(self, k, x):
        return self.outer[k](F.relu(self.inner[k](x)))

    def forward(self, t, x):
        k = int(t * self.layers)
        if k >= self.layers:
            return self.node(k, x)
        return (1 - t * self.layers + k) * self.node(k, x) + (t * self.layers - k) * self.node(k + 1, x)


def release_losses(seed, model='RKHS', N=100, d=2, q=2, r=20, layers=20, nu=-1.0, sigma=0.0,
                   epochs=50, lr=1.0, method='midpoint'):
    """The release's training-loss curve (lifting maps), one value per full-batch step."""
    torch.manual_seed(seed)
    x = torch.randn(N, d)
    y = -x + sigma * torch.randn(N, d)
    torch.randn(N, d), torch.randn(N, d)  # its test set, drawn next
    lift = torch.zeros(q, d)
    for copy in range(q // d):
        lift[copy * d:(copy + 1) * d] = torch.eye(d)
    read = torch.zeros(d, q)
    read[:, :d] = torch.eye(d)
    input_map, output_map = nn.Linear(d, q, bias=False), nn.Linear(q, d, bias=False)
    input_map.weight = nn.Parameter(lift, requires_grad=False)
    output_map.weight = nn.Parameter(read, requires_grad=False)
    func = ReleaseRKHSFunction(q, r, layers, nu) if model == 'RKHS' else ReleaseSHLFunction(q, r, layers)
    optimizer = torch.optim.SGD([p for p in func.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(epochs):
        optimizer.zero_grad()
        state = torchdiffeq.odeint(func, input_map(x), torch.tensor([0.0, 1.0]), method=method,
                                   options={'step_size': 1 / layers})[1]
        loss = F.mse_loss(output_map(state), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return np.array(losses)


@pytest.mark.parametrize('model, flags, release', [
    ('RKHS', [], {}),                                               # the release's defaults
    ('RKHS', ['--nu', '1', '-q', '4'], {'nu': 1.0, 'q': 4}),          # Student-t features
    ('RKHS', ['-q', '4', '-r', '200'], {'q': 4, 'r': 200}),
    ('SHL', ['-q', '4', '-r', '4'], {'q': 4, 'r': 4}),                 # where the release's SHL ran
])
@pytest.mark.slow
def test_same_seed_gives_the_release_losses(tmp_path, model, flags, release):
    status, record = run_main(tmp_path, '--model', model, '--seed', 3, '--epochs', 50, *flags)
    expected = release_losses(3, model, **release)
    assert status == 0
    assert record['train loss'].shape == (50,)
    assert expected[-1] < 0.75 * expected[0]  # it trained: the comparison is not of flat curves
    np.testing.assert_allclose(record['train loss'], expected, rtol=1e-6, atol=0)


def test_same_seed_gives_the_release_features():
    torch.manual_seed(5)
    release = ReleaseRKHSFunction(3, 7, 2, nu=1.5).features.weight
    torch.manual_seed(5)
    field = models.dense_field('RKHS', 3, 7, 2, nu=1.5)
    assert torch.equal(field.omega, release)
    assert torch.allclose(field.omega.mean(0), torch.zeros(3), atol=1e-6)  # centred rows


# ---------------------------------------------------------------------------------------------
# The release's flags, defaults and keys
# ---------------------------------------------------------------------------------------------

def test_release_flags_short_forms_and_defaults():
    parser = synthetic_experiments.get_args_parser()
    defaults = vars(parser.parse_args([]))
    assert {key: defaults[key] for key in (
        'model', 'dataset_size', 'data_dim', 'dim', 'num_layers', 'dim_int', 'nu', 'sigma', 'matrix',
        'alpha', 'epochs', 'learning_rate', 'save')} == dict(
        model='RKHS', dataset_size=100, data_dim=2, dim=2, num_layers=20, dim_int=20, nu=-1.0,
        sigma=0.0, matrix='lifting', alpha=1.0, epochs=1000, learning_rate=1.0, save='synthetic.pkl')
    short = vars(parser.parse_args(['-m', 'SHL', '-N', '7', '-d', '3', '-q', '6', '-l', '4', '-r', '9',
                                    '-mat', 'scaling', '-e', '5', '-lr', '0.5', '-s', 'x.pkl']))
    assert {key: short[key] for key in ('model', 'dataset_size', 'data_dim', 'dim', 'num_layers',
                                        'dim_int', 'matrix', 'epochs', 'learning_rate', 'save')} == dict(
        model='SHL', dataset_size=7, data_dim=3, dim=6, num_layers=4, dim_int=9, matrix='scaling',
        epochs=5, learning_rate=0.5, save='x.pkl')


def test_defaults_write_the_release_keys(tmp_path):
    status, record = run_main(tmp_path, '--epochs', 20, '--seed', 0)
    assert status == 0
    assert RELEASE_KEYS <= set(record)
    assert (record['model'], record['matrix'], record['num_layers'], record['N'], record['q'],
            record['r'], record['num_parameters']) == ('RKHS', 'lifting', 20, 100, 2, 20, 21 * 2 * 20)
    assert record['train loss'].dtype == record['test loss'].dtype == np.float32
    assert record['train loss'].shape == record['test loss'].shape == (20,)
    assert np.all(np.diff(record['train loss']) < 0)
    assert record['computation_time'] > 0
    assert (record['seed'], record['method'], record['diverged'], record['dataset']) == (0, 'midpoint', False, 'SYNTHETIC')
    protocol = record['protocol']
    assert {key: protocol[key] for key in ('dataset', 'epochs', 'learning_rate', 'method', 'dataset_size',
                                           'data_dim', 'sigma', 'matrix', 'alpha')} == dict(
        dataset='SYNTHETIC', epochs=20, learning_rate=1.0, method='midpoint', dataset_size=100,
        data_dim=2, sigma=0.0, matrix='lifting', alpha=1.0)
    assert protocol['code_version'] != 'unknown'


def test_a_drawn_seed_is_recorded_and_repeats_the_run(tmp_path):
    status, drawn = run_main(tmp_path, '--epochs', 5, '--save', 'drawn.pkl')
    status_again, again = run_main(tmp_path, '--epochs', 5, '--save', 'again.pkl', '--seed', drawn['seed'])
    assert status == status_again == 0
    assert isinstance(drawn['seed'], int)
    assert np.array_equal(drawn['train loss'], again['train loss'])
    assert np.array_equal(drawn['test loss'], again['test loss'])


def test_scaling_carries_the_data_to_the_other_half(tmp_path):
    status, record = run_main(tmp_path, '-mat', 'scaling', '--alpha', 2, '--seed', 1, '--epochs', 3)
    assert status == 0 and record['q'] == 4 and record['matrix'] == 'scaling'
    torch.manual_seed(0)
    a, b = models.synthetic_maps('scaling', 2, 4, alpha=2.0)
    x = torch.randn(5, 2)
    assert torch.equal(F.linear(x, a)[:, :2], 2 * x) and torch.equal(F.linear(x, a)[:, 2:], torch.zeros(5, 2))
    assert torch.equal(F.linear(F.linear(x, a), b), torch.zeros(5, 2))  # the identity flow gives 0
    # So the first prediction is 0 and the first loss is the mean of y^2 = x^2 over the data
    # (with lifting it is the mean of (2x)^2).
    torch.manual_seed(1)
    data = torch.randn(100, 2)
    assert record['train loss'][0] == pytest.approx(float((data ** 2).mean()), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Refusals, divergence, interruption
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('flags, message', [
    (['-N', '0'], '--dataset_size must be >= 1'),
    (['-r', '0'], '--dim_int must be >= 1'),
    (['-l', '0'], '--num_layers must be >= 1'),
    (['-e', '-1'], '--epochs must be >= 0'),
    (['-lr', '0'], '--learning_rate must be positive'),
    (['-lr', 'nan'], '--learning_rate must be positive'),
    (['--nu', '0'], '--nu must be negative'),
    (['--sigma', '-1'], '--sigma must be >= 0'),
    (['--alpha', 'inf'], '--alpha must be within the range of float32'),
    (['--seed', '-1'], '--seed must be in'),
    (['-q', '1', '-d', '2'], 'lifting needs --dim q >= --data_dim d'),
    (['-mat', 'scaling', '-q', '3'], '--matrix scaling sets q = 2d = 4'),
    (['--save', '../x.pkl'], '--save must be a plain file name'),
    # the same checks as MNIST_experiments.py's: float32's range, and the memory a size needs
    (['-lr', '1e300'], '--learning_rate 1e+300 is outside the range of float32'),
    (['-lr', '1e-50'], '--learning_rate 1e-50 is outside the range of float32'),
    (['--alpha', '1e300'], '--alpha must be within the range of float32'),
    (['--sigma', '1e300'], '--sigma must be >= 0 and within the range of float32'),
    (['-N', str(10 ** 12)], 'the network would need at least'),
    (['-r', str(10 ** 12)], 'the network would need at least'),
    (['-l', str(10 ** 12)], 'the network would need at least'),
    (['-q', str(10 ** 8)], 'the network would need at least'),
    (['--results_dir', ''], '--results_dir must name a folder, got an empty name'),
])
def test_bad_numbers_are_refused_with_one_line(tmp_path, capsys, flags, message):
    status, record = run_main(tmp_path, *flags)
    err = capsys.readouterr().err
    assert status == 2 and record is None
    assert err.count('\n') == 1 and err.startswith('error: ') and message in err
    assert folder_snapshot(tmp_path) == []


def test_no_flags_trains_the_releases_840_parameters_over_20_steps(tmp_path, capsys):
    status, record = run_main(tmp_path, '--seed', '0', '--epochs', '3')
    assert status == 0
    assert (record['num_layers'], record['num_parameters']) == (20, 840)  # 21 nodes of a 20 x 2 layer
    assert '20 steps of midpoint, 840 trainable parameters' in capsys.readouterr().out


def test_zero_epochs_says_that_no_step_was_taken(tmp_path, capsys):
    status, record = run_main(tmp_path, '--seed', '0', '--epochs', '0')
    assert status == 0 and record['train loss'].shape == (0,)
    out = capsys.readouterr().out
    assert 'no gradient step taken (--epochs 0): the curves are empty' in out and 'nan' not in out


@pytest.mark.parametrize('model, method', [('RKHS', 'midpoint'), ('RKHS', 'rk4'), ('SHL', 'midpoint')])
def test_the_fixed_integrator_agrees_with_odeint_to_float32_rounding(model, method):
    """On the synthetic experiment's dense fields the two integrators sum in another order, so
    they agree to float32 rounding, not bit for bit (docs/deviations.md says so)."""
    torch.manual_seed(0)
    field = models.dense_field(model, 4, 20, 20, 'release')
    with torch.no_grad():
        field.output_weight.normal_()
    x = torch.randn(100, 4)
    fixed = models.ResidualODEBlock(method=method, field=field)(x)
    reference = models.ResidualODEBlock(method=method, integrator='torchdiffeq', field=field)(x)
    torch.testing.assert_close(fixed, reference, rtol=1e-6, atol=1e-6)


def test_an_existing_file_is_refused_and_kept(tmp_path):
    (tmp_path / 'synthetic_experiments').mkdir()
    existing = tmp_path / 'synthetic_experiments' / 'synthetic.pkl'
    existing.write_bytes(b'earlier results')
    proc = run_script('synthetic_experiments.py', '--epochs', '2', cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count('\n') == 1 and 'exists; results are never overwritten' in proc.stderr
    assert 'Traceback' not in proc.stderr + proc.stdout
    assert existing.read_bytes() == b'earlier results'
    assert folder_snapshot(tmp_path) == ['synthetic_experiments', 'synthetic_experiments/synthetic.pkl']


def test_a_bad_choice_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        synthetic_experiments.get_args_parser().parse_args(['--method', 'rk45'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count('\n') == 1 and 'invalid choice' in err


def test_divergence_keeps_the_curves_so_far_and_exits_3(tmp_path):
    status, record = run_main(tmp_path, '--learning_rate', 1e4, '--seed', 0, '--epochs', 50)
    assert status == 3
    assert record['diverged'] is True
    epoch = record['diverged_epoch']
    assert 1 < epoch <= 50
    assert record['train loss'].shape == record['test loss'].shape == (epoch - 1,)
    assert np.all(np.isfinite(record['train loss'])) and np.all(np.isfinite(record['test loss']))
    assert RELEASE_KEYS <= set(record)


@pytest.mark.parametrize('signame, status', [('SIGINT', 130), ('SIGTERM', 143)])
def test_interrupted_run_writes_nothing(tmp_path, signame, status):
    proc = run_script('synthetic_experiments.py', '--epochs', '1000', '--seed', '0', cwd=tmp_path,
                      env={'RESNET_ODE_FAULT': f'step@3:{signame}'})
    assert proc.returncode == status, proc.stderr
    assert f'interrupted by {signame}: nothing was written' in proc.stdout
    assert 'Traceback' not in proc.stderr
    assert folder_snapshot(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# The release's defects, fixed
# ---------------------------------------------------------------------------------------------

def test_shl_runs_with_q_different_from_r(tmp_path):
    status, record = run_main(tmp_path, '--model', 'SHL', '-q', 4, '-r', 7, '--seed', 2, '--epochs', 30)
    assert status == 0
    assert record['num_parameters'] == 2 * 21 * 4 * 7  # two layers of 21 nodes (20 steps), q x r each
    assert record['train loss'][-1] < 0.5 * record['train loss'][0]


@pytest.mark.parametrize('model, q, r', [('SHL', 3, 5), ('SHL', 5, 3), ('RKHS', 3, 5)])
def test_dense_fields_compute_the_paper_formula(model, q, r):
    """The fast path (both integrators) against f written from the formula, at every node pair."""
    torch.manual_seed(0)
    field = models.dense_field(model, q, r, 4, 'linear')
    with torch.no_grad():
        field.output_weight.normal_()
    x = torch.randn(6, q)
    for t in (0.0, 0.1, 0.25, 0.6, 1.0):
        k = min(int(t * 4), 3)
        s = t * 4 - k
        if model == 'RKHS':
            w = (1 - s) * field.output_weight[k] + s * field.output_weight[k + 1]
            expected = F.relu(x @ field.omega.T) @ w.T
        else:
            def node(i):
                return F.relu(x @ field.hidden_weight[i].T) @ field.output_weight[i].T
            expected = (1 - s) * node(k) + s * node(k + 1)
        torch.testing.assert_close(field(torch.tensor(t), x), expected, rtol=1e-5, atol=1e-6)
    fixed = models.ResidualODEBlock(method='rk4', field=field)
    reference = models.ResidualODEBlock(method='rk4', integrator='torchdiffeq', field=field)
    torch.testing.assert_close(fixed(x), reference(x), rtol=1e-6, atol=1e-6)


def test_method_release_is_midpoint_and_a_method_given_is_honoured(tmp_path):
    _, release = run_main(tmp_path, '--seed', 4, '--epochs', 30, '--save', 'r.pkl')
    _, midpoint = run_main(tmp_path, '--seed', 4, '--epochs', 30, '--method', 'midpoint', '--save', 'm.pkl')
    _, euler = run_main(tmp_path, '--seed', 4, '--epochs', 30, '--method', 'euler', '--save', 'e.pkl')
    assert np.array_equal(release['train loss'], midpoint['train loss'])
    assert (release['method'], euler['method'], euler['protocol']['method']) == ('midpoint', 'euler', 'euler')
    np.testing.assert_allclose(euler['train loss'], release_losses(4, epochs=30, method='euler'),
                               rtol=1e-6, atol=0)
    assert not np.allclose(euler['train loss'], midpoint['train loss'], rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The figure (plot_figures.py --figure synthetic) and the sweep (reproduce.py synthetic)
# ---------------------------------------------------------------------------------------------

def _fake_run(folder, name, model, q, r, nu, seed, curve, learning_rate=1.0, epochs=None, diverged=False):
    """A results pickle as synthetic_experiments.py writes it, with a chosen training curve."""
    args = synthetic_experiments.get_args_parser().parse_args(
        ['--epochs', str(epochs or len(curve)), '--learning_rate', str(learning_rate)])
    record = {'model': model, 'matrix': 'lifting', 'num_layers': 10, 'N': 100, 'q': q, 'r': r,
              'train loss': np.asarray(curve, dtype=np.float32),
              'test loss': np.asarray(curve, dtype=np.float32) * 2, 'computation_time': 1.0,
              'num_parameters': 1, 'nu': nu, 'seed': seed, 'diverged': diverged,
              'protocol': protocol.build_synthetic(args, 'midpoint', {'code_version': 'test'})}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, 'wb') as f:
        pickle.dump(record, f)


def test_synthetic_reader_skips_each_file_that_is_not_a_usable_synthetic_run(tmp_path, capsys):
    _fake_run(tmp_path, 'good.pkl', 'RKHS', 2, 20, -1.0, 0, [1.0, 0.5])
    with open(tmp_path / 'good.pkl', 'rb') as f:
        good = pickle.load(f)
    broken = {
        'half_layer.pkl': (dict(good, num_layers=2.5), 'NotARun: num_layers is 2.5, not an integer'),
        'square_curve.pkl': (dict(good, **{'train loss': np.ones((2, 2))}),
                             'NotARun: train loss is not a list of numbers (float64, 2-D)'),
        'no_r.pkl': ({key: value for key, value in good.items() if key != 'r'},
                     'NotARun: r is NoneType, not a number'),
        'mnist.pkl': (dict(good, protocol=dict(good['protocol'], dataset='MNIST')),
                      'not a synthetic_experiments.py results file with its protocol record'),
    }
    for name, (record, _) in broken.items():
        with open(tmp_path / name, 'wb') as f:
            pickle.dump(record, f)
    (tmp_path / 'garbage.pkl').write_bytes(b'not a pickle')

    loaded = recorded_runs.load_synthetic_runs([str(tmp_path)])

    assert [run.path for run in loaded] == [str(tmp_path / 'good.pkl')]
    assert loaded[0].config == recorded_runs.SyntheticConfig('RKHS', 10, 2, 20, -1.0)
    np.testing.assert_array_equal(loaded[0].train_loss, [1.0, 0.5])
    err = capsys.readouterr().err
    for name, (_, why) in broken.items():
        assert f'warning: skipping {tmp_path / name}: {why}\n' in err
    assert f'warning: skipping {tmp_path / "garbage.pkl"}: ' in err


def test_a_folder_of_both_kinds_of_runs_is_read_by_each_reader_with_one_line_for_the_other(tmp_path, capsys):
    _fake_run(tmp_path / 'synthetic', 'RKHS_s0.pkl', 'RKHS', 2, 20, -1.0, 0, [1.0, 0.5])
    (tmp_path / 'MNIST').mkdir()
    with open(tmp_path / 'MNIST' / 'RKHS_l5_q32_p0_0.pkl', 'wb') as f:  # a release-era MNIST run
        pickle.dump({'model': 'RKHS', 'num_layers': 5, 'in_channels': 32, 'dim_int': 32, 'pretrain_pass': 0,
                     'test_classif': np.array([0.9, 0.5]), 'train_loss': np.ones(4)}, f)

    figure_runs = recorded_runs.load_runs([str(tmp_path)])
    assert [run.path for run in figure_runs] == [str(tmp_path / 'MNIST' / 'RKHS_l5_q32_p0_0.pkl')]
    assert capsys.readouterr().err == (
        f'warning: left out 1 synthetic_experiments.py run(s), e.g. {tmp_path / "synthetic" / "RKHS_s0.pkl"} '
        f'(plot_figures.py --figure synthetic draws them)\n')

    synthetic_runs = recorded_runs.load_synthetic_runs([str(tmp_path)])
    assert [run.path for run in synthetic_runs] == [str(tmp_path / 'synthetic' / 'RKHS_s0.pkl')]
    assert capsys.readouterr().err == (
        f'warning: left out 1 run(s) of Figures 1 to 3, e.g. {tmp_path / "MNIST" / "RKHS_l5_q32_p0_0.pkl"} '
        f'(plot_figures.py draws them without --figure synthetic)\n')


def test_synthetic_figure_draws_the_mean_over_seeds(tmp_path, capsys):
    import plot_figures
    rng = np.random.default_rng(0)
    curves = {key: [np.exp(-rng.uniform(0.01, 0.1) * np.arange(40)) for _ in range(n)]
              for key, n in (('gauss', 3), ('t1', 2), ('shl', 2))}
    runs = tmp_path / 'runs'
    for seed, curve in enumerate(curves['gauss']):
        _fake_run(runs, f'g{seed}.pkl', 'RKHS', 2, 20, -1.0, seed, curve)
    for seed, curve in enumerate(curves['t1']):
        _fake_run(runs, f't{seed}.pkl', 'RKHS', 4, 200, 1.0, seed, curve)
    for seed, curve in enumerate(curves['shl']):
        _fake_run(runs / 'sub', f's{seed}.pkl', 'SHL', 4, 4, -1.0, seed, curve)
    _fake_run(runs, 'other_protocol.pkl', 'RKHS', 2, 20, -1.0, 9, np.ones(40), learning_rate=0.5)
    _fake_run(runs, 'same_seed_again.pkl', 'RKHS', 2, 20, -1.0, 0, np.ones(40))

    loaded = recorded_runs.load_synthetic_runs([str(runs)])
    assert 'of another protocol (learning_rate 0.5)' in capsys.readouterr().err
    written, lines = plotting.plot_synthetic(loaded, str(tmp_path / 'figs'))
    gauss, student = 'Gaussian features', 'Student-t features (nu = 1)'
    expected = {
        (gauss, 'RKHS q=2 r=20 L=10 (n=3)'): curves['gauss'],
        (student, 'RKHS q=4 r=200 L=10 (n=2)'): curves['t1'],
        (gauss, 'SHL q=r=4 L=10 (n=2)'): curves['shl'],
        (student, 'SHL q=r=4 L=10 (n=2)'): curves['shl'],
    }
    assert set(lines) == set(expected)
    for key, members in expected.items():
        mean = np.mean([np.asarray(curve, dtype=np.float32).astype(float) for curve in members], axis=0)
        np.testing.assert_allclose(lines[key], mean, rtol=1e-12)
    assert written == [str(tmp_path / 'figs' / 'synthetic.png')] and (tmp_path / 'figs' / 'synthetic.png').stat().st_size > 10_000

    args = plot_figures.get_args_parser().parse_args([str(runs), '--figure', 'synthetic', '--out_dir', str(tmp_path / 'cli')])
    assert plot_figures.main(args) == 0
    out = capsys.readouterr().out
    assert (tmp_path / 'cli' / 'synthetic.png').exists()
    final = np.mean([np.float32(curve[-1]) for curve in curves['gauss']])
    assert f'| RKHS | 2 | 20 | Gaussian | 10 | 3 | 0 | {final:.3g} (' in out


def test_synthetic_figure_leaves_diverged_runs_out_of_the_mean(tmp_path):
    _fake_run(tmp_path, 'a.pkl', 'SHL', 2, 2, -1.0, 0, [4.0, 2.0, 1.0, 0.5])
    _fake_run(tmp_path, 'b.pkl', 'SHL', 2, 2, -1.0, 1, [2.0, 1.0, 0.25, 0.5])
    _fake_run(tmp_path, 'c.pkl', 'SHL', 2, 2, -1.0, 2, [8.0, 1e4], epochs=4, diverged=True)
    _fake_run(tmp_path, 'd.pkl', 'RKHS', 2, 2, -1.0, 0, [3.0, 1e5], epochs=4, diverged=True)
    _fake_run(tmp_path, 'e.pkl', 'RKHS', 2, 2, -1.0, 1, [1.0, 1e3, 1e6], epochs=4, diverged=True)
    _, lines = plotting.plot_synthetic(recorded_runs.load_synthetic_runs([str(tmp_path)]), str(tmp_path))
    assert lines[('Gaussian features', 'SHL q=r=2 L=10 (n=2; 1 diverged, left out)')].tolist() == [3.0, 1.5, 0.625, 0.5]
    # every run diverged: all are drawn, each index averaged over the runs that reach it
    assert lines[('Gaussian features', 'RKHS q=2 r=2 L=10 (n=2, all diverged)')].tolist() == [2.0, 50500.0, 1e6]


def _reproduce(capsys, *argv):
    import reproduce
    status = reproduce.main(reproduce.parse_args(['synthetic', *map(str, argv)]))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_synthetic_sweep_dry_run(tmp_path, capsys):
    status, out, _ = _reproduce(capsys, '--dry_run', '--results_root', tmp_path, '--', '--epochs', 7)
    commands = [line.split() for line in out.splitlines() if not line.startswith('#')]
    assert status == 0 and len(commands) == (12 + 3) * 5
    names = {command[command.index('--save') + 1] for command in commands}
    assert names == {f'{config}_s{seed}.pkl' for seed in range(5) for config in
                     [f'RKHS_q{q}_r{r}_{law}' for law in ('gauss', 't1') for q in (2, 4, 8) for r in (20, 200)]
                     + [f'SHL_q{q}_r{q}' for q in (2, 4, 8)]}
    for command in commands:
        assert command[1] == str(REPO / 'synthetic_experiments.py')
        assert command[command.index('--results_dir') + 1] == 'synthetic_experiments/sweep'
        assert command[-2:] == ['--epochs', '7']
        name = command[command.index('--save') + 1]
        q = name.split('_')[1][1:]
        assert command[command.index('--dim') + 1] == q
        if name.startswith('SHL'):
            assert command[command.index('--dim_int') + 1] == q and '--nu' not in command
        else:
            assert command[command.index('--nu') + 1] == ('-1' if '_gauss_' in name else '1')
    assert folder_snapshot(tmp_path) == []


def test_synthetic_sweep_refusals(tmp_path, capsys):
    status, _, err = _reproduce(capsys, '--dry_run', '--results_root', tmp_path, '--', '-q', 4)
    assert status == 2 and '--dim is set for each configuration by the figure\'s grid' in err
    status, _, err = _reproduce(capsys, '--dry_run', '--configs', 'RKHS_q3_r20_gauss')
    assert status == 2 and '--configs: RKHS_q3_r20_gauss is not a configuration of synthetic' in err
    status, _, err = _reproduce(capsys, '--dry_run', '--shard', '1/2')
    assert status == 2 and '--shard: not options of the synthetic sweep' in err
    # A pickle of another protocol is never skipped into the figure in silence.
    _fake_run(tmp_path / 'synthetic_experiments' / 'sweep', 'SHL_q2_r2_s0.pkl', 'SHL', 2, 2, -1.0, 0, np.ones(1000))
    status, out, err = _reproduce(capsys, '--dry_run', '--results_root', tmp_path, '--', '--epochs', 5)
    assert status == 2 and ('SHL_q2_r2_s0.pkl was not made with this sweep\'s protocol: epochs 1000 '
                            '(this sweep: 5)') in err
    status, out, _ = _reproduce(capsys, '--dry_run', '--results_root', tmp_path, '--configs', 'SHL_q2_r2')
    assert status == 0 and '# skip SHL_q2_r2_s0' in out and '# 4 run(s) to do, 1 skipped' in out


@pytest.mark.slow
def test_tiny_synthetic_sweep_runs_and_draws_the_figure(tmp_path, capsys):
    status, out, _ = _reproduce(capsys, '--configs', 'SHL_q2_r2', '--num_seeds', 2, '--jobs', 2,
                                '--results_root', tmp_path, '--', '--epochs', 5, '-N', 10)
    assert status == 0, out
    sweep = tmp_path / 'synthetic_experiments' / 'sweep'
    for seed in (0, 1):
        record = load_results(sweep / f'SHL_q2_r2_s{seed}.pkl')
        assert record['train loss'].shape == (5,) and record['N'] == 10 and record['seed'] == seed
    assert (sweep / 'synthetic.png').stat().st_size > 10_000  # the figure, beside its runs
    assert 'loaded 2 synthetic run(s)' in out and '| SHL | 2 | 2 | – | 20 | 2 | 0 |' in out
