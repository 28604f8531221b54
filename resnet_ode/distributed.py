"""One run over several processes with torchrun (DistributedDataParallel), or none.

Without torchrun, `SINGLE` stands in: every collective is the identity, so the engine has one
code path. Under torchrun, each rank takes an equal contiguous share of every global batch and
of the evaluation sets; counts and losses are summed across ranks.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist


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
    return Distributed(device) if launched_by_torchrun() else SINGLE


class Distributed(Single):
    """A process group: NCCL for CUDA devices, gloo for CPU. One rank per device."""

    def __init__(self, device: torch.device):
        self.rank = int(os.environ['RANK'])
        self.world_size = int(os.environ['WORLD_SIZE'])
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        self.is_main = self.rank == 0
        if device.type == 'cuda':
            device = torch.device('cuda', self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        torch_dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')

    def broadcast_int(self, value: int) -> int:
        t = torch.tensor(value, dtype=torch.long, device=self.device)
        torch_dist.broadcast(t, src=0)
        return int(t.item())

    def wrap(self, model, compile_model: bool = False):
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == 'cuda' else None
        wrapped = DistributedDataParallel(model, device_ids=ids)
        return torch.compile(wrapped) if compile_model else wrapped

    def shard(self, x):
        return x.tensor_split(self.world_size)[self.rank]

    def all_reduce_sum(self, t):
        t = t.clone()
        torch_dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        t = torch.tensor(1 if flag else 0, device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    def sync_buffers(self, module):
        for buffer in module.buffers():
            torch_dist.broadcast(buffer, src=0)

    def broadcast_module(self, module):
        for tensor in list(module.parameters()) + list(module.buffers()):
            torch_dist.broadcast(tensor.data, src=0)

    def barrier(self):
        torch_dist.barrier()

    def print(self, *args, **kwargs):
        if self.is_main:
            print(*args, flush=True, **kwargs)

    def close(self, together: bool = True):
        """Leave the group; `together` (a run that ended normally on every rank) waits for all
        ranks first. Without that barrier the faster rank could tear its gloo connections down
        while the other still finishes its last collective: a rank 0 abort ("terminate called
        without an active exception") was seen once here, on a heavily loaded machine. After a
        failure there is no barrier, since the other rank may never reach it."""
        if torch_dist.is_initialized():
            try:
                if together:
                    torch_dist.barrier()
            finally:
                torch_dist.destroy_process_group()
