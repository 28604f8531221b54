"""Torch-free helpers shared by the scripts: atomic files and the figure grid.

reproduce.py and plot_figures.py import this module and nothing that needs torch, so the sweep
runner and the plotting script start fast and work where torch is not installed.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import math
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
# SIGKILL) to this process the n-th time it reaches the point; "<point>@<n>:<ERRNO>" (ENOSPC,
# EROFS, ...) raises that OSError there instead, as a full disk or a read-only folder would.
# Unset in normal runs. The points: 'write' (inside every atomic write, the new content complete
# on disk, not yet renamed into place) here, and the training run's in runstate and the scripts.
FAULT_ENV = 'RESNET_ODE_FAULT'
_fault_counts: dict = {}


def fault_point(name: str, path: str | None = None):
    spec = os.environ.get(FAULT_ENV)
    if not spec or not spec.startswith(name + '@'):
        return
    count, _, what = spec[len(name) + 1:].partition(':')
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] != int(count):
        return
    if what.startswith('E'):
        code = getattr(errno, what)
        raise OSError(code, os.strerror(code), path)
    os.kill(os.getpid(), getattr(signal, what or 'SIGKILL'))


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
        fault_point('write', path)  # the worst instant: the new file complete, the old one still in place
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
    """The SHA-256 of a regular file. Anything else is refused, not read: a FIFO would block and
    a link to /dev/zero would never end (open_regular checks on the open descriptor)."""
    digest = hashlib.sha256()
    try:
        with open_regular(path) as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                digest.update(block)
    except NotARegularFile as exc:
        raise DownloadError(f'{path} is {exc.strerror}; move it away') from None
    except OSError as exc:
        raise DownloadError(f'{path} cannot be read ({exc.strerror or exc})') from None
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
# The names of a run's files (shared by the experiment scripts and reproduce.py)
# ---------------------------------------------------------------------------------------------

RESUME_SUFFIX = '.resume.pt'
# A --seeds run's resume state. Not '<something>.resume.pt': every such name is the state of the
# single run whose --save is '<something>.pkl', so a batch's state could collide with it.
BATCH_RESUME_SUFFIX = '.batch-resume.pt'


def seed_list_text(seeds) -> str:
    """Seeds as a short, lossless text: '3-5-7'; three or more consecutive ascending seeds as a
    range, '0to19' (so that a sweep's 20 or 100 consecutive seeds make a short name)."""
    parts, start = [], 0
    while start < len(seeds):
        end = start
        while end + 1 < len(seeds) and seeds[end + 1] == seeds[end] + 1:
            end += 1
        if end - start >= 2:
            parts.append(f'{seeds[start]}to{seeds[end]}')
        else:
            parts.extend(str(seed) for seed in seeds[start:end + 1])
        start = end + 1
    return '-'.join(parts)


def parse_seed_list_text(text: str) -> list[int] | None:
    """The seeds that seed_list_text wrote, or None for text it never writes."""
    seeds = []
    for part in text.split('-'):
        low, _, high = part.partition('to')
        if not (low.isdigit() and (not high or high.isdigit())):
            return None
        seeds.extend(range(int(low), int(high) + 1) if high else [int(low)])
    return seeds if seed_list_text(seeds) == text else None


def resume_state_name(stem: str, seeds=None) -> str:
    """The file name of a run's resume state, in its results folder: '<save stem>.resume.pt' for a
    single run, '<save stem>_s<seeds>.batch-resume.pt' for the batch of a --seeds run (seeds as
    seed_list_text writes them). The two forms can never be the same name."""
    if not seeds:
        return stem + RESUME_SUFFIX
    return f'{stem}_s{seed_list_text(list(seeds))}{BATCH_RESUME_SUFFIX}'


def batch_states(folder: str, stem: str) -> list[tuple[str, list[int]]]:
    """The resume states of interrupted --seeds runs of --save <stem>.pkl in `folder`, with their
    seeds, sorted by name: what a run without --seeds, or with other seeds, should mention."""
    prefix = f'{stem}_s'
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    found = []
    for name in names:
        if name.startswith(prefix) and name.endswith(BATCH_RESUME_SUFFIX):
            seeds = parse_seed_list_text(name[len(prefix):-len(BATCH_RESUME_SUFFIX)])
            if seeds:
                found.append((os.path.join(folder, name), seeds))
    return found


# ---------------------------------------------------------------------------------------------
# Reading results pickles without running code
# ---------------------------------------------------------------------------------------------

# What a results pickle may hold: plain Python values (dict, list, tuple, str, bytes, int, float,
# bool, None) and numpy arrays and scalars of plain numeric or bool dtypes. The release's 335
# stored pickles hold dicts of str, int, float and little-endian float32 arrays (tensor.numpy()).
#
# numpy rebuilds an array through three globals: numpy.dtype(type string, align, copy) followed
# by a BUILD with the dtype's state; _reconstruct(ndarray, shape, b'b') followed by a BUILD with
# (version, shape, dtype, fortran, raw bytes); scalar(dtype, raw bytes); and, in protocol 5,
# _frombuffer(bytes, dtype, shape, order). None of them is handed to the pickle: a crafted dtype
# state can declare an object field while saying the dtype holds no objects, and the array's
# raw bytes are then read as a pointer (a native crash, or worse). Each global is replaced by a
# stand-in that accepts only the plain forms and builds the dtype and the array itself.
PLAIN_DTYPES = frozenset(('b1', 'i1', 'u1', 'i2', 'u2', 'i4', 'u4', 'i8', 'u8',
                          'f2', 'f4', 'f8', 'c8', 'c16'))
_BYTE_ORDERS = frozenset('<>|=')
_NUMPY_MODULES = ('numpy.core.multiarray', 'numpy._core.multiarray')  # numpy 1 and 2 spellings


class UnsafePickle(pickle.UnpicklingError):
    """A pickle that asks for something a results file never holds (it could run code, or crash
    the process through a crafted numpy dtype)."""


class NotARegularFile(OSError):
    """A path that is a FIFO, a device, a socket or a folder: reading it could block forever or
    never end, so it is refused before it is opened for reading."""


def open_regular(path: str):
    """Open `path` for binary reading only if it is a regular file (following symlinks).

    The open itself cannot block: O_NONBLOCK makes opening a FIFO with no writer return at once,
    and the file's type is then checked on the open descriptor (no race with a rename). Raises
    NotARegularFile naming what it is, or the OSError of the open (FileNotFoundError, ...).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_NOCTTY', 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(errno.EINVAL, f'not a regular file but {_file_kind(mode)}', path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, 'rb')
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a FIFO'),
                       (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'),
                       (stat.S_ISSOCK, 'a socket')):
        if test(mode):
            return kind
    return 'a special file'


class _PendingDtype:
    """numpy.dtype(type string, align, copy) as a pickle asks for it; becomes a real dtype only
    once its BUILD state has been checked (resolve)."""

    type_string = byte_order = None  # also what an instance made without __init__ (NEWOBJ) has

    def __init__(self, type_string=None, align=False, copy=True, *extra):
        if extra or not isinstance(type_string, str) or type_string not in PLAIN_DTYPES:
            raise UnsafePickle(f'it asks for a numpy dtype {type_string!r}; a results file holds '
                               f'only plain numeric and bool arrays')
        self.type_string, self.byte_order = type_string, None

    def __setstate__(self, state):
        # The state of a plain dtype: (version, byte order, subarray, names, fields, element
        # size, alignment, flags) = (3, '<', None, None, None, -1, -1, 0). Anything else (fields,
        # sizes, flags such as "holds no objects") is what a crafted dtype is made of.
        if (not isinstance(state, tuple) or len(state) != 8 or state[0] != 3
                or state[1] not in _BYTE_ORDERS or state[2:] != (None, None, None, -1, -1, 0)):
            raise UnsafePickle(f'it holds a numpy dtype {self.type_string} with the state '
                               f'{_short(state)}, which a plain dtype never has')
        self.byte_order = state[1]

    def resolve(self):
        if self.type_string not in PLAIN_DTYPES or self.byte_order is None:
            raise UnsafePickle(f'it holds a numpy dtype {self.type_string} without its state')
        order = '|' if self.type_string in ('b1', 'i1', 'u1') else self.byte_order
        if order == '|' and self.type_string not in ('b1', 'i1', 'u1'):
            raise UnsafePickle(f'it holds a numpy dtype {self.type_string} without a byte order')
        return _numpy().dtype(order + self.type_string)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + '...'


def _dtype_of(value):
    if not isinstance(value, _PendingDtype):
        raise UnsafePickle(f'it gives {type(value).__name__} where a numpy dtype belongs')
    return value.resolve()


def _raw_bytes(value, expected: int) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise UnsafePickle(f'it gives {type(value).__name__} where an array\'s bytes belong')
    if len(value) != expected:
        raise UnsafePickle(f'it declares {expected} bytes of array data and holds {len(value)}')
    return bytes(value)


def _checked_shape(shape) -> tuple:
    if (not isinstance(shape, tuple) or len(shape) > 32
            or not all(type(n) is int and n >= 0 for n in shape)):
        raise UnsafePickle(f'it gives {_short(shape)} as an array shape')
    return shape


class _NdarrayClass:
    """Stands for numpy.ndarray in a pickle: accepted only as _reconstruct's first argument."""


class _PendingArray:
    """_reconstruct(ndarray, (0,), b'b') as a pickle asks for it; its BUILD state supplies the
    shape, dtype and bytes, and load_results swaps it for the array built from them."""

    def __init__(self, subtype=None, shape=None, placeholder=None, *extra):
        if subtype is not _NdarrayClass or extra:
            raise UnsafePickle('it rebuilds something other than a plain numpy array')

    array = None  # until its BUILD state arrives

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise UnsafePickle(f'it holds an array state {_short(state)} that numpy never writes')
        _, shape, dtype, fortran, raw = state
        shape, dtype = _checked_shape(shape), _dtype_of(dtype)
        if type(fortran) is not bool:
            raise UnsafePickle(f'it gives {_short(fortran)} as an array\'s memory order')
        self.array = _array_from(raw, dtype, shape, 'F' if fortran else 'C')


def _array_from(raw, dtype, shape: tuple, order: str):
    np = _numpy()
    data = _raw_bytes(raw, math.prod(shape) * dtype.itemsize)
    return np.frombuffer(data, dtype=dtype).reshape(shape, order=order).copy(order=order)


def _scalar(dtype=None, raw=None, *extra):
    dtype = _dtype_of(dtype)
    if extra:
        raise UnsafePickle('it rebuilds a numpy scalar with extra arguments')
    return _array_from(raw, dtype, (), 'C')[()]


def _frombuffer(buffer=None, dtype=None, shape=None, order=None, *extra):
    dtype, shape = _dtype_of(dtype), _checked_shape(shape)
    if extra or order not in ('C', 'F'):
        raise UnsafePickle(f'it rebuilds an array in memory order {_short(order)}')
    return _array_from(buffer, dtype, shape, order)


RESULTS_GLOBALS = {('numpy', 'dtype'): _PendingDtype, ('numpy', 'ndarray'): _NdarrayClass}
for _module in _NUMPY_MODULES:
    RESULTS_GLOBALS[(_module, '_reconstruct')] = _PendingArray
    RESULTS_GLOBALS[(_module, 'scalar')] = _scalar
for _module in ('numpy.core.numeric', 'numpy._core.numeric'):
    RESULTS_GLOBALS[(_module, '_frombuffer')] = _frombuffer


def _numpy():
    import numpy  # imported on first use: this module stays importable without numpy
    return numpy


class _ResultsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in RESULTS_GLOBALS:
            raise UnsafePickle(f'it asks for {module}.{name}, which a results file never holds')
        return RESULTS_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        raise UnsafePickle('it refers to an object outside the file (a persistent id)')


_PLAIN_VALUES = (str, bytes, int, float, bool, type(None), complex)


def _finished(value):
    """`value` with every pending array replaced by its array, checked all the way down: only
    plain values, containers of them, and numpy arrays and scalars of plain dtypes remain.

    Iterative, so that a deeply nested or self-containing structure costs no recursion.
    """
    np = _numpy()
    done: dict[int, object] = {}

    def settled(item):
        if isinstance(item, _PendingArray):
            if item.array is None:
                raise UnsafePickle('it holds a numpy array that was never given its content')
            return item.array
        if isinstance(item, (_PendingDtype, _NdarrayClass)) or item is _NdarrayClass:
            raise UnsafePickle('it holds a bare numpy dtype or class, which a results file never does')
        return item

    root = settled(value)
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in done:
            continue
        done[id(item)] = item
        kind = type(item)
        if kind in _PLAIN_VALUES:
            continue
        if kind is np.ndarray or isinstance(item, np.generic):
            if item.dtype.str.lstrip('<>|=') not in PLAIN_DTYPES or item.dtype.hasobject:
                raise UnsafePickle(f'it holds a numpy value of dtype {item.dtype}')
            continue
        if kind is dict:
            for key in item:
                if type(key) not in _PLAIN_VALUES:
                    raise UnsafePickle(f'it holds a dict key of type {type(key).__name__}')
            for key, child in item.items():
                item[key] = settled(child)
                stack.append(item[key])
        elif kind is list:
            item[:] = [settled(child) for child in item]
            stack.extend(item)
        elif kind in (tuple, set, frozenset):
            if any(isinstance(child, _PendingArray) for child in item):
                raise UnsafePickle(f'it holds a numpy array inside a {kind.__name__}, which a '
                                   f'results file never does')
            stack.extend(item)
        else:
            raise UnsafePickle(f'it holds a {kind.__name__}, which a results file never does')
    return root


def load_results(path: str):
    """A results pickle, read with an unpickler that can only rebuild plain values and numpy
    arrays of plain numeric and bool dtypes: a crafted file raises UnsafePickle, and neither
    runs code nor builds anything numpy could misread. Only a regular file is opened
    (NotARegularFile otherwise: a FIFO would block forever)."""
    with open_regular(path) as f:
        try:
            loaded = _ResultsUnpickler(f).load()
        except UnsafePickle:
            raise
        except RecursionError:
            raise UnsafePickle('it nests its values too deeply') from None
        except (TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
            # a stand-in called with arguments numpy would never write, or BUILD on a value
            raise UnsafePickle(f'it rebuilds its values in a way numpy never writes '
                               f'({type(exc).__name__}: {_short(str(exc))})') from None
    return _finished(loaded)


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
