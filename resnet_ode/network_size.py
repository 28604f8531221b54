"""How much memory a network needs, so that an absurd size is refused before anything is built.

A --layers 100000000 would take hours only to build its time schedule, then fail to allocate.
Each estimate is a bound from below (parameters, their gradients, one batch's activations),
compared with the memory of the device the run will use.
"""
from __future__ import annotations

import os

import torch

import models

from .errors import UsageError

# Each block of the third stage keeps about three 256 x 8 x 8 maps per image for the backward pass.
CIFAR_STAGE3_ACTIVATIONS_PER_IMAGE = 3 * 256 * 8 * 8
SCHEDULE_BYTES_PER_EVALUATION = 200  # the time schedule's Python objects, per evaluation of f


def memory_limit(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) of the memory a run on `device` can use at most: the GPU's, or the
    machine's RAM (or the container's limit, when lower)."""
    if device.type == 'cuda':
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f'{device}\'s memory'
    limit = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    try:
        with open('/sys/fs/cgroup/memory.max') as f:
            text = f.read().strip()
        if text.isdigit():
            limit = min(limit, int(text))
    except OSError:
        pass
    return limit, 'this machine\'s memory'


def _refuse_beyond_memory(what: str, needed: int, device):
    limit, where = memory_limit(device)
    if needed > limit:
        raise UsageError(f'{what}: the network would need at least {needed / 2 ** 30:,.1f} GiB '
                         f'(parameters, gradients and one batch\'s activations), more than '
                         f'{where} ({limit / 2 ** 30:,.1f} GiB)')


def _tensor_count(build) -> list[int]:
    """Parameters and buffers of the modules build(1) and build(2), made on the meta device
    (nothing allocated): a size linear in its argument is read off the two."""
    with torch.device('meta'):
        return [sum(t.numel() for t in (*module.parameters(), *module.buffers()))
                for module in (build(1), build(2))]


def mnist_block_bytes(config, batch: int) -> int:
    """One member's ODE block in training: its tensors, as many gradients, the activations a
    batch of `batch` images keeps for the backward pass (the state and the hidden layer at every
    evaluation), and the time schedule's objects."""
    field = models.residual_type(config.model)
    sizes = _tensor_count(lambda steps: field(config.in_channels, config.dim_int, steps, 'linear'))
    tensors = sizes[0] + (sizes[1] - sizes[0]) * (config.layers - 1)
    evaluations = config.layers * len(models.STAGE_FRACTIONS[config.method])
    activations = evaluations * batch * (config.in_channels + config.dim_int) * models.MNIST_STATE_SIZE ** 2
    return 4 * (2 * tensors + activations) + SCHEDULE_BYTES_PER_EVALUATION * evaluations


def cifar_bytes(config, batch: int) -> int:
    """The CIFAR network in training: its tensors, as many gradients, and the third stage's
    activations for one batch."""
    sizes = _tensor_count(lambda layers: models.CifarResNet(config.model, layers))
    tensors = sizes[0] + (sizes[1] - sizes[0]) * (config.layers - 1)
    return 4 * (2 * tensors + batch * config.layers * CIFAR_STAGE3_ACTIVATIONS_PER_IMAGE)


def check_fits(config, training: bool, device):
    """The network of an image experiment fits in the memory of its device (with --seeds, all
    members side by side). `training`: count one batch's activations (the global batch: an
    over-estimate under torchrun)."""
    batch = config.batch_size if training else 0
    if config.dataset == 'CIFAR10':
        _refuse_beyond_memory(f'--layers {config.layers}', cifar_bytes(config, batch), device)
        return
    members = len(config.seeds) if getattr(config, 'seeds', None) and training else 1
    _refuse_beyond_memory(f'--layers {config.layers} --in_channels {config.in_channels} --dim_int '
                          f'{config.dim_int}' + (f' with {members} seeds' if members > 1 else ''),
                          members * mnist_block_bytes(config, batch), device)


def check_fits_synthetic(config, method: str, device):
    """The synthetic experiment's data, network and activations fit in memory: its N points in
    R^d and R^q, its (N+1) parameter nodes of a q x r layer (two for SHL), and the state and
    hidden layer of every point at every evaluation."""
    evaluations = config.num_layers * len(models.STAGE_FRACTIONS[method])
    nodes = (config.num_layers + 1) * config.dim * config.dim_int * 2
    points = 4 * config.dataset_size * (config.data_dim + config.dim)
    activations = evaluations * config.dataset_size * (config.dim + config.dim_int)
    needed = 4 * (3 * nodes + points + activations) + SCHEDULE_BYTES_PER_EVALUATION * evaluations
    _refuse_beyond_memory(f'-N {config.dataset_size} -q {config.dim} -r {config.dim_int} -l '
                          f'{config.num_layers}', needed, device)
