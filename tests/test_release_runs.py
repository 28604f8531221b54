"""The release's stored runs: reading them, downloading them (all or nothing, checksums), the
comparison table's arithmetic, and the report."""
import contextlib
import functools
import http.server
import io
import os
import pickle
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import release_runs
from conftest import MNIST_ROOT, REPO
from resnet_ode import (
    comparison,
    downloads,
    embeddings,
    errors,
    files,
    gate,
    mnist,
    protocol,
    recorded_runs,
    release_reference,
    report,
)

SHARED_RUNS = Path(MNIST_ROOT) / 'release_runs'  # the shared data folder, or MNIST_DATA_ROOT
needs_release_runs = pytest.mark.skipif(
    not SHARED_RUNS.is_dir() and not os.environ.get('MNIST_DATA_ROOT'),
    reason='the release\'s stored runs are not beside the repository')


@needs_release_runs
def test_the_335_stored_runs_read_with_their_configurations_and_stops():
    loaded = recorded_runs.load_runs([str(SHARED_RUNS)])
    assert len(loaded) == 335
    groups = recorded_runs.group_runs(loaded)
    by_config = {recorded_runs.config_text(key[0]) + ' ' + key[0].dataset: group for key, group in groups.items()}
    assert len(by_config) == 20  # 14 MNIST configurations, 6 CIFAR-10 ones
    assert all(run.from_release and run.protocol['train_error_images'] for run in loaded)
    # the stops the data README lists: 19 of 20 SHL L=5 after 3 passes (after 16 to 33 epochs), 6 of 20 at L=10
    assert recorded_runs.stops(by_config['SHL L=5, C=32, 3 pass(es) MNIST'])[::18] == [16, 33]
    assert len(recorded_runs.stops(by_config['SHL L=5, C=32, 3 pass(es) MNIST'])) == 19
    assert recorded_runs.stops(by_config['SHL L=10, C=32, 3 pass(es) MNIST']) == [29, 29, 30, 32, 32, 34]
    assert len(by_config['SHL L=5, C=32, 0 pass(es) MNIST']) == 19
    assert len(by_config['RKHS L=20 CIFAR10']) == 6
    # every MNIST run starts where the release's embedding files start it
    start = {round(float(run.test_classif[0]), 4) for run in by_config['RKHS L=5, C=32, 0 pass(es) MNIST']}
    assert start == {0.8746}


def test_a_crafted_stored_run_is_refused_and_the_rest_read(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ('touch ' + str(tmp_path / 'ran'),))

    (tmp_path / 'MNIST_experiments').mkdir()
    with open(tmp_path / 'MNIST_experiments' / 'bad.pkl', 'wb') as f:
        pickle.dump({'model': 'RKHS', 'num_layers': 5, 'test_classif': RunsCode()}, f)
    with open(tmp_path / 'MNIST_experiments' / 'good.pkl', 'wb') as f:
        pickle.dump({'model': 'RKHS', 'num_layers': 5, 'in_channels': 32, 'dim_int': 32, 'pretrain_pass': 0,
                     'test_classif': np.array([0.9, 0.5], dtype=np.float32)}, f)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        loaded = recorded_runs.load_runs([str(tmp_path)])
    assert [Path(run.path).name for run in loaded] == ['good.pkl']
    assert 'bad.pkl: refused to unpickle it' in err.getvalue() and not (tmp_path / 'ran').exists()


# --- download -------------------------------------------------------------------------------------

def _files(folder: Path, names=('MNIST_experiments/a_0.pkl', 'CIFAR_experiments/b_0.pkl')):
    """A small 'release' served from `folder`, and its {path: sha256}."""
    sums = {}
    for index, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps({'index': index}))
        sums[name] = files.sha256(str(path))
    return sums


@contextlib.contextmanager
def _http_server(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}/'
    finally:
        server.shutdown()


