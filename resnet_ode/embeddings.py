"""The paper release's MNIST embeddings: its shipped input networks A and output networks B.

The release's MNIST_experiments.py first looked for

    MNIST_pretrained_models/{C}channels_{p}pass_input_embedding.pt   (A)
    MNIST_pretrained_models/{C}channels_{p}pass_output_embedding.pt  (B)

(C = --in_channels, p = --pretrain) and only drew and pretrained fresh networks when they were
missing. It shipped them for C = 8, 16, 32, 64 and p = 0..5, so every stored run behind Figures
1 and 2 started from them (except Figure 2's 4-channel runs: no file). MNIST_experiments.py
loads them the same way (`--embedding_dir`).

Each file is torch.save({'model': nn.Sequential(...), 'loss': tensor}): a pickle of whole
modules. They are read with weights_only=True and an allow-list of exactly the six torch.nn
classes they contain, so a crafted file cannot run code; only the weights are kept, copied into
this project's own `models.mnist_input_network` / `mnist_output_network`.

    python -m resnet_ode.embeddings              # which files are in MNIST_pretrained_models/, and are they the release's
    python -m resnet_ode.embeddings --download   # fetch the 48 files from the pinned commit, checking each SHA-256
"""
from __future__ import annotations

import os
import sys
from collections import Counter

from .errors import EXIT_OK, EXIT_USAGE, DownloadError, EmbeddingError, OneLineArgumentParser, run_command
from .files import open_regular, torch_load_failure

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = 'MNIST_pretrained_models'
# The default folder is the repository's, whatever the working directory, so that a run started
# elsewhere (or by reproduce.py) finds the same files.
DEFAULT_PATH = os.path.join(REPO_DIR, DEFAULT_DIR)
NO_EMBEDDING_DIR = 'none'  # --embedding_dir none: never load files
# The folder exists at this commit of the authors' repository and is deleted at its newest one.
RELEASE_REPOSITORY = 'rbarboni/FlowResNets'
RELEASE_COMMIT = '54bc56f'
DOWNLOAD_URL = f'https://github.com/{RELEASE_REPOSITORY}/raw/{RELEASE_COMMIT}/{DEFAULT_DIR}/'
DOWNLOAD_COMMAND = 'python -m resnet_ode.embeddings --download'

# SHA-256 of the 48 files as shipped (computed from a byte-for-byte copy of that commit), one
# `sha256sum` line per file beside this module.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'release_embeddings.sha256')) as _sums:
    RELEASE_SHA256 = {name: digest for digest, name in map(str.split, _sums)}
PARTS = ('input', 'output')  # A, B



def file_names(channels: int, passes: int) -> tuple[str, str]:
    """The release's names of A and B for C channels after p pretraining passes."""
    return tuple(f'{channels}channels_{passes}pass_{part}_embedding.pt' for part in PARTS)


def release_ships(channels: int, passes: int) -> bool:
    """Whether the release shipped A and B for this (channels, passes) pair, so that its stored
    runs of that pair started from them (all but Figure 2's 4 channels)."""
    return all(name in RELEASE_SHA256 for name in file_names(channels, passes))


def find(directory: str | None, channels: int, passes: int, required: bool = False) -> list[str] | None:
    """Paths of A and B in `directory`, or None when neither is there (the run then draws its own).

    Never falls back in silence on a broken folder: raises EmbeddingError, naming the file, when
    the folder is not a folder, when only one of the pair is there, or when one is not a
    readable regular file (a directory, a device, a FIFO, a dangling link). With `required`
    (the folder was given explicitly), an absent pair is an error too.
    """
    if not directory or directory == NO_EMBEDDING_DIR:
        return None
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise EmbeddingError(f'--embedding_dir {directory} is not a folder')
    paths = [os.path.join(directory, name) for name in file_names(channels, passes)]
    present = [path for path in paths if os.path.lexists(path)]
    if not present:
        if required:
            raise EmbeddingError(
                f'--embedding_dir {directory} holds no {" or ".join(file_names(channels, passes))}; '
                f'{DOWNLOAD_COMMAND} --dir {directory} fetches them, or pass '
                f'--embedding_dir none to draw A and B')
        return None
    for path in paths:
        if not os.path.lexists(path):
            other = present[0]
            raise EmbeddingError(f'embedding file {path} is missing, while {os.path.basename(other)} '
                                 f'is there: a run needs both or neither')
        if not os.path.isfile(path):
            raise EmbeddingError(f'embedding file {path} is not a regular file')
        if not os.access(path, os.R_OK):
            raise EmbeddingError(f'embedding file {path} cannot be read (permissions)')
    return paths


