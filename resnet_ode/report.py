"""The reproduction report: REPRODUCTION.md and its figures, written from the committed runs in
results/ and the release's stored runs, with no training; the same files give the same text.

    python release_runs.py --report --reference <the release's runs>
"""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from . import embeddings, figure_grid, spread
from . import recorded_runs as runs_module
from .comparison import (
    Z_LIMIT,
    _not_run_here,
    _percent,
    _starts_as_the_release,
    _within_release,
    _z_scores,
    compare,
    epoch_table,
    largest_loss_rise,
    last_epoch_loss,
    last_training_error,
    others_table,
    release_values,
    run_table,
    sign_test,
    training_table,
    verdicts,
)
from .embeddings import REPO_DIR
from .files import atomic_write
from .release_reference import load_release_runs
from .safe_pickle import load_results

RESULTS_DIR = os.path.join(REPO_DIR, 'results')
REPORT = os.path.join(REPO_DIR, 'REPRODUCTION.md')
REPORT_FIGURES = os.path.join('docs', 'reproduction')


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
        words.append('; outside: ' + '; '.join(
            f'{_config_name(c.config)} seed {run.seed} (z = {c.z_score(run):+.2f})'
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
    return headline_table(comparisons) + '\n\n' + ''.join(words) + '\n\n' + _spread_words(comparisons)


def _spread_words(comparisons) -> str:
    """The spread verdicts in one paragraph, for the README."""
    measured = [(c, spread.measure(c)) for c in comparisons if c.config.dataset == 'MNIST']
    tested = [(c, m) for c, m in measured if m.completed_here >= spread.MIN_RUNS]
    words = (f'Spread of the final test error, by rules fixed before the runs (a Brown-Forsythe test at '
             f'p < {spread.ALPHA:g}, where {spread.MIN_RUNS} or more runs here completed): '
             + ('; '.join(f'{_config_name(c.config)}: {m.verdict} ({m.completed_here} runs here, std ratio '
                          f'{m.sd_ratio:.2f}, p = {m.p_spread:.3g})' for c, m in tested) or 'no configuration yet')
             + f'; the other {len(measured) - len(tested)} configurations have fewer runs here: not shown.')
    above = [(c, m) for c, m in tested if m.above_max]
    if above:
        words += (' Training loss at the last epoch above every completed run of the release: '
                  + '; '.join(f'{m.above_max} of {m.completed_here} runs of {_config_name(c.config)} '
                              f'(p = {m.p_above:.3g})' for c, m in above) + '.')
    return words


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
python reproduce.py figure1b --seed_start 1 --num_seeds 2 --configs RKHS_l5_p3,SHL_l5_p3 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data
# The spread's seeds, fixed in advance, one run at a time with OMP_NUM_THREADS=1 (the same kind of
# machine; the code of commit 703407d, with --results_root pointing at this repository's results/):
python reproduce.py figure1a --seed_start 3 --num_seeds 7 --configs SHL_l5_p0 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data
python reproduce.py figure1b --seed_start 1 --num_seeds 4 --configs SHL_l10_p3 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data
python reproduce.py figure2 --seed_start 1 --num_seeds 3 --configs RKHS_l20_c8 --embedding_dir $E --results_root results --no_plot -- --data_root ../shared/data"""
MACHINE = ('virtual machines with 2 cores of an AMD EPYC processor (x86_64), no GPU, shared during '
           'the sweep with other work (tests and development), so the times below are upper bounds; '
           'two such machines were used in turn, the second about 3 times faster per epoch (see the '
           'commands), so a configuration\'s times mix both where its runs did')


def write_report(reference: str, results: str = RESULTS_DIR, out: str = REPORT):
    """REPRODUCTION.md and its figures (docs/reproduction/) from the runs in `results` and the
    release's runs in `reference`; no training. The same files give the same text."""
    mine = runs_module.load_runs([os.path.join(results, 'MNIST_experiments'), os.path.join(results, 'CIFAR_experiments')])
    release = load_release_runs(reference)
    comparisons, others = compare(mine, release)
    figures = _report_figures(comparisons, release, os.path.join(os.path.dirname(out), REPORT_FIGURES))
    text = '\n'.join(_report_sections(comparisons, others, mine, release, figures)) + '\n'
    atomic_write(out, lambda f: f.write(text), binary=False)
    print(f'wrote {out} and {len(figures)} figure(s) in {REPORT_FIGURES}/')
    print('\nThe README\'s summary ("Does it reproduce the paper?"):\n' + headline(comparisons, release))


def _mean_or_dash(values) -> str:
    """The mean of the finite values to one decimal, or "–" when no run recorded the time."""
    values = [value for value in values if np.isfinite(value)]
    return f'{np.mean(values):.1f}' if values else '–'


def _report_figures(comparisons, release, folder) -> dict:
    """Figures 1a, 1b and 2 as small multiples (each run here against the release's band), and
    Figure 3 from the release's runs alone."""
    from . import plotting
    written = {}
    for figure in figure_grid.FIGURE_NAMES:
        if figure == '3':
            fig, _ = plotting.build_figure(figure, {}, runs_module.group_runs(release))
        else:
            fig = plotting.build_comparison_figure(figure, comparisons)
        if fig is None:
            continue
        path = os.path.join(folder, f'figure{figure}.png')
        atomic_write(path, lambda handle, fig=fig: fig.savefig(handle, format='png', dpi=plotting.DPI,
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
    yield from _spread_section(comparisons)
    yield from _side_by_side_section(comparisons)
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
        yield (f'  - outside: {run.name} ({runs_module.config_text(c.config)}) ends at '
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
        yield (f'- {run.name} ({runs_module.config_text(c.config)}) completed its epochs at '
               f'{100 * run.test_classif[-1]:.2f}%; of the release\'s {len(c.theirs)} runs of that '
               f'configuration only {count} completed'
               + (f' (at {100 * mean:.2f}%)' if count else '') + ', too few for a spread to compare with.')
    for c, run in stopped:
        yield (f'- {run.name} ({runs_module.config_text(c.config)}) stopped on a non-finite loss '
               f'after epoch {run.epochs_done}; of the release\'s {len(c.theirs)} runs of that '
               f'configuration, {len(runs_module.stops(c.theirs))} stopped early.')
    yield from _summary_details(comparisons, release)


def _summary_details(comparisons, release):
    """The stops of the release's runs, the training loss and error, the runs missing, the starts."""
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
            values = [scale * value for value in release_values(c, measure)]
            yield (f'  - {run.name} ({runs_module.config_text(c.config)}): {what} '
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
                                        f'{_percent(c, "mine", 0)}%, release {_percent(c, "theirs", 0)}%)'
                                        for c in differ) if differ else '')
           + '. The release\'s Figure 2 4-channel runs drew their own embeddings, as the runs here do.')
    yield ''


def _spread_section(comparisons):
    """The spread of the runs here against the release's, by rules stated before the numbers."""
    measured = [(c, spread.measure(c)) for c in comparisons if c.config.dataset == 'MNIST']
    yield '## Spread: the runs here against the release\'s, by rules fixed before the runs'
    yield ''
    yield ('The means agree; the question here is whether the runs here scatter more (or less) than the '
           'release\'s. The rules below, and the seeds they judge, were fixed before those runs were made: '
           'seeds 3 to 9 of Figure 1a\'s SHL L=5, 1 to 4 of Figure 1b\'s SHL L=10 and 1 to 3 of Figure 2\'s '
           'RKHS L=20 with 8 channels, each reported whatever its outcome (the runs not yet made are missing '
           'from the counts below, not left out). ' + spread.RULES)
    yield ''
    yield ('| configuration | completed here / release | std ratio | Brown-Forsythe p | training-loss ranks '
           '(of the release\'s n + 1) | above its max: p | late trouble here / release: Fisher p | verdict |')
    yield '|---|---|---|---|---|---|---|---|'
    for c, m in measured:
        ratio = f'{m.sd_ratio:.2f}' if np.isfinite(m.sd_ratio) else '–'
        p_spread = f'{m.p_spread:.3g}' if np.isfinite(m.p_spread) else f'– (< {spread.MIN_RUNS} here)'
        yield (f'| {runs_module.config_text(c.config)} | {m.completed_here} / {m.completed_release} | {ratio} '
               f'| {p_spread} | {" ".join(map(str, m.ranks)) or "–"} | {m.above_max}: {m.p_above:.3g} '
               f'| {m.troubled_here}/{m.runs_here} vs {m.troubled_release}/{m.runs_release}: {m.p_trouble:.3g} '
               f'| {m.verdict} |')
    yield ''
    for c, m in measured:
        yield f'- {_verdict_sentence(c, m)}'
    yield ''


SIDE_BY_SIDE = os.path.join(RESULTS_DIR, 'release_side_by_side.json')
RELEASE_SCRIPT_CPU = os.path.join(RESULTS_DIR, 'release_script_cpu')
SHL_L5 = runs_module.Config('MNIST', 'SHL', 5, 32, 32, 0)


def _side_by_side_section(comparisons):
    """The release's own script against this project's training, step by step, and the three
    groups of SHL L=5 runs: the release's stored runs, its script on this CPU, this project."""
    yield '## Training side by side with the release\'s own script'
    yield ''
    with open(SIDE_BY_SIDE) as f:
        results = json.load(f)
    yield ('`python benchmarks/release_side_by_side.py --release <a checkout of 54bc56f>` runs the release\'s '
           '`MNIST_experiments.py` and this project\'s training step from the same start (the release\'s '
           'initial block, rebuilt bit for bit from `torch.manual_seed(21)`) on the same batches (one '
           'permutation per epoch from seed 21), from the release\'s embedding files, for 470 steps '
           '(2 epochs), on one CPU thread: L=5 from the 0-pass files (Figure 1a), and SHL L=10 from '
           'the 3-pass files (Figure 1b) with `--models SHL --layers 10 --pretrain 3`. The control is this '
           'project against itself with the learning rate moved by one unit in the last place (0.5 + 2^-24): '
           'the size of a difference that is rounding alone. Losses: the largest relative difference over '
           'the steps so far.')
    yield ''
    yield ('| model | embedding | bit-identical steps | first step beyond 1e-6 (control) | at step 100 (control) '
           '| 235 | 470 |')
    yield '|---|---|---|---|---|---|---|'
    left = [(_left_rounding(r), _left_rounding(r['control_lr_one_ulp'], r['steps'])) for r in results]
    for r, (first, control_first) in zip(results, left):
        rel, control = r['max_rel_by_step'], r['control_lr_one_ulp']['max_rel_by_step']
        yield (f'| {r["model"]} L={r["layers"]} | {r["pretrain"]} passes | {r["bit_identical_steps"]} '
               f'| {_step_text(first, r["steps"])} ({_step_text(control_first, r["steps"])}) '
               f'| {rel["100"]:.1e} ({control["100"]:.1e}) '
               f'| {rel["235"]:.1e} ({control["235"]:.1e}) | {rel["470"]:.1e} ({control["470"]:.1e}) |')
    yield ''
    same = all(abs(first - control_first) <= 0.05 * r['steps'] for r, (first, control_first) in zip(results, left))
    yield (('The two agree to float32 rounding until training amplifies it: they leave rounding at about the '
            'step where a change of one unit in the last place of the learning rate does (or, like it, not '
            'at all), and by about as much. So the difference is rounding, not a difference in what is '
            'computed; what remains between the release\'s runs and these is a question for the statistics '
            'above.') if same else
           ('The two leave float32 rounding earlier than the control does: a difference in what is '
            'computed, not rounding alone.'))
    for r in results:
        if r['first_step_beyond_rounding'] is None:
            weights = max(r['weights_rel_by_step'][str(r['steps'])].values())
            yield ''
            yield (f'{r["model"]} L={r["layers"]} from the {r["pretrain"]}-pass files stays within rounding for all '
                   f'{r["steps"]} steps: at most {r["max_rel_by_step"][str(r["steps"])]:.1e} relative in the loss, '
                   f'and {weights:.1e} in the weights after the last step. Over these steps the two train '
                   'alike; where runs of either go late in training, these steps cannot tell.')
    yield ''
    script = runs_module.load_runs([RELEASE_SCRIPT_CPU]) if os.path.isdir(RELEASE_SCRIPT_CPU) else []
    yield from _three_groups(comparisons, script)


def _left_rounding(record: dict, steps: int | None = None) -> int:
    """The first step beyond float32 rounding, or one past the last step where none was."""
    first = record['first_step_beyond_rounding']
    return (steps or record['steps']) + 1 if first is None else first


def _step_text(step: int, steps: int) -> str:
    return f'none in {steps}' if step > steps else str(step)


def _three_groups(comparisons, script):
    """SHL L=5 (Figure 1a) in three groups, side by side: the stored runs and this project's
    (from `comparisons`) and `script`, the runs of the release's own script on this CPU."""
    mine = [run for c in comparisons if c.config == SHL_L5 for run in c.mine]
    stored = [run for c in comparisons if c.config == SHL_L5 for run in c.theirs]
    yield ('SHL L=5 (Figure 1a) in three groups: the release\'s stored runs (made on its authors\' machines), '
           'the release\'s own script on this CPU (`results/release_script_cpu/`, seeds 31 to 35), and this '
           'project on this CPU. Last-epoch training loss: median [min–max] over the runs that completed; '
           'late climb: the runs whose per-epoch training loss climbed further above its lowest earlier '
           'epoch than any completed stored run did.')
    yield ''
    yield '| group | runs | completed | final test error % | last-epoch training loss | late climb |'
    yield '|---|---|---|---|---|---|'
    limit = max((largest_loss_rise(run)[0] for run in stored if run.completed), default=np.inf)
    loss_max = max((last_epoch_loss(run) for run in stored if run.completed), default=np.inf)
    counts = {}  # group name: (late climbs, completed runs above every stored run's loss, runs)
    for name, runs in (('the release\'s stored runs', stored), ('the release\'s script, this CPU', script),
                       ('this project, this CPU', mine)):
        done = [run for run in runs if run.completed]
        finals = runs_module.final_errors(runs)
        losses = [last_epoch_loss(run) for run in done]
        loss_text = (f'{np.median(losses):.4f} [{min(losses):.4f}–{max(losses):.4f}]' if losses else '–')
        climbs = sum(largest_loss_rise(run)[0] > limit for run in runs)
        counts[name] = climbs, sum(loss > loss_max for loss in losses), len(runs)
        yield (f'| {name} | {len(runs)} | {len(done)} | {runs_module.format_spread(*runs_module.mean_std(finals))} '
               f'| {loss_text} | {climbs} |')
    yield ''
    if script and mine:
        yield _script_against_project(counts['the release\'s script, this CPU'], counts['this project, this CPU'])
        yield ''


def _script_against_project(script_counts, mine_counts) -> str:
    """The release's script and this project on the same CPU, by the table's measures (each group's
    (late climbs, runs above every stored run's last-epoch loss, runs)): is the project's late
    trouble a matter of the machine? Judged by the spread section's p < ALPHA."""
    (script_climbs, script_above, n_script), (mine_climbs, mine_above, n_mine) = script_counts, mine_counts
    p = spread.fisher_p(script_climbs, n_script, mine_climbs, n_mine)
    return (f'On the same CPU, {script_climbs} of the release\'s {n_script} script runs climbed late, against '
            f'{mine_climbs} of this project\'s {n_mine} (Fisher\'s exact p = {p:.3f}, two-sided), and '
            f'{script_above} against {mine_above} end with a last-epoch training loss above every completed '
            f'stored run. '
            + (f'At p < {spread.ALPHA:g}, the rule of the spread section, these counts do not show the two '
               f'rates to differ.' if p >= spread.ALPHA else
               f'The two rates differ at p < {spread.ALPHA:g}, the rule of the spread section.'))


def _verdict_sentence(c, m) -> str:
    """One sentence per configuration: its verdict, and what the other measures add."""
    name = runs_module.config_text(c.config)
    if m.completed_here < spread.MIN_RUNS:
        head = (f'{name}: not shown; {m.completed_here} run(s) here completed, fewer than the '
                f'{spread.MIN_RUNS} the test needs.')
    elif m.verdict == 'not shown':
        head = (f'{name}: not shown (std ratio {m.sd_ratio:.2f}, p = {m.p_spread:.3g}); with '
                f'{m.completed_here} runs here, a spread even twice the release\'s is often not shown at '
                f'p < {spread.ALPHA:g}, so this is no evidence that the spreads are equal.')
    else:
        head = (f'{name}: {m.verdict} (std ratio {m.sd_ratio:.2f}, p = {m.p_spread:.3g}).')
    extra = ''
    if m.above_max:
        extra += (f' {m.above_max} of its {m.completed_here} completed runs end with a training loss above every '
                  f'completed release run (p = {m.p_above:.3g} if exchangeable).')
    if m.troubled_here:
        extra += (f' Late trouble in {m.troubled_here} of {m.runs_here} here against {m.troubled_release} of '
                  f'{m.runs_release} in the release (Fisher p = {m.p_trouble:.3g}).')
    if m.verdict == 'wider':
        extra += (' Known: the forward pass and the first hundreds of training steps agree with the '
                  'release\'s own script to float32 rounding (see below), so the code computes the same '
                  'steps. Not known: whether the release\'s GPU runs, with their own summation order and '
                  'seeds, would scatter as widely on this CPU; the release-script runs on this CPU are the '
                  'check.')
    return head + extra


def _loss_rise_words(run, c) -> str:
    """A sentence when the run's training loss climbed further above its lowest earlier epoch
    than any completed run of the release's configuration did: an excursion it survived, which
    may explain a final error far from the release's."""
    rise, epoch = largest_loss_rise(run)
    theirs = release_values(c, lambda r: largest_loss_rise(r)[0])
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
        minutes, medians = zip(*map(_recorded_times, c.mine))  # a comparison has at least one run here
        yield (f'| {runs_module.config_text(c.config)} | {len(c.mine)} | {_mean_or_dash(minutes)} | '
               f'{_mean_or_dash([run.seconds_per_epoch for run in c.mine])} | {_mean_or_dash(medians)} |')
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


def _recorded_times(run) -> tuple[float, float]:
    """(minutes of the whole run, median seconds per epoch) from its pickle, read once; NaN for
    what it did not record (the time is a nicety; the comparison does not need it)."""
    try:
        data = load_results(run.path)
    except Exception:
        data = {}
    minutes = median = float('nan')
    with contextlib.suppress(Exception):
        minutes = float(data['computation_time']) / 60
    with contextlib.suppress(Exception):
        times = np.asarray(data['epoch_times'], dtype=float)
        median = float(np.median(times)) if times.size else median
    return minutes, median


def _cifar_checks(release):
    import torch

    import models
    stored = {}
    for run in release:
        if run.config.dataset == 'CIFAR10':
            data = load_results(run.path)
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


