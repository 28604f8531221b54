"""Results pickles as runs: read safely, told apart by configuration and protocol, summarised.

One `RecordedRun` per results pickle, from this project's scripts or from the paper's release (its 335
stored pickles carry only the release's keys). A run's *configuration* is the curve it belongs
to (dataset, model, L, channels, pretraining passes); its *protocol* (protocol_comparison.read) is how it
was made. Runs are grouped by both, so that runs made differently are never averaged.

Every pickle is read with load_results (numpy arrays and plain values only, nothing
runs), and checked: a file that is not a run, or whose numbers cannot be plotted (no curve,
text where numbers belong, error rates outside [0, 1], more epochs than it claims), is skipped
with one warning naming it; the others are still read.

The synthetic experiment's pickles (loss curves, no error rates) are read apart, as
`SyntheticRun`s, with the same checks.

Torch-free: plot_figures.py and release_runs.py import it.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter, OrderedDict, namedtuple
from dataclasses import dataclass

import numpy as np

from . import protocol, protocol_comparison
from .files import special_file_kind
from .gate import metrics_name
from .safe_pickle import UnsafePickle, load_results

METRICS_SUFFIX = metrics_name('')
SET_ASIDE_PREFIX = 'set_aside_'  # where a sweep moves runs of another protocol (sweep.move_aside)
# The curve a run belongs to. in_channels, dim_int and pretrain_pass are None for CIFAR-10.
Config = namedtuple('Config', ['dataset', 'model', 'num_layers', 'in_channels', 'dim_int',
                               'pretrain_pass'])


@dataclass
class RecordedRun:
    """One training run, normalised from a results pickle. Error curves are rates in [0, 1],
    index 0 before training; train_loss has one value per iteration."""
    path: str
    config: Config
    protocol: dict
    assumed: tuple          # protocol fields not recorded in the pickle but assumed (protocol_comparison.read)
    seed: int | None
    train_loss: np.ndarray
    train_classif: np.ndarray
    test_classif: np.ndarray
    diverged: bool          # recorded as diverged, or its curves hold a non-finite value
    seconds_per_epoch: float
    in_progress: bool = False  # read from the metrics file of a run that has not finished

    @property
    def name(self) -> str:
        """The run's file name without its extension, as the report's tables show it."""
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def epochs_done(self) -> int:
        return len(self.test_classif) - 1

    @property
    def iterations_per_epoch(self) -> int:
        """All of the run's iterations over the epochs it did (train_loss has one value per iteration)."""
        return len(self.train_loss) // max(self.epochs_done, 1)

    @property
    def stopped_early(self) -> bool:
        """Stopped before its protocol's last epoch: a divergence (the release's runs carry no
        flag; one with fewer test errors than its protocol's epochs stopped on a NaN)."""
        return self.diverged or (self.epochs_done < self.protocol['epochs'] and not self.in_progress)

    @property
    def completed(self) -> bool:
        return not self.stopped_early and not self.in_progress

    @property
    def from_release(self) -> bool:
        return self.protocol.get('code_version') == 'release'

    @property
    def group(self) -> tuple:
        """Runs with equal groups may be averaged into one curve."""
        return self.config, protocol_comparison.group_key(self.protocol)


class NotARun(ValueError):
    """A pickle that loads but cannot be used as a run; the message says why."""


