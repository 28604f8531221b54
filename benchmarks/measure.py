"""What the benchmark scripts share: the project's pipeline, timing, conv FLOPs, peak memory, the report."""
import os
import pathlib
import platform
import resource
import shlex
import statistics
import sys
import time
from functools import partial

import torch
import torchdiffeq
import torchvision
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from resnet_ode import cifar, distributed, evaluation, training
from resnet_ode.gate import pick_device
from resnet_ode.signals import StopRequest

say = partial(print, flush=True)
MEMORY_KIND = {'cuda': 'torch.cuda.max_memory_allocated (reset per run)',
               'cpu': 'process peak RSS, resource.getrusage ru_maxrss (high-water mark reset per run)'}


class ConvFlopCounter(TorchFunctionMode):
    """Convolutions only (nearly all of these networks' arithmetic), read off every torch.conv2d
    call (nn.Conv2d and F.conv2d both end there): forward = 2*Cin*Cout*kh*kw*Hout*Wout per image;
    backward adds 1x forward for the input gradient (input on the gradient path) and 1x for the
    weight gradient (trained weight): 3x for a trained conv, 2x for RKHS's fixed random conv, 1x
    for MNIST's frozen input network, 2x for CIFAR's stem (weight gradient only)."""

    def __init__(self):
        super().__init__()
        self.total = self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.conv2d:
            x, w = args[:2]  # input and weight: positional in F.conv2d's calls
            forward = 2 * out.numel() * w[0].numel()  # w[0].numel() = Cin/groups * kh * kw
            grad = torch.is_grad_enabled()
            self.total += forward * (1 + (grad and x.requires_grad) + (grad and w.requires_grad))
            self.calls += 1
        return out


class ProjectPipeline:
    """Pipelines b and c: this project's training loop on uint8 data on the device, the Experiment built as the
    training script builds it from `fields` and train_eval_sample(train set). Like ReleasePipeline, but
    one network serves every run, reset each time, so that a compiled forward compiles once (warm-up)."""

    def __init__(self, args, device, net, forward, train, test, chunk_caps, train_eval_sample, **fields):
        self.args, self.device, self.net, self.forward, self.fields = args, device, net, forward, fields
        self.train, self.test, self.train_eval_sample = train.to(device), test.to(device), train_eval_sample
        self.initial_state = {k: v.clone() for k, v in net.state_dict().items()}
        self.chunk = evaluation.eval_chunk(chunk_caps, device, 10**9)
        self.describe = f'evaluation chunk {self.chunk} (EVAL_CHUNK)'

    def prepare(self, warmup_steps):
        train, test, batch = self.train, self.test, self.args.batch_size
        if warmup_steps:  # plus the epoch's last, partial batch: a compiled forward recompiles for it
            train = train.head(min(len(train), warmup_steps * batch + len(train) % batch))
            test = test.head(len(train))
        self.net.load_state_dict(self.initial_state)
        exp = training.Experiment(  # dataset, parts, facts: for the files training.fit writes, none here
            dataset='', model=self.net, parts={}, train_set=train, test_set=test, eval_chunk=self.chunk,
            train_eval_sample=self.train_eval_sample(train), facts={}, training_forward=self.forward,
            **self.fields)
        optimizer = torch.optim.SGD(exp.parameters, lr=self.args.lr)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.args.seed)

        def train_epoch():
            outcome = training.train_one_epoch(exp, optimizer, [generator], batch, distributed.SINGLE,
                                             StopRequest(), 'project epoch')
            if outcome.status != 'done':
                raise RuntimeError(f'project epoch ended with status {outcome.status}')
            return outcome.losses[0].tolist()

        def evaluate():  # the one member's (train error, test error)
            train_errors, test_errors = evaluation.evaluate(exp, generator, distributed.SINGLE)
            return train_errors[0], test_errors[0]
        return train_epoch, evaluate


def run_epoch(pipeline, device, warmup_steps=0) -> dict:
    """One training epoch then the two evaluations, with the peak memory they reached, each timed in
    wall and CPU seconds (user + system, all threads: far less disturbed by other processes)."""
    def clock():  # (wall s, CPU s, peak memory MiB)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        return time.perf_counter(), time.process_time(), peak
    train, evaluate = pipeline.prepare(warmup_steps)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: resets the kernel's peak RSS, which ru_maxrss reads, to the current RSS
        pathlib.Path('/proc/self/clear_refs').write_text('5')
    start = clock()
    losses, trained = train(), clock()
    (train_error, test_error), end = evaluate(), clock()
    return dict(train_s=trained[0] - start[0], eval_s=end[0] - trained[0], total_s=end[0] - start[0],
                cpu_s=end[1] - start[1], peak_mib=end[2], start_mib=start[2], last_loss=losses[-1],
                train_error=train_error, test_error=test_error, load=os.getloadavg()[0])


def synchronize(device):
    if device.type == 'cuda':  # CUDA runs ahead of the host: time only finished work
        torch.cuda.synchronize(device)


def parse_args(p, argv, warmup_steps: int, c_options: tuple):
    """Adds the flags every benchmark has, parses, checks, sets torch's threads; (args, device)."""
    p.add_argument('--repeats', type=int, default=1, help='runs of each pipeline, alternated')
    p.add_argument('--pipelines', default='a,b', help='comma-separated subset of a,b,c (default a,b)')
    p.add_argument('--warmup_steps', type=int, default=warmup_steps, help='untimed steps of each first')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    for option in c_options:
        p.add_argument(f'--{option}', action='store_true', help=f'pipeline c: the script\'s --{option}')
    args = p.parse_args(argv)
    args.pipelines = args.pipelines.split(',')
    if not set(args.pipelines) <= {'a', 'b', 'c'} or min(args.repeats, args.layers, args.batch_size) < 1:
        p.error('--pipelines: a comma-separated subset of a,b,c; --repeats, --layers, --batch_size: >= 1')
    if ('c' in args.pipelines) != any(getattr(args, o) for o in c_options):
        p.error(f'pipeline c is b with {" and/or ".join("--" + o for o in c_options)}: give '
                '--pipelines ...,c and an option, or neither')
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, pick_device(args)