def for_run(config) -> list[str] | None:
    """The release's files of A and B that an MNIST run of `config` loads, or None: it draws them.
    Given explicitly, --embedding_dir must hold them where the release shipped them."""
    explicit = 'embedding_dir' in config.given
    return find(config.embedding_dir, config.in_channels, config.pretrain,
                required=explicit and release_ships(config.in_channels, config.pretrain))


def sha256(path: str) -> str:
    """The file's SHA-256 (only a regular file is read), with EmbeddingError for what cannot be."""
    from .files import sha256 as file_sha256
    try:
        return file_sha256(path)
    except DownloadError as exc:
        raise EmbeddingError(str(exc)) from None


def load_state(path: str, expected: dict) -> dict:
    """The state dict of the nn.Sequential in a release embedding file, checked against `expected`.

    `expected` is the state dict of the network it must fit (its keys and shapes). Raises
    EmbeddingError, with the file's name and what is wrong, for a file that needs any class
    beyond the allow-list, a truncated or corrupt file, or one of the wrong architecture.
    """
    import warnings

    import torch
    import torch.nn as nn

    # Exactly the classes the release's files contain; anything else is refused unread.
    allowed = [nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Flatten, nn.Linear]
    try:
        f = open_regular(path)
    except OSError as exc:
        raise EmbeddingError(f'embedding file {path} cannot be read ({exc.strerror or exc})') from None
    try:
        with f, torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            content = torch.load(f, map_location='cpu', weights_only=True)
    except Exception as exc:
        raise EmbeddingError(f'embedding file {path} {_load_failure(path, exc)}') from None
    model = content.get('model') if isinstance(content, dict) else None
    if type(model) is not nn.Sequential:
        raise EmbeddingError(f'embedding file {path} is not a release embedding '
                             f"(no nn.Sequential under 'model')")
    state = _tensors_of(path, model, tuple(allowed))
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    wanted = {key: tuple(value.shape) for key, value in expected.items()}
    if shapes != wanted:
        differing = sorted(set(shapes.items()) ^ set(wanted.items()))[0][0]
        raise EmbeddingError(f'embedding file {path} has the wrong architecture for its channel '
                             f'count (first difference at {differing!r}: '
                             f'{shapes.get(differing)} here, {wanted.get(differing)} expected)')
    for key, tensor in state.items():
        why = _tensor_defect(key, tensor, expected[key])
        if why:
            raise EmbeddingError(f'embedding file {path} is corrupt ({key} {why})')
    return state


def _tensors_of(path: str, model, allowed: tuple) -> dict:
    """The parameters and persistent buffers of a loaded network, by state-dict name, read
    from the modules' own dictionaries: nothing of the loaded objects is called (a crafted file
    can make `state_dict` an attribute, or a module contain itself). Raises EmbeddingError
    ('corrupt') for anything a torch.nn module saved by torch never holds."""
    import torch

    def corrupt(why):
        raise EmbeddingError(f'embedding file {path} is corrupt ({why})')

    tensors, seen, pending = {}, set(), [('', model)]
    while pending:
        prefix, module = pending.pop()
        where = prefix.rstrip('.') or 'the network'
        if id(module) in seen:
            corrupt(f'{where} contains itself')
        seen.add(id(module))
        attributes = vars(module)
        hiding = sorted(name for name in attributes if hasattr(type(module), name))
        if hiding:
            corrupt(f'{where} has an attribute {hiding[0]!r} that hides its class\'s')
        if any(isinstance(value, dict) and value for name, value in attributes.items()
               if name.endswith('hooks')):
            corrupt(f'{where} carries hooks')
        groups = [attributes.get(name) for name in ('_parameters', '_buffers', '_modules')]
        skipped = attributes.get('_non_persistent_buffers_set', set())
        if not all(isinstance(group, dict) for group in groups) or not isinstance(skipped, set):
            corrupt(f'{where} is not a torch.nn module as torch saves it')
        parameters, buffers, children = groups
        for name, tensor in [*parameters.items(), *((n, b) for n, b in buffers.items() if n not in skipped)]:
            if tensor is not None:
                if not isinstance(name, str) or type(tensor) not in (torch.Tensor, torch.nn.Parameter):
                    corrupt(f'{prefix}{name} is not a tensor')
                tensors[prefix + name] = tensor
        for name, child in children.items():
            if not isinstance(name, str) or type(child) not in allowed:
                corrupt(f'{prefix}{name} is not one of the six torch.nn classes')
            pending.append((f'{prefix}{name}.', child))
    return dict(sorted(tensors.items()))


