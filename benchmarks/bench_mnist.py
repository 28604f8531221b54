"""MNIST speed, in one process from the same initial weights: a = release style (release_style.py),
b = this project (device data, training.train_one_epoch + evaluation.evaluate, the fixed integrator),
c = b with --compile; each one training epoch then the two evaluations. --whole_process: whole runs.

    python benchmarks/bench_mnist.py --data_root ../shared/data [--repeats 2] [--model SHL] [--whole_process]
"""
import argparse
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch

from benchmarks import measure
from benchmarks import release_style as rs
from resnet_ode import data, distributed, mnist

NAMES = {'a': 'a: release-style (DataLoader + odeint, blended outputs)',
         'b': 'b: project (device data, fixed integrator)', 'c': 'c: project with --compile'}


def whole_process(args, device):
    """a = release_style.py, b = MNIST_experiments.py (c: --compile), alternating, --epochs 1."""
    tmp = tempfile.mkdtemp(prefix='bench_mnist_')
    flags = ['--epochs', '1', '--lr_init', str(args.lr), '--data_root', os.path.abspath(args.data_root),
             '--device', str(device)] + ['--synthetic'] * args.synthetic
    for name in ('model', 'layers', 'method', 'in_channels', 'dim_int', 'batch_size', 'seed', 'subset'):
        flags += [f'--{name}', str(getattr(args, name))] if getattr(args, name) is not None else []

    def command(key, repeat):  # run in tmp
        if key == 'a':
            return [os.path.join(HERE, 'release_style.py'), *flags, '--out', f'release_{repeat}.pt']
        return [os.path.join(os.path.dirname(HERE), 'MNIST_experiments.py'), *flags, '--save',
                f'bench_{key}{repeat}.pkl', '--results_dir', 'results', '--checkpoint',
                f'checkpoints/bench_{key}{repeat}.pth'] + ['--compile'] * (key == 'c')
    for key in args.pipelines:
        measure.say(f'- {key}: python {shlex.join(command(key, 0))}')
    measure.say(f'- peak memory: each child\'s peak RSS (os.wait4 ru_maxrss); run in {tmp}')
    env = dict(os.environ, **({'OMP_NUM_THREADS': str(args.threads)} if args.threads else {}))
    runs = {key: [] for key in args.pipelines}  # (wall s, CPU s, peak RSS MiB, load) per run
    for repeat in range(args.repeats):
        for key in args.pipelines:
            log_path, start = os.path.join(tmp, f'{key}_{repeat}.log'), time.perf_counter()
            with open(log_path, 'w') as log:
                child = subprocess.Popen([sys.executable] + command(key, repeat), cwd=tmp, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
                _, status, usage = os.wait4(child.pid, 0)
            runs[key].append(run := (time.perf_counter() - start, usage.ru_utime + usage.ru_stime,
                                     usage.ru_maxrss / 1024, os.getloadavg()[0]))
            rc, lines = os.waitstatus_to_exitcode(status), pathlib.Path(log_path).read_text().splitlines()
            measure.say(f'  run {repeat + 1}/{args.repeats} {key}: {run[0]:.2f} s, CPU {run[1]:.2f} s, '
                        f'exit {rc}, load {run[3]:.2f}; last lines: '
                        + ' | '.join([line for line in lines if line.strip()][-3:]))
            if rc != 0:
                measure.say(f'error: pipeline {key} exited with {rc}; log {log_path}')
                return 1
    best, median, best_cpu, peak = ({k: stat(r[i] for r in runs[k]) for k in runs}
                                    for stat, i in ((min, 0), (statistics.median, 0), (min, 1), (max, 2)))
    names = {'a': 'a: release_style.py', 'b': 'b: MNIST_experiments.py',
             'c': 'c: MNIST_experiments.py --compile'}
    rows = [[names[k], f'{best[k]:,.2f}', f'{median[k]:,.2f}', ', '.join(f'{r[0]:.2f}' for r in runs[k]),
             f'{best_cpu[k]:,.2f}', f'{peak[k]:,.0f}', ', '.join(f'{r[3]:.2f}' for r in runs[k])]
            for k in runs]
    measure.print_table(['pipeline (whole process)', 'wall s (best)', 'wall s (median)', 'all runs s',
                         'CPU s (user+sys, best)', 'peak RSS MiB', 'load avg per run'], rows)
    what = 'whole process (data load, evaluation, 1 epoch, evaluation)'
    measure.print_speedups([(f'{what}, best runs', best), (f'{what}, medians', median),
                            ('whole process, CPU time (user+sys), best runs', best_cpu)])
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description='MNIST speed: project path vs release-style pipeline')
    rs.add_arguments(p, layers=20, lr=0.5, mnist=True)
    p.add_argument('--whole_process', action='store_true', help='time whole processes instead')
    args, device = measure.parse_args(p, argv, warmup_steps=2, c_options=('compile',))
    measure.print_header(device, f'MNIST speed, {"whole processes" if args.whole_process else "in-process"}',
                         args)
    if args.whole_process:
        return whole_process(args, device)
    train, test = data.load_datasets(args, distributed.SINGLE)

    def project_pipeline(compiled):  # as resnet_ode.mnist builds it
        net = rs.project_mnist_net(args, device)
        return measure.ProjectPipeline(
            args, device, net, torch.compile(net) if compiled else net, train, test,
            mnist.EVAL_CHUNK,
            lambda train_set: mnist.first_training_images(train_set, mnist.TRAIN_ERROR_IMAGES),
            parameters=list(net.ode_block.parameters()), eval_transform=data.mnist_to_float,
            train_transform=lambda images, generator: data.mnist_to_float(images))
    pipelines = {key: rs.mnist_pipeline(args, device) if key == 'a' else project_pipeline(key == 'c')
                 for key in args.pipelines}
    return measure.compare(pipelines, NAMES, (1, 28, 28), device, args)


if __name__ == '__main__':
    sys.exit(main())
