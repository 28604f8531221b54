"""A figure's sweep: its runs (one process per seed, or per batch of seeds), the files already
there, and which runs are left to do. reproduce.py is its command line; scheduler.py runs it.

Every seed has its own results pickle, checkpoint and log:

    MNIST_experiments/fig1a/RKHS_l5_p0_s3.pkl      results (read by plot_figures.py)
    MNIST_experiments/fig1a/logs/RKHS_l5_p0_s3.log stdout + stderr of every attempt
    MNIST_checkpoint/fig1a/RKHS_l5_p0_s3.pth       best checkpoint
    MNIST_experiments/fig1a/sweep.json             manifest: settings, commands, outcomes
"""
from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass, field

from . import embeddings, figure_grid, gate, protocol, protocol_comparison, recorded_runs, scheduler
from .errors import UsageError
from .figure_grid import SYNTHETIC, SYNTHETIC_RESULTS, checkpoint_dir, figure_folder_prefix, results_dir

REPO_DIR = embeddings.REPO_DIR
# Folder of the experiment scripts the sweep launches (tests point it at stand-ins; the protocol
# a run would record is always read from the real scripts' flags).
SCRIPT_DIR = REPO_DIR
# Flags that the sweep sets for each run and that must not be passed through.
MANAGED_FLAGS = ('seed', 'seeds', 'results_dir', 'save', 'checkpoint', 'embedding_seed',
                 'embedding_dir', 'resume')
# Seeds per process on GPUs when --batch_seeds is not given: all seeds of a configuration up to
# 20, the paper's count. A choice for the GPU (20 members fill it far better than one), not a
# measurement: no GPU was available to measure it (see docs/performance.md).
DEFAULT_GPU_BATCH_SEEDS = 20
# Training protocols: the experiment flags that set them, per dataset.
# 'stored' is what the release's stored runs used: its scripts' defaults for MNIST (its pickles
# hold 41 test errors and 9,400 = 40 x 235 losses per run), and train_classif on the first 1,000
# training images (every stored value is a multiple of 0.001: its runs passed -tbs 1000).
# 'readme' is what its README states. Figure 3 has one protocol, the README's.
_CIFAR_PROTOCOL = ('--epochs', '300', '--decay_steps', '260', '--decay_rate', '0.1')
PROTOCOLS = {
    'stored': {'MNIST': ('--epochs', '40', '--decay_steps', '35', '--decay_rate', '0.2',
                         '--train_error_images', '1000'), 'CIFAR': _CIFAR_PROTOCOL},
    'readme': {'MNIST': ('--epochs', '30', '--decay_steps', '25', '--decay_rate', '0.1'),
               'CIFAR': _CIFAR_PROTOCOL},
}
# Path flags of the experiment scripts that a user may pass after '--': made absolute, since the
# runs start in --results_root, not where reproduce.py was started.
PATH_DESTS = ('data_root',)
DATASETS = {'MNIST': 'MNIST', 'CIFAR': 'CIFAR10', SYNTHETIC: protocol.SYNTHETIC}
SCRIPTS = {'MNIST': 'MNIST_experiments.py', 'CIFAR': 'CIFAR_experiments.py', SYNTHETIC: 'synthetic_experiments.py'}


@dataclass
class SweepRun(scheduler.Job):
    """One process of the sweep: one seed, or several trained side by side (--seeds)."""
    figure: str = ''
    config: figure_grid.Configuration = None
    seeds: list = field(default_factory=list)  # one, or the members of a batched run
    checkpoints: list = field(default_factory=list)  # one per seed, relative to the results root
    resume_state: str = ''  # an interrupted run's state, relative to the results root

    @property
    def dataset(self):
        """The dataset name of the protocol record: MNIST, CIFAR10 or SYNTHETIC."""
        return protocol.SYNTHETIC if self.figure == SYNTHETIC else self.config.dataset


# ----------------------------------------------------------------------------
# The runs of a figure
# ----------------------------------------------------------------------------

def embedding_dir(args):
    """Where the runs load the release's embedding files from: the sweep's --embedding_dir, or the
    experiment script's default (the repository's), which the runs use untold."""
    if args.embedding_dir in (None, embeddings.NO_EMBEDDING_DIR):
        return args.embedding_dir or embeddings.DEFAULT_PATH
    return os.path.abspath(args.embedding_dir)


