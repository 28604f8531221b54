"""The processes of one run: one, or several under torchrun (process_group.py).

Without torchrun, `SINGLE` stands in for the process group: every collective is the identity, so
the training loop has one code path.
"""
from __future__ import annotations

import os

import torch


class Single:
    rank, world_size, local_rank, is_main = 0, 1, 0, True
    device = None

    def broadcast_int(self, value: int) -> int:
        return value

    def wrap(self, model, compile_model: bool = False):
        """The module the training step calls: compiled on request, else the model itself."""
        return torch.compile(model) if compile_model else model

    def close(self, together: bool = True):
        pass

    def shard(self, x):
        return x

    def all_reduce_sum(self, t):
        return t

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def sync_buffers(self, module):
        pass

    def broadcast_module(self, module):
        pass

    def barrier(self):
        pass

    def print(self, *args, **kwargs):
        print(*args, flush=True, **kwargs)


SINGLE = Single()


def launched_by_torchrun() -> bool:
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and int(os.environ['WORLD_SIZE']) > 1


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ['WORLD_SIZE']) if launched_by_torchrun() else 1


def setup(device: torch.device):
    """SINGLE without torchrun; otherwise join the process group (after the gate, so that a bad
    value fails on every rank at once, before the group exists)."""
    if not launched_by_torchrun():
        return SINGLE
    from .process_group import Distributed  # only under torchrun
    return Distributed(device)
