"""Run the seed sweeps behind Figures 1a, 1b, 2 and 3, then plot them.

Each process trains one configuration for one seed, or for several seeds side by side as one
batched model (``--batch_seeds K``: ``MNIST_experiments.py --seeds``); either way every seed has
its own results pickle, checkpoint and log::

    MNIST_experiments/fig1a/RKHS_l5_p0_s3.pkl      results (read by plot_figures.py)
    MNIST_experiments/fig1a/logs/RKHS_l5_p0_s3.log stdout + stderr of every attempt
    MNIST_checkpoint/fig1a/RKHS_l5_p0_s3.pth       best checkpoint
    MNIST_experiments/fig1a/sweep.json             manifest: settings, commands, outcomes
    MNIST_experiments/fig1a/figure1a.png           the figure, beside its runs

A sweep continues where it stopped. A run whose pickles exist is done, but only if their
protocol record (protocol.py) is the one this sweep would run: otherwise the sweep names each
such file and field and exits 2 before starting anything (``--move_aside`` moves them into a
dated folder; nothing is ever deleted). A run that was interrupted left a resume state, checked
the same way and continued with ``--resume``, whatever ``--batch_seeds`` says now. A run held by
another process is "running elsewhere", not a failure.

The runs follow the release's stored protocol by default (``--protocol``). MNIST runs load the
release's embedding files (``--embedding_dir``, default the repository's folder) and otherwise
share one drawn embedding (``--embedding_seed``) unless ``--vary_embedding`` is given.
``--shard I/N`` runs one of N disjoint parts, for a job array over several machines.

Examples::

    python reproduce.py figure1a --num_seeds 20 --gpus 0          # 20 seeds per process on the GPU
    python reproduce.py all --dry_run
    python reproduce.py figure2 --num_seeds 2 --jobs 2 -- --epochs 3 --subset 2048
    python reproduce.py all --num_seeds 20 --gpus 0 --shard 2/4   # machine 2 of 4
"""

import argparse
import datetime
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field

import common
import embeddings
import protocol
import scheduler

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
# Folder of the experiment scripts the sweep launches (tests point it at stand-ins; the protocol
# a run would record is always read from the real scripts' flags).
SCRIPT_DIR = REPO_DIR
FIGURES = common.FIGURES

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130

# Flags that reproduce.py sets for each run and that must not be passed through.
MANAGED_FLAGS = ('seed', 'seeds', 'results_dir', 'save', 'checkpoint', 'embedding_seed',
                 'embedding_dir', 'resume')
# Seeds per process on GPUs when --batch_seeds is not given: all seeds of a configuration up to
# 20, the paper's count. A choice for the GPU (20 members fill it far better than one), not a
# measurement: no GPU was available to measure it (see docs/performance.md).
DEFAULT_GPU_BATCH_SEEDS = 20
SEED_LIMIT = 2 ** 63  # the scripts' --seed range

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



@dataclass
class Run(scheduler.Job):
    """One process of the sweep: one seed, or several trained side by side (--seeds)."""
    figure: str = ''
    config: common.Configuration = None
    seeds: list = field(default_factory=list)  # one, or the members of a batched run
    checkpoints: list = field(default_factory=list)  # one per seed, relative to results_root
    resume_state: str = ''  # an interrupted run's state, relative to results_root

    @property
    def dataset(self):
        """The dataset name of the protocol record: MNIST, CIFAR10 or SYNTHETIC."""
        if self.figure == SYNTHETIC:
            return protocol.SYNTHETIC
        prefix = common.figure_folder_prefix(self.config.shared_from or self.figure)
        return 'CIFAR10' if prefix == 'CIFAR' else prefix


# ----------------------------------------------------------------------------
# The runs of a figure
# ----------------------------------------------------------------------------

def _embedding_dir(args):
    """Where the runs load the release's embedding files from: reproduce.py's --embedding_dir,
    or the experiment script's default (the repository's), which the runs use untold."""
    if args.embedding_dir in (None, embeddings.NO_EMBEDDING_DIR):
        return args.embedding_dir or embeddings.DEFAULT_PATH
    return os.path.abspath(args.embedding_dir)


