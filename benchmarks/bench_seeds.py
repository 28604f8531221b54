"""Seed-epochs per second: K seeds of one MNIST configuration trained as one batched model
(MNIST_experiments.py --seeds) against the same K seeds as single runs one after another; one
process, the same data and device, each an epoch of training plus the two evaluations.

    python benchmarks/bench_seeds.py --data_root ../shared/data --subset 2048 --ks 1,4,8,20
"""
import argparse
import contextlib
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import measure
from resnet_ode import distributed, evaluation, gate, launch, mnist, training
from resnet_ode.signals import StopRequest

EPOCHS_PER_FIGURE_RUN = 40  # the stored runs' protocol, for the projection printed at the end


def build(args, seeds) -> tuple[training.Experiment, list]:
    """The experiment MNIST_experiments.py builds (resnet_ode.mnist) for --seed S (one seed) or --seeds S1 .. SK."""
    flags = ['--model', args.model, '--layers', str(args.layers), '--method', args.method,
             '--in_channels', str(args.in_channels), '--dim_int', str(args.dim_int),
             '--batch_size', str(args.batch_size), '--embedding_dir', 'none', '--embedding_seed', '0',
             '--data_root', args.data_root, '--save', 'bench.pkl']
    flags += (['--seed', str(seeds[0])] if len(seeds) == 1 else ['--seeds', *map(str, seeds)])
    flags += (['--synthetic'] if args.synthetic else []) + (['--subset', str(args.subset)] if args.subset else [])
    config = mnist.RULES.resolved(gate.validate(mnist.RULES, flags, gate.SWEEP))
    started = launch.Started(config, [None] * len(seeds), '', None, args.device_, distributed.SINGLE,
                             StopRequest())
    with contextlib.redirect_stdout(io.StringIO()):  # the script's lines about its embedding and block
        exp = mnist.build_experiment(started)
    generators = [torch.Generator(device=args.device_).manual_seed(seed) for seed in seeds]
    return exp, generators


def epoch_seconds(args, seeds, steps=None) -> tuple[float, list]:
    """Wall seconds of one epoch plus the two evaluations (device synchronised), and the last
    losses; `steps` cuts the epoch short (warm-up)."""
    exp, generators = build(args, seeds)
    if steps is not None:
        exp.train_set = exp.train_set.head(steps * args.batch_size)
    optimizer = torch.optim.SGD(exp.parameters, lr=args.lr)
    measure.synchronize(args.device_)
    start = time.perf_counter()
    outcome = training.train_one_epoch(exp, optimizer, generators, args.batch_size, distributed.SINGLE,
                                     StopRequest(), f'{len(seeds)} seed(s)')
    evaluation.evaluate(exp, generators[0], distributed.SINGLE)
    measure.synchronize(args.device_)
    return time.perf_counter() - start, outcome.losses[:, -1].tolist()


def main(argv=None):
    p = argparse.ArgumentParser(description='K seeds batched in one model against K single runs')
    for name, default in (('model', 'RKHS'), ('method', 'midpoint'), ('data_root', 'data'), ('device', None)):
        p.add_argument(f'--{name}', default=default)
    for name, default in (('layers', 20), ('in_channels', 32), ('dim_int', 32), ('batch_size', 256),
                          ('subset', None), ('threads', None)):
        p.add_argument(f'--{name}', type=int, default=default)
    p.add_argument('--lr', type=float, default=0.5)
    p.add_argument('--synthetic', action='store_true')
    p.add_argument('--ks', default='1,4,8,20', help='seeds per batched model (default 1,4,8,20)')
    args = p.parse_args(argv)
    ks = sorted({int(k) for k in args.ks.split(',')})
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device_ = torch.device(args.device) if args.device else torch.device(
        'cuda' if torch.cuda.is_available() else 'cpu')
    measure.print_header(args.device_, 'Seeds batched in one model against single runs', args)
    epoch_seconds(args, [0], steps=2)  # warm-up, untimed: first kernels, allocator, autotuning
    epoch_seconds(args, list(range(ks[-1])), steps=2)
    single = []
    for seed in range(ks[-1]):  # the single runs, each timed; K sequential runs = the first K
        seconds, losses = epoch_seconds(args, [seed])
        single.append(seconds)
        measure.say(f'  single run, seed {seed}: {seconds:.2f} s, last loss {losses[0]:.4f}')
    rows = []
    for k in ks:
        seconds, losses = epoch_seconds(args, list(range(k)))
        sequential = sum(single[:k])
        measure.say(f'  batched, K={k}: {seconds:.2f} s, last losses '
                    + ' '.join(f'{loss:.4f}' for loss in losses[:8]) + (' ...' if k > 8 else ''))
        rows.append([str(k), f'{seconds:.2f}', f'{k / seconds:.3f}', f'{sequential:.2f}',
                     f'{k / sequential:.3f}', f'{sequential / seconds:.2f}x'])
    measure.print_table(['K seeds', 'batched: s per epoch incl. evals', 'batched seed-epochs/s',
                         'K single runs in sequence: s', 'sequential seed-epochs/s',
                         'batched / sequential'], rows)
    if not args.subset and not args.synthetic:
        measure.say(f'projection (arithmetic, not timed): {EPOCHS_PER_FIGURE_RUN} epochs of K={ks[-1]} '
                    f'batched: {EPOCHS_PER_FIGURE_RUN * float(rows[-1][1]) / 60:.1f} min')
    return 0


if __name__ == '__main__':
    sys.exit(main())
