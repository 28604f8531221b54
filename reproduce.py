"""Run the seed sweeps behind Figures 1a, 1b, 2 and 3, then plot them.

Each process trains one configuration for one seed, or for several seeds side by side as one
batched model (``--batch_seeds K``: ``MNIST_experiments.py --seeds``); either way every seed has
its own results pickle, checkpoint and log::

    MNIST_experiments/fig1a/RKHS_l5_p0_s3.pkl      results (read by plot_figures.py)
    MNIST_experiments/fig1a/logs/RKHS_l5_p0_s3.log stdout + stderr of the process
    MNIST_checkpoint/fig1a/RKHS_l5_p0_s3.pth       best checkpoint
    MNIST_experiments/fig1a/sweep.json             manifest: settings and commands

The sweep is resumable: a process whose pickles exist is skipped, and one that was interrupted
(it left ``<name>.resume.pt``) is continued with ``--resume``. The runs follow the release's
stored protocol by default (``--protocol``); MNIST runs load the release's embedding files
where they exist (``--embedding_dir``), and otherwise share one drawn embedding
(``--embedding_seed``, default 0) unless ``--vary_embedding`` is given. ``--shard I/N`` runs
one of N disjoint parts, for a job array over several machines.

Examples::

    python reproduce.py figure1a --seeds 20 --gpus 0            # 20 seeds per process on the GPU
    python reproduce.py all --dry_run
    python reproduce.py figure2 --seeds 2 --jobs 2 -- --epochs 3 --subset 2048
    python reproduce.py all --seeds 20 --gpus 0 --shard 2/4     # machine 2 of 4
"""

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import common
import embeddings

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
# Folder of MNIST_experiments.py and CIFAR_experiments.py (tests point it at
# stand-in scripts).
SCRIPT_DIR = REPO_DIR
FIGURES = common.FIGURES

# Exit codes of the experiment scripts.
EXIT_OK = 0
EXIT_DIVERGED = 3  # the pickle was written (with diverged=True): the run is done
EXIT_INTERRUPTED = 130

# An interrupted run leaves <results_dir>/<save stem>.resume.pt; the scripts
# continue it only when given --resume.
RESUME_SUFFIX = '.resume.pt'

# Flags that reproduce.py sets for each run and that must not be passed through.
MANAGED_FLAGS = ('seed', 'seeds', 'results_dir', 'save', 'checkpoint', 'embedding_seed',
                 'embedding_dir', 'resume')
# Seeds per process on GPUs when --batch_seeds is not given: all seeds of a configuration up to
# 20, the paper's count. Chosen for the GPU target (20 members fill a GPU far better than one);
# not measured here, where no GPU was available (see README).
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

POLL_SECONDS = 0.2  # how often the scheduler checks its running subprocesses
TERMINATE_GRACE_SECONDS = 10  # on Ctrl-C, wait this long before SIGKILL


@dataclass
class Run:
    """One subprocess of the sweep: one seed, or several trained side by side (--seeds)."""
    figure: str
    config: common.Configuration
    seeds: list         # one, or the members of a batched run
    name: str           # e.g. RKHS_l5_p0_s3, or RKHS_l5_p0_s0-1-2-3 for a batch
    script: str         # absolute path of the experiment script
    args: list          # arguments after the script path
    pickles: list       # one per seed, relative to results_root
    log: str            # relative to results_root
    resume_state: str   # where the script keeps an interrupted run's state, relative to results_root
    status: str = 'pending'
    returncode: object = None
    seconds: object = None
    extra: dict = field(default_factory=dict)

    def command(self):
        """Full argv of the run."""
        return [sys.executable, self.script] + self.args


def figure_settings(figure):
    """Dataset folder prefix, results folder tag and configurations (common.figure_grid)."""
    return common.figure_folder_prefix(figure), common.figure_tag(figure), common.figure_grid(figure)


def _embedding_dir(args):
    """The folder the runs load the release's embedding files from: reproduce.py's
    --embedding_dir, or the experiment script's default (the repository's), which the runs then
    use without being told."""
    if args.embedding_dir is None:
        return embeddings.DEFAULT_PATH
    if args.embedding_dir == embeddings.NO_EMBEDDING_DIR:
        return args.embedding_dir
    return os.path.abspath(args.embedding_dir)


