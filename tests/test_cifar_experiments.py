"""CIFAR_experiments.py end to end: synthetic data, a fake CIFAR-10 folder, parameter counts."""
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision

import CIFAR_experiments
import models
from conftest import folder_snapshot, load_results, run_script
from resnet_ode import cifar, data


@pytest.mark.parametrize('model, layers, expected', [
    ('RKHS', 1, 5_858_122), ('RKHS', 10, 11_166_538), ('RKHS', 20, 17_064_778),
    ('SHL', 1, 9_986_890), ('SHL', 10, 20_603_722), ('SHL', 20, 32_400_202),
])
def test_epochs_0_pickle_records_parameter_count(tmp_path, monkeypatch, model, layers, expected):
    monkeypatch.chdir(tmp_path)
    args = CIFAR_experiments.get_args_parser().parse_args(
        ['--model', model, '--layers', str(layers), '--epochs', '0', '--synthetic', '--subset', '16',
         '--seed', '0', '--save', 'count.pkl'])
    assert CIFAR_experiments.main(args) == 0
    results = load_results(tmp_path / 'CIFAR_experiments' / 'count.pkl')
    assert results['num_parameters'] == expected
    assert results['test_classif'].shape == (1,) and results['train_loss'].shape == (0,)


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp('cifar_synthetic')
    # The full-width network on the fewest images that still make two SGD steps.
    proc = run_script('CIFAR_experiments.py', '--synthetic', '--subset', '32', '--layers', '1',
                      '--epochs', '1', '--batch_size', '16', '--lr_init', '0.05', '--seed', '7',
                      '--save', 'smoke.pkl', cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd


@pytest.mark.slow
def test_pickle_schema(synthetic_run):
    results = load_results(synthetic_run / 'CIFAR_experiments' / 'smoke.pkl')
    for key, kind in {'model': str, 'num_layers': int, 'num_parameters': int, 'batch_size': int,
                      'train_loss': np.ndarray, 'train_classif': np.ndarray,
                      'test_classif': np.ndarray, 'computation_time': float}.items():
        assert isinstance(results[key], kind), key
    assert results['train_loss'].shape == (2,)  # 32 images, batch 16
    assert results['train_classif'].shape == results['test_classif'].shape == (2,)
    assert results['num_parameters'] == 5_858_122


def test_rkhs_fixed_layers_unchanged_and_checkpoint_evaluates(synthetic_run):
    checkpoint = torch.load(synthetic_run / 'CIFAR_checkpoint' / 'smoke.pth', weights_only=True)
    torch.manual_seed(7)  # the run's seed: the network is the first thing built from it
    initial = models.CifarResNet('RKHS', 1).state_dict()
    trained = checkpoint['model']
    fixed = [k for k in initial if k.endswith('conv1.weight') and 'layer' in k]
    assert len(fixed) == 7
    for key in fixed:
        assert torch.equal(initial[key], trained[key]), key
    results = load_results(synthetic_run / 'CIFAR_experiments' / 'smoke.pkl')
    before = folder_snapshot(synthetic_run)
    proc = run_script('CIFAR_experiments.py', '--evaluate', 'CIFAR_checkpoint/smoke.pth',
                      '--synthetic', '--subset', '32', cwd=synthetic_run)
    assert proc.returncode == 0, proc.stderr
    printed = float(re.search(r'test error ([\d.]+)%', proc.stdout).group(1))
    assert printed == pytest.approx(100 * float(results['test_classif'].min()), abs=1e-4)
    assert folder_snapshot(synthetic_run) == before


def test_existing_results_file_is_refused(synthetic_run):
    target = synthetic_run / 'CIFAR_experiments' / 'smoke.pkl'
    content = target.read_bytes()
    proc = run_script('CIFAR_experiments.py', '--synthetic', '--save', 'smoke.pkl', cwd=synthetic_run)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert target.read_bytes() == content


def _write_fake_cifar(root, per_batch):
    """A cifar-10-batches-py folder in the release's pickle format, with known pixels."""
    folder = root / cifar.CIFAR_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in cifar.CIFAR_FILES:
        pixels = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, 'wb') as f:
            pickle.dump({'data': pixels, 'labels': labels}, f)
        written[name] = (pixels.reshape(per_batch, 3, 32, 32), labels)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': [f'class{i}' for i in range(10)]}, f)
    return written


