"""Plot Figures 1a, 1b, 2 and 3 and print a summary table from results pickles.

Every ``*.pkl`` file found (recursively) under the given folders -- by default
``MNIST_experiments/`` and ``CIFAR_experiments/`` -- is read as one training
run. Both the pickles written by this project's experiment scripts and the 335
pickles of the paper's public release are understood: the release lacks the
optional keys (``dataset``, ``method``, ``epochs``, ``seed``, ``diverged``,
``epoch_times``, ...) and this script falls back on the other keys then.

Runs are grouped by configuration (dataset, model, number of layers, channels,
pretraining passes and, when recorded, method, epochs, time weights and whether
the run was a quick check on synthetic data or a subset). Each figure has two
panels: the smoothed training loss per iteration (log scale) and the test error
(%) per epoch; lines are means over seeds, shaded bands span min to max over
seeds. Runs of unequal length (diverged runs stop early) are averaged over the
runs that reach each index.

Pickles are read with a restricted unpickler (common.load_results) that can only
rebuild numpy arrays and plain values, so a crafted pickle is skipped with a
warning and never runs code.

Usage::

    python plot_figures.py                      # all figures, default folders
    python plot_figures.py --figure 2 --pdf
    python plot_figures.py some/folder --figure 3 --out_dir figs
"""

import argparse
import dataclasses
import os
import sys
import warnings
from collections import OrderedDict, namedtuple

import numpy as np

import common

DEFAULT_FOLDERS = ('MNIST_experiments', 'CIFAR_experiments')
DEFAULT_OUT_DIR = 'figures'
FIGURE_NAMES = ('1a', '1b', '2', '3')

# Training loss is logged every iteration and is very noisy: smooth it with a
# trailing moving average over this many iterations before plotting.
DEFAULT_SMOOTH_WINDOW = 100
# A 50k-iteration curve has far more points than pixels; plotting at most this
# many keeps matplotlib fast without visible loss.
MAX_PLOT_POINTS = 2000
DPI = 150

MODEL_COLORS = {'RKHS': 'tab:blue', 'SHL': 'tab:red'}
FALLBACK_COLORS = ('tab:green', 'tab:purple', 'tab:brown', 'tab:olive')
# Fixed style per value, so that the same L looks the same in every figure.
LAYER_STYLES = {1: ':', 5: (0, (5, 1, 1, 1)), 10: '--', 20: '-'}
CHANNEL_STYLES = {32: '-', 8: '--', 4: ':'}
FALLBACK_STYLES = ('-.', (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1, 1, 1)))

# Fields that define a configuration. method/epochs are None for the release's
# pickles, which therefore form their own groups. ``variant`` keeps apart runs
# that must not be averaged with full ones: quick checks (synthetic data, a
# subset) and another time-weight scheme; it is '' for the release.
Config = namedtuple('Config', ['dataset', 'model', 'num_layers', 'in_channels',
                               'dim_int', 'pretrain_pass', 'method', 'epochs', 'variant'])
VARIANT_KEYS = ('time_weights', 'synthetic', 'subset')

# A curve of a figure: the configuration fields it fixes (method and epochs
# are left free) plus how it is drawn.
CurveSpec = namedtuple('CurveSpec', ['dataset', 'model', 'num_layers',
                                     'in_channels', 'dim_int', 'pretrain_pass',
                                     'label', 'style_value'])


@dataclasses.dataclass
class Run:
    """One training run, normalised from a results pickle."""
    path: str
    config: Config
    seed: object
    embedding_seed: object
    train_loss: np.ndarray
    train_classif: np.ndarray
    test_classif: np.ndarray
    diverged: bool
    seconds_per_epoch: float


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------

def _warn(msg):
    print('warning: ' + msg, file=sys.stderr)


def _as_int(value):
    """Return ``value`` as a Python int when it is integral, else unchanged."""
    if value is None or isinstance(value, bool):
        return value
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        return value
    if np.isfinite(as_float) and as_float == int(as_float):
        return int(as_float)
    return value


def _as_curve(value):
    """Return a 1-D float array (empty when the value is missing)."""
    if value is None:
        return np.zeros(0)
    return np.asarray(value, dtype=float).reshape(-1)


def _normalise_dataset(name):
    upper = str(name).upper()
    if upper.startswith('CIFAR'):
        return 'CIFAR10'
    if upper.startswith('MNIST'):
        return 'MNIST'
    return str(name)


