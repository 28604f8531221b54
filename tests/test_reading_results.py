"""Reading results back: only what a run writes is read as a run; anything else, crafted,
absurd or not a regular file, is skipped with one warning naming it, and the other runs are
still read and drawn."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import MNIST_ROOT, REPO, run_script
from resnet_ode import protocol_comparison, recorded_runs, release_reference

RESULTS = REPO / 'results' / 'MNIST_experiments' / 'fig1a'
SHARED_RUNS = Path(MNIST_ROOT) / 'release_runs'  # the shared data folder, or MNIST_DATA_ROOT
needs_release_runs = pytest.mark.skipif(not (SHARED_RUNS / 'SHA256SUMS').exists(),
                                        reason='the release\'s stored runs are not on this machine')


def _committed_run() -> dict:
    return recorded_runs.load_results(str(RESULTS / 'RKHS_l5_p0_s0.pkl'))


def _warnings(stderr: str, name: str) -> list[str]:
    return [line for line in stderr.splitlines() if name in line and line.startswith('warning: ')]


# --- huge integers and other absurd values in a results pickle --------------------------------

@pytest.mark.parametrize('field, value', [
    ('computation_time', 10 ** 400), ('epoch_times', [1.0, 10 ** 400]), ('num_layers', 10 ** 400),
    ('seed', 10 ** 400), ('nu', 10 ** 400), ('num_parameters', -10 ** 400), ('batch_size', 2 ** 63),
    ('in_channels', float('inf')), ('pretrain_pass', 'three'), ('decay_steps', [10 ** 400]),
])
def test_a_field_out_of_range_skips_the_file_and_the_others_are_drawn(tmp_path, field, value):
    runs = tmp_path / 'runs'
    runs.mkdir()
    shutil.copy(RESULTS / 'RKHS_l5_p0_s0.pkl', runs / 'good.pkl')
    with open(runs / 'crafted.pkl', 'wb') as f:
        pickle.dump({**_committed_run(), field: value}, f)
    proc = run_script('plot_figures.py', runs, '--figure', '1a', '--out_dir', tmp_path / 'figs', cwd=tmp_path)
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    warnings = _warnings(proc.stderr, 'crafted.pkl')
    assert len(warnings) == 1 and field in warnings[0], proc.stderr
    assert 'loaded 1 run(s)' in proc.stdout and (tmp_path / 'figs' / 'figure1a.png').exists()


def test_a_synthetic_pickle_with_a_huge_field_is_skipped(tmp_path):
    runs = tmp_path / 'runs'
    runs.mkdir()
    good = REPO / 'results' / 'synthetic_experiments' / 'sweep'
    first = sorted(good.glob('RKHS_*.pkl'))[0]
    shutil.copy(first, runs / 'good.pkl')
    with open(runs / 'crafted.pkl', 'wb') as f:
        pickle.dump({**recorded_runs.load_results(str(first)), 'nu': 10 ** 400, 'seed': 99}, f)
    proc = run_script('plot_figures.py', runs, '--figure', 'synthetic', '--out_dir', tmp_path, cwd=tmp_path)
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    assert len(_warnings(proc.stderr, 'crafted.pkl')) == 1 and 'loaded 1 synthetic run(s)' in proc.stdout


# --- crafted metrics files -----------------------------------------------------------------------

def _metrics_lines():
    """A real metrics file's lines: a run of 2 epochs, made here."""
    header = {'run': 'm.pkl', 'dataset': 'MNIST', 'model': 'RKHS', 'num_layers': 5, 'in_channels': 32,
              'dim_int': 32, 'pretrain_pass': 0, 'batch_size': 256, 'seed': 0, 'protocol': _committed_run()['protocol']}
    epochs = [{'epoch': e, 'iterations': 235 * e, 'lr': 0.5 if e else None, 'train_loss': 0.1 if e else None,
               'train_error': 0.1, 'test_error': 0.1, 'epoch_seconds': 1.0 if e else None, 'time': None}
              for e in range(3)]
    return [header, *epochs]


@pytest.mark.parametrize('craft, why', [
    (lambda lines: '[' * 100_000 + ']' * 100_000 + '\n', 'RecursionError'),
    (lambda lines: [*lines[:2], {**lines[2], 'iterations': 10 ** 30}, *lines[3:]], 'iteration counts'),
    (lambda lines: [*lines[:2], {**lines[2], 'iterations': 10 ** 12}, *lines[3:]], 'iteration counts'),
    (lambda lines: [*lines[:2], {**lines[2], 'iterations': -5}, *lines[3:]], 'iteration counts'),
    (lambda lines: [*lines[:3], {**lines[3], 'iterations': 1}], 'iteration counts'),
])
def test_a_crafted_metrics_file_is_skipped_with_one_warning(tmp_path, craft, why):
    runs = tmp_path / 'runs'
    runs.mkdir()
    shutil.copy(RESULTS / 'RKHS_l5_p0_s0.pkl', runs / 'good.pkl')
    crafted = craft(_metrics_lines())
    text = crafted if isinstance(crafted, str) else ''.join(json.dumps(line) + '\n' for line in crafted)
    (runs / 'crafted.metrics.jsonl').write_text(text)
    proc = run_script('plot_figures.py', runs, '--figure', '1a', '--out_dir', tmp_path / 'figs', cwd=tmp_path)
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    warnings = _warnings(proc.stderr, 'crafted.metrics.jsonl')
    assert len(warnings) == 1 and why in warnings[0], proc.stderr
    assert 'loaded 1 run(s)' in proc.stdout


