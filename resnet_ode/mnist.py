"""The MNIST experiment (Figures 1 and 2): data on the device, the input and output networks A
and B (the release's files, or drawn and pretrained), the ODE block of each seed, and --evaluate.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

import models

from . import data, distributed, embeddings
from .errors import OneLineArgumentParser, UsageError
from .evaluation import eval_chunk
from .flags import add_common_arguments
from .gate import (
    SCHEDULE_BYTES_PER_EVALUATION,
    SEED_LIMIT,
    Config,
    TrainingRules,
    at_least,
    check_seed,
    pick_device,
    positive_float32,
    refuse_beyond_memory,
    tensor_count,
)
from .random_state import seed_everything
from .training import Experiment

DATASET = 'MNIST'
# Evaluation batch caps per device type: on a 2-core CPU, chunks of ~2,000 images ran faster
# than 10,000. Results never depend on them.
EVAL_CHUNK = {'cpu': 2000, 'cuda': 10_000}
PARTS = ('input_net', 'ode_block', 'output_net')


# ---------------------------------------------------------------------------------------------
# The command line and its rules
# ---------------------------------------------------------------------------------------------

# The release measured train_classif on the first batch of an unshuffled training loader whose
# batch size was its --test_batch_size: 10,000 by its script's default, 1,000 in its stored runs
# (every stored value is a multiple of 0.001, and equals this project's error on the first 1,000
# images from the same embedding files).
TRAIN_ERROR_IMAGES = 10_000


def parser() -> OneLineArgumentParser:
    """MNIST_experiments.py. Its defaults are the release README's protocol (30 epochs, x0.1 at
    epoch 25); the sweeps run the release's stored protocol (reproduce.py --protocol)."""
    parser = OneLineArgumentParser(
        prog='MNIST_experiments.py',
        description='Train an RKHS or SHL residual ODE block on MNIST (Figures 1 and 2). The '
                    'defaults are the protocol of the release\'s README (30 epochs, x0.1 at epoch '
                    '25); the paper\'s stored runs, and reproduce.py, use 40 epochs, x0.2 at 35 '
                    'and --train_error_images 1000.')
    add_common_arguments(parser, layers=20, epochs=30, lr_init=0.5, decay_steps=[25], decay_rate=0.1,
                         folder_prefix='MNIST', release_tbs_is_test_batch_size=False)
    add = parser.add_argument
    add('--train_error_images', type=int, default=TRAIN_ERROR_IMAGES,
        help='train_classif is the error on the first N training images (default '
             f'{TRAIN_ERROR_IMAGES:,}, the release script\'s; its stored runs used 1,000, which '
             'reproduce.py uses)')
    add('-tbs', dest='release_tbs', type=int, default=None, metavar='N',
        help='the release\'s option, with its meaning: --test_batch_size N and --train_error_images '
             'N together (the release measured the training error on its first evaluation batch)')
    add('--in_channels', '-in', type=int, default=32,
        help='channels C of the ODE state (C x 5 x 5) (default 32)')
    add('--dim_int', type=int, default=32, help='channels of the residual\'s hidden layer (default 32)')
    add('--pretrain', '-p', type=int, default=0,
        help='pretraining passes of the input and output networks; 0: none. With release embedding '
             'files, picks the p-pass files instead (default 0)')
    add('--pretrain_lr', type=float, default=0.01,
        help='learning rate of that pretraining (default 0.01; the release used 1.0, which '
             'diverges, see README)')
    add('--method', default='midpoint', choices=models.METHODS,
        help='fixed-step scheme (torchdiffeq\'s; rk4 is the 3/8 rule) (default midpoint)')
    add('--time_weights', default='release', choices=models.TIME_WEIGHTS,
        help='release: the paper\'s code, which made its figures; linear: exact interpolation of '
             'the N+1 nodes (default release)')
    add('--integrator', default='fixed', choices=models.INTEGRATORS,
        help='fixed: precomputed-schedule loop (fast); torchdiffeq: plain odeint, as the release '
             '(default fixed)')
    add('--embedding_dir', default=embeddings.DEFAULT_PATH,
        help='folder of the release\'s embedding files {C}channels_{p}pass_{input,output}_embedding.pt; '
             'A and B are loaded from them and not pretrained. Given explicitly, a missing or '
             'unusable file is an error; the default folder may lack them, and the run then draws A '
             'and B and says so. "none" never loads them (default: '
             f'{embeddings.DEFAULT_DIR} in the repository; python -m resnet_ode.embeddings --download fetches '
             'them)')
    add('--seeds', type=int, nargs='+', default=None, metavar='S',
        help='train these K seeds at once, as one batched model: member k is the run --seed Sk '
             'would make (its own block, data order, curves, checkpoint and pickle <save '
             'stem>_s<Sk>.pkl); A and B are shared. Excludes --seed')
    add('--embedding_seed', type=int, default=None,
        help='seed of the input/output networks\' initialisation and pretraining when no release '
             'files are loaded (default: --seed, or the first of --seeds); runs sharing it share '
             'their embedding')
    return parser


