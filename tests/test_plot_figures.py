"""Tests of recorded_runs.py and plot_figures.py on small hand-made results pickles (CPU, seconds)."""

import argparse
import contextlib
import io
import pickle
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plot_figures
from resnet_ode import plotting, protocol, recorded_runs

EPOCHS = 6
ITERATIONS = 3000  # longer than MAX_PLOT_POINTS, so the downsampling path runs
MIN_PNG_BYTES = 20_000


def _seed_of(*parts):
    return zlib.crc32(repr(parts).encode())  # stable across processes, unlike hash()


def _protocol(dataset='MNIST', epochs=EPOCHS, embedding=None, **changes):
    args = argparse.Namespace(epochs=epochs, lr_init=0.5, decay_steps=[35], decay_rate=0.2,
                              batch_size=128, train_error_images=1000, subset=None, synthetic=False,
                              method='euler', time_weights='release', integrator='fixed',
                              pretrain=0, pretrain_lr=0.01, amp=False)
    vars(args).update(changes)
    facts = embedding or {'embedding_files': ['a.pt', 'b.pt'], 'embedding_sha256': ['1', '2']}
    return protocol.build(args, dataset, facts)


def _mnist(model, layers, channels=32, pretrain=0, seed=0, recorded=True, scale=1.0,
           diverged_at=None, **protocol_changes):
    rng = np.random.default_rng(_seed_of(model, layers, channels, pretrain, seed))
    loss = scale * np.exp(-np.arange(ITERATIONS) / 800.0) * (1 + 0.2 * rng.random(ITERATIONS))
    test = np.concatenate(([0.9], scale * (0.1 + 0.05 * rng.random(EPOCHS))))
    data = {'model': model, 'num_layers': layers, 'in_channels': channels, 'dim_int': channels,
            'pretrain_pass': pretrain, 'batch_size': 128, 'train_loss': loss,
            'train_classif': test * 0.5, 'test_classif': test, 'computation_time': 12.0 * EPOCHS,
            'num_parameters': 1234}
    if diverged_at is not None:  # a diverged run stops early; its last loss is not finite
        data['train_loss'] = loss[:diverged_at * ITERATIONS // EPOCHS].copy()
        data['train_loss'][-1] = np.nan
        data['train_classif'] = data['train_classif'][:diverged_at + 1]
        data['test_classif'] = test[:diverged_at + 1]
    if recorded:
        data.update({'dataset': 'MNIST', 'seed': seed, 'diverged': diverged_at is not None,
                     'epoch_times': [10.0] * (len(data['test_classif']) - 1),
                     'protocol': _protocol(pretrain=pretrain, **protocol_changes)})
    return data


def _dump(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'wb') as handle:
        pickle.dump(data, handle)


def _run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = plot_figures.main(plot_figures.get_args_parser().parse_args(argv))
    return status, out.getvalue(), err.getvalue()


def _table_rows(text):
    lines = [line for line in text.splitlines() if line.startswith('| ')]
    header = [cell.strip() for cell in lines[0].strip('|').split('|')]
    return [dict(zip(header, (cell.strip() for cell in line.strip('|').split('|')))) for line in lines[1:]]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """Figure 1a's RKHS L=5 (3 seeds, one diverged) and SHL L=10, Figure 2's C=8, CIFAR SHL L=1,
    a release-style pickle, and a broken file."""
    root = tmp_path_factory.mktemp('results')
    for seed in range(3):
        _dump(root / 'MNIST_experiments' / f'RKHS_l5_s{seed}.pkl',
              _mnist('RKHS', 5, seed=seed, diverged_at=3 if seed == 2 else None))
    _dump(root / 'MNIST_experiments' / 'SHL_l10_s0.pkl', _mnist('SHL', 10, scale=0.5))
    _dump(root / 'MNIST_experiments' / 'RKHS_l20_c8.pkl', _mnist('RKHS', 20, channels=8))
    cifar = dict(_mnist('SHL', 1, scale=2.0), dataset='CIFAR10')
    for key in ('in_channels', 'dim_int', 'pretrain_pass'):
        del cifar[key]
    cifar['protocol'] = _protocol('CIFAR10', embedding={})
    _dump(root / 'CIFAR_experiments' / 'SHL_l1.pkl', cifar)
    _dump(root / 'MNIST_experiments' / 'release' / 'SHL_l10_q32_p0_0.pkl',
          _mnist('SHL', 10, recorded=False))
    (root / 'MNIST_experiments' / 'broken.pkl').write_bytes(b'not a pickle')
    return root


def test_figures_written_and_not_blank(folder, tmp_path):
    import matplotlib.image
    status, out, err = _run_main([str(folder / 'MNIST_experiments'), str(folder / 'CIFAR_experiments'),
                                  '--out_dir', str(tmp_path), '--pdf'])
    assert status == 0, err
    for figure in ('1a', '2', '3'):
        image = matplotlib.image.imread(str(tmp_path / f'figure{figure}.png'))
        assert image.reshape(-1, image.shape[-1]).std(axis=0).max() > 0.05  # not one colour
        assert (tmp_path / f'figure{figure}.pdf').stat().st_size > MIN_PNG_BYTES
    # no temporary file left by the atomic writes; Figure 1b has no run
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f'figure{f}.{ext}' for f in ('1a', '2', '3') for ext in ('png', 'pdf'))
    assert 'figure 1b: no runs found, figure skipped' in out
    assert 'figure 2: no runs for RKHS L=20, C=4, 0 pass(es)' in out
    assert 'broken.pkl' in err


