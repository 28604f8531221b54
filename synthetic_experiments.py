"""The release's synthetic experiment: the paper's convergence claim, in seconds on a CPU.

    python synthetic_experiments.py                              # the release's defaults
    python synthetic_experiments.py -q 8 -r 200 --seed 0 --save q8_r200.pkl

A regression on R^d solved by a residual ODE block on R^q (models.py, last section): N points
X ~ N(0, I_d) with targets Y = -X + sigma * noise, and as many test points drawn the same way;

    prediction = B x(1),   x(0) = A X,   dx/dt = f(t, x),

with A and B fixed (--matrix), and f the RKHS residual W(t) ReLU(Omega x) (Omega fixed and random,
Gaussian or Student-t features, --nu) or the SHL residual (both layers trained). Each epoch is one
full-batch gradient step on the mean squared error; the training and test losses of each epoch
are recorded (before that epoch's step).

It reproduces the script synthetic.py of the paper's public release (rbarboni/FlowResNets), which
its README never mentions: the same flags with their short forms and defaults, the same pickle
keys, the same random draws in the same order as the version of synthetic.py it was transcribed
from (docs/deviations.md says why that version), written to synthetic_experiments/<save>.
Deviations, each a defect of the release:
SHL runs for any q and r (the release's SHL layers had swapped shapes, so it ran only when q = r);
a non-finite loss ends the run with the curves so far in the pickle and exit status 3 (the release
crashed); --method is honoured when given (the release always integrated with midpoint: that is
the default here, --method release).

Exit statuses: 0 done; 2 bad input or refusal (one line on stderr, nothing written); 3 the loss
became non-finite (the pickle is written, with diverged=True); 130/143 interrupted by
SIGINT/SIGTERM (nothing written: a run takes seconds, rerun it).
"""
from __future__ import annotations

import math
import os
import platform
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import cli
import models
import protocol
import runstate
from common import save_pickle

RESULTS_DIR = 'synthetic_experiments'  # the release's folder
# The release's script accepted --method but always integrated with midpoint. 'release', the
# default, does the same; an explicit scheme is honoured.
RELEASE_METHOD = 'midpoint'
METHOD_CHOICES = ('release',) + models.METHODS
PROGRESS_LINES = 10  # progress lines printed per run


def get_args_parser():
    parser = cli.OneLineArgumentParser(
        description='The release\'s synthetic experiment: a residual ODE block on R^q fits y = -x '
                    'by full-batch gradient descent.')
    add = parser.add_argument
    # The release's flags, short forms and defaults.
    add('--model', '-m', default='RKHS', choices=list(models.DENSE_RESIDUALS),
        help='RKHS: fixed random hidden layer; SHL: trained hidden layers (default RKHS)')
    add('--dataset_size', '-N', type=int, default=100,
        help='training points, and as many test points (default 100)')
    add('--data_dim', '-d', type=int, default=2, help='dimension d of the data (default 2)')
    add('--dim', '-q', type=int, default=2,
        help='dimension q of the ODE state (default 2; --matrix scaling sets it to 2d)')
    add('--num_layers', '-l', type=int, default=10,
        help='steps N of the ODE solver, of size 1/N; N+1 parameter nodes (default 10)')
    add('--dim_int', '-r', type=int, default=20, help='width r of the residual\'s hidden layer (default 20)')
    add('--nu', type=float, default=-1.0,
        help='RKHS features: < 0 Gaussian; > 0 Student-t with 2 nu degrees of freedom, centred '
             '(default -1)')
    add('--sigma', type=float, default=0.0, help='standard deviation of the target noise (default 0)')
    add('--matrix', '-mat', default='lifting', choices=models.SYNTHETIC_MATRICES,
        help='fixed maps A and B: lifting (q//d copies of x; B reads the first d coordinates) or '
             'scaling (q = 2d; A = alpha [I; 0], B = alpha [0, I]) (default lifting)')
    add('--alpha', type=float, default=1.0, help='the factor of --matrix scaling (default 1)')
    add('--method', default='release', choices=METHOD_CHOICES,
        help='fixed-step scheme (torchdiffeq\'s). release, the default: midpoint, which the '
             'release\'s script always used whatever its --method said; a scheme given is honoured')
    add('--epochs', '-e', type=int, default=1000, help='full-batch gradient steps (default 1000)')
    add('--learning_rate', '-lr', type=float, default=1.0, help='gradient step size (default 1)')
    add('--save', '-s', default='synthetic.pkl',
        help='results file name (a plain name ending in .pkl) in --results_dir; an existing file is '
             'never overwritten (default synthetic.pkl)')
    # This project's additions.
    add('--results_dir', default=RESULTS_DIR, help=f'folder of the results pickle (default {RESULTS_DIR})')
    add('--seed', type=int, default=None,
        help='random seed of the data, Omega and initialisation; drawn and recorded when not given')
    add('--device', default=None,
        help='torch device, e.g. cpu, cuda (default cuda if available, else cpu, as the release)')
    add('--time_weights', default='release', choices=models.TIME_WEIGHTS,
        help='release: the release\'s node rule; linear: exact interpolation (default release)')
    add('--integrator', default='fixed', choices=models.INTEGRATORS,
        help='fixed: precomputed-schedule loop; torchdiffeq: plain odeint, as the release (default fixed)')
    return parser


