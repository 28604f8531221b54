"""The command lines: each script's flags, defined once, and a parser that errs in one line.

The experiment scripts' parsers live here, not in the scripts, so that the sweep and the protocol
record can read a run's flags with a plain import. Every flag is then checked in one place, the
gate (resnet_ode.gate). Importing this module does not import torch: the choices that come from
the models are read when a parser is built.
"""
from __future__ import annotations

from .errors import OneLineArgumentParser


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


# The release measured train_classif on the first batch of an unshuffled training loader whose
# batch size was its --test_batch_size: 10,000 by its script's default, 1,000 in its stored runs
# (every stored value is a multiple of 0.001, and equals this project's error on the first 1,000
# images from the same embedding files).
TRAIN_ERROR_IMAGES = 10_000


def mnist_parser() -> OneLineArgumentParser:
    """MNIST_experiments.py. Its defaults are the release README's protocol (30 epochs, x0.1 at
    epoch 25); the sweeps run the release's stored protocol (reproduce.py --protocol)."""
    import models

    from .embeddings import DEFAULT_DIR, DEFAULT_PATH

    parser = OneLineArgumentParser(
        prog='MNIST_experiments.py',
        description='Train an RKHS or SHL residual ODE block on MNIST (Figures 1 and 2). The '
                    'defaults are the protocol of the release\'s README (30 epochs, x0.1 at epoch '
                    '25); the paper\'s stored runs, and reproduce.py, use 40 epochs, x0.2 at 35 '
                    'and --train_error_images 1000.')
    add_common_arguments(parser, layers=20, epochs=30, lr_init=0.5, decay_steps=[25], decay_rate=0.1,
                         folder_prefix='MNIST', release_tbs_is_test_batch_size=False)
    add = parser.add_argument
    add('--train_error_images', type=int, default=TRAIN_ERROR_IMAGES,
        help='train_classif is the error on the first N training images (default '
             f'{TRAIN_ERROR_IMAGES:,}, the release script\'s; its stored runs used 1,000, which '
             'reproduce.py uses)')
    add('-tbs', dest='release_tbs', type=int, default=None, metavar='N',
        help='the release\'s option, with its meaning: --test_batch_size N and --train_error_images '
             'N together (the release measured the training error on its first evaluation batch)')
    add('--in_channels', '-in', type=int, default=32,
        help='channels C of the ODE state (C x 5 x 5) (default 32)')
    add('--dim_int', type=int, default=32, help='channels of the residual\'s hidden layer (default 32)')
    add('--pretrain', '-p', type=int, default=0,
        help='pretraining passes of the input and output networks; 0: none. With release embedding '
             'files, picks the p-pass files instead (default 0)')
    add('--pretrain_lr', type=float, default=0.01,
        help='learning rate of that pretraining (default 0.01; the release used 1.0, which '
             'diverges, see README)')
    add('--method', default='midpoint', choices=models.METHODS,
        help='fixed-step scheme (torchdiffeq\'s; rk4 is the 3/8 rule) (default midpoint)')
    add('--time_weights', default='release', choices=models.TIME_WEIGHTS,
        help='release: the paper\'s code, which made its figures; linear: exact interpolation of '
             'the N+1 nodes (default release)')
    add('--integrator', default='fixed', choices=models.INTEGRATORS,
        help='fixed: precomputed-schedule loop (fast); torchdiffeq: plain odeint, as the release '
             '(default fixed)')
    add('--embedding_dir', default=DEFAULT_PATH,
        help='folder of the release\'s embedding files {C}channels_{p}pass_{input,output}_embedding.pt; '
             'A and B are loaded from them and not pretrained. Given explicitly, a missing or '
             'unusable file is an error; the default folder may lack them, and the run then draws A '
             'and B and says so. "none" never loads them (default: '
             f'{DEFAULT_DIR} in the repository; python -m resnet_ode.embeddings --download fetches '
             'them)')
    add('--seeds', type=int, nargs='+', default=None, metavar='S',
        help='train these K seeds at once, as one batched model: member k is the run --seed Sk '
             'would make (its own block, data order, curves, checkpoint and pickle <save '
             'stem>_s<Sk>.pkl); A and B are shared. Excludes --seed')
    add('--embedding_seed', type=int, default=None,
        help='seed of the input/output networks\' initialisation and pretraining when no release '
             'files are loaded (default: --seed, or the first of --seeds); runs sharing it share '
             'their embedding')
    return parser


