"""Drawing the figures and their tables from runs read back (recorded_runs).

Each of Figures 1a, 1b, 2 and 3 has two panels: the training loss per iteration (trailing
moving average, log scale) and the test error per epoch. Lines are means over runs, shaded
bands their min-max. With a reference (the release's stored runs), each configuration's
release runs are drawn beneath as a band (min-max) with their mean as a thin line. A run that
stopped early (a non-finite loss) is drawn up to its last epoch and its stop is marked with an
x; its loss is drawn up to where it began to explode (above three times its starting level), so
that the axes stay on the range of the curves.
"""
import json
import os
import warnings
from collections import OrderedDict

import numpy as np

from . import figure_grid, protocol_comparison, recorded_runs
from .files import atomic_write

# Training loss is logged every iteration and is very noisy: smooth it with a trailing moving
# average over this many iterations before plotting.
DEFAULT_SMOOTH_WINDOW = 100
# A 50k-iteration curve has far more points than pixels; this many keep matplotlib fast.
MAX_PLOT_POINTS = 2000
# The loss axis reaches this many times the highest starting loss of the curves, no higher: a
# run that stops on a NaN first explodes (to 1e21 and more), which would flatten every curve.
LOSS_AXIS_HEADROOM = 3.0
DPI = 150

# Every configuration drawn is of these models: the figure grid's, and Figure 3's other depths of them.
MODEL_COLORS = {'RKHS': 'tab:blue', 'SHL': 'tab:red'}
# Fixed style per value, so that the same L looks the same in every figure.
LAYER_STYLES = {1: ':', 5: (0, (5, 1, 1, 1)), 10: '--', 20: '-'}
CHANNEL_STYLES = {32: '-', 8: '--', 4: ':'}
FALLBACK_STYLES = ('-.', (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1, 1, 1)))


# ----------------------------------------------------------------------------
# Which curves a figure draws
# ----------------------------------------------------------------------------

def figure_configurations(figure, groups):
    """The configurations a figure draws, in the paper's order, as (Config, label, style value),
    and the figure's subtitle. Figure 3 also draws any other depth found (the release's README
    ran SHL at L = 5)."""
    grid = figure_grid.figure_grid('figure' + figure)
    specs = [(recorded_runs.Config(c.dataset, c.model, c.layers, c.channels, c.channels, c.pretrain),
              c.label, c.style) for c in grid]
    if figure in ('1a', '1b'):
        return specs, f'MNIST, {grid[0].pretrain} pretraining pass(es), 32 channels'
    if figure == '2':
        return specs, 'MNIST, RKHS, L=20, no pretraining, channels C = in_channels = dim_int'
    known = {config for config, _, _ in specs}
    extra = sorted({config for config, _ in groups if config.dataset == 'CIFAR10'
                    and config.model in MODEL_COLORS and config not in known},
                   key=lambda config: (config.model, config.num_layers))
    specs += [(config, f'{config.model} L={config.num_layers}', config.num_layers) for config in extra]
    specs.sort(key=lambda spec: (spec[0].model, spec[0].num_layers))
    return specs, 'CIFAR-10, ResNet18 layout, stages [2, 2, L, 2]'


def curve_label(base, runs, differing_fields):
    """A legend entry: the configuration, what sets its protocol apart from the configuration's
    other curves, how it started, and how many runs (and stops) it averages."""
    run = runs[0]
    text = base
    if differing_fields:
        text += f' [{protocol_comparison.describe(run.protocol, differing_fields)}]'
    if any(r.in_progress for r in runs):
        text += ' (in progress)'
    if run.from_release:
        text += ' (release)'
    elif run.assumed:
        text += ' (protocol not recorded)'
    config = run.config
    if protocol_comparison.is_drawn_where_release_had_files(run.protocol, config.in_channels, config.pretrain_pass):
        text += ' (drawn A/B)'
    return text + f': {count_text(runs)}'