def _infer_dataset(data, path):
    """Dataset from the ``dataset`` key, else the keys, else the folder name."""
    if data.get('dataset') is not None:
        return _normalise_dataset(data['dataset'])
    # Only the MNIST schema records the embedding width.
    if 'in_channels' in data:
        return 'MNIST'
    lowered = os.path.abspath(path).lower()
    if 'cifar' in lowered:
        return 'CIFAR10'
    if 'mnist' in lowered:
        return 'MNIST'
    # No in_channels and no hint in the path: the CIFAR schema is the one
    # without channel keys.
    return 'CIFAR10'


def _variant(data):
    parts = []
    for key in VARIANT_KEYS:
        value = data.get(key)
        if value is None or value is False:
            continue
        parts.append(key if value is True else f'{key}={value}')
    return ' '.join(parts)


def _seconds_per_epoch(data, test_classif):
    epoch_times = data.get('epoch_times')
    if epoch_times is not None and len(epoch_times) > 0:
        return float(np.mean(np.asarray(epoch_times, dtype=float)))
    total = data.get('computation_time')
    epochs_done = len(test_classif) - 1  # index 0 is the evaluation before training
    if total is not None and epochs_done > 0:
        return float(total) / epochs_done
    return float('nan')


def read_run(path):
    """Read one results pickle; return a :class:`Run`, or None (with a warning)."""
    try:
        data = common.load_results(path)
    except common.UnsafePickle as exc:
        _warn(f'skipping {path}: refused to unpickle it: {exc} (a crafted file?)')
        return None
    except Exception as exc:  # any unreadable file is skipped, not fatal
        _warn(f'skipping unreadable pickle {path}: {type(exc).__name__}: {exc}')
        return None
    if not isinstance(data, dict):
        _warn(f'skipping {path}: not a dict but {type(data).__name__}')
        return None
    missing = [key for key in ('model', 'num_layers', 'test_classif') if key not in data]
    if missing:
        _warn(f'skipping {path}: missing key(s) {", ".join(missing)}')
        return None
    try:
        train_loss = _as_curve(data.get('train_loss'))
        train_classif = _as_curve(data.get('train_classif'))
        test_classif = _as_curve(data.get('test_classif'))
    except (TypeError, ValueError) as exc:
        _warn(f'skipping {path}: curves are not numeric ({exc})')
        return None

    dataset = _infer_dataset(data, path)
    is_mnist = dataset == 'MNIST'
    method = data.get('method')
    config = Config(
        dataset=dataset,
        model=str(data['model']),
        num_layers=_as_int(data['num_layers']),
        in_channels=_as_int(data.get('in_channels')) if is_mnist else None,
        dim_int=_as_int(data.get('dim_int')) if is_mnist else None,
        pretrain_pass=_as_int(data.get('pretrain_pass')) if is_mnist else None,
        method=None if method is None else str(method),
        epochs=_as_int(data.get('epochs')),
        variant=_variant(data),
    )
    non_finite = any(not np.all(np.isfinite(curve))
                     for curve in (train_loss, train_classif, test_classif))
    return Run(path=path, config=config,
               seed=_as_int(data.get('seed')),
               embedding_seed=_as_int(data.get('embedding_seed')),
               train_loss=train_loss, train_classif=train_classif,
               test_classif=test_classif,
               diverged=bool(data.get('diverged', False)) or non_finite,
               seconds_per_epoch=_seconds_per_epoch(data, test_classif))


