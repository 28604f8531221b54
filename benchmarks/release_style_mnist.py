"""A whole release-style MNIST run as one process, the baseline of `bench_mnist.py --whole_process`.

    python benchmarks/release_style_mnist.py --layers 20 --epochs 1 --data_root ../shared/data

Data load (torchvision MNIST + ToTensor through DataLoaders), evaluation before training,
`--epochs` epochs of plain SGD with torchdiffeq.odeint and an ODE function that blends two
outputs (benchmarks/release_style.py), an evaluation after each epoch, and the curves and final
weights saved to --out (when given). Same initial weights as MNIST_experiments.py with the same
--seed (the project's build_model is used to draw them).
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import release_style as rs  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    common.add_mnist_model_arguments(p)
    p.add_argument('--epochs', type=int, default=1)
    p.add_argument('--lr_init', type=float, default=0.5)
    p.add_argument('--batch_size', type=int, default=256)
    p.add_argument('--eval_batch', type=int, default=2000, help='evaluation DataLoader batch (default 2000)')
    p.add_argument('--workers', type=int, default=0, help='DataLoader workers (default 0)')
    p.add_argument('--data_root', default='data')
    p.add_argument('--synthetic', action='store_true')
    p.add_argument('--subset', type=int, default=None)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default=None)
    p.add_argument('--out', default=None, help='folder for the results pickle and final weights')
    return p.parse_args(argv)


def build_net(args, device):
    import MNIST_experiments

    torch.manual_seed(args.seed)
    ns = argparse.Namespace(model=args.model, in_channels=args.in_channels, dim_int=args.dim_int,
                            layers=args.layers, method=args.method, time_weights='release',
                            integrator='fixed', embedding_seed=args.seed,
                            embedding_dir='none', pretrain=0)
    project_net, _ = MNIST_experiments.build_model(ns)
    project_net.freeze_embedding()
    return rs.release_net_from(project_net).to(device)


def main(argv=None):
    args = get_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device) if args.device else torch.device(
        'cuda' if torch.cuda.is_available() else 'cpu')
    train, train_eval, test = rs.mnist_datasets(args.data_root, args.synthetic, args.subset)
    train_loader = rs.loader(train, args.batch_size, True, args.workers, device)
    train_eval_loader = rs.loader(train_eval, args.eval_batch, False, args.workers, device)
    test_loader = rs.loader(test, args.eval_batch, False, args.workers, device)
    net = build_net(args, device)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=args.lr_init)
    curves = {'train_loss': [], 'train_classif': [], 'test_classif': []}

    def evaluate(epoch):
        train_error = rs.error_rate(net, train_eval_loader, device)
        test_error = rs.error_rate(net, test_loader, device)
        curves['train_classif'].append(train_error)
        curves['test_classif'].append(test_error)
        print(f'epoch {epoch}/{args.epochs}: train error {100 * train_error:.2f}%, '
              f'test error {100 * test_error:.2f}%', flush=True)

    evaluate(0)
    for epoch in range(1, args.epochs + 1):
        curves['train_loss'] += rs.train_epoch(net, train_loader, optimizer, device)
        evaluate(epoch)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'release_style.pkl'), 'wb') as f:
            pickle.dump(curves, f)
        torch.save(net.state_dict(), os.path.join(args.out, 'release_style.pth'))
    print(f'done in {time.perf_counter() - start:.1f} s (in-process)', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