def describe_embedding(figures, args):
    """Which MNIST configurations load the release's files and which draw from a seed."""
    pairs = list(dict.fromkeys((config.channels, config.pretrain) for figure in figures
                               for config in common.figure_grid(figure) if config.dataset == 'MNIST'))
    directory = _embedding_dir(args)
    found = [pair for pair in pairs if embeddings.find(directory, *pair, required=False)]
    drawn = [pair for pair in pairs if pair not in found]
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
    dataset, tag, _ = figure_settings(figure)
    return os.path.join(f'{dataset}_experiments', tag)


def seeds_per_process(figure, args):
    """--batch_seeds, or its default: 1 on CPU, DEFAULT_GPU_BATCH_SEEDS with --gpus. Figure 3's
    CIFAR script trains one seed per process."""
    if common.figure_folder_prefix(figure) != 'MNIST':
        return 1
    if args.batch_seeds is not None:
        return args.batch_seeds
    return DEFAULT_GPU_BATCH_SEEDS if args.gpus else 1


def build_runs(figure, args):
    """All runs of one figure, configuration-major: each configuration's seeds in groups of
    seeds_per_process, one process per group. The groups depend on the full seed list only, so
    that --shard splits the same list whatever has run already."""
    seeds = list(range(args.seed_start, args.seed_start + args.num_seeds))
    size = seeds_per_process(figure, args)
    return [make_run(figure, config, seeds[start:start + size], args)
            for config in selected_configurations(figure, args) for start in range(0, len(seeds), size)]


def selected_configurations(figure, args):
    """The figure's configurations, or those named by --configs."""
    grid = common.figure_grid(figure)
    return grid if not args.configs else [config for config in grid if config.name in args.configs]


def make_run(figure, config, seeds, args):
    """The subprocess that trains `seeds` of one configuration: `--seed S` alone, or `--seeds` for
    several, whose member files have the same names as the single runs'."""
    # A configuration shared with another figure is that figure's run, in that figure's folder.
    dataset, tag, _ = figure_settings(config.shared_from or figure)
    out_dir = os.path.join(f'{dataset}_experiments', tag)
    ckpt_dir = os.path.join(f'{dataset}_checkpoint', tag)
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
    return Run(figure=figure, config=config, seeds=list(seeds), name=name,
               script=os.path.join(SCRIPT_DIR, f'{dataset}_experiments.py'), args=run_args,
               pickles=[os.path.join(out_dir, f'{config.name}_s{seed}.pkl') for seed in seeds],
               log=os.path.join(out_dir, 'logs', name + '.log'),
               resume_state=os.path.join(out_dir, common.resume_state_name(
                   stem, seeds if len(seeds) > 1 else None)))


# ----------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------

def _atomic_write_json(path, data):
    common.atomic_write(path, lambda stream: (json.dump(data, stream, indent=1), stream.write('\n')),
                        binary=False)


def write_manifest(root, figure, runs, args, started, finished=None):
    """Record this invocation in <results_dir>/sweep.json (history kept).

    Returns the previous invocation's embedding setting, if any, so that the
    caller can warn when pickles of one figure mix embeddings.
    """
    path = os.path.join(root, results_dir(figure), 'sweep.json')
    previous = None
    try:
        with open(path) as stream:
            previous = json.load(stream)
    except (OSError, ValueError):
        previous = None
    history = previous.get('invocations', []) if isinstance(previous, dict) else []
    invocation = {
        'started_unix': started,
        'started': time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(started)),
        'finished': (time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(finished))
                     if finished else None),
        'embedding_seed': None if args.vary_embedding else args.embedding_seed,
        'vary_embedding': bool(args.vary_embedding),
        'seeds': list(range(args.seed_start, args.seed_start + args.num_seeds)),
        'configs': args.configs,
        'passthrough': list(args.passthrough),
        'gpus': args.gpus,
        'batch_seeds': args.batch_seeds,
        'shard': '/'.join(map(str, args.shard)) if args.shard else None,
        'cwd': root,
        'runs': [{'name': run.name, 'command': run.command(), 'status': run.status,
                  'returncode': run.returncode, 'seconds': run.seconds,
                  'pickles': run.pickles, 'log': run.log} for run in runs],
    }
    # This invocation's entry (written at its start) is replaced, not repeated.
    if history and history[-1].get('started_unix') == started:
        history = history[:-1]
    data = {'figure': figure, 'embedding_seed': invocation['embedding_seed'],
            'vary_embedding': invocation['vary_embedding'],
            'invocations': history + [invocation]}
    _atomic_write_json(path, data)
    if history:
        return (history[-1].get('embedding_seed'), history[-1].get('vary_embedding'))
    return None