def find_pickles(folder):
    """All ``*.pkl`` paths under ``folder``, in a deterministic order."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        paths.extend(os.path.join(dirpath, name) for name in sorted(filenames)
                     if name.endswith('.pkl'))
    return paths


def load_runs(folders):
    """Read every pickle under ``folders``; drop duplicate (config, seed) runs.

    The same configuration can be stored twice, e.g. RKHS L=20 with 32
    channels belongs to both Figure 1a and Figure 2. When a seed is recorded,
    a second copy of the same (configuration, seed, embedding seed) would count
    one seed twice, so only the first copy is kept.
    """
    runs, seen, duplicates = [], set(), []
    for folder in folders:
        for path in find_pickles(folder):
            run = read_run(path)
            if run is None:
                continue
            if run.seed is not None:
                key = (run.config, run.seed, run.embedding_seed)
                if key in seen:
                    duplicates.append(path)
                    continue
                seen.add(key)
            runs.append(run)
    if duplicates:
        _warn(f'ignored {len(duplicates)} duplicate run(s) of an already '
              f'loaded configuration and seed, e.g. {duplicates[0]}')
    return runs


def group_runs(runs):
    """Map each :class:`Config` to its list of runs (insertion ordered)."""
    groups = OrderedDict()
    for run in runs:
        groups.setdefault(run.config, []).append(run)
    return groups


# ----------------------------------------------------------------------------
# Curve statistics
# ----------------------------------------------------------------------------

def smooth(values, window):
    """Trailing moving average ignoring non-finite values (same length output).

    Point i averages the finite values among indices [i - window + 1, i]; the
    first points use the shorter prefix available. Uses cumulative sums so a
    50k-long curve costs a few vector operations.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0 or window <= 1:
        return values.copy()
    finite = np.isfinite(values)
    sums = np.concatenate(([0.0], np.cumsum(np.where(finite, values, 0.0))))
    counts = np.concatenate(([0], np.cumsum(finite)))
    upper = np.arange(1, values.size + 1)
    lower = np.maximum(upper - window, 0)
    n_valid = counts[upper] - counts[lower]
    with np.errstate(invalid='ignore', divide='ignore'):
        out = (sums[upper] - sums[lower]) / n_valid
    out[n_valid == 0] = np.nan
    return out