def validate_args(args):
    """Every rule that can be checked before drawing anything; --matrix scaling sets q = 2d."""
    for name in ('dataset_size', 'data_dim', 'dim', 'num_layers', 'dim_int'):
        if getattr(args, name) < 1:
            raise cli.UsageError(f'--{name} must be >= 1, got {getattr(args, name)}')
    if args.epochs < 0:
        raise cli.UsageError(f'--epochs must be >= 0, got {args.epochs}')
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise cli.UsageError(f'--learning_rate must be positive and finite, got {args.learning_rate}')
    if not math.isfinite(args.nu) or args.nu == 0:
        raise cli.UsageError(f'--nu must be negative (Gaussian features) or positive (Student-t with '
                             f'2 nu degrees of freedom), got {args.nu}')
    if not (math.isfinite(args.sigma) and args.sigma >= 0):
        raise cli.UsageError(f'--sigma must be >= 0 and finite, got {args.sigma}')
    if not math.isfinite(args.alpha):
        raise cli.UsageError(f'--alpha must be finite, got {args.alpha}')
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise cli.UsageError(f'--seed must be in [0, 2^63), got {args.seed}')
    _check_dimensions(args)
    cli._check_save_name(args.save)
    cli._check_device(args.device)
    cli._check_writable_folder('--results_dir', args.results_dir)


def _check_dimensions(args):
    if args.matrix == 'scaling':
        # The release set q = 2d whatever -q said; a -q that says otherwise is refused here.
        if 'dim' in cli.given_flags(args) and args.dim != 2 * args.data_dim:
            raise cli.UsageError(f'--matrix scaling sets q = 2d = {2 * args.data_dim}; drop --dim '
                                 f'{args.dim}')
        args.dim = 2 * args.data_dim
    elif args.dim < args.data_dim:
        raise cli.UsageError(f'--matrix lifting needs --dim q >= --data_dim d, got q={args.dim}, '
                             f'd={args.data_dim}')


def integration_method(args) -> str:
    return RELEASE_METHOD if args.method == 'release' else args.method


def draw_data(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X, Y, X_test, Y_test), each (N, d), from the global RNG: X ~ N(0, I_d) by rows and
    Y = -X + sigma * noise, the training pair first, then the test pair."""
    n, d = args.dataset_size, args.data_dim
    x = torch.randn(n, d)
    y = -x + args.sigma * torch.randn(n, d)
    x_test = torch.randn(n, d)
    y_test = -x_test + args.sigma * torch.randn(n, d)
    return x, y, x_test, y_test


def build_network(args) -> models.SyntheticODENet:
    """A and B, then the residual field, drawn from the global RNG in the release's order."""
    input_map, output_map = models.synthetic_maps(args.matrix, args.data_dim, args.dim, args.alpha)
    field = models.dense_field(args.model, args.dim, args.dim_int, args.num_layers,
                               args.time_weights, args.nu)
    block = models.ResidualODEBlock(method=integration_method(args), integrator=args.integrator,
                                    field=field)
    return models.SyntheticODENet(input_map, block, output_map)


def gradient_step(parameters, learning_rate: float):
    """theta <- theta - lr * grad: plain SGD's update, in its arithmetic (torch.optim.SGD without
    momentum computes param.add_(grad, alpha=-lr)). Written out because torch.optim's first step
    imports torch._dynamo, seconds that would dominate a run of this size."""
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(parameter.grad, alpha=-learning_rate)