def test_download_from_a_local_server_verifies_every_file(tmp_path):
    sums = _files(tmp_path / 'served')
    lines = []
    with _http_server(tmp_path / 'served') as url:
        assert downloads.download_verified(sums, url, str(tmp_path / 'got' / 'runs'), lines.append) == 2
        assert downloads.download_verified(sums, url, str(tmp_path / 'got' / 'runs')) == 0  # nothing missing
    for name in sums:
        assert (tmp_path / 'got' / 'runs' / name).read_bytes() == (tmp_path / 'served' / name).read_bytes()
    assert lines == [f'[1/2] {name}: SHA-256 verified' if i == 0 else f'[2/2] {name}: SHA-256 verified'
                     for i, name in enumerate(sums)]


@pytest.mark.parametrize('failure', ['bad checksum', 'missing file'])
def test_a_failed_download_leaves_nothing_behind(tmp_path, failure):
    sums = _files(tmp_path / 'served')
    name = 'CIFAR_experiments/b_0.pkl'
    if failure == 'bad checksum':
        sums[name] = '0' * 64
    else:
        (tmp_path / 'served' / name).unlink()
    target = tmp_path / 'new' / 'deeper' / 'runs'
    with _http_server(tmp_path / 'served') as url, pytest.raises(errors.DownloadError) as caught:
        downloads.download_verified(sums, url, str(target), log=lambda line: None)
    assert ('wrong SHA-256' if failure == 'bad checksum' else 'could not download') in str(caught.value)
    assert not (tmp_path / 'new').exists()  # no file, and no folder this call created


def test_download_command_uses_the_pinned_list_and_fails_in_one_line_offline(tmp_path, monkeypatch, capsys):
    sums = downloads.read_sha256sums(release_reference.SHA256SUMS)
    assert len(sums) == 335 and sum(name.startswith('MNIST_experiments/') for name in sums) == 279
    if SHARED_RUNS.is_dir():  # the pinned list is the shared copy's own
        assert sums == downloads.read_sha256sums(str(SHARED_RUNS / 'SHA256SUMS'))
    monkeypatch.setattr(release_reference, 'DOWNLOAD_URL', 'http://127.0.0.1:9/')  # nothing listens there
    monkeypatch.setattr(release_reference.download, '__defaults__', (release_reference.DEFAULT_DIR, 'http://127.0.0.1:9/', print))
    status = release_runs.main(release_runs.get_args_parser().parse_args(
        ['--download', '--reference', str(tmp_path / 'runs')]))
    err = capsys.readouterr().err
    assert status == 2 and err.startswith('error: could not download') and err.count('\n') == 1
    assert not (tmp_path / 'runs').exists()
    assert err.rstrip().endswith(f'into {tmp_path / "runs"}, or pass --reference <their folder>')


@needs_release_runs
def test_download_from_a_local_copy_of_the_release(tmp_path):
    fetched = release_reference.download(str(tmp_path / 'runs'), base_url=f'file://{SHARED_RUNS}/', log=lambda line: None)
    assert fetched == 335
    assert len(recorded_runs.load_runs([str(tmp_path / 'runs')])) == 335


# --- the comparison's arithmetic ------------------------------------------------------------------

def _run(seed, test, stopped=False, release=False, epochs=4, **protocol_changes):
    import argparse

    data = {'model': 'RKHS', 'num_layers': 5, 'in_channels': 32, 'dim_int': 32, 'pretrain_pass': 0,
            'test_classif': np.array(test, dtype=float), 'train_loss': np.ones(4)}
    if not release:
        args = argparse.Namespace(epochs=epochs, lr_init=0.5, decay_steps=[35], decay_rate=0.2, batch_size=256,
                                  train_error_images=1000, subset=None, synthetic=False, method='midpoint',
                                  time_weights='release', integrator='fixed', pretrain=0, amp=False)
        vars(args).update(protocol_changes)
        data.update(seed=seed, dataset='MNIST', diverged=stopped, protocol=protocol.build(
            args, 'MNIST', {'embedding_files': list(release_embedding_names()),
                            'embedding_sha256': list(release_embedding_sums())}))
    return recorded_runs.run_from_dict(data, f'/x/{"release" if release else "mine"}/RKHS_l5_p0_s{seed}.pkl')