def ragged_stats(curves):
    """Mean, min, max and count per index over curves of unequal length.

    Each index is averaged over the runs that reach it, so a run that diverged
    (and stopped early) contributes only to the epochs it completed.
    Non-finite values are ignored likewise.
    """
    curves = [np.asarray(curve, dtype=float) for curve in curves]
    length = max((curve.size for curve in curves), default=0)
    stacked = np.full((len(curves), length), np.nan)
    for row, curve in enumerate(curves):
        stacked[row, :curve.size] = curve
    stacked[~np.isfinite(stacked)] = np.nan
    count = np.sum(~np.isnan(stacked), axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # all-NaN columns
        mean = np.nanmean(stacked, axis=0)
        low = np.nanmin(stacked, axis=0)
        high = np.nanmax(stacked, axis=0)
    return mean, low, high, count


def downsample_index(length, max_points=MAX_PLOT_POINTS):
    """Evenly spaced indices (first and last included) to plot a long curve."""
    if length <= max_points:
        return np.arange(length)
    return np.unique(np.linspace(0, length - 1, max_points).round().astype(int))


# ----------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------

def _spec(config):
    return CurveSpec(config.dataset, config.model, config.layers, config.channels, config.channels,
                     config.pretrain, config.label, config.style)


def figure_curves(figure, groups):
    """The curves a figure expects (common.figure_grid), and the title describing them."""
    grid = common.figure_grid('figure' + figure)
    if figure in ('1a', '1b'):
        return [_spec(config) for config in grid], \
            f'MNIST, {grid[0].pretrain} pretraining pass(es), 32 channels'
    if figure == '2':
        return [_spec(config) for config in grid], \
            'MNIST, RKHS, L=20, no pretraining, channels C = in_channels = dim_int'
    # Figure 3: the grid's depths (the release's stored L = 1, 10, 20), plus any other depth
    # that was run (the release's README also ran SHL at L = 5).
    expected = [_spec(config) for config in grid]
    known = {(spec.model, spec.num_layers) for spec in expected}
    extra = sorted({(cfg.model, cfg.num_layers) for cfg in groups if cfg.dataset == 'CIFAR10'
                    and cfg.model in ('RKHS', 'SHL') and (cfg.model, cfg.num_layers) not in known},
                   key=lambda pair: (pair[0], _sort_value(pair[1])))
    extra_specs = [CurveSpec('CIFAR10', model, layers, None, None, None, f'{model} L={layers}', layers)
                   for model, layers in extra]
    model_order = {'RKHS': 0, 'SHL': 1}
    return sorted(expected + extra_specs,
                  key=lambda spec: (model_order[spec.model], _sort_value(spec.num_layers))), 'CIFAR10'


def _matches(spec, config):
    return (config.dataset, config.model, config.num_layers, config.in_channels,
            config.dim_int, config.pretrain_pass) == (
        spec.dataset, spec.model, spec.num_layers, spec.in_channels,
        spec.dim_int, spec.pretrain_pass)


def _describe_spec(spec):
    text = f'{spec.dataset} {spec.model} L={spec.num_layers}'
    if spec.dataset == 'MNIST':
        text += f' channels={spec.in_channels}/{spec.dim_int} pretrain={spec.pretrain_pass}'
    return text


def _variant_suffix(config, show):
    if not show:
        return ''
    parts = [f'method={config.method}' if config.method is not None else None,
             f'{config.epochs} ep' if config.epochs is not None else None,
             config.variant or None]
    parts = [part for part in parts if part]
    return ' [' + ', '.join(parts or ['release']) + ']'


def select_figure_groups(figure, groups):
    """Return (list of (spec, config, runs), missing specs, subtitle)."""
    specs, subtitle = figure_curves(figure, groups)
    selected, missing = [], []
    for spec in specs:
        matched = [(cfg, runs) for cfg, runs in groups.items() if _matches(spec, cfg)]
        if not matched:
            missing.append(spec)
        selected.extend((spec, cfg, runs) for cfg, runs in matched)
    return selected, missing, subtitle


def _style(value, table, used):
    if value in table:
        return table[value]
    # Unknown value (e.g. an unusual depth): take the next unused fallback.
    style = FALLBACK_STYLES[len(used) % len(FALLBACK_STYLES)]
    used.append(value)
    return style


def _atomic_savefig(fig, path, fmt):
    """Save ``fig`` to ``path`` atomically, with a new file's usual permissions."""
    common.atomic_write(path, lambda handle: fig.savefig(handle, format=fmt, dpi=DPI))


def _minor_percent_label(value, _position):
    # Label only the 2x and 5x minor ticks of a decade, to avoid clutter.
    if value <= 0:
        return ''
    mantissa = value / 10 ** np.floor(np.log10(value))
    return f'{value:g}' if round(mantissa) in (2, 5) else ''


def plot_figure(figure, groups, out_dir, smooth_window=DEFAULT_SMOOTH_WINDOW,
                pdf=False, error_scale='log'):
    """Draw one figure; return (written paths, configs used, missing specs)."""
    selected, missing, subtitle = select_figure_groups(figure, groups)
    for spec in missing:
        print(f'figure {figure}: no runs for {_describe_spec(spec)} (curve skipped)')
    if not selected:
        print(f'figure {figure}: no runs found, figure skipped')
        return [], [], missing

    import matplotlib
    matplotlib.use('Agg')  # headless: never needs a display
    import matplotlib.pyplot as plt

    # Tell variants apart in the legend only when one curve has several
    # (e.g. the release's runs next to new runs of the same configuration).
    per_spec = {}
    for spec, cfg, _ in selected:
        per_spec.setdefault(spec, []).append(cfg)
    style_table = CHANNEL_STYLES if figure == '2' else LAYER_STYLES

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(12, 4.5))
    seed_counts, used_styles, extra_colors = set(), [], {}
    for spec, cfg, runs in selected:
        color = MODEL_COLORS.get(spec.model)
        if color is None:
            color = extra_colors.setdefault(
                spec.model, FALLBACK_COLORS[len(extra_colors) % len(FALLBACK_COLORS)])
        linestyle = _style(spec.style_value, style_table, used_styles)
        label = (f'{spec.label}{_variant_suffix(cfg, len(per_spec[spec]) > 1)}'
                 f' (n={len(runs)})')
        seed_counts.add(len(runs))

        loss_mean, loss_low, loss_high, _ = ragged_stats(
            [smooth(run.train_loss, smooth_window) for run in runs])
        index = downsample_index(loss_mean.size)
        ax_loss.plot(index, loss_mean[index], color=color, linestyle=linestyle,
                     linewidth=1.4, label=label)
        ax_loss.fill_between(index, loss_low[index], loss_high[index], color=color,
                             alpha=0.15, linewidth=0)

        err_mean, err_low, err_high, _ = ragged_stats(
            [100.0 * run.test_classif for run in runs])
        epochs = np.arange(err_mean.size)
        ax_err.plot(epochs, err_mean, color=color, linestyle=linestyle,
                    linewidth=1.4, marker='.', markersize=3, label=label)
        ax_err.fill_between(epochs, err_low, err_high, color=color, alpha=0.15,
                            linewidth=0)

    ax_loss.set_yscale('log')
    ax_loss.set_xlabel('iteration')
    ax_loss.set_ylabel('training loss')
    ax_loss.set_title(f'Training loss (trailing moving average, window {smooth_window} it.)',
                      fontsize=10)
    ax_err.set_yscale(error_scale)
    if error_scale == 'log':
        # Percentages read better as 2, 5, 20 than as 2x10^0, 5x10^0, 2x10^1.
        from matplotlib.ticker import FuncFormatter
        ax_err.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f'{value:g}'))
        low, high = ax_err.get_ylim()
        # Within less than half a decade no 2x/5x tick may fall: then label every minor tick.
        narrow = low > 0 and high / low < 3
        ax_err.yaxis.set_minor_formatter(
            FuncFormatter(lambda value, _: f'{value:.3g}') if narrow
            else FuncFormatter(_minor_percent_label))
    ax_err.set_xlabel('epoch (0 = before training)')
    ax_err.set_ylabel('test error (%)' + (' [log scale]' if error_scale == 'log' else ''))
    ax_err.set_title('Test error', fontsize=10)
    for axis in (ax_loss, ax_err):
        axis.grid(True, which='major', alpha=0.3)
    if len(seed_counts) == 1:
        band = f'band: min–max over {seed_counts.pop()} seeds'
    else:
        band = 'band: min–max over n seeds (n per curve in legend)'
    ax_err.legend(fontsize=8, loc='upper right')
    fig.suptitle(f'Figure {figure} — {subtitle}\nlines: mean over seeds; {band}', fontsize=11)
    fig.tight_layout()

    written = []
    for fmt in ('png', 'pdf') if pdf else ('png',):
        path = os.path.join(out_dir, f'figure{figure}.{fmt}')
        _atomic_savefig(fig, path, fmt)
        written.append(path)
        print(f'figure {figure}: wrote {path}')
    plt.close(fig)
    return written, [cfg for _, cfg, _ in selected], missing