def test_plotted_lines_are_the_statistics_of_the_runs(folder):
    groups = recorded_runs.group_runs(recorded_runs.load_runs([str(folder / 'MNIST_experiments')]))
    fig, drawn = plotting.build_figure('1a', groups)
    lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    rkhs = lines['RKHS L=5: 3 runs, 1 stopped on NaN']
    tests = [pickle.load(open(folder / 'MNIST_experiments' / f'RKHS_l5_s{s}.pkl', 'rb'))['test_classif']
             for s in range(3)]
    expected = [100 * np.mean([t[e] for t in tests if len(t) > e]) for e in range(EPOCHS + 1)]
    np.testing.assert_allclose(rkhs.get_ydata(), expected)
    # the release-style pickle is its own curve, never averaged with the project's run, and the
    # legend says how the two differ
    shl = sorted(label for label in lines if label.startswith('SHL'))
    assert shl == ['SHL L=10 [epochs 40, method midpoint, embedding the release\'s files] (release): '
                   '1 run, 1 stopped on NaN',
                   'SHL L=10 [epochs 6, method euler, embedding files that are not the release\'s '
                   '(a.pt, b.pt)]: 1 run']
    release = pickle.load(open(folder / 'MNIST_experiments' / 'release' / 'SHL_l10_q32_p0_0.pkl', 'rb'))
    np.testing.assert_allclose(lines[shl[0]].get_ydata(), 100 * release['test_classif'])
    # the stop of the diverged run is marked at its last epoch
    # (and the release-style run's too: 6 epochs of its protocol's 40)
    stops = [line for line in fig.axes[1].get_lines() if line.get_marker() == 'x']
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in stops] == [
        ([3], [100 * tests[2][3]]), ([6], [100 * release['test_classif'][6]])]


