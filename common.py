"""Torch-free helpers shared by the scripts: atomic files and the figure grid.

reproduce.py and plot_figures.py import this module and nothing that needs torch, so the sweep
runner and the plotting script start fast and work where torch is not installed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import shutil
import signal
import stat
import tempfile
import urllib.request
from dataclasses import dataclass
from typing import Callable

EXIT_USAGE = 2  # bad command line or a refusal: one line on stderr, nothing written
# How a run refuses a --save that another process holds; reproduce.py reads it in a run's log to
# tell "running elsewhere" from a failure.
RUNNING_ELSEWHERE = 'another process is running'
# A run's per-epoch metrics, beside its results pickle (<save stem>.metrics.jsonl): written as it
# goes, read by plot_figures.py for a run in progress.
METRICS_SUFFIX = '.metrics.jsonl'


# ---------------------------------------------------------------------------------------------
# Command lines: one line for a bad flag
# ---------------------------------------------------------------------------------------------

_NOT_GIVEN = object()


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints its whole usage block on an error; a bad flag gets one line here.

    It also records which flags the command line gave (in any spelling: long, short or
    abbreviated) as `args._given`, so that --resume can refuse flags that differ from the run's.
    """

    def error(self, message):
        self.exit(EXIT_USAGE, f'{self.prog}: error: {message} (see --help)\n')

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        # argparse leaves an attribute that is already set alone, so a second parse over
        # placeholders shows which destinations the command line itself set.
        probe = argparse.Namespace(**{action.dest: _NOT_GIVEN for action in self._actions
                                      if action.dest != argparse.SUPPRESS})
        super().parse_known_args(args, probe)
        parsed._given = frozenset(dest for dest, value in vars(probe).items()
                                  if value is not _NOT_GIVEN and not dest.startswith('_'))
        return parsed, extras



# ---------------------------------------------------------------------------------------------
# Fault points, for the test suite
# ---------------------------------------------------------------------------------------------

# Fault injection for the test suite only: "<point>@<n>[:<SIGNAL>]" sends the signal (default
# SIGKILL) to this process the n-th time it reaches the point. Unset in normal runs. The points:
# 'write' (inside every atomic write, the new content complete on disk, not yet renamed into
# place) here, and the training run's in runstate and the scripts.
FAULT_ENV = 'RESNET_ODE_FAULT'
_fault_counts: dict = {}


def fault_point(name: str):
    spec = os.environ.get(FAULT_ENV)
    if not spec or not spec.startswith(name + '@'):
        return
    count, _, signame = spec[len(name) + 1:].partition(':')
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(count):
        os.kill(os.getpid(), getattr(signal, signame or 'SIGKILL'))


# ---------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable, binary: bool = True) -> None:
    """write(file) into a temporary file beside `path`, fsync it, then os.replace it into place.

    A kill at any instant leaves either the old file or the new one, never a mix. The file gets
    the permissions any new file would get (0644 under umask 022), not mkstemp's private 0600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, 'wb' if binary else 'w') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        fault_point('write')  # the worst instant: the new file complete, the old one still in place
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def can_write_in(folder: str) -> bool:
    """Whether a file can be created in `folder`: tried with a probe file, removed at once (the
    permission bits say nothing for root, nor for a read-only file system)."""
    try:
        fd, probe = tempfile.mkstemp(prefix='.probe.', dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


def missing_ancestors(path: str) -> list[str]:
    """`path` and each of its parents that does not exist yet, outermost first: what creating
    `path` would create, and so what a failed attempt must remove."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing[::-1]


def save_pickle(obj, path: str) -> None:
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))


# ---------------------------------------------------------------------------------------------
# Verified downloads, all or nothing (the release's embedding files and stored runs)
# ---------------------------------------------------------------------------------------------

DOWNLOAD_TIMEOUT_SECONDS = 60


class DownloadError(Exception):
    """A download that failed, or a file in the way: one line, nothing written."""