def describe_embedding(figures, args) -> str:
    """Which MNIST configurations load the release's files and which draw from a seed ('' when
    none is MNIST). With --embedding_dir given, a missing or unusable file is refused here
    (EmbeddingError), once, before any run, as each run would refuse it."""
    explicit = args.embedding_dir not in (None, embeddings.NO_EMBEDDING_DIR)
    pairs = dict.fromkeys((config.channels, config.pretrain) for figure in figures if figure != SYNTHETIC
                          for config in selected_configurations(figure, args) if config.dataset == 'MNIST')
    directory = embedding_dir(args)
    found, drawn = [], []
    for pair in pairs:
        try:
            paths = embeddings.find(directory, *pair, required=explicit and embeddings.release_ships(*pair))
        except UsageError:
            if explicit:
                raise
            paths = None  # the run itself says why it refuses the default folder's file
        (found if paths else drawn).append(pair)
    seed = ('a seed of its own (--vary_embedding)' if args.vary_embedding
            else f'--embedding_seed {args.embedding_seed}')
    return '; '.join(f'{source} for ' + ', '.join(f'{c} channels/{p} passes' for c, p in group)
                     for source, group in ((f'release files from {directory}', found), (seed, drawn)) if group)


def seeds_per_process(figure, args) -> int:
    """--batch_seeds, or its default: 1 on CPU, DEFAULT_GPU_BATCH_SEEDS with --gpus. Figure 3's
    CIFAR script trains one seed per process."""
    if figure_folder_prefix(figure) != 'MNIST':
        return 1
    if args.batch_seeds is not None:
        return args.batch_seeds
    return DEFAULT_GPU_BATCH_SEEDS if args.gpus else 1


def selected_configurations(figure, args):
    """The figure's configurations, or those named by --configs."""
    grid = figure_grid.figure_grid(figure)
    return grid if not args.configs else [config for config in grid if config.name in args.configs]


def build_runs(figure, args, root) -> list[SweepRun]:
    """All runs of one figure, configuration-major.

    An interrupted batch of seeds is continued as it was saved, whatever --batch_seeds says now
    (its resume state belongs to exactly those seeds). The other seeds of a configuration go in
    groups of seeds_per_process, one process per group, so that --shard splits the same list
    whatever has finished already.
    """
    if figure == SYNTHETIC:
        return build_synthetic_runs(args)
    from .run_files import batch_states  # run_files imports torch: imported where it is used
    seeds = list(range(args.seed_start, args.seed_start + args.num_seeds))
    size = seeds_per_process(figure, args)
    runs = []
    for config in selected_configurations(figure, args):
        folder = os.path.join(root, results_dir(config.shared_from or figure))
        saved = [batch for _, batch in batch_states(folder, config.name) if set(batch) <= set(seeds)]
        runs += [make_run(figure, config, batch, args) for batch in saved]
        rest = [seed for seed in seeds if not any(seed in batch for batch in saved)]
        runs += [make_run(figure, config, rest[start:start + size], args)
                 for start in range(0, len(rest), size)]
    return runs


def make_run(figure, config, seeds, args) -> SweepRun:
    """The subprocess that trains `seeds` of one configuration: `--seed S` alone, or `--seeds` for
    several, whose member files have the same names as the single runs'."""
    # A configuration shared with another figure is that figure's run, in that figure's folder.
    owner = config.shared_from or figure
    prefix, out_dir, ckpt_dir = figure_folder_prefix(owner), results_dir(owner), checkpoint_dir(owner)
    name = f'{config.name}_s{"-".join(map(str, seeds))}'
    stem, seed_flags = (name, ['--seed', str(seeds[0])]) if len(seeds) == 1 else \
        (config.name, ['--seeds', *map(str, seeds)])
    run_args = config.flags() + [
        *PROTOCOLS[args.protocol][prefix], *seed_flags,
        '--results_dir', out_dir, '--save', stem + '.pkl',
        '--checkpoint', os.path.join(ckpt_dir, stem + '.pth'),
    ]
    # Only the MNIST model has an embedding: the release's files where they exist (as the
    # release's stored runs), else one drawn from a seed shared by all runs.
    if prefix == 'MNIST':
        if args.embedding_dir is not None:
            run_args += ['--embedding_dir', embedding_dir(args)]
        if not args.vary_embedding:
            run_args += ['--embedding_seed', str(args.embedding_seed)]
    if args.gpus:
        run_args += ['--device', 'cuda']
    # Last, so that a pass-through flag overrides ours (argparse keeps the last occurrence).
    run_args += list(args.passthrough) + list(args.absolute_paths)
    return SweepRun(name=name, script=os.path.join(SCRIPT_DIR, SCRIPTS[prefix]), args=run_args,
                    pickles=[os.path.join(out_dir, f'{config.name}_s{seed}.pkl') for seed in seeds],
                    log=os.path.join(out_dir, 'logs', name + '.log'), figure=figure, config=config,
                    seeds=list(seeds),
                    checkpoints=[os.path.join(ckpt_dir, f'{config.name}_s{seed}.pth') for seed in seeds],
                    resume_state=os.path.join(out_dir, gate.resume_state_name(stem, seeds if len(seeds) > 1 else None)))


