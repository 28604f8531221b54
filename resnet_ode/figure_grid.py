"""The figure grid: which configurations make each figure, and where their runs live.

One curve of the paper is one configuration (a setting of the grid flags) over several seeds.
The sweep (reproduce.py) runs a figure's grid; the figures (plot_figures.py) draw it.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

FIGURES = ('figure1a', 'figure1b', 'figure2', 'figure3')
FIGURE_NAMES = tuple(figure[len('figure'):] for figure in FIGURES)  # '1a', '1b', '2', '3'
SYNTHETIC = 'synthetic'  # the synthetic experiment's sweep and figure (not part of 'all')
SYNTHETIC_RESULTS = os.path.join('synthetic_experiments', 'sweep')


def figure_name(text: str, allowed=FIGURES + ('all', SYNTHETIC)) -> str:
    """'figure1a' from 'figure1a', 'fig1a' (the results folder's name) or '1a'. An argparse type:
    anything not in `allowed` raises ArgumentTypeError, which argparse prints as one line."""
    name = re.sub('^fig(ure)?', '', text.lower())
    name = name if name in ('all', SYNTHETIC) else 'figure' + name
    if name not in allowed:
        shown = [item.replace('figure', '') for item in allowed]
        raise argparse.ArgumentTypeError(f'unknown figure {text!r}; choose from {", ".join(shown)}')
    return name

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
    # The figure whose runs this configuration reuses, when it is one of that figure's curves
    # (Figure 2's 32 channels are Figure 1a's RKHS L=20, as in the release): its runs are that
    # figure's runs, in that figure's folder, never trained twice.
    shared_from: str | None = None

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
        return [Configuration('MNIST', 'RKHS', 20, 32, 0, 'RKHS_l20_p0', 'RKHS C=32', 32, 'figure1a')] + [
            Configuration('MNIST', 'RKHS', 20, channels, 0, f'RKHS_l20_c{channels}', f'RKHS C={channels}',
                          channels) for channels in (8, 4)]
    if figure == 'figure3':
        return [Configuration('CIFAR10', model, layers, None, None, f'{model}_l{layers}',
                              f'{model} L={layers}', layers)
                for model in ('RKHS', 'SHL') for layers in (1, 10, 20)]
    raise ValueError(f'unknown figure {figure!r}; choose from {", ".join(FIGURES)}')


def figure_folder_prefix(figure: str) -> str:
    """MNIST or CIFAR: the prefix of a figure's results and checkpoint folders."""
    return 'CIFAR' if figure == 'figure3' else 'MNIST'


def figure_tag(figure: str) -> str:
    """fig1a, fig1b, fig2, fig3: the figure's sub-folder."""
    return figure.replace('figure', 'fig')


def results_dir(figure: str) -> str:
    """The folder of a figure's runs, relative to the results root."""
    if figure == SYNTHETIC:
        return SYNTHETIC_RESULTS
    return os.path.join(f'{figure_folder_prefix(figure)}_experiments', figure_tag(figure))


def checkpoint_dir(figure: str) -> str:
    return os.path.join(f'{figure_folder_prefix(figure)}_checkpoint', figure_tag(figure))


def figure_folders(figure: str) -> list[str]:
    """The results sub-folders that hold a figure's runs, relative to the results root: its own,
    and those of the figures it shares configurations with."""
    if figure == SYNTHETIC:
        return [SYNTHETIC_RESULTS]
    owners = [figure] + [config.shared_from for config in figure_grid(figure) if config.shared_from]
    return [results_dir(owner) for owner in dict.fromkeys(owners)]


# The synthetic experiment's sweep. Its script's flags that the grid sets (argparse destinations).
SYNTHETIC_GRID_DESTS = ('model', 'dim', 'dim_int', 'nu', 'num_layers', 'matrix')


def synthetic_configurations() -> list[tuple[str, list]]:
    """(name, flags) of each curve: RKHS for q in {2, 4, 8} and r in {20, 200}, with Gaussian
    (nu = -1) and Student-t (nu = 1) features; SHL at q = r in {2, 4, 8} for comparison."""
    rkhs = [(f'RKHS_q{q}_r{r}_{tag}', ['--model', 'RKHS', '--dim', str(q), '--dim_int', str(r), '--nu', str(nu)])
            for tag, nu in (('gauss', -1), ('t1', 1)) for q in (2, 4, 8) for r in (20, 200)]
    return rkhs + [(f'SHL_q{q}_r{q}', ['--model', 'SHL', '--dim', str(q), '--dim_int', str(q)]) for q in (2, 4, 8)]