def count_text(runs):
    stopped = sum(run.stopped_early for run in runs)
    text = f'{len(runs)} run' + 's' * (len(runs) != 1)
    return text + (f', {stopped} stopped on NaN' if stopped else '')


def _differing_fields(group_keys):
    """The protocol fields (names) in which a configuration's curves differ."""
    if len(group_keys) < 2:
        return ()
    return tuple(key for index, key in enumerate(protocol_comparison.DECIDING)
                 if len({group[1][index] for group in group_keys}) > 1)


# ----------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------

def downsample_index(length, max_points=MAX_PLOT_POINTS):
    """Evenly spaced indices (first and last included) to plot a long curve."""
    if length <= max_points:
        return np.arange(length)
    return np.unique(np.linspace(0, length - 1, max_points).round().astype(int))


class Panels:
    """The two axes of a figure and what has been drawn on them, for the axis limits."""

    def __init__(self, plt):
        self.fig, (self.loss, self.error) = plt.subplots(1, 2, figsize=(15, 5.2))
        self.loss_values, self.loss_starts, self.error_values = [], [], []

    def draw(self, runs, color, linestyle, label, smooth_window, reference=False):
        """The mean of `runs` as a line (thin for the reference), their min-max as a band, and an
        x at each run's stop."""
        losses = [recorded_runs.smooth(_before_explosion(run, smooth_window), smooth_window) for run in runs]
        loss_mean, _, loss_low, loss_high, _ = recorded_runs.ragged_stats(losses)
        errors = [100.0 * run.test_classif for run in runs]
        error_mean, _, error_low, error_high, _ = recorded_runs.ragged_stats(errors)
        line = dict(color=color, linestyle=linestyle, linewidth=0.8 if reference else 1.5,
                    alpha=0.7 if reference else 1.0)
        band = dict(color=color, alpha=0.12 if reference else 0.18, linewidth=0)
        if loss_mean.size:
            index = downsample_index(loss_mean.size)
            self.loss.plot(index, loss_mean[index], **line)
            if len(runs) > 1:
                self.loss.fill_between(index, loss_low[index], loss_high[index], **band)
            self.loss_values.append(loss_mean[index])
            self.loss_starts.append(next((v for v in loss_mean if np.isfinite(v)), np.nan))
        epochs = np.arange(error_mean.size)
        self.error.plot(epochs, error_mean, label=label, marker=None if reference else '.',
                        markersize=3, **line)
        if len(runs) > 1:
            self.error.fill_between(epochs, error_low, error_high, **band)
        self.error_values += [error_low, error_high]
        for run, loss, error in zip(runs, losses, errors):
            if run.stopped_early:
                self.error.plot([run.epochs_done], [error[-1]], 'x', color=color, markersize=6)
                if loss.size:
                    self.loss.plot([loss.size - 1], [loss[-1]], 'x', color=color, markersize=6)

    def finish(self, smooth_window, error_scale):
        self.loss.set_xlabel('iteration')
        self.loss.set_title(f'Training loss (moving average over {smooth_window} iterations)', fontsize=10)
        values = np.concatenate(self.loss_values) if self.loss_values else np.zeros(0)
        values = values[np.isfinite(values) & (values > 0)]
        if values.size:
            top = LOSS_AXIS_HEADROOM * np.nanmax(self.loss_starts)
            low = values.min() / 1.5
            high = min(values.max() * 1.2, top) if np.isfinite(top) else values.max() * 1.2
            _y_ticks(self.loss, high / low > 10, 6)  # a log axis only when the range is wide enough to need one
            self.loss.set_ylim(low, max(high, low * 1.01))
        self.loss.set_ylabel('training loss')
        errors = np.concatenate(self.error_values) if self.error_values else np.zeros(0)
        errors = errors[np.isfinite(errors) & (errors > 0)]
        wide = errors.size and errors.max() / errors.min() > 3
        # log where asked and the range is wide; else linear ticks, labelled with as many digits as tell them apart
        _y_ticks(self.error, error_scale == 'log' and wide, 6, _minor_percent_label)
        self.error.set_xlabel('epoch (0 = before training)')
        self.error.set_ylabel('test error (%)')
        self.error.set_title('Test error', fontsize=10)
        for axis in (self.loss, self.error):
            axis.grid(True, which='major', alpha=0.3)
        # outside the data, to the right of the error panel
        self.error.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0), borderaxespad=0)


