"""Figures 1 and 2: train a residual ODE block between frozen input and output networks on MNIST.

    python MNIST_experiments.py --layers 5 --epochs 1 --data_root ../shared/data --save smoke.pkl

Writes the training curves to MNIST_experiments/<save> (the release's pickle schema) and the
best model to MNIST_checkpoint/<save name>.pth. See README.md for every flag and file.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import data
import distributed
import embeddings
import engine
import models
import runstate

DATASET = 'MNIST'
MNIST_IMAGE_SHAPE = (28, 28)
# Evaluation batch caps per device type: on a 2-core CPU, chunks of ~2,000 images ran faster
# than 10,000. Results never depend on them.
EVAL_CHUNK = {'cpu': 2000, 'cuda': 10_000}
# The release measured train_classif on the first batch of an unshuffled training loader whose
# batch size was its --test_batch_size: 10,000 by its script's default, 1,000 in its stored runs
# (every stored value is a multiple of 0.001, and equals this project's error on the first 1,000
# images from the same embedding files).
TRAIN_ERROR_IMAGES = 10_000


def get_args_parser():
    parser = cli.OneLineArgumentParser(
        description='Train an RKHS or SHL residual ODE block on MNIST (Figures 1 and 2).')
    cli.add_common_arguments(parser, layers=20, epochs=30, lr_init=0.5, decay_steps=[25],
                             decay_rate=0.1, folder_prefix=DATASET, release_tbs_is_test_batch_size=False)
    parser.add_argument('--train_error_images', type=int, default=TRAIN_ERROR_IMAGES,
                        help='train_classif is the error on the first N training images (default '
                             f'{TRAIN_ERROR_IMAGES:,}, the release script\'s; its stored runs used '
                             '1,000, which reproduce.py uses)')
    parser.add_argument('-tbs', dest='release_tbs', type=int, default=None, metavar='N',
                        help='the release\'s option, with its meaning: --test_batch_size N and '
                             '--train_error_images N together (the release measured the training '
                             'error on its first evaluation batch)')
    parser.add_argument('--in_channels', '-in', type=int, default=32,
                        help='channels C of the ODE state (C x 5 x 5) (default 32)')
    parser.add_argument('--dim_int', type=int, default=32,
                        help='channels of the residual\'s hidden layer (default 32)')
    parser.add_argument('--pretrain', '-p', type=int, default=0,
                        help='pretraining passes of the input and output networks; 0: none. With '
                             'release embedding files, picks the p-pass files instead (default 0)')
    parser.add_argument('--pretrain_lr', type=float, default=0.01,
                        help='learning rate of that pretraining (default 0.01; the release used 1.0, '
                             'which diverges, see README)')
    parser.add_argument('--method', default='midpoint', choices=models.METHODS,
                        help='fixed-step scheme (torchdiffeq\'s; rk4 is the 3/8 rule) (default midpoint)')
    parser.add_argument('--time_weights', default='release', choices=models.TIME_WEIGHTS,
                        help='release: the paper\'s code, which made its figures; linear: exact '
                             'interpolation of the N+1 nodes (default release)')
    parser.add_argument('--integrator', default='fixed', choices=models.INTEGRATORS,
                        help='fixed: precomputed-schedule loop (fast); torchdiffeq: plain odeint, as '
                             'the release (default fixed)')
    parser.add_argument('--embedding_dir', default=embeddings.DEFAULT_PATH,
                        help='folder of the release\'s embedding files {C}channels_{p}pass_'
                             '{input,output}_embedding.pt; A and B are loaded from them and not '
                             'pretrained. Given explicitly, a missing or unusable file is an error; '
                             'the default folder may lack them, and the run then draws A and B and '
                             'says so. "none" never loads them (default: '
                             f'{embeddings.DEFAULT_DIR} in the repository; python embeddings.py '
                             '--download fetches them)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None, metavar='S',
                        help='train these K seeds at once, as one batched model: member k is the '
                             'run --seed Sk would make (its own block, data order, curves, '
                             'checkpoint and pickle <save stem>_s<Sk>.pkl); A and B are shared. '
                             'Excludes --seed')
    parser.add_argument('--embedding_seed', type=int, default=None,
                        help='seed of the input/output networks\' initialisation and pretraining '
                             'when no release files are loaded (default: --seed, or the first of '
                             '--seeds); runs sharing it share their embedding')
    return parser


def apply_release_tbs(args):
    """-tbs N, the release's spelling, sets both quantities its --test_batch_size decided."""
    if args.release_tbs is None:
        return
    given = cli.given_flags(args)
    for name in ('train_error_images', 'test_batch_size'):
        if name in given and getattr(args, name) != args.release_tbs:
            raise cli.UsageError(f'-tbs {args.release_tbs} (the release\'s option, which sets '
                                 f'--test_batch_size and --train_error_images) contradicts '
                                 f'--{name} {getattr(args, name)}')
        setattr(args, name, args.release_tbs)
    args._given = (given - {'release_tbs'}) | {'train_error_images', 'test_batch_size'}
    args.release_tbs = None