def test_reference_band_and_its_mean(folder, tmp_path):
    reference = tmp_path / 'ref'
    rng = np.random.default_rng(3)
    for index in range(4):  # the release's 40 epochs; one stopped early, after 3
        data = _mnist('RKHS', 5, seed=10 + index, recorded=False)
        data['test_classif'] = rng.random(41 if index < 3 else 4) * 0.1
        _dump(reference / f'RKHS_l5_q32_p0_{index}.pkl', data)
    groups = recorded_runs.group_runs(recorded_runs.load_runs([str(folder / 'MNIST_experiments')]))
    reference_groups = recorded_runs.group_runs(recorded_runs.load_runs([str(reference)]))
    fig, _ = plotting.build_figure('1a', groups, reference_groups)
    lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    band = lines['RKHS L=5 release: 4 runs, 1 stopped on NaN']
    curves = [run.test_classif for run in next(iter(reference_groups.values()))]
    expected = [100 * np.mean([c[e] for c in curves if len(c) > e]) for e in range(41)]
    np.testing.assert_allclose(band.get_ydata(), expected)
    assert band.get_linewidth() < lines['RKHS L=5: 3 runs, 1 stopped on NaN'].get_linewidth()
    # its band spans the reference runs' min to max at every epoch they reach
    low = [100 * min(c[e] for c in curves if len(c) > e) for e in range(41)]
    high = [100 * max(c[e] for c in curves if len(c) > e) for e in range(41)]
    def spans(collection):
        vertices = collection.get_paths()[0].vertices
        return ([vertices[vertices[:, 0] == e, 1].min() for e in range(41)],
                [vertices[vertices[:, 0] == e, 1].max() for e in range(41)])

    bands = [spans(c) for c in fig.axes[1].collections if len(c.get_paths()[0].vertices) >= 82]
    assert any(np.allclose(band_low, low) and np.allclose(band_high, high) for band_low, band_high in bands)


def test_two_protocols_of_one_configuration_are_two_curves(tmp_path):
    _dump(tmp_path / 'full.pkl', _mnist('RKHS', 5, seed=0))
    _dump(tmp_path / 'quick.pkl', _mnist('RKHS', 5, seed=0, subset=512))
    _dump(tmp_path / 'drawn.pkl', _mnist('RKHS', 5, seed=1, embedding={'embedding_seed': 3}))
    _dump(tmp_path / 'drawn_c4.pkl', _mnist('RKHS', 20, channels=4, embedding={'embedding_seed': 3}))
    groups = recorded_runs.group_runs(recorded_runs.load_runs([str(tmp_path)]))
    assert len(groups) == 4
    fig, _ = plotting.build_figure('1a', groups)
    files = "files that are not the release's (a.pt, b.pt)"
    assert sorted(line.get_label() for line in fig.axes[1].get_lines() if not line.get_label().startswith('_')) == [
        'RKHS L=5 [embedding drawn from seed 3] (drawn A/B): 1 run',
        f'RKHS L=5 [embedding {files}]: 1 run',
        f'RKHS L=5 [subset 512, embedding {files}]: 1 run']
    fig, _ = plotting.build_figure('2', groups)  # the release had no file for 4 channels
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ['RKHS C=4: 1 run']


def test_a_figure_of_other_folders_never_overwrites(folder, tmp_path):
    out = tmp_path / 'figs'
    status, _, _ = _run_main([str(folder / 'MNIST_experiments'), '--figure', '1a', '--out_dir', str(out)])
    assert status == 0
    before = (out / 'figure1a.png').read_bytes()
    other = tmp_path / 'other'
    _dump(other / 'x.pkl', _mnist('SHL', 5))
    status, _, err = _run_main([str(other), '--figure', '1a', '--out_dir', str(out)])
    assert status == 2 and err.count('\n') == 1 and 'refusing to overwrite' in err
    assert (out / 'figure1a.png').read_bytes() == before
    status, _, _ = _run_main([str(folder / 'MNIST_experiments'), '--figure', '1a', '--out_dir', str(out)])
    assert status == 0  # the same folders may redraw it


def test_bad_or_degenerate_runs_are_skipped_and_the_rest_plotted(tmp_path):
    good = _mnist('RKHS', 5)
    _dump(tmp_path / 'good.pkl', good)
    bad = {
        'no_epochs.pkl': dict(good, seed=1, test_classif=np.array([0.9]), train_loss=np.zeros(0)),
        'all_nan.pkl': dict(good, test_classif=np.full(EPOCHS + 1, np.nan)),
        'huge.pkl': dict(good, test_classif=np.array([0.9, 1e308])),
        'list_layers.pkl': dict(good, num_layers=[5]),
        'dict_seed.pkl': dict(good, seed={'a': 1}),
        'text_curve.pkl': dict(good, test_classif=np.array(['0.5', '0.4'])),
        'bool_curve.pkl': dict(good, test_classif=[True, False]),
        'too_long.pkl': dict(good, test_classif=np.full(EPOCHS + 5, 0.5)),
        'crafted_protocol.pkl': dict(good, protocol=dict(good['protocol'], decay_steps=[[1]])),
    }
    for name, data in bad.items():
        _dump(tmp_path / name, data)
    status, out, err = _run_main([str(tmp_path), '--out_dir', str(tmp_path / 'figs')])
    assert status == 0, err
    skipped = [line for line in err.splitlines() if line.startswith('warning: skipping')]
    assert sorted(line.split()[2].rsplit('/', 1)[1].rstrip(':') for line in skipped) == sorted(
        name for name in bad if name != 'no_epochs.pkl')
    assert (tmp_path / 'figs' / 'figure1a.png').exists()
    assert _table_rows(out)[0]['runs'] == '2'  # good and the 0-epoch run (one point)