def _before_explosion(run, window):
    """A run's loss curve, cut where a run that stopped on a NaN began to explode (above
    LOSS_AXIS_HEADROOM times its starting level): the x marks that point."""
    loss = run.train_loss
    if not run.stopped_early or loss.size == 0:
        return loss
    with np.errstate(invalid='ignore'):
        start = np.nanmean(np.where(np.isfinite(loss[:window]), loss[:window], np.nan))
        above = np.nonzero(~(loss <= LOSS_AXIS_HEADROOM * start))[0]  # NaN and inf count as above
    return loss[:above[0]] if above.size else loss


def _y_ticks(ax, log, ticks, minor_label=None):
    """A log y axis, its minor ticks labelled by `minor_label` (none without), or a linear one with
    about `ticks` ticks; either way the major ticks labelled as plain numbers."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter
    if log:
        ax.set_yscale('log')
        ax.yaxis.set_minor_formatter(FuncFormatter(minor_label) if minor_label else NullFormatter())
    else:
        ax.yaxis.set_major_locator(MaxNLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f'{value:g}'))


def _minor_percent_label(value, _position):
    # Label only the 2x and 5x minor ticks of a decade, to avoid clutter.
    if value <= 0:
        return ''
    mantissa = value / 10 ** np.floor(np.log10(value))
    return f'{value:g}' if round(mantissa) in (2, 5) else ''


def _style(value, table, used):
    if value in table:
        return table[value]
    style = FALLBACK_STYLES[len(used) % len(FALLBACK_STYLES)]  # an unusual depth
    used.append(value)
    return style


def build_figure(figure, groups, reference=None, smooth_window=DEFAULT_SMOOTH_WINDOW, error_scale='log'):
    """Draw one figure in memory: (matplotlib figure, the groups drawn), or (None, []) when no
    run of the figure exists. The error panel's lines carry their legend labels."""
    reference = reference or {}
    specs, subtitle = figure_configurations(figure, groups)
    plan = []
    for config, label, style in specs:
        mine = [key for key in groups if key[0] == config]
        theirs = [key for key in reference if key[0] == config]
        if not mine and not theirs:
            print(f'figure {figure}: no runs for {recorded_runs.config_text(config)} (curve skipped)')
        plan.append((config, label, style, mine, theirs))
    drawn = [key for *_, mine, _ in plan for key in mine]
    if not any(mine or theirs for *_, mine, theirs in plan):
        print(f'figure {figure}: no runs found, figure skipped')
        return None, []

    import matplotlib
    matplotlib.use('Agg')  # headless: never needs a display
    import matplotlib.pyplot as plt

    panels, used_styles = Panels(plt), []
    for config, label, style, mine, theirs in plan:
        color = MODEL_COLORS[config.model]
        linestyle = _style(style, CHANNEL_STYLES if figure == '2' else LAYER_STYLES, used_styles)
        for key in theirs:
            panels.draw(reference[key], color, linestyle,
                        f'{label} release: {count_text(reference[key])}', smooth_window, reference=True)
        differing = _differing_fields(mine)
        for key in mine:
            panels.draw(groups[key], color, linestyle, curve_label(label, groups[key], differing),
                        smooth_window)
    panels.finish(smooth_window, error_scale)
    what = ('the release\'s stored runs only: no run of this project' if not drawn else
            'lines: mean over runs; shaded: min-max over runs'
            + ('; release: min-max band of its stored runs, thin line their mean' if reference else ''))
    panels.fig.suptitle(f'Figure {figure}: {subtitle}\n{what}\nx: a run stopped on a non-finite loss '
                        f'(its loss drawn until it exploded)', fontsize=9)
    panels.fig.tight_layout()
    return panels.fig, drawn