def train(net, data, args, stop: runstate.StopRequest) -> dict:
    """Full-batch gradient descent on the mean squared error, one step per epoch.

    Returns the curves ('train', 'test': the losses before each step), and 'diverged_epoch' (the
    1-based epoch whose loss was not finite, its curves cut before it) or None, and 'stopped'
    (True when SIGINT/SIGTERM came).
    """
    x, y, x_test, y_test = data
    parameters = [p for p in net.ode_block.parameters() if p.requires_grad]
    curves = {'train': [], 'test': [], 'diverged_epoch': None, 'stopped': False}
    every = max(1, args.epochs // PROGRESS_LINES)
    stop.defer()  # from here a signal ends the loop after its step, with the line run() prints
    for epoch in range(args.epochs):
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
        gradient_step(parameters, args.learning_rate)
        curves['train'].append(train_value)
        curves['test'].append(test_value)
        runstate.fault_point('step')
        if stop.requested:
            curves['stopped'] = True
            break
        if (epoch + 1) % every == 0 or epoch + 1 == args.epochs:
            print(f'epoch {epoch + 1}/{args.epochs}: train loss {train_value:.4g}, test loss {test_value:.4g}',
                  flush=True)
    return curves


def results_record(args, curves, seconds, num_parameters, device) -> dict:
    """The release's keys (the two curves with a space in their names), then this project's."""
    record = {
        'model': args.model, 'matrix': args.matrix, 'num_layers': args.num_layers,
        'N': args.dataset_size, 'q': args.dim, 'r': args.dim_int,
        'train loss': np.asarray(curves['train'], dtype=np.float32),
        'test loss': np.asarray(curves['test'], dtype=np.float32),
        'computation_time': float(seconds), 'num_parameters': num_parameters,
    }
    record.update(
        dataset=protocol.SYNTHETIC, data_dim=args.data_dim, nu=args.nu, sigma=args.sigma,
        alpha=args.alpha, epochs=args.epochs, learning_rate=args.learning_rate,
        method=integration_method(args), time_weights=args.time_weights,
        integrator=args.integrator, seed=args.seed, device=str(device),
        diverged=curves['diverged_epoch'] is not None, diverged_epoch=curves['diverged_epoch'],
        torch_version=str(torch.__version__), python_version=platform.python_version())
    record['protocol'] = protocol.build_synthetic(args, integration_method(args), {
        'code_version': protocol.code_version(), 'torch_version': str(torch.__version__)})
    return record


def run(args, results_path: str, stop: runstate.StopRequest) -> int:
    """Draw, train, write the pickle; the exit status (nothing is written when interrupted)."""
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2 ** 31)
    device = cli.pick_device(args)
    runstate.seed_everything(args.seed)
    data = draw_data(args)
    net = build_network(args).to(device)
    num_parameters = models.count_trainable_parameters(net)
    print(f'{args.model} residual on R^{args.dim} (r={args.dim_int}, {args.matrix}), '
          f'{args.num_layers} steps of {integration_method(args)}, {num_parameters:,} trainable '
          f'parameters; N={args.dataset_size}, d={args.data_dim}; seed {args.seed}, device {device}',
          flush=True)
    if integration_method(args) != RELEASE_METHOD:
        print(f'note: --method {args.method} is honoured; the release\'s script always integrated '
              f'with midpoint', flush=True)
    start = time.perf_counter()
    curves = train(net, [tensor.to(device) for tensor in data], args, stop)
    seconds = time.perf_counter() - start
    if curves['stopped'] or stop.requested:
        print(f'interrupted by {stop.name}: nothing was written (a run takes seconds; rerun the '
              f'same command)', flush=True)
        return stop.exit_status
    save_pickle(results_record(args, curves, seconds, num_parameters, device), results_path)
    if curves['diverged_epoch'] is not None:
        print(f'training diverged (non-finite loss) in epoch {curves["diverged_epoch"]}: the '
              f'{len(curves["train"])} epochs before it are in {results_path}', flush=True)
        return cli.EXIT_DIVERGED
    print(f'final train loss {curves["train"][-1] if curves["train"] else float("nan"):.4g}, '
          f'{seconds:.1f} s; results written to {results_path}', flush=True)
    return cli.EXIT_OK


@cli.cli_errors
def main(args) -> int:
    validate_args(args)
    results_path = os.path.join(args.results_dir, args.save)
    claim, failed = runstate.RunClaim(), True
    with runstate.StopRequest() as stop:
        try:
            claim.lock([results_path], f'--save {args.save}', '--save', '--results_dir')
            if os.path.exists(results_path):
                raise cli.UsageError(f'{results_path} exists; results are never overwritten: choose '
                                     f'another --save or move the file')
            status = run(args, results_path, stop)
            failed = status in cli.EXIT_FOR_SIGNAL.values()  # then nothing is left behind
            return status
        finally:
            claim.release(failed)


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))
