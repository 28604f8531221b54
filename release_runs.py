"""The paper release's stored runs as the reference: download them, compare this project's runs
with them run by run, and write the reproduction report.

The release stored every run behind Figures 1 to 3: 279 MNIST runs in 14 configurations and 56
CIFAR-10 runs in 6 (rbarboni/FlowResNets at commit 54bc56f; deleted at its newest commit). They
are read like this project's pickles (runs.py: the restricted unpickler, nothing runs), with the
release's protocol assumed (protocol.read). A release run with fewer test errors than its
protocol's 41 stopped on a NaN: the release's pickles carry no divergence flag.

Only this project's runs made at the release's stored protocol (the same deciding fields of the
protocol record: 40 epochs, x0.2 at 35, lr 0.5, batch 256, midpoint, the training error on 1,000
images, the release's embedding files...) are compared; the others are listed apart, with what
differs.

    python release_runs.py --download                 # the 335 pickles (24 MB) into release_runs/, SHA-256 checked
    python release_runs.py results/MNIST_experiments  # the comparison table
    python release_runs.py --report                   # REPRODUCTION.md from results/ and release_runs/
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import numpy as np

import common
import embeddings
import protocol
import runs as runs_module

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(REPO_DIR, 'release_runs')
# `sha256sum` of the 335 files as the release stored them (paths relative to its repository).
SHA256SUMS = os.path.join(REPO_DIR, 'release_runs.sha256')
DOWNLOAD_URL = f'https://github.com/{embeddings.RELEASE_REPOSITORY}/raw/{embeddings.RELEASE_COMMIT}/'
RESULTS_DIR = os.path.join(REPO_DIR, 'results')
REPORT = os.path.join(REPO_DIR, 'REPRODUCTION.md')
REPORT_FIGURES = os.path.join('docs', 'reproduction')

EPOCHS_SHOWN = (0, 1, 3, 10, 20, 35)  # and the last
Z_LIMIT = 2.0  # a run further than this many of the release's standard deviations is "outside"
# A run's verdict: within Z_LIMIT, beyond it, stopped early (non-finite loss), or completed where
# fewer than two of the release's runs did (SHL L=5 after 3 passes: 1 of 20), so no spread exists.
VERDICTS = ('inside', 'OUTSIDE', 'stopped', 'no spread')


def download(directory: str = DEFAULT_DIR, base_url: str = DOWNLOAD_URL, log=print) -> int:
    """Fetch the release's stored runs missing from `directory`, all or nothing, each SHA-256
    verified. Returns the number of files fetched."""
    return common.download_verified(common.read_sha256sums(SHA256SUMS), base_url, directory, log)


def reference_problem(directory: str) -> str | None:
    """Why `directory` does not hold the release's 335 stored runs byte for byte (the pinned
    SHA-256 of each), or None when it does."""
    missing, differing = [], []
    for name, digest in common.read_sha256sums(SHA256SUMS).items():
        path = os.path.join(directory, name)
        if not os.path.lexists(path):
            missing.append(name)
            continue
        try:
            if common.sha256(path) != digest:
                differing.append(name)
        except common.DownloadError:  # not a regular file, or unreadable
            differing.append(name)
    parts = [f'{len(names)} {what}, e.g. {names[0]}'
             for names, what in ((missing, 'missing'), (differing, 'not the release\'s bytes')) if names]
    return '; '.join(parts) or None


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """One configuration: this project's runs at the stored protocol against the release's."""
    config: runs_module.Config
    mine: list
    theirs: list

    @property
    def epochs(self) -> int:
        return self.theirs[0].protocol['epochs']

    def at(self, which, epoch) -> tuple[float, float, int]:
        """Mean, std (ddof=1) and count of the test error at `epoch` over the runs that reached it."""
        values = [run.test_classif[epoch] for run in getattr(self, which)
                  if len(run.test_classif) > epoch and np.isfinite(run.test_classif[epoch])]
        return (*runs_module.mean_std(values), len(values))

    def release_final(self) -> tuple[float, float, int]:
        finals = runs_module.final_errors(self.theirs)
        return (*runs_module.mean_std(finals), len(finals))

    def z_score(self, run) -> float:
        """How many of the release's standard deviations a completed run's final error lies from
        the mean of the release's completed runs (NaN for a run that stopped early, and when
        fewer than two of the release's runs completed: no spread to measure against)."""
        mean, std, _ = self.release_final()
        if run.stopped_early or not np.isfinite(std) or std == 0:
            return float('nan')
        return float((run.test_classif[-1] - mean) / std)

    def verdict(self, run) -> str:
        """One of VERDICTS: where a run stands against the release's completed runs."""
        if run.stopped_early:
            return 'stopped'
        z = self.z_score(run)
        if not np.isfinite(z):
            return 'no spread'
        return 'inside' if abs(z) <= Z_LIMIT else 'OUTSIDE'


