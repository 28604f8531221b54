"""--seeds: K seeds trained in one process as one batched model, each member the run its seed
alone would have made; members stay independent; interruption and resume as for a single run."""
import json

import numpy as np
import pytest
import torch

import MNIST_experiments
import models
from conftest import folder_snapshot, load_results, run_script

SEEDS = (3, 5, 8)
COMMON = ['--synthetic', '--subset', '384', '--in_channels', '8', '--dim_int', '4', '--batch_size', '128',
          '--lr_init', '0.5', '--epochs', '2', '--embedding_dir', 'none', '--embedding_seed', '1']
# Keys that differ between any two runs by nature (times) or by name (the files).
UNCOMPARED = {'computation_time', 'epoch_times', 'checkpoint', 'batched_with', 'train_loss',
              'train_classif', 'test_classif', 'best_test_classif'}


def _main(tmp_path, monkeypatch, *argv):
    monkeypatch.chdir(tmp_path)
    return MNIST_experiments.main(MNIST_experiments.get_args_parser().parse_args([*COMMON, *argv]))


@pytest.mark.parametrize('model', ['RKHS', 'SHL'])
@pytest.mark.parametrize('method', ['euler', 'midpoint', 'rk4'])
@pytest.mark.slow
def test_each_member_is_the_single_run_of_its_seed(tmp_path, monkeypatch, model, method):
    flags = ['--model', model, '--method', method, '--layers', '3']
    assert _main(tmp_path, monkeypatch, *flags, '--seeds', *map(str, SEEDS), '--save', 'b.pkl') == 0
    for seed in SEEDS:
        assert _main(tmp_path, monkeypatch, *flags, '--seed', str(seed), '--save', f'one_s{seed}.pkl') == 0
        batched = load_results(tmp_path / 'MNIST_experiments' / f'b_s{seed}.pkl')
        single = load_results(tmp_path / 'MNIST_experiments' / f'one_s{seed}.pkl')
        assert set(batched) - set(single) == {'batched_with'} and batched['batched_with'] == 3
        for key in set(single) - UNCOMPARED:
            assert np.array_equal(np.asarray(batched[key]), np.asarray(single[key])), key
        assert batched['train_loss'].shape == single['train_loss'].shape == (6,)
        np.testing.assert_allclose(batched['train_loss'], single['train_loss'], rtol=1e-5)
        assert single['train_loss'][-1] < single['train_loss'][0]  # it trained
        for key in ('train_classif', 'test_classif'):  # counts of 384 images: the same, or one apart
            assert np.abs(np.rint((batched[key] - single[key]) * 384)).max() <= 1, key
        one = torch.load(tmp_path / 'MNIST_checkpoint' / f'one_s{seed}.pth', weights_only=True)
        member = torch.load(tmp_path / 'MNIST_checkpoint' / f'b_s{seed}.pth', weights_only=True)
        assert member['epoch'] == one['epoch'] and member['args']['seed'] == seed
        for part in ('input_net', 'ode_block', 'output_net'):
            assert member[part].keys() == one[part].keys()
            for name, tensor in one[part].items():
                torch.testing.assert_close(member[part][name], tensor, rtol=1e-4, atol=1e-6)


def test_a_diverging_member_leaves_the_others_unchanged(tmp_path, monkeypatch):
    flags = ['--layers', '2', '--seeds', *map(str, SEEDS)]
    assert _main(tmp_path, monkeypatch, *flags, '--save', 'calm.pkl') == 0
    stack = models.stack_members

    def with_a_wild_member(blocks):  # member 1 starts with huge output weights: it must blow up
        block = stack(blocks)
        with torch.no_grad():
            weight = block.func.output_weight
            weight.unflatten(1, (len(blocks), -1))[:, 1].normal_(0, 1e6)
        return block

    monkeypatch.setattr(models, 'stack_members', with_a_wild_member)
    assert _main(tmp_path, monkeypatch, *flags, '--save', 'wild.pkl') == 3  # one member diverged
    for k, seed in enumerate(SEEDS):
        calm = load_results(tmp_path / 'MNIST_experiments' / f'calm_s{seed}.pkl')
        wild = load_results(tmp_path / 'MNIST_experiments' / f'wild_s{seed}.pkl')
        if k == 1:
            assert wild['diverged'] is True and wild['diverged_epoch'] == 1
            assert not np.isfinite(wild['train_loss'][-1]) and np.isfinite(wild['train_loss'][:-1]).all()
            assert wild['test_classif'].shape == (1,)  # only the evaluation before training
            checkpoint = torch.load(tmp_path / 'MNIST_checkpoint' / f'wild_s{seed}.pth', weights_only=True)
            assert checkpoint['epoch'] == 0
            continue
        assert wild['diverged'] is False
        for key in ('train_loss', 'train_classif', 'test_classif'):
            np.testing.assert_array_equal(wild[key], calm[key], err_msg=key)