def sha256(path: str) -> str:
    """The SHA-256 of a regular file (a device or FIFO in its place is refused, not read forever)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise DownloadError(f'{path} is not a regular file')
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def read_sha256sums(path: str) -> dict:
    """{relative path: sha256} from a `sha256sum` listing ('<hex>  ./<path>' per line)."""
    sums = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                digest, name = line.split(maxsplit=1)
                sums[os.path.normpath(name.strip())] = digest
    return sums


def download_verified(files: dict, base_url: str, directory: str, log=print) -> int:
    """Fetch every file of `files` ({relative path: sha256}) missing from `directory` from
    base_url + path, verify each SHA-256, then move them all in.

    All or nothing: the files go to a temporary folder first and are moved into `directory` only
    when every one arrived intact; on any failure nothing is left behind, no partial file and no
    folder this call created. A file already present must be a regular file with its checksum.
    Returns the number of files fetched.
    """
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise DownloadError(f'{directory} exists and is not a folder')
    present = [name for name in files if os.path.lexists(os.path.join(directory, name))]
    for name in present:
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or sha256(path) != files[name]:
            raise DownloadError(f'{path} exists and is not the release\'s file (not a regular file, '
                                f'or its SHA-256 differs); move it away and retry')
    missing = [name for name in files if name not in present]
    if not missing:
        return 0
    created = missing_ancestors(directory)
    try:
        try:
            os.makedirs(directory, exist_ok=True)
            staging = tempfile.mkdtemp(prefix='.download-', dir=directory)
        except OSError as exc:
            raise DownloadError(f'cannot write in {directory} ({exc.strerror or exc})') from None
        try:
            for number, name in enumerate(missing, 1):
                target = os.path.join(staging, name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                _fetch(base_url + name, target, files[name])
                log(f'[{number}/{len(missing)}] {name}: SHA-256 verified')
            for name in missing:
                os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        for folder in reversed(created):  # deepest first; only folders this call made
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return len(missing)


def _fetch(url: str, path: str, expected_sha256: str):
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response, \
                open(path, 'wb') as f:
            shutil.copyfileobj(response, f)
    except Exception as exc:  # no network, a blocked host, a moved file...
        reason = getattr(exc, 'reason', None) or exc
        raise DownloadError(f'could not download {url} ({type(exc).__name__}: '
                            f'{str(reason).strip()[:160]}); nothing was written') from None
    if sha256(path) != expected_sha256:
        raise DownloadError(f'{url} arrived with the wrong SHA-256 (expected {expected_sha256}); '
                            f'nothing was written')


# ---------------------------------------------------------------------------------------------
# Reading results pickles without running code
# ---------------------------------------------------------------------------------------------

# The only globals a results pickle needs: numpy's array and scalar rebuilders (both spellings:
# numpy 1 wrote numpy.core, numpy 2 writes numpy._core; protocol 5 pickles use _frombuffer).
# This project's pickles and the release's 335 stored ones (dicts of str, int, float, lists and
# numpy arrays made by tensor.numpy()) need nothing else.
RESULTS_GLOBALS = {
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
}


class UnsafePickle(pickle.UnpicklingError):
    """A pickle that asks for something a results file never holds (it could run code)."""


class _ResultsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in RESULTS_GLOBALS:
            raise UnsafePickle(f'it asks for {module}.{name}, which a results file never holds')
        import importlib

        # numpy 2 still answers to numpy.core, with a deprecation warning: go to the new name.
        for candidate in (module.replace('numpy.core', 'numpy._core'), module):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise UnsafePickle(f'{module}.{name} is not available in this numpy')


def load_results(path: str):
    """A results pickle, read with an unpickler that can only rebuild numpy arrays and plain
    values: a crafted file raises UnsafePickle instead of running its code."""
    with open(path, 'rb') as f:
        return _ResultsUnpickler(f).load()


def torch_load_failure(path: str, exc: Exception) -> tuple[str, str]:
    """Why torch.load(path, weights_only=True) raised `exc`, for a one-line message:
    ('global', name): the file needs a class or function that weights_only loading refused;
    ('not_torch', what it looks like): not a torch.save archive at all;
    ('refused', ''): other content that weights_only loading refuses;
    ('corrupt', detail): a torch.save archive that is truncated or damaged."""
    text = str(exc)
    marker = 'Unsupported global: GLOBAL '
    if marker in text:
        return 'global', text.split(marker, 1)[1].split()[0]
    with open(path, 'rb') as f:
        start = f.read(4)
    if not start.startswith(b'PK\x03\x04'):  # torch.save writes a zip archive
        # every pickle of protocol >= 2 starts with the PROTO opcode, 0x80
        return 'not_torch', 'a plain pickle, such as a results file' if start[:1] == b'\x80' else 'unknown format'
    if 'Weights only load failed' in text:
        return 'refused', ''
    first = text.strip().splitlines()[0][:120] if text.strip() else ''
    return 'corrupt', f'{type(exc).__name__}: {first}'


# ---------------------------------------------------------------------------------------------
# The figure grid: which configurations make each figure
# ---------------------------------------------------------------------------------------------

FIGURES = ('figure1a', 'figure1b', 'figure2', 'figure3')


@dataclass(frozen=True)
class Configuration:
    """One curve of a figure: a setting of the grid flags, trained over several seeds.

    channels and pretrain are MNIST's (in_channels = dim_int = channels); None for CIFAR.
    `name` prefixes the run files (RKHS_l5_p0_s3.pkl); `label` and `style` are how it is drawn.
    """
    dataset: str     # 'MNIST' or 'CIFAR10'
    model: str
    layers: int
    channels: int | None
    pretrain: int | None
    name: str
    label: str
    style: int       # the value that picks the line style: L, or C in Figure 2
    # The figure whose runs this configuration reuses, when it is one of that figure's curves
    # (Figure 2's 32 channels are Figure 1a's RKHS L=20, as in the release): its runs are that
    # figure's runs, in that figure's folder, never trained twice.
    shared_from: str | None = None

    def flags(self) -> list[str]:
        """The experiment script's flags that this configuration sets."""
        flags = ['--model', self.model, '--layers', str(self.layers)]
        if self.dataset == 'MNIST':
            flags += ['--pretrain', str(self.pretrain), '--in_channels', str(self.channels),
                      '--dim_int', str(self.channels)]
        return flags


