"""The flags both image experiments share, defined once for MNIST_experiments.py and
CIFAR_experiments.py.

Each experiment's whole parser is in its module (mnist.parser, cifar.parser, synthetic.parser),
so that the sweep and the protocol record read a run's flags with a plain import; every flag is
then checked in one place, the gate (resnet_ode.gate).
"""
from __future__ import annotations


def add_common_arguments(parser, *, layers: int, epochs: int, lr_init: float, decay_steps: list,
                         decay_rate: float, folder_prefix: str, release_tbs_is_test_batch_size: bool = True):
    """The flags both experiment scripts share. The one-dash short forms are the release's own
    spellings, so that a command line written for the release runs here unchanged.

    release_tbs_is_test_batch_size: whether the release's -tbs is just --test_batch_size here
    (CIFAR-10); MNIST_experiments.py gives -tbs the release's second meaning too."""
    import models

    results_dir, checkpoint_dir = f'{folder_prefix}_experiments', f'{folder_prefix}_checkpoint'
    add = parser.add_argument
    add('--model', '-m', default='RKHS', choices=list(models.RESIDUALS),
        help='RKHS: fixed random hidden layers; SHL: trained hidden layers (default RKHS)')
    add('--layers', '-l', type=int, default=layers,
        help=f'L: residual steps of the ODE block (MNIST), or blocks of the third stage (CIFAR-10) '
             f'(default {layers})')
    add('--epochs', '-e', type=int, default=epochs,
        help=f'training epochs; 0 evaluates the initial model (default {epochs})')
    add('--lr_init', '-lr', type=float, default=lr_init,
        help=f'initial SGD learning rate (default {lr_init})')
    add('--decay_steps', '-ds', type=int, nargs='*', default=decay_steps,
        help=f'epochs at which the rate is multiplied by --decay_rate (default {decay_steps})')
    add('--decay_rate', '-dr', type=float, default=decay_rate,
        help=f'factor of each decay (default {decay_rate})')
    add('--batch_size', '-bs', type=int, default=256, help='SGD batch size, global (default 256)')
    add('--test_batch_size', *(['-tbs'] if release_tbs_is_test_batch_size else []), type=int,
        default=10_000,
        help='upper bound of the evaluation batch; never changes results (default 10000)')
    add('--save', '-s', default='experiment.pkl',
        help='results file name (a plain name ending in .pkl) in --results_dir; an existing file is '
             'never overwritten (default experiment.pkl)')
    add('--results_dir', default=results_dir,
        help=f'folder of the results pickle and resume state (default {results_dir})')
    add('--checkpoint', default=None,
        help=f'best-model checkpoint path (default {checkpoint_dir}/<save name>.pth)')
    add('--data_root', default='data', help='dataset folder; downloaded there when missing (default data)')
    add('--device', default=None,
        help='torch device, e.g. cpu, cuda, cuda:1 (default cuda if available, else cpu)')
    add('--seed', type=int, default=None,
        help='random seed; drawn and recorded when not given. With a seed and one CPU thread '
             '(OMP_NUM_THREADS=1), runs are bit-for-bit repeatable')
    add('--subset', type=int, default=None,
        help='use only the first N training and N test images (quick checks)')
    add('--synthetic', action='store_true',
        help='random learnable images of the dataset\'s shape instead of the dataset')
    add('--evaluate', default=None, metavar='CKPT',
        help='load a checkpoint, print its test error, write nothing')
    add('--resume', action='store_true',
        help='continue the interrupted run of the same --save from its resume state')
    add('--compile', action='store_true', help='torch.compile the training forward pass (GPU; off by default)')
    return parser
