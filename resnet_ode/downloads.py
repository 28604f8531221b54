"""Verified downloads, all or nothing: the release's embedding files and stored runs."""
from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request

from .errors import DownloadError
from .files import missing_ancestors, sha256

DOWNLOAD_TIMEOUT_SECONDS = 60


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
    base_url + path, verify each SHA-256, then move them all in; return how many were fetched.

    All or nothing: the files go to a temporary folder first and are moved into `directory` only
    when every one arrived intact; on any failure nothing is left behind, no partial file and no
    folder this call created. A file already present must be a regular file with its checksum.
    """
    if not directory:
        raise DownloadError('the folder to download into has an empty name')
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
        _download_into(directory, missing, files, base_url, log)
    except BaseException:
        for folder in reversed(created):  # deepest first; only folders this call made
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return len(missing)


def _download_into(directory: str, missing: list, files: dict, base_url: str, log):
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
