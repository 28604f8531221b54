"""Datasets held on the training device as uint8 tensors, with batched, device-side transforms.

Each dataset is read once through torchvision (its `.data` and `.targets`), moved to the device
as uint8, and turned into float batches there. Every transform reproduces torchvision's exactly:
ToTensor is x / 255 in float32, Normalize is (x - mean) / std, RandomCrop(32, padding=4) draws
both offsets uniformly from 0..8 over a zero-padded image, and RandomHorizontalFlip flips with
probability 1/2. No DataLoader, no workers, no per-image PIL work.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass

import torch

from common import missing_ancestors


class DataError(Exception):
    """A dataset that is missing, unreachable or corrupt; the message says how to fix it."""

# Official MNIST files, as torchvision lays them out under <root>/MNIST/raw/, with their sizes
# in bytes (checked against the official archives; see also shared/data/README.md).
MNIST_RAW_FILES = {
    'train-images-idx3-ubyte': 47_040_016,
    'train-labels-idx1-ubyte': 60_008,
    't10k-images-idx3-ubyte': 7_840_016,
    't10k-labels-idx1-ubyte': 10_008,
}
MNIST_TRAIN_SIZE, MNIST_TEST_SIZE = 60_000, 10_000

CIFAR_FOLDER = 'cifar-10-batches-py'
CIFAR_ARCHIVE = 'cifar-10-python.tar.gz'  # what torchvision downloads into the root
CIFAR_FILES = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
CIFAR_TRAIN_SIZE, CIFAR_TEST_SIZE = 50_000, 10_000
# Per-channel normalisation used by the paper's release (and by kuangliu/pytorch-cifar, where it
# comes from). The std values are not the dataset's exact pixel std; kept as released.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR_CROP_PADDING = 4
CIFAR_IMAGE_SIZE = 32

# Synthetic data is a fixed function of this seed, so every run (and --evaluate) sees the same.
SYNTHETIC_DATA_SEED = 0
NUM_CLASSES = 10


@dataclass
class DeviceDataset:
    """uint8 images and int64 labels on one device. MNIST: (N, 28, 28); CIFAR: (N, 3, 32, 32)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return self.labels.shape[0]

    def to(self, device):
        return DeviceDataset(self.images.to(device), self.labels.to(device))

    def head(self, n):
        return DeviceDataset(self.images[:n], self.labels[:n])


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

# The idx header of each file: magic number (2051 images, 2049 labels), count, and for images
# the 28 x 28 size, as big-endian 32-bit integers.
MNIST_HEADERS = {
    'train-images-idx3-ubyte': (2051, MNIST_TRAIN_SIZE, 28, 28),
    'train-labels-idx1-ubyte': (2049, MNIST_TRAIN_SIZE),
    't10k-images-idx3-ubyte': (2051, MNIST_TEST_SIZE, 28, 28),
    't10k-labels-idx1-ubyte': (2049, MNIST_TEST_SIZE),
}
FIX_MNIST = 'delete it and let the script download MNIST again, or copy a good copy there'


def _check_mnist_files(raw_folder: str):
    """Name any raw file of the wrong size or with a wrong header: torchvision would fail on it
    with a bare traceback or a message that blames something else."""
    for name, size in MNIST_RAW_FILES.items():
        path = os.path.join(raw_folder, name)
        if not os.path.exists(path):
            continue
        if os.path.getsize(path) != size:
            raise DataError(f'{path} is truncated or corrupt ({os.path.getsize(path):,} bytes, '
                            f'expected {size:,}); {FIX_MNIST}')
        expected = MNIST_HEADERS[name]
        with open(path, 'rb') as f:
            header = tuple(int.from_bytes(f.read(4), 'big') for _ in expected)
        if header != expected:
            raise DataError(f'{path} has a corrupt header ({" ".join(map(str, header))}, expected '
                            f'{" ".join(map(str, expected))}: magic number, count, size); {FIX_MNIST}')


def _check_labels(labels: torch.Tensor, path: str):
    """Labels must be classes 0..9: a corrupt byte would otherwise crash training mid-run."""
    bad = ((labels < 0) | (labels >= NUM_CLASSES)).nonzero()
    if bad.numel():
        index = int(bad[0])
        raise DataError(f'{path} holds label {int(labels[index])} at image {index}, outside '
                        f'0..{NUM_CLASSES - 1}: the file is corrupt')


def load_mnist(root: str) -> tuple[DeviceDataset, DeviceDataset]:
    """MNIST train and test sets (CPU), downloading to <root>/MNIST/raw when missing."""
    from torchvision import datasets

    raw_folder = os.path.join(root, 'MNIST', 'raw')
    _check_mnist_files(raw_folder)
    try:
        with _removed_if_failed([*missing_ancestors(root), os.path.join(root, 'MNIST'), raw_folder]):
            train = datasets.MNIST(root, train=True, download=True)
            test = datasets.MNIST(root, train=False, download=True)
    except Exception as exc:  # no network, a blocked host, a half-written archive...
        expected = ', '.join(MNIST_RAW_FILES)
        raise DataError(
            f'MNIST is not in {raw_folder}/ and could not be downloaded ({type(exc).__name__}: '
            f'{_first_line(exc)}). Put the four files ({expected}) in {raw_folder}/, '
            f'or pass --data_root pointing at the folder that holds MNIST/raw/') from None
    train, test = _to_dataset(train.data, train.targets), _to_dataset(test.data, test.targets)
    _check_labels(train.labels, os.path.join(raw_folder, 'train-labels-idx1-ubyte'))
    _check_labels(test.labels, os.path.join(raw_folder, 't10k-labels-idx1-ubyte'))
    return train, test


