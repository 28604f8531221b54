"""Evaluation: the error rates a run records, and --evaluate of a checkpoint.

Evaluation runs in eval mode under no_grad, in chunks of at most --test_batch_size images; the
results never depend on the chunk (eval-mode BatchNorm uses running statistics).
"""
from __future__ import annotations

import torch

from .faults import fault_point


def eval_chunk(caps: dict, device: torch.device, test_batch_size: int) -> int:
    """The evaluation chunk for this device type (caps: {'cpu': n, 'cuda': m}), at most
    --test_batch_size."""
    return min(test_batch_size, caps.get(device.type, caps['cpu']))


@torch.no_grad()
def count_errors(model, images_u8, labels, transform, chunk, members: int = 1) -> torch.Tensor:
    """Misclassified images per member, a (members,) device tensor (no host sync). Every member
    sees the same images."""
    wrong = torch.zeros(members, dtype=torch.long, device=labels.device)
    for start in range(0, labels.shape[0], chunk):
        images = transform(images_u8[start:start + chunk])
        if members > 1:
            images = images.repeat(members, *([1] * (images.dim() - 1)))
        logits = model(images).unflatten(0, (members, -1))
        wrong += (logits.argmax(-1) != labels[start:start + chunk]).sum(-1)
    return wrong


def evaluate(exp, generator, dist) -> tuple[list, list]:
    """Each member's (train error, test error) in [0, 1], in eval mode. One host sync for all."""
    exp.model.eval()
    images, labels, transform = exp.train_eval_sample(generator)
    test = exp.test_set
    wrong_train = count_errors(exp.model, dist.shard(images), dist.shard(labels), transform,
                               exp.eval_chunk, exp.members)
    fault_point('evaluation')
    wrong_test = count_errors(exp.model, dist.shard(test.images), dist.shard(test.labels),
                              exp.eval_transform, exp.eval_chunk, exp.members)
    wrong_train, wrong_test = dist.all_reduce_sum(torch.stack([wrong_train, wrong_test])).tolist()
    return [w / labels.shape[0] for w in wrong_train], [w / len(test) for w in wrong_test]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__
