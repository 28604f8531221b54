"""MNIST speed benchmark: this project's training path against a release-style pipeline.

    python benchmarks/bench_mnist.py --data_root ../shared/data                 # in-process
    python benchmarks/bench_mnist.py --data_root ../shared/data --whole_process # whole processes
    python benchmarks/bench_mnist.py --synthetic --subset 512 --layers 2        # quick check

Pipelines, timed in one process on one device with the same initial weights:
  a  release-style: torchvision MNIST + ToTensor through DataLoaders (shuffle, batch 256), batches
     copied to the device, torchdiffeq.odeint with step_size=1/N and an ODE function that reads t
     at every call and blends two output convolutions (RKHS) or two residuals (SHL);
     benchmarks/release_style.py.
  b  this project: uint8 data on the device, engine.train_one_epoch + engine.evaluate, the fixed
     integrator with interpolated weights (MNISTODENet, time_weights='release').
  c  b with the training forward compiled, as MNIST_experiments.py --compile (only when asked:
     --pipelines b,c --compile), to measure what torch.compile gives on the device.
Each: one full training epoch, then the two evaluations (train error on the first 10,000
training images, test error on the 10,000 test images); "epoch incl. evals" is their sum.

--whole_process instead times whole processes: `python MNIST_experiments.py --epochs 1 ...`
(data load, evaluation, one epoch, evaluation, checkpoints and pickle) against
benchmarks/release_style_mnist.py doing the same release-style.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import release_style as rs  # noqa: E402
import data  # noqa: E402
import engine  # noqa: E402
import models  # noqa: E402

PIPELINE_NAMES = {'a': 'a: release-style (DataLoader + odeint, blended outputs)',
                  'b': 'b: project (device data, fixed integrator)',
                  'c': 'c: project with --compile'}
MNIST_SHAPE = (1, 28, 28)


def get_args(argv=None):
    p = argparse.ArgumentParser(description='MNIST speed: project path vs release-style pipeline')
    common.add_mnist_model_arguments(p)
    p.add_argument('--batch_size', type=int, default=256)
    p.add_argument('--lr', type=float, default=0.5, help='SGD rate (MNIST_experiments default 0.5)')
    p.add_argument('--data_root', default='data', help='folder holding MNIST/raw (default data)')
    p.add_argument('--synthetic', action='store_true', help='the project\'s synthetic MNIST-shaped data')
    p.add_argument('--subset', type=int, default=None, help='first N training and N test images')
    p.add_argument('--repeats', type=int, default=1, help='runs of each pipeline, alternated (median reported)')
    p.add_argument('--device', default=None, help='default cuda if available, else cpu')
    p.add_argument('--pipelines', default='a,b',
                   help='comma-separated subset of a,b,c (default a,b; c needs --compile)')
    p.add_argument('--warmup_steps', type=int, default=2,
                   help='untimed training steps (and one evaluation batch) per pipeline first')
    p.add_argument('--workers', type=int, default=None,
                   help='DataLoader workers of pipeline a (default 0 on CPU, 2 on CUDA)')
    p.add_argument('--eval_batch_a', type=int, default=None,
                   help='evaluation batch of pipeline a (default: the project\'s chunk for the '
                        'device, engine.EVAL_CHUNK, so both evaluate in the same batch size)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default torch\'s)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--compile', action='store_true',
                   help='pipeline c: torch.compile the training forward, as MNIST_experiments.py --compile')
    p.add_argument('--whole_process', action='store_true',
                   help='time whole processes: MNIST_experiments.py --epochs 1 vs release_style_mnist.py')
    args = p.parse_args(argv)
    args.pipelines = [s.strip() for s in args.pipelines.split(',') if s.strip()]
    if not args.pipelines or any(s not in PIPELINE_NAMES for s in args.pipelines):
        p.error(f'--pipelines must be a comma-separated subset of a,b,c, got {args.pipelines}')
    if ('c' in args.pipelines) != args.compile:
        p.error('pipeline c is b with --compile: give both --pipelines ...,c and --compile, or neither')
    if args.repeats < 1 or args.layers < 1 or args.batch_size < 1:
        p.error('--repeats, --layers and --batch_size must be >= 1')
    return args


def project_eval_chunk(device) -> int:
    return engine.eval_chunk('MNIST', device, test_batch_size=10**9)  # the per-device cap


def build_project_net(args, device) -> models.MNISTODENet:
    """The project's model exactly as MNIST_experiments.py builds it for --seed args.seed."""
    import MNIST_experiments

    torch.manual_seed(args.seed)
    ns = argparse.Namespace(model=args.model, in_channels=args.in_channels, dim_int=args.dim_int,
                            layers=args.layers, method=args.method, time_weights='release',
                            integrator='fixed', embedding_seed=args.seed,
                            embedding_dir='none', pretrain=0)
    net = MNIST_experiments.build_model(ns)[0].to(device)
    net.freeze_embedding()
    return net


