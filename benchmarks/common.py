"""Helpers shared by the benchmark scripts: machine description, timing, peak memory, conv FLOPs.

Conventions used in every report
--------------------------------
FLOPs are counted analytically for convolutions only (they carry all but a fraction of a percent
of the arithmetic of these networks). One multiply-add is 2 FLOPs, so a convolution's forward
pass costs

    2 * Cin/groups * kh * kw * (output elements) = 2 * Cin * Cout * kh * kw * Hout * Wout per image.

Its backward pass costs one more forward's worth for the input gradient, when the input is on the
gradient path, and one more for the weight gradient, when the weight is trained. A trained conv in
the middle of the network therefore costs 3x its forward per training step, a fixed conv (RKHS's
Omega) on the gradient path 2x, a frozen conv before anything trained (MNIST's input network) 1x.
The shapes and the two flags are read off the conv calls themselves (`ConvFlopCounter`), so the
count follows exactly the convolutions each pipeline runs.
"""
from __future__ import annotations

import os
import platform
import resource
import shlex
import statistics
import sys
import time

import torch
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import distributed  # noqa: E402
import engine  # noqa: E402
import models  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU ({cpu_model()})'


def machine_lines(device: torch.device) -> list[str]:
    import torchvision
    try:
        import torchdiffeq
        tde = torchdiffeq.__version__
    except Exception:
        tde = 'not installed'
    return [
        f'platform: {platform.platform()}, Python {platform.python_version()}',
        f'CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}',
        f'torch {torch.__version__}, torchvision {torchvision.__version__}, torchdiffeq {tde}',
        f'device: {device} = {device_name(device)}',
    ]


