"""A release-style training pipeline, written for the speed benchmarks (the baseline, not used
by the project).

It does what the paper's public release did, in the way it did it:
  * data: torchvision datasets (one PIL image per sample, per-image transforms) through a torch
    DataLoader, batches copied to the device every step;
  * ODE: torchdiffeq.odeint(f, x, t=[0, 1], method, options={'step_size': 1/N}), where f reads
    the time t at every call, derives the release's node pair and weights from it
    (models.release_coefficients, so the time rule is the release's to the bit) and BLENDS
    outputs: RKHS  w0 * conv(h, W[i0]) + w1 * conv(h, W[i1]) with h = relu(conv(x, Omega));
              SHL   w0 * V[i0] * relu(H[i0] * x) + w1 * V[i1] * relu(H[i1] * x);
    and node N alone (one residual) once k >= N;
  * training: plain SGD, loss.item() every step; evaluation through DataLoaders.

The parameters have the project's names and shapes (ode_block.func.omega.weight,
ode_block.func.output_weight, ode_block.func.hidden_weight, input_net.*, output_net.*), so a
project model's state_dict loads into `ReleaseStyleMNISTNet` unchanged and both compute with the
same weights.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from benchmarks.common import ROOT  # noqa: F401  (puts the project root on sys.path)
import models

# ---------------------------------------------------------------------------------------------
# ODE functions f(t, x) as the release wrote them: time read at each call, outputs blended
# ---------------------------------------------------------------------------------------------


class _Weight(nn.Module):
    """Holds a fixed conv weight as a buffer named `weight` (the project's `omega.weight`)."""

    def __init__(self, weight):
        super().__init__()
        self.register_buffer('weight', weight)


class ReleaseStyleRKHSField(nn.Module):
    model_name = 'RKHS'

    def __init__(self, dim: int, dim_int: int, num_steps: int):
        super().__init__()
        self.num_steps = num_steps
        self.omega = _Weight(torch.randn(dim_int, dim, 3, 3) / math.sqrt(3 * dim_int))
        self.output_weight = nn.Parameter(torch.zeros(num_steps + 1, dim, dim_int, 3, 3))
        self.nfe = 0

    def forward(self, t, x):
        self.nfe += 1
        i0, i1, w0, w1 = models.release_coefficients(t, self.num_steps, self.model_name)
        h = F.relu(F.conv2d(x, self.omega.weight, padding=1))
        if i0 == i1:  # k >= N: node N alone
            return F.conv2d(h, self.output_weight[i0], padding=1)
        return (w0 * F.conv2d(h, self.output_weight[i0], padding=1)
                + w1 * F.conv2d(h, self.output_weight[i1], padding=1))


class ReleaseStyleSHLField(nn.Module):
    model_name = 'SHL'

    def __init__(self, dim: int, dim_int: int, num_steps: int):
        super().__init__()
        self.num_steps = num_steps
        hidden = torch.empty(num_steps + 1, dim_int, dim, 3, 3)
        for node in hidden:  # nn.Conv2d's default initialisation
            nn.init.kaiming_uniform_(node, a=math.sqrt(5))
        self.hidden_weight = nn.Parameter(hidden)
        self.output_weight = nn.Parameter(torch.zeros(num_steps + 1, dim, dim_int, 3, 3))
        self.nfe = 0

    def residual(self, x, i):
        h = F.relu(F.conv2d(x, self.hidden_weight[i], padding=1))
        return F.conv2d(h, self.output_weight[i], padding=1)

    def forward(self, t, x):
        self.nfe += 1
        i0, i1, w0, w1 = models.release_coefficients(t, self.num_steps, self.model_name)
        if i0 == i1:  # k >= N: node N alone
            return self.residual(x, i0)
        return w0 * self.residual(x, i0) + w1 * self.residual(x, i1)


RELEASE_FIELDS = {'RKHS': ReleaseStyleRKHSField, 'SHL': ReleaseStyleSHLField}


class ReleaseStyleODEBlock(nn.Module):
    def __init__(self, model='RKHS', dim=32, dim_int=32, num_steps=20, method='midpoint'):
        super().__init__()
        self.method, self.num_steps = method, num_steps
        self.func = RELEASE_FIELDS[model](dim, dim_int, num_steps)

    def forward(self, x):
        import torchdiffeq

        t = torch.tensor([0.0, 1.0], device=x.device)
        return torchdiffeq.odeint(self.func, x, t, method=self.method,
                                  options={'step_size': 1 / self.num_steps})[-1]


class ReleaseStyleMNISTNet(nn.Module):
    """B(odeint(f, A(image))) with A and B frozen, as the project's MNISTODENet."""

    def __init__(self, model='RKHS', in_channels=32, dim_int=32, layers=20, method='midpoint'):
        super().__init__()
        self.input_net = models.mnist_input_network(in_channels)
        self.ode_block = ReleaseStyleODEBlock(model, in_channels, dim_int, layers, method)
        self.output_net = models.mnist_output_network(in_channels)
        for net in (self.input_net, self.output_net):
            net.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.input_net.eval()
        self.output_net.eval()
        return self

    def forward(self, images):
        return self.output_net(self.ode_block(self.input_net(images)))


def release_net_from(project_net: models.MNISTODENet) -> ReleaseStyleMNISTNet:
    """A release-style network holding exactly the project network's weights."""
    block = project_net.ode_block
    func = block.func
    net = ReleaseStyleMNISTNet(block.model, func.dim, func.dim_int, block.num_steps, block.method)
    net.load_state_dict(project_net.state_dict())
    device = next(project_net.parameters()).device
    return net.to(device)


# ---------------------------------------------------------------------------------------------
# Data: one PIL image per sample, as torchvision's MNIST and CIFAR10 datasets hand them out
# ---------------------------------------------------------------------------------------------

class PILImageDataset(torch.utils.data.Dataset):
    """uint8 images -> PIL image per __getitem__ -> transform, like torchvision's MNIST/CIFAR10.

    images: (N, H, W) grey or (N, 3, H, W) colour uint8; kept as a numpy array, HWC for colour
    (the layout of torchvision's CIFAR10.data).
    """

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor, transform):
        images = images_u8.cpu()
        if images.dim() == 4:
            images = images.permute(0, 2, 3, 1)
        self.data = np.ascontiguousarray(images.numpy())
        self.targets = [int(y) for y in labels.cpu()]
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index])  # 'L' for (H, W), 'RGB' for (H, W, 3)
        return self.transform(image), self.targets[index]


