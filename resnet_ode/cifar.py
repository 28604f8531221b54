"""The CIFAR-10 experiment (Figure 3): data on the device with the release's augmentation, the
ResNet18-layout network of RKHS or SHL blocks, and --evaluate."""
from __future__ import annotations

import os

import torch

import models

from . import data, distributed
from .errors import DataError, OneLineArgumentParser
from .evaluation import eval_chunk
from .files import missing_ancestors
from .flags import add_common_arguments
from .gate import DATASET_SIZES, TrainingRules, pick_device, refuse_beyond_memory, tensor_count
from .protocol import CIFAR_TRAIN_ERROR_IMAGES
from .random_state import seed_everything
from .training import Experiment

DATASET = 'CIFAR10'
CIFAR_IMAGE_SHAPE = (3, 32, 32)
CIFAR_FOLDER = 'cifar-10-batches-py'
CIFAR_ARCHIVE = 'cifar-10-python.tar.gz'  # what torchvision downloads into the root
CIFAR_FILES = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
# Per-channel normalisation used by the paper's release (and by kuangliu/pytorch-cifar, where it
# comes from). The std values are not the dataset's exact pixel std; kept as released.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR_CROP_PADDING = 4
CIFAR_IMAGE_SIZE = 32
# Evaluation batch caps per device type (results never depend on them).
EVAL_CHUNK = {'cpu': 500, 'cuda': 2500}
TRAIN_EVAL_SIZE = CIFAR_TRAIN_ERROR_IMAGES  # train_classif's sample, as in the release
# Each block of the third stage keeps about three 256 x 8 x 8 maps per image for the backward pass.
STAGE3_ACTIVATIONS_PER_IMAGE = 3 * 256 * 8 * 8


# ---------------------------------------------------------------------------------------------
# Data: CIFAR-10 on the device, with the release's augmentation batched there
# ---------------------------------------------------------------------------------------------

def load_cifar10(root: str) -> tuple[data.DeviceDataset, data.DeviceDataset]:
    """CIFAR-10 train and test sets (CPU), images as (N, 3, 32, 32) uint8."""
    from torchvision import datasets

    folder = os.path.join(root, CIFAR_FOLDER)
    try:
        with data.removed_if_failed([*missing_ancestors(root), folder, os.path.join(root, CIFAR_ARCHIVE)]):
            train = datasets.CIFAR10(root, train=True, download=True)
            test = datasets.CIFAR10(root, train=False, download=True)
    except Exception as exc:
        raise DataError(
            f'CIFAR-10 is not in {folder}/ (or is corrupt) and could not be downloaded '
            f'({type(exc).__name__}: {data.first_line(exc)}). Download {CIFAR_ARCHIVE} from '
            f'https://www.cs.toronto.edu/~kriz/cifar.html, extract it into {root}/ so that '
            f'{folder}/ holds {", ".join(CIFAR_FILES)}, or pass --data_root') from None
    train = data.to_dataset(torch.as_tensor(train.data).permute(0, 3, 1, 2), train.targets)
    test = data.to_dataset(torch.as_tensor(test.data).permute(0, 3, 1, 2), test.targets)
    data.check_labels(train.labels, os.path.join(folder, 'data_batch_*'))
    data.check_labels(test.labels, os.path.join(folder, 'test_batch'))
    return train, test


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