# ----------------------------------------------------------------------------
# Summary table
# ----------------------------------------------------------------------------

def _sort_value(value):
    # None last; numbers before strings so that mixed fields never compare
    # an int with a str.
    return (value is None, isinstance(value, str), '' if value is None else value)


def config_sort_key(config):
    """Sort key for configurations that may contain None fields."""
    return tuple(_sort_value(value) for value in config)


def summarize(runs):
    """Summary statistics of one configuration's runs (error rates in %).

    Final errors are taken at the last epoch of the runs that did not diverge
    (a diverged run stops at another epoch); mean ± std uses ddof=1. The best
    test error is the minimum over all runs and epochs.
    """
    ok_runs = [run for run in runs if not run.diverged]

    def last_finite(curve):
        finite = curve[np.isfinite(curve)]
        return finite[-1] if finite.size else np.nan

    final_test = np.array([100.0 * last_finite(run.test_classif) for run in ok_runs])
    final_train = np.array([100.0 * last_finite(run.train_classif) for run in ok_runs])
    final_test = final_test[np.isfinite(final_test)]
    final_train = final_train[np.isfinite(final_train)]
    all_test = np.concatenate([run.test_classif for run in runs]) * 100.0
    all_test = all_test[np.isfinite(all_test)]
    times = np.array([run.seconds_per_epoch for run in runs])
    times = times[np.isfinite(times)]
    return {
        'runs': len(runs),
        'diverged': len(runs) - len(ok_runs),
        'final_test_mean': float(final_test.mean()) if final_test.size else np.nan,
        'final_test_std': float(final_test.std(ddof=1)) if final_test.size > 1 else
        (0.0 if final_test.size == 1 else np.nan),
        'best_test': float(all_test.min()) if all_test.size else np.nan,
        'final_train_mean': float(final_train.mean()) if final_train.size else np.nan,
        'seconds_per_epoch': float(times.mean()) if times.size else np.nan,
    }


def _fmt(value, digits=2):
    return '–' if value is None or not np.isfinite(value) else f'{value:.{digits}f}'


def _cell(value):
    return '–' if value is None else str(value)


TABLE_HEADER = ('dataset', 'model', 'L', 'channels (in/int)', 'pretrain', 'method',
                'epochs', 'variant', 'runs', 'diverged', 'final test err % (mean ± std)',
                'best test err %', 'final train err % (mean)', 's/epoch')