class MnistRules(TrainingRules):
    dataset = DATASET
    network_flags = ('model', 'in_channels', 'dim_int', 'layers', 'method', 'time_weights')

    def parser(self):
        return parser()

    def normalised(self, config):
        """-tbs N, the release's spelling, sets both quantities its --test_batch_size decided."""
        if config.release_tbs is None:
            return config
        for name in ('train_error_images', 'test_batch_size'):
            if name in config.given and getattr(config, name) != config.release_tbs:
                raise UsageError(f'-tbs {config.release_tbs} (the release\'s option, which sets '
                                 f'--test_batch_size and --train_error_images) contradicts '
                                 f'--{name} {getattr(config, name)}')
        given = (config.given - {'release_tbs'}) | {'train_error_images', 'test_batch_size'}
        return Config(self, {**config.as_dict(), 'train_error_images': config.release_tbs,
                                     'test_batch_size': config.release_tbs, 'release_tbs': None}, given)

    def check_values(self, config):
        super().check_values(config)
        at_least('train_error_images', config.train_error_images, 1)
        at_least('pretrain', config.pretrain, 0)
        at_least('in_channels', config.in_channels, 1)
        at_least('dim_int', config.dim_int, 1)
        positive_float32('pretrain_lr', config.pretrain_lr)
        check_seed('embedding_seed', config.embedding_seed)
        if config.seeds is None:
            return
        from .distributed import launched_by_torchrun
        if config.seed is not None:
            raise UsageError('--seeds and --seed exclude each other: give the one seed as --seeds S, '
                             'or train it alone with --seed S')
        if any(not 0 <= seed < SEED_LIMIT for seed in config.seeds):
            raise UsageError(f'--seeds must be in [0, 2^63), got {" ".join(map(str, config.seeds))}')
        if len(set(config.seeds)) != len(config.seeds):
            raise UsageError(f'--seeds lists a seed more than once: {" ".join(map(str, config.seeds))}')
        if launched_by_torchrun():
            raise UsageError('--seeds is for one process; under torchrun give each process its own '
                             'run, or use reproduce.py')

    def check_size(self, config, training: bool):
        """The ODE blocks (with --seeds, all members side by side) fit in the device's memory."""
        batch = config.batch_size if training else 0  # the global batch: an over-estimate under torchrun
        members = len(config.seeds) if config.seeds and training else 1
        refuse_beyond_memory(f'--layers {config.layers} --in_channels {config.in_channels} --dim_int '
                             f'{config.dim_int}' + (f' with {members} seeds' if members > 1 else ''),
                             members * block_training_bytes(config, batch), pick_device(config))

    def resolved(self, config):
        """The config with --embedding_seed, the seed of a drawn A and B, filled in when not given:
        the run's seed, or the first of --seeds (runs that share it share their embedding)."""
        if config.embedding_seed is not None:
            return config
        return config.replace(embedding_seed=config.seeds[0] if config.seeds else config.seed)


def block_training_bytes(config, batch: int) -> int:
    """One member's ODE block in training: its tensors, as many gradients, the activations a
    batch of `batch` images keeps for the backward pass (the state and the hidden layer at every
    evaluation), and the time schedule's objects."""
    field = models.residual_type(config.model)
    tensors = tensor_count(lambda steps: field(config.in_channels, config.dim_int, steps, 'linear'), config.layers)
    evaluations = config.layers * len(models.STAGE_FRACTIONS[config.method])
    activations = evaluations * batch * (config.in_channels + config.dim_int) * models.MNIST_STATE_SIZE ** 2
    return 4 * (2 * tensors + activations) + SCHEDULE_BYTES_PER_EVALUATION * evaluations


RULES = MnistRules()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

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
            from .pretraining import pretrain  # only a drawn A and B are pretrained
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
    from .checkpoint_evaluation import evaluate_checkpoint, load_checkpoint  # only --evaluate needs them
    device = pick_device(config)
    checkpoint, stored = load_checkpoint(config.evaluate, RULES, PARTS, config.device)
    _, test_set = data.load_datasets(config, distributed.SINGLE)
    net = models.MNISTODENet(stored.model, stored.in_channels, stored.dim_int, stored.layers,
                             stored.method, stored.time_weights).to(device)
    return evaluate_checkpoint(net, checkpoint, stored, {name: getattr(net, name) for name in PARTS},
                               test_set.to(device), data.mnist_to_float,
                               eval_chunk(EVAL_CHUNK, device, config.test_batch_size), config.evaluate)