def loader(dataset, batch_size, shuffle, workers, device):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       num_workers=workers, pin_memory=device.type == 'cuda',
                                       persistent_workers=False)


# ---------------------------------------------------------------------------------------------
# Training and evaluation, release style
# ---------------------------------------------------------------------------------------------

def train_epoch(net, train_loader, optimizer, device, max_steps=None) -> list[float]:
    """One epoch of plain SGD; the loss is read back (loss.item()) at every step."""
    net.train()
    losses = []
    for step, (images, labels) in enumerate(train_loader):
        if max_steps is not None and step >= max_steps:
            break
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        optimizer.zero_grad()
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def error_rate(net, data_loader, device, max_batches=None) -> float:
    net.eval()
    wrong = seen = 0
    for batch, (images, labels) in enumerate(data_loader):
        if max_batches is not None and batch >= max_batches:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        wrong += int((net(images).argmax(1) != labels).sum().item())
        seen += labels.shape[0]
    return wrong / max(seen, 1)


TRAIN_EVAL_SIZE = 10_000  # the training error is measured on the first 10,000 training images


def mnist_datasets(root, synthetic=False, subset=None):
    """(train, first 10,000 of train, test) as torchvision-style datasets giving ToTensor images.

    Real MNIST: torchvision.datasets.MNIST (no download). Synthetic: the project's synthetic
    images (data.synthetic_dataset, the same ones the project path gets) served one PIL image at
    a time. --subset keeps the first N training and N test images, as the project's scripts do.
    """
    import data
    from torchvision import datasets, transforms

    to_tensor = transforms.ToTensor()
    if synthetic:
        n_train = min(subset or data.MNIST_TRAIN_SIZE, data.MNIST_TRAIN_SIZE)
        n_test = min(subset or data.MNIST_TEST_SIZE, data.MNIST_TEST_SIZE)
        train_u8, test_u8 = data.synthetic_dataset((28, 28), n_train, n_test)
        train = PILImageDataset(train_u8.images, train_u8.labels, to_tensor)
        test = PILImageDataset(test_u8.images, test_u8.labels, to_tensor)
    else:
        train = datasets.MNIST(root, train=True, transform=to_tensor, download=False)
        test = datasets.MNIST(root, train=False, transform=to_tensor, download=False)
        if subset:
            train = torch.utils.data.Subset(train, range(min(subset, len(train))))
            test = torch.utils.data.Subset(test, range(min(subset, len(test))))
    train_eval = torch.utils.data.Subset(train, range(min(TRAIN_EVAL_SIZE, len(train))))
    return train, train_eval, test
