"""Run the seed sweeps behind Figures 1a, 1b, 2 and 3, then plot them.

Each process trains one configuration for one seed, or for several seeds side by side as one
batched model (``--batch_seeds K``: ``MNIST_experiments.py --seeds``); either way every seed has
its own results pickle, checkpoint and log (resnet_ode/sweep.py says where).

A sweep continues where it stopped. A run whose pickles exist is done, but only if their
protocol record is the one this sweep would run: otherwise the sweep names each such file and
field and exits 2 before starting anything (``--move_aside`` moves them into a dated folder;
nothing is ever deleted). A run that was interrupted left a resume state, checked the same way
and continued with ``--resume``, whatever ``--batch_seeds`` says now. A run held by another
process is "running elsewhere", not a failure.

The runs follow the release's stored protocol by default (``--protocol``). MNIST runs load the
release's embedding files (``--embedding_dir``, default the repository's folder) and otherwise
share one drawn embedding (``--embedding_seed``) unless ``--vary_embedding`` is given. Offline,
give the runs the data's location after "--": ``-- --data_root <folder holding MNIST/raw>``.
``--shard I/N`` runs one of N disjoint parts, for a job array over several machines.

Examples::

    python reproduce.py figure1a --num_seeds 20 --gpus 0          # 20 seeds per process on the GPU
    python reproduce.py all --dry_run
    python reproduce.py figure2 --num_seeds 2 --jobs 2 -- --epochs 3 --subset 2048
    python reproduce.py all --num_seeds 20 --gpus 0 --shard 2/4   # machine 2 of 4
"""
import argparse
import os
import shlex
import sys
import time

from resnet_ode import figure_grid, scheduler, sweep
from resnet_ode.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_USAGE,
    OneLineArgumentParser,
    UsageError,
    run_command,
)
from resnet_ode.figure_grid import FIGURES, SYNTHETIC, results_dir
from resnet_ode.files import writable_folder_problem
from resnet_ode.gate import SEED_LIMIT

# The largest counts the sweep accepts: far beyond any real sweep, small enough to list.
MAX_SEEDS = 100_000
MAX_PROCESSES = 1024


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
    parser = OneLineArgumentParser(
        prog='reproduce.py',
        description='Run the seed sweep of a figure (each run a subprocess), then plot it. '
                    'Arguments after "--" are passed to every run.',
        usage='%(prog)s FIGURE [options] [-- experiment flags]')
    add = parser.add_argument
    add('figure', type=figure_grid.figure_name,
        help='figure1a, figure1b, figure2, figure3 or all (also 1a or fig1a); synthetic: the synthetic '
             'experiment\'s sweep (not part of all)')
    add('--num_seeds', type=int, default=5, help='number of seeds per configuration (default: 5)')
    add('--seeds', type=int, dest='deprecated_seeds', default=None, metavar='N',
        help='deprecated spelling of --num_seeds')
    add('--seed_start', type=int, default=0, help='first seed (default: 0)')
    add('--configs', type=_names, default=None, metavar='NAME[,NAME...]',
        help='run only these configurations of the figure, by the name that starts their files '
             '(e.g. RKHS_l5_p0,SHL_l5_p0; --dry_run lists them)')
    add('--protocol', choices=tuple(sweep.PROTOCOLS), default='stored',
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
             f'(MNIST_experiments.py --seeds); default 1 on CPU, {sweep.DEFAULT_GPU_BATCH_SEEDS} with --gpus')
    add('--shard', type=_shard, default=None, metavar='I/N',
        help='run only the I-th of N disjoint parts of the sweep (every N-th run from the I-th), '
             'e.g. one part per machine of a job array; any later run skips what exists and plots '
             'what is there')
    add('--jobs', type=int, default=1, help='concurrent CPU runs without --gpus (default: 1); each '
        'gets an equal share of the cores as OMP_NUM_THREADS, unless that is set already')
    add('--results_root', default=sweep.REPO_DIR,
        help='folder holding the results, checkpoint and log folders; runs start there '
             '(default: the repository)')
    add('--move_aside', action='store_true',
        help='move existing results made with another protocol than this sweep\'s (and their '
             'metrics, checkpoints and logs) into a dated set_aside_<date> folder, then run; '
             'default: refuse')
    add('--dry_run', action='store_true', help='print the commands, run and write nothing')
    add('--no_plot', action='store_true', help='do not plot after the runs')
    add('--pdf', action='store_true', help='also write PDF figures')
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


def check_args(args, figures) -> list[str]:
    """Every rule on reproduce.py's own flags, before anything is built or written."""
    problems = []
    for name, limit in (('num_seeds', MAX_SEEDS), ('jobs', MAX_PROCESSES), ('per_gpu', MAX_PROCESSES),
                        ('batch_seeds', MAX_SEEDS)):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= limit:
            problems.append(f'--{name} must be between 1 and {limit:,}, got {value}')
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
        known = ({name for name, _ in figure_grid.synthetic_configurations()} if figures == (SYNTHETIC,) else
                 {config.name for figure in figures for config in figure_grid.figure_grid(figure)})
        unknown = [name for name in args.configs if name not in known]
        if unknown or not args.configs:
            problems.append(f'--configs: {", ".join(unknown) or "(empty)"} is not a configuration of '
                            f'{args.figure}; choose from {", ".join(sorted(known))}')
    if any(flag in ('-h', '--help') for flag in args.passthrough):
        problems.append('--help after "--" would go to every run; for the experiment flags, run '
                        'python MNIST_experiments.py --help (or CIFAR_experiments.py)')
    problem = writable_folder_problem('--results_root', args.results_root)
    problems += [problem] if problem else []
    if args.gpus and not args.dry_run:
        problems += scheduler.gpu_problems(args.gpus)
    return problems


