"""Golden runs: seeded CPU runs of both scripts whose outputs are pinned in tests/golden/.

A refactor must leave them unchanged: every pickle value (timing and version keys aside) and the
best checkpoint's tensors. Integers, strings, None, booleans, the keys and every array's dtype
and shape are compared exactly; floats to FLOAT_RTOL, so that the pins hold on any x86 CPU (see
FLOAT_RTOL). Checkpoint tensors are pinned by a few summary numbers and an evenly spaced sample
of their values (or all of them, for small tensors), compared to the same tolerance.

The pins are a second line of defence: test_reference_loop.py checks the training loop against
an independent one, and test_pins_agree_with_the_reference_loop below checks that the pinned
numbers are what that independent loop computes. A change that alters results on purpose (a new
random stream, say) regenerates the files, alone in its own commit, with the reason in the
message:

    python tests/test_golden.py --regenerate
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / 'golden'
# Wall-clock and environment facts: they differ from run to run by nature.
UNPINNED_KEYS = {'computation_time', 'epoch_times', 'torch_version', 'torchvision_version',
                 'python_version'}
# Pins made on one x86 CPU differ on another by float32 rounding only: another SIMD width or
# kernel sums in another order. Measured: the losses pinned on an Intel AVX-512 machine and
# rerun on an AMD EPYC differed by at most 2.1e-7 relative (tests/golden at 83ababd against
# 152a95b), the error curves not at all. 1e-5 is 50 times that, and far below what any change
# in the maths moves: a rate, a reduction, a data order or one step more changes the losses
# by 1e-3 relative or more.
FLOAT_RTOL = 1e-5
# A value near 0 in a trained tensor is the sum of terms far larger than itself (a BatchNorm bias
# that barely moved, a running mean of activations that nearly cancel), so its rounding error is
# float32's 1.2e-7 times those terms, not times the value. A second AMD EPYC machine moved such
# values by up to 2.8e-8 (1.6e-4 relative: a running mean of -1.7786e-4 against -1.7789e-4).
# 1e-7 per value covers that and stays far below what one SGD step of these runs moves a weight.
FLOAT_ATOL = 1e-7
FULL_TENSOR_SIZE = 32   # tensors up to this many values are pinned whole
TENSOR_SAMPLE = 16      # larger ones: this many values at evenly spaced flat positions
EMBEDDING_FILE_SEED = 123
MNIST_SMALL = ['--synthetic', '--subset', '384', '--in_channels', '8', '--dim_int', '4',
               '--batch_size', '128']
# In each run the errors change and the best epoch is a trained one (in the two SHL runs, the
# last), so that its checkpoint pins trained weights, not the initial ones.
RUNS = {
    # RKHS, the default method, a drawn embedding, a decay inside the run.
    'mnist_rkhs': ('MNIST_experiments.py', [*MNIST_SMALL, '--lr_init', '0.5', '--layers', '3',
                                            '--epochs', '3', '--decay_steps', '2', '--seed', '5',
                                            '--embedding_dir', 'none']),
    # SHL, rk4, a pretrained embedding from its own seed, a decay inside the run; best epoch the
    # last. SHL's output layers start at 0, so its hidden layers get no gradient at first: at
    # the rate 0.5 of the others its errors did not move in 2 epochs.
    'mnist_shl_pretrained': ('MNIST_experiments.py', [*MNIST_SMALL, '--model', 'SHL', '--layers', '2',
                                                      '--method', 'rk4', '--lr_init', '6',
                                                      '--epochs', '3', '--decay_steps', '2',
                                                      '--decay_rate', '0.5',
                                                      '--pretrain', '1', '--pretrain_lr', '0.05',
                                                      '--seed', '6', '--embedding_seed', '2',
                                                      '--embedding_dir', 'none']),
    # Euler with the linear schedule, A and B loaded from release-format files.
    'mnist_files_linear': ('MNIST_experiments.py', [*MNIST_SMALL, '--lr_init', '0.5', '--layers', '4',
                                                    '--method', 'euler', '--time_weights', 'linear',
                                                    '--epochs', '2', '--seed', '7', '--embedding_dir', 'emb']),
    # CIFAR-10 SHL on 16 synthetic images (each epoch of a ResNet18 layout is costly on a CPU), a
    # decay inside the run; best epoch the last.
    'cifar_shl': ('CIFAR_experiments.py', ['--synthetic', '--subset', '16', '--model', 'SHL',
                                           '--layers', '1', '--epochs', '2', '--batch_size', '8',
                                           '--lr_init', '0.03', '--decay_steps', '1',
                                           '--decay_rate', '0.5', '--seed', '6']),
}


def _embedding_networks():
    """The A and B of the 'emb' files: 8 channels, drawn from a fixed seed."""
    sys.path.insert(0, str(REPO))
    import models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EMBEDDING_FILE_SEED)
        return models.mnist_input_network(8), models.mnist_output_network(8)


def _write_embedding_files(folder: Path):
    """Release-format A and B for 8 channels, 0 passes."""
    folder.mkdir(exist_ok=True)
    for part, net in zip(('input', 'output'), _embedding_networks()):
        torch.save({'model': net, 'loss': torch.tensor(0.0)}, folder / f'8channels_0pass_{part}_embedding.pt')


def _plain(value):
    """A JSON form of a pickle value: arrays keep dtype and shape; floats stay floats (JSON
    writes Python floats so that they read back exactly)."""
    if isinstance(value, np.ndarray):
        return {'dtype': str(value.dtype), 'shape': list(value.shape),
                'values': [v.item() for v in value.ravel()]}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def tensor_summary(tensor: torch.Tensor) -> dict:
    """dtype, shape, and either every value or: sum, sum of |x|, sum of squares (in float64),
    min, max and TENSOR_SAMPLE values at evenly spaced flat positions."""
    values = tensor.detach().cpu().flatten()
    summary = {'dtype': str(tensor.dtype), 'shape': list(tensor.shape)}
    if values.numel() <= FULL_TENSOR_SIZE or not values.is_floating_point():
        return {**summary, 'values': values.tolist()} if values.numel() <= FULL_TENSOR_SIZE else \
            {**summary, 'sum': int(values.sum()), 'sample': _sample(values).tolist()}
    wide = values.double()
    return {**summary, 'sum': wide.sum().item(), 'abs_sum': wide.abs().sum().item(),
            'square_sum': wide.square().sum().item(), 'min': wide.min().item(),
            'max': wide.max().item(), 'sample': _sample(values).tolist()}


def _sample(values: torch.Tensor) -> torch.Tensor:
    positions = np.linspace(0, values.numel() - 1, TENSOR_SAMPLE).round().astype(np.int64)
    return values[torch.from_numpy(positions)]


def summarise_state(state: dict) -> dict:
    return {key: tensor_summary(value) for key, value in sorted(state.items())
            if isinstance(value, torch.Tensor)}


def run_and_summarise(name: str, cwd: Path) -> dict:
    script, argv = RUNS[name]
    if '--embedding_dir' in argv and argv[argv.index('--embedding_dir') + 1] == 'emb':
        _write_embedding_files(cwd / 'emb')
    from conftest import run_main
    # One thread: the same summation order on every machine.
    proc = run_main(script, *argv, '--save', f'{name}.pkl', cwd=cwd, threads=1)
    assert proc.returncode == 0, proc.stderr
    folder = 'MNIST' if script.startswith('MNIST') else 'CIFAR'
    with open(cwd / f'{folder}_experiments' / f'{name}.pkl', 'rb') as f:
        import pickle
        results = pickle.load(f)
    checkpoint = torch.load(cwd / f'{folder}_checkpoint' / f'{name}.pth', weights_only=True)
    parts = {key: summarise_state(value) for key, value in checkpoint.items()
             if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())}
    # The protocol record's code and torch versions change with every commit and install.
    results['protocol'] = {key: value for key, value in results['protocol'].items()
                           if key not in ('code_version', 'torch_version')}
    return {'pickle': {key: _plain(value) for key, value in sorted(results.items())
                       if key not in UNPINNED_KEYS},
            'checkpoint_epoch': checkpoint['epoch'], 'checkpoint_tensors': parts}


def assert_matches(actual, expected, where='', rtol=FLOAT_RTOL, atol=FLOAT_ATOL):
    """Structure, keys, types, integers and strings exactly; floats to rtol (arrays and tensors:
    see _assert_summary; atol applies there only)."""
    assert type(actual) is type(expected), (where, actual, expected)
    if isinstance(expected, dict) and {'dtype', 'shape'} <= set(expected):
        _assert_summary(actual, expected, where, rtol, atol)
    elif isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), where  # the same keys, none added
        for key in expected:
            assert_matches(actual[key], expected[key], f'{where}/{key}', rtol, atol)
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_matches(a, e, f'{where}[{i}]', rtol, atol)
    elif isinstance(expected, float):
        assert _close(actual, expected, rtol * abs(expected)), (where, actual, expected)
    else:
        assert actual == expected, (where, actual, expected)


def _assert_summary(actual, expected, where, rtol, atol):
    """An array's or a tensor's summary: keys, dtype and shape exactly, integers exactly. Its
    floats to rtol times the largest magnitude among its values (a value near 0 in a trained
    tensor has few significant bits to agree on), plus atol per value; sums in proportion."""
    assert sorted(actual) == sorted(expected), where
    assert (actual['dtype'], actual['shape']) == (expected['dtype'], expected['shape']), where
    values = expected.get('values', expected.get('sample'))
    if not values or not isinstance(values[0], float):
        assert actual == expected, where
        return
    count = math.prod(expected['shape'])
    scale = (max(abs(expected['min']), abs(expected['max'])) if 'max' in expected
             else max((abs(v) for v in values if math.isfinite(v)), default=0.0))
    each = atol + rtol * scale
    tolerances = {'values': each, 'sample': each, 'min': each, 'max': each}
    if 'abs_sum' in expected:  # sums: relative to the sum of magnitudes (a sum may cancel)
        tolerances['sum'] = tolerances['abs_sum'] = count * atol + rtol * expected['abs_sum']
        tolerances['square_sum'] = 2 * atol * expected['abs_sum'] + rtol * expected['square_sum']
    for key, tolerance in tolerances.items():
        if key not in expected:
            continue
        pairs = zip(actual[key], expected[key]) if isinstance(expected[key], list) else [(actual[key], expected[key])]
        assert not isinstance(expected[key], list) or len(actual[key]) == len(expected[key]), (where, key)
        for a, e in pairs:
            assert type(a) is type(e) and _close(a, e, tolerance), (f'{where}/{key}', a, e)


def _close(actual: float, expected: float, tolerance: float) -> bool:
    if math.isnan(expected):
        return math.isnan(actual)
    return actual == expected or abs(actual - expected) <= tolerance


def compact_json(value, indent: str = '') -> str:
    """JSON with one key per line and each list of plain values on one line: short pins whose
    diffs still show which value changed."""
    inner = indent + ' '
    if isinstance(value, dict) and value:
        items = [f'{inner}{json.dumps(key)}: {compact_json(value[key], inner)}' for key in sorted(value)]
        return '{\n' + ',\n'.join(items) + f'\n{indent}}}'
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return '[\n' + ',\n'.join(inner + compact_json(v, inner) for v in value) + f'\n{indent}]'
    return json.dumps(value)


@pytest.mark.parametrize('name', sorted(RUNS))
@pytest.mark.slow
def test_golden_run_matches_its_pin(tmp_path, name):
    expected = json.loads((GOLDEN / f'{name}.json').read_text())
    actual = json.loads(json.dumps(run_and_summarise(name, tmp_path)))
    assert_matches(actual, expected, name)


def test_the_comparison_catches_a_change_and_forgives_rounding():
    """The tolerance is tight where it matters: float32 rounding passes, anything more fails."""
    expected = json.loads((GOLDEN / 'mnist_rkhs.json').read_text())
    loss = expected['pickle']['train_loss']['values']
    for factor, passes in ((1 + 2e-7, True), (1 + 1e-4, False)):
        changed = json.loads(json.dumps(expected))
        changed['pickle']['train_loss']['values'][3] = loss[3] * factor
        weights = changed['checkpoint_tensors']['ode_block']['func.output_weight']
        changed['checkpoint_tensors']['ode_block']['func.output_weight']['sample'][5] = \
            weights['sample'][5] + (weights['max'] * 2e-7 if passes else weights['max'] * 1e-4)
        for where in ('pickle', 'checkpoint_tensors'):
            mixed = {**expected, where: changed[where]}
            if passes:
                assert_matches(mixed, expected)
            else:
                with pytest.raises(AssertionError):
                    assert_matches(mixed, expected)
    loss_array = expected['pickle']['train_loss']
    for key, value in (('best_epoch', 1), ('seed', 6), ('dataset', 'CIFAR10'), ('decay_steps', [2, 3]),
                       ('train_loss', {**loss_array, 'dtype': 'float64'}),
                       ('train_loss', {**loss_array, 'shape': [3, 3]})):
        with pytest.raises(AssertionError):
            assert_matches({**expected, 'pickle': {**expected['pickle'], key: value}}, expected)
    counter = json.loads(json.dumps(expected))
    counter['checkpoint_tensors']['input_net']['1.num_batches_tracked']['values'] = [1]
    with pytest.raises(AssertionError):  # integers exactly
        assert_matches(counter, expected)


def _reference_settings(pinned: dict) -> dict:
    """The settings a pinned run recorded about itself, under the scripts' flag names."""
    names = {'num_layers': 'layers', 'pretrain_pass': 'pretrain'}
    return {names.get(key, key): value for key, value in pinned.items()}


