"""Torch files: the best-model checkpoint, written atomically and read back safely.

Everything is loaded with weights_only=True: tensors and plain values only, no code runs. A file
that cannot be loaded is refused in one line that says what is wrong with it.
"""
from __future__ import annotations

import io
import warnings

import torch

from .errors import UsageError
from .faults import fault_point
from .files import NotARegularFile, open_regular, torch_load_failure, write_bytes

CHECKPOINT_FORMAT = 1


def save_torch(obj, path: str, fault: str = 'write-checkpoint'):
    """torch.save, atomically; a failed write raises WriteFailed. `fault`: its fault point."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(buffer.getbuffer(), path, fault)


def load_torch(path: str, what: str):
    """torch.load with weights_only=True, of a regular file only (a FIFO would block forever);
    UsageError saying what is wrong with anything else."""
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise UsageError(f'{what} {path} does not exist') from None
    except NotARegularFile as exc:
        raise UsageError(f'{what} {path} is {exc.strerror}') from None
    except OSError as exc:
        raise UsageError(f'{what} {path} cannot be read ({exc.strerror or exc})') from None
    try:
        with f, warnings.catch_warnings():  # torch warns about pickle protocols on its way to failing
            warnings.simplefilter('ignore')
            return torch.load(f, map_location='cpu', weights_only=True)
    except Exception as exc:
        raise UsageError(_why_unloadable(path, what, exc)) from None


def _why_unloadable(path: str, what: str, exc: Exception) -> str:
    kind, detail = torch_load_failure(path, exc)
    if kind == 'global':
        return (f'refusing to load {what} {path}: it needs {detail}, which a checkpoint of this '
                f'project never holds (weights_only loading); nothing of it was run')
    if kind == 'not_torch':
        return f'{what} {path} is not a torch.save file ({detail})'
    if kind == 'refused':
        return (f'refusing to load {what} {path}: it holds objects that weights_only loading does '
                f'not allow; nothing of it was run')
    return f'{what} {path} is truncated or corrupt ({detail})'


def save_checkpoint(path: str, config, dataset: str, epoch: int, test_error: float, results_file: str,
                    facts: dict, parts: dict):
    """The best model of a run so far: its parts' state dicts (by name), the run's arguments,
    the epoch and test error it was saved at, and where the run's results go."""
    save_torch({'format': CHECKPOINT_FORMAT, 'dataset': dataset, 'args': config.as_dict(),
                'epoch': epoch, 'test_error': test_error, 'results_file': results_file,
                'facts': facts, **parts}, path)
    fault_point('checkpoint')