def validate_args(args):
    apply_release_tbs(args)
    cli.validate_common_args(args, DATASET, data.MNIST_TRAIN_SIZE)
    if args.evaluate is not None:
        return  # the network comes from the checkpoint: checked when it is loaded
    if args.train_error_images < 1:
        raise cli.UsageError(f'--train_error_images must be >= 1, got {args.train_error_images}')
    if args.pretrain < 0:
        raise cli.UsageError(f'--pretrain must be >= 0, got {args.pretrain}')
    cli.positive_float32('pretrain_lr', args.pretrain_lr)
    if args.embedding_seed is not None and not 0 <= args.embedding_seed < 2 ** 63:
        raise cli.UsageError(f'--embedding_seed must be in [0, 2^63), got {args.embedding_seed}')
    if args.seeds is not None:
        _validate_seeds(args)
    check_network(args, len(args.seeds or [None]), training=True)


# The arguments that decide the network (checked in every checkpoint and resume state).
NETWORK_ARGS = ('model', 'in_channels', 'dim_int', 'layers', 'method', 'time_weights')


def check_network(args, members: int = 1, training: bool = False):
    """The network's sizes are >= 1 and it fits in memory: a --layers 100000000 is refused here,
    in one line, before anything is allocated (building its time schedule alone would take
    hours). Applies to the command line, and to the arguments a checkpoint or state holds."""
    for name in ('layers', 'in_channels', 'dim_int'):
        if getattr(args, name) < 1:
            raise cli.UsageError(f'--{name} must be >= 1, got {getattr(args, name)}')
    batch = args.batch_size if training else 0  # the global batch: an over-estimate under torchrun
    cli.check_fits_in_memory(
        f'--layers {args.layers} --in_channels {args.in_channels} --dim_int {args.dim_int}'
        + (f' with {members} seeds' if members > 1 else ''),
        members * block_training_bytes(args, batch), cli.pick_device(args))


def block_training_bytes(args, batch: int) -> int:
    """A lower bound of the bytes one member's ODE block takes in training: its parameters and
    buffers, as many gradients, the activations a batch of `batch` images keeps for the backward
    pass (the state and the hidden layer at every evaluation), and the time schedule's Python
    objects (about 200 bytes per evaluation). The parameter count is read off the residual type
    itself, built on the meta device (nothing allocated) with 1 and 2 steps."""
    field = models.residual_type(args.model)
    with torch.device('meta'):
        sizes = [sum(t.numel() for t in (*module.parameters(), *module.buffers()))
                 for module in (field(args.in_channels, args.dim_int, steps, 'linear') for steps in (1, 2))]
    per_node = sizes[1] - sizes[0]
    tensors = sizes[0] + per_node * (args.layers - 1)
    evaluations = args.layers * len(models.STAGE_FRACTIONS[args.method])
    state = models.MNIST_STATE_SIZE ** 2
    activations = evaluations * batch * (args.in_channels + args.dim_int) * state
    return 4 * (2 * tensors + activations) + 200 * evaluations


def _validate_seeds(args):
    if args.seed is not None:
        raise cli.UsageError('--seeds and --seed exclude each other: give the one seed as --seeds S, '
                             'or train it alone with --seed S')
    if any(not 0 <= seed < 2 ** 63 for seed in args.seeds):
        raise cli.UsageError(f'--seeds must be in [0, 2^63), got {args.seeds}')
    if len(set(args.seeds)) != len(args.seeds):
        raise cli.UsageError(f'--seeds lists a seed more than once: {args.seeds}')
    if distributed.launched_by_torchrun():
        raise cli.UsageError('--seeds is for one process; under torchrun give each process its own '
                             'run, or use reproduce.py')


def load_data(args, dist) -> tuple[data.DeviceDataset, data.DeviceDataset]:
    return engine.load_datasets(args, dist, data.load_mnist, MNIST_IMAGE_SHAPE,
                                (data.MNIST_TRAIN_SIZE, data.MNIST_TEST_SIZE))


def first_training_images(train_set, count: int):
    """train_classif is measured on the first `count` training images, in dataset order."""
    images, labels = train_set.images[:count], train_set.labels[:count]
    return lambda generator: (images, labels, data.mnist_to_float)