def format_table(groups):
    """Markdown table with one row per configuration."""
    lines = ['| ' + ' | '.join(TABLE_HEADER) + ' |',
             '|' + '|'.join('---' for _ in TABLE_HEADER) + '|']
    for config in sorted(groups, key=config_sort_key):
        stats = summarize(groups[config])
        channels = ('–' if config.in_channels is None and config.dim_int is None
                    else f'{_cell(config.in_channels)}/{_cell(config.dim_int)}')
        cells = [config.dataset, config.model, _cell(config.num_layers), channels,
                 _cell(config.pretrain_pass), _cell(config.method), _cell(config.epochs),
                 config.variant or '–',
                 str(stats['runs']), str(stats['diverged']),
                 f"{_fmt(stats['final_test_mean'])} ± {_fmt(stats['final_test_std'])}",
                 _fmt(stats['best_test']), _fmt(stats['final_train_mean']),
                 _fmt(stats['seconds_per_epoch'], 1)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines.append('')
    lines.append('Final errors: last epoch, over non-diverged runs (std with ddof=1). '
                 'Best: min over all runs and epochs. Diverged: diverged flag or '
                 'non-finite values in the curves.')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------
# The synthetic experiment (synthetic_experiments.py; python reproduce.py synthetic)
# ----------------------------------------------------------------------------

SYNTHETIC_FIGURE = 'synthetic'
SYNTHETIC_FOLDER = 'synthetic_experiments'
# Colour per state dimension q (both models), line style per RKHS width r; SHL dotted.
SYNTHETIC_Q_COLORS = {2: 'tab:blue', 4: 'tab:orange', 8: 'tab:green'}
SYNTHETIC_R_STYLES = {20: '--', 200: '-'}
SYNTHETIC_SHL_STYLE = ':'
# One curve: nu is the RKHS features' law (None for SHL, which has no random features).
SyntheticConfig = namedtuple('SyntheticConfig', ['model', 'num_layers', 'q', 'r', 'nu'])
SyntheticRun = namedtuple('SyntheticRun', ['path', 'config', 'protocol', 'seed', 'train_loss',
                                           'test_loss', 'diverged'])


def read_synthetic_run(path):
    """One pickle of synthetic_experiments.py as a SyntheticRun, or None (with a warning)."""
    import protocol

    try:
        data = common.load_results(path)
    except Exception as exc:  # a crafted or unreadable file is skipped, never fatal
        _warn(f'skipping {path}: {type(exc).__name__}: {exc}')
        return None
    record = data.get('protocol') if isinstance(data, dict) else None
    if not isinstance(record, dict) or record.get('dataset') != protocol.SYNTHETIC:
        _warn(f'skipping {path}: not a synthetic_experiments.py results file with its protocol record')
        return None
    try:
        model = str(data['model'])
        config = SyntheticConfig(model, _as_int(data['num_layers']), _as_int(data['q']),
                                 _as_int(data['r']), float(data['nu']) if model == 'RKHS' else None)
        curves = _as_curve(data['train loss']), _as_curve(data['test loss'])
    except (KeyError, TypeError, ValueError) as exc:
        _warn(f'skipping {path}: {type(exc).__name__}: {exc}')
        return None
    deciding = tuple((key, str(record.get(key))) for key in protocol.SYNTHETIC_DECIDING)
    return SyntheticRun(path, config, deciding, _as_int(data.get('seed')), *curves,
                        bool(data.get('diverged', False)))


def load_synthetic_runs(folders):
    """The synthetic runs under `folders` that share one protocol: the most common one (the
    others are named in a warning, never averaged in), one run per (configuration, seed)."""
    runs = [run for folder in folders for path in find_pickles(folder)
            for run in [read_synthetic_run(path)] if run is not None]
    counts = OrderedDict()
    for run in runs:
        counts[run.protocol] = counts.get(run.protocol, 0) + 1
    if not counts:
        return []
    chosen = max(counts, key=counts.get)
    for other, count in counts.items():
        if other != chosen:
            differing = ', '.join(f'{key} {value}' for (key, value), (_, mine) in zip(other, chosen)
                                  if value != mine)
            _warn(f'{count} synthetic run(s) of another protocol ({differing}) are not drawn')
    kept, seen = [], set()
    for run in runs:
        if run.protocol == chosen and (run.seed is None or (run.config, run.seed) not in seen):
            seen.add((run.config, run.seed))
            kept.append(run)
    return kept


def _synthetic_features(nu):
    return 'Gaussian features' if nu < 0 else f'Student-t features (nu = {nu:g})'


def _synthetic_label(config, averaged, diverged):
    same = config.model == 'SHL' and config.q == config.r
    sizes = f'q=r={config.q}' if same else f'q={config.q} r={config.r}'
    if diverged and diverged == len(averaged):
        return f'{config.model} {sizes} L={config.num_layers} (n={diverged}, all diverged)'
    left_out = f'; {diverged} diverged, left out' if diverged else ''
    return f'{config.model} {sizes} L={config.num_layers} (n={len(averaged)}{left_out})'


def _synthetic_averaged(members):
    """The runs a curve averages: those that did not diverge (a diverged run's last losses are
    huge and its curve stops early), or all of them when every run diverged."""
    return [run for run in members if not run.diverged] or members


def plot_synthetic(runs, out_dir, pdf=False):
    """Training loss per iteration (log scale): one panel per RKHS feature law, holding the RKHS
    curves of that law and every SHL curve for comparison. Lines: mean over seeds (each index over
    the runs that reach it); bands: min to max. Returns (written paths, {(panel, label): the
    plotted mean}). Diverged runs are left out of a curve (its label says how many)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    groups = OrderedDict()
    for run in sorted(runs, key=lambda run: (run.config.model, run.config.nu or 0, run.config.q,
                                             run.config.r, run.config.num_layers)):
        groups.setdefault(run.config, []).append(run)
    panels = sorted({config.nu for config in groups if config.model == 'RKHS'}, key=lambda nu: (nu >= 0, nu))
    titles = [_synthetic_features(nu) for nu in panels] or ['SHL']
    fig, axes = plt.subplots(len(titles), 1, figsize=(10, 4.2 * len(titles)), squeeze=False)
    lines = OrderedDict()
    for ax, nu, title in zip(axes[:, 0], panels or [None], titles):
        for config, members in groups.items():
            if config.model == 'RKHS' and config.nu != nu:
                continue
            averaged = _synthetic_averaged(members)
            mean, low, high, _ = ragged_stats([run.train_loss for run in averaged])
            iterations = np.arange(1, mean.size + 1)
            color = SYNTHETIC_Q_COLORS.get(config.q, 'tab:gray')
            style = SYNTHETIC_R_STYLES.get(config.r, '-.') if config.model == 'RKHS' else SYNTHETIC_SHL_STYLE
            label = _synthetic_label(config, averaged, sum(run.diverged for run in members))
            line, = ax.plot(iterations, mean, color=color, linestyle=style, linewidth=1.5, label=label)
            ax.fill_between(iterations, low, high, color=color, alpha=0.12, linewidth=0)
            lines[(title, label)] = np.asarray(line.get_ydata())
        ax.set_yscale('log')
        ax.set_xlabel('iteration (full-batch gradient step)')
        ax.set_ylabel('training loss (MSE)')
        ax.set_title(f'RKHS, {title}; SHL dotted' if nu is not None else title, fontsize=10)
        ax.grid(True, which='major', alpha=0.3)
        ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    setting = dict(runs[0].protocol)
    fig.suptitle(f'Synthetic regression y = -x (N={setting["dataset_size"]}, d={setting["data_dim"]}, '
                 f'{setting["matrix"]}, lr {setting["learning_rate"]}, {setting["method"]})\n'
                 f'lines: mean over seeds; bands: min–max over seeds', fontsize=10)
    fig.tight_layout()
    written = []
    for fmt in ('png', 'pdf') if pdf else ('png',):
        path = os.path.join(out_dir, f'{SYNTHETIC_FIGURE}.{fmt}')
        _atomic_savefig(fig, path, fmt)
        written.append(path)
        print(f'figure {SYNTHETIC_FIGURE}: wrote {path}')
    plt.close(fig)
    return written, lines


def format_synthetic_table(runs):
    """Markdown table: final training and test losses per configuration (non-diverged runs)."""
    groups = OrderedDict()
    for run in runs:
        groups.setdefault(run.config, []).append(run)
    lines = ['| model | q | r | features | L | runs | diverged | final train loss: mean (min–max) '
             '| final test loss: mean |', '|---|---|---|---|---|---|---|---|---|']
    for config in sorted(groups, key=lambda c: (c.model, c.nu or 0, c.q, c.r, c.num_layers)):
        finished = [run for run in groups[config] if not run.diverged and run.train_loss.size]
        train = np.array([run.train_loss[-1] for run in finished])
        test = np.array([run.test_loss[-1] for run in finished])
        features = '–' if config.nu is None else _synthetic_features(config.nu).replace(' features', '')
        summary = (f'{train.mean():.3g} ({train.min():.3g}–{train.max():.3g})' if train.size else '–')
        lines.append(f'| {config.model} | {config.q} | {config.r} | {features} | {config.num_layers} '
                     f'| {len(groups[config])} | {len(groups[config]) - len(finished)} | {summary} '
                     f'| {test.mean() if test.size else float("nan"):.3g} |')
    return '\n'.join(lines)


def synthetic_main(args):
    """plot_figures.py --figure synthetic: the figure and its table from synthetic_experiments/."""
    folders = list(args.folders) or [SYNTHETIC_FOLDER]
    absent = [folder for folder in folders if not os.path.isdir(folder)]
    if absent:
        print(f'error: not a folder: {", ".join(absent)}', file=sys.stderr)
        return 2
    runs = load_synthetic_runs(folders)
    if not runs:
        print(f'figure {SYNTHETIC_FIGURE}: no runs found in {", ".join(folders)}, figure skipped')
        return 0
    print(f'loaded {len(runs)} synthetic run(s) from {", ".join(folders)}')
    plot_synthetic(runs, args.out_dir, args.pdf)
    print()
    print(format_synthetic_table(runs))
    return 0


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def _figure_choice(text):
    name = text.lower()
    if name.startswith('figure'):
        name = name[len('figure'):]
    if name not in FIGURE_NAMES + ('all', SYNTHETIC_FIGURE):
        raise argparse.ArgumentTypeError(
            f'unknown figure {text!r}; choose from {", ".join(FIGURE_NAMES)}, all or synthetic')
    return name


def get_args_parser():
    """Command-line parser of the plotting script."""
    parser = argparse.ArgumentParser(
        description='Plot Figures 1a/1b/2/3 and print a summary table from results pickles.')
    parser.add_argument('folders', nargs='*',
                        help='folders searched recursively for *.pkl '
                             f'(default: {" and ".join(DEFAULT_FOLDERS)})')
    parser.add_argument('--figure', type=_figure_choice, default='all',
                        help='1a, 1b, 2, 3 or all (default: all); synthetic: the synthetic '
                             f'experiment, from {SYNTHETIC_FOLDER}/ by default')
    parser.add_argument('--out_dir', default=DEFAULT_OUT_DIR,
                        help=f'folder for the figures (default: {DEFAULT_OUT_DIR})')
    parser.add_argument('--pdf', action='store_true', help='also write PDF files')
    parser.add_argument('--smooth', type=int, default=DEFAULT_SMOOTH_WINDOW,
                        help='moving-average window of the training loss, in iterations '
                             f'(default: {DEFAULT_SMOOTH_WINDOW})')
    parser.add_argument('--error_scale', choices=('log', 'linear'), default='log',
                        help='y scale of the test error panel (default: log)')
    return parser


def main(args):
    """Plot the requested figures and print the summary table; return an exit status."""
    if args.smooth < 1:
        print('error: --smooth must be >= 1', file=sys.stderr)
        return 2
    if args.figure == SYNTHETIC_FIGURE:
        return synthetic_main(args)
    if args.folders:
        absent = [folder for folder in args.folders if not os.path.isdir(folder)]
        if absent:
            print(f'error: not a folder: {", ".join(absent)}', file=sys.stderr)
            return 2
        folders = list(args.folders)
    else:
        folders = [folder for folder in DEFAULT_FOLDERS if os.path.isdir(folder)]
        if not folders:
            print(f'no results folder found ({", ".join(DEFAULT_FOLDERS)}); nothing to plot')
            return 0

    groups = group_runs(load_runs(folders))
    print(f'loaded {sum(len(runs) for runs in groups.values())} run(s) in '
          f'{len(groups)} configuration(s) from {", ".join(folders)}')

    figures = FIGURE_NAMES if args.figure == 'all' else (args.figure,)
    used_configs = []
    for figure in figures:
        _, configs, _ = plot_figure(figure, groups, args.out_dir, smooth_window=args.smooth,
                                    pdf=args.pdf, error_scale=args.error_scale)
        used_configs.extend(configs)

    # The table covers every configuration found, or only the selected
    # figure's when one figure is asked for.
    table_groups = groups if args.figure == 'all' else OrderedDict(
        (cfg, groups[cfg]) for cfg in dict.fromkeys(used_configs))
    print()
    if table_groups:
        print(format_table(table_groups))
    else:
        print('no runs to summarise')
    return 0


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))