# ----------------------------------------------------------------------------
# Scheduler
# ----------------------------------------------------------------------------

def make_slots(args):
    """One entry per concurrent run: a GPU id (str) or None for CPU."""
    if args.gpus:
        return [gpu for gpu in args.gpus for _ in range(args.per_gpu)]
    return [None] * args.jobs


def _launch(run, root, gpu):
    log_path = os.path.join(root, run.log)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ)
    env['PYTHONUNBUFFERED'] = '1'  # live logs
    if gpu is not None:
        env['CUDA_VISIBLE_DEVICES'] = gpu
    log = open(log_path, 'w')
    log.write(f'# cwd: {root}\n')
    if gpu is not None:
        log.write(f'# CUDA_VISIBLE_DEVICES={gpu}\n')
    log.write('# ' + shlex.join(run.command()) + '\n')
    log.flush()
    try:
        process = subprocess.Popen(run.command(), cwd=root, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except BaseException:
        log.close()
        raise
    return process, log


def _finish(run, returncode, root, started):
    run.returncode = returncode
    run.seconds = round(time.time() - started, 2)
    has_pickle = all(os.path.exists(os.path.join(root, path)) for path in run.pickles)
    if returncode == EXIT_OK and has_pickle:
        run.status = 'done'
    elif returncode == EXIT_DIVERGED and has_pickle:
        run.status = 'diverged'  # finished; its curves stop early
    else:
        run.status = 'failed'
        if returncode in (EXIT_OK, EXIT_DIVERGED):
            run.extra['reason'] = f'exit {returncode} but a pickle is missing: {", ".join(run.pickles)}'


def run_all(runs, root, slots):
    """Run ``runs`` with at most len(slots) at once; return True if interrupted.

    Each run gets the first free slot (a GPU id or None for CPU). A failed run
    does not stop the others.
    """
    pending = list(runs)
    running = {}  # slot index -> (run, process, log file, start time)
    total, launched = len(runs), 0
    try:
        while pending or running:
            for slot, gpu in enumerate(slots):
                if slot in running or not pending:
                    continue
                run = pending.pop(0)
                launched += 1
                try:
                    process, log = _launch(run, root, gpu)
                except OSError as exc:  # e.g. unwritable log folder: this run fails alone
                    run.status, run.extra['reason'] = 'failed', f'could not start: {exc}'
                    print(f'[{launched}/{total}] failed to start {run.name}: {exc}', flush=True)
                    continue
                run.status = 'running'
                running[slot] = (run, process, log, time.time())
                where = f' on GPU {gpu}' if gpu is not None else ''
                print(f'[{launched}/{total}] start {run.name}{where}', flush=True)
            time.sleep(POLL_SECONDS)
            for slot in list(running):
                run, process, log, started = running[slot]
                returncode = process.poll()
                if returncode is None:
                    continue
                log.close()
                del running[slot]
                _finish(run, returncode, root, started)
                message = f'{run.status} {run.name} (exit {returncode}, {run.seconds:.1f} s)'
                if run.status == 'failed':
                    message += f', log: {os.path.join(root, run.log)}'
                print(message, flush=True)
    except KeyboardInterrupt:
        print('interrupted: stopping the running runs', flush=True)
        for run, process, log, started in running.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.time() + TERMINATE_GRACE_SECONDS
        for run, process, log, started in running.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
            run.status, run.returncode = 'interrupted', process.returncode
        return True
    return False


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_all_handling_sigterm(runs, root, slots):
    """run_all, with SIGTERM stopping the runs like Ctrl-C instead of orphaning them."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        return run_all(runs, root, slots)
    try:
        return run_all(runs, root, slots)
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def _figure_name(text):
    name = text.lower()
    if name.startswith('fig') and not name.startswith('figure'):
        name = 'figure' + name[len('fig'):]  # fig1a, the results folder's name
    if not name.startswith('figure') and name != 'all':
        name = 'figure' + name  # accept "1a" as well as "figure1a"
    if name not in FIGURES + ('all',):
        raise argparse.ArgumentTypeError(
            f'unknown figure {text!r}; choose from {", ".join(FIGURES)} or all')
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


def get_args_parser():
    """Command-line parser (arguments after ``--`` are handled by parse_args)."""
    parser = argparse.ArgumentParser(
        description='Run the seed sweep of a figure (each run a subprocess), then plot it. '
                    'Arguments after "--" are passed to every run.',
        usage='%(prog)s FIGURE [options] [-- experiment flags]')
    parser.add_argument('figure', type=_figure_name,
                        help='figure1a, figure1b, figure2, figure3 or all (also 1a or fig1a)')
    parser.add_argument('--num_seeds', type=int, default=5,
                        help='number of seeds per configuration (default: 5)')
    parser.add_argument('--seeds', type=int, dest='deprecated_seeds', default=None, metavar='N',
                        help='deprecated spelling of --num_seeds')
    parser.add_argument('--seed_start', type=int, default=0, help='first seed (default: 0)')
    parser.add_argument('--configs', type=lambda text: [name for name in text.split(',') if name],
                        default=None, metavar='NAME[,NAME...]',
                        help='run only these configurations of the figure, by the name that '
                             'starts their files (e.g. RKHS_l5_p0,SHL_l5_p0; see --dry_run)')
    parser.add_argument('--protocol', choices=tuple(PROTOCOLS), default='stored',
                        help='MNIST training protocol: stored = the release\'s stored runs (40 '
                             'epochs, x0.2 at 35); readme = its README (30 epochs, x0.1 at 25). '
                             'Figure 3: 300 epochs, x0.1 at 260 either way (default: stored)')
    parser.add_argument('--embedding_dir', default=None,
                        help='folder of the release\'s MNIST embedding files, given to every run: '
                             'a run whose files are missing there then fails; "none": never load '
                             'them (default: the runs\' own default, MNIST_pretrained_models in '
                             'the repository, where a missing file makes the run draw its own '
                             'embedding with a warning)')
    parser.add_argument('--embedding_seed', type=int, default=0,
                        help='seed of the MNIST embedding shared by the runs that find no release '
                             'file (default: 0)')
    parser.add_argument('--vary_embedding', action='store_true',
                        help='do not pass --embedding_seed: a run with no release file draws its '
                             'own embedding')
    parser.add_argument('--gpus', type=_gpu_list, default=None,
                        help='comma-separated GPU ids; runs get CUDA_VISIBLE_DEVICES and '
                             '--device cuda')
    parser.add_argument('--per_gpu', type=int, default=4,
                        help='concurrent runs per GPU with --gpus (default: 4)')
    parser.add_argument('--batch_seeds', type=int, default=None, metavar='K',
                        help='MNIST seeds per process, trained side by side as one batched model '
                             f'(MNIST_experiments.py --seeds); default 1 on CPU, '
                             f'{DEFAULT_GPU_BATCH_SEEDS} with --gpus')
    parser.add_argument('--shard', type=_shard, default=None, metavar='I/N',
                        help='run only the I-th of N disjoint parts of the sweep (every N-th run '
                             'from the I-th), e.g. one part per machine of a job array; any later '
                             'run skips what exists and plots what is there')
    parser.add_argument('--jobs', type=int, default=1,
                        help='concurrent CPU runs without --gpus (default: 1)')
    parser.add_argument('--results_root', default=REPO_DIR,
                        help='folder holding the results, checkpoint, log and figure folders; '
                             'runs start there (default: the repository)')
    parser.add_argument('--dry_run', action='store_true',
                        help='print the commands, run and write nothing')
    parser.add_argument('--no_plot', action='store_true', help='do not plot after the runs')
    parser.add_argument('--pdf', action='store_true', help='also write PDF figures')
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
    args.passthrough = passthrough
    args.absolute_paths = []
    if args.deprecated_seeds is not None:
        print('note: reproduce.py --seeds N is deprecated; it is --num_seeds N (the experiment '
              'scripts\' --seeds lists seeds)', file=sys.stderr)
        args.num_seeds = args.deprecated_seeds
    return args


def _check_args(args):
    problems = []
    if args.num_seeds < 1:
        problems.append('--num_seeds must be >= 1')
    if args.seed_start < 0:
        problems.append('--seed_start must be >= 0')
    if args.jobs < 1:
        problems.append('--jobs must be >= 1')
    if args.per_gpu < 1:
        problems.append('--per_gpu must be >= 1')
    if args.batch_seeds is not None and args.batch_seeds < 1:
        problems.append('--batch_seeds must be >= 1')
    if args.configs is not None:
        figures = FIGURES if args.figure == 'all' else (args.figure,)
        known = {config.name for figure in figures for config in common.figure_grid(figure)}
        unknown = [name for name in args.configs if name not in known]
        if unknown or not args.configs:
            problems.append(f'--configs: {", ".join(unknown) or "(empty)"} is not a configuration of '
                            f'{args.figure}; choose from {", ".join(sorted(known))}')
    return problems


def _passthrough_problems(args, figures):
    """Flags after '--' that would contradict the sweep: a grid flag (say --layers 2 would
    make the runs named RKHS_l5, _l10 and _l20 all 2-layer runs) or a flag that reproduce.py
    sets per run (moving the pickle from where a rerun looks, or the shared embedding).

    The flags are read by the experiment script's own parser, so that every spelling counts:
    --layers, -l, an abbreviation like --lay, --layers=2.
    """
    if not args.passthrough:
        return []
    import importlib

    import cli  # imports torch: only when something follows '--'
    if REPO_DIR not in sys.path:
        sys.path.insert(0, REPO_DIR)
    problems = []
    for prefix in sorted({common.figure_folder_prefix(figure) for figure in figures}):
        parser = importlib.import_module(f'{prefix}_experiments').get_args_parser()
        try:
            given = cli.given_flags(parser.parse_args(args.passthrough))
        except SystemExit:  # the parser has printed its own one-line error
            return [f'the flags after "--" are not valid for {prefix}_experiments.py']
        for dest in sorted(given & set(common.GRID_DESTS)):
            problems.append(f'--{dest} is set for each configuration by the figure\'s grid; it '
                            f'cannot be passed after "--"')
        parsed = parser.parse_args(args.passthrough)
        for dest in PATH_DESTS:  # appended last, so that they win (argparse keeps the last value)
            if dest in given and not os.path.isabs(getattr(parsed, dest)):
                flag = [f'--{dest}', os.path.abspath(getattr(parsed, dest))]
                if flag not in [args.absolute_paths[i:i + 2] for i in range(0, len(args.absolute_paths), 2)]:
                    args.absolute_paths += flag
        for dest in sorted(given & set(MANAGED_FLAGS)):
            problems.append(f'--{dest} is set per run by reproduce.py; it cannot be passed after '
                            f'"--"' + (' (use reproduce.py\'s own --embedding_seed, --embedding_dir or '
                                       '--vary_embedding, before "--")' if dest.startswith('embedding')
                                       else ''))
    return list(dict.fromkeys(problems))


def _plot(figure, root, pdf):
    """Plot one figure from its own results folder with plot_figures.main."""
    if REPO_DIR not in sys.path:
        sys.path.insert(0, REPO_DIR)
    import plot_figures
    folders = [os.path.join(root, folder) for folder in common.figure_folders(figure)]
    plot_args = [*[folder for folder in folders if os.path.isdir(folder)],
                 '--figure', figure.replace('figure', ''),
                 '--out_dir', os.path.join(root, 'figures')]
    if pdf:
        plot_args.append('--pdf')
    return plot_figures.main(plot_figures.get_args_parser().parse_args(plot_args))


def runs_to_do(all_runs, root, args):
    """The runs still to do. A run whose pickles all exist is done (a diverged run writes one
    too); a batched run with some of its members done runs the rest; a run that was interrupted
    left a resume state, which the script refuses to overwrite: it continues with --resume."""
    todo = []
    for run in all_runs:
        missing = [seed for seed, path in zip(run.seeds, run.pickles)
                   if not os.path.exists(os.path.join(root, path))]
        if not missing:
            run.status = 'skipped'
            print(f'# skip {run.name}: {", ".join(run.pickles)} exist{"s" * (len(run.pickles) == 1)}')
            continue
        if missing != run.seeds:
            print(f'# {run.name}: only seed(s) {" ".join(map(str, missing))} still to do')
            vars(run).update(vars(make_run(run.figure, run.config, missing, args)))
        if os.path.exists(os.path.join(root, run.resume_state)):
            run.args.append('--resume')
            print(f'# resume {run.name}: {run.resume_state} exists')
        todo.append(run)
    return todo


def main(args):
    """Run (or print, with --dry_run) the sweep, then plot; return an exit status."""
    figures = FIGURES if args.figure == 'all' else (args.figure,)
    problems = _check_args(args) or _passthrough_problems(args, figures)
    if problems:
        for problem in problems:
            print('error: ' + problem, file=sys.stderr)
        return 2
    sweep_start = time.time()
    root = os.path.abspath(args.results_root)
    runs_by_figure, seen = {}, set()
    for figure in figures:  # a run shared by two figures (Figure 2's C=32 is 1a's) runs once
        runs_by_figure[figure] = [run for run in build_runs(figure, args) if run.log not in seen]
        seen.update(run.log for run in runs_by_figure[figure])
    if args.shard:  # this machine's share: every N-th run of the whole sweep, from the I-th on
        index, count = args.shard
        numbered = enumerate(run for figure in figures for run in runs_by_figure[figure])
        mine = {id(run) for number, run in numbered if number % count == index - 1}
        runs_by_figure = {figure: [run for run in runs if id(run) in mine]
                          for figure, runs in runs_by_figure.items()}
    all_runs = [run for figure in figures for run in runs_by_figure[figure]]

    embedding = describe_embedding(figures, args)
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
        return 0

    missing_scripts = sorted({run.script for run in todo if not os.path.exists(run.script)})
    if missing_scripts:
        print(f'error: experiment script not found: {", ".join(missing_scripts)}',
              file=sys.stderr)
        return 2

    os.makedirs(root, exist_ok=True)
    if any(figure != 'figure3' for figure in figures):
        print(f'MNIST embedding: {embedding}')
    for figure in figures:
        previous = write_manifest(root, figure, runs_by_figure[figure], args, sweep_start)
        current = (None if args.vary_embedding else args.embedding_seed, args.vary_embedding)
        if figure != 'figure3' and previous is not None and tuple(previous) != current:
            print(f'warning: {figure} was previously run with embedding setting '
                  f'{previous}, now {current}; existing pickles keep the old one',
                  file=sys.stderr)
    slots = make_slots(args)
    print(f'{len(todo)} run(s) to do, {len(all_runs) - len(todo)} skipped; '
          f'{len(slots)} at a time', flush=True)

    interrupted = _run_all_handling_sigterm(todo, root, slots)
    finished = time.time()
    for figure in figures:
        write_manifest(root, figure, runs_by_figure[figure], args, sweep_start, finished)

    status = 0
    failed = [run for run in todo if run.status == 'failed']
    diverged = [run for run in todo if run.status == 'diverged']
    if diverged:
        print(f'{len(diverged)} run(s) diverged (pickle written, curves stop early): '
              + ', '.join(run.name for run in diverged))
    if failed:
        print(f'{len(failed)} run(s) FAILED:')
        for run in failed:
            reason = run.extra.get('reason', f'exit {run.returncode}')
            print(f'  {run.name}: {reason}; log: {os.path.join(root, run.log)}')
        status = 1
    if interrupted:
        print(f'sweep interrupted after {finished - sweep_start:.1f} s')
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
