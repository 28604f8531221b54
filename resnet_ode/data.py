"""Datasets held on the training device as uint8 tensors, with batched, device-side transforms.

Each dataset is read once through torchvision (its `.data` and `.targets`), moved to the device
as uint8, and turned into float batches there. Every transform reproduces torchvision's exactly:
ToTensor is x / 255 in float32, Normalize is (x - mean) / std, RandomCrop(32, padding=4) draws
both offsets uniformly from 0..8 over a zero-padded image, and RandomHorizontalFlip flips with
probability 1/2. No DataLoader, no workers, no per-image PIL work.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
from dataclasses import dataclass

import torch

from .errors import DataError
from .faults import fault_point
from .files import missing_ancestors
from .gate import DATASET_SIZES

MNIST_TRAIN_SIZE, MNIST_TEST_SIZE = DATASET_SIZES['MNIST']


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

# Official MNIST files, as torchvision lays them out under <root>/MNIST/raw/, with the idx header
# of each: magic number (2051 images, 2049 labels), count, and for images the 28 x 28 size, as
# big-endian 32-bit integers. A file is its header and then one byte per label or pixel, so its
# size follows (47,040,016 bytes for the training images, as the official archives hold; see
# also shared/data/README.md).
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
    for name, expected in MNIST_HEADERS.items():
        path = os.path.join(raw_folder, name)
        if not os.path.exists(path):
            continue
        size = 4 * len(expected) + math.prod(expected[1:])
        if os.path.getsize(path) != size:
            raise DataError(f'{path} is truncated or corrupt ({os.path.getsize(path):,} bytes, '
                            f'expected {size:,}); {FIX_MNIST}')
        with open(path, 'rb') as f:
            header = tuple(int.from_bytes(f.read(4), 'big') for _ in expected)
        if header != expected:
            raise DataError(f'{path} has a corrupt header ({" ".join(map(str, header))}, expected '
                            f'{" ".join(map(str, expected))}: magic number, count, size); {FIX_MNIST}')


def check_labels(labels: torch.Tensor, path: str):
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
        with removed_if_failed([*missing_ancestors(root), os.path.join(root, 'MNIST'), raw_folder]):
            train = datasets.MNIST(root, train=True, download=True)
            test = datasets.MNIST(root, train=False, download=True)
    except Exception as exc:  # no network, a blocked host, a half-written archive...
        expected = ', '.join(MNIST_HEADERS)
        raise DataError(
            f'MNIST is not in {raw_folder}/ and could not be downloaded ({type(exc).__name__}: '
            f'{first_line(exc)}). Put the four files ({expected}) in {raw_folder}/, '
            f'or pass --data_root pointing at the folder that holds MNIST/raw/') from None
    train, test = to_dataset(train.data, train.targets), to_dataset(test.data, test.targets)
    check_labels(train.labels, os.path.join(raw_folder, 'train-labels-idx1-ubyte'))
    check_labels(test.labels, os.path.join(raw_folder, 't10k-labels-idx1-ubyte'))
    return train, test


@contextlib.contextmanager
def removed_if_failed(paths):
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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else 'no message'


def to_dataset(images, labels) -> DeviceDataset:
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



# ---------------------------------------------------------------------------------------------
# A run's datasets
# ---------------------------------------------------------------------------------------------

MNIST_IMAGE_SHAPE = (28, 28)


def load_datasets(config, dist, load_real=load_mnist, image_shape=MNIST_IMAGE_SHAPE,
                  sizes=(MNIST_TRAIN_SIZE, MNIST_TEST_SIZE)) -> tuple[DeviceDataset, DeviceDataset]:
    """A run's train and test sets on the CPU: synthetic images of `image_shape`, or the real
    dataset of load_real(root) (rank 0 downloads first), cut to --subset. MNIST's by default."""
    fault_point('data')
    if config.synthetic:
        n_train, n_test = (min(config.subset or size, size) for size in sizes)
        return synthetic_dataset(image_shape, n_train, n_test)
    if not dist.is_main:
        dist.barrier()  # so that ranks never write the same download at once
    try:
        train, test = load_real(config.data_root)
    finally:
        if dist.is_main:
            dist.barrier()
    if config.subset:
        train, test = train.head(config.subset), test.head(config.subset)
    return train, test