def compare(mine_runs, release_runs):
    """(comparisons, others): this project's runs at the release's protocol, by configuration,
    against the release's runs of the same configuration; and the other runs, each with why it
    is not compared."""
    release_by_config = {}
    for run in release_runs:
        release_by_config.setdefault(run.config, []).append(run)
    comparisons, others = {}, []
    for run in mine_runs:
        theirs = release_by_config.get(run.config)
        if run.in_progress:  # its last epoch is not its final one: no verdict yet
            others.append((run, f'in progress: {run.epochs_done} of {run.protocol["epochs"]} epochs done'))
            continue
        if not theirs:
            others.append((run, 'the release stored no run of this configuration'))
            continue
        differing = protocol.differences(run.protocol, theirs[0].protocol, exact=False)
        if differing:
            others.append((run, '; '.join(f'{key} {protocol.show(key, mine)} (release: '
                                          f'{protocol.show(key, release)})'
                                          for key, mine, release in differing)))
            continue
        comparisons.setdefault(run.config, Comparison(run.config, [], theirs)).mine.append(run)
    order = sorted(comparisons, key=lambda config: runs_module.sort_key((config, ())))
    return [comparisons[config] for config in order], others


def _percent(mean, std, count):
    if count == 0:
        return '–'
    return runs_module.format_spread(mean, std)


def epoch_table(comparisons) -> str:
    """Test error (%) by epoch: this project's mean ± std / the release's, per configuration."""
    epochs = list(EPOCHS_SHOWN) + ['last']
    header = (['configuration', 'runs here / release', 'stopped early here', 'stopped early, release']
              + [f'epoch {e}' if e != 'last' else 'last epoch' for e in epochs])
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for c in comparisons:
        cells = [f'{c.config.dataset} {runs_module.config_text(c.config)}', f'{len(c.mine)} / {len(c.theirs)}',
                 _stops(c.mine), _stops(c.theirs)]
        for epoch in epochs:
            epoch = c.epochs if epoch == 'last' else epoch
            cells.append(f'{_percent(*c.at("mine", epoch))} / {_percent(*c.at("theirs", epoch))}')
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _stops(runs):
    epochs = runs_module.stops(runs)
    return f'{len(epochs)} (at {", ".join(map(str, epochs))})' if epochs else '0'


def run_table(comparisons) -> str:
    """Each run here against the release's completed runs: its final error, z-score, verdict."""
    header = ['run', 'configuration', 'final test error %', 'release: completed runs, mean ± std %',
              'z', f'within {Z_LIMIT:g} sigma']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for c in comparisons:
        mean, std, count = c.release_final()
        for run in sorted(c.mine, key=lambda run: (run.seed is None, run.seed or 0)):
            z, verdict = c.z_score(run), c.verdict(run)
            if run.stopped_early:
                final, verdict = f'stopped at epoch {run.epochs_done}', '–'
            else:
                final = f'{100 * run.test_classif[-1]:.2f}'
            lines.append('| ' + ' | '.join([
                os.path.splitext(os.path.basename(run.path))[0], runs_module.config_text(c.config), final,
                f'{count}: {runs_module.format_spread(mean, std)}', '–' if not np.isfinite(z) else f'{z:+.2f}',
                verdict]) + ' |')
    return '\n'.join(lines)


def last_training_error(run) -> float:
    return float(run.train_classif[-1]) if run.train_classif.size else float('nan')


def _iterations_per_epoch(run) -> int:
    """All of a run's iterations over the epochs it did (train_loss has one value per iteration)."""
    return len(run.train_loss) // max(run.epochs_done, 1)


def last_epoch_loss(run) -> float:
    """The mean training loss over a run's last epoch."""
    per_epoch = _iterations_per_epoch(run)
    return float(np.mean(run.train_loss[-per_epoch:])) if per_epoch else float('nan')


def largest_loss_rise(run) -> tuple[float, int]:
    """(ratio, epoch): the largest rise of a run's mean training loss per epoch over the lowest
    such mean of the epochs before it, and the epoch (1 = the first trained) where it happened.
    A late excursion of the loss that the run survived shows here; (nan, 0) below two epochs."""
    epochs, per_epoch = run.epochs_done, _iterations_per_epoch(run)
    if epochs < 2 or not per_epoch:
        return float('nan'), 0
    means = np.asarray(run.train_loss[:per_epoch * epochs], dtype=float).reshape(epochs, per_epoch).mean(1)
    rises = means[1:] / np.minimum.accumulate(means)[:-1]
    rises[~np.isfinite(rises)] = np.nan
    if np.isnan(rises).all():
        return float('nan'), 0
    worst = int(np.nanargmax(rises))
    return float(rises[worst]), worst + 2