def load_datasets(config, dist):
    return data.load_datasets(config, dist, load_cifar10, CIFAR_IMAGE_SHAPE, DATASET_SIZES[DATASET])


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def parser() -> OneLineArgumentParser:
    """CIFAR_experiments.py: the release README's protocol (300 epochs, x0.1 at 260)."""
    parser = OneLineArgumentParser(
        prog='CIFAR_experiments.py',
        description='Train a ResNet18-layout network of RKHS or SHL blocks on CIFAR-10 (Figure 3).')
    add_common_arguments(parser, layers=10, epochs=300, lr_init=3e-3, decay_steps=[260],
                         decay_rate=0.1, folder_prefix='CIFAR')
    add = parser.add_argument
    add('--channels_last', action='store_true',
        help='channels_last memory format (a GPU speed option; same maths)')
    add('--amp', action='store_true',
        help='bfloat16 autocast of the training forward (CUDA or CPU); off by default since it '
             'changes results')
    add('--sync_bn', action='store_true',
        help='under torchrun, synchronise BatchNorm statistics across processes (default off: '
             'each process normalises its own share of the batch)')
    return parser


class CifarRules(TrainingRules):
    dataset = DATASET
    network_flags = ('model', 'layers')

    def parser(self):
        return parser()

    def check_size(self, config, training: bool):
        """The network fits in the device's memory."""
        refuse_beyond_memory(f'--layers {config.layers}', training_bytes(config, config.batch_size if training else 0),
                             pick_device(config))


def training_bytes(config, batch: int) -> int:
    """The CIFAR network in training: its tensors, as many gradients, and the third stage's
    activations for one batch."""
    tensors = tensor_count(lambda layers: models.CifarResNet(config.model, layers), config.layers)
    return 4 * (2 * tensors + batch * config.layers * STAGE3_ACTIVATIONS_PER_IMAGE)


RULES = CifarRules()


def random_training_images(train_set, transform):
    """train_classif, as in the release: 10,000 training images drawn anew at each evaluation
    and passed through the training augmentation."""
    def sample(generator):
        index = torch.randperm(len(train_set), device=train_set.labels.device, generator=generator)
        index = index[:TRAIN_EVAL_SIZE]
        return transform.train_batch(train_set.images[index], generator), train_set.labels[index], \
            (lambda images: images)
    return sample


def make_forward(net, config, device):
    """The network as the training step calls it, with the optional GPU speed options."""
    def forward(images):
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if config.amp:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return net(images).float()
        return net(images)
    return forward


def build_experiment(started) -> Experiment:
    """Data on the device, the network (with the optional GPU speed options), and its record."""
    config, device, dist = started.config, started.device, started.dist
    train_set, test_set = (part.to(device) for part in load_datasets(config, dist))
    seed_everything(config.seed)
    net = models.CifarResNet(config.model, config.layers)
    if dist.world_size > 1 and config.sync_bn:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device)
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    num_parameters = models.count_trainable_parameters(net)
    dist.print(f'{config.model} ResNet, stages [2, 2, {config.layers}, 2], {num_parameters:,} '
               f'trainable parameters; seed {config.seed}, device {device}')
    transform = CifarTransform(device)
    return Experiment(
        dataset=DATASET, model=net, parts={'model': net},
        parameters=[p for p in net.parameters() if p.requires_grad],
        train_set=train_set, test_set=test_set,
        train_transform=transform.train_batch, eval_transform=transform.normalize,
        train_eval_sample=random_training_images(train_set, transform),
        eval_chunk=eval_chunk(EVAL_CHUNK, device, config.test_batch_size),
        facts={'num_parameters': num_parameters},
        training_forward=make_forward(dist.wrap(net, config.compile), config, device))


def evaluate(config) -> int:
    """--evaluate: rebuild the checkpoint's network, print its test error, write nothing."""
    from .checkpoint_evaluation import evaluate_checkpoint, load_checkpoint  # only --evaluate needs them
    device = pick_device(config)
    checkpoint, stored = load_checkpoint(config.evaluate, RULES, ('model',), config.device)
    _, test_set = load_datasets(config, distributed.SINGLE)
    net = models.CifarResNet(stored.model, stored.layers).to(device)
    return evaluate_checkpoint(net, checkpoint, stored, {'model': net}, test_set.to(device),
                               CifarTransform(device).normalize,
                               eval_chunk(EVAL_CHUNK, device, config.test_batch_size), config.evaluate)
