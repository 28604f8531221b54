"""Figure 3: train a ResNet18-layout network of RKHS or SHL residual blocks on CIFAR-10.

    python CIFAR_experiments.py --model SHL --layers 10 --save SHL_l10.pkl

Writes the training curves to CIFAR_experiments/<save> (the release's pickle schema) and the
best model to CIFAR_checkpoint/<save name>.pth. See README.md for every flag and file.
"""
from __future__ import annotations

import sys

import torch

import cli
import data
import distributed
import engine
import models
import runstate

DATASET = 'CIFAR10'
FOLDER_PREFIX = 'CIFAR'  # CIFAR_experiments/, CIFAR_checkpoint/, as in the release
CIFAR_IMAGE_SHAPE = (3, 32, 32)
# Evaluation batch caps per device type (results never depend on them).
EVAL_CHUNK = {'cpu': 500, 'cuda': 2500}


def get_args_parser():
    parser = cli.OneLineArgumentParser(
        description='Train a ResNet18-layout network of RKHS or SHL blocks on CIFAR-10 (Figure 3).')
    cli.add_common_arguments(parser, layers=10, epochs=300, lr_init=3e-3, decay_steps=[260],
                             decay_rate=0.1, folder_prefix=FOLDER_PREFIX)
    parser.add_argument('--channels_last', action='store_true',
                        help='channels_last memory format (a GPU speed option; same maths)')
    parser.add_argument('--amp', action='store_true',
                        help='bfloat16 autocast of the training forward (CUDA or CPU); off by '
                             'default since it changes results')
    parser.add_argument('--sync_bn', action='store_true',
                        help='under torchrun, synchronise BatchNorm statistics across processes '
                             '(default off: each process normalises its own share of the batch)')
    return parser


def load_data(args, dist):
    return engine.load_datasets(args, dist, data.load_cifar10, CIFAR_IMAGE_SHAPE,
                                (data.CIFAR_TRAIN_SIZE, data.CIFAR_TEST_SIZE))


def random_training_images(train_set, transform):
    """train_classif, as in the release: 10,000 training images drawn anew at each evaluation
    and passed through the training augmentation."""
    def sample(generator):
        index = torch.randperm(len(train_set), device=train_set.labels.device, generator=generator)
        index = index[:engine.TRAIN_EVAL_SIZE]
        return transform.train_batch(train_set.images[index], generator), train_set.labels[index], \
            (lambda images: images)
    return sample


def make_forward(net, args, device):
    """The network as the training step calls it, with the optional GPU speed options."""
    def forward(images):
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if args.amp:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return net(images).float()
        return net(images)
    return forward


# The arguments that decide the network (checked in every checkpoint and resume state).
NETWORK_ARGS = ('model', 'layers')
# Each block of the third stage keeps about three 256 x 8 x 8 maps per image for the backward pass.
STAGE3_ACTIVATIONS_PER_IMAGE = 3 * 256 * 8 * 8


def check_network(args, training: bool = False):
    """--layers is >= 1 and the network fits in memory: refused here, in one line, before
    anything is allocated. Applies to the command line and to checkpoints and resume states."""
    if args.layers < 1:
        raise cli.UsageError(f'--layers must be >= 1, got {args.layers}')
    cli.check_fits_in_memory(f'--layers {args.layers}', training_bytes(args, training),
                             cli.pick_device(args))


def training_bytes(args, training: bool) -> int:
    """A lower bound of the bytes the network takes in training: its parameters and buffers, as
    many gradients, and the third stage's activations for one batch. The counts are read off
    the network built on the meta device (nothing allocated) with 1 and 2 third-stage blocks."""
    with torch.device('meta'):
        sizes = [sum(t.numel() for t in (*net.parameters(), *net.buffers()))
                 for net in (models.CifarResNet(args.model, layers) for layers in (1, 2))]
    tensors = sizes[0] + (sizes[1] - sizes[0]) * (args.layers - 1)
    batch = args.batch_size if training else 0
    return 4 * (2 * tensors + batch * args.layers * STAGE3_ACTIVATIONS_PER_IMAGE)


def validate_args(args):
    cli.validate_common_args(args, FOLDER_PREFIX, data.CIFAR_TRAIN_SIZE)
    if args.evaluate is None:
        check_network(args, training=True)


def check_stored_args(stored):
    """The arguments a resume state holds, checked as a command line's are."""
    cli.check_stored_args(get_args_parser(), vars(stored), NETWORK_ARGS)
    stored.evaluate = None
    validate_args(stored)


def evaluate_only(args) -> int:
    """--evaluate: rebuild the checkpoint's network, print its test error, write nothing."""
    device = cli.pick_device(args)

    def check(stored):
        stored.device = args.device
        check_network(stored)

    checkpoint, stored = engine.load_checkpoint(args.evaluate, DATASET, get_args_parser(),
                                                NETWORK_ARGS, ('model',), check)
    _, test_set = load_data(args, distributed.SINGLE)
    net = models.CifarResNet(stored.model, stored.layers).to(device)
    transform = data.CifarTransform(device)
    return engine.evaluate_checkpoint(net, checkpoint, {'model': net}, test_set.to(device),
                                      transform.normalize,
                                      engine.eval_chunk(EVAL_CHUNK, device, args.test_batch_size),
                                      args.evaluate)


def build_experiment(started: engine.Started) -> engine.Experiment:
    """Data on the device, the network (with the optional GPU speed options), and its record."""
    args, device, dist = started.args, started.device, started.dist
    train_set, test_set = load_data(args, dist)
    train_set, test_set = train_set.to(device), test_set.to(device)
    runstate.seed_everything(args.seed)
    net = models.CifarResNet(args.model, args.layers)
    if dist.world_size > 1 and args.sync_bn:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    num_parameters = models.count_trainable_parameters(net)
    dist.print(f'{args.model} ResNet, stages [2, 2, {args.layers}, 2], {num_parameters:,} '
               f'trainable parameters; seed {args.seed}, device {device}')
    transform = data.CifarTransform(device)
    return engine.Experiment(
        dataset=DATASET, model=net, parts={'model': net},
        parameters=[p for p in net.parameters() if p.requires_grad],
        train_set=train_set, test_set=test_set,
        train_transform=transform.train_batch, eval_transform=transform.normalize,
        train_eval_sample=random_training_images(train_set, transform),
        eval_chunk=engine.eval_chunk(EVAL_CHUNK, device, args.test_batch_size),
        facts={'num_parameters': num_parameters},
        training_forward=make_forward(dist.wrap(net, args.compile), args, device))


@cli.cli_errors
def main(args) -> int:
    validate_args(args)
    if args.evaluate:
        return evaluate_only(args)
    with engine.start_run(args, FOLDER_PREFIX, check_stored_args) as started:
        return engine.fit(build_experiment(started), started)


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))