def release_embedding_names():
    return embeddings.file_names(32, 0)


def release_embedding_sums():
    return [embeddings.RELEASE_SHA256[name] for name in release_embedding_names()]


def test_table_arithmetic_on_hand_made_runs(monkeypatch):
    from resnet_ode import protocol_comparison
    # the release's protocol, shortened to 4 epochs for hand-made runs
    monkeypatch.setitem(protocol_comparison.RELEASE, 'MNIST', dict(protocol_comparison.RELEASE['MNIST'], epochs=4))
    theirs = [_run(i, t, release=True) for i, t in enumerate([
        [0.9, 0.5, 0.3, 0.2, 0.10], [0.9, 0.4, 0.3, 0.2, 0.12], [0.9, 0.6, 0.2, 0.1, 0.14],
        [0.9, 0.5, 0.4]])]  # the last stopped after 2 epochs
    mine = [_run(0, [0.9, 0.45, 0.3, 0.2, 0.11]), _run(1, [0.9, 0.5, 0.3, 0.2, 0.20]),
            _run(2, [0.9, 0.5, 0.3], stopped=True), _run(3, [0.9, 0.5], epochs=1)]
    in_progress = _run(4, [0.9, 0.5, 0.3])
    in_progress.in_progress = True  # read from the metrics file of a run still going
    comparisons, others = comparison.compare(mine + [in_progress], theirs)
    (c,), ((other, why), (going, going_why)) = comparisons, others
    assert other.seed == 3 and why == 'epochs 1 (release: 4)'
    assert going is in_progress and going_why == 'in progress: 2 of 4 epochs done'
    assert [run.seed for run in c.mine] == [0, 1, 2]
    mean, std, count = c.release_final()
    assert count == 3 and mean == pytest.approx(0.12) and std == pytest.approx(0.02)
    assert c.z_score(mine[0]) == pytest.approx(-0.5) and c.z_score(mine[1]) == pytest.approx(4.0)
    assert np.isnan(c.z_score(mine[2]))
    assert c.at('theirs', 2) == pytest.approx((0.3, np.std([0.3, 0.3, 0.2, 0.4], ddof=1), 4))
    assert c.at('mine', 4) == pytest.approx((0.155, np.std([0.11, 0.20], ddof=1), 2))
    table = comparison.epoch_table(comparisons).splitlines()
    assert table[2].split(' | ')[1:4] == ['3 / 4', '1 (at 2)', '1 (at 2)']
    assert table[2].rstrip(' |').split(' | ')[-1] == '15.50 ± 6.36 / 12.00 ± 2.00'
    rows = [line.split(' | ') for line in comparison.run_table(comparisons).splitlines()[2:]]
    assert [(row[2], row[4], row[5].rstrip(' |')) for row in rows] == [
        ('11.00', '-0.50', 'inside'), ('20.00', '+4.00', 'OUTSIDE'), ('stopped at epoch 2', '–', '–')]
    by_verdict = comparison.verdicts(comparisons)
    assert {verdict: [run.seed for _, run in pairs] for verdict, pairs in by_verdict.items()} == {
        'inside': [0], 'OUTSIDE': [1], 'stopped': [2], 'no spread': []}
    assert report.headline_table(comparisons).splitlines()[2] == (
        '| Figure 1a, RKHS L=5 | 15.50 ± 6.36% (2 runs); 1 stopped early (after epoch 2) '
        '| 12.00 ± 2.00% (3 of 4 completed) |')
    assert report.headline(comparisons, theirs).split('\n\n')[1] == (
        "1 of the 2 runs that completed end within 2 standard deviations of the release's completed runs; "
        "outside: Figure 1a, RKHS L=5 seed 1 (z = +4.00); "
        "1 stopped early on a non-finite loss; "
        "1 of the 2 runs with a z-score end below the release's mean and 1 above (the report weighs this). "
        "Every configuration with the release's embedding files "
        "starts (epoch 0) at the release's test error, to the image.")


