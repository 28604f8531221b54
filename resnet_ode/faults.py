"""Fault points: where the test suite kills a run, or fails a write, at a chosen instant.

RESNET_ODE_FAULT="<point>@<n>[:<SIGNAL>]" sends the signal (default SIGKILL) to this process the
n-th time it reaches the point; "<point>@<n>:<ERRNO>" (ENOSPC, EROFS, ...) raises that OSError
there instead, as a full disk or a read-only folder would. Unset in normal runs, where a fault
point costs one dictionary lookup.
"""
from __future__ import annotations

import errno
import os
import signal

FAULT_ENV = 'RESNET_ODE_FAULT'
counts: dict = {}  # point -> times reached in this process (the tests reset it between runs)


def fault_point(name: str, path: str | None = None):
    spec = os.environ.get(FAULT_ENV)
    if not spec or not spec.startswith(name + '@'):
        return
    count, _, what = spec[len(name) + 1:].partition(':')
    counts[name] = counts.get(name, 0) + 1
    if counts[name] != int(count):
        return
    if what.startswith('E'):
        code = getattr(errno, what)
        raise OSError(code, os.strerror(code), path)
    os.kill(os.getpid(), getattr(signal, what or 'SIGKILL'))
