"""Pretraining MNIST's input and output networks A and B, when they are drawn rather than loaded
from the release's files (--pretrain P with no such files). Not resumable: a few passes of two
small networks, cheaper to redo than to save.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data
from .errors import EXIT_DIVERGED, PretrainingStopped
from .faults import fault_point


def pretrain(net, train_set, config, dist, stop):
    """Train A followed by B (no ODE block) with plain SGD at a constant rate, then freeze them.

    Pretraining is not resumable: a few passes of two small networks, cheaper to redo than to
    save. On SIGINT/SIGTERM it stops after the current batch and says that nothing was saved.
    """
    stop.defer()  # from here a signal stops after the current batch, with the line below
    device = train_set.labels.device
    embedding = nn.Sequential(net.input_net, net.output_net)
    optimizer = torch.optim.SGD(embedding.parameters(), lr=config.pretrain_lr)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.embedding_seed)
    finite = torch.ones((), dtype=torch.bool, device=device)
    embedding.train()
    for epoch in range(config.pretrain):
        permutation = torch.randperm(len(train_set), device=device, generator=generator)
        for batch in permutation.split(config.batch_size):
            loss = F.cross_entropy(embedding(data.mnist_to_float(train_set.images[batch])),
                                   train_set.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            finite &= torch.isfinite(loss)
            fault_point('pretraining')
            if stop.requested:
                raise PretrainingStopped(
                    f'interrupted by {stop.name} during pretraining pass {epoch + 1}: nothing was '
                    f'saved (pretraining is not resumable); rerun the same command', stop.exit_status)
        if not bool(finite):  # one sync per pass
            raise PretrainingStopped(
                f'error: pretraining diverged (non-finite loss) in pass {epoch + 1} at --pretrain_lr '
                f'{config.pretrain_lr}; lower it. Nothing was written', EXIT_DIVERGED)
        dist.print(f'pretraining pass {epoch + 1}/{config.pretrain} done')
    # Every rank pretrained the same way; rank 0's result is made the one truth all the same.
    dist.broadcast_module(embedding)
