"""A run's process group under torchrun (DistributedDataParallel): each rank takes an equal
contiguous share of every global batch and of the evaluation sets; counts and losses are summed
across ranks. Imported only when torchrun started the process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist


class Distributed:
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