def build_embedding(args) -> tuple[nn.Module, nn.Module, dict]:
    """A and B, and the record of where they came from, without touching the global RNG.

    From the release's files in --embedding_dir when both exist for (--in_channels, --pretrain),
    as the release did; otherwise drawn from --embedding_seed (and pretrained later if p > 0).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.embedding_seed)
        input_net = models.mnist_input_network(args.in_channels)
        output_net = models.mnist_output_network(args.in_channels)
    explicit = 'embedding_dir' in cli.given_flags(args)
    paths = embeddings.find(args.embedding_dir, args.in_channels, args.pretrain,
                            required=explicit and embeddings.release_ships(args.in_channels, args.pretrain))
    if paths is None:
        return input_net, output_net, {'embedding_seed': args.embedding_seed,
                                       'embedding_files': None, 'embedding_sha256': None}
    for net, path in zip((input_net, output_net), paths):
        net.load_state_dict(embeddings.load_state(path, net.state_dict()))
    return input_net, output_net, {'embedding_seed': None, **embeddings.describe(paths)}


def describe_embedding(args, record) -> tuple[str, str | None]:
    """The line saying where A and B came from, and a warning when the run does not start where
    the paper's runs of this configuration started."""
    if record['embedding_files']:
        origin = ('match the release\'s' if embeddings.is_release(record)
                  else 'DIFFER from the release\'s: not the shipped files')
        return (f'embedding: loaded the release embedding {" and ".join(record["embedding_files"])} '
                f'from {args.embedding_dir} (SHA-256 {origin}); no pretraining'), None
    none = args.embedding_dir == embeddings.NO_EMBEDDING_DIR
    where = ('--embedding_dir none' if none else
             f'no release files for {args.in_channels} channels, {args.pretrain} passes in '
             f'{args.embedding_dir}/')
    passes = f', then {args.pretrain} pretraining pass(es)' if args.pretrain else ''
    line = f'embedding: drawn from --embedding_seed {record["embedding_seed"]}{passes} ({where})'
    if none or not embeddings.release_ships(args.in_channels, args.pretrain):
        return line, None
    return line, (f'WARNING: this run does NOT start where the paper\'s runs started: they loaded '
                  f'the release\'s {" and ".join(embeddings.file_names(args.in_channels, args.pretrain))}, '
                  f'which are not in {args.embedding_dir}/. Fetch them with python embeddings.py '
                  f'--download, or pass --embedding_dir <folder holding them>')


class PretrainingStopped(Exception):
    """Pretraining diverged (exit 3) or was interrupted (130/143); nothing was written."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def pretrain(net: models.MNISTODENet, train_set, args, dist, stop: runstate.StopRequest):
    """Train A followed by B (no ODE block) with plain SGD at a constant rate, then freeze them.

    Pretraining is not resumable: a few passes of two small networks, cheaper to redo than to
    save. On SIGINT/SIGTERM it stops after the current batch and says that nothing was saved.
    """
    stop.defer()  # from here a signal stops after the current batch, with the line below
    device = train_set.labels.device
    embedding = nn.Sequential(net.input_net, net.output_net)
    optimizer = torch.optim.SGD(embedding.parameters(), lr=args.pretrain_lr)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.embedding_seed)
    finite = torch.ones((), dtype=torch.bool, device=device)
    embedding.train()
    for epoch in range(args.pretrain):
        permutation = torch.randperm(len(train_set), device=device, generator=generator)
        for batch in permutation.split(args.batch_size):
            loss = F.cross_entropy(embedding(data.mnist_to_float(train_set.images[batch])),
                                   train_set.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            finite &= torch.isfinite(loss)
            runstate.fault_point('pretraining')
            if stop.requested:
                raise PretrainingStopped(
                    f'interrupted by {stop.name} during pretraining pass {epoch + 1}: nothing was '
                    f'saved (pretraining is not resumable); rerun the same command', stop.exit_status)
        if not bool(finite):  # one sync per pass
            raise PretrainingStopped(
                f'error: pretraining diverged (non-finite loss) in pass {epoch + 1} at --pretrain_lr '
                f'{args.pretrain_lr}; lower it. Nothing was written', cli.EXIT_DIVERGED)
        dist.print(f'pretraining pass {epoch + 1}/{args.pretrain} done')
    # Every rank pretrained the same way; rank 0's result is made the one truth all the same.
    dist.broadcast_module(embedding)


PARTS = ('input_net', 'ode_block', 'output_net')


def evaluate_only(args) -> int:
    """--evaluate: rebuild the checkpoint's model, print its test error, write nothing."""
    device = cli.pick_device(args)

    def check(stored):
        stored.device = args.device
        check_network(stored)

    checkpoint, stored = engine.load_checkpoint(args.evaluate, DATASET, get_args_parser(),
                                                NETWORK_ARGS, PARTS, check)
    _, test_set = load_data(args, distributed.SINGLE)
    net = models.MNISTODENet(stored.model, stored.in_channels, stored.dim_int, stored.layers,
                             stored.method, stored.time_weights)
    net.to(device)
    parts = {name: getattr(net, name) for name in PARTS}
    return engine.evaluate_checkpoint(net, checkpoint, parts, test_set.to(device), data.mnist_to_float,
                                      engine.eval_chunk(EVAL_CHUNK, device, args.test_batch_size),
                                      args.evaluate)