def warn(message: str):
    print('warning: ' + message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

# Every field of the release's schema (and of this project's additions) is checked for its type
# and range before anything is built from it: a crafted 10**400 must skip the file, not crash.
INTEGER_KEYS = ('num_layers', 'in_channels', 'dim_int', 'pretrain_pass', 'batch_size', 'num_parameters',
                'N', 'q', 'r', 'epochs', 'seed', 'data_dim', 'best_epoch', 'diverged_epoch', 'world_size',
                'batched_with', 'subset', 'train_error_images')
NUMBER_KEYS = ('computation_time', 'nu', 'sigma', 'alpha', 'lr_init', 'decay_rate', 'learning_rate',
               'pretrain_lr', 'best_test_classif')
SEQUENCE_KEYS = ('epoch_times', 'decay_steps')
INTEGER_LIMIT = 2 ** 63   # counts and seeds are int64 everywhere
CURVE_LIMIT = 10 ** 8     # values in one curve: a 300-epoch CIFAR run has 58,800 losses


def _integer(data, key, required=False):
    value = data.get(key)
    if value is None and not required:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise NotARun(f'{key} is {type(value).__name__}, not a number')
    if isinstance(value, (float, np.floating)) and not (np.isfinite(value) and value == int(value)):
        raise NotARun(f'{key} is {value!r}, not an integer')
    if not -INTEGER_LIMIT < int(value) < INTEGER_LIMIT:
        raise NotARun(f'{key} is {_short(value)}, beyond any count or seed a run records')
    return int(value)


def _number(data, key):
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise NotARun(f'{key} is {type(value).__name__}, not a number')
    if isinstance(value, (int, np.integer)) and not -INTEGER_LIMIT < int(value) < INTEGER_LIMIT:
        raise NotARun(f'{key} is {_short(value)}, beyond any value a run records')
    if not np.isfinite(float(value)):
        raise NotARun(f'{key} is {value!r}, not a finite number')
    return float(value)


def _short(value) -> str:
    text = str(value) if not isinstance(value, int) or value.bit_length() < 200 else f'an integer of {value.bit_length()} bits'
    return text if len(text) <= 60 else text[:57] + '...'


def check_schema(data: dict):
    """Each known field of a results dict holds what a run writes there (NotARun otherwise)."""
    for key in INTEGER_KEYS:
        _integer(data, key)
    for key in NUMBER_KEYS:
        _number(data, key)
    for key in SEQUENCE_KEYS:
        values = data.get(key)
        if values is None:
            continue
        if not isinstance(values, (list, tuple, np.ndarray)) or len(values) > CURVE_LIMIT:
            raise NotARun(f'{key} is not a list of numbers')
        for index in range(len(values)):
            _number({key: values[index]}, key)


def _curve(data, key, rates: bool) -> np.ndarray:
    """A 1-D float curve; error rates must lie in [0, 1] (NaN aside)."""
    value = data.get(key)
    if value is None:
        return np.zeros(0)
    if isinstance(value, (list, tuple)) and len(value) > CURVE_LIMIT:
        raise NotARun(f'{key} holds more than {CURVE_LIMIT:,} values')
    try:
        array = np.asarray(value)
    except (OverflowError, ValueError):
        raise NotARun(f'{key} is not a list of numbers') from None
    if array.dtype.kind not in 'iuf' or array.ndim > 1 or array.size > CURVE_LIMIT:
        raise NotARun(f'{key} is not a list of numbers ({array.dtype}, {array.ndim}-D)')
    array = array.astype(float).reshape(-1)
    finite = array[np.isfinite(array)]
    if rates and finite.size and (finite.min() < 0 or finite.max() > 1):
        raise NotARun(f'{key} holds values outside [0, 1] (error rates)')
    if not rates and finite.size and finite.min() < 0:
        raise NotARun(f'{key} holds negative losses')
    return array


def _dataset(data, path) -> str:
    """The dataset: recorded, or inferred (only the MNIST schema records channel counts)."""
    name = str(data.get('dataset') or '').upper()
    if name.startswith('CIFAR'):
        return 'CIFAR10'
    if name.startswith('MNIST') or 'in_channels' in data:
        return 'MNIST'
    lowered = os.path.abspath(path).lower()
    return 'MNIST' if 'mnist' in lowered and 'cifar' not in lowered else 'CIFAR10'


def _seconds_per_epoch(data, epochs_done) -> float:
    times = data.get('epoch_times')
    try:
        if times is not None and len(times) > 0:
            return float(np.mean(np.asarray(times, dtype=float)))
        total = data.get('computation_time')
        if total is not None and epochs_done > 0:
            return float(total) / epochs_done
    except (TypeError, ValueError):
        pass
    return float('nan')


def run_from_dict(data, path: str) -> RecordedRun:
    """A RecordedRun from a loaded results dict; raises NotARun with the reason."""
    if not isinstance(data, dict):
        raise NotARun(f'it holds a {type(data).__name__}, not a dict of results')
    missing = [key for key in ('model', 'num_layers', 'test_classif') if key not in data]
    if missing:
        raise NotARun(f'missing key(s) {", ".join(missing)}')
    if not isinstance(data['model'], str):
        raise NotARun(f'model is {type(data["model"]).__name__}, not a name')
    check_schema(data)
    dataset = _dataset(data, path)
    mnist = dataset == 'MNIST'
    config = Config(dataset, data['model'], _integer(data, 'num_layers', required=True),
                    _integer(data, 'in_channels') if mnist else None,
                    _integer(data, 'dim_int') if mnist else None,
                    _integer(data, 'pretrain_pass') if mnist else None)
    test_classif = _curve(data, 'test_classif', rates=True)
    train_classif = _curve(data, 'train_classif', rates=True)
    train_loss = _curve(data, 'train_loss', rates=False)
    if test_classif.size == 0 or not np.isfinite(test_classif).any():
        raise NotARun('test_classif holds no finite value')
    try:
        recorded, assumed = protocol_comparison.read(data, dataset)
    except (ValueError, TypeError) as exc:
        raise NotARun(str(exc) or 'its protocol cannot be read') from None
    if len(test_classif) > recorded['epochs'] + 1:
        raise NotARun(f'test_classif has {len(test_classif)} values, more than its '
                      f'{recorded["epochs"]} epochs allow')
    non_finite = any(not np.all(np.isfinite(curve)) for curve in (train_loss, train_classif, test_classif))
    return RecordedRun(path=path, config=config, protocol=recorded, assumed=assumed,
               seed=_integer(data, 'seed'), train_loss=train_loss, train_classif=train_classif,
               test_classif=test_classif, diverged=bool(data.get('diverged') is True) or non_finite,
               seconds_per_epoch=_seconds_per_epoch(data, len(test_classif) - 1))


def _is_synthetic(data) -> bool:
    """A results dict of synthetic_experiments.py (its protocol record says so)."""
    record = data.get('protocol') if isinstance(data, dict) else None
    return isinstance(record, dict) and record.get('dataset') == protocol.SYNTHETIC


def read_run(path: str, synthetic: list) -> RecordedRun | None:
    """One results pickle as a RecordedRun, or None with one warning naming the file and the reason. A
    synthetic_experiments.py pickle is not a run of Figures 1 to 3: it is appended to
    `synthetic` (the caller says it once for all)."""
    try:
        data = load_results(path)
    except UnsafePickle as exc:
        warn(f'skipping {path}: refused to unpickle it: {exc} (a crafted file?)')
        return None
    except Exception as exc:  # any unreadable file is skipped, not fatal
        warn(f'skipping unreadable pickle {path}: {type(exc).__name__}: {exc}')
        return None
    if _is_synthetic(data):
        synthetic.append(path)
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)  # overflow in a crafted value
            return run_from_dict(data, path)
    except NotARun as exc:
        warn(f'skipping {path}: {exc}')
        return None