def plot_figure(figure, groups, out_dir, sources, reference=None, smooth_window=DEFAULT_SMOOTH_WINDOW,
                pdf=False, error_scale='log'):
    """Draw one figure into out_dir. Returns (written paths, the groups drawn, refusal line or
    None): a figure file drawn from other folders (`sources`) is never overwritten."""
    fig, drawn = build_figure(figure, groups, reference, smooth_window, error_scale)
    if fig is None:
        return [], [], None
    import matplotlib.pyplot as plt
    refused = _overwrite_refusal(os.path.join(out_dir, f'figure{figure}.png'), sources)
    if refused:
        plt.close(fig)
        return [], [], refused
    written = []
    for fmt in ('png', 'pdf') if pdf else ('png',):
        target = os.path.join(out_dir, f'figure{figure}.{fmt}')
        metadata = {'Source': json.dumps(sources)} if fmt == 'png' else None
        atomic_write(target, lambda handle, fmt=fmt, metadata=metadata: fig.savefig(handle, format=fmt, dpi=DPI,
                                                                                  metadata=metadata))
        written.append(target)
        print(f'figure {figure}: wrote {target}')
    plt.close(fig)
    return written, drawn, None


def figure_sources(path):
    """The folders a figure file was drawn from (its PNG metadata), or None if it records none."""
    try:
        from PIL import Image
        with Image.open(path) as image:
            return json.loads(image.text['Source'])
    except Exception:  # not a PNG of ours, no record, unreadable
        return None


def _overwrite_refusal(path, sources):
    if not os.path.lexists(path) or figure_sources(path) == sources:
        return None
    return (f'refusing to overwrite {path}: it was not drawn from these folders '
            f'({", ".join(sources)}); choose another --out_dir, or move it away')


# ----------------------------------------------------------------------------
# Summary table
# ----------------------------------------------------------------------------

TABLE_HEADER = ('configuration', 'protocol', 'runs', 'stopped early', 'final test err %',
                'best test err %', 'final train err %', 's/epoch')


def format_table(groups):
    """A Markdown table, one row per (configuration, protocol)."""
    rows = []
    for key in sorted(groups, key=recorded_runs.sort_key):
        group = groups[key]
        run = group[0]
        seconds = [r.seconds_per_epoch for r in group if np.isfinite(r.seconds_per_epoch)]
        best = min(float(np.nanmin(r.test_classif)) for r in group)
        note = ' (release)' if run.from_release else ' (not recorded)' if run.assumed else ''
        cells = [f'{run.config.dataset} {recorded_runs.config_text(run.config)}',
                 protocol_comparison.describe(run.protocol, ('epochs', 'decay_steps', 'decay_rate', 'lr_init',
                                                  'batch_size', 'subset', 'synthetic', 'embedding')) + note,
                 str(len(group)), ' '.join(map(str, recorded_runs.stops(group))) or '0',
                 recorded_runs.format_spread(*recorded_runs.mean_std(recorded_runs.final_errors(group))),
                 f'{100 * best:.2f}',
                 recorded_runs.format_spread(*recorded_runs.mean_std(recorded_runs.final_errors(group, 'train_classif'))),
                 f'{np.mean(seconds):.1f}' if seconds else '–']
        rows.append(cells)
    return (recorded_runs.markdown_table(TABLE_HEADER, rows)
            + '\n\nFinal: last epoch of the runs that completed their protocol, mean ± std (ddof=1; '
            '"–" for one run). Stopped early: the epoch at which each such run stopped. Best: the '
            'lowest test error of any run at any epoch.')