def describe_embedding(figures, args):
    """Which MNIST configurations load the release's files and which draw from a seed. With
    --embedding_dir given, a missing or unusable file is refused here (EmbeddingError), once,
    before any run, as each run would refuse it."""
    explicit = args.embedding_dir not in (None, embeddings.NO_EMBEDDING_DIR)
    pairs = dict.fromkeys((config.channels, config.pretrain) for figure in figures
                          for config in selected_configurations(figure, args) if config.dataset == 'MNIST')
    directory = _embedding_dir(args)
    found, drawn = [], []
    for pair in pairs:
        try:
            paths = embeddings.find(directory, *pair, required=explicit and embeddings.release_ships(*pair))
        except embeddings.EmbeddingError:
            if explicit:
                raise
            paths = None  # the run itself says why it refuses the default folder's file
        (found if paths else drawn).append(pair)
    parts = []
    if found:
        parts.append(f'release files from {directory} for '
                     + ', '.join(f'{c} channels/{p} passes' for c, p in found))
    if drawn:
        seed = ('a seed of its own (--vary_embedding)' if args.vary_embedding
                else f'--embedding_seed {args.embedding_seed}')
        parts.append(f'{seed} for ' + ', '.join(f'{c} channels/{p} passes' for c, p in drawn))
    return '; '.join(parts)


def results_dir(figure):
    """Results folder of a figure, relative to results_root."""
    if figure == SYNTHETIC:
        return SYNTHETIC_RESULTS
    return os.path.join(f'{common.figure_folder_prefix(figure)}_experiments', common.figure_tag(figure))


def seeds_per_process(figure, args):
    """--batch_seeds, or its default: 1 on CPU, DEFAULT_GPU_BATCH_SEEDS with --gpus. Figure 3's
    CIFAR script trains one seed per process."""
    if common.figure_folder_prefix(figure) != 'MNIST':
        return 1
    if args.batch_seeds is not None:
        return args.batch_seeds
    return DEFAULT_GPU_BATCH_SEEDS if args.gpus else 1


def selected_configurations(figure, args):
    """The figure's configurations, or those named by --configs."""
    grid = common.figure_grid(figure)
    return grid if not args.configs else [config for config in grid if config.name in args.configs]


def build_runs(figure, args, root):
    """All runs of one figure, configuration-major.

    An interrupted batch of seeds is continued as it was saved, whatever --batch_seeds says now
    (its resume state belongs to exactly those seeds). The other seeds of a configuration go in
    groups of seeds_per_process, one process per group, so that --shard splits the same list
    whatever has finished already.
    """
    seeds = list(range(args.seed_start, args.seed_start + args.num_seeds))
    size = seeds_per_process(figure, args)
    runs = []
    for config in selected_configurations(figure, args):
        saved = saved_batches(figure, config, root, seeds)
        runs += [make_run(figure, config, batch, args) for batch in saved]
        rest = [seed for seed in seeds if not any(seed in batch for batch in saved)]
        runs += [make_run(figure, config, rest[start:start + size], args)
                 for start in range(0, len(rest), size)]
    return runs


def saved_batches(figure, config, root, seeds):
    """The seed lists of this configuration's interrupted runs (their resume states) that lie
    within `seeds`: each is continued as one process."""
    out_dir = os.path.join(root, results_dir(config.shared_from or figure))
    return [batch for _, batch in common.batch_states(out_dir, config.name) if set(batch) <= set(seeds)]