def test_a_late_loss_excursion_beyond_the_release_s_is_named_beside_the_verdict(monkeypatch):
    """Per-epoch means of the training loss, each over the lowest earlier one: the run here climbs
    to 4x (epoch 3), the release's runs at most to 1.2x, so the report says so; a release run that
    climbed as far leaves nothing to say."""
    import dataclasses

    from resnet_ode import protocol_comparison
    monkeypatch.setitem(protocol_comparison.RELEASE, 'MNIST', dict(protocol_comparison.RELEASE['MNIST'], epochs=4))

    def with_loss(run, epoch_means):  # two iterations per epoch, whose mean is the epoch's
        return dataclasses.replace(run, train_loss=np.repeat(np.array(epoch_means, dtype=float), 2) + [-0.1, 0.1] * 4)

    theirs = [with_loss(_run(i, [0.9, 0.5, 0.3, 0.2, 0.1], release=True), [1.0, 0.5, 0.6, 0.3]) for i in range(3)]
    mine = with_loss(_run(0, [0.9, 0.5, 0.3, 0.2, 0.1]), [1.0, 0.5, 2.0, 0.4])
    assert comparison.largest_loss_rise(mine) == pytest.approx((4.0, 3))
    assert comparison.largest_loss_rise(theirs[0]) == pytest.approx((1.2, 3))
    (c,), _ = comparison.compare([mine], theirs)
    assert report._loss_rise_words(mine, c) == (
        ' Its training loss (mean per epoch) climbed in epoch 3 to 4.0 times its lowest earlier epoch; '
        'no completed run of the release climbed beyond 1.2 times.')
    theirs[1] = with_loss(theirs[1], [1.0, 0.25, 1.0, 0.3])  # 4x as well: nothing stands out
    (c,), _ = comparison.compare([mine], theirs)
    assert report._loss_rise_words(mine, c) == ''
    one_epoch = dataclasses.replace(mine, test_classif=mine.test_classif[:2], train_loss=np.ones(2))
    rise, epoch = comparison.largest_loss_rise(one_epoch)
    assert np.isnan(rise) and epoch == 0


class _Scores:
    """A stand-in comparison whose runs are their own z-scores."""
    def __init__(self, scores):
        self.mine = scores

    def z_score(self, run):
        return run


def test_the_sign_test_counts_sides_and_gives_the_binomial_tail():
    # 8 below and 1 above: P(<= 1 of 9 on one side) = (1 + 9) / 2^9, doubled for two sides.
    # A stopped run (NaN) has no side.
    below, above, p, mean_z = comparison.sign_test([_Scores([-1.0] * 5), _Scores([-1.0] * 3 + [0.5, np.nan])])
    assert (below, above) == (8, 1) and p == 20 / 512 and mean_z == pytest.approx(-7.5 / 9)
    assert comparison.sign_test([_Scores([-0.1, -2.0, -0.3])])[:3] == (3, 0, 0.25)
    assert comparison.sign_test([_Scores([1.0, -1.0, 2.0, -2.0])])[2] == 1.0  # an even split
    below, above, p, mean_z = comparison.sign_test([_Scores([np.nan])])
    assert (below, above) == (0, 0) and np.isnan(p) and np.isnan(mean_z)


