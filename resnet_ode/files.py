"""Files on disk: atomic writes, safe opening, and the folders a command may write in.

Every file of the project is written atomically (atomic_write): a kill at any instant leaves the
old file or the new one, never a mix. Only regular files are opened for reading (open_regular):
a FIFO would block forever and a link to /dev/zero would never end.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import stat
import tempfile
from typing import Callable

from .errors import DownloadError, UsageError, WriteFailed
from .faults import fault_point

# An atomic write's temporary file is named '.<name>.<8 random characters>.tmp' (mkstemp).
TEMPORARY_NAME_EXTRA = len('.') + len('.') + 8 + len('.tmp')


def atomic_write(path: str, write: Callable, binary: bool = True) -> None:
    """write(file) into a temporary file beside `path`, fsync it, then os.replace it into place.

    The file gets the permissions any new file would get (0644 under umask 022), not mkstemp's
    private 0600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        mask = os.umask(0)  # the only way to read the umask is to set it; put it straight back
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
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


def write_bytes(data, path: str, fault: str):
    """atomic_write of `data`, with a failed write raised as WriteFailed. The content is made in
    memory first: torch's own writer turns a full disk into 'unexpected pos ...', while a plain
    write of the bytes says ENOSPC. `fault`: the name of its fault point (tests)."""
    def write(f):
        fault_point(fault, path)
        f.write(data)
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise WriteFailed(path, exc) from None


def save_pickle(obj, path: str) -> None:
    """A results pickle, atomically."""
    write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), path, 'write-results')


def write_probe(folder: str):
    """Create a probe file in `folder` and remove it at once: whether a file can be created there
    (the permission bits say nothing for root, nor for a read-only file system). Raises the
    OSError of the attempt when it cannot."""
    fd, probe = tempfile.mkstemp(prefix='.probe.', dir=folder)
    os.close(fd)
    os.remove(probe)


def missing_ancestors(path: str) -> list[str]:
    """`path` and each of its parents that does not exist yet, outermost first: what creating
    `path` would create, and so what a failed attempt must remove."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing[::-1]


def nearest_existing(path: str) -> str:
    """The deepest existing folder or file on the way to `path` (absolute): where creating the
    missing rest would start."""
    missing = missing_ancestors(path or '.')
    return os.path.dirname(missing[0]) if missing else os.path.abspath(path or '.')


def writable_folder_problem(flag: str, folder: str) -> str | None:
    """Why `folder` can neither be written nor created, or None; nothing is created to find out."""
    start = nearest_existing(folder)
    if not os.path.isdir(start):
        return f'{flag} {folder}: {start} is not a folder'
    try:
        write_probe(start)
    except OSError:
        return f'{flag} {folder}: {start} is not writable'
    return None


def check_writable_folder(flag: str, folder: str):
    problem = writable_folder_problem(flag, folder)
    if problem:
        raise UsageError(problem)


def name_max(folder: str) -> int:
    """The longest file name, in bytes, that the file system of `folder` accepts."""
    try:
        return os.pathconf(nearest_existing(folder), 'PC_NAME_MAX')
    except (OSError, ValueError, AttributeError):
        return 255


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
            raise NotARegularFile(errno.EINVAL, f'not a regular file but {file_kind(mode)}', path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, 'rb')
    except BaseException:
        os.close(fd)
        raise


def file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a FIFO'),
                       (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'),
                       (stat.S_ISSOCK, 'a socket')):
        if test(mode):
            return kind
    return 'a special file'


def special_file_kind(path: str) -> str | None:
    """What `path` is when it exists and is not a regular file (following links), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


def sha256(path: str) -> str:
    """The SHA-256 of a regular file; anything else raises DownloadError, unread."""
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
