"""The spread of the runs here against the release's, judged by rules fixed before the runs.

Means can agree while spreads differ. For each configuration, three measures and one verdict,
their rules stated in RULES (the report prints them before any number):

- the final test error's spread: the ratio of standard deviations (runs here / the release's
  completed runs) and the Brown-Forsythe p (Levene's test centred on the median), where at least
  MIN_RUNS runs here completed;
- the last-epoch training loss: where each completed run here ranks among the release's
  completed runs, and the exact p of so many runs above the release's maximum if all runs were
  exchangeable;
- late trouble: a run that stops on a non-finite loss, or whose per-epoch mean training loss
  climbs further above its lowest earlier epoch than any completed release run of the
  configuration did; its rate here against the release's, with Fisher's exact p;

and the verdict on the spread: "wider" when the Brown-Forsythe p is below ALPHA and the spread
here is the larger, "narrower" when below ALPHA and the smaller, "not shown" otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .comparison import largest_loss_rise, last_epoch_loss, release_values

MIN_RUNS = 5     # completed runs here needed before the spread is tested
ALPHA = 0.01     # the level of the spread's verdict, fixed before the runs
RULES = (f'Final test error: the ratio of standard deviations (ddof=1; runs here / the release\'s completed '
         f'runs) and the Brown-Forsythe p (Levene\'s test centred on the median, as '
         f'scipy.stats.levene(..., center=\'median\') computes it), where at least {MIN_RUNS} runs here '
         f'completed. Training loss: the rank of each completed run\'s last-epoch mean training loss among '
         f'the release\'s completed runs (1 = lowest), and the exact p of at least that many runs here above '
         f'the release\'s maximum if the runs of both were exchangeable: C(m, k) / C(m + n, k) for k of m runs '
         f'here above all n of the release\'s. Late trouble: a run that stopped on a non-finite loss, or whose '
         f'per-epoch mean training loss climbed further above its lowest earlier epoch than any completed '
         f'release run of the configuration did; the rate here against the release\'s, with Fisher\'s exact p '
         f'(two-sided). Verdict on the spread: "wider" if the Brown-Forsythe p < {ALPHA:g} and the spread here '
         f'is the larger; "narrower" if p < {ALPHA:g} and it is the smaller; "not shown" otherwise (also where '
         f'fewer than {MIN_RUNS} runs here completed).')


def brown_forsythe(here, release) -> float:
    """The Brown-Forsythe p of two samples (Levene's test with the median as centre)."""
    from scipy import stats
    return float(stats.levene(np.asarray(here, float), np.asarray(release, float), center='median').pvalue)


def above_maximum_p(above: int, here: int, release: int) -> float:
    """P(at least `above` of `here` runs exceed all `release` runs) when the here + release runs
    are exchangeable: the top `above` of the pooled ranking all come from here."""
    return math.comb(here, above) / math.comb(here + release, above) if above else 1.0


def fisher_p(troubled_here: int, here: int, troubled_release: int, release: int) -> float:
    """Fisher's exact p (two-sided) of the 2 x 2 table (troubled, not) x (here, release)."""
    from scipy import stats
    return float(stats.fisher_exact([[troubled_here, here - troubled_here],
                                     [troubled_release, release - troubled_release]]).pvalue)


@dataclass
class Spread:
    """One configuration's spread measures (NaN where a measure does not apply)."""
    completed_here: int
    completed_release: int
    sd_ratio: float
    p_spread: float
    ranks: list          # each completed run here: its training-loss rank among the release's
    above_max: int
    p_above: float
    troubled_here: int
    runs_here: int
    troubled_release: int
    runs_release: int
    p_trouble: float

    @property
    def verdict(self) -> str:
        """'wider' or 'narrower' where the Brown-Forsythe p is below ALPHA, else 'not shown'."""
        if self.completed_here < MIN_RUNS or not (np.isfinite(self.p_spread) and self.p_spread < ALPHA):
            return 'not shown'
        return 'wider' if self.sd_ratio > 1 else 'narrower'


def _late_trouble(runs, limit: float) -> int:
    return sum(run.stopped_early or largest_loss_rise(run)[0] > limit for run in runs)


def measure(comparison) -> Spread:
    """The spread measures of one configuration (a comparison.Comparison)."""
    mine = [run for run in comparison.mine if run.completed]
    theirs = [run for run in comparison.theirs if run.completed]
    finals_here = [run.test_classif[-1] for run in mine]
    finals_release = [run.test_classif[-1] for run in theirs]
    sd_here = np.std(finals_here, ddof=1) if len(finals_here) > 1 else math.nan
    sd_release = np.std(finals_release, ddof=1) if len(finals_release) > 1 else math.nan
    p_spread = (brown_forsythe(finals_here, finals_release)
                if len(finals_here) >= MIN_RUNS and len(finals_release) >= 2 else math.nan)
    losses = sorted(last_epoch_loss(run) for run in theirs)
    ranks = [1 + int(np.searchsorted(losses, last_epoch_loss(run))) for run in mine]
    above = sum(rank > len(losses) for rank in ranks)
    limit = max(release_values(comparison, lambda run: largest_loss_rise(run)[0]), default=math.inf)
    troubled_here, troubled_release = _late_trouble(comparison.mine, limit), _late_trouble(comparison.theirs, limit)
    return Spread(len(mine), len(theirs), float(sd_here / sd_release) if sd_release else math.nan, p_spread,
                  ranks, above, above_maximum_p(above, len(mine), len(theirs)) if theirs else math.nan,
                  troubled_here, len(comparison.mine), troubled_release, len(comparison.theirs),
                  fisher_p(troubled_here, len(comparison.mine), troubled_release, len(comparison.theirs)))