def training_table(comparisons) -> str:
    """Each completed run here at its last epoch, training loss and training error, against the
    release's completed runs: mean [min–max]."""
    header = ['run', 'configuration', 'training loss, last epoch: here', 'release, mean [min–max]',
              'training error %: here', 'release, mean [min–max]']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]

    def spread(values, scale, digits):
        values = scale * np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        return (f'{values.mean():.{digits}f} [{values.min():.{digits}f}–{values.max():.{digits}f}]'
                if values.size else '–')

    for c in comparisons:
        theirs = [run for run in c.theirs if run.completed]
        for run in sorted(c.mine, key=lambda run: (run.seed is None, run.seed or 0)):
            if not run.completed:
                continue
            lines.append('| ' + ' | '.join([
                os.path.splitext(os.path.basename(run.path))[0], runs_module.config_text(c.config),
                f'{last_epoch_loss(run):.4f}', spread([last_epoch_loss(r) for r in theirs], 1, 4),
                f'{100 * last_training_error(run):.2f}', spread([last_training_error(r) for r in theirs], 100, 2)]) + ' |')
    return '\n'.join(lines)


def _within_release(run, c, measure) -> bool:
    """Whether measure(run) lies within [min, max] of the release's completed runs."""
    values = [measure(r) for r in c.theirs if r.completed]
    values = [value for value in values if np.isfinite(value)]
    return bool(values) and min(values) <= measure(run) <= max(values)


def others_table(others) -> str:
    if not others:
        return 'None.'
    lines = ['| run | why it is not compared |', '|---|---|']
    lines += [f'| {_shown_path(run.path)} | {why} |' for run, why in others]
    return '\n'.join(lines)


def _shown_path(path):
    """A run's path as the report shows it: relative to the repository when inside it."""
    relative = os.path.relpath(os.path.abspath(path), REPO_DIR)
    return path if relative.startswith('..') else relative


def verdicts(comparisons) -> dict:
    """{verdict: [(comparison, run), ...]} for each of VERDICTS."""
    by_verdict = {verdict: [] for verdict in VERDICTS}
    for c in comparisons:
        for run in c.mine:
            by_verdict[c.verdict(run)].append((c, run))
    return by_verdict


def _z_scores(comparisons, seed=None) -> list[float]:
    """The finite, non-zero z-scores of the completed runs here (of one seed, if given)."""
    scores = [c.z_score(run) for c in comparisons for run in c.mine if seed is None or run.seed == seed]
    return [z for z in scores if np.isfinite(z) and z != 0]


def sign_test(comparisons) -> tuple[int, int, float, float]:
    """(below, above, p, mean z) over the completed runs here that have a z-score: how many end
    below and above the mean of the release's completed runs, the two-sided sign-test p-value of
    so uneven a split if each run were an independent draw from the release's distribution (below
    and above equally likely), and their mean z-score. The verdicts judge each run alone; this
    asks whether the runs here lean to one side together."""
    scores = _z_scores(comparisons)
    below, count = sum(z < 0 for z in scores), len(scores)
    if not count:
        return 0, 0, float('nan'), float('nan')
    tail = sum(math.comb(count, k) for k in range(min(below, count - below) + 1)) / 2 ** count
    return below, count - below, min(1.0, 2 * tail), float(np.mean(scores))


def _sign_test_words(comparisons) -> str | None:
    """The sign test in words, with the split by seed; None below two scored runs."""
    below, above, p, mean_z = sign_test(comparisons)
    if below + above < 2:
        return None
    words = (f'{below} of the {below + above} runs with a z-score end below the release\'s mean and '
             f'{above} above (mean z = {mean_z:+.2f}; two-sided sign test, a post-hoc check: p = {p:.3f})')
    seeds = sorted({run.seed for c in comparisons for run in c.mine if run.seed is not None})
    splits = [f'seed {seed}: {sum(z < 0 for z in scores)} below, {sum(z > 0 for z in scores)} above'
              for seed in seeds for scores in [_z_scores(comparisons, seed)] if scores]
    if len(splits) > 1:  # runs of one seed share random draws (see the report's summary)
        words += '; by seed, ' + '; '.join(splits)
    return words


def _starts_as_the_release(c) -> bool:
    """Every run here and of the release starts (epoch 0) at one test error, to the image."""
    return len({round(float(run.test_classif[0]), 4) for run in c.mine + c.theirs}) == 1


def _not_run_here(comparisons, release) -> set:
    """The release's MNIST configurations with no run here."""
    return ({run.config for run in release if run.config.dataset == 'MNIST'}
            - {c.config for c in comparisons if c.config.dataset == 'MNIST'})


def _figure_of(config) -> str:
    """The paper's MNIST figure of a configuration: 1b after pretraining, 2 below 32 channels."""
    return '1b' if config.pretrain_pass else '2' if config.in_channels != 32 else '1a'


def _config_name(config) -> str:
    """A configuration as the README names it: 'Figure 1b, RKHS L=5, 3 pretraining passes'."""
    return (f'Figure {_figure_of(config)}, {config.model} L={config.num_layers}'
            + (f', {config.pretrain_pass} pretraining passes' if config.pretrain_pass else '')
            + (f', {config.in_channels} channels' if config.in_channels != 32 else ''))