@pytest.mark.slow
def test_fake_cifar_folder_loads_through_torchvision(tmp_path, monkeypatch):
    written = _write_fake_cifar(tmp_path / 'data', per_batch=8)
    # The fake files cannot match the real archive's MD5 sums: skip that check, in this test only.
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda *a, **k: True)
    train, test = cifar.load_cifar10(str(tmp_path / 'data'))
    assert train.images.shape == (40, 3, 32, 32) and test.images.shape == (8, 3, 32, 32)
    assert torch.equal(train.images[:8], torch.from_numpy(written['data_batch_1'][0]))
    assert torch.equal(train.images[32:], torch.from_numpy(written['data_batch_5'][0]))
    assert test.labels.tolist() == written['test_batch'][1]

    monkeypatch.chdir(tmp_path)
    args = CIFAR_experiments.get_args_parser().parse_args(
        ['--data_root', 'data', '--layers', '1', '--epochs', '1', '--batch_size', '20',
         '--seed', '0', '--save', 'fake.pkl'])
    assert CIFAR_experiments.main(args) == 0
    results = load_results(tmp_path / 'CIFAR_experiments' / 'fake.pkl')
    assert results['train_loss'].shape == (2,) and results['test_classif'].shape == (2,)


def test_missing_cifar_is_a_clear_error(tmp_path):
    proc = run_script('CIFAR_experiments.py', '--data_root', tmp_path / 'none', '--epochs', '0',
                      '--save', 'x.pkl', cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and 'cifar-10-batches-py' in message
    assert folder_snapshot(tmp_path) == []  # not even the root the download attempt made


def test_batched_augmentation_matches_torchvision_distribution():
    """Crop offsets uniform on 0..8 and flips with p=1/2, as RandomCrop(32, 4) + RandomHorizontalFlip."""
    transform = cifar.CifarTransform('cpu')
    image = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(251).add(1).to(torch.uint8)
    images = image.view(1, 3, 32, 32).expand(4000, 3, 32, 32).contiguous()
    out = transform.augment(images, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(image.view(3, 32, 32), (4, 4, 4, 4))
    seen = {}
    for crop in out[:400]:
        match = [(i, j, flip) for i in range(9) for j in range(9) for flip in (False, True)
                 if torch.equal(crop, (lambda c: c.flip(-1) if flip else c)(padded[:, i:i + 32, j:j + 32]))]
        assert len(match) == 1  # every output is exactly one crop-and-flip of the padded image
        seen[match[0]] = seen.get(match[0], 0) + 1
    assert {i for i, _, _ in seen} == set(range(9)) and {j for _, j, _ in seen} == set(range(9))
    flips = sum(n for (_, _, f), n in seen.items() if f)
    assert 140 < flips < 260  # Binomial(400, 1/2): 6 standard deviations either side


@pytest.fixture
def small_net_and_images():
    torch.manual_seed(0)
    net = models.CifarResNet('RKHS', 1).eval()
    return net, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _training_forward(net, images, **chosen):
    """What cifar.make_forward computes with the given speed options on CPU."""
    flags = [f'--{name}' for name, on in chosen.items() if on]
    args = CIFAR_experiments.get_args_parser().parse_args(flags)
    with torch.no_grad():
        return cifar.make_forward(net, args, torch.device('cpu'))(images)


def test_channels_last_forward_is_the_same_maths(small_net_and_images):
    net, images = small_net_and_images
    plain = _training_forward(net, images)
    net = net.to(memory_format=torch.channels_last)
    assert net.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    last = _training_forward(net, images, channels_last=True)
    # Another convolution algorithm for the other layout: float rounding only.
    torch.testing.assert_close(last, plain, rtol=1e-4, atol=1e-5)


def test_amp_runs_the_forward_in_bfloat16_and_returns_float32(small_net_and_images):
    net, images = small_net_and_images
    plain = _training_forward(net, images)
    amp = _training_forward(net, images, amp=True)
    assert amp.dtype == torch.float32
    assert not torch.equal(amp, plain)  # autocast was on: bfloat16 rounding shows
    # bfloat16 keeps 8 bits of mantissa: logits agree to a few percent, not to float32 rounding.
    torch.testing.assert_close(amp, plain, rtol=0.1, atol=0.1)


def test_training_error_sample_is_the_first_train_eval_size_of_a_fresh_permutation(monkeypatch):
    """train_classif, as in the release: cifar.TRAIN_EVAL_SIZE random training images (all of them
    when there are fewer), through the training augmentation, drawn anew at each evaluation."""
    train, _ = data.synthetic_dataset((3, 32, 32), 32, 1)
    transform = cifar.CifarTransform(torch.device('cpu'))
    sample = cifar.random_training_images(train, transform)
    images, labels, _ = sample(torch.Generator().manual_seed(0))
    assert images.shape == (32, 3, 32, 32) and sorted(labels.tolist()) == sorted(train.labels.tolist())

    monkeypatch.setattr(cifar, 'TRAIN_EVAL_SIZE', 8)
    generator, replay = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    first, second = sample(generator), sample(generator)
    index = torch.randperm(32, generator=replay)[:8]
    assert torch.equal(first[1], train.labels[index])
    assert torch.equal(first[0], transform.train_batch(train.images[index], replay))
    index = torch.randperm(32, generator=replay)[:8]
    assert torch.equal(second[1], train.labels[index]) and not torch.equal(first[0], second[0])