def print_header(device, title, args):
    info = pathlib.Path('/proc/cpuinfo').read_text() if os.path.exists('/proc/cpuinfo') else ''
    cpu = next((line.split(':', 1)[1].strip() for line in info.splitlines() if line.startswith('model name')),
               platform.processor())
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({cpu})'
    say(f'## {title}\ncommand: `python {shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}` '
        f'(run from the repository root)\n- platform: {platform.platform()}, '
        f'Python {platform.python_version()}\n- CPU: {cpu}, {os.cpu_count()} logical CPUs, torch threads '
        f'{torch.get_num_threads()}\n- torch {torch.__version__}, torchvision {torchvision.__version__}, '
        f'torchdiffeq {torchdiffeq.__version__}\n- device: {device} = {name}\n- load average at start '
        '(1/5/15 min): ' + ' / '.join(f'{x:.2f}' for x in os.getloadavg()) + '\n- config: '
        + ', '.join(f'{key} {value}' for key, value in vars(args).items() if value not in (None, False)))


def print_table(header, rows, note=''):
    say(f'\n{note}| ' + ' | '.join(header) + ' |\n|' + '|'.join('---' for _ in header) + '|\n'
        + ''.join('| ' + ' | '.join(row) + ' |\n' for row in rows))


def print_speedups(seconds: list):
    """The b/a and c/b speedups (above 1x: the later is faster), for each (what, {pipeline: seconds})."""
    for slow, fast in (('a', 'b'), ('b', 'c')):
        if slow in seconds[0][1] and fast in seconds[0][1]:
            say('\n'.join(f'speedup {fast}/{slow}, {what}: {s[slow] / s[fast]:.2f}x' for what, s in seconds))


def compare(pipelines: dict, names: dict, image_shape, device, args) -> int:
    """Warm up, run every pipeline args.repeats times (alternating), print the table and speedups."""
    flops = {}
    for key, pipe in pipelines.items():
        pipe.net.train()
        with ConvFlopCounter() as counter:  # one training step's
            pipe.net(torch.randn(2, *image_shape, device=device))  # 2: BatchNorm in training needs >1
        flops[key] = counter.total / 2
        say(f'- pipeline {key}: {len(pipe.train):,} training images/epoch, evaluations on '
            f'{min(cifar.TRAIN_EVAL_SIZE, len(pipe.train)):,} training + {len(pipe.test):,} test images; '
            f'conv FLOPs per training image {flops[key] / 1e6:.2f} MFLOP ({counter.calls} conv calls '
            f'forward); {pipe.describe}')
    say(f'- FLOP convention: {" ".join(ConvFlopCounter.__doc__.split())} train GFLOP/s = training conv FLOPs '
        f'of the epoch / training time (data handling included)\n- peak memory: {MEMORY_KIND[device.type]}')
    for pipe in pipelines.values() if args.warmup_steps > 0 else ():
        run_epoch(pipe, device, args.warmup_steps)
    runs = {key: [] for key in pipelines}
    for repeat in range(args.repeats):
        for key, pipe in pipelines.items():
            runs[key].append(r := run_epoch(pipe, device))
            say(f'  run {repeat + 1}/{args.repeats} {key}: train {r["train_s"]:.2f} s, evals '
                f'{r["eval_s"]:.2f} s, CPU {r["cpu_s"]:.2f} s, last loss {r["last_loss"]:.4f}, '
                f'load {r["load"]:.2f}')
    median = {s: {k: statistics.median(r[s] for r in runs[k]) for k in runs}
              for s in ('train_s', 'eval_s', 'total_s', 'cpu_s')}
    rows = []
    for key, results in runs.items():
        ips = len(pipelines[key].train) / median['train_s'][key]
        rows.append([names[key], f'{ips:,.0f}', *(f'{median[s][key]:,.2f}' for s in ('train_s', 'eval_s')),
                     f'{median["total_s"][key]:,.2f}', ', '.join(f'{r["total_s"]:.2f}' for r in results),
                     f'{median["cpu_s"][key]:,.2f}', f'{max(r["peak_mib"] for r in results):,.0f}',
                     f'{max(r["peak_mib"] - r["start_mib"] for r in results):,.0f}',
                     f'{flops[key] * ips / 1e9:,.2f}', f'{flops[key] * args.batch_size / 1e9:,.2f}',
                     f'{100 * results[-1]["train_error"]:.2f} / {100 * results[-1]["test_error"]:.2f}',
                     ', '.join(f'{r["load"]:.2f}' for r in results)])
    print_table(['pipeline (median of runs)', 'train img/s', 'train epoch s', 'evals s',
                 'epoch incl. evals s', 'epoch incl. evals s, all runs', 'CPU s (user+sys)', 'peak mem MiB',
                 'peak - start MiB', 'train GFLOP/s', 'GFLOP/step', 'train / test error %',
                 'load avg per run'], rows,
                f'(median of {args.repeats} run(s); peak memory: {MEMORY_KIND[device.type]})\n')
    print_speedups([('epoch incl. evals', median['total_s']),
                    ('epoch incl. evals, best runs', {k: min(r['total_s'] for r in runs[k]) for k in runs}),
                    ('training images/s', median['train_s']),  # the same images in each: a time ratio
                    ('CPU time of epoch incl. evals', median['cpu_s'])])
    return 0
