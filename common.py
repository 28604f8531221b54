"""Torch-free helpers shared by the scripts: atomic files and the figure grid.

reproduce.py and plot_figures.py import this module and nothing that needs torch, so the sweep
runner and the plotting script start fast and work where torch is not installed.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from typing import Callable

# ---------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable, binary: bool = True) -> None:
    """write(file) into a temporary file beside `path`, fsync it, then os.replace it into place.

    A kill at any instant leaves either the old file or the new one, never a mix. The file gets
    the permissions any new file would get (0644 under umask 022), not mkstemp's private 0600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, 'wb' if binary else 'w') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_pickle(obj, path: str) -> None:
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))


# ---------------------------------------------------------------------------------------------
# The figure grid: which configurations make each figure
# ---------------------------------------------------------------------------------------------

FIGURES = ('figure1a', 'figure1b', 'figure2', 'figure3')


@dataclass(frozen=True)
class Configuration:
    """One curve of a figure: a setting of the grid flags, trained over several seeds.

    channels and pretrain are MNIST's (in_channels = dim_int = channels); None for CIFAR.
    `name` prefixes the run files (RKHS_l5_p0_s3.pkl); `label` and `style` are how it is drawn.
    """
    dataset: str     # 'MNIST' or 'CIFAR10'
    model: str
    layers: int
    channels: int | None
    pretrain: int | None
    name: str
    label: str
    style: int       # the value that picks the line style: L, or C in Figure 2

    def flags(self) -> list[str]:
        """The experiment script's flags that this configuration sets."""
        flags = ['--model', self.model, '--layers', str(self.layers)]
        if self.dataset == 'MNIST':
            flags += ['--pretrain', str(self.pretrain), '--in_channels', str(self.channels),
                      '--dim_int', str(self.channels)]
        return flags


# The experiment flags a figure's grid sets for each run (their argparse destinations).
GRID_DESTS = ('model', 'layers', 'pretrain', 'in_channels', 'dim_int')


def figure_grid(figure: str) -> list[Configuration]:
    """The configurations of one figure, in the paper's order."""
    if figure in ('figure1a', 'figure1b'):
        passes = 0 if figure == 'figure1a' else 3
        return [Configuration('MNIST', model, layers, 32, passes, f'{model}_l{layers}_p{passes}',
                              f'{model} L={layers}', layers)
                for model in ('RKHS', 'SHL') for layers in (5, 10, 20)]
    if figure == 'figure2':
        return [Configuration('MNIST', 'RKHS', 20, channels, 0, f'RKHS_l20_c{channels}',
                              f'RKHS C={channels}', channels) for channels in (32, 8, 4)]
    if figure == 'figure3':
        return [Configuration('CIFAR10', model, layers, None, None, f'{model}_l{layers}',
                              f'{model} L={layers}', layers)
                for model in ('RKHS', 'SHL') for layers in (1, 10, 20)]
    raise ValueError(f'unknown figure {figure!r}; choose from {", ".join(FIGURES)}')


def figure_folder_prefix(figure: str) -> str:
    """MNIST_... or CIFAR_...: the prefix of a figure's results and checkpoint folders."""
    return 'CIFAR' if figure == 'figure3' else 'MNIST'


def figure_tag(figure: str) -> str:
    """fig1a, fig1b, fig2, fig3: the figure's sub-folder."""
    return figure.replace('figure', 'fig')