# ---------------------------------------------------------------------------------------------
# FLOPs per image of each pipeline (analytic; see benchmarks/common.py for the convention)
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Pipeline a: release style
# ---------------------------------------------------------------------------------------------

class ReleasePipeline:
    key = 'a'

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.train, self.train_eval, self.test = rs.mnist_datasets(args.data_root, args.synthetic,
                                                                   args.subset)
        self.eval_batch = args.eval_batch_a or project_eval_chunk(device)
        self.workers = args.workers if args.workers is not None else (2 if device.type == 'cuda' else 0)
        self.sizes = (len(self.train), len(self.train_eval), len(self.test))

    def build(self):
        net = rs.release_net_from(build_project_net(self.args, self.device))
        optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=self.args.lr)
        return net, optimizer

    def loaders(self):
        a, d = self.args, self.device
        return (rs.loader(self.train, a.batch_size, True, self.workers, d),
                rs.loader(self.train_eval, self.eval_batch, False, self.workers, d),
                rs.loader(self.test, self.eval_batch, False, self.workers, d))

    def flops(self):
        net, _ = self.build()
        return common.train_and_eval_flops(net, MNIST_SHAPE, self.device)

    def describe(self) -> str:
        return f'DataLoader workers {self.workers}, evaluation batch {self.eval_batch}'

    def warmup(self, steps):
        net, optimizer = self.build()
        train_loader, train_eval_loader, _ = self.loaders()
        rs.train_epoch(net, train_loader, optimizer, self.device, max_steps=steps)
        rs.error_rate(net, train_eval_loader, self.device, max_batches=1)

    def run(self, memory: common.PeakMemory) -> dict:
        net, optimizer = self.build()
        train_loader, train_eval_loader, test_loader = self.loaders()
        memory.reset()
        with common.Timer(self.device) as train_timer:
            losses = rs.train_epoch(net, train_loader, optimizer, self.device)
        with common.Timer(self.device) as eval_timer:
            train_error = rs.error_rate(net, train_eval_loader, self.device)
            test_error = rs.error_rate(net, test_loader, self.device)
        return common.epoch_result(train_timer, eval_timer, memory, losses, train_error, test_error)


# ---------------------------------------------------------------------------------------------
# Pipeline b: this project
# ---------------------------------------------------------------------------------------------

class ProjectPipeline(common.ProjectPipeline):
    dataset, image_shape = 'MNIST', MNIST_SHAPE
    compiled = False

    def __init__(self, args, device):
        self.warmup_eval_images = project_eval_chunk(device)
        if args.synthetic:
            n_train = min(args.subset or data.MNIST_TRAIN_SIZE, data.MNIST_TRAIN_SIZE)
            n_test = min(args.subset or data.MNIST_TEST_SIZE, data.MNIST_TEST_SIZE)
            train, test = data.synthetic_dataset(MNIST_SHAPE[1:], n_train, n_test)
        else:
            train, test = data.load_mnist(args.data_root)
            if args.subset:
                train, test = train.head(args.subset), test.head(args.subset)
        net = build_project_net(args, device)
        super().__init__(args, device, train, test, net, torch.compile(net) if self.compiled else None)

    def build_experiment(self, net, train, test):
        return engine.Experiment(
            dataset='MNIST', model=net,
            parts={'input_net': net.input_net, 'ode_block': net.ode_block, 'output_net': net.output_net},
            parameters=list(net.ode_block.parameters()), train_set=train, test_set=test,
            train_transform=lambda images, generator: data.mnist_to_float(images),
            eval_transform=data.mnist_to_float, train_eval_random=False, results={},
            training_forward=self.training_forward)

    def describe(self) -> str:
        compiled = ', training forward compiled (--compile)' if self.compiled else ''
        return super().describe() + compiled


class CompiledProjectPipeline(ProjectPipeline):
    key = 'c'
    compiled = True


PIPELINES = {'a': ReleasePipeline, 'b': ProjectPipeline, 'c': CompiledProjectPipeline}


# ---------------------------------------------------------------------------------------------
# In-process report
# ---------------------------------------------------------------------------------------------

def config_line(args) -> str:
    return (f'{args.model} L={args.layers} {args.method}, batch {args.batch_size}, lr {args.lr}, '
            f'C={args.in_channels}, dim_int={args.dim_int}, '
            f'{"synthetic" if args.synthetic else "MNIST from " + args.data_root}'
            f'{f", subset {args.subset}" if args.subset else ""}, repeats {args.repeats}, '
            f'seed {args.seed}, threads {torch.get_num_threads()}')


def in_process(args, device):
    common.print_header(device, 'MNIST speed, in-process', config_line(args))
    pipelines = {key: PIPELINES[key](args, device) for key in args.pipelines}
    return common.compare(pipelines, PIPELINE_NAMES, device, args.repeats, args.warmup_steps,
                          args.batch_size)


# ---------------------------------------------------------------------------------------------
# Whole processes
# ---------------------------------------------------------------------------------------------