# The experiment flags a figure's grid sets for each run (their argparse destinations).
GRID_DESTS = ('model', 'layers', 'pretrain', 'in_channels', 'dim_int')


def figure_grid(figure: str) -> list[Configuration]:
    """The configurations of one figure, in the paper's order."""
    if figure in ('figure1a', 'figure1b'):
        passes = 0 if figure == 'figure1a' else 3
        return [Configuration('MNIST', model, layers, 32, passes, f'{model}_l{layers}_p{passes}',
                              f'{model} L={layers}', layers)
                for model in ('RKHS', 'SHL') for layers in (5, 10, 20)]
    if figure == 'figure2':
        return [Configuration('MNIST', 'RKHS', 20, 32, 0, 'RKHS_l20_p0', 'RKHS C=32', 32, 'figure1a')] + [
            Configuration('MNIST', 'RKHS', 20, channels, 0, f'RKHS_l20_c{channels}', f'RKHS C={channels}',
                          channels) for channels in (8, 4)]
    if figure == 'figure3':
        return [Configuration('CIFAR10', model, layers, None, None, f'{model}_l{layers}',
                              f'{model} L={layers}', layers)
                for model in ('RKHS', 'SHL') for layers in (1, 10, 20)]
    raise ValueError(f'unknown figure {figure!r}; choose from {", ".join(FIGURES)}')


def figure_folder_prefix(figure: str) -> str:
    """MNIST_... or CIFAR_...: the prefix of a figure's results and checkpoint folders."""
    return 'CIFAR' if figure == 'figure3' else 'MNIST'


def resume_state_name(stem: str, seeds=None) -> str:
    """The file name of a run's resume state: '<save stem>.resume.pt', and for a batch of seeds
    (MNIST's --seeds) that of the batch. runstate.py writes it; reproduce.py looks for it."""
    if seeds:
        stem = f'{stem}_s{"-".join(map(str, seeds))}'
    return f'{stem}.resume.pt'


def figure_tag(figure: str) -> str:
    """fig1a, fig1b, fig2, fig3: the figure's sub-folder."""
    return figure.replace('figure', 'fig')


def figure_folders(figure: str) -> list[str]:
    """The results sub-folders that hold a figure's runs, relative to the results root: its own,
    and those of the figures it shares configurations with."""
    prefix = figure_folder_prefix(figure)
    tags = [figure_tag(figure)] + [figure_tag(config.shared_from) for config in figure_grid(figure)
                                   if config.shared_from]
    return [os.path.join(f'{prefix}_experiments', tag) for tag in dict.fromkeys(tags)]