def headline(comparisons, release) -> str:
    """The README's summary: headline_table, then its verdicts in two sentences. The report
    (_summary_section) gives each run, the sign test and the caveats at length."""
    by_verdict = verdicts(comparisons)
    runs_here = sum(len(c.mine) for c in comparisons if c.config.dataset == 'MNIST')
    inside, completed = len(by_verdict['inside']), runs_here - len(by_verdict['stopped'])
    words = [f'All {runs_here} runs end' if inside == runs_here else
             f'{inside} of the {completed} runs that completed end',
             f' within {Z_LIMIT:g} standard deviations of the release\'s completed runs']
    if by_verdict['OUTSIDE']:
        words.append('; outside: ' + '; '.join(f'{_config_name(c.config)} (z = {c.z_score(run):+.2f})'
                                               for c, run in by_verdict['OUTSIDE']))
    if by_verdict['no spread']:
        words.append(f'; {len(by_verdict["no spread"])} completed where fewer than two of the release\'s '
                     f'runs did, so there is no spread to compare with')
    if by_verdict['stopped']:
        words.append(f'; {len(by_verdict["stopped"])} stopped early on a non-finite loss')
    below, above, _, _ = sign_test(comparisons)
    if below + above > 1:
        words.append(f'; {below} of the {below + above} runs with a z-score end below the release\'s mean '
                     f'and {above} above (the report weighs this)')
    # Where the release shipped A and B, its runs and these start from the same networks.
    shipped = [c for c in comparisons if c.config.dataset == 'MNIST'
               and embeddings.release_ships(c.config.in_channels, c.config.pretrain_pass)]
    same_start = sum(map(_starts_as_the_release, shipped))
    words.append('. Every configuration with the release\'s embedding files starts (epoch 0) at the '
                 'release\'s test error, to the image.' if same_start == len(shipped) else
                 f'. {same_start} of the {len(shipped)} configurations with the release\'s embedding '
                 f'files start (epoch 0) at the release\'s test error, to the image.')
    missing = sorted(_not_run_here(comparisons, release),
                     key=lambda config: (_figure_of(config), runs_module.sort_key((config, ()))))
    if missing:
        words.append(' No run here yet: ' + '; '.join(_config_name(config) for config in missing) + '.')
    return headline_table(comparisons) + '\n\n' + ''.join(words)


def headline_table(comparisons) -> str:
    """The README's table: each MNIST configuration's final test error here, and the release's."""
    lines = ['| configuration | final test error here | the release\'s runs, mean ± std (20 runs unless said) |',
             '|---|---|---|']
    mnist = [c for c in comparisons if c.config.dataset == 'MNIST']
    for c in sorted(mnist, key=lambda c: (_figure_of(c.config), runs_module.sort_key((c.config, ())))):
        config, finals = c.config, runs_module.final_errors(c.mine)
        name = _config_name(config)
        here = (f'{100 * finals[0]:.2f}%' if finals.size == 1 and len(c.mine) == 1 else
                f'{runs_module.format_spread(*runs_module.mean_std(finals))}% ({finals.size} runs)' if finals.size
                else '–')
        stopped = runs_module.stops(c.mine)
        if stopped and len(c.mine) == 1:
            (run,) = c.mine
            here = (f'stopped on a non-finite loss after epoch {run.epochs_done} '
                    f'(test error then {100 * run.test_classif[-1]:.2f}%)')
        elif stopped:
            here += (f'; {len(stopped)} stopped early (after epoch{"s" * (len(stopped) > 1)} '
                     f'{", ".join(map(str, stopped))})')
        mean, std, count = c.release_final()
        release = f'{100 * mean:.2f}%' if count == 1 else f'{runs_module.format_spread(mean, std)}%'
        if count != len(c.theirs):
            release += f' ({count} of {len(c.theirs)} completed)'
        elif count != 20:
            release += f' ({count} runs)'
        lines.append(f'| {name} | {here} | {release} |')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# The report: REPRODUCTION.md, regenerated from the committed runs alone
# ---------------------------------------------------------------------------------------------