def test_one_run_one_epoch_reads_well(tmp_path):
    data = _mnist('RKHS', 5, epochs=1)
    data['test_classif'] = np.array([0.9355, 0.9351])
    data['train_loss'] = np.array([2.31294, 2.31291, 2.31290])
    data['epoch_times'] = [10.0]
    _dump(tmp_path / 'one.pkl', data)
    status, out, _ = _run_main([str(tmp_path), '--figure', '1a', '--out_dir', str(tmp_path / 'f')])
    assert status == 0
    row = _table_rows(out)[0]
    assert row['final test err %'] == '93.51 ± –' and row['runs'] == '1'
    groups = recorded_runs.group_runs(recorded_runs.load_runs([str(tmp_path)]))
    fig, _ = plotting.build_figure('1a', groups)
    fig.canvas.draw()
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ['RKHS L=5: 1 run']
    for axis in fig.axes:
        labels = [label.get_text() for label in axis.get_yticklabels() if label.get_text()]
        assert len(labels) == len(set(labels)) >= 2  # ticks that differ
        assert not any('10^' in label or '\\times' in label for label in labels)  # plain numbers


def test_copies_counted_once_and_links_read_once(tmp_path):
    data = _mnist('RKHS', 20, seed=0)
    _dump(tmp_path / 'fig1a' / 'a.pkl', data)
    _dump(tmp_path / 'fig2' / 'b.pkl', data)
    (tmp_path / 'fig2' / 'link.pkl').symlink_to(tmp_path / 'fig1a' / 'a.pkl')
    assert len(recorded_runs.load_runs([str(tmp_path), str(tmp_path / 'fig1a')])) == 1


def test_release_pickles_read_with_the_release_protocol(tmp_path):
    _dump(tmp_path / 'MNIST' / 'r.pkl', _mnist('RKHS', 5, recorded=False))
    run, = recorded_runs.load_runs([str(tmp_path)])
    assert run.from_release and 'embedding' in run.assumed and 'train_error_images' in run.assumed
    assert (run.protocol['epochs'], run.protocol['decay_steps'], run.protocol['decay_rate'],
            run.protocol['train_error_images']) == (40, [35], 0.2, 1000)
    assert run.protocol['embedding']['release'] is True
    assert run.stopped_early  # 6 epochs of a 40-epoch protocol


def test_ragged_stats_average_runs_reaching_each_index():
    mean, std, low, high, count = recorded_runs.ragged_stats(
        [np.array([1.0, 2.0, 3.0]), np.array([3.0, np.inf]), np.array([5.0])])
    np.testing.assert_allclose(mean, [3.0, 2.0, 3.0])
    np.testing.assert_allclose(std, [2.0, np.nan, np.nan])
    np.testing.assert_allclose(low, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(high, [5.0, 2.0, 3.0])
    np.testing.assert_array_equal(count, [3, 1, 1])


def test_smooth_matches_naive_trailing_mean_and_isolates_huge_values():
    rng = np.random.default_rng(0)
    values = rng.random(50)
    values[10] = np.nan
    values[40] = 1e300  # must not spoil the windows that do not contain it
    window = 7
    naive = [np.nanmean(values[max(0, i - window + 1):i + 1]) for i in range(values.size)]
    np.testing.assert_allclose(recorded_runs.smooth(values, window), naive)
