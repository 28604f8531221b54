"""The spread verdicts of the report, on crafted runs whose answer is known: runs drawn with
twice the release's spread are "wider", with half of it "narrower", with the same "not shown";
the training-loss rank, the late-trouble rate and their exact p-values."""
import math

import numpy as np
import pytest
from scipy import stats

from resnet_ode import comparison, recorded_runs, spread

CONFIG = recorded_runs.Config('MNIST', 'SHL', 5, 32, 32, 0)
EPOCHS, STEPS = 4, 3  # per run: 4 epochs of 3 iterations


def _run(final: float, loss: float = 0.01, climb: float = 1.0, stopped: bool = False):
    """A completed run (or one stopped on a NaN) whose last test error is `final`, whose last
    epoch's mean training loss is `loss`, and whose loss climbs `climb` times above its lowest
    earlier epoch in epoch 3."""
    per_epoch = [1.0, 0.1, 0.1 * climb, loss]
    train_loss = np.repeat(per_epoch, STEPS)
    test = np.array([0.9, 0.2, 0.1, 0.05, final])  # epoch 0 (before training), then each epoch
    if stopped:  # a NaN in the last epoch's first step: the curves end there
        train_loss, test = np.append(train_loss[:-STEPS], np.nan), test[:-1]
    protocol = {'epochs': EPOCHS}
    return recorded_runs.RecordedRun(path='x', config=CONFIG, protocol=protocol, assumed=(), seed=None,
                                     train_loss=train_loss, train_classif=test, test_classif=test,
                                     diverged=stopped, seconds_per_epoch=1.0)


def _finals(n, sd, offset=0.5):
    """n final errors drawn at the quantiles (k + offset) / n of N(1.5%, sd): a sample of that
    spread without the luck of a random draw."""
    return 0.015 + sd * stats.norm.ppf((np.arange(n) + offset) / n)


@pytest.mark.parametrize('scale, expected', [(2.0, 'wider'), (0.5, 'narrower'), (1.0, 'not shown')])
def test_runs_drawn_with_another_spread_get_the_verdict_the_rule_gives(scale, expected):
    release = [_run(value) for value in _finals(40, 0.001)]
    here = [_run(value) for value in _finals(40, 0.001 * scale, offset=0.3)]
    measured = spread.measure(comparison.Comparison(CONFIG, here, release))
    assert measured.verdict == expected
    finals_here, finals_release = [r.test_classif[-1] for r in here], [r.test_classif[-1] for r in release]
    assert measured.p_spread == stats.levene(finals_here, finals_release, center='median').pvalue
    assert measured.sd_ratio == pytest.approx(np.std(finals_here, ddof=1) / np.std(finals_release, ddof=1))
    assert (measured.sd_ratio > 1.5) == (scale == 2.0) and (measured.sd_ratio < 0.7) == (scale == 0.5)


def test_fewer_than_the_minimum_of_runs_is_not_tested():
    release = [_run(value) for value in _finals(20, 0.001)]
    here = [_run(value) for value in _finals(spread.MIN_RUNS - 1, 0.01)]  # ten times the spread
    measured = spread.measure(comparison.Comparison(CONFIG, here, release))
    assert math.isnan(measured.p_spread) and measured.verdict == 'not shown' and measured.sd_ratio > 5


def test_training_loss_ranks_and_the_exact_p_of_runs_above_the_release_maximum():
    release = [_run(0.015, loss=0.001 * (k + 1)) for k in range(19)]  # losses 0.001 .. 0.019
    here = [_run(0.015, loss=value) for value in (0.0005, 0.0105, 0.03, 0.05)]
    measured = spread.measure(comparison.Comparison(CONFIG, here, release))
    assert measured.ranks == [1, 11, 20, 20]
    assert measured.above_max == 2
    assert measured.p_above == math.comb(4, 2) / math.comb(23, 2)  # the top 2 of 23 both from here


def test_late_trouble_counts_climbs_beyond_the_release_and_stops_on_a_nan():
    release = [_run(0.015, climb=c) for c in (1.0, 2.0, 3.0)] + [_run(0.015, stopped=True)]
    here = [_run(0.015, climb=3.0), _run(0.015, climb=3.5), _run(0.015, stopped=True), _run(0.015)]
    measured = spread.measure(comparison.Comparison(CONFIG, here, release))
    assert comparison.largest_loss_rise(release[2])[0] == pytest.approx(3.0)
    assert (measured.troubled_here, measured.runs_here) == (2, 4)      # the 3.5x climb and the stop
    assert (measured.troubled_release, measured.runs_release) == (1, 4)  # its stop only
    assert measured.p_trouble == stats.fisher_exact([[2, 2], [1, 3]]).pvalue


def test_the_exact_p_of_runs_above_the_maximum_is_the_share_of_orderings():
    """C(m, k) / C(m + n, k), checked by counting the orderings of m + n exchangeable runs."""
    import itertools
    m, n = 3, 4
    for k in range(m + 1):
        orders = list(itertools.permutations(['here'] * m + ['release'] * n))
        share = sum(all(x == 'here' for x in order[:k]) for order in orders) / len(orders)
        assert spread.above_maximum_p(k, m, n) == pytest.approx(share)


def _script_sentence(script, mine, stored):
    from resnet_ode import report
    lines = list(report._three_groups([comparison.Comparison(CONFIG, mine, stored)], script))
    return lines[-2]  # the sentence after the table, then a blank line


def test_the_release_script_against_the_project_on_one_cpu_counts_climbs_and_high_losses():
    """The late climbs and last-epoch losses beyond the stored runs, in the release script's runs
    and this project's, with Fisher's exact p and the spread section's rule."""
    stored = [_run(0.015, loss=0.001 * (k + 1), climb=c) for k, c in enumerate((1.0, 2.0, 3.0))]  # max 3x, 0.003
    script = [_run(0.015, loss=0.002), _run(0.015, loss=0.004, climb=3.5)]
    mine = [_run(0.015, loss=0.02, climb=4.0) for _ in range(12)] + [_run(0.015) for _ in range(3)]
    p = stats.fisher_exact([[1, 1], [12, 3]]).pvalue
    assert _script_sentence(script, mine, stored) == (
        f"On the same CPU, 1 of the release's 2 script runs climbed late, against 12 of this project's 15 "
        f"(Fisher's exact p = {p:.3f}, two-sided), and 1 against 15 end with a last-epoch training loss above "
        f"every completed stored run. At p < 0.01, the rule of the spread section, these counts do not show "
        f"the two rates to differ.")
    script = [_run(0.015, loss=0.002) for _ in range(15)]
    p = stats.fisher_exact([[0, 15], [12, 3]]).pvalue
    assert p < spread.ALPHA
    assert _script_sentence(script, mine, stored).endswith(
        f"(Fisher's exact p = {p:.3f}, two-sided), and 0 against 15 end with a last-epoch training loss above "
        f"every completed stored run. The two rates differ at p < 0.01, the rule of the spread section.")


def test_without_release_script_runs_the_table_has_no_sentence():
    from resnet_ode import report
    lines = list(report._three_groups([comparison.Comparison(CONFIG, [_run(0.015)], [_run(0.015)])], []))
    assert lines[-2].startswith('| this project, this CPU | 1 | 1 |') and lines[-1] == ''