# How the committed runs in results/ were made: first two chains side by side, one thread each;
# from RKHS L=10 (Figure 1a) on, one chain with both threads, in the order below. Runs were
# stopped with SIGTERM and continued with --resume where the machine was needed for other work
# (each run's log shows where).
SWEEP_COMMANDS = """\
E=../shared/data/MNIST_pretrained_models
# First, two chains side by side with OMP_NUM_THREADS=1: Figure 1a (done: RKHS L=5, and the first
# 24 epochs of RKHS L=10) and Figure 1b (done: RKHS L=5).
# Then one chain, both threads (OMP_NUM_THREADS unset); a command skips the runs already done.
# Figure 1a, up to and including SHL L=10 (it was stopped as it began SHL L=20):
python reproduce.py figure1a --num_seeds 1 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data
# Then the shortest configurations first, and Figure 1a's SHL L=20 last:
python reproduce.py figure1b --num_seeds 1 --configs RKHS_l10_p3,RKHS_l20_p3,SHL_l5_p3 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data
python reproduce.py figure2 --num_seeds 1 --configs RKHS_l20_c8,RKHS_l20_c4 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data
# (stopped in RKHS L=5 seed 1, epoch 21):
python reproduce.py figure1a --seed_start 1 --num_seeds 2 --configs RKHS_l5_p0,SHL_l5_p0 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data
# From here on a second machine of the same kind, about 3 times faster per epoch: the rest of
# RKHS L=5 seed 1, the configurations with no run yet, then the other seeds of the L=5 ones.
python reproduce.py figure1a --seed_start 1 --num_seeds 1 --configs RKHS_l5_p0 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data
python reproduce.py figure1b --num_seeds 1 --configs SHL_l10_p3 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data
python reproduce.py figure1b --num_seeds 1 --configs SHL_l20_p3 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data
python reproduce.py figure1a --num_seeds 1 --configs SHL_l20_p0 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data
python reproduce.py figure1a --seed_start 1 --num_seeds 2 --configs RKHS_l5_p0,SHL_l5_p0 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data
python reproduce.py figure1b --seed_start 1 --num_seeds 2 --configs RKHS_l5_p3,SHL_l5_p3 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data"""
MACHINE = ('virtual machines with 2 cores of an AMD EPYC processor (x86_64), no GPU, shared during '
           'the sweep with other work (tests and development), so the times below are upper bounds; '
           'two such machines were used in turn, the second about 3 times faster per epoch (see the '
           'commands), so a configuration\'s times mix both where its runs did')


def write_report(reference: str, results: str = RESULTS_DIR, out: str = REPORT):
    """REPRODUCTION.md and its figures (docs/reproduction/) from the runs in `results` and the
    release's runs in `reference`; no training. The same files give the same text."""
    mine = runs_module.load_runs([os.path.join(results, 'MNIST_experiments'), os.path.join(results, 'CIFAR_experiments')])
    release = runs_module.load_runs([reference])
    comparisons, others = compare(mine, release)
    figures = _report_figures(mine, release, os.path.join(os.path.dirname(out), REPORT_FIGURES))
    text = '\n'.join(_report_sections(comparisons, others, mine, release, figures)) + '\n'
    common.atomic_write(out, lambda f: f.write(text), binary=False)
    print(f'wrote {out} and {len(figures)} figure(s) in {REPORT_FIGURES}/')
    print('\nThe README\'s summary ("Does it reproduce the paper?"):\n' + headline(comparisons, release))


def _mean_or_dash(values) -> str:
    """The mean to one decimal, or "–" when no run recorded the time."""
    return f'{np.mean(values):.1f}' if values else '–'


def _report_figures(mine, release, folder) -> dict:
    import plot_figures
    groups, reference = runs_module.group_runs(mine), runs_module.group_runs(release)
    written = {}
    for figure in plot_figures.FIGURE_NAMES:
        fig, _ = plot_figures.build_figure(figure, groups, reference)
        if fig is None:
            continue
        path = os.path.join(folder, f'figure{figure}.png')
        common.atomic_write(path, lambda handle: fig.savefig(handle, format='png', dpi=plot_figures.DPI,
                                                             metadata={'Software': None}))
        written[figure] = os.path.join(REPORT_FIGURES, f'figure{figure}.png')
    return written


def _report_sections(comparisons, others, mine, release, figures):
    """The report's text, line by line: its introduction, then each section."""
    mnist_configs = {c.config for c in comparisons if c.config.dataset == 'MNIST'}
    release_mnist = {run.config for run in release if run.config.dataset == 'MNIST'}
    yield '# Does it reproduce the paper?'
    yield ''
    yield (f'This report sets {sum(len(c.mine) for c in comparisons)} runs of this project, in '
           f'{len(mnist_configs)} of the {len(release_mnist)} MNIST configurations of Figures 1 and 2, '
           f'against the {len(release)} runs that the paper\'s release stored (rbarboni/FlowResNets at '
           f'commit 54bc56f: {sum(run.config.dataset == "MNIST" for run in release)} MNIST, '
           f'{sum(run.config.dataset == "CIFAR10" for run in release)} CIFAR-10). Every run here was made '
           f'at the release\'s stored protocol and from its embedding files. It was written by '
           f'`python release_runs.py --report --reference <the release\'s runs>` from the committed '
           f'pickles in `results/`, with no training.')
    yield ''
    yield from _summary_section(comparisons, release)
    yield from _tables_section(comparisons, others)
    yield from _figures_section(figures, release)
    yield from _how_section(comparisons, mine)