def build_synthetic_runs(args) -> list[SweepRun]:
    """One process per (configuration, seed), configuration-major, into SYNTHETIC_RESULTS."""
    runs = []
    for config, flags in figure_grid.synthetic_configurations():
        if args.configs and config not in args.configs:
            continue
        for seed in range(args.seed_start, args.seed_start + args.num_seeds):
            name = f'{config}_s{seed}'
            run_args = flags + ['--seed', str(seed), '--results_dir', SYNTHETIC_RESULTS, '--save', f'{name}.pkl']
            run_args += (['--device', 'cuda'] if args.gpus else []) + list(args.passthrough)
            runs.append(SweepRun(name=name, script=os.path.join(SCRIPT_DIR, SCRIPTS[SYNTHETIC]),
                                 args=run_args, pickles=[os.path.join(SYNTHETIC_RESULTS, f'{name}.pkl')],
                                 log=os.path.join(SYNTHETIC_RESULTS, 'logs', f'{name}.log'),
                                 figure=SYNTHETIC, seeds=[seed]))
    return runs


# ----------------------------------------------------------------------------
# The runs' flags, through the experiments' own gate
# ----------------------------------------------------------------------------

def experiment_rules(dataset: str):
    """The gate's rules of a dataset's experiment (mnist.RULES, ...). Imported when first needed:
    they import torch, which the sweep itself does not need."""
    if dataset == 'MNIST':
        from . import mnist
        return mnist.RULES
    if dataset == 'CIFAR10':
        from . import cifar
        return cifar.RULES
    from . import synthetic
    return synthetic.RULES


def of_command(dataset: str, argv: list) -> dict:
    """The protocol record that the experiment of `dataset` would write when run with `argv`: its
    flags read through the gate, and the embedding files it would load. Raises UsageError
    (EmbeddingError) as the run would."""
    rules = experiment_rules(dataset)
    config = rules.resolved(gate.validate(rules, list(argv), gate.SWEEP))
    if dataset == protocol.SYNTHETIC:
        from .synthetic import synthetic_method
        return protocol.build_synthetic(config, synthetic_method(config), {})
    facts = {}
    if dataset == 'MNIST':
        paths = embeddings.for_run(config)
        facts = embeddings.describe(paths) if paths else {'embedding_seed': config.embedding_seed}
    return protocol.build(config, dataset, facts)


# ----------------------------------------------------------------------------
# The flags after "--"
# ----------------------------------------------------------------------------

def passthrough_problems(args, figures) -> list[str]:
    """Flags after '--' that are invalid for a run's script, or that would contradict the sweep:
    a grid flag (--layers 2 would make the runs named RKHS_l5, _l10 and _l20 all 2-layer runs) or
    a flag that the sweep sets per run (moving the pickle from where a rerun looks, or the shared
    embedding). The flags go through the scripts' own gate, so that every spelling counts:
    --layers, -l, an abbreviation like --lay, --layers=2. Relative paths become absolute."""
    if not args.passthrough:
        return []
    prefixes = [SYNTHETIC] if figures == (SYNTHETIC,) else sorted({figure_folder_prefix(f) for f in figures})
    grid = figure_grid.SYNTHETIC_GRID_DESTS if figures == (SYNTHETIC,) else figure_grid.GRID_DESTS
    problems = []
    for prefix in prefixes:
        try:
            config = gate.validate(experiment_rules(DATASETS[prefix]), list(args.passthrough), gate.SWEEP)
        except UsageError as exc:
            return [f'after "--", for {SCRIPTS[prefix]}: {exc}']
        for dest in sorted(config.given & set(grid)):
            problems.append(f'--{dest} is set for each configuration by the figure\'s grid; it '
                            f'cannot be passed after "--"')
        for dest in sorted(config.given & set(MANAGED_FLAGS)):
            problems.append(f'--{dest} is set per run by reproduce.py; it cannot be passed after '
                            f'"--"' + (' (use reproduce.py\'s own --embedding_seed, --embedding_dir or '
                                       '--vary_embedding, before "--")' if dest.startswith('embedding')
                                       else ''))
        for dest in PATH_DESTS:  # appended last, so that they win (argparse keeps the last value)
            if dest in config.given and not os.path.isabs(getattr(config, dest)):
                flag = [f'--{dest}', os.path.abspath(getattr(config, dest))]
                if flag[0] not in args.absolute_paths:
                    args.absolute_paths += flag
    return list(dict.fromkeys(problems))