def test_a_completed_run_against_a_single_completed_release_run_has_no_verdict(monkeypatch, tmp_path):
    """SHL L=5 after 3 passes: 19 of the release's 20 runs stopped on a NaN. A run here that
    completes has one release run to compare with, no spread: neither inside nor OUTSIDE."""
    from resnet_ode import protocol_comparison
    monkeypatch.setitem(protocol_comparison.RELEASE, 'MNIST', dict(protocol_comparison.RELEASE['MNIST'], epochs=4))
    theirs = [_run(0, [0.9, 0.5, 0.3, 0.2, 0.10], release=True), _run(1, [0.9, 0.5], release=True)]
    mine = [_run(0, [0.9, 0.45, 0.3, 0.2, 0.30])]  # far from 10%, but against a single run
    comparisons, _ = comparison.compare(mine, theirs)
    (c,) = comparisons
    assert c.release_final()[2] == 1 and np.isnan(c.z_score(mine[0])) and c.verdict(mine[0]) == 'no spread'
    assert comparison.verdicts(comparisons)['no spread'] == [(c, mine[0])]
    assert report.headline(comparisons, theirs).split('\n\n')[1].startswith(
        "0 of the 1 runs that completed end within 2 standard deviations of the release's completed runs; "
        "1 completed where fewer than two of the release's runs did, so there is no spread to compare with. ")
    row = comparison.run_table(comparisons).splitlines()[2].split(' | ')
    assert [row[2], row[3], row[4], row[5]] == ['30.00', '1: 10.00 ± –', '–', 'no spread |']
    summary = list(report._report_sections(comparisons, [], mine, theirs, {}))
    assert ('- RKHS_l5_p0_s0 (RKHS L=5, C=32, 0 pass(es)) completed its epochs at 30.00%; of the '
            "release's 2 runs of that configuration only 1 completed (at 10.00%), too few for a "
            'spread to compare with.') in summary
    assert any(line.startswith('- 0 of the 0 runs here that completed their 4 epochs where two or more')
               for line in summary)
    # The README's row: one release run has a mean and no spread.
    assert report.headline_table(comparisons).splitlines()[2] == (
        '| Figure 1a, RKHS L=5 | 30.00% | 10.00% (1 of 2 completed) |')
    # A single run here that stopped: where it stopped, and its last test error.
    stopped = [_run(0, [0.9, 0.45, 0.08], stopped=True)]
    assert report.headline_table(comparison.compare(stopped, theirs)[0]).splitlines()[2] == (
        '| Figure 1a, RKHS L=5 | stopped on a non-finite loss after epoch 2 (test error then 8.00%) '
        '| 10.00% (1 of 2 completed) |')


def _write_runs(results, reference):
    """Two runs here and two of the release, RKHS L=5, as pickles: the release's protocol
    shortened to 4 epochs (the caller patches protocol_comparison.RELEASE)."""
    for seed, test in enumerate([[0.9, 0.45, 0.3, 0.2, 0.11], [0.9, 0.5, 0.3, 0.2, 0.12]]):
        run = _run(seed, test)
        path = results / 'MNIST_experiments' / 'fig1a' / f'RKHS_l5_p0_s{seed}.pkl'
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, 'wb') as f:
            pickle.dump({'model': 'RKHS', 'num_layers': 5, 'in_channels': 32, 'dim_int': 32, 'pretrain_pass': 0,
                         'seed': seed, 'dataset': 'MNIST', 'test_classif': run.test_classif,
                         'train_loss': run.train_loss, 'computation_time': 600.0, 'epoch_times': [150.0] * 4,
                         'protocol': run.protocol}, f)
    for index, test in enumerate([[0.9, 0.5, 0.3, 0.2, 0.10], [0.9, 0.4, 0.3, 0.2, 0.12]]):
        path = reference / 'MNIST_experiments' / f'RKHS_l5_q32_p0_{index}.pkl'
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, 'wb') as f:
            pickle.dump({'model': 'RKHS', 'num_layers': 5, 'in_channels': 32, 'dim_int': 32, 'pretrain_pass': 0,
                         'test_classif': np.array(test), 'train_loss': np.ones(4)}, f)


RUN_ROW = '| RKHS_l5_p0_s0 | RKHS L=5, C=32, 0 pass(es) | 11.00 | 2: 11.00 ± 1.41 | +0.00 | inside |'


def test_compare_command_prints_the_tables_and_refuses_a_folder_without_runs(tmp_path, monkeypatch, capsys):
    from resnet_ode import protocol_comparison
    monkeypatch.setitem(protocol_comparison.RELEASE, 'MNIST', dict(protocol_comparison.RELEASE['MNIST'], epochs=4))
    results, reference, empty = tmp_path / 'results', tmp_path / 'reference', tmp_path / 'empty'
    _write_runs(results, reference)
    empty.mkdir()
    parse = release_runs.get_args_parser().parse_args
    assert release_runs.main(parse([str(results / 'MNIST_experiments'), '--reference', str(reference)])) == 0
    out = capsys.readouterr().out
    assert RUN_ROW in out.splitlines() and out.rstrip().endswith('Not compared:\nNone.')
    for folders, reference_folder, where in (([empty], reference, empty), ([results], empty, empty)):
        status = release_runs.main(parse([*map(str, folders), '--reference', str(reference_folder)]))
        captured = capsys.readouterr()
        assert status == 2 and captured.out == ''
        assert captured.err == (f'error: no runs to compare in {where} (results pickles, or the metrics '
                                f'files of runs in progress)\n')