def _summary_section(comparisons, release):
    """The verdicts in words: within 2 sigma or not, stops, the training loss and error, the starts."""
    by_verdict = verdicts(comparisons)
    inside, outside, stopped = by_verdict['inside'], by_verdict['OUTSIDE'], by_verdict['stopped']
    yield '## Summary'
    yield ''
    completed = len(inside) + len(outside)
    epochs = sorted({c.epochs for c in comparisons})
    yield (f'- {len(inside)} of the {completed} runs here that completed their '
           f'{" or ".join(map(str, epochs))} epochs'
           + (' where two or more of the release\'s runs did' if by_verdict['no spread'] else '')
           + ' end within '
           f'{Z_LIMIT:g} standard deviations of the release\'s completed runs of their configuration'
           + (':' if outside else '.'))
    for c, run in outside:
        mean, std, count = c.release_final()
        yield (f'  - outside: {_run_name(run)} ({runs_module.config_text(c.config)}) ends at '
               f'{100 * run.test_classif[-1]:.2f}%, the release\'s {count} completed runs at '
               f'{runs_module.format_spread(mean, std)}% (z = {c.z_score(run):+.2f}).'
               + _loss_rise_words(run, c))
    lean = _sign_test_words(comparisons)
    if lean:
        yield (f'- Together: {lean}. A small p says that the runs here lean to one side of the '
               f'release\'s as a group, which the verdicts, one run at a time, cannot show. Its p '
               f'overstates the evidence twice over. The test was added to this report after 8 of the '
               f'first 9 completed runs were seen to end below the release\'s mean. And it takes the '
               f'runs as independent draws, which runs with the same seed are not: they see the '
               f'training batches in the same order, and RKHS runs of the same width and seed share '
               f'the same random features (Omega), whatever their depth or pretraining. The release\'s '
               f'runs set no seed, so each drew its own. One favourable draw can thus move every run '
               f'of a seed together; the runs with other seeds are the check. No other cause is known: '
               f'the protocol records match the release\'s, the starting errors are compared below, '
               f'and the stored versions of the release\'s script that could be read train and '
               f'record the errors as this one does.')
    for c, run in by_verdict['no spread']:
        mean, _, count = c.release_final()
        yield (f'- {_run_name(run)} ({runs_module.config_text(c.config)}) completed its epochs at '
               f'{100 * run.test_classif[-1]:.2f}%; of the release\'s {len(c.theirs)} runs of that '
               f'configuration only {count} completed'
               + (f' (at {100 * mean:.2f}%)' if count else '') + ', too few for a spread to compare with.')
    for c, run in stopped:
        yield (f'- {_run_name(run)} ({runs_module.config_text(c.config)}) stopped on a non-finite loss '
               f'after epoch {run.epochs_done}; of the release\'s {len(c.theirs)} runs of that '
               f'configuration, {len(runs_module.stops(c.theirs))} stopped early.')
    for c in comparisons:
        if runs_module.stops(c.theirs) and not any(run.stopped_early for run in c.mine):
            yield (f'- {runs_module.config_text(c.config)}: {len(runs_module.stops(c.theirs))} of the '
                   f'release\'s {len(c.theirs)} runs stopped on a NaN (after epochs '
                   f'{", ".join(map(str, runs_module.stops(c.theirs)))}); none of the {len(c.mine)} here did.')
    completed_here = [(c, run) for c in comparisons for run in c.mine if run.completed]
    outside_range = {measure: [(c, run) for c, run in completed_here if not _within_release(run, c, measure)]
                     for measure in (last_epoch_loss, last_training_error)}
    yield (f'- At the last epoch, the training loss lies within the range (min to max) of the release\'s '
           f'completed runs in {len(completed_here) - len(outside_range[last_epoch_loss])} of the '
           f'{len(completed_here)} completed runs here, and the training error in '
           f'{len(completed_here) - len(outside_range[last_training_error])}'
           + (':' if any(outside_range.values()) else '.'))
    for (measure, what, scale, digits, unit) in ((last_epoch_loss, 'training loss', 1, 4, ''),
                                                 (last_training_error, 'training error', 100, 2, '%')):
        for c, run in outside_range[measure]:
            values = [scale * measure(r) for r in c.theirs if r.completed and np.isfinite(measure(r))]
            yield (f'  - {_run_name(run)} ({runs_module.config_text(c.config)}): {what} '
                   f'{scale * measure(run):.{digits}f}{unit}, the release\'s '
                   + (f'{min(values):.{digits}f}{unit} to {max(values):.{digits}f}{unit}.' if values else 'none.'))
    missing = sorted(_not_run_here(comparisons, release), key=lambda config: runs_module.sort_key((config, ())))
    for config in missing:
        yield f'- Not run here: {runs_module.config_text(config)}.'
    same_start = [c for c in comparisons if _starts_as_the_release(c)]
    differ = [c for c in comparisons if c not in same_start]
    yield (f'- Starting test errors (epoch 0): equal to the release\'s, to the image, in '
           f'{len(same_start)} of the {len(comparisons)} configurations'
           + (': all but ' + '; '.join(f'{runs_module.config_text(c.config)} (here '
                                        f'{_percent(*c.at("mine", 0))}%, release {_percent(*c.at("theirs", 0))}%)'
                                        for c in differ) if differ else '')
           + '. The release\'s Figure 2 4-channel runs drew their own embeddings, as the runs here do.')
    yield ''