def _tensor_defect(key: str, tensor, expected) -> str | None:
    """What makes a tensor unusable as the release's weight `key`, or None."""
    import torch

    if tensor.layout != torch.strided or tensor.is_quantized:
        return f'is stored as a {tensor.layout} tensor, not a dense one'
    if tensor.dtype != expected.dtype:
        return f'holds {tensor.dtype}, not {expected.dtype}'
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        return 'holds NaN or infinite values'
    if key.endswith(('running_var', 'num_batches_tracked')) and bool((tensor < 0).any()):
        return 'holds negative values'
    return None


def _load_failure(path: str, exc: Exception) -> str:
    """What is wrong with the file, in a few words."""
    kind, detail = torch_load_failure(path, exc)
    if kind == 'global':
        return (f'needs {detail}, which is not one of the six torch.nn classes a release '
                f'embedding holds: refused unread')
    if kind == 'refused':
        return ('holds something other than tensors and the six torch.nn classes a release '
                'embedding holds: refused unread')
    if kind == 'not_torch':
        return f'is not a torch.save file ({detail})'
    return f'is truncated or corrupt ({detail})'


def describe(paths: list[str]) -> dict:
    """The record a run keeps of its release embedding: file names and their SHA-256."""
    return {'embedding_files': [os.path.basename(path) for path in paths],
            'embedding_sha256': [sha256(path) for path in paths]}


def is_release(record: dict) -> bool:
    """Whether a record's files are byte for byte the release's."""
    return all(RELEASE_SHA256.get(name) == digest
               for name, digest in zip(record['embedding_files'], record['embedding_sha256']))


# ---------------------------------------------------------------------------------------------
# Download, all or nothing; python -m resnet_ode.embeddings
# ---------------------------------------------------------------------------------------------

def download(directory: str, base_url: str = DOWNLOAD_URL, log=print) -> int:
    """Fetch every release file missing from `directory`, all or nothing, each SHA-256 verified.
    Returns the number of files fetched."""
    from .downloads import download_verified
    try:
        return download_verified(RELEASE_SHA256, base_url, directory, log)
    except DownloadError as exc:
        raise EmbeddingError(str(exc)) from None


def file_status(path: str) -> str:
    """'missing', 'release', 'DIFFERS from the release', or what is wrong with the file."""
    if not os.path.lexists(path):
        return 'missing'
    try:
        digest = sha256(path)
    except EmbeddingError as exc:
        return f'UNUSABLE: {str(exc).removeprefix(path + " ")}'
    return 'release' if digest == RELEASE_SHA256[os.path.basename(path)] else 'DIFFERS from the release'


def get_args_parser():
    parser = OneLineArgumentParser(
        prog='python -m resnet_ode.embeddings',
        description="Check for, or download, the paper release's MNIST embedding files.")
    parser.add_argument('--dir', default=DEFAULT_PATH,
                        help=f'folder of the files (default: {DEFAULT_DIR} in the repository, where '
                             f'MNIST_experiments.py looks by default)')
    parser.add_argument('--download', action='store_true',
                        help=f'fetch the missing files from {RELEASE_REPOSITORY} at commit '
                             f'{RELEASE_COMMIT} and verify each SHA-256')
    return parser


def main(args) -> int:
    if not args.dir or (os.path.lexists(args.dir) and not os.path.isdir(args.dir)):
        print(f'error: --dir {args.dir} is not a folder' if args.dir else
              'error: --dir must name a folder, got an empty name', file=sys.stderr)
        return EXIT_USAGE
    if args.download:
        try:
            fetched = download(args.dir, base_url=DOWNLOAD_URL)  # read now, so tests can point it elsewhere
        except EmbeddingError as exc:  # what to do next, where the machine cannot reach GitHub
            print(f'error: {exc}. Without this download, copy the {len(RELEASE_SHA256)} files of the '
                  f'release\'s {DEFAULT_DIR}/ into {args.dir}, or pass --embedding_dir <their folder> '
                  f'to the scripts', file=sys.stderr)
            return EXIT_USAGE
        print(f'{args.dir}: {fetched} file(s) downloaded, all {len(RELEASE_SHA256)} release files '
              f'present and verified')
        return EXIT_OK
    status = {name: file_status(os.path.join(args.dir, name)) for name in RELEASE_SHA256}
    for name, state in status.items():
        print(f'{name}: {state}')
    counts = Counter(state.split(':')[0] for state in status.values())
    print(f'{args.dir}: ' + ', '.join(f'{n} {state}' for state, n in sorted(counts.items()))
          + ('' if counts.get('release') == len(status) else f'; {DOWNLOAD_COMMAND} fetches the missing ones'))
    return EXIT_OK


if __name__ == '__main__':
    run_command(main, get_args_parser().parse_args)
