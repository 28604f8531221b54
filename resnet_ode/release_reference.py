"""The release's stored runs, the reference of the comparison: download them, check them, read
them.

The release stored every run behind Figures 1 to 3: 279 MNIST runs in 14 configurations and 56
CIFAR-10 runs in 6 (rbarboni/FlowResNets at commit 54bc56f; deleted at its newest commit).
release_runs.sha256 pins each file's SHA-256. The reference folder must hold exactly those
files, byte for byte, and only they are read as the release's runs: a file added to the folder
would otherwise be counted as one of the release's runs.
"""
from __future__ import annotations

import os

from . import recorded_runs
from .downloads import download_verified, read_sha256sums
from .embeddings import RELEASE_COMMIT, RELEASE_REPOSITORY, REPO_DIR
from .errors import DownloadError
from .files import sha256

DEFAULT_DIR = os.path.join(REPO_DIR, 'release_runs')
# `sha256sum` of the 335 files as the release stored them (paths relative to its repository).
SHA256SUMS = os.path.join(REPO_DIR, 'release_runs.sha256')
DOWNLOAD_URL = f'https://github.com/{RELEASE_REPOSITORY}/raw/{RELEASE_COMMIT}/'


def download(directory: str = DEFAULT_DIR, base_url: str | None = None, log=print) -> int:
    """Fetch the release's stored runs missing from `directory`, all or nothing, each SHA-256
    verified. Returns the number of files fetched."""
    return download_verified(read_sha256sums(SHA256SUMS), base_url or DOWNLOAD_URL, directory, log)


def reference_problem(directory: str) -> str | None:
    """Why `directory` does not hold exactly the release's 335 stored runs byte for byte (the
    pinned SHA-256 of each, and no other results file), or None when it does."""
    pinned = read_sha256sums(SHA256SUMS)  # {path relative to the reference folder: sha256}
    missing, differing = [], []
    for name, digest in pinned.items():
        path = os.path.join(directory, name)
        if not os.path.lexists(path):
            missing.append(name)
            continue
        try:
            if sha256(path) != digest:
                differing.append(name)
        except DownloadError:  # not a regular file, or unreadable
            differing.append(name)
    extra = [os.path.relpath(path, directory) for path in recorded_runs.find_pickles(directory)
             if os.path.normpath(os.path.relpath(path, directory)) not in pinned]
    parts = [f'{len(names)} {what}, e.g. {names[0]}'
             for names, what in ((missing, 'missing'), (differing, 'not the release\'s bytes'),
                                 (extra, 'not one of the release\'s files')) if names]
    return '; '.join(parts) or None


def load_release_runs(directory: str) -> list:
    """The release's stored runs in `directory`: the pinned files only, each read as a run."""
    return recorded_runs.load_runs([directory], only=set(read_sha256sums(SHA256SUMS)))
