"""Where a training step's time goes, per pipeline (torch.profiler, CPU or CUDA).

    python benchmarks/profile_mnist.py --layers 20 --steps 5            # both pipelines
    python benchmarks/profile_mnist.py --pipelines b --sort self_cpu_time_total

Profiles --steps training steps (after --warmup untimed ones) of pipeline a (release style:
odeint + blended outputs, a DataLoader batch) and b (the project: fixed integrator, device
data, the same code as engine.train_one_epoch's step), on the same random batch and weights,
and prints the operators that took the most time.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import release_style as rs  # noqa: E402
from benchmarks.bench_mnist import build_project_net  # noqa: E402
import data  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description='torch.profiler of the two MNIST training steps')
    common.add_mnist_model_arguments(p)
    p.add_argument('--batch_size', type=int, default=256)
    p.add_argument('--lr', type=float, default=0.5)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--rows', type=int, default=15)
    p.add_argument('--sort', default=None, help='default self_cuda_time_total on CUDA, else self_cpu_time_total')
    p.add_argument('--pipelines', default='a,b')
    p.add_argument('--device', default=None)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    from torch.profiler import ProfilerActivity, profile

    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    common.print_header(device, 'MNIST training step profile',
                        f'{args.model} L={args.layers} {args.method}, batch {args.batch_size}, '
                        f'{args.steps} profiled steps after {args.warmup}, threads {torch.get_num_threads()}')
    generator = torch.Generator().manual_seed(args.seed)
    images_u8 = torch.randint(0, 256, (args.batch_size, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    sort = args.sort or ('self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total')

    for key in [s.strip() for s in args.pipelines.split(',') if s.strip()]:
        project = build_project_net(args, device)
        if key == 'a':
            net = rs.release_net_from(project)
            batch = (data.mnist_to_float(images_u8), labels)  # as a DataLoader hands it over

            def step():
                images, targets = batch[0].to(device), batch[1].to(device)
                optimizer.zero_grad()
                loss = F.cross_entropy(net(images), targets)
                loss.backward()
                optimizer.step()
                return loss.item()
        else:
            net = project
            device_images, device_labels = images_u8.to(device), labels.to(device)

            def step():
                loss_sum = F.cross_entropy(net(data.mnist_to_float(device_images)), device_labels,
                                           reduction='sum')
                optimizer.zero_grad(set_to_none=True)
                (loss_sum / args.batch_size).backward()
                optimizer.step()
                return loss_sum.detach()
        optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=args.lr)
        net.train()
        for _ in range(args.warmup):
            step()
        common.synchronize(device)
        with common.Timer(device) as timer, profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
        common.print_flush(f'\n### pipeline {key}: {timer.seconds / args.steps * 1000:.1f} ms per step '
                           f'under the profiler ({timer.cpu_seconds / args.steps * 1000:.1f} ms CPU)')
        common.print_flush(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