def run_process(cmd, cwd, env, log_path) -> tuple[float, int, float, float]:
    """(wall seconds, exit status, peak RSS MiB, CPU seconds user+sys) of one child process."""
    with open(log_path, 'w') as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, proc.returncode, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def whole_process(args, device):
    common.print_header(device, 'MNIST speed, whole processes', config_line(args))
    tmp = tempfile.mkdtemp(prefix='bench_mnist_')
    shared = ['--model', args.model, '--layers', str(args.layers), '--method', args.method,
              '--in_channels', str(args.in_channels), '--dim_int', str(args.dim_int),
              '--batch_size', str(args.batch_size), '--epochs', '1', '--seed', str(args.seed),
              '--data_root', os.path.abspath(args.data_root), '--device', str(device)]
    if args.synthetic:
        shared.append('--synthetic')
    if args.subset:
        shared += ['--subset', str(args.subset)]
    workers = args.workers if args.workers is not None else (2 if device.type == 'cuda' else 0)
    eval_batch = args.eval_batch_a or project_eval_chunk(device)
    env = dict(os.environ)
    if args.threads:
        env['OMP_NUM_THREADS'] = str(args.threads)

    def command(key, repeat):
        if key in ('b', 'c'):
            return [sys.executable, os.path.join(ROOT, 'MNIST_experiments.py'), *shared,
                    '--lr_init', str(args.lr), '--save', f'bench_{key}{repeat}.pkl',
                    '--results_dir', os.path.join(tmp, 'results'),
                    '--checkpoint', os.path.join(tmp, 'checkpoints', f'bench_{key}{repeat}.pth'),
                    *(['--compile'] if key == 'c' else [])]
        return [sys.executable, os.path.join(HERE, 'release_style_mnist.py'), *shared,
                '--lr_init', str(args.lr), '--eval_batch', str(eval_batch), '--workers', str(workers),
                '--out', os.path.join(tmp, f'release_{repeat}')]

    for key in args.pipelines:
        shown = ' '.join(shlex.quote(os.path.relpath(c, tmp) if c.startswith(tmp) else c)
                         for c in command(key, 0)[1:])
        common.print_flush(f'- {key}: python {shown}')
    common.print_flush(f'- peak memory: each child\'s peak RSS (os.wait4 ru_maxrss); temp dir {tmp}')
    walls = {key: [] for key in args.pipelines}
    peaks = {key: [] for key in args.pipelines}
    loads = {key: [] for key in args.pipelines}
    cpus = {key: [] for key in args.pipelines}
    for repeat in range(args.repeats):
        for key in args.pipelines:
            log_path = os.path.join(tmp, f'{key}_{repeat}.log')
            wall, rc, peak, cpu = run_process(command(key, repeat), tmp, env, log_path)
            with open(log_path) as f:
                tail = [line.rstrip() for line in f if line.strip()][-3:]
            common.print_flush(f'  run {repeat + 1}/{args.repeats} {key}: {wall:.2f} s, CPU {cpu:.2f} s, exit {rc}, '
                               f'load {os.getloadavg()[0]:.2f}; last lines: {" | ".join(tail)}')
            if rc != 0:
                common.print_flush(f'error: pipeline {key} exited with {rc}; log {log_path}')
                return 1
            walls[key].append(wall)
            peaks[key].append(peak)
            cpus[key].append(cpu)
            loads[key].append(os.getloadavg()[0])
    header = ['pipeline (whole process)', 'wall s (best)', 'wall s (median)', 'all runs s',
              'CPU s (user+sys, best)', 'peak RSS MiB', 'load avg per run']
    names = {'a': 'a: release_style_mnist.py', 'b': 'b: MNIST_experiments.py',
             'c': 'c: MNIST_experiments.py --compile'}
    rows = [[names[k], common.fmt(min(walls[k]), 2), common.fmt(common.median(walls[k]), 2),
             ', '.join(f'{w:.2f}' for w in walls[k]), common.fmt(min(cpus[k]), 2),
             common.fmt(max(peaks[k]), 0), ', '.join(f'{x:.2f}' for x in loads[k])]
            for k in args.pipelines]
    common.print_flush('')
    common.print_flush(common.markdown_table(header, rows))
    common.print_flush('')
    what = 'whole process (data load, evaluation, 1 epoch, evaluation)'
    for slow, fast in (('a', 'b'), ('b', 'c')):
        if slow in walls and fast in walls:
            ratio = f'{fast}/{slow}'
            common.print_flush(f'speedup {ratio}, {what}, best runs: '
                               f'{min(walls[slow]) / min(walls[fast]):.2f}x')
            common.print_flush(f'speedup {ratio}, {what}, medians: '
                               f'{common.median(walls[slow]) / common.median(walls[fast]):.2f}x')
            common.print_flush(f'speedup {ratio}, whole process, CPU time (user+sys), best runs: '
                               f'{min(cpus[slow]) / min(cpus[fast]):.2f}x')
    return 0


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    if args.whole_process:
        return whole_process(args, device)
    return in_process(args, device)


if __name__ == '__main__':
    sys.exit(main())