# ----------------------------------------------------------------------------
# The synthetic experiment (synthetic_experiments.py; python reproduce.py synthetic)
# ----------------------------------------------------------------------------

# Colour per state dimension q (both models), line style per RKHS width r; SHL dotted.
SYNTHETIC_Q_COLORS = {2: 'tab:blue', 4: 'tab:orange', 8: 'tab:green'}
SYNTHETIC_R_STYLES = {20: '--', 200: '-'}
SYNTHETIC_SHL_STYLE = ':'


def _synthetic_order(config):
    """The order of the synthetic curves and rows: by model, features, q, r, then depth."""
    return config.model, config.nu or 0, config.q, config.r, config.num_layers


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

    groups = recorded_runs.group_runs(sorted(runs, key=lambda run: _synthetic_order(run.config)),
                                      key=lambda run: run.config)
    panels = sorted({config.nu for config in groups if config.model == 'RKHS'}, key=lambda nu: (nu >= 0, nu))
    titles = [_synthetic_features(nu) for nu in panels] or ['SHL']
    fig, axes = plt.subplots(len(titles), 1, figsize=(10, 4.2 * len(titles)), squeeze=False)
    lines = OrderedDict()
    for ax, nu, title in zip(axes[:, 0], panels or [None], titles):
        for config, members in groups.items():
            if config.model == 'RKHS' and config.nu != nu:
                continue
            averaged = _synthetic_averaged(members)
            mean, _, low, high, _ = recorded_runs.ragged_stats([run.train_loss for run in averaged])
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
        path = os.path.join(out_dir, f'{figure_grid.SYNTHETIC}.{fmt}')
        atomic_write(path, lambda handle, fmt=fmt: fig.savefig(handle, format=fmt, dpi=DPI))
        written.append(path)
        print(f'figure {figure_grid.SYNTHETIC}: wrote {path}')
    plt.close(fig)
    return written, lines


def format_synthetic_table(runs):
    """Markdown table: final training and test losses per configuration (non-diverged runs)."""
    groups = recorded_runs.group_runs(runs, key=lambda run: run.config)
    lines = ['| model | q | r | features | L | runs | diverged | final train loss: mean (min–max) '
             '| final test loss: mean |', '|---|---|---|---|---|---|---|---|---|']
    for config in sorted(groups, key=_synthetic_order):
        finished = [run for run in groups[config] if not run.diverged and run.train_loss.size]
        train = np.array([run.train_loss[-1] for run in finished])
        test = np.array([run.test_loss[-1] for run in finished])
        features = '–' if config.nu is None else _synthetic_features(config.nu).replace(' features', '')
        summary = (f'{train.mean():.3g} ({train.min():.3g}–{train.max():.3g})' if train.size else '–')
        lines.append(f'| {config.model} | {config.q} | {config.r} | {features} | {config.num_layers} '
                     f'| {len(groups[config])} | {len(groups[config]) - len(finished)} | {summary} '
                     f'| {test.mean() if test.size else float("nan"):.3g} |')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------
# The report's comparison figures: one panel per configuration, each run here its own line
# ----------------------------------------------------------------------------

def epoch_means(run, steps: int) -> np.ndarray:
    """A run's mean training loss per epoch (`steps` iterations each; a last, partial epoch of a
    run that stopped on a NaN is averaged over its finite values)."""
    loss = np.asarray(run.train_loss, dtype=float)
    chunks = [loss[start:start + steps] for start in range(0, loss.size, steps)]
    with np.errstate(invalid='ignore'), warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # an all-NaN chunk
        return np.array([np.nanmean(np.where(np.isfinite(chunk), chunk, np.nan)) for chunk in chunks])


def _steps_per_epoch(runs) -> int:
    completed = [run for run in runs if run.completed and run.epochs_done]
    run = (completed or runs)[0]
    return max(1, run.iterations_per_epoch)


