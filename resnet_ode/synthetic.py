"""The release's synthetic experiment: a residual ODE block on R^q fits y = -x.

N points X ~ N(0, I_d) with targets Y = -X + sigma * noise, and as many test points drawn the
same way; prediction = B x(1), x(0) = A X, dx/dt = f(t, x), with A and B fixed (--matrix) and f
the RKHS or SHL residual of models.py's last section. Each epoch is one full-batch gradient step
on the mean squared error; the training and test losses of each epoch are recorded (before that
epoch's step). A run takes seconds: it has no checkpoint and no resume state.
"""
from __future__ import annotations

import math
import os
import platform
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

import models

from . import protocol
from .errors import EXIT_DIVERGED, EXIT_FOR_SIGNAL, EXIT_OK, OneLineArgumentParser, UsageError
from .faults import fault_point
from .files import save_pickle
from .gate import (
    SCHEDULE_BYTES_PER_EVALUATION,
    Rules,
    at_least,
    check_save_name,
    check_seed,
    pick_device,
    positive_float32,
    refuse_beyond_memory,
    within_float32,
)
from .random_state import seed_everything
from .run_files import RunClaim
from .signals import StopRequest

PROGRESS_LINES = 10  # progress lines printed per run


SYNTHETIC_RESULTS_DIR = 'synthetic_experiments'  # the release's folder
# The release's synthetic script accepted --method but always integrated with midpoint. 'release',
# the default, does the same; an explicit scheme is honoured.
SYNTHETIC_RELEASE_METHOD = 'midpoint'
SYNTHETIC_LAYERS = 20  # the release's default depth at 54bc56f (840 trainable parameters)


def parser() -> OneLineArgumentParser:
    """synthetic_experiments.py: the release's flags, short forms and defaults, then this
    project's additions."""
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


class SyntheticRules(Rules):
    """synthetic_experiments.py: the same value rules as the image experiments' where the flags
    mean the same (rates, seeds, sizes, the memory a network needs)."""

    dataset = protocol.SYNTHETIC

    def parser(self):
        return parser()

    def normalised(self, config):
        """--matrix scaling sets q = 2d, as the release did whatever -q said."""
        if config.matrix != 'scaling':
            return config
        if 'dim' in config.given and config.dim != 2 * config.data_dim:
            raise UsageError(f'--matrix scaling sets q = 2d = {2 * config.data_dim}; drop --dim '
                             f'{config.dim}')
        return config.replace(dim=2 * config.data_dim)

    def check_values(self, config):
        for name in ('dataset_size', 'data_dim', 'dim', 'num_layers', 'dim_int'):
            at_least(name, getattr(config, name), 1)
        at_least('epochs', config.epochs, 0)
        positive_float32('learning_rate', config.learning_rate)
        if not math.isfinite(config.nu) or config.nu == 0:
            raise UsageError(f'--nu must be negative (Gaussian features) or positive (Student-t with '
                             f'2 nu degrees of freedom), got {config.nu}')
        within_float32('nu', config.nu)
        within_float32('sigma', config.sigma, non_negative=True)
        within_float32('alpha', config.alpha)
        if config.matrix == 'lifting' and config.dim < config.data_dim:
            raise UsageError(f'--matrix lifting needs --dim q >= --data_dim d, got q={config.dim}, '
                             f'd={config.data_dim}')
        check_seed('seed', config.seed)
        check_save_name(config.save)

    def check_size(self, config, training: bool):
        """The data, the network and its activations fit in the device's memory: N points in R^d
        and R^q, (N+1) parameter nodes of a q x r layer (two for SHL), and the state and hidden
        layer of every point at every evaluation."""
        evaluations = config.num_layers * len(models.STAGE_FRACTIONS[synthetic_method(config)])
        nodes = (config.num_layers + 1) * config.dim * config.dim_int * 2
        points = 4 * config.dataset_size * (config.data_dim + config.dim)
        activations = evaluations * config.dataset_size * (config.dim + config.dim_int)
        needed = 4 * (3 * nodes + points + activations) + SCHEDULE_BYTES_PER_EVALUATION * evaluations
        refuse_beyond_memory(f'-N {config.dataset_size} -q {config.dim} -r {config.dim_int} -l '
                             f'{config.num_layers}', needed, pick_device(config))


RULES = SyntheticRules()


def draw_data(config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X, Y, X_test, Y_test), each (N, d), from the global RNG: X ~ N(0, I_d) by rows and
    Y = -X + sigma * noise, the training pair first, then the test pair."""
    n, d = config.dataset_size, config.data_dim
    x = torch.randn(n, d)
    y = -x + config.sigma * torch.randn(n, d)
    x_test = torch.randn(n, d)
    y_test = -x_test + config.sigma * torch.randn(n, d)
    return x, y, x_test, y_test


def build_network(config) -> models.SyntheticODENet:
    """A and B, then the residual field, drawn from the global RNG in the release's order."""
    input_map, output_map = models.synthetic_maps(config.matrix, config.data_dim, config.dim, config.alpha)
    field = models.dense_field(config.model, config.dim, config.dim_int, config.num_layers,
                               config.time_weights, config.nu)
    block = models.ResidualODEBlock(method=synthetic_method(config), integrator=config.integrator, field=field)
    return models.SyntheticODENet(input_map, block, output_map)


def gradient_step(parameters, learning_rate: float):
    """theta <- theta - lr * grad: plain SGD's update, in its arithmetic (torch.optim.SGD without
    momentum computes param.add_(grad, alpha=-lr)). Written out because torch.optim's first step
    imports torch._dynamo, seconds that would dominate a run of this size."""
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(parameter.grad, alpha=-learning_rate)