def check_stored_args(stored):
    """The arguments a resume state holds, checked as a command line's are."""
    cli.check_stored_args(get_args_parser(), vars(stored), NETWORK_ARGS)
    stored.evaluate = None
    validate_args(stored)


def build_network(args, resume_state) -> tuple[models.MNISTODENet, dict]:
    """The ODE block of each seed (with several, stacked side by side), then A and B.

    Each seed's block is drawn first after seeding with it, exactly as the single run of that
    seed draws it. On --resume, A, B, the blocks and the record of A and B's origin come from
    the resume state instead.
    """
    seeds = args.seeds or [args.seed]
    blocks = []
    for seed in seeds:
        runstate.seed_everything(seed)
        blocks.append(models.ResidualODEBlock(args.model, args.in_channels, args.dim_int, args.layers,
                                              args.method, args.time_weights, args.integrator))
    if resume_state is None:
        input_net, output_net, embedding = build_embedding(args)
    else:
        input_net, output_net = None, None  # drawn, then overwritten by the resume state
        embedding = {key: value for key, value in resume_state['facts'].items()
                     if key.startswith('embedding_')}
    block = blocks[0] if len(blocks) == 1 else models.stack_members(blocks)
    net = models.MNISTODENet(args.model, args.in_channels, args.dim_int, args.layers, args.method,
                             args.time_weights, args.integrator, input_net, output_net, block)
    return net, embedding


def build_experiment(started: engine.Started) -> engine.Experiment:
    """Data on the device, the network (A and B from the release's files, drawn, or pretrained),
    and what the run's record states."""
    args, device, dist = started.args, started.device, started.dist
    if args.embedding_seed is None:
        args.embedding_seed = args.seeds[0] if args.seeds else args.seed
    train_set, test_set = load_data(args, dist)
    train_set, test_set = train_set.to(device), test_set.to(device)
    net, embedding = build_network(args, started.resume_state)
    if started.resume_state is None:
        line, warning = describe_embedding(args, embedding)
        dist.print(line)
        if warning:
            dist.print(warning, file=sys.stderr)
        if embedding['embedding_files'] is None and args.pretrain > 0:
            pretrain(net.to(device), train_set, args, dist, started.stop)
    net = net.to(device)
    net.freeze_embedding()
    block, members = net.ode_block, len(started.members)
    num_parameters = models.count_trainable_parameters(block) // members  # per member
    seeds = f'seeds {" ".join(map(str, args.seeds))} side by side' if args.seeds else f'seed {args.seed}'
    dist.print(f'{args.model} ODE block: {args.layers} steps of {args.method}, '
               f'{args.time_weights} time weights, {num_parameters:,} trainable parameters; '
               f'{seeds}, device {device}')
    return engine.Experiment(
        dataset=DATASET, model=net,
        parts={'input_net': net.input_net, 'ode_block': block, 'output_net': net.output_net},
        parameters=list(block.parameters()), train_set=train_set, test_set=test_set,
        train_transform=lambda images, generator: data.mnist_to_float(images),
        eval_transform=data.mnist_to_float, train_eval_sample=first_training_images(train_set, args.train_error_images),
        eval_chunk=engine.eval_chunk(EVAL_CHUNK, device, args.test_batch_size),
        facts={'num_parameters': num_parameters, **embedding,
               **({'batched_with': members} if args.seeds else {})},
        training_forward=dist.wrap(net, args.compile), members=members,
        member_parts=lambda k: {'input_net': net.input_net.state_dict(),
                                'ode_block': models.member_state_dict(block, k),
                                'output_net': net.output_net.state_dict()},
        freeze_members=lambda ks: models.zero_member_gradients(block, ks))


@cli.cli_errors
def main(args) -> int:
    validate_args(args)
    if args.evaluate:
        return evaluate_only(args)
    try:
        with engine.start_run(args, DATASET, check_stored_args) as started:
            return engine.fit(build_experiment(started), started)
    except PretrainingStopped as exc:  # the claim has removed what it created: nothing is left
        print(exc, file=sys.stderr if exc.status == cli.EXIT_DIVERGED else sys.stdout)
        return exc.status


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))
