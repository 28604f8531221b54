"""Evaluation: the error rates a run records, and --evaluate of a checkpoint.

Evaluation runs in eval mode under no_grad, in chunks of at most --test_batch_size images; the
results never depend on the chunk (eval-mode BatchNorm uses running statistics).
"""
from __future__ import annotations

import torch

from .errors import EXIT_OK, UsageError
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


def _recorded_images(stored, full: int) -> str:
    """What the checkpoint's own run measured its test error on: --subset cuts the test set too."""
    if stored.synthetic:
        return f'{stored.subset or "the synthetic"} synthetic test images'
    return (f'its first {min(stored.subset, full):,} test images (--subset)' if stored.subset
            else f'{full:,} test images')


def evaluate_checkpoint(model, checkpoint: dict, stored, parts: dict, test_set, transform, chunk,
                        path: str) -> int:
    """--evaluate: load the checkpoint's parts into `model`, print its test error, write nothing.
    stored: the Config of the run that saved it."""
    try:
        for name, module in parts.items():
            module.load_state_dict(checkpoint[name])
    except (RuntimeError, TypeError, KeyError, ValueError, AttributeError) as exc:
        raise UsageError(f'{path} is not a checkpoint of this project (it does not fit the network '
                         f'its arguments build: {first_line(exc)})') from None
    model.eval()
    error = count_errors(model, test_set.images, test_set.labels, transform, chunk).item() / len(test_set)
    print(f'test error {100 * error:.4f}% on {len(test_set):,} test images (checkpoint of epoch '
          f'{checkpoint["epoch"]}, whose run recorded {100 * checkpoint["test_error"]:.4f}% on '
          f'{_recorded_images(stored, len(test_set))})')
    return EXIT_OK