def _band_and_runs(ax, theirs, mine, color, curve, top=np.inf, log=False):
    """The release's runs as a min-max band with their median, each run here as its own line,
    and an x where a run stopped on a non-finite loss. Values above `top` (a loss that exploded
    before a NaN) are drawn at `top`, so that the axis stays on the range of the curves."""
    def clipped(run):
        return np.minimum(np.asarray(curve(run), dtype=float), top)
    if theirs:
        curves = [clipped(run) for run in theirs]
        stacked = np.full((len(curves), max(len(values) for values in curves)), np.nan)
        for row, values in enumerate(curves):
            stacked[row, :len(values)] = np.where(np.isfinite(values), values, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)  # an epoch no release run reached
            low, median, high = (np.nanmin(stacked, 0), np.nanmedian(stacked, 0), np.nanmax(stacked, 0))
        epochs = np.arange(1, stacked.shape[1] + 1)
        ax.fill_between(epochs, low, high, color='0.6', alpha=0.35, linewidth=0)
        ax.plot(epochs, median, color='0.35', linewidth=1.0)
    for run in mine:
        values = clipped(run)
        ax.plot(np.arange(1, len(values) + 1), values, color=color, linewidth=0.9, alpha=0.85)
        if run.stopped_early and len(values):
            ax.plot([len(values)], [values[-1]], 'x', color=color, markersize=6)
    low, high = ax.get_ylim()
    _y_ticks(ax, log or (low > 0 and high / low > 10), 5)  # a log axis when asked, or where the range needs one
    ax.grid(True, which='major', alpha=0.3)


def build_comparison_figure(figure: str, comparisons):
    """One figure of the report: a row per configuration of `figure` that has runs here, its
    training loss per epoch (left) and test error per epoch (right); the release's runs as a
    min-max band with their median, each run here as its own line. None when no configuration
    of the figure has runs here."""
    rows = [c for config, _, _ in figure_configurations(figure, {})[0] for c in comparisons if c.config == config]
    if not rows:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    height = 2.3 * len(rows) + 0.9
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, height), squeeze=False)
    for (loss_ax, error_ax), c in zip(axes, rows):
        color = MODEL_COLORS[c.config.model]
        steps = _steps_per_epoch(c.theirs + c.mine)
        start = max(epoch_means(run, steps)[0] for run in c.theirs + c.mine if len(run.train_loss))
        _band_and_runs(loss_ax, c.theirs, c.mine, color, lambda run, steps=steps: epoch_means(run, steps),
                       top=LOSS_AXIS_HEADROOM * start, log=True)
        _band_and_runs(error_ax, c.theirs, c.mine, color, lambda run: 100.0 * np.asarray(run.test_classif)[1:])
        name = recorded_runs.config_text(c.config)
        loss_ax.set_title(f'{name}: training loss per epoch ({len(c.mine)} here, {len(c.theirs)} release)',
                          fontsize=8)
        error_ax.set_title(f'{name}: test error % per epoch', fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel('epoch')
    handles = [Patch(color='0.6', alpha=0.35, label='the release\'s stored runs: min-max'),
               Line2D([], [], color='0.35', label='the release\'s runs: median'),
               Line2D([], [], color='tab:blue', label='a run here, RKHS (one line each)'),
               Line2D([], [], color='tab:red', label='a run here, SHL (one line each)'),
               Line2D([], [], color='0.2', marker='x', linestyle='', label='stopped on a non-finite loss')]
    fig.suptitle(f'Figure {figure}: each run here against the release\'s stored runs (a loss that exploded '
                 f'before a NaN is drawn at {LOSS_AXIS_HEADROOM:g} times its first epoch\'s)', fontsize=10,
                 y=1 - 0.1 / height, va='top')
    fig.legend(handles=handles, loc='upper center', ncol=3, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.35 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.9 / height))
    return fig