@pytest.mark.parametrize('name', sorted(RUNS))
@pytest.mark.slow
def test_pins_agree_with_the_reference_loop(name):
    """The pinned numbers are what the independent loop of test_reference_loop.py computes from
    the settings the pinned run recorded: curves, best epoch and best weights."""
    from test_reference_loop import WEIGHTS_ATOL, WEIGHTS_RTOL, reference

    expected = json.loads((GOLDEN / f'{name}.json').read_text())
    pinned = expected['pickle']
    embedding = _embedding_networks() if pinned.get('embedding_files') else None
    curves = reference(pinned['dataset'], _reference_settings(pinned), embedding)
    for key in ('train_loss', 'train_classif', 'test_classif'):
        actual = np.asarray(getattr(curves, key), dtype=np.float32)
        assert_matches(_plain(actual), pinned[key], key)
    assert curves.best_epoch == pinned['best_epoch'] == expected['checkpoint_epoch']
    part = 'ode_block' if pinned['dataset'] == 'MNIST' else 'model'
    assert_matches(json.loads(json.dumps(summarise_state(curves.best_state))),
                   expected['checkpoint_tensors'][part], part, WEIGHTS_RTOL, WEIGHTS_ATOL)


if __name__ == '__main__':
    import tempfile

    if sys.argv[1:] != ['--regenerate']:
        sys.exit('usage: python tests/test_golden.py --regenerate')
    GOLDEN.mkdir(exist_ok=True)
    for run in sorted(RUNS):
        with tempfile.TemporaryDirectory() as folder:
            summary = run_and_summarise(run, Path(folder))
        (GOLDEN / f'{run}.json').write_text(compact_json(summary) + '\n')
        print(f'wrote {GOLDEN / run}.json')