def _loss_rise_words(run, c) -> str:
    """A sentence when the run's training loss climbed further above its lowest earlier epoch
    than any completed run of the release's configuration did: an excursion it survived, which
    may explain a final error far from the release's."""
    rise, epoch = largest_loss_rise(run)
    theirs = [largest_loss_rise(r)[0] for r in c.theirs if r.completed]
    theirs = [value for value in theirs if np.isfinite(value)]
    if not (np.isfinite(rise) and theirs and rise > max(theirs)):
        return ''
    return (f' Its training loss (mean per epoch) climbed in epoch {epoch} to {rise:.1f} times its lowest '
            f'earlier epoch; no completed run of the release climbed beyond {max(theirs):.1f} times.')


def _tables_section(comparisons, others):
    """The test error by epoch, each run's verdict, the training loss and error, the runs set apart."""
    yield '## Test error by epoch'
    yield ''
    yield ('Test error in %, mean ± standard deviation (ddof=1; "–" for one run) over the runs that '
           'reached the epoch: this project / the release. "Stopped early" counts the runs whose loss '
           'became non-finite, and the epochs after which they stopped.')
    yield ''
    yield epoch_table(comparisons)
    yield ''
    yield '## Each run against the release'
    yield ''
    yield ('The final test error of each run here, and its z-score against the release\'s runs of the '
           'configuration that completed their epochs.')
    yield ''
    yield run_table(comparisons)
    yield ''
    yield ('Training loss (mean over the last epoch\'s iterations) and training error (on 1,000 training '
           'images, as the release measured it) at the last epoch, for the runs that completed: this '
           'project\'s run against the release\'s completed runs of its configuration.')
    yield ''
    yield training_table(comparisons)
    yield ''
    yield '## Runs not compared'
    yield ''
    yield others_table([(run, why) for run, why in others])
    yield ''


def _figures_section(figures, release):
    """Figures 1a, 1b and 2 over the release's bands; Figure 3 from the release's runs, and the CIFAR checks."""
    yield '## Figures'
    yield ''
    yield ('Lines: this project\'s runs (mean; shaded min-max when several). Beneath them, in the same '
           'colour: the release\'s stored runs, min-max band and mean as a thin line; x marks a run '
           'that stopped on a non-finite loss. Redraw with `python plot_figures.py results/MNIST_experiments '
           '--reference <the release\'s runs>`.')
    for figure in ('1a', '1b', '2'):
        if figure in figures:
            yield ''
            yield f'![Figure {figure}]({figures[figure]})'
    yield ''
    yield '## Figure 3 (CIFAR-10)'
    yield ''
    yield ('This project includes no CIFAR-10 run: a 300-epoch run needs a GPU, and CIFAR-10 was not '
           'available where these runs were made. Figure 3 below is drawn from the release\'s stored runs alone. '
           'What was checked instead, at report time: the network of each configuration is built, its '
           'forward pass runs on a batch of two images, and its trainable parameters are counted; the '
           'counts equal the `num_parameters` the release stored.')
    yield ''
    yield from _cifar_checks(release)
    if '3' in figures:
        yield ''
        yield f'![Figure 3]({figures["3"]})'
    yield ''


def _how_section(comparisons, mine):
    """The machine, the commands, the code version, the times, and the checkpoints to evaluate."""
    yield '## How the runs were made'
    yield ''
    yield f'Machine: {MACHINE}. Commands, from the repository root:'
    yield ''
    yield '```bash'
    yield SWEEP_COMMANDS
    yield '```'
    yield ''
    versions = sorted({run.protocol.get('code_version') for run in mine} - {None})
    torch_versions = sorted({run.protocol.get('torch_version') for run in mine} - {None})
    yield (f'Code version recorded by the runs: {", ".join(f"`{v}`" for v in versions) or "none"}; torch '
           f'{", ".join(torch_versions) or "unknown"}. Each run\'s log is beside its pickle in '
           f'`results/MNIST_experiments/<figure>/logs/`. The sweep\'s code rewrote a run\'s log when it '
           f'resumed the run: the earlier attempts are in `<name>.attemptN.log` where they were kept, '
           f'else only in the repository\'s history. Every epoch\'s errors, losses and times are in the '
           f'pickle.')
    yield ''
    yield ('Minutes per run and the mean seconds per epoch include the time a run shared the cores '
           'or was paused; the median epoch is the better measure of these cores\' speed.')
    yield ''
    yield '| configuration | runs | minutes per run (mean) | seconds per epoch (mean) | seconds per epoch (median) |'
    yield '|---|---|---|---|---|'
    for c in comparisons:
        times = [_recorded_times(run) for run in c.mine]  # (minutes, median epoch seconds)
        minutes = [value for value, _ in times if np.isfinite(value)]
        seconds = [run.seconds_per_epoch for run in c.mine if np.isfinite(run.seconds_per_epoch)]
        medians = [value for _, value in times if np.isfinite(value)]
        yield (f'| {runs_module.config_text(c.config)} | {len(c.mine)} | {_mean_or_dash(minutes)} | '
               f'{_mean_or_dash(seconds)} | {_mean_or_dash(medians)} |')
    yield ''
    yield ('The best checkpoint of each configuration\'s seed-0 run is committed beside its pickle '
           '(`results/MNIST_checkpoint/<figure>/<name>_s0.pth`). To print its test error:')
    yield ''
    yield '```bash'
    for c in comparisons:
        for run in c.mine:
            if run.seed == 0:
                checkpoint = os.path.relpath(run.path, RESULTS_DIR).replace('_experiments', '_checkpoint')
                yield (f'python MNIST_experiments.py --evaluate results/{os.path.splitext(checkpoint)[0]}.pth '
                       f'--data_root ../shared/data')
    yield '```'