def _plot(figure, root, pdf):
    """Plot one figure from its runs' folders into its own folder, with plot_figures.main."""
    import plot_figures
    folders = [os.path.join(root, folder) for folder in figure_grid.figure_folders(figure)]
    plot_args = [*[folder for folder in folders if os.path.isdir(folder)],
                 '--figure', figure.replace('figure', ''), '--out_dir', os.path.join(root, results_dir(figure))]
    return plot_figures.main(plot_figures.get_args_parser().parse_args(plot_args + ['--pdf'] * pdf))


def _manifest(root, figures, runs_by_figure, args, started, finished=None):
    """This invocation in each figure's <results folder>/sweep.json, after the earlier ones."""
    for figure in figures:
        scheduler.write_manifest(os.path.join(root, results_dir(figure), 'sweep.json'), {'figure': figure},
                                 runs_by_figure[figure], args.argv, root, started, finished)


def plan(args, figures, root):
    """(runs by figure, the embedding line, the mismatched files): the sweep before it runs."""
    runs_by_figure, seen = {}, set()
    for figure in figures:  # a run shared by two figures (Figure 2's C=32 is 1a's) runs once
        runs_by_figure[figure] = [run for run in sweep.build_runs(figure, args, root) if run.log not in seen]
        seen.update(run.log for run in runs_by_figure[figure])
    embedding = sweep.describe_embedding(figures, args)
    if args.shard:
        runs_by_figure = sweep.select_shard(runs_by_figure, figures, args.shard)
    mismatched = sweep.protocol_problems([run for runs in runs_by_figure.values() for run in runs], root)
    return runs_by_figure, embedding, mismatched


def main(args):
    """Run (or print, with --dry_run) the sweep, then plot; return an exit status."""
    figures = FIGURES if args.figure == 'all' else (args.figure,)  # 'all': the paper's figures
    problems = check_args(args, figures) or sweep.passthrough_problems(args, figures)
    if problems:
        print('error: ' + '; '.join(problems), file=sys.stderr)
        return EXIT_USAGE
    sweep_start, root = time.time(), os.path.abspath(args.results_root)
    try:
        runs_by_figure, embedding, mismatched = plan(args, figures, root)
    except UsageError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return EXIT_USAGE
    if mismatched and not args.move_aside:
        for _, path, why in mismatched:
            print(f'error: {path} was not made with this sweep\'s protocol: {why}', file=sys.stderr)
        print(f'error: {len(mismatched)} existing file(s) of another protocol; nothing was run. '
              f'Rerun with --move_aside to move them into a dated folder, or use another '
              f'--results_root', file=sys.stderr)
        return EXIT_USAGE
    if mismatched:
        sweep.move_aside(mismatched, root, dry_run=args.dry_run)
    all_runs = [run for figure in figures for run in runs_by_figure[figure]]
    if args.dry_run:
        return _dry_run(args, all_runs, embedding, root)
    todo = sweep.runs_to_do(all_runs, root, args)
    missing_scripts = sorted({run.script for run in todo if not os.path.exists(run.script)})
    if missing_scripts:
        print(f'error: experiment script not found: {", ".join(missing_scripts)}', file=sys.stderr)
        return EXIT_USAGE
    os.makedirs(root, exist_ok=True)
    if embedding:
        print(f'MNIST embedding: {embedding}')
    _manifest(root, figures, runs_by_figure, args, sweep_start)
    slots = scheduler.make_slots(args)
    print(f'{len(todo)} run(s) to do, {len(all_runs) - len(todo)} skipped; {len(slots)} at a time', flush=True)
    interrupted = scheduler.run_all_handling_sigterm(todo, root, slots)
    _manifest(root, figures, runs_by_figure, args, sweep_start, time.time())
    return _report(todo, all_runs, figures, root, args, sweep_start, interrupted)


def _dry_run(args, all_runs, embedding, root) -> int:
    print(f'# cwd: {root}')
    if embedding:
        print(f'# MNIST embedding: {embedding}')
    if args.gpus:
        print(f'# each run gets CUDA_VISIBLE_DEVICES set to one of {",".join(args.gpus)}')
    todo = sweep.runs_to_do(all_runs, root, args)
    for run in todo:
        print(shlex.join(run.command()))
    print(f'# {len(todo)} run(s) to do, {len(all_runs) - len(todo)} skipped')
    return EXIT_OK


def _report(todo, all_runs, figures, root, args, sweep_start, interrupted):
    """The sweep's outcome, the plots, and its exit status (1 when a run failed)."""
    status = EXIT_OK
    for outcome, words in (('diverged', 'diverged (pickle written, curves stop early)'),
                           ('running elsewhere', 'are running in another process; a later sweep picks '
                                                 'up their results'),
                           ('done elsewhere', 'were finished by another process meanwhile')):
        names = [run.name for run in todo if run.status == outcome]
        if names:
            print(f'{len(names)} run(s) {words}: ' + ', '.join(names))
    failed = [run for run in todo if run.status == 'failed']
    if failed:
        print(f'{len(failed)} run(s) FAILED:')
        for run in failed:
            print(f'  {run.name}: {run.extra.get("reason")}; log: {os.path.join(root, run.log)}')
        status = EXIT_FAILED
    if interrupted:
        print(f'sweep interrupted after {time.time() - sweep_start:.1f} s; rerun the same command to '
              f'continue it')
        return EXIT_SIGINT
    if not args.no_plot:
        for figure in figures:
            if _plot(figure, root, args.pdf) != 0:
                status = EXIT_FAILED
    print(f'sweep wall time: {time.time() - sweep_start:.1f} s '
          f'({len(todo)} run(s), {len(all_runs) - len(todo)} skipped)')
    return status


if __name__ == '__main__':
    run_command(main, parse_args)
