"""The MNIST experiment (Figures 1 and 2): data on the device, the input and output networks A
and B (the release's files, or drawn and pretrained), the ODE block of each seed, and --evaluate.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import models

from . import data, distributed, embeddings
from .checkpoints import load_checkpoint
from .errors import EXIT_DIVERGED
from .evaluation import eval_chunk, evaluate_checkpoint
from .faults import fault_point
from .gate import pick_device
from .random_state import seed_everything
from .training import Experiment

DATASET = 'MNIST'
# Evaluation batch caps per device type: on a 2-core CPU, chunks of ~2,000 images ran faster
# than 10,000. Results never depend on them.
EVAL_CHUNK = {'cpu': 2000, 'cuda': 10_000}
PARTS = ('input_net', 'ode_block', 'output_net')


def first_training_images(train_set, count: int):
    """train_classif is measured on the first `count` training images, in dataset order."""
    images, labels = train_set.images[:count], train_set.labels[:count]
    return lambda generator: (images, labels, data.mnist_to_float)


def build_embedding(config) -> tuple[nn.Module, nn.Module, dict]:
    """A and B, and the record of where they came from, without touching the global RNG.

    From the release's files in --embedding_dir when both exist for (--in_channels, --pretrain),
    as the release did; otherwise drawn from --embedding_seed (and pretrained later if p > 0).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.embedding_seed)
        input_net = models.mnist_input_network(config.in_channels)
        output_net = models.mnist_output_network(config.in_channels)
    paths = embeddings.for_run(config)
    if paths is None:
        return input_net, output_net, {'embedding_seed': config.embedding_seed,
                                       'embedding_files': None, 'embedding_sha256': None}
    for net, path in zip((input_net, output_net), paths):
        net.load_state_dict(embeddings.load_state(path, net.state_dict()))
    return input_net, output_net, {'embedding_seed': None, **embeddings.describe(paths)}


def describe_embedding(config, record) -> tuple[str, str | None]:
    """The line saying where A and B came from, and a warning when the run does not start where
    the paper's runs of this configuration started."""
    if record['embedding_files']:
        origin = ('match the release\'s' if embeddings.is_release(record)
                  else 'DIFFER from the release\'s: not the shipped files')
        return (f'embedding: loaded the release embedding {" and ".join(record["embedding_files"])} '
                f'from {config.embedding_dir} (SHA-256 {origin}); no pretraining'), None
    none = config.embedding_dir == embeddings.NO_EMBEDDING_DIR
    where = ('--embedding_dir none' if none else
             f'no release files for {config.in_channels} channels, {config.pretrain} passes in '
             f'{config.embedding_dir}/')
    passes = f', then {config.pretrain} pretraining pass(es)' if config.pretrain else ''
    line = f'embedding: drawn from --embedding_seed {record["embedding_seed"]}{passes} ({where})'
    if none or not embeddings.release_ships(config.in_channels, config.pretrain):
        return line, None
    return line, (f'WARNING: this run does NOT start where the paper\'s runs started: they loaded '
                  f'the release\'s {" and ".join(embeddings.file_names(config.in_channels, config.pretrain))}, '
                  f'which are not in {config.embedding_dir}/. Fetch them with '
                  f'{embeddings.DOWNLOAD_COMMAND}, or pass --embedding_dir <folder holding them>')