def read_metrics(path: str) -> RecordedRun | None:
    """A run in progress, from its metrics file (<stem>.metrics.jsonl, written every epoch), or
    None with one warning. Its loss curve holds each epoch's mean loss over that epoch's steps."""
    try:
        with open(path) as f:
            header, *epochs = [json.loads(line) for line in f if line.strip()]
        counts = [line['iterations'] for line in epochs]
        if (not all(type(count) is int and 0 <= count <= CURVE_LIMIT for count in counts)
                or counts != sorted(counts)):
            raise ValueError('its iteration counts are not those of a run')
        loss = [value for epoch, line in zip(epochs[1:], epochs) for value in
                [epoch['train_loss']] * (epoch['iterations'] - line['iterations'])]
        data = dict(header, train_loss=np.asarray(loss, dtype=float),
                    train_classif=[line['train_error'] for line in epochs],
                    test_classif=[line['test_error'] for line in epochs],
                    epoch_times=[line['epoch_seconds'] for line in epochs[1:]])
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)
            run = run_from_dict(data, path)
    except (OSError, ValueError, KeyError, TypeError, RecursionError, NotARun) as exc:
        warn(f'skipping {path}: not a readable metrics file ({type(exc).__name__}: {str(exc)[:100]})')
        return None
    run.in_progress = True
    return run