def make_run(figure, config, seeds, args):
    """The subprocess that trains `seeds` of one configuration: `--seed S` alone, or `--seeds` for
    several, whose member files have the same names as the single runs'."""
    # A configuration shared with another figure is that figure's run, in that figure's folder.
    owner = config.shared_from or figure
    dataset, out_dir = common.figure_folder_prefix(owner), results_dir(owner)
    ckpt_dir = os.path.join(f'{dataset}_checkpoint', common.figure_tag(owner))
    name = f'{config.name}_s{"-".join(map(str, seeds))}'
    stem, seed_flags = (name, ['--seed', str(seeds[0])]) if len(seeds) == 1 else \
        (config.name, ['--seeds', *map(str, seeds)])
    run_args = config.flags() + [
        *PROTOCOLS[args.protocol][dataset], *seed_flags,
        '--results_dir', out_dir, '--save', stem + '.pkl',
        '--checkpoint', os.path.join(ckpt_dir, stem + '.pth'),
    ]
    # Only the MNIST model has an embedding: the release's files where they exist (as the
    # release's stored runs), else one drawn from a seed shared by all runs.
    if dataset == 'MNIST':
        if args.embedding_dir is not None:
            run_args += ['--embedding_dir', _embedding_dir(args)]
        if not args.vary_embedding:
            run_args += ['--embedding_seed', str(args.embedding_seed)]
    if args.gpus:
        run_args += ['--device', 'cuda']
    # Last, so that a pass-through flag overrides ours (argparse keeps the last occurrence).
    run_args += list(args.passthrough) + list(args.absolute_paths)
    return Run(name=name, script=os.path.join(SCRIPT_DIR, f'{dataset}_experiments.py'), args=run_args,
               pickles=[os.path.join(out_dir, f'{config.name}_s{seed}.pkl') for seed in seeds],
               log=os.path.join(out_dir, 'logs', name + '.log'), figure=figure, config=config,
               seeds=list(seeds),
               checkpoints=[os.path.join(ckpt_dir, f'{config.name}_s{seed}.pth') for seed in seeds],
               resume_state=os.path.join(out_dir, common.resume_state_name(
                   stem, seeds if len(seeds) > 1 else None)))


# ----------------------------------------------------------------------------
# The synthetic experiment (synthetic_experiments.py): python reproduce.py synthetic
# ----------------------------------------------------------------------------

SYNTHETIC = 'synthetic'
SYNTHETIC_RESULTS = os.path.join('synthetic_experiments', 'sweep')
# The synthetic script's flags that the sweep's grid sets (argparse destinations).
SYNTHETIC_GRID_DESTS = ('model', 'dim', 'dim_int', 'nu', 'num_layers', 'matrix')


def synthetic_configurations():
    """(name, flags) of each curve: RKHS for q in {2, 4, 8} and r in {20, 200}, with Gaussian
    (nu = -1) and Student-t (nu = 1) features; SHL at q = r in {2, 4, 8} for comparison."""
    rkhs = [(f'RKHS_q{q}_r{r}_{tag}', ['--model', 'RKHS', '--dim', str(q), '--dim_int', str(r), '--nu', str(nu)])
            for tag, nu in (('gauss', -1), ('t1', 1)) for q in (2, 4, 8) for r in (20, 200)]
    return rkhs + [(f'SHL_q{q}_r{q}', ['--model', 'SHL', '--dim', str(q), '--dim_int', str(q)]) for q in (2, 4, 8)]


def build_synthetic_runs(args):
    """One process per (configuration, seed), configuration-major, into SYNTHETIC_RESULTS. A run
    lasts seconds: it has no checkpoint and no resume state."""
    script = os.path.join(SCRIPT_DIR, 'synthetic_experiments.py')
    runs = []
    for config, flags in synthetic_configurations():
        if args.configs and config not in args.configs:
            continue
        for seed in range(args.seed_start, args.seed_start + args.num_seeds):
            name = f'{config}_s{seed}'
            run_args = flags + ['--seed', str(seed), '--results_dir', SYNTHETIC_RESULTS, '--save', f'{name}.pkl']
            run_args += (['--device', 'cuda'] if args.gpus else []) + list(args.passthrough)
            runs.append(Run(name=name, script=script, args=run_args,
                            pickles=[os.path.join(SYNTHETIC_RESULTS, f'{name}.pkl')],
                            log=os.path.join(SYNTHETIC_RESULTS, 'logs', f'{name}.log'),
                            figure=SYNTHETIC, seeds=[seed]))
    return runs


# ----------------------------------------------------------------------------
# Existing files: done only at the sweep's protocol
# ----------------------------------------------------------------------------

def protocol_problems(all_runs, root):
    """Existing pickles and resume states of the sweep's runs whose protocol is not the one the
    sweep would run: [(run, path relative to root, what differs)]."""
    problems = []
    for run in all_runs:
        existing = [path for path in run.pickles + [run.resume_state]
                    if path and os.path.lexists(os.path.join(root, path))]
        if not existing:
            continue
        want = protocol.of_command(run.dataset, run.args)
        for path in existing:
            have, unreadable = protocol.of_file(os.path.join(root, path), run.dataset)
            if unreadable:
                problems.append((run, path, unreadable))
                continue
            differing = protocol.differences(have, want)
            if differing:
                problems.append((run, path, '; '.join(
                    f'{key} {protocol.show(key, mine)} (this sweep: {protocol.show(key, theirs)})'
                    for key, mine, theirs in differing)))
    return problems