class PretrainingStopped(Exception):
    """Pretraining diverged (exit 3) or was interrupted (130/143); nothing was written."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def pretrain(net: models.MNISTODENet, train_set, config, dist, stop):
    """Train A followed by B (no ODE block) with plain SGD at a constant rate, then freeze them.

    Pretraining is not resumable: a few passes of two small networks, cheaper to redo than to
    save. On SIGINT/SIGTERM it stops after the current batch and says that nothing was saved.
    """
    stop.defer()  # from here a signal stops after the current batch, with the line below
    device = train_set.labels.device
    embedding = nn.Sequential(net.input_net, net.output_net)
    optimizer = torch.optim.SGD(embedding.parameters(), lr=config.pretrain_lr)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.embedding_seed)
    finite = torch.ones((), dtype=torch.bool, device=device)
    embedding.train()
    for epoch in range(config.pretrain):
        permutation = torch.randperm(len(train_set), device=device, generator=generator)
        for batch in permutation.split(config.batch_size):
            loss = F.cross_entropy(embedding(data.mnist_to_float(train_set.images[batch])),
                                   train_set.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            finite &= torch.isfinite(loss)
            fault_point('pretraining')
            if stop.requested:
                raise PretrainingStopped(
                    f'interrupted by {stop.name} during pretraining pass {epoch + 1}: nothing was '
                    f'saved (pretraining is not resumable); rerun the same command', stop.exit_status)
        if not bool(finite):  # one sync per pass
            raise PretrainingStopped(
                f'error: pretraining diverged (non-finite loss) in pass {epoch + 1} at --pretrain_lr '
                f'{config.pretrain_lr}; lower it. Nothing was written', EXIT_DIVERGED)
        dist.print(f'pretraining pass {epoch + 1}/{config.pretrain} done')
    # Every rank pretrained the same way; rank 0's result is made the one truth all the same.
    dist.broadcast_module(embedding)


def build_network(config, resume_state) -> tuple[models.MNISTODENet, dict]:
    """The ODE block of each seed (with several, stacked side by side), then A and B.

    Each seed's block is drawn first after seeding with it, exactly as the single run of that
    seed draws it. On --resume, A, B, the blocks and the record of A and B's origin come from
    the resume state instead.
    """
    blocks = []
    for seed in config.seeds or [config.seed]:
        seed_everything(seed)
        blocks.append(models.ResidualODEBlock(config.model, config.in_channels, config.dim_int, config.layers,
                                              config.method, config.time_weights, config.integrator))
    if resume_state is None:
        input_net, output_net, embedding = build_embedding(config)
    else:
        input_net, output_net = None, None  # drawn, then overwritten by the resume state
        embedding = {key: value for key, value in resume_state['facts'].items() if key.startswith('embedding_')}
    block = blocks[0] if len(blocks) == 1 else models.stack_members(blocks)
    net = models.MNISTODENet(config.model, config.in_channels, config.dim_int, config.layers, config.method,
                             config.time_weights, config.integrator, input_net, output_net, block)
    return net, embedding


def build_experiment(started) -> Experiment:
    """Data on the device, the network (A and B from the release's files, drawn, or pretrained),
    and what the run's record states."""
    config, device, dist = started.config, started.device, started.dist
    train_set, test_set = (part.to(device) for part in data.load_datasets(config, dist))
    net, embedding = build_network(config, started.resume_state)
    if started.resume_state is None:
        line, warning = describe_embedding(config, embedding)
        dist.print(line)
        if warning:
            dist.print(warning, file=sys.stderr)
        if embedding['embedding_files'] is None and config.pretrain > 0:
            pretrain(net.to(device), train_set, config, dist, started.stop)
    net = net.to(device)
    net.freeze_embedding()
    block, members = net.ode_block, len(started.members)
    num_parameters = models.count_trainable_parameters(block) // members  # per member
    seeds = f'seeds {" ".join(map(str, config.seeds))} side by side' if config.seeds else f'seed {config.seed}'
    dist.print(f'{config.model} ODE block: {config.layers} steps of {config.method}, '
               f'{config.time_weights} time weights, {num_parameters:,} trainable parameters; '
               f'{seeds}, device {device}')
    return Experiment(
        dataset=DATASET, model=net,
        parts={'input_net': net.input_net, 'ode_block': block, 'output_net': net.output_net},
        parameters=list(block.parameters()), train_set=train_set, test_set=test_set,
        train_transform=lambda images, generator: data.mnist_to_float(images),
        eval_transform=data.mnist_to_float,
        train_eval_sample=first_training_images(train_set, config.train_error_images),
        eval_chunk=eval_chunk(EVAL_CHUNK, device, config.test_batch_size),
        facts={'num_parameters': num_parameters, **embedding, **({'batched_with': members} if config.seeds else {})},
        training_forward=dist.wrap(net, config.compile), members=members,
        member_parts=lambda k: {'input_net': net.input_net.state_dict(),
                                'ode_block': models.member_state_dict(block, k),
                                'output_net': net.output_net.state_dict()},
        freeze_members=lambda ks: models.zero_member_gradients(block, ks))


def evaluate(config) -> int:
    """--evaluate: rebuild the checkpoint's network, print its test error, write nothing."""
    device = pick_device(config)
    checkpoint, stored = load_checkpoint(config.evaluate, DATASET, PARTS, config.device)
    _, test_set = data.load_datasets(config, distributed.SINGLE)
    net = models.MNISTODENet(stored.model, stored.in_channels, stored.dim_int, stored.layers,
                             stored.method, stored.time_weights).to(device)
    return evaluate_checkpoint(net, checkpoint, stored, {name: getattr(net, name) for name in PARTS},
                               test_set.to(device), data.mnist_to_float,
                               eval_chunk(EVAL_CHUNK, device, config.test_batch_size), config.evaluate)