def find_pickles(folder: str) -> list[str]:
    """Every *.pkl regular file under `folder`, and every metrics file of a run that has no
    pickle yet (a run in progress), in a deterministic order. A results name that is not a
    regular file (a FIFO, a link to a device) is skipped with a warning; the folders where a
    sweep set runs aside (set_aside_<date>) are not searched."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith(SET_ASIDE_PREFIX))
        names = set(filenames)
        for name in sorted(filenames):
            wanted = name.endswith('.pkl') or (name.endswith(METRICS_SUFFIX)
                                               and name[:-len(METRICS_SUFFIX)] + '.pkl' not in names)
            if not wanted:
                continue
            path = os.path.join(dirpath, name)
            kind = special_file_kind(path)
            if kind:
                warn(f'skipping {path}: it is {kind}, not a results file')
            elif os.path.isfile(path):
                paths.append(path)
    return paths


def load_runs(folders, only: set | None = None) -> list[RecordedRun]:
    """Every run under `folders`, each counted once (with `only`, the files whose path relative
    to their folder is in it).

    A file reached twice (overlapping folders, a link) is read once. A copy of a run (the same
    configuration, seed and exact protocol in another file) would count one seed twice: only
    the first is kept, with a warning.
    """
    runs, paths, seen, copies, synthetic = [], set(), set(), [], []
    for folder in folders:
        for path in find_pickles(folder):
            if only is not None and os.path.normpath(os.path.relpath(path, folder)) not in only:
                continue
            real = os.path.realpath(path)
            if real in paths:
                continue
            paths.add(real)
            run = read_metrics(path) if path.endswith(METRICS_SUFFIX) else read_run(path, synthetic)
            if run is None:
                continue
            if run.seed is not None:
                key = (run.config, run.seed, protocol_comparison.group_key(run.protocol),
                       repr(run.protocol.get('embedding')))
                if key in seen:
                    copies.append(path)
                    continue
                seen.add(key)
            runs.append(run)
    if copies:
        warn(f'ignored {len(copies)} copy(ies) of an already loaded run (same configuration, seed '
             f'and protocol), e.g. {copies[0]}')
    if synthetic:
        warn(f'left out {len(synthetic)} synthetic_experiments.py run(s), e.g. {synthetic[0]} '
             f'(plot_figures.py --figure synthetic draws them)')
    return runs


def group_runs(runs, key=lambda run: run.group) -> 'OrderedDict[tuple, list]':
    """Runs by key(run), by default (configuration, protocol group), in the order first seen."""
    groups = OrderedDict()
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def ragged_stats(curves):
    """Per index over curves of unequal length: mean, std (ddof=1; NaN where one curve), min,
    max and count. Each index is averaged over the curves that reach it with a finite value, so
    a run that stopped early counts only for the epochs it completed."""
    curves = [np.asarray(curve, dtype=float) for curve in curves]
    length = max((curve.size for curve in curves), default=0)
    stacked = np.full((len(curves), length), np.nan)
    for row, curve in enumerate(curves):
        stacked[row, :curve.size] = curve
    stacked[~np.isfinite(stacked)] = np.nan
    count = np.sum(~np.isnan(stacked), axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # all-NaN columns, single values
        mean = np.nanmean(stacked, axis=0)
        std = np.where(count > 1, np.nanstd(stacked, axis=0, ddof=1), np.nan)
        low, high = np.nanmin(stacked, axis=0), np.nanmax(stacked, axis=0)
    return mean, std, low, high, count


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average over `window` points, ignoring non-finite values (same length).

    Point i averages the finite values among [i - window + 1, i]. A convolution, not running
    sums, so that one huge value (a loss of 1e30 just before a divergence) spoils only the
    windows that contain it.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0 or window <= 1:
        return values.copy()
    finite = np.isfinite(values)
    kernel = np.ones(min(window, values.size))
    with np.errstate(over='ignore', invalid='ignore'):
        sums = np.convolve(np.where(finite, values, 0.0), kernel)[:values.size]
        counts = np.convolve(finite.astype(float), kernel)[:values.size]
        out = sums / np.where(counts > 0, counts, 1)
    out[counts < 0.5] = np.nan
    return out


def final_errors(runs, curve='test_classif') -> np.ndarray:
    """The last-epoch error (a rate) of each run that completed its protocol."""
    return np.array([getattr(run, curve)[-1] for run in runs
                     if run.completed and np.isfinite(getattr(run, curve)[-1])])


def mean_std(values) -> tuple[float, float]:
    """Mean and standard deviation (ddof=1; NaN for fewer than two values)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float('nan'), float('nan')
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else float('nan')