def pick_device(name) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def synchronize(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock seconds of a block, with the device synchronised at both ends, and the CPU
    seconds (user + system, all threads of this process) it used: on a shared machine the CPU
    time is far less sensitive than the wall time to other processes' load."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        synchronize(self.device)
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------

def _reset_rss_high_water() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets the peak RSS that getrusage reports."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def current_rss_mib() -> float:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float('nan')


class PeakMemory:
    """Peak memory of one pipeline run.

    CUDA: torch.cuda.max_memory_allocated, reset before the run (tensors allocated by PyTorch).
    CPU: the whole process's peak resident set size, resource.getrusage(RUSAGE_SELF).ru_maxrss,
    with the kernel's high-water mark reset before the run (/proc/self/clear_refs) so that the
    peak is this run's. It includes the interpreter, the libraries and both pipelines' datasets.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset_worked = None
        self.start_mib = float('nan')

    @property
    def kind(self) -> str:
        if self.device.type == 'cuda':
            return 'torch.cuda.max_memory_allocated (reset per run)'
        if self.reset_worked is False:
            return ('process peak RSS, resource.getrusage ru_maxrss (could NOT be reset: '
                    'cumulative over the process)')
        return 'process peak RSS, resource.getrusage ru_maxrss (high-water mark reset per run)'

    def reset(self):
        """Start a run: reset the peak and remember the current level (`start_mib`)."""
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = torch.cuda.memory_allocated(self.device) / 2 ** 20
        else:
            self.reset_worked = _reset_rss_high_water()
            self.start_mib = current_rss_mib()

    def peak_mib(self) -> float:
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------

class ConvFlopCounter(TorchFunctionMode):
    """Counts the FLOPs of every torch.conv2d call (nn.Conv2d and F.conv2d both end there).

    forward  = 2 * output.numel() * Cin/groups * kh * kw
    backward = forward * (input on the gradient path) + forward * (weight trained)
    Both flags are read at the call, with grad mode: under torch.no_grad the backward is 0.
    """

    def __init__(self):
        super().__init__()
        self.forward_flops = 0
        self.backward_flops = 0
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.conv2d:
            x = args[0] if args else kwargs['input']
            w = args[1] if len(args) > 1 else kwargs['weight']
            fwd = 2 * out.numel() * w[0].numel()  # w[0].numel() = Cin/groups * kh * kw
            grad = torch.is_grad_enabled()
            self.forward_flops += fwd
            self.backward_flops += fwd * (int(grad and x.requires_grad) + int(grad and w.requires_grad))
            self.calls += 1
        return out

    @property
    def total(self) -> int:
        return self.forward_flops + self.backward_flops


def conv_flops_per_image(fn, batch: int) -> tuple[float, int]:
    """(conv FLOPs per image, conv calls) of fn(), which processes a batch of `batch` images."""
    with ConvFlopCounter() as counter:
        fn()
    return counter.total / batch, counter.calls


def add_mnist_model_arguments(parser):
    """The MNIST network's flags, with MNIST_experiments.py's defaults (Figure 1's RKHS L=20)."""
    parser.add_argument('--model', default='RKHS', choices=models.MODELS)
    parser.add_argument('--layers', type=int, default=20)
    parser.add_argument('--method', default='midpoint', choices=models.METHODS)
    parser.add_argument('--in_channels', type=int, default=32)
    parser.add_argument('--dim_int', type=int, default=32)


def flops_per_image(net, image_shape, device, training: bool) -> tuple[float, int]:
    """(conv FLOPs per image, conv calls) of one forward (training: and backward) pass of net."""
    images = torch.randn(2, *image_shape, device=device)  # 2: BatchNorm in training mode needs >1
    net.train(training)
    with torch.set_grad_enabled(training):
        return conv_flops_per_image(lambda: net(images), 2)


def train_and_eval_flops(net, image_shape, device):
    """What a pipeline's .flops() returns: (training step, evaluation) FLOPs per image."""
    return (flops_per_image(net, image_shape, device, True),
            flops_per_image(net, image_shape, device, False))


# ---------------------------------------------------------------------------------------------
# One timed epoch
# ---------------------------------------------------------------------------------------------

def epoch_result(train_timer, eval_timer, memory, losses, train_error, test_error) -> dict:
    """What a pipeline's .run() returns, for compare() and print_table()."""
    return dict(train_s=train_timer.seconds, eval_s=eval_timer.seconds,
                cpu_s=train_timer.cpu_seconds + eval_timer.cpu_seconds, peak_mib=memory.peak_mib(),
                start_mib=memory.start_mib, steps=len(losses), last_loss=losses[-1],
                train_error=train_error, test_error=test_error)


class ProjectPipeline:
    """Pipeline b (and c): this project's engine on uint8 datasets held on the device.

    A subclass sets `dataset` (engine's name), `image_shape` and `warmup_eval_images`, calls
    __init__ with its network and training forward, and defines build_experiment(net, train, test).
    """
    key = 'b'
    dataset = image_shape = warmup_eval_images = None

    def __init__(self, args, device, train, test, net, training_forward=None):
        self.args, self.device = args, device
        self.train, self.test = train.to(device), test.to(device)
        self.chunk = engine.eval_chunk(self.dataset, device, test_batch_size=10**9)
        n = len(self.train)
        self.sizes = (n, min(engine.TRAIN_EVAL_SIZE, n), len(self.test))
        # One network for every run, reset to the same initial weights each time, so that a
        # compiled forward is compiled once (in the warm-up), not once per timed run.
        self.net, self.training_forward = net, training_forward
        self.initial_state = {k: v.clone() for k, v in net.state_dict().items()}

    def describe(self) -> str:
        return f'evaluation chunk {self.chunk} (engine.EVAL_CHUNK)'

    def experiment(self, train, test):
        """(Experiment, SGD optimizer, generator) as the training script builds them."""
        self.net.load_state_dict(self.initial_state)
        exp = self.build_experiment(self.net, train, test)
        optimizer = torch.optim.SGD(exp.parameters, lr=self.args.lr)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.args.seed)
        return exp, optimizer, generator

    def flops(self):
        return train_and_eval_flops(self.net, self.image_shape, self.device)

    def warmup(self, steps):
        # Plus the epoch's last, partial batch if there is one: a compiled forward meets that
        # shape once per epoch, and its recompilation belongs to the warm-up, not the timing.
        batch = self.args.batch_size
        n = min(len(self.train), steps * batch + len(self.train) % batch)
        exp, optimizer, generator = self.experiment(self.train.head(n),
                                                    self.test.head(self.warmup_eval_images))
        engine.train_one_epoch(exp, optimizer, generator, batch, distributed.SINGLE,
                               engine.StopRequest(), 'warm-up')
        exp.train_set = self.train.head(min(n, self.warmup_eval_images))
        engine.evaluate(exp, generator, self.chunk, distributed.SINGLE)

    def run(self, memory) -> dict:
        exp, optimizer, generator = self.experiment(self.train, self.test)
        memory.reset()
        with Timer(self.device) as train_timer:
            outcome = engine.train_one_epoch(exp, optimizer, generator, self.args.batch_size,
                                             distributed.SINGLE, engine.StopRequest(), 'project epoch')
            losses = outcome.losses.tolist()
        with Timer(self.device) as eval_timer:
            train_error, test_error = engine.evaluate(exp, generator, self.chunk, distributed.SINGLE)
        if outcome.status != 'done':
            raise RuntimeError(f'project epoch ended with status {outcome.status}')
        return epoch_result(train_timer, eval_timer, memory, losses, train_error, test_error)


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

def median(values):
    return statistics.median(values)


def fmt(x, digits=1):
    return f'{x:,.{digits}f}'


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def print_flush(*args):
    print(*args, flush=True)


def command_line() -> str:
    return 'python ' + ' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def print_header(device, title, config: str):
    print_flush(f'## {title}')
    print_flush(f'command: `{command_line()}` (run from the repository root)')
    for line in machine_lines(device):
        print_flush(f'- {line}')
    load = os.getloadavg()
    print_flush(f'- load average at start (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}')
    print_flush(f'- config: {config}')


def print_table(runs, names, train_sizes, flops, batch_size, memory):
    """The markdown table (medians over runs) and the speedups b/a and c/b."""
    header = ['pipeline (median of runs)', 'train img/s', 'train epoch s', 'evals s', 'epoch incl. evals s',
              'epoch incl. evals s, all runs', 'CPU s (user+sys)', 'peak mem MiB', 'peak - start MiB', 'train GFLOP/s', 'GFLOP/step',
              'train / test error %', 'load avg per run']
    rows, summary = [], {}
    for key, results in runs.items():
        train_s = median([r['train_s'] for r in results])
        eval_s = median([r['eval_s'] for r in results])
        total_s = median([r['train_s'] + r['eval_s'] for r in results])
        cpu_s = median([r['cpu_s'] for r in results])
        n_train = train_sizes[key]
        last = results[-1]
        summary[key] = dict(train_s=train_s, total_s=total_s, ips=n_train / train_s, cpu_s=cpu_s)
        rows.append([names[key], fmt(n_train / train_s, 0), fmt(train_s, 2),
                     fmt(eval_s, 2), fmt(total_s, 2),
                     ', '.join(f'{r["train_s"] + r["eval_s"]:.2f}' for r in results), fmt(cpu_s, 2),
                     fmt(max(r['peak_mib'] for r in results), 0),
                     fmt(max(r['peak_mib'] - r['start_mib'] for r in results), 0),
                     fmt(flops[key] * n_train / train_s / 1e9, 2),
                     fmt(flops[key] * batch_size / 1e9, 2),
                     f'{100 * last["train_error"]:.2f} / {100 * last["test_error"]:.2f}',
                     ', '.join(f'{r["load"]:.2f}' for r in results)])
    print_flush('')
    print_flush(f'(median of {len(next(iter(runs.values())))} run(s); peak memory: {memory.kind})')
    print_flush(markdown_table(header, rows))
    print_flush('')
    for slow, fast in (('a', 'b'), ('b', 'c')):
        if slow in summary and fast in summary:
            print_speedups(runs, summary, slow, fast)


def print_speedups(runs, summary, slow: str, fast: str):
    """How much faster pipeline `fast` is than `slow` (above 1x: faster)."""
    ratio = f'{fast}/{slow}'
    print_flush(f'speedup {ratio}, epoch incl. evals: '
                f'{summary[slow]["total_s"] / summary[fast]["total_s"]:.2f}x')
    best = {k: min(r['train_s'] + r['eval_s'] for r in runs[k]) for k in (slow, fast)}
    print_flush(f'speedup {ratio}, epoch incl. evals, best runs: {best[slow] / best[fast]:.2f}x')
    print_flush(f'speedup {ratio}, training images/s: {summary[fast]["ips"] / summary[slow]["ips"]:.2f}x')
    print_flush(f'speedup {ratio}, CPU time of epoch incl. evals: '
                f'{summary[slow]["cpu_s"] / summary[fast]["cpu_s"]:.2f}x')


FLOP_CONVENTION = ('conv forward = 2*Cin*Cout*kh*kw*Hout*Wout per image; backward adds 1x forward '
                   'for the input gradient (input on the gradient path) and 1x for the weight '
                   'gradient (trained weight): 3x forward for a trained conv, 2x for a fixed conv '
                   'on the gradient path (RKHS\'s random layer), 1x for a conv with nothing trained '
                   'before it and a frozen or untracked input (MNIST\'s input network; CIFAR\'s stem '
                   'gets 2x: weight gradient only); convolutions only. train GFLOP/s = training conv '
                   'FLOPs of the epoch / training time (data handling included)')


def compare(pipelines: dict, names: dict, device, repeats: int, warmup_steps: int, batch_size: int) -> int:
    """Warm up, run every pipeline `repeats` times (alternating), print the table and speedups.

    A pipeline has .sizes (train, train-eval, test images), .flops() -> ((train FLOPs/image,
    conv calls), (eval FLOPs/image, conv calls)), .describe(), .warmup(steps), .run(memory) -> dict.
    """
    memory = PeakMemory(device)
    flops = {}
    for key, pipe in pipelines.items():
        (train_f, train_calls), (eval_f, _) = pipe.flops()
        flops[key] = train_f
        print_flush(f'- pipeline {key}: {pipe.sizes[0]:,} training images/epoch, evaluations on '
                    f'{pipe.sizes[1]:,} training + {pipe.sizes[2]:,} test images; conv FLOPs per '
                    f'image: training step {train_f / 1e6:.2f} MFLOP ({train_calls} conv calls '
                    f'forward), evaluation {eval_f / 1e6:.2f} MFLOP; {pipe.describe()}')
    print_flush(f'- FLOP convention: {FLOP_CONVENTION}')
    print_flush(f'- peak memory: {memory.kind}')
    for pipe in pipelines.values():
        if warmup_steps > 0:
            pipe.warmup(warmup_steps)
    runs = {key: [] for key in pipelines}
    for repeat in range(repeats):
        for key, pipe in pipelines.items():
            result = pipe.run(memory)
            result['load'] = os.getloadavg()[0]
            runs[key].append(result)
            print_flush(f'  run {repeat + 1}/{repeats} {key}: train {result["train_s"]:.2f} s, '
                        f'evals {result["eval_s"]:.2f} s, CPU {result["cpu_s"]:.2f} s, '
                        f'last loss {result["last_loss"]:.4f}, '
                        f'load {result["load"]:.2f}')
    print_table(runs, names, {k: p.sizes[0] for k, p in pipelines.items()}, flops, batch_size, memory)
    return 0