def _run_name(run):
    return os.path.splitext(os.path.basename(run.path))[0]


def _recorded_times(run) -> tuple[float, float]:
    """(minutes of the whole run, median seconds per epoch) from its pickle, read once; NaN for
    what it did not record (the time is a nicety; the comparison does not need it)."""
    try:
        data = common.load_results(run.path)
    except Exception:
        return float('nan'), float('nan')
    try:
        minutes = float(data['computation_time']) / 60
    except Exception:
        minutes = float('nan')
    try:
        times = np.asarray(data['epoch_times'], dtype=float)
        median = float(np.median(times)) if times.size else float('nan')
    except Exception:
        median = float('nan')
    return minutes, median


def _cifar_checks(release):
    import torch

    import models
    stored = {}
    for run in release:
        if run.config.dataset == 'CIFAR10':
            data = common.load_results(run.path)
            stored.setdefault((run.config.model, run.config.num_layers), set()).add(int(data['num_parameters']))
    yield '| model | L | parameters here | the release\'s num_parameters | equal | forward pass output |'
    yield '|---|---|---|---|---|---|'
    for (model, layers), counts in sorted(stored.items()):
        torch.manual_seed(0)
        net = models.CifarResNet(model, layers).eval()
        with torch.no_grad():
            shape = tuple(net(torch.zeros(2, 3, 32, 32)).shape)
        count = models.count_trainable_parameters(net)
        yield (f'| {model} | {layers} | {count:,} | {", ".join(f"{c:,}" for c in sorted(counts))} | '
               f'{"yes" if counts == {count} else "NO"} | {shape} |')


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def get_args_parser():
    parser = common.OneLineArgumentParser(
        description='The release\'s stored runs: download them, compare runs with them, write the report.')
    parser.add_argument('folders', nargs='*', help='folders of this project\'s results pickles to compare')
    parser.add_argument('--reference', default=DEFAULT_DIR,
                        help='folder of the release\'s stored runs (default: release_runs/ in the repository)')
    parser.add_argument('--download', action='store_true',
                        help=f'fetch the release\'s 335 stored runs from {embeddings.RELEASE_REPOSITORY} at '
                             f'commit {embeddings.RELEASE_COMMIT} into --reference, each SHA-256 verified')
    parser.add_argument('--report', action='store_true',
                        help='write REPRODUCTION.md and its figures from results/ and --reference')
    return parser


def main(args) -> int:
    try:
        if args.download:
            try:
                fetched = download(args.reference)
            except common.DownloadError as exc:  # what to do next, where the machine cannot reach GitHub
                raise common.DownloadError(f'{exc}. Without this download, copy the release\'s stored runs '
                                           f'(its MNIST_experiments/ and CIFAR_experiments/) into '
                                           f'{args.reference}, or pass --reference <their folder>') from None
            print(f'{args.reference}: {fetched} file(s) downloaded; all 335 stored runs present and verified')
            return 0
        if not os.path.isdir(args.reference):
            raise common.DownloadError(f'no folder {args.reference}: python release_runs.py --download '
                                       f'fetches the release\'s runs there, or pass --reference')
        if args.report:  # the report states what the release stored: the whole set, verified
            problem = reference_problem(args.reference)
            if problem:
                raise common.DownloadError(f'{args.reference} is not the release\'s 335 stored runs ({problem}); '
                                           f'python release_runs.py --download fetches them')
            write_report(args.reference)
            return 0
        absent = [folder for folder in args.folders if not os.path.isdir(folder)]
        if absent or not args.folders:
            raise common.DownloadError(f'not a folder: {", ".join(absent)}' if absent else
                                       'give the folders of the runs to compare, e.g. results/MNIST_experiments')
        mine, release = runs_module.load_runs(args.folders), runs_module.load_runs([args.reference])
        for runs, where in ((mine, ', '.join(args.folders)), (release, args.reference)):
            if not runs:
                raise common.DownloadError(f'no runs to compare in {where} (results pickles, or the '
                                           f'metrics files of runs in progress)')
    except common.DownloadError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return common.EXIT_USAGE
    comparisons, others = compare(mine, release)
    print(epoch_table(comparisons), '', run_table(comparisons), '', training_table(comparisons), '',
          'Not compared:', others_table(others), sep='\n')
    return 0


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))