def move_aside(problems, root):
    """Move each mismatched file, with the checkpoints and log of its run, into
    <results_root>/set_aside_<date>/, in the same layout. Never deletes anything."""
    folder = os.path.join(root, f'set_aside_{datetime.datetime.now().strftime("%Y%m%d-%H%M%S")}')
    moved = []
    for run, path, _ in problems:
        companions = [path]
        if path.endswith('.pkl'):
            seed = run.seeds[run.pickles.index(path)]
            companions.append(run.checkpoints[run.seeds.index(seed)])
        else:
            companions += run.checkpoints
        companions.append(run.log)
        for item in companions:
            source = os.path.join(root, item)
            if not os.path.lexists(source) or item in moved:
                continue
            target = os.path.join(folder, item)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(source, target)
            moved.append(item)
            print(f'moved {item} to {os.path.relpath(target, root)}')
    return moved


def runs_to_do(all_runs, root, args):
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


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def _figure_name(text):
    name = text.lower()
    if name == SYNTHETIC:
        return name
    if name.startswith('fig') and not name.startswith('figure'):
        name = 'figure' + name[len('fig'):]  # fig1a, the results folder's name
    if not name.startswith('figure') and name != 'all':
        name = 'figure' + name  # accept "1a" as well as "figure1a"
    if name not in FIGURES + ('all',):
        raise argparse.ArgumentTypeError(f'unknown figure {text!r}; choose from {", ".join(FIGURES)} or all')
    return name