def cifar_parser() -> OneLineArgumentParser:
    """CIFAR_experiments.py: the release README's protocol (300 epochs, x0.1 at 260)."""
    parser = OneLineArgumentParser(
        prog='CIFAR_experiments.py',
        description='Train a ResNet18-layout network of RKHS or SHL blocks on CIFAR-10 (Figure 3).')
    add_common_arguments(parser, layers=10, epochs=300, lr_init=3e-3, decay_steps=[260],
                         decay_rate=0.1, folder_prefix='CIFAR')
    add = parser.add_argument
    add('--channels_last', action='store_true',
        help='channels_last memory format (a GPU speed option; same maths)')
    add('--amp', action='store_true',
        help='bfloat16 autocast of the training forward (CUDA or CPU); off by default since it '
             'changes results')
    add('--sync_bn', action='store_true',
        help='under torchrun, synchronise BatchNorm statistics across processes (default off: '
             'each process normalises its own share of the batch)')
    return parser


SYNTHETIC_RESULTS_DIR = 'synthetic_experiments'  # the release's folder
# The release's synthetic script accepted --method but always integrated with midpoint. 'release',
# the default, does the same; an explicit scheme is honoured.
SYNTHETIC_RELEASE_METHOD = 'midpoint'
SYNTHETIC_LAYERS = 20  # the release's default depth at 54bc56f (840 trainable parameters)


def synthetic_parser() -> OneLineArgumentParser:
    """synthetic_experiments.py: the release's flags, short forms and defaults, then this
    project's additions."""
    import models

    parser = OneLineArgumentParser(
        prog='synthetic_experiments.py',
        description='The release\'s synthetic experiment: a residual ODE block on R^q fits y = -x '
                    'by full-batch gradient descent.')
    add = parser.add_argument
    add('--model', '-m', default='RKHS', choices=list(models.DENSE_RESIDUALS),
        help='RKHS: fixed random hidden layer; SHL: trained hidden layers (default RKHS)')
    add('--dataset_size', '-N', type=int, default=100,
        help='training points, and as many test points (default 100)')
    add('--data_dim', '-d', type=int, default=2, help='dimension d of the data (default 2)')
    add('--dim', '-q', type=int, default=2,
        help='dimension q of the ODE state (default 2; --matrix scaling sets it to 2d)')
    add('--num_layers', '-l', type=int, default=SYNTHETIC_LAYERS,
        help=f'steps N of the ODE solver, of size 1/N; N+1 parameter nodes (default {SYNTHETIC_LAYERS})')
    add('--dim_int', '-r', type=int, default=20, help='width r of the residual\'s hidden layer (default 20)')
    add('--nu', type=float, default=-1.0,
        help='RKHS features: < 0 Gaussian; > 0 Student-t with 2 nu degrees of freedom, centred '
             '(default -1)')
    add('--sigma', type=float, default=0.0, help='standard deviation of the target noise (default 0)')
    add('--matrix', '-mat', default='lifting', choices=models.SYNTHETIC_MATRICES,
        help='fixed maps A and B: lifting (q//d copies of x; B reads the first d coordinates) or '
             'scaling (q = 2d; A = alpha [I; 0], B = alpha [0, I]) (default lifting)')
    add('--alpha', type=float, default=1.0, help='the factor of --matrix scaling (default 1)')
    add('--method', default='release', choices=('release',) + models.METHODS,
        help='fixed-step scheme (torchdiffeq\'s). release, the default: midpoint, which the '
             'release\'s script always used whatever its --method said; a scheme given is honoured')
    add('--epochs', '-e', type=int, default=1000, help='full-batch gradient steps (default 1000)')
    add('--learning_rate', '-lr', type=float, default=1.0, help='gradient step size (default 1)')
    add('--save', '-s', default='synthetic.pkl',
        help='results file name (a plain name ending in .pkl) in --results_dir; an existing file is '
             'never overwritten (default synthetic.pkl)')
    add('--results_dir', default=SYNTHETIC_RESULTS_DIR,
        help=f'folder of the results pickle (default {SYNTHETIC_RESULTS_DIR})')
    add('--seed', type=int, default=None,
        help='random seed of the data, Omega and initialisation; drawn and recorded when not given')
    add('--device', default=None,
        help='torch device, e.g. cpu, cuda (default cuda if available, else cpu, as the release)')
    add('--time_weights', default='release', choices=models.TIME_WEIGHTS,
        help='release: the release\'s node rule; linear: exact interpolation (default release)')
    add('--integrator', default='fixed', choices=models.INTEGRATORS,
        help='fixed: precomputed-schedule loop; torchdiffeq: plain odeint, as the release (default fixed)')
    return parser


def synthetic_method(config) -> str:
    """The scheme a synthetic run integrates with."""
    return SYNTHETIC_RELEASE_METHOD if config.method == 'release' else config.method


PARSERS = {'MNIST': mnist_parser, 'CIFAR10': cifar_parser, 'SYNTHETIC': synthetic_parser}
