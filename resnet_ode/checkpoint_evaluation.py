"""--evaluate: a best-model checkpoint loaded, checked and evaluated on the test set; nothing is
written. Imported only by --evaluate.
"""
from __future__ import annotations

from . import gate
from .checkpoints import CHECKPOINT_FORMAT, load_torch
from .errors import EXIT_OK, UsageError
from .evaluation import count_errors, first_line


def load_checkpoint(path: str, rules, parts: tuple, device):
    """A best-model checkpoint of this project for the experiment of `rules`, checked before use:
    its format, its arguments (through the gate, as a command line's, for the network to run on
    `device`), and its parts (`parts`, state dicts). Returns (checkpoint, its Config); UsageError
    otherwise."""
    checkpoint = load_torch(path, 'checkpoint')
    if not isinstance(checkpoint, dict) or checkpoint.get('dataset') != rules.dataset:
        raise UsageError(f'{path} is not a checkpoint of this project for {rules.dataset}')

    def refuse(why):
        raise UsageError(f'{path} is not a checkpoint of this project ({why})')

    if checkpoint.get('format') != CHECKPOINT_FORMAT:
        refuse(f'format {checkpoint.get("format")!r}; this version writes {CHECKPOINT_FORMAT}')
    if not isinstance(checkpoint.get('args'), dict):
        refuse(f'its arguments are a {type(checkpoint.get("args")).__name__}, not a dict')
    try:
        stored = gate.validate(rules, checkpoint['args'], gate.CHECKPOINT, stored_device=device)
    except UsageError as exc:
        refuse(str(exc))
    for name in parts:
        if not isinstance(checkpoint.get(name), dict):
            refuse(f'no {name}')
    if not isinstance(checkpoint.get('epoch'), int) or isinstance(checkpoint.get('epoch'), bool):
        refuse(f'its epoch is {checkpoint.get("epoch")!r}')
    if not isinstance(checkpoint.get('test_error'), float):
        refuse(f'its test error is {checkpoint.get("test_error")!r}')
    return checkpoint, stored


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
