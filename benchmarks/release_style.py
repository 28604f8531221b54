"""The benchmarks' baseline (pipeline a), training the way the paper's release did: torchvision
datasets (a PIL image per sample) through DataLoaders; torchdiffeq.odeint(f, x, t=[0, 1],
options={'step_size': 1/N}), f reading t at every call and blending outputs per node; plain SGD
reading loss.item() every step. As a script (`python benchmarks/release_style.py --epochs 1 ...`), the
baseline of `bench_mnist.py --whole_process`: data load, evaluation, then per epoch training and evaluation.
"""
import argparse
import copy
import itertools
import os
import sys
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
import torchdiffeq
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models
from resnet_ode import cifar, data, distributed, evaluation, gate, mnist


class ReleaseStyleODEBlock(torch.nn.Module):
    """The release's ODE block around a project block's field (its parameters, under its names)."""

    def __init__(self, block: models.ResidualODEBlock):
        super().__init__()
        self.func, self.method, self.num_steps, self.nfe = block.func, block.method, block.num_steps, 0
        self.index_shift = models.RESIDUALS[block.model].release_index_shift

    def field(self, t, x):
        self.nfe += 1
        i0, i1, w0, w1 = models.release_coefficients(t, self.num_steps, self.index_shift)
        nodes = [(i0, w0)] if i0 == i1 else [(i0, w0), (i1, w1)]  # i0 == i1: node N alone, w0 = 1
        if isinstance(self.func, models.RKHSField):
            # Not RKHSField.reference, which interpolates W for one convolution: the release ran
            # w0 * conv(h, W[i0]) + w1 * conv(h, W[i1]), part of what made it slower.
            h = F.relu(self.func.omega(x))
            return sum(w * models.conv3x3(h, self.func.output_weight[i]) for i, w in nodes)
        return self.func.reference(x, nodes)  # SHL: the outputs of two whole residuals, blended

    def forward(self, x):
        t = torch.tensor([0.0, 1.0], device=x.device)
        return torchdiffeq.odeint(self.field, x, t, method=self.method,
                                  options={'step_size': 1 / self.num_steps})[-1]


def release_net_from(project_net: models.MNISTODENet) -> models.MNISTODENet:
    """A release-style network holding a copy of the project network's weights."""
    net = copy.deepcopy(project_net)
    net.ode_block = ReleaseStyleODEBlock(net.ode_block)
    return net


def project_mnist_net(args, device) -> models.MNISTODENet:
    """The project's network as MNIST_experiments.py builds it for --seed (no embedding files)."""
    net, _ = mnist.build_network(gate.Config(mnist.RULES, {
        **vars(args), 'time_weights': 'release', 'integrator': 'fixed', 'embedding_seed': args.seed,
        'embedding_dir': 'none', 'pretrain': 0, 'seeds': None}), None)
    net.to(device).freeze_embedding()
    return net


def add_arguments(p, layers: int, lr: float, mnist: bool):
    """The flags of this script and the benchmarks, with the training scripts' defaults."""
    p.add_argument('--model', default='RKHS', choices=list(models.RESIDUALS))
    integers = {'layers': layers, 'batch_size': 256, 'seed': 0}
    if mnist:
        integers.update(in_channels=32, dim_int=32)
        p.add_argument('--method', default='midpoint', choices=models.METHODS)
    for name, default in integers.items():
        p.add_argument(f'--{name}', type=int, default=default, help=f'(default {default})')
    p.add_argument('--lr', '--lr_init', type=float, default=lr, help=f'SGD rate (default {lr})')
    p.add_argument('--data_root', default='data', help='dataset folder (default data)')
    p.add_argument('--synthetic', action='store_true', help='the project\'s synthetic images instead')
    p.add_argument('--subset', type=int, default=None, help='first N training and N test images')
    p.add_argument('--device', default=None, help='default cuda if available, else cpu')