def format_spread(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    """'2.05 ± 0.17', or '2.05 ± –' for one run, '–' for none."""
    if not np.isfinite(mean):
        return '–'
    spread = f'{scale * std:.{digits}f}' if np.isfinite(std) else '–'
    return f'{scale * mean:.{digits}f} ± {spread}'


def markdown_table(header, rows) -> str:
    """A Markdown table: the header, its rule, and one line per row of cells (each shown with str)."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(map(str, cells)) + ' |' for cells in rows])


def stops(runs) -> list[int]:
    """The epochs at which the runs that stopped early stopped, sorted."""
    return sorted(run.epochs_done for run in runs if run.stopped_early)


def config_text(config: Config) -> str:
    text = f'{config.model} L={config.num_layers}'
    if config.dataset == 'MNIST':
        text += f', C={config.in_channels}' + (f'/{config.dim_int}' if config.dim_int != config.in_channels else '')
        text += f', {config.pretrain_pass} pass(es)'
    return text


def sort_key(group: tuple) -> tuple:
    """A sort key for group keys (Config, protocol key), whose Config fields may be None, numbers or text."""
    config = tuple((item is None, isinstance(item, str), '' if item is None else item) for item in group[0])
    return config, repr(group[1])


# ---------------------------------------------------------------------------------------------
# The synthetic experiment's runs (synthetic_experiments.py): curves of training loss, no errors
# ---------------------------------------------------------------------------------------------

# One curve: nu is the RKHS features' law (None for SHL, which has no random features).
SyntheticConfig = namedtuple('SyntheticConfig', ['model', 'num_layers', 'q', 'r', 'nu'])
SyntheticRun = namedtuple('SyntheticRun', ['path', 'config', 'protocol', 'seed', 'train_loss',
                                           'test_loss', 'diverged'])


def read_synthetic_run(path: str, others: list | None = None) -> SyntheticRun | None:
    """One pickle of synthetic_experiments.py, or None (with a warning) for anything else. A run
    of Figures 1 to 3 (it has test_classif) is appended to `others` when a list is given (the
    caller says it once for all)."""
    try:
        data = load_results(path)
    except Exception as exc:  # a crafted or unreadable file is skipped, never fatal
        warn(f'skipping {path}: {type(exc).__name__}: {exc}')
        return None
    if not _is_synthetic(data):
        if others is not None and isinstance(data, dict) and 'test_classif' in data:
            others.append(path)
        else:
            warn(f'skipping {path}: not a synthetic_experiments.py results file with its protocol record')
        return None
    record = data['protocol']
    try:
        check_schema(data)
        model = str(data['model'])
        config = SyntheticConfig(model, *(_integer(data, key, required=True) for key in ('num_layers', 'q', 'r')),
                                 float(data['nu']) if model == 'RKHS' else None)
        curves = _curve(data, 'train loss', rates=False), _curve(data, 'test loss', rates=False)
    except (KeyError, TypeError, ValueError) as exc:  # NotARun is a ValueError
        warn(f'skipping {path}: {type(exc).__name__}: {exc}')
        return None
    deciding = tuple((key, str(record.get(key))) for key in protocol_comparison.SYNTHETIC_DECIDING)
    return SyntheticRun(path, config, deciding, _integer(data, 'seed'), *curves,
                        bool(data.get('diverged', False)))


def load_synthetic_runs(folders) -> list[SyntheticRun]:
    """The synthetic runs under `folders` that share one protocol: the most common one (the
    others are named in a warning, never averaged in), one run per (configuration, seed)."""
    others = []
    runs = [run for folder in folders for path in find_pickles(folder) if path.endswith('.pkl')
            for run in [read_synthetic_run(path, others)] if run is not None]
    if others:
        warn(f'left out {len(others)} run(s) of Figures 1 to 3, e.g. {others[0]} (plot_figures.py '
             f'draws them without --figure synthetic)')
    counts = Counter(run.protocol for run in runs)  # first seen first: ties go to the earliest
    if not counts:
        return []
    chosen = max(counts, key=counts.get)
    for other, count in counts.items():
        if other != chosen:
            differing = ', '.join(f'{key} {value}' for (key, value), (_, mine) in zip(other, chosen)
                                  if value != mine)
            warn(f'{count} synthetic run(s) of another protocol ({differing}) are not drawn')
    kept, seen = [], set()
    for run in runs:
        if run.protocol == chosen and (run.seed is None or (run.config, run.seed) not in seen):
            seen.add((run.config, run.seed))
            kept.append(run)
    return kept