def load_cifar10(root: str) -> tuple[DeviceDataset, DeviceDataset]:
    """CIFAR-10 train and test sets (CPU), images as (N, 3, 32, 32) uint8."""
    from torchvision import datasets

    folder = os.path.join(root, CIFAR_FOLDER)
    try:
        with _removed_if_failed([*missing_ancestors(root), folder, os.path.join(root, CIFAR_ARCHIVE)]):
            train = datasets.CIFAR10(root, train=True, download=True)
            test = datasets.CIFAR10(root, train=False, download=True)
    except Exception as exc:
        raise DataError(
            f'CIFAR-10 is not in {folder}/ (or is corrupt) and could not be downloaded '
            f'({type(exc).__name__}: {_first_line(exc)}). Download {CIFAR_ARCHIVE} from '
            f'https://www.cs.toronto.edu/~kriz/cifar.html, extract it into {root}/ so that '
            f'{folder}/ holds {", ".join(CIFAR_FILES)}, or pass --data_root') from None
    train = _to_dataset(torch.as_tensor(train.data).permute(0, 3, 1, 2), train.targets)
    test = _to_dataset(torch.as_tensor(test.data).permute(0, 3, 1, 2), test.targets)
    _check_labels(train.labels, os.path.join(folder, 'data_batch_*'))
    _check_labels(test.labels, os.path.join(folder, 'test_batch'))
    return train, test


@contextlib.contextmanager
def _removed_if_failed(paths):
    """On an exception, delete whichever of `paths` did not exist before (a failed download).

    A mistyped --data_root must not leave a new folder tree, or a half-downloaded archive,
    behind. Only paths that this attempt created are touched; list a folder before its contents.
    """
    created = [path for path in paths if not os.path.lexists(path)]
    try:
        yield
    except BaseException:
        for path in created:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else 'no message'


def _to_dataset(images, labels) -> DeviceDataset:
    return DeviceDataset(torch.as_tensor(images, dtype=torch.uint8).contiguous(),
                         torch.as_tensor(labels, dtype=torch.long))


def synthetic_dataset(image_shape: tuple, train_size: int, test_size: int) -> tuple[DeviceDataset, DeviceDataset]:
    """Random uint8 images of the given shape whose label is learnable: each class has its own
    random template, and an image is its class template plus noise. Fixed by SYNTHETIC_DATA_SEED."""
    generator = torch.Generator().manual_seed(SYNTHETIC_DATA_SEED)
    templates = torch.rand((NUM_CLASSES, *image_shape), generator=generator) * 255

    def draw(n):
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
        noise = torch.randn((n, *image_shape), generator=generator) * 60
        images = (templates[labels] + noise).clamp_(0, 255).to(torch.uint8)
        return DeviceDataset(images, labels)

    return draw(train_size), draw(test_size)


# ---------------------------------------------------------------------------------------------
# Device-side transforms
# ---------------------------------------------------------------------------------------------

def mnist_to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """ToTensor: (B, 28, 28) uint8 -> (B, 1, 28, 28) float32 in [0, 1]."""
    return images_u8.unsqueeze(1).float().div_(255)


class CifarTransform:
    """ToTensor + Normalize, and for training RandomCrop(32, padding=4) + RandomHorizontalFlip,
    batched on the device. Holds the mean/std and the index helpers for one device."""

    def __init__(self, device):
        self.mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)
        self.arange = torch.arange(CIFAR_IMAGE_SIZE, device=device)

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        return images_u8.float().div_(255).sub_(self.mean).div_(self.std)

    def augment(self, images_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop of the zero-padded image and random flip, as one gather. (B, 3, 32, 32)."""
        batch = images_u8.shape[0]
        pad = CIFAR_CROP_PADDING
        padded = torch.nn.functional.pad(images_u8, (pad, pad, pad, pad))
        device = images_u8.device
        # torchvision's RandomCrop: top and left uniform in 0..2*pad; the flip is a coin toss.
        offsets = torch.randint(0, 2 * pad + 1, (2, batch, 1), device=device, generator=generator)
        flip = torch.rand((batch, 1), device=device, generator=generator) < 0.5
        rows = self.arange + offsets[0]                                           # (B, 32)
        cols = torch.where(flip, CIFAR_IMAGE_SIZE - 1 - self.arange, self.arange) + offsets[1]
        batch_index = torch.arange(batch, device=device)[:, None, None]
        cropped = padded[batch_index, :, rows[:, :, None], cols[:, None, :]]     # (B, 32, 32, 3)
        return cropped.permute(0, 3, 1, 2)

    def train_batch(self, images_u8, generator):
        return self.normalize(self.augment(images_u8, generator))