def test_the_report_is_regenerated_identically(tmp_path, monkeypatch, capsys):
    """The report from committed files alone: written twice, the same text."""
    results, reference = tmp_path / 'results', tmp_path / 'reference'
    from resnet_ode import protocol_comparison
    monkeypatch.setitem(protocol_comparison.RELEASE, 'MNIST', dict(protocol_comparison.RELEASE['MNIST'], epochs=4))
    _write_runs(results, reference)
    texts = []
    for attempt in range(2):
        out = tmp_path / f'REPORT{attempt}.md'
        report.write_report(str(reference), results=str(results), out=str(out))
        texts.append(out.read_text())
    assert texts[0] == texts[1]
    assert '- 2 of the 2 runs here that completed their 4 epochs end within 2 standard deviations' in texts[0]
    assert RUN_ROW in texts[0]
    assert '| RKHS L=5, C=32, 0 pass(es) | 2 | 10.0 | 150.0 | 150.0 |' in texts[0].splitlines()  # the time table
    assert (tmp_path / 'docs' / 'reproduction' / 'figure1a.png').stat().st_size > 10_000
    shutil.rmtree(tmp_path / 'docs')


def test_the_report_refuses_a_reference_that_is_not_the_whole_release(tmp_path, capsys):
    (tmp_path / 'MNIST_experiments').mkdir()
    (tmp_path / 'MNIST_experiments' / 'RKHS_l5_q32_p0_0.pkl').write_bytes(b'not the release file')
    report_file = Path(report.REPORT)
    before = (report_file.read_bytes(), report_file.stat().st_mtime_ns)
    status = release_runs.main(release_runs.get_args_parser().parse_args(['--report', '--reference', str(tmp_path)]))
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ''
    assert captured.err == (f"error: {tmp_path} is not the release's 335 stored runs (334 missing, e.g. "
                            f"CIFAR_experiments/RKHS_l10_10.pkl; 1 not the release's bytes, e.g. "
                            f"MNIST_experiments/RKHS_l5_q32_p0_0.pkl); python release_runs.py --download "
                            f"fetches them\n")
    assert (report_file.read_bytes(), report_file.stat().st_mtime_ns) == before


@needs_release_runs
def test_reference_check_on_a_copy_of_the_release(tmp_path):
    copy = tmp_path / 'release_runs'
    shutil.copytree(SHARED_RUNS, copy)
    assert release_reference.reference_problem(str(copy)) is None
    changed = copy / 'MNIST_experiments' / 'SHL_l20_q32_p3_7.pkl'
    changed.write_bytes(changed.read_bytes()[:-1] + b'\0')
    (copy / 'CIFAR_experiments' / 'SHL_l10_11.pkl').unlink()
    assert release_reference.reference_problem(str(copy)) == (
        "1 missing, e.g. CIFAR_experiments/SHL_l10_11.pkl; "
        "1 not the release's bytes, e.g. MNIST_experiments/SHL_l20_q32_p3_7.pkl")


@pytest.mark.slow
@needs_release_runs
def test_the_committed_report_is_what_the_committed_runs_give(tmp_path, capsys):
    """REPRODUCTION.md, regenerated from results/ and the release's runs, is the committed text,
    and the README's summary (table and sentences) is the one it prints: a run added to results/
    without regenerating the report and the README, or a hand edit of their numbers, fails."""
    out = tmp_path / 'REPRODUCTION.md'
    report.write_report(str(SHARED_RUNS), results=str(REPO / 'results'), out=str(out))
    assert out.read_text() == (REPO / 'REPRODUCTION.md').read_text()
    summary = capsys.readouterr().out.split('("Does it reproduce the paper?"):\n')[1].strip()
    assert summary.startswith('| configuration |') and summary in (REPO / 'README.md').read_text()