@pytest.mark.slow
def test_resume_after_sigterm_and_sigkill_gives_the_uninterrupted_pickles(tmp_path):
    argv = [*COMMON, '--layers', '2', '--model', 'SHL', '--seeds', *map(str, SEEDS)]
    whole = tmp_path / 'whole'
    whole.mkdir()
    assert run_script('MNIST_experiments.py', *argv, '--save', 'r.pkl', cwd=whole).returncode == 0
    cut = tmp_path / 'cut'
    cut.mkdir()
    stopped = run_script('MNIST_experiments.py', *argv, '--save', 'r.pkl', cwd=cut,
                         env={'RESNET_ODE_FAULT': 'step@2:SIGTERM'})
    assert stopped.returncode == 143, stopped.stderr
    state = torch.load(cut / 'MNIST_experiments' / 'r_s3-5-8.batch-resume.pt', weights_only=True)
    for k, seed in enumerate(SEEDS):  # each member's data order is its own seed's single run's
        expected = torch.randperm(384, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(state['position']['permutation'][k], expected)
    resume = ['--synthetic', '--save', 'r.pkl', '--seeds', *map(str, SEEDS), '--resume']
    killed = run_script('MNIST_experiments.py', *resume, cwd=cut, env={'RESNET_ODE_FAULT': 'step@3'})
    assert killed.returncode == -9  # SIGKILL in the second epoch
    finished = run_script('MNIST_experiments.py', *resume, cwd=cut)
    assert finished.returncode == 0, finished.stderr
    for seed in SEEDS:
        done = load_results(cut / 'MNIST_experiments' / f'r_s{seed}.pkl')
        expected = load_results(whole / 'MNIST_experiments' / f'r_s{seed}.pkl')
        for key in ('train_loss', 'train_classif', 'test_classif', 'best_epoch', 'seed'):
            assert np.array_equal(np.asarray(done[key]), np.asarray(expected[key])), key
    assert sorted(p.name for p in (cut / 'MNIST_experiments').iterdir()) == sorted(
        f'r_s{seed}{suffix}' for seed in SEEDS for suffix in ('.pkl', '.metrics.jsonl'))
    for seed in SEEDS:  # the metrics file, rebuilt on each resume, neither repeats nor misses an epoch
        done, expected = (_metric_rows(root / 'MNIST_experiments' / f'r_s{seed}.metrics.jsonl')
                          for root in (cut, whole))
        assert done == expected and [row[0] for row in done] == list(range(len(done)))


@pytest.mark.parametrize('flags, text', [
    (['--seeds', '1', '2', '--seed', '3'], '--seeds and --seed exclude each other'),
    (['--seeds', '4', '4'], 'lists a seed more than once'),
    (['--seeds', '-1'], '--seeds must be in [0, 2^63)'),
])
def test_bad_seed_lists_are_refused(tmp_path, flags, text):
    proc = run_script('MNIST_experiments.py', '--synthetic', '--save', 'x.pkl', *flags, cwd=tmp_path)
    assert proc.returncode == 2 and text in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert folder_snapshot(tmp_path) == []


def test_an_existing_member_pickle_is_never_overwritten(tmp_path):
    folder = tmp_path / 'MNIST_experiments'
    folder.mkdir()
    (folder / 'x_s2.pkl').write_bytes(b'precious')
    proc = run_script('MNIST_experiments.py', *COMMON, '--layers', '1', '--seeds', '1', '2',
                      '--save', 'x.pkl', cwd=tmp_path)
    assert proc.returncode == 2 and 'x_s2.pkl exists' in proc.stderr
    assert (folder / 'x_s2.pkl').read_bytes() == b'precious'
    assert folder_snapshot(tmp_path) == ['MNIST_experiments', 'MNIST_experiments/x_s2.pkl']


def _metric_rows(path):
    """(epoch, train error, test error, loss) of each evaluation line of a metrics file."""
    rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    return [(row['epoch'], row['train_error'], row['test_error'], row['train_loss']) for row in rows]