# ----------------------------------------------------------------------------
# Existing files: done only at the sweep's protocol
# ----------------------------------------------------------------------------

def protocol_problems(all_runs, root) -> list[tuple[SweepRun, str, str]]:
    """Existing pickles and resume states of the sweep's runs whose protocol is not the one the
    sweep would run: [(run, path relative to root, what differs)]."""
    problems = []
    for run in all_runs:
        existing = [path for path in run.pickles + [run.resume_state]
                    if path and os.path.lexists(os.path.join(root, path))]
        if not existing:
            continue
        want = of_command(run.dataset, run.args)
        for path in existing:
            have, unreadable = protocol_comparison.of_file(os.path.join(root, path), run.dataset)
            if unreadable:
                problems.append((run, path, unreadable))
                continue
            differing = protocol_comparison.differences(have, want)
            if differing:
                problems.append((run, path, '; '.join(
                    f'{key} {protocol_comparison.show(key, mine)} (this sweep: {protocol_comparison.show(key, theirs)})'
                    for key, mine, theirs in differing)))
    return problems


def companions(run: SweepRun, path: str) -> list[str]:
    """A mismatched file and what belongs to it: its metrics, its checkpoints, the run's log."""
    items = [path]
    if path.endswith('.pkl'):
        items.append(os.path.splitext(path)[0] + gate.metrics_name(''))
        items.append(run.checkpoints[run.pickles.index(path)])
    else:
        items += [os.path.splitext(pickle)[0] + gate.metrics_name('') for pickle in run.pickles]
        items += run.checkpoints
    return items + [run.log]


def move_aside(problems, root, dry_run: bool = False) -> list[str]:
    """Move each mismatched file, with its metrics, checkpoints and log, into
    <results_root>/set_aside_<date>/, in the same layout (the readers of results skip such
    folders). Never deletes anything; with dry_run, only says what it would move."""
    folder = os.path.join(root, f'{recorded_runs.SET_ASIDE_PREFIX}{datetime.datetime.now().strftime("%Y%m%d-%H%M%S")}')
    moved = []
    for run, path, _ in problems:
        for item in companions(run, path):
            source = os.path.join(root, item)
            if not os.path.lexists(source) or item in moved:
                continue
            target = os.path.join(folder, item)
            if not dry_run:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.move(source, target)
            moved.append(item)
            print(f'{"# would move" if dry_run else "moved"} {item} to {os.path.relpath(target, root)}')
    return moved


def runs_to_do(all_runs, root, args) -> list[SweepRun]:
    """The runs still to do. A run whose pickles all exist is done (a diverged run writes one
    too); a batched run with some of its members done runs the rest; a run that was interrupted
    left a resume state, which the script refuses to overwrite: it continues with --resume."""
    todo = []
    for run in all_runs:
        missing = [seed for seed, path in zip(run.seeds, run.pickles)
                   if not os.path.exists(os.path.join(root, path))]
        resume = bool(run.resume_state) and os.path.exists(os.path.join(root, run.resume_state))
        if not missing and not resume:
            run.status = 'skipped'
            print(f'# skip {run.name}: {", ".join(run.pickles)} exist{"s" * (len(run.pickles) == 1)}')
            continue
        if missing != run.seeds and not resume:
            print(f'# {run.name}: only seed(s) {" ".join(map(str, missing))} still to do')
            vars(run).update(vars(make_run(run.figure, run.config, missing, args)))
        if resume:
            run.args.append('--resume')
            print(f'# resume {run.name}: {run.resume_state} exists')
        todo.append(run)
    return todo


def select_shard(runs_by_figure, figures, shard):
    """This machine's share: every N-th run of the whole sweep, from the I-th on."""
    index, count = shard
    numbered = list(enumerate(run for figure in figures for run in runs_by_figure[figure]))
    if count > len(numbered):
        raise UsageError(f'--shard {index}/{count}: the sweep has only {len(numbered)} run(s), so '
                         f'some shards would be empty; use at most {len(numbered)} shards')
    mine = {id(run) for number, run in numbered if number % count == index - 1}
    return {figure: [run for run in runs if id(run) in mine] for figure, runs in runs_by_figure.items()}