def test_training_loss_and_error_at_the_last_epoch_against_the_release_range(monkeypatch, tmp_path):
    from resnet_ode import protocol_comparison
    monkeypatch.setitem(protocol_comparison.RELEASE, 'MNIST', dict(protocol_comparison.RELEASE['MNIST'], epochs=4))
    test = [0.9, 0.5, 0.3, 0.2, 0.10]
    mine = [_run(0, test)]
    theirs = [_run(0, test, release=True), _run(1, test, release=True), _run(2, [0.9, 0.5], release=True)]
    # 2 iterations per epoch: the last epoch's loss is the mean of the last two values
    for run, last_two, error in ((mine[0], [1.2, 0.8], 0.05), (theirs[0], [0.5, 0.5], 0.02),
                                 (theirs[1], [1.0, 2.0], 0.04), (theirs[2], [9.0, 9.0], 0.5)):
        run.train_loss = np.array([3.0] * 6 + last_two)
        run.train_classif = np.array([0.9, 0.5, 0.3, 0.2, error])
    comparisons, _ = comparison.compare(mine, theirs)
    assert comparison.training_table(comparisons).splitlines()[2] == (
        '| RKHS_l5_p0_s0 | RKHS L=5, C=32, 0 pass(es) | 1.0000 | 1.0000 [0.5000–1.5000] | 5.00 | 3.00 [2.00–4.00] |')
    summary = list(report._report_sections(comparisons, [], mine, theirs, {}))
    start = summary.index("- At the last epoch, the training loss lies within the range (min to max) of the "
                          "release's completed runs in 1 of the 1 completed runs here, and the training error in 0:")
    assert summary[start + 1] == ("  - RKHS_l5_p0_s0 (RKHS L=5, C=32, 0 pass(es)): training error 5.00%, the "
                                  "release's 2.00% to 4.00%.")


def test_rkhs_blocks_of_one_seed_and_width_share_omega_whatever_their_depth():
    """What the report's summary says of runs with the same seed: an RKHS block's random features
    (Omega) depend on the seed and the width, not on the depth, so the runs of one seed are not
    independent draws; another seed draws other features."""
    import torch

    def omega(layers, seed):
        args = gate.validate(mnist.RULES, ['--model', 'RKHS', '--layers', str(layers), '--in_channels', '8',
                                       '--dim_int', '8', '--seed', str(seed), '--synthetic',
                                       '--embedding_seed', '0'], gate.SWEEP)
        with torch.random.fork_rng(devices=[]):
            net, _ = mnist.build_network(args, None)
        return net.ode_block.func.omega.weight.detach()

    shallow, deep, other_seed = omega(5, 0), omega(20, 0), omega(5, 1)
    assert torch.equal(shallow, deep)
    assert not torch.equal(shallow, other_seed)


def test_the_report_refuses_folders_it_would_not_read(tmp_path, capsys):
    status = release_runs.main(release_runs.get_args_parser().parse_args(
        ['--report', str(tmp_path), '--reference', str(tmp_path)]))
    assert status == 2 and capsys.readouterr().err == (
        f'error: --report reads the committed runs in results/; it takes no folders (got {tmp_path}): '
        f'compare them without --report\n')


@pytest.mark.parametrize('reference', ['', 'a_file'])
def test_download_to_no_folder_is_one_plain_line(tmp_path, monkeypatch, capsys, reference):
    (tmp_path / 'a_file').write_text('not a folder')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(release_reference, 'DOWNLOAD_URL', 'http://127.0.0.1:9/')  # never reached
    status = release_runs.main(release_runs.get_args_parser().parse_args(['--download', '--reference', reference]))
    assert status == 2 and capsys.readouterr().err == (
        f"error: --reference must name a folder to download into, got {reference!r}\n")
    assert sorted(os.listdir(tmp_path)) == ['a_file']
