"""Tests of plot_figures.py on small synthetic results pickles (CPU, a few seconds)."""

import contextlib
import io
import pickle
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plot_figures  # noqa: E402

EPOCHS = 6
ITERATIONS = 3000  # longer than MAX_PLOT_POINTS, so the downsampling path runs
MIN_PNG_BYTES = 20_000


def _seed_of(*parts):
    # Stable across processes, unlike hash() of strings.
    return zlib.crc32(repr(parts).encode())


def _curves(rng, scale, epochs=EPOCHS, iterations=ITERATIONS):
    loss = scale * np.exp(-np.arange(iterations) / 800.0) * (1 + 0.2 * rng.random(iterations))
    test = np.concatenate(([0.9], scale * (0.1 + 0.05 * rng.random(epochs))))
    train = test * 0.5
    return loss, train, test


def _mnist(model, layers, channels=32, pretrain=0, seed=0, extra=True, scale=1.0,
           diverged_at=None):
    rng = np.random.default_rng(_seed_of(model, layers, channels, pretrain, seed))
    loss, train, test = _curves(rng, scale)
    data = {'model': model, 'num_layers': layers, 'in_channels': channels,
            'dim_int': channels, 'pretrain_pass': pretrain, 'batch_size': 128,
            'train_loss': loss, 'train_classif': train, 'test_classif': test,
            'computation_time': 12.0 * EPOCHS, 'num_parameters': 1234}
    if diverged_at is not None:
        # A diverged run stops early; its last logged loss is not finite.
        data['train_loss'] = loss[:diverged_at * ITERATIONS // EPOCHS].copy()
        data['train_loss'][-1] = np.nan
        data['train_classif'] = train[:diverged_at + 1]
        data['test_classif'] = test[:diverged_at + 1]
    if extra:
        data.update({'dataset': 'MNIST', 'method': 'euler', 'epochs': EPOCHS, 'seed': seed,
                     'embedding_seed': 0, 'diverged': diverged_at is not None,
                     'epoch_times': [10.0] * (len(data['test_classif']) - 1)})
    return data


def _cifar(model, layers, seed=0, extra=True):
    rng = np.random.default_rng(_seed_of('cifar', model, layers, seed))
    loss, train, test = _curves(rng, 2.0)
    data = {'model': model, 'num_layers': layers, 'num_parameters': 99, 'batch_size': 64,
            'train_loss': loss, 'train_classif': train, 'test_classif': test,
            'computation_time': 30.0 * EPOCHS}
    if extra:
        data.update({'dataset': 'CIFAR10', 'method': 'euler', 'epochs': EPOCHS, 'seed': seed})
    return data


def _dump(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'wb') as handle:
        pickle.dump(data, handle)


def _write_results(root):
    """Write the test runs; return {config row key: list of run dicts}."""
    mnist, cifar = root / 'MNIST_experiments', root / 'CIFAR_experiments'
    expected = {}

    def add(key, path, data):
        _dump(path, data)
        expected.setdefault(key, []).append(data)

    for seed in range(3):
        add(('MNIST', 'RKHS', '5', '32/32', '0', 'euler'), mnist / f'fig1a/RKHS_l5_p0_s{seed}.pkl',
            _mnist('RKHS', 5, seed=seed))
        add(('MNIST', 'SHL', '5', '32/32', '0', 'euler'), mnist / f'fig1a/SHL_l5_p0_s{seed}.pkl',
            _mnist('SHL', 5, seed=seed, scale=2.0, diverged_at=3 if seed == 2 else None))
    for seed in range(2):
        add(('MNIST', 'RKHS', '20', '32/32', '0', 'euler'),
            mnist / f'fig2/RKHS_l20_c32_s{seed}.pkl', _mnist('RKHS', 20, seed=seed))
        add(('MNIST', 'RKHS', '20', '8/8', '0', 'euler'), mnist / f'fig2/RKHS_l20_c8_s{seed}.pkl',
            _mnist('RKHS', 20, channels=8, seed=seed))
        add(('CIFAR10', 'RKHS', '1', '–', '–', 'euler'), cifar / f'fig3/RKHS_l1_s{seed}.pkl',
            _cifar('RKHS', 1, seed=seed))
        add(('CIFAR10', 'SHL', '10', '–', '–', 'euler'), cifar / f'fig3/SHL_l10_s{seed}.pkl',
            _cifar('SHL', 10, seed=seed))
    # Release-style pickles: none of the optional keys.
    add(('MNIST', 'SHL', '10', '32/32', '0', '–'), mnist / 'release/SHL_10.pkl',
        _mnist('SHL', 10, extra=False))
    add(('CIFAR10', 'RKHS', '20', '–', '–', '–'), cifar / 'release/RKHS_20.pkl',
        _cifar('RKHS', 20, extra=False))
    # An unreadable file must be skipped with a warning.
    (mnist / 'broken.pkl').write_bytes(b'not a pickle')
    return expected


def _run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = plot_figures.main(plot_figures.get_args_parser().parse_args(argv))
    return status, out.getvalue(), err.getvalue()


def _parse_table(text):
    """Rows of the markdown table keyed by (dataset, model, L, channels, pretrain, method)."""
    rows = {}
    lines = [line for line in text.splitlines() if line.startswith('| ')]
    header = [cell.strip() for cell in lines[0].strip('|').split('|')]
    for line in lines[1:]:
        cells = dict(zip(header, (cell.strip() for cell in line.strip('|').split('|'))))
        key = (cells['dataset'], cells['model'], cells['L'], cells['channels (in/int)'],
               cells['pretrain'], cells['method'])
        rows[key] = cells
    return rows


@pytest.fixture(scope='module')
def plotted(tmp_path_factory):
    root = tmp_path_factory.mktemp('results')
    expected = _write_results(root)
    out_dir = root / 'figs'
    status, out, err = _run_main([str(root / 'MNIST_experiments'),
                                  str(root / 'CIFAR_experiments'),
                                  '--out_dir', str(out_dir), '--pdf'])
    return {'root': root, 'expected': expected, 'out_dir': out_dir,
            'status': status, 'out': out, 'err': err}


def test_figures_written_and_not_blank(plotted):
    import matplotlib.image
    assert plotted['status'] == 0
    for figure in ('1a', '2', '3'):
        png = plotted['out_dir'] / f'figure{figure}.png'
        assert png.stat().st_size > MIN_PNG_BYTES
        image = matplotlib.image.imread(str(png))
        assert image.reshape(-1, image.shape[-1]).std(axis=0).max() > 0.05  # not one colour
        assert (plotted['out_dir'] / f'figure{figure}.pdf').stat().st_size > MIN_PNG_BYTES
    # No temporary files left behind by the atomic writes.
    assert sorted(p.name for p in plotted['out_dir'].iterdir()) == sorted(
        f'figure{f}.{ext}' for f in ('1a', '2', '3') for ext in ('png', 'pdf'))


def test_missing_figure_and_curves_reported(plotted):
    out = plotted['out']
    assert 'figure 1b: no runs found, figure skipped' in out
    assert not (plotted['out_dir'] / 'figure1b.png').exists()
    assert 'figure 2: no runs for MNIST RKHS L=20 channels=4/4 pretrain=0' in out
    assert 'figure 1a: no runs for MNIST SHL L=20 channels=32/32 pretrain=0' in out
    assert 'figure 3: no runs for CIFAR10 SHL L=1' in out
    assert 'broken.pkl' in plotted['err']


def test_table_counts_and_means(plotted):
    rows = _parse_table(plotted['out'])
    expected = plotted['expected']
    assert set(rows) == set(expected)
    for key, runs in expected.items():
        row = rows[key]
        diverged = [bool(run.get('diverged', False)) for run in runs]
        assert int(row['runs']) == len(runs)
        assert int(row['diverged']) == sum(diverged)
        finals = [100 * run['test_classif'][-1] for run, bad in zip(runs, diverged) if not bad]
        mean, std = np.mean(finals), (np.std(finals, ddof=1) if len(finals) > 1 else 0.0)
        assert row['final test err % (mean ± std)'] == f'{mean:.2f} ± {std:.2f}'
        best = min(100 * run['test_classif'].min() for run in runs)
        assert row['best test err %'] == f'{best:.2f}'
    assert rows[('MNIST', 'SHL', '5', '32/32', '0', 'euler')]['diverged'] == '1'
    # Seconds per epoch: epoch_times when present, else computation_time / epochs.
    assert rows[('MNIST', 'RKHS', '5', '32/32', '0', 'euler')]['s/epoch'] == '10.0'
    assert rows[('MNIST', 'SHL', '10', '32/32', '0', '–')]['s/epoch'] == '12.0'


def test_single_figure_table_and_prefix(plotted, tmp_path):
    status, out, _ = _run_main([str(plotted['root'] / 'MNIST_experiments'),
                                '--figure', 'figure2', '--out_dir', str(tmp_path)])
    assert status == 0
    assert (tmp_path / 'figure2.png').exists() and not (tmp_path / 'figure1a.png').exists()
    rows = _parse_table(out)
    assert set(rows) == {('MNIST', 'RKHS', '20', '32/32', '0', 'euler'),
                         ('MNIST', 'RKHS', '20', '8/8', '0', 'euler')}


def test_empty_and_absent_folders(tmp_path):
    (tmp_path / 'empty').mkdir()
    status, out, _ = _run_main([str(tmp_path / 'empty'), '--out_dir', str(tmp_path / 'f')])
    assert status == 0
    assert 'figure 3: no runs found, figure skipped' in out
    assert not (tmp_path / 'f').exists()
    status, _, err = _run_main([str(tmp_path / 'absent')])
    assert status == 2 and 'not a folder' in err


def test_duplicate_seed_counted_once(tmp_path):
    data = _mnist('RKHS', 20, seed=0)
    _dump(tmp_path / 'fig1a' / 'a.pkl', data)
    _dump(tmp_path / 'fig2' / 'b.pkl', data)
    runs = plot_figures.load_runs([str(tmp_path)])
    assert len(runs) == 1


def test_quick_check_runs_not_mixed_with_full_runs(tmp_path):
    _dump(tmp_path / 'full.pkl', _mnist('RKHS', 5, seed=0))
    _dump(tmp_path / 'quick.pkl', dict(_mnist('RKHS', 5, seed=0), synthetic=True, subset=256))
    groups = plot_figures.group_runs(plot_figures.load_runs([str(tmp_path)]))
    assert sorted(cfg.variant for cfg in groups) == ['', 'synthetic subset=256']


def test_dataset_inferred_without_dataset_key(tmp_path):
    _dump(tmp_path / 'x' / 'm.pkl', _mnist('RKHS', 5, extra=False))
    _dump(tmp_path / 'x' / 'c.pkl', _cifar('SHL', 10, extra=False))
    datasets = sorted(run.config.dataset for run in plot_figures.load_runs([str(tmp_path)]))
    assert datasets == ['CIFAR10', 'MNIST']


def test_ragged_stats_average_runs_reaching_each_index():
    mean, low, high, count = plot_figures.ragged_stats(
        [np.array([1.0, 2.0, 3.0]), np.array([3.0, np.inf]), np.array([5.0])])
    np.testing.assert_allclose(mean, [3.0, 2.0, 3.0])
    np.testing.assert_allclose(low, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(high, [5.0, 2.0, 3.0])
    np.testing.assert_array_equal(count, [3, 1, 1])


def test_smooth_matches_naive_trailing_mean():
    rng = np.random.default_rng(0)
    values = rng.random(50)
    values[10] = np.nan
    window = 7
    naive = []
    for i in range(values.size):
        chunk = values[max(0, i - window + 1):i + 1]
        naive.append(np.nanmean(chunk))
    np.testing.assert_allclose(plot_figures.smooth(values, window), naive)