class PILImages(torch.utils.data.Dataset):
    """A uint8 DeviceDataset served one PIL image at a time through `transform`, as torchvision's
    MNIST and CIFAR10 serve theirs (images kept in numpy, HWC, as CIFAR10.data)."""

    def __init__(self, dataset, transform):
        images = dataset.images.cpu()  # (N, H, W) grey or (N, 3, H, W) colour
        images = images if images.dim() == 3 else images.permute(0, 2, 3, 1)
        self.images = np.ascontiguousarray(images.numpy())
        self.labels, self.transform = dataset.labels.tolist(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def head(dataset, n):
    return torch.utils.data.Subset(dataset, range(min(n, len(dataset))))


class ReleasePipeline:
    """Pipeline a. make_net() makes the initial network; train_eval() gives the dataset of the
    training error (CIFAR: drawn anew at each call). prepare(warmup_steps) -> (train an epoch,
    evaluate) a new network, self.net; a warm-up: that many steps and evaluations on a few images."""

    def __init__(self, args, device, make_net, train, test, train_eval, eval_batch):
        self.args, self.device, self.make_net, self.net = args, device, make_net, make_net()
        self.train, self.test, self.train_eval, self.eval_batch = train, test, train_eval, eval_batch
        cuda = device.type == 'cuda'
        self.loader = partial(torch.utils.data.DataLoader, num_workers=2 if cuda else 0, pin_memory=cuda)
        self.describe = f'DataLoader workers {2 if cuda else 0}, evaluation batch {eval_batch}'

    def prepare(self, warmup_steps):
        net = self.net = self.make_net()
        device, n = self.device, warmup_steps * self.args.batch_size
        optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=self.args.lr)
        batches = self.loader(self.train, self.args.batch_size, shuffle=True)

        def train_epoch():
            net.train()
            losses = []
            for images, labels in itertools.islice(batches, warmup_steps or None):
                optimizer.zero_grad()
                loss = F.cross_entropy(net(images.to(device)), labels.to(device))
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            return losses

        @torch.no_grad()
        def evaluate():  # (train error, test error)
            net.eval()
            sets = [head(d, n) if n else d for d in (self.train_eval(), self.test)]
            return [sum(int((net(images.to(device)).argmax(1) != labels.to(device)).sum())
                        for images, labels in self.loader(d, self.eval_batch)) / len(d) for d in sets]
        return train_epoch, evaluate


def mnist_pipeline(args, device) -> ReleasePipeline:
    """On torchvision's MNIST (--synthetic: the project's images) with ToTensor, cut to --subset."""
    from torchvision import datasets, transforms
    if args.synthetic:
        sets = [PILImages(d, transforms.ToTensor())
                for d in data.load_datasets(args, distributed.SINGLE)]
    else:
        sets = [datasets.MNIST(args.data_root, train, transforms.ToTensor()) for train in (True, False)]
        sets = [head(d, args.subset) if args.subset else d for d in sets]
    return ReleasePipeline(args, device, lambda: release_net_from(project_mnist_net(args, device)), *sets,
                           lambda: head(sets[0], cifar.TRAIN_EVAL_SIZE),
                           evaluation.eval_chunk(mnist.EVAL_CHUNK, device, 10**9))


def main(argv=None):
    p = argparse.ArgumentParser(description='A whole release-style MNIST run.')
    add_arguments(p, layers=20, lr=0.5, mnist=True)
    p.add_argument('--epochs', type=int, default=1)
    p.add_argument('--out', default=None, help='file for the curves and final weights')
    args = p.parse_args(argv)
    pipeline = mnist_pipeline(args, gate.pick_device(args))
    train, evaluate = pipeline.prepare(warmup_steps=0)
    curves = {'train_loss': [], 'train_classif': [], 'test_classif': []}
    for epoch in range(args.epochs + 1):  # epoch 0: the evaluation before training
        curves['train_loss'] += train() if epoch else []
        for name, error in zip(('train_classif', 'test_classif'), evaluate()):
            curves[name].append(error)
        print(f'epoch {epoch}/{args.epochs}: train error {100 * curves["train_classif"][-1]:.2f}%, '
              f'test error {100 * curves["test_classif"][-1]:.2f}%', flush=True)
    if args.out:
        torch.save({'curves': curves, 'weights': pipeline.net.state_dict()}, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