def test_the_plain_metrics_file_is_still_read_as_a_run_in_progress(tmp_path):
    (tmp_path / 'm.metrics.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in _metrics_lines()))
    (run,) = recorded_runs.load_runs([str(tmp_path)])
    assert run.in_progress and run.epochs_done == 2 and len(run.train_loss) == 470


# --- special files and set-aside folders -----------------------------------------------------------

def test_special_files_named_like_results_are_named_in_a_warning(tmp_path):
    runs = tmp_path / 'runs'
    runs.mkdir()
    shutil.copy(RESULTS / 'RKHS_l5_p0_s0.pkl', runs / 'good.pkl')
    os.mkfifo(runs / 'fifo.pkl')
    (runs / 'zero.pkl').symlink_to('/dev/zero')
    os.mkfifo(runs / 'other.metrics.jsonl')
    proc = subprocess.run([sys.executable, str(REPO / 'plot_figures.py'), str(runs), '--figure', '1a',
                           '--out_dir', str(tmp_path / 'figs')], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _warnings(proc.stderr, 'fifo.pkl') == [f'warning: skipping {runs}/fifo.pkl: it is a FIFO, not a results file']
    assert _warnings(proc.stderr, 'zero.pkl') == [f'warning: skipping {runs}/zero.pkl: it is a character device, '
                                                 f'not a results file']
    assert len(_warnings(proc.stderr, 'other.metrics.jsonl')) == 1 and 'loaded 1 run(s)' in proc.stdout


@pytest.mark.parametrize('kind, what', [('fifo', 'a FIFO'), ('folder', 'a folder')])
def test_evaluate_names_a_fifo_or_a_folder_for_what_it_is(tmp_path, kind, what):
    target = tmp_path / 'ckpt.pth'
    os.mkfifo(target) if kind == 'fifo' else target.mkdir()
    proc = run_script('MNIST_experiments.py', '--evaluate', target, '--synthetic', cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == f'error: --evaluate: {target} is {what}, not a checkpoint file\n'


def test_runs_set_aside_by_a_sweep_are_not_read_again(tmp_path):
    shutil.copy(RESULTS / 'RKHS_l5_p0_s0.pkl', tmp_path / 'good.pkl')
    aside = tmp_path / f'{recorded_runs.SET_ASIDE_PREFIX}20261207-101500' / 'MNIST_experiments'
    aside.mkdir(parents=True)
    shutil.copy(RESULTS / 'RKHS_l5_p0_s1.pkl', aside / 'old.pkl')
    assert [os.path.basename(run.path) for run in recorded_runs.load_runs([str(tmp_path)])] == ['good.pkl']


# --- the protocol record keeps runs of other process counts apart ----------------------------------

def test_world_size_and_sync_bn_separate_runs_everywhere_protocols_are_compared():
    record = _committed_run()['protocol']
    assert 'world_size' not in record  # committed before the field: read as one process
    one, _ = protocol_comparison.read(_committed_run(), 'MNIST')
    assert (one['world_size'], one['sync_bn']) == (1, None)
    two = dict(one, world_size=2)
    assert protocol_comparison.differences(two, one) == [('world_size', 2, 1)]
    assert protocol_comparison.group_key(two) != protocol_comparison.group_key(one)
    cifar = dict(one, dataset='CIFAR10', sync_bn=False, world_size=2)
    assert protocol_comparison.differences(dict(cifar, sync_bn=True), cifar) == [('sync_bn', True, False)]


def test_two_runs_that_differ_only_in_world_size_are_both_kept(tmp_path):
    data = _committed_run()
    for name, world in (('one.pkl', 1), ('two.pkl', 2)):
        with open(tmp_path / name, 'wb') as f:
            pickle.dump({**data, 'world_size': world, 'protocol': {**data['protocol'], 'world_size': world,
                                                                   'sync_bn': None}}, f)
    runs = recorded_runs.load_runs([str(tmp_path)])
    assert len(runs) == 2 and len(recorded_runs.group_runs(runs)) == 2


# --- the release's side of a comparison is exactly the pinned files ---------------------------------

@needs_release_runs
def test_a_reference_with_an_extra_pickle_is_refused_by_the_report(tmp_path):
    copy = tmp_path / 'release_runs'
    shutil.copytree(SHARED_RUNS, copy)
    extra = copy / 'MNIST_experiments' / 'RKHS_l5_q32_p0_99.pkl'
    with open(copy / 'MNIST_experiments' / 'RKHS_l5_q32_p0_0.pkl', 'rb') as f:
        data = pickle.load(f)
    data['test_classif'] = np.full_like(data['test_classif'], 0.5)
    with open(extra, 'wb') as f:
        pickle.dump(data, f)
    report = REPO / 'REPRODUCTION.md'
    before = report.read_bytes()
    proc = run_script('release_runs.py', '--report', '--reference', copy, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr == (f"error: {copy} is not the release's 335 stored runs (1 not one of the release's "
                           f"files, e.g. MNIST_experiments/RKHS_l5_q32_p0_99.pkl); python release_runs.py "
                           f"--download fetches them\n")
    assert report.read_bytes() == before
    assert len(release_reference.load_release_runs(str(copy))) == 335  # the comparison reads the pinned only
