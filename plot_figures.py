"""Draw Figures 1a, 1b, 2 and 3 from results pickles, and print a summary table.

Every ``*.pkl`` under the given folders (default ``MNIST_experiments/`` and
``CIFAR_experiments/``) is read as one run (resnet_ode/recorded_runs.py: safely and checked,
this project's pickles and the release's alike). Runs are grouped by configuration *and
protocol* (resnet_ode/protocol_comparison.py): runs made differently are never averaged. When one
configuration has runs of two protocols, both curves are drawn and the legend says what
differs; a run that started from a drawn embedding where the paper's runs loaded the release's
files is marked "drawn A/B". How each figure is drawn: resnet_ode/plotting.py.

A figure file records (in its PNG metadata) the folders it was drawn from, and is never
overwritten by a figure drawn from other folders: choose another --out_dir.

Usage::

    python plot_figures.py                                   # all figures, default folders
    python plot_figures.py results/MNIST_experiments --figure 1a --reference release_runs
    python plot_figures.py some/folder --figure 3 --out_dir figs --pdf
"""
import os
import sys

from resnet_ode import figure_grid, plotting
from resnet_ode import recorded_runs as runs_module
from resnet_ode.errors import EXIT_OK, EXIT_USAGE, OneLineArgumentParser, run_command
from resnet_ode.files import writable_folder_problem

DEFAULT_FOLDERS = ('MNIST_experiments', 'CIFAR_experiments')
DEFAULT_OUT_DIR = 'figures'
SYNTHETIC_FOLDER = 'synthetic_experiments'


def synthetic_main(args):
    """plot_figures.py --figure synthetic: the figure and its table from synthetic_experiments/."""
    folders = list(args.folders) or [SYNTHETIC_FOLDER]
    runs = runs_module.load_synthetic_runs(folders)
    if not runs:
        print(f'figure {figure_grid.SYNTHETIC}: no runs found in {", ".join(folders)}, figure skipped')
        return EXIT_OK
    print(f'loaded {len(runs)} synthetic run(s) from {", ".join(folders)}')
    plotting.plot_synthetic(runs, args.out_dir, args.pdf)
    print()
    print(plotting.format_synthetic_table(runs))
    return EXIT_OK


def _figure_choice(text):
    return figure_grid.figure_name(text).replace('figure', '')


def get_args_parser():
    parser = OneLineArgumentParser(
        prog='plot_figures.py',
        description='Plot Figures 1a/1b/2/3 and print a summary table from results pickles.')
    parser.add_argument('folders', nargs='*',
                        help=f'folders searched recursively for *.pkl (default: {" and ".join(DEFAULT_FOLDERS)})')
    parser.add_argument('--figure', type=_figure_choice, default='all',
                        help='1a, 1b, 2, 3 or all (default: all); synthetic: the synthetic '
                             f'experiment, from {SYNTHETIC_FOLDER}/ by default')
    parser.add_argument('--reference', default=None, metavar='DIR',
                        help='the release\'s stored runs (python release_runs.py --download), drawn '
                             'as a band beneath each configuration')
    parser.add_argument('--out_dir', default=DEFAULT_OUT_DIR,
                        help=f'folder for the figures (default: {DEFAULT_OUT_DIR})')
    parser.add_argument('--pdf', action='store_true', help='also write PDF files')
    parser.add_argument('--smooth', type=int, default=plotting.DEFAULT_SMOOTH_WINDOW,
                        help=f'moving-average window of the training loss, in iterations '
                             f'(default: {plotting.DEFAULT_SMOOTH_WINDOW})')
    parser.add_argument('--error_scale', choices=('log', 'linear'), default='log',
                        help='y scale of the test error panel when its range is wide (default: log)')
    return parser


def _usage_problem(args):
    if args.smooth < 1:
        return '--smooth must be >= 1'
    absent = [folder for folder in args.folders + [args.reference] * bool(args.reference)
              if not os.path.isdir(folder)]
    if absent:
        return f'not a folder: {", ".join(absent)}'
    return writable_folder_problem('--out_dir', args.out_dir)


def main(args):
    """Plot the requested figures and print the summary table; return an exit status."""
    problem = _usage_problem(args)
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return EXIT_USAGE
    if args.figure == figure_grid.SYNTHETIC:
        return synthetic_main(args)
    folders = list(args.folders) or [folder for folder in DEFAULT_FOLDERS if os.path.isdir(folder)]
    if not folders and not args.reference:
        print(f'no results folder found ({", ".join(DEFAULT_FOLDERS)}); nothing to plot')
        return EXIT_OK
    groups = runs_module.group_runs(runs_module.load_runs(folders))
    reference = runs_module.group_runs(runs_module.load_runs([args.reference])) if args.reference else {}
    print(f'loaded {sum(map(len, groups.values()))} run(s) in {len(groups)} group(s) from '
          f'{", ".join(folders) or "no folder"}'
          + (f'; reference: {sum(map(len, reference.values()))} run(s) from {args.reference}' if reference else ''))
    sources = sorted(os.path.realpath(folder) for folder in folders + [args.reference] * bool(args.reference))
    status, drawn = EXIT_OK, []
    for figure in figure_grid.FIGURE_NAMES if args.figure == 'all' else (args.figure,):
        _, keys, refused = plotting.plot_figure(figure, groups, args.out_dir, sources, reference, args.smooth,
                                                args.pdf, args.error_scale)
        if refused:
            print(f'error: {refused}', file=sys.stderr)
            status = EXIT_USAGE
        drawn += keys
    # The table covers every group found, or only the selected figure's.
    shown = groups if args.figure == 'all' else {key: groups[key] for key in dict.fromkeys(drawn)}
    print()
    print(plotting.format_table(shown) if shown else 'no runs to summarise')
    return status


if __name__ == '__main__':
    run_command(main, get_args_parser().parse_args)