def _shard(text):
    try:
        index, count = (int(part) for part in text.split('/'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected I/N such as 2/3, got {text!r}') from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f'--shard I/N needs 1 <= I <= N, got {text!r}')
    return index, count


def _gpu_list(text):
    gpus = [item.strip() for item in text.split(',') if item.strip()]
    if not gpus or not all(item.isdigit() for item in gpus):
        raise argparse.ArgumentTypeError(f'expected GPU ids like 0,1,2; got {text!r}')
    return gpus


def _names(text):
    return [name for name in text.split(',') if name]


def get_args_parser():
    """Command-line parser (arguments after ``--`` are handled by parse_args)."""
    parser = common.OneLineArgumentParser(
        description='Run the seed sweep of a figure (each run a subprocess), then plot it. '
                    'Arguments after "--" are passed to every run.',
        usage='%(prog)s FIGURE [options] [-- experiment flags]')
    add = parser.add_argument
    add('figure', type=_figure_name,
        help='figure1a, figure1b, figure2, figure3 or all (also 1a or fig1a); synthetic: the synthetic '
             'experiment\'s sweep (not part of all)')
    add('--num_seeds', type=int, default=5, help='number of seeds per configuration (default: 5)')
    add('--seeds', type=int, dest='deprecated_seeds', default=None, metavar='N',
        help='deprecated spelling of --num_seeds')
    add('--seed_start', type=int, default=0, help='first seed (default: 0)')
    add('--configs', type=_names, default=None, metavar='NAME[,NAME...]',
        help='run only these configurations of the figure, by the name that starts their files '
             '(e.g. RKHS_l5_p0,SHL_l5_p0; --dry_run lists them)')
    add('--protocol', choices=tuple(PROTOCOLS), default='stored',
        help='MNIST training protocol: stored = the release\'s stored runs (40 epochs, x0.2 at 35, '
             'training error on 1,000 images); readme = its README (30 epochs, x0.1 at 25). '
             'Figure 3: 300 epochs, x0.1 at 260 either way (default: stored)')
    add('--embedding_dir', default=None,
        help='folder of the release\'s MNIST embedding files, given to every run: a run whose '
             'files are missing there then fails; "none": never load them (default: the runs\' '
             'own default, MNIST_pretrained_models in the repository, where a missing file makes '
             'the run draw its own embedding, with a warning)')
    add('--embedding_seed', type=int, default=0,
        help='seed of the MNIST embedding shared by the runs that load no release file (default: 0)')
    add('--vary_embedding', action='store_true',
        help='do not pass --embedding_seed: a run with no release file draws its own embedding')
    add('--gpus', type=_gpu_list, default=None,
        help='comma-separated GPU ids; runs get CUDA_VISIBLE_DEVICES and --device cuda')
    add('--per_gpu', type=int, default=4, help='concurrent runs per GPU with --gpus (default: 4)')
    add('--batch_seeds', type=int, default=None, metavar='K',
        help='MNIST seeds per process, trained side by side as one batched model '
             f'(MNIST_experiments.py --seeds); default 1 on CPU, {DEFAULT_GPU_BATCH_SEEDS} with --gpus')
    add('--shard', type=_shard, default=None, metavar='I/N',
        help='run only the I-th of N disjoint parts of the sweep (every N-th run from the I-th), '
             'e.g. one part per machine of a job array; any later run skips what exists and plots '
             'what is there')
    add('--jobs', type=int, default=1, help='concurrent CPU runs without --gpus (default: 1); each '
        'gets an equal share of the cores as OMP_NUM_THREADS, unless that is set already')
    add('--results_root', default=REPO_DIR,
        help='folder holding the results, checkpoint and log folders; runs start there '
             '(default: the repository)')
    add('--move_aside', action='store_true',
        help='move existing results made with another protocol than this sweep\'s (and their '
             'checkpoints and logs) into a dated set_aside_<date> folder, then run; default: refuse')
    add('--dry_run', action='store_true', help='print the commands, run and write nothing')
    add('--no_plot', action='store_true', help='do not plot after the runs')
    add('--pdf', action='store_true', help='also write PDF figures')
    parser.set_defaults(passthrough=[])
    return parser


def parse_args(argv=None):
    """Parse ``argv`` (default sys.argv[1:]); what follows ``--`` goes to every run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if '--' in argv:
        cut = argv.index('--')
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args = get_args_parser().parse_args(argv)
    args.argv, args.passthrough, args.absolute_paths = argv + ['--'] * bool(passthrough) + passthrough, passthrough, []
    if args.deprecated_seeds is not None:
        print('note: reproduce.py --seeds N is deprecated; it is --num_seeds N (the experiment '
              'scripts\' --seeds lists seeds)', file=sys.stderr)
        args.num_seeds = args.deprecated_seeds
    return args


def _check_args(args, figures):
    """Every rule on reproduce.py's own flags, before anything is built or written."""
    problems = []
    for name in ('num_seeds', 'jobs', 'per_gpu'):
        if getattr(args, name) < 1:
            problems.append(f'--{name} must be >= 1')
    if args.batch_seeds is not None and args.batch_seeds < 1:
        problems.append('--batch_seeds must be >= 1')
    if not 0 <= args.seed_start or args.seed_start + args.num_seeds > SEED_LIMIT:
        problems.append(f'--seed_start and --num_seeds must keep every seed in [0, 2^63), got '
                        f'{args.seed_start} .. {args.seed_start + args.num_seeds - 1}')
    if not 0 <= args.embedding_seed < SEED_LIMIT:
        problems.append(f'--embedding_seed must be in [0, 2^63), got {args.embedding_seed}')
    if figures == (SYNTHETIC,):
        unsupported = [flag for flag, value in (('--shard', args.shard), ('--batch_seeds', args.batch_seeds),
                                                ('--embedding_dir', args.embedding_dir),
                                                ('--vary_embedding', args.vary_embedding)) if value]
        if unsupported:
            problems.append(f'{", ".join(unsupported)}: not options of the synthetic sweep')
    if args.configs is not None:
        known = ({name for name, _ in synthetic_configurations()} if figures == (SYNTHETIC,) else
                 {config.name for figure in figures for config in common.figure_grid(figure)})
        unknown = [name for name in args.configs if name not in known]
        if unknown or not args.configs:
            problems.append(f'--configs: {", ".join(unknown) or "(empty)"} is not a configuration of '
                            f'{args.figure}; choose from {", ".join(sorted(known))}')
    if any(flag in ('-h', '--help') for flag in args.passthrough):
        problems.append('--help after "--" would go to every run; for the experiment flags, run '
                        'python MNIST_experiments.py --help (or CIFAR_experiments.py)')
    problems += scheduler.folder_problems(args.results_root, '--results_root')
    if args.gpus and not args.dry_run:
        problems += scheduler.gpu_problems(args.gpus)
    return problems


def _passthrough_problems(args, figures):
    """Flags after '--' that would contradict the sweep: a grid flag (say --layers 2 would
    make the runs named RKHS_l5, _l10 and _l20 all 2-layer runs) or a flag that reproduce.py
    sets per run (moving the pickle from where a rerun looks, or the shared embedding).

    The flags are read by the experiment script's own parser, so that every spelling counts:
    --layers, -l, an abbreviation like --lay, --layers=2. Relative paths become absolute.
    """
    if not args.passthrough:
        return []
    import importlib

    if REPO_DIR not in sys.path:
        sys.path.insert(0, REPO_DIR)
    problems = []
    scripts = ['synthetic'] if figures == (SYNTHETIC,) else sorted(
        {common.figure_folder_prefix(figure) for figure in figures})
    grid = SYNTHETIC_GRID_DESTS if figures == (SYNTHETIC,) else common.GRID_DESTS
    for prefix in scripts:
        parser = importlib.import_module(f'{prefix}_experiments').get_args_parser()
        try:
            parsed = parser.parse_args(args.passthrough)
        except SystemExit:  # the parser has printed its own one-line error
            return [f'the flags after "--" are not valid for {prefix}_experiments.py']
        given = parsed._given
        for dest in sorted(given & set(grid)):
            problems.append(f'--{dest} is set for each configuration by the figure\'s grid; it '
                            f'cannot be passed after "--"')
        for dest in sorted(given & set(MANAGED_FLAGS)):
            problems.append(f'--{dest} is set per run by reproduce.py; it cannot be passed after '
                            f'"--"' + (' (use reproduce.py\'s own --embedding_seed, --embedding_dir or '
                                       '--vary_embedding, before "--")' if dest.startswith('embedding')
                                       else ''))
        for dest in PATH_DESTS:  # appended last, so that they win (argparse keeps the last value)
            if dest in given and not os.path.isabs(getattr(parsed, dest)):
                flag = [f'--{dest}', os.path.abspath(getattr(parsed, dest))]
                if flag[0] not in args.absolute_paths:
                    args.absolute_paths += flag
    return list(dict.fromkeys(problems))


def _plot(figure, root, pdf):
    """Plot one figure from its runs' folders into its own folder, with plot_figures.main."""
    if REPO_DIR not in sys.path:
        sys.path.insert(0, REPO_DIR)
    import plot_figures
    folders = [os.path.join(root, folder) for folder in (
        [SYNTHETIC_RESULTS] if figure == SYNTHETIC else common.figure_folders(figure))]
    plot_args = [*[folder for folder in folders if os.path.isdir(folder)],
                 '--figure', figure.replace('figure', ''),
                 '--out_dir', os.path.join(root, results_dir(figure))]
    return plot_figures.main(plot_figures.get_args_parser().parse_args(plot_args + ['--pdf'] * pdf))


def _manifest(root, figure, runs, args, started, finished=None):
    """This invocation in <figure's results folder>/sweep.json, after the earlier ones."""
    scheduler.write_manifest(os.path.join(root, results_dir(figure), 'sweep.json'), {'figure': figure}, runs,
                             args.argv, root, started, finished)


def _select_shard(runs_by_figure, figures, shard):
    """This machine's share: every N-th run of the whole sweep, from the I-th on."""
    index, count = shard
    numbered = list(enumerate(run for figure in figures for run in runs_by_figure[figure]))
    if count > len(numbered):
        raise ValueError(f'--shard {index}/{count}: the sweep has only {len(numbered)} run(s), so '
                         f'some shards would be empty; use at most {len(numbered)} shards')
    mine = {id(run) for number, run in numbered if number % count == index - 1}
    return {figure: [run for run in runs if id(run) in mine] for figure, runs in runs_by_figure.items()}


def main(args):
    """Run (or print, with --dry_run) the sweep, then plot; return an exit status."""
    figures = FIGURES if args.figure == 'all' else (args.figure,)  # 'all': the paper's figures
    problems = _check_args(args, figures) or _passthrough_problems(args, figures)
    if problems:
        print('error: ' + '; '.join(problems), file=sys.stderr)
        return EXIT_USAGE
    sweep_start = time.time()
    root = os.path.abspath(args.results_root)
    runs_by_figure, seen = {}, set()
    for figure in figures:  # a run shared by two figures (Figure 2's C=32 is 1a's) runs once
        built = build_synthetic_runs(args) if figure == SYNTHETIC else build_runs(figure, args, root)
        runs_by_figure[figure] = [run for run in built if run.log not in seen]
        seen.update(run.log for run in runs_by_figure[figure])
    try:
        embedding = '' if figures == (SYNTHETIC,) else describe_embedding(figures, args)
        if args.shard:
            runs_by_figure = _select_shard(runs_by_figure, figures, args.shard)
        mismatched = protocol_problems([run for runs in runs_by_figure.values() for run in runs], root)
    except (ValueError, embeddings.EmbeddingError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return EXIT_USAGE
    if mismatched and not (args.move_aside and not args.dry_run):
        for run, path, why in mismatched:
            print(f'error: {path} was not made with this sweep\'s protocol: {why}', file=sys.stderr)
        print(f'error: {len(mismatched)} existing file(s) of another protocol; nothing was run. '
              f'Rerun with --move_aside to move them into a dated folder, or use another '
              f'--results_root', file=sys.stderr)
        return EXIT_USAGE
    if mismatched:
        move_aside(mismatched, root)
    all_runs = [run for figure in figures for run in runs_by_figure[figure]]

    if args.dry_run:
        print(f'# cwd: {root}')
        if any(figure != 'figure3' for figure in figures):
            print(f'# MNIST embedding: {embedding}')
        if args.gpus:
            print(f'# each run gets CUDA_VISIBLE_DEVICES set to one of {",".join(args.gpus)}')
    todo = runs_to_do(all_runs, root, args)
    if args.dry_run:
        for run in todo:
            print(shlex.join(run.command()))
        print(f'# {len(todo)} run(s) to do, {len(all_runs) - len(todo)} skipped')
        return EXIT_OK

    missing_scripts = sorted({run.script for run in todo if not os.path.exists(run.script)})
    if missing_scripts:
        print(f'error: experiment script not found: {", ".join(missing_scripts)}', file=sys.stderr)
        return EXIT_USAGE
    os.makedirs(root, exist_ok=True)
    if any(figure != 'figure3' for figure in figures):
        print(f'MNIST embedding: {embedding}')
    for figure in figures:
        _manifest(root, figure, runs_by_figure[figure], args, sweep_start)
    slots = scheduler.make_slots(args)
    print(f'{len(todo)} run(s) to do, {len(all_runs) - len(todo)} skipped; '
          f'{len(slots)} at a time', flush=True)

    interrupted = scheduler.run_all_handling_sigterm(todo, root, slots)
    finished = time.time()
    for figure in figures:
        _manifest(root, figure, runs_by_figure[figure], args, sweep_start, finished)
    return _report(todo, all_runs, figures, root, args, sweep_start, interrupted)


def _report(todo, all_runs, figures, root, args, sweep_start, interrupted):
    """The sweep's outcome, the plots, and its exit status (1 when a run failed)."""
    status = EXIT_OK
    by_status = {name: [run for run in todo if run.status == name]
                 for name in ('diverged', 'failed', 'running elsewhere')}
    if by_status['diverged']:
        print(f'{len(by_status["diverged"])} run(s) diverged (pickle written, curves stop early): '
              + ', '.join(run.name for run in by_status['diverged']))
    if by_status['running elsewhere']:
        print(f'{len(by_status["running elsewhere"])} run(s) are running in another process; a '
              f'later sweep picks up their results: '
              + ', '.join(run.name for run in by_status['running elsewhere']))
    if by_status['failed']:
        print(f'{len(by_status["failed"])} run(s) FAILED:')
        for run in by_status['failed']:
            print(f'  {run.name}: {run.extra.get("reason")}; log: {os.path.join(root, run.log)}')
        status = 1
    if interrupted:
        print(f'sweep interrupted after {time.time() - sweep_start:.1f} s')
        return EXIT_INTERRUPTED
    if not args.no_plot:
        for figure in figures:
            if _plot(figure, root, args.pdf) != 0:
                status = 1
    print(f'sweep wall time: {time.time() - sweep_start:.1f} s '
          f'({len(todo)} run(s), {len(all_runs) - len(todo)} skipped)')
    return status


if __name__ == '__main__':
    sys.exit(main(parse_args()))
