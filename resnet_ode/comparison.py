"""This project's runs against the release's stored runs, configuration by configuration.

Only runs made at the release's stored protocol (the same deciding fields of the protocol
record: 40 epochs, x0.2 at 35, lr 0.5, batch 256, midpoint, the training error on 1,000 images,
the release's embedding files...) are compared; the others are listed apart, with what differs.
A release run with fewer test errors than its protocol's 41 stopped on a NaN: the release's
pickles carry no divergence flag.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from . import protocol_comparison
from . import recorded_runs as runs_module
from .embeddings import REPO_DIR

EPOCHS_SHOWN = (0, 1, 3, 10, 20, 35)  # and the last
Z_LIMIT = 2.0  # a run further than this many of the release's standard deviations is "outside"
# A run's verdict: within Z_LIMIT, beyond it, stopped early (non-finite loss), or completed where
# fewer than two of the release's runs did (SHL L=5 after 3 passes: 1 of 20), so no spread exists.
VERDICTS = ('inside', 'OUTSIDE', 'stopped', 'no spread')


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
    release_by_config = runs_module.group_runs(release_runs, key=lambda run: run.config)
    comparisons, others = {}, []
    for run in mine_runs:
        theirs = release_by_config.get(run.config)
        if run.in_progress:  # its last epoch is not its final one: no verdict yet
            others.append((run, f'in progress: {run.epochs_done} of {run.protocol["epochs"]} epochs done'))
            continue
        if not theirs:
            others.append((run, 'the release stored no run of this configuration'))
            continue
        differing = protocol_comparison.differences(run.protocol, theirs[0].protocol, exact=False)
        if differing:
            others.append((run, '; '.join(f'{key} {protocol_comparison.show(key, mine)} (release: '
                                          f'{protocol_comparison.show(key, release)})'
                                          for key, mine, release in differing)))
            continue
        comparisons.setdefault(run.config, Comparison(run.config, [], theirs)).mine.append(run)
    order = sorted(comparisons, key=lambda config: runs_module.sort_key((config, ())))
    return [comparisons[config] for config in order], others


def _percent(c, which, epoch) -> str:
    """The test error (%) at `epoch` over the runs that reached it, mean ± std; '–' where none did."""
    return runs_module.format_spread(*c.at(which, epoch)[:2])


def epoch_table(comparisons) -> str:
    """Test error (%) by epoch: this project's mean ± std / the release's, per configuration."""
    header = (['configuration', 'runs here / release', 'stopped early here', 'stopped early, release']
              + [f'epoch {e}' for e in EPOCHS_SHOWN] + ['last epoch'])
    return runs_module.markdown_table(header, [
        [f'{c.config.dataset} {runs_module.config_text(c.config)}', f'{len(c.mine)} / {len(c.theirs)}',
         _stops(c.mine), _stops(c.theirs)]
        + [f'{_percent(c, "mine", epoch)} / {_percent(c, "theirs", epoch)}' for epoch in EPOCHS_SHOWN + (c.epochs,)]
        for c in comparisons])


def _stops(runs):
    epochs = runs_module.stops(runs)
    return f'{len(epochs)} (at {", ".join(map(str, epochs))})' if epochs else '0'


def run_table(comparisons) -> str:
    """Each run here against the release's completed runs: its final error, z-score, verdict."""
    header = ['run', 'configuration', 'final test error %', 'release: completed runs, mean ± std %',
              'z', f'within {Z_LIMIT:g} sigma']
    rows = []
    for c in comparisons:
        mean, std, count = c.release_final()
        for run in sorted(c.mine, key=lambda run: (run.seed is None, run.seed or 0)):
            z, stopped = c.z_score(run), run.stopped_early
            rows.append([run.name, runs_module.config_text(c.config),
                         f'stopped at epoch {run.epochs_done}' if stopped else f'{100 * run.test_classif[-1]:.2f}',
                         f'{count}: {runs_module.format_spread(mean, std)}', '–' if not np.isfinite(z) else f'{z:+.2f}',
                         '–' if stopped else c.verdict(run)])
    return runs_module.markdown_table(header, rows)


def last_training_error(run) -> float:
    return float(run.train_classif[-1]) if run.train_classif.size else float('nan')


def last_epoch_loss(run) -> float:
    """The mean training loss over a run's last epoch."""
    per_epoch = run.iterations_per_epoch
    return float(np.mean(run.train_loss[-per_epoch:])) if per_epoch else float('nan')


def largest_loss_rise(run) -> tuple[float, int]:
    """(ratio, epoch): the largest rise of a run's mean training loss per epoch over the lowest
    such mean of the epochs before it, and the epoch (1 = the first trained) where it happened.
    A late excursion of the loss that the run survived shows here; (nan, 0) below two epochs."""
    epochs, per_epoch = run.epochs_done, run.iterations_per_epoch
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

    def spread(c, measure, scale, digits):
        values = scale * np.asarray(release_values(c, measure), dtype=float)
        return (f'{values.mean():.{digits}f} [{values.min():.{digits}f}–{values.max():.{digits}f}]'
                if values.size else '–')

    return runs_module.markdown_table(header, [
        [run.name, runs_module.config_text(c.config),
         f'{last_epoch_loss(run):.4f}', spread(c, last_epoch_loss, 1, 4),
         f'{100 * last_training_error(run):.2f}', spread(c, last_training_error, 100, 2)]
        for c in comparisons for run in sorted(c.mine, key=lambda run: (run.seed is None, run.seed or 0))
        if run.completed])


def release_values(c, measure) -> list[float]:
    """measure(run) of each of the release's completed runs of a comparison, where finite."""
    return [value for value in (measure(r) for r in c.theirs if r.completed) if np.isfinite(value)]


def _within_release(run, c, measure) -> bool:
    """Whether measure(run) lies within [min, max] of the release's completed runs."""
    values = release_values(c, measure)
    return bool(values) and min(values) <= measure(run) <= max(values)


def others_table(others) -> str:
    if not others:
        return 'None.'
    return runs_module.markdown_table(['run', 'why it is not compared'],
                                      [(_shown_path(run.path), why) for run, why in others])


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
def _starts_as_the_release(c) -> bool:
    """Every run here and of the release starts (epoch 0) at one test error, to the image."""
    return len({round(float(run.test_classif[0]), 4) for run in c.mine + c.theirs}) == 1


def _not_run_here(comparisons, release) -> set:
    """The release's MNIST configurations with no run here."""
    return ({run.config for run in release if run.config.dataset == 'MNIST'}
            - {c.config for c in comparisons if c.config.dataset == 'MNIST'})