def train(net, data, config, stop: StopRequest) -> dict:
    """Full-batch gradient descent on the mean squared error, one step per epoch.

    Returns the curves ('train', 'test': the losses before each step), and 'diverged_epoch' (the
    1-based epoch whose loss was not finite, its curves cut before it) or None, and 'stopped'
    (True when SIGINT/SIGTERM came).
    """
    x, y, x_test, y_test = data
    parameters = [p for p in net.ode_block.parameters() if p.requires_grad]
    curves = {'train': [], 'test': [], 'diverged_epoch': None, 'stopped': False}
    every = max(1, config.epochs // PROGRESS_LINES)
    stop.defer()  # from here a signal ends the loop after its step, with the line run() prints
    for epoch in range(config.epochs):
        for parameter in parameters:
            parameter.grad = None
        loss = F.mse_loss(net(x), y)
        loss.backward()
        with torch.no_grad():
            test_loss = F.mse_loss(net(x_test), y_test)
        train_value, test_value = loss.item(), test_loss.item()
        if not (math.isfinite(train_value) and math.isfinite(test_value)):
            curves['diverged_epoch'] = epoch + 1
            break
        gradient_step(parameters, config.learning_rate)
        curves['train'].append(train_value)
        curves['test'].append(test_value)
        fault_point('step')
        if stop.requested:
            curves['stopped'] = True
            break
        if (epoch + 1) % every == 0 or epoch + 1 == config.epochs:
            print(f'epoch {epoch + 1}/{config.epochs}: train loss {train_value:.4g}, test loss {test_value:.4g}',
                  flush=True)
    return curves


def results_record(config, curves, seconds, num_parameters, device) -> dict:
    """The release's keys (the two curves with a space in their names), then this project's."""
    record = {
        'model': config.model, 'matrix': config.matrix, 'num_layers': config.num_layers,
        'N': config.dataset_size, 'q': config.dim, 'r': config.dim_int,
        'train loss': np.asarray(curves['train'], dtype=np.float32),
        'test loss': np.asarray(curves['test'], dtype=np.float32),
        'computation_time': float(seconds), 'num_parameters': num_parameters,
    }
    record.update(
        dataset=protocol.SYNTHETIC, data_dim=config.data_dim, nu=config.nu, sigma=config.sigma,
        alpha=config.alpha, epochs=config.epochs, learning_rate=config.learning_rate,
        method=synthetic_method(config), time_weights=config.time_weights,
        integrator=config.integrator, seed=config.seed, device=str(device),
        diverged=curves['diverged_epoch'] is not None, diverged_epoch=curves['diverged_epoch'],
        torch_version=str(torch.__version__), python_version=platform.python_version())
    record['protocol'] = protocol.build_synthetic(config, synthetic_method(config), {
        'code_version': protocol.code_version(), 'torch_version': str(torch.__version__)})
    return record


def run(config, results_path: str, stop: StopRequest) -> int:
    """Draw, train, write the pickle; the exit status (nothing is written when interrupted)."""
    if config.seed is None:
        config = config.replace(seed=random.SystemRandom().randrange(2 ** 31))
    device = pick_device(config)
    seed_everything(config.seed)
    data = draw_data(config)
    net = build_network(config).to(device)
    num_parameters = models.count_trainable_parameters(net)
    print(f'{config.model} residual on R^{config.dim} (r={config.dim_int}, {config.matrix}), '
          f'{config.num_layers} steps of {synthetic_method(config)}, {num_parameters:,} trainable '
          f'parameters; N={config.dataset_size}, d={config.data_dim}; seed {config.seed}, device {device}',
          flush=True)
    if synthetic_method(config) != SYNTHETIC_RELEASE_METHOD:
        print(f'note: --method {config.method} is honoured; the release\'s script always integrated '
              f'with midpoint', flush=True)
    start = time.perf_counter()
    curves = train(net, [tensor.to(device) for tensor in data], config, stop)
    seconds = time.perf_counter() - start
    if curves['stopped'] or stop.requested:
        print(f'interrupted by {stop.name}: nothing was written (a run takes seconds; rerun the '
              f'same command)', flush=True)
        return stop.exit_status
    save_pickle(results_record(config, curves, seconds, num_parameters, device), results_path)
    if curves['diverged_epoch'] is not None:
        print(f'training diverged (non-finite loss) in epoch {curves["diverged_epoch"]}: the '
              f'{len(curves["train"])} epochs before it are in {results_path}', flush=True)
        return EXIT_DIVERGED
    final = (f'final train loss {curves["train"][-1]:.4g}' if curves['train'] else
             'no gradient step taken (--epochs 0): the curves are empty')
    print(f'{final}, {seconds:.1f} s; results written to {results_path}', flush=True)
    return EXIT_OK


def claimed_run(config) -> int:
    """The run, holding its results file: a second process with the same --save is refused, and
    an existing file is never overwritten."""
    results_path = os.path.join(config.results_dir, config.save)
    claim, failed = RunClaim(), True
    with StopRequest() as stop:
        try:
            claim.lock([results_path], f'--save {config.save}', '--save', '--results_dir')
            if os.path.lexists(results_path):
                raise UsageError(f'{results_path} exists; results are never overwritten: choose '
                                 f'another --save or move the file')
            status = run(config, results_path, stop)
            failed = status in EXIT_FOR_SIGNAL.values()  # then nothing is left behind
            return status
        finally:
            claim.release(failed)
