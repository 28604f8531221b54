"""The paper release's stored runs as the reference: download them, compare this project's runs
with them run by run, and write the reproduction report.

    python release_runs.py --download                 # the 335 pickles (24 MB) into release_runs/, SHA-256 checked
    python release_runs.py results/MNIST_experiments  # the comparison table
    python release_runs.py --report                   # REPRODUCTION.md from results/ and release_runs/

The release's runs are read like this project's pickles (the restricted unpickler, nothing
runs), with the release's protocol assumed; only this project's runs made at that protocol are
compared (resnet_ode/comparison.py). The report: resnet_ode/report.py.
"""
import os
import sys

from resnet_ode import comparison, recorded_runs, release_reference, report
from resnet_ode.embeddings import RELEASE_COMMIT, RELEASE_REPOSITORY
from resnet_ode.errors import EXIT_OK, EXIT_USAGE, DownloadError, OneLineArgumentParser, UsageError, run_command


def get_args_parser():
    parser = OneLineArgumentParser(
        prog='release_runs.py',
        description='The release\'s stored runs: download them, compare runs with them, write the report.')
    parser.add_argument('folders', nargs='*', help='folders of this project\'s results pickles to compare')
    parser.add_argument('--reference', default=release_reference.DEFAULT_DIR,
                        help='folder of the release\'s stored runs (default: release_runs/ in the repository)')
    parser.add_argument('--download', action='store_true',
                        help=f'fetch the release\'s 335 stored runs from {RELEASE_REPOSITORY} at '
                             f'commit {RELEASE_COMMIT} into --reference, each SHA-256 verified')
    parser.add_argument('--report', action='store_true',
                        help='write REPRODUCTION.md and its figures from results/ and --reference')
    return parser


def download(args) -> int:
    if args.folders or args.report:
        raise UsageError('--download fetches the release\'s runs and does nothing else: give it '
                         'without folders or --report')
    if not args.reference or (os.path.lexists(args.reference) and not os.path.isdir(args.reference)):
        raise UsageError(f'--reference must name a folder to download into, got {args.reference!r}')
    try:
        fetched = release_reference.download(args.reference)
    except DownloadError as exc:  # what to do next, where the machine cannot reach GitHub
        raise DownloadError(f'{exc}. Without this download, copy the release\'s stored runs (its '
                            f'MNIST_experiments/ and CIFAR_experiments/) into {args.reference}, or '
                            f'pass --reference <their folder>') from None
    print(f'{args.reference}: {fetched} file(s) downloaded; all 335 stored runs present and verified')
    return EXIT_OK


def check_reference(folder: str, whole: bool = True):
    """The reference folder exists and (with `whole`, as the report needs) holds exactly the
    release's 335 stored runs, byte for byte."""
    if not os.path.isdir(folder):
        raise UsageError(f'no folder {folder}: python release_runs.py --download fetches the '
                         f'release\'s runs there, or pass --reference')
    problem = whole and release_reference.reference_problem(folder)
    if problem:
        raise UsageError(f'{folder} is not the release\'s 335 stored runs ({problem}); python '
                         f'release_runs.py --download fetches them')


def main(args) -> int:
    try:
        if args.download:
            return download(args)
        if args.report:
            if args.folders:
                raise UsageError('--report reads the committed runs in results/; it takes no '
                                 f'folders (got {", ".join(args.folders)}): compare them without --report')
            check_reference(args.reference)
            report.write_report(args.reference)
            return EXIT_OK
        absent = [folder for folder in args.folders if not os.path.isdir(folder)]
        if absent or not args.folders:
            raise UsageError(f'not a folder: {", ".join(absent)}' if absent else
                             'give the folders of the runs to compare, e.g. results/MNIST_experiments')
        check_reference(args.reference, whole=False)
        mine = recorded_runs.load_runs(args.folders)
        release = release_reference.load_release_runs(args.reference) if mine else []
        for runs, where in ((mine, ', '.join(args.folders)), (release, args.reference)):
            if not runs:
                raise UsageError(f'no runs to compare in {where} (results pickles, or the metrics '
                                 f'files of runs in progress)')
    except UsageError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return EXIT_USAGE
    comparisons, others = comparison.compare(mine, release)
    print(comparison.epoch_table(comparisons), '', comparison.run_table(comparisons), '',
          comparison.training_table(comparisons), '', 'Not compared:', comparison.others_table(others), sep='\n')
    return EXIT_OK


if __name__ == '__main__':
    run_command(main, get_args_parser().parse_args)
