"""Train side by side with the release's own script: same start, same batches, step by step.

    OMP_NUM_THREADS=1 python benchmarks/release_side_by_side.py --release /path/to/release/checkout
    OMP_NUM_THREADS=1 python benchmarks/release_side_by_side.py --release /path/to/release/checkout \
        --models SHL --layers 10 --pretrain 3      # Figure 1b's SHL, from the 3-pass embedding files

The release side runs the release's MNIST_experiments.py (commit 54bc56f) itself, in-process
with runpy, from a scratch folder. Only what this comparison needs is patched, for the duration
of the run:
  - torch.load gets weights_only=False (the release's embedding files hold whole modules);
  - every DataLoader gets num_workers=0, and the shuffled training loader draws its batches from
    a given list of permutations instead of its own RandomSampler;
  - RKHS_NODE.train_sgd is wrapped to keep a copy of the block's initial weights, the block, the
    embedding and the first training batch it receives (nothing inside it is changed).
The release script is seeded with torch.manual_seed(seed) before its first line, nothing else.

The project side uses only models.py (ResidualODEBlock, mnist_input_network,
mnist_output_network) and plain PyTorch, and takes the project's training step as
tests/test_reference_loop.py writes it down: images uint8 / 255 as float32, batches = slices of
each epoch's permutation (the last one shorter), F.cross_entropy averaged over the batch, plain
SGD p <- p - lr * grad. Its permutations are the project's: epoch e's is the e-th
torch.randperm(60000, generator=g), g = torch.Generator().manual_seed(permutation seed); the
release is fed the same ones.

Same start: the block starts from the release's initial weights. project_initial_state()
rebuilds them from the seed in plain PyTorch, by drawing in the release's order; the harness
checks that this is bit for bit what the release drew, so that the CI test
(tests/test_release_side_by_side.py) can rebuild the start without the release.

What is reported, for each residual type: the per-step loss of both sides, the first step whose
relative difference exceeds float32 rounding (REL_ROUNDING), the largest relative difference up
to a few steps, and a control that measures how this training amplifies a difference of one
float32 rounding: the project side rerun with its rate moved by one unit in the last place
(0.5 -> 0.5 + 2^-24). Also checked: the data (the release's first batch against uint8 / 255),
the evaluation times of the ODE solve, the draw of the initial weights, and one step (loss and
gradients) of both sides from the same trained weights.

--golden_dir writes tests/golden/release_steps_<MODEL>_l<L>_p<P>.json: the release's first
--golden_steps losses, a signature of its weights after them, and what is needed to rebuild the
same start and batches. The committed ones were made with

    OMP_NUM_THREADS=1 python benchmarks/release_side_by_side.py --release <checkout> \
        --golden_dir tests/golden --golden_steps 60
    OMP_NUM_THREADS=1 python benchmarks/release_side_by_side.py --release <checkout> \
        --models SHL --layers 10 --pretrain 3 --steps 30 --no_control --golden_dir tests/golden --golden_steps 30

Measured (seed 21, 470 steps = 2 epochs, torch 2.14.1, one thread of a 2-core AMD EPYC VM):
data, initial weights, embedding and evaluation times equal bit for bit. SHL: losses
bit-identical for 36 steps, within 2.2e-7 relative up to step 340, first beyond 1e-6 at step
341; weights within 4e-7 up to step 300. RKHS: bit-identical for 10 steps, within 2.2e-7 up to
step 125, first beyond 1e-6 at step 126; weights within 5.3e-6 at step 100. In both, the control
(the project against itself with the rate moved by one unit in the last place) leaves rounding
at the same point (SHL 337, RKHS 126) and reaches the same size afterwards (1e-2 to 1e-1 in the
loss, 4e-3 to 1e-2 in the weights): the loss starts to fall there and this SGD amplifies any
float32 difference. From the same trained weights, one step of the two sides agrees to 1e-7
(loss) and 4e-7 (SHL) / 1.4e-6 (RKHS) (gradients), both sides being as far from a float64 step.
SHL L=10 from the 3-pass files (same seed and steps): the loss stays within 2.7e-7 relative for
all 470 steps (bit-identical for 1), the weights within 6.0e-7; the control never leaves
rounding either (within 2.7e-7 in the loss). Its loss starts at 0.117 (the embedding is already
trained) and has no steep fall in these 2 epochs, the phase where the L=5 runs amplify rounding.

Exit status: 0 done, 2 a missing or wrong --release checkout, MNIST or embedding folder.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import io
import json
import math
import os
import runpy
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import models
from resnet_ode import files

RELEASE_COMMIT = '54bc56f'
RELEASE_FILES = ('MNIST_experiments.py', 'RKHS_NODE.py')
TRAIN_SIZE = 60_000
LAYERS, CHANNELS, PRETRAIN = 5, 32, 0
BATCH_SIZE, LR = 256, 0.5
METHOD = 'midpoint'
STEPS_PER_EPOCH = math.ceil(TRAIN_SIZE / BATCH_SIZE)  # 235
DEFAULT_SEED = 21
# Two float32 results of the same maths computed in a different order differ by a few units in
# the last place, 2^-23 = 1.2e-7 relative each: 1e-6 is "equal up to float32 rounding".
REL_ROUNDING = 1e-6
REPORT_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 235, 300, 400, 470)
# One unit in the last place of the rate 0.5 in float32 (the control's perturbation).
LR_ONE_ULP = LR + 2.0 ** -24
EMBEDDING_CLASSES = [nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Flatten, nn.Linear]


class Refused(Exception):
    """A missing or wrong input: one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Inputs shared by both sides
# ---------------------------------------------------------------------------------------------

def default_mnist_root() -> str:
    return os.environ.get('MNIST_DATA_ROOT') or os.path.join(os.path.dirname(REPO), 'shared', 'data')


def _read_idx(path: str, header: int) -> np.ndarray:
    with open(path, 'rb') as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def read_mnist_train(root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 60,000 training images (uint8, (N, 28, 28)) and labels (int64) from MNIST/raw."""
    raw = os.path.join(root, 'MNIST', 'raw')
    images_path = os.path.join(raw, 'train-images-idx3-ubyte')
    labels_path = os.path.join(raw, 'train-labels-idx1-ubyte')
    for path in (images_path, labels_path):
        if not os.path.isfile(path):
            raise Refused(f'real MNIST: {path} is missing (give --mnist_root, the folder holding MNIST/raw)')
    images = torch.from_numpy(_read_idx(images_path, 16).reshape(TRAIN_SIZE, 28, 28).copy())
    labels = torch.from_numpy(_read_idx(labels_path, 8).astype(np.int64))
    return images, labels


def embedding_paths(directory: str, channels: int = CHANNELS, passes: int = PRETRAIN) -> tuple[str, str]:
    paths = tuple(os.path.join(directory, f'{channels}channels_{passes}pass_{part}_embedding.pt')
                  for part in ('input', 'output'))
    for path in paths:
        if not os.path.isfile(path):
            raise Refused(f'the release\'s embedding file {path} is missing (give --embedding_dir)')
    return paths


def sha256(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_embedding_state(path: str) -> dict:
    """The state dict of the nn.Sequential a release embedding file holds, loaded with
    weights_only=True and the six torch.nn classes those files use allowed (no code runs)."""
    import warnings
    with torch.serialization.safe_globals(EMBEDDING_CLASSES), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        content = torch.load(path, map_location='cpu', weights_only=True)
    return content['model'].state_dict()


def project_embedding(directory: str, pretrain: int = PRETRAIN) -> tuple[nn.Module, nn.Module]:
    """A and B of models.py, holding the release files' weights, frozen in eval mode."""
    nets = (models.mnist_input_network(CHANNELS), models.mnist_output_network(CHANNELS))
    for net, path in zip(nets, embedding_paths(directory, passes=pretrain)):
        net.load_state_dict(load_embedding_state(path))
        net.requires_grad_(False)
        net.eval()
    return nets


def permutations(permutation_seed: int, steps: int) -> list[torch.Tensor]:
    """Each epoch's order as the project draws it, cut after `steps` batches in all."""
    generator = torch.Generator().manual_seed(permutation_seed)
    orders, left = [], steps
    while left > 0:
        order = torch.randperm(TRAIN_SIZE, generator=generator)
        take = min(left, STEPS_PER_EPOCH)
        orders.append(order[:take * BATCH_SIZE])
        left -= take
    return orders


# ---------------------------------------------------------------------------------------------
# The release's initial weights, rebuilt from the seed, and the mapping to the project's block
# ---------------------------------------------------------------------------------------------

def project_initial_state(model: str, seed: int, layers: int = LAYERS, dim: int = CHANNELS,
                          dim_int: int = CHANNELS) -> dict:
    """The block the release's script builds after torch.manual_seed(seed), as a state dict of
    models.ResidualODEBlock. Its constructors draw, in this order:
      RKHS: one Conv2d(dim -> dim_int) whose default weight it replaces by
            randn(dim_int, dim, 3, 3) / sqrt(3 dim_int) (the fixed layer); then its N+1 output
            convolutions, set to zero.
      SHL:  its N+1 output convolutions (dim_int -> dim), drawn then set to zero; then its N+1
            hidden convolutions (dim -> dim_int), kept as drawn.
    Nothing is drawn from the seed before the block in the release's script. The global RNG is
    left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = torch.zeros(layers + 1, dim, dim_int, 3, 3)
        if model == 'RKHS':
            nn.Conv2d(dim, dim_int, 3, padding=1, bias=False)
            omega = torch.randn(dim_int, dim, 3, 3) / (3 * dim_int) ** 0.5
            return {'func.omega.weight': omega, 'func.output_weight': output}
        for _ in range(layers + 1):
            nn.Conv2d(dim_int, dim, 3, padding=1, bias=False)
        hidden = torch.stack([nn.Conv2d(dim, dim_int, 3, padding=1, bias=False).weight.detach()
                              for _ in range(layers + 1)])
        return {'func.hidden_weight': hidden, 'func.output_weight': output}


def from_release_state(model: str, state: dict) -> dict:
    """The release ODEBlock's state dict under models.ResidualODEBlock's names."""
    outputs = 'block_list' if model == 'RKHS' else 'visible_layer_list'
    nodes = range(sum(name.startswith(f'odefunc.{outputs}.') for name in state))
    if model == 'RKHS':
        return {'func.omega.weight': state['odefunc.conv1.weight'],
                'func.output_weight': torch.stack([state[f'odefunc.block_list.{i}.weight'] for i in nodes])}
    return {'func.hidden_weight': torch.stack([state[f'odefunc.hidden_layer_list.{i}.weight'] for i in nodes]),
            'func.output_weight': torch.stack([state[f'odefunc.visible_layer_list.{i}.weight'] for i in nodes])}


def state_sha256(state: dict) -> str:
    """A digest of a state dict's names, shapes and float32 bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to(torch.float32).contiguous()
        digest.update(f'{name}{tuple(tensor.shape)}'.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def project_block(model: str, state: dict) -> models.ResidualODEBlock:
    layers = len(state['func.output_weight']) - 1  # one output convolution per node of the grid
    block = models.ResidualODEBlock(model, CHANNELS, CHANNELS, layers, METHOD, 'release', 'fixed')
    block.load_state_dict({name: tensor.clone() for name, tensor in state.items()})
    return block


# ---------------------------------------------------------------------------------------------
# The project's side: models.py and the project's training step, in plain PyTorch
# ---------------------------------------------------------------------------------------------

def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.unsqueeze(1).float() / 255


def project_step(block, input_net, output_net, images_u8, labels, lr: float) -> torch.Tensor:
    """One step of the project's training: mean cross-entropy over the batch, p <- p - lr grad."""
    parameters = [p for p in block.parameters() if p.requires_grad]
    loss = F.cross_entropy(output_net(block(input_net(to_float(images_u8)))), labels)
    for parameter in parameters:
        parameter.grad = None
    loss.backward()
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(parameter.grad, alpha=-lr)
    return loss.detach()


def project_losses(model: str, state: dict, embedding, images, labels, orders, lr: float = LR,
                   snapshot_steps=()) -> tuple[np.ndarray, models.ResidualODEBlock, dict]:
    """The per-step losses (float32) of the project's training from `state` on these batches, the
    block at the end, and its weights after each of `snapshot_steps` steps."""
    block = project_block(model, state)
    block.train()
    input_net, output_net = embedding
    losses, snapshots = [], {}
    for order in orders:
        for batch in order.split(BATCH_SIZE):
            if len(losses) in snapshot_steps:
                snapshots[len(losses)] = copy.deepcopy(block.state_dict())
            losses.append(project_step(block, input_net, output_net, images[batch], labels[batch], lr))
    if len(losses) in snapshot_steps:
        snapshots[len(losses)] = copy.deepcopy(block.state_dict())
    return torch.stack(losses).numpy(), block, snapshots


# ---------------------------------------------------------------------------------------------
# The release's side: its own script, run in-process
# ---------------------------------------------------------------------------------------------

class GivenOrder(torch.utils.data.Sampler):
    """Yields orders[0] the first time a loader iterates, orders[1] the next, and so on."""

    def __init__(self, orders):
        self.orders, self.epoch = [o.tolist() for o in orders], 0

    def __len__(self):
        return len(self.orders[min(self.epoch, len(self.orders) - 1)])

    def __iter__(self):
        order = self.orders[self.epoch]
        self.epoch += 1
        return iter(order)


def check_release(path) -> str:
    if not path:
        raise Refused('no release checkout given: pass --release <folder holding the release\'s '
                      'MNIST_experiments.py and RKHS_NODE.py> (git archive 54bc56f of rbarboni/FlowResNets)')
    missing = [name for name in RELEASE_FILES if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise Refused(f'--release {path} is not a release checkout: {missing[0]} is missing there')
    return os.path.abspath(path)


@contextlib.contextmanager
def _patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def run_release(release: str, model: str, seed: int, orders, mnist_root: str, embedding_dir: str,
                log=None, snapshot_steps=(), layers: int = LAYERS, pretrain: int = PRETRAIN) -> dict:
    """Run the release's MNIST_experiments.py for len(orders) epochs on these batch orders.

    Returns its per-step losses (its pickle's train_loss), the block's initial and final state
    dicts (and its state after each of `snapshot_steps` steps, under the project's names), the
    block and embedding it trained, and the first training batch it drew."""
    import importlib

    epochs = len(orders)
    captured = {'snapshots': {}}
    forwards = [0]

    def snapshot(module, inputs):  # before each training forward: the weights after `forwards` steps
        if module.training:
            if forwards[0] in snapshot_steps:
                captured['snapshots'][forwards[0]] = from_release_state(model, copy.deepcopy(module.state_dict()))
            forwards[0] += 1
    with tempfile.TemporaryDirectory(prefix='release_side_by_side_') as scratch:
        # The script reads MNIST from ./MNIST (torchvision's MNIST/MNIST/raw) and the embedding
        # files from ./MNIST_pretrained_models; it writes its pickle under ./MNIST_experiments.
        os.makedirs(os.path.join(scratch, 'MNIST', 'MNIST'))
        os.symlink(os.path.abspath(os.path.join(mnist_root, 'MNIST', 'raw')),
                   os.path.join(scratch, 'MNIST', 'MNIST', 'raw'))
        os.symlink(os.path.abspath(embedding_dir), os.path.join(scratch, 'MNIST_pretrained_models'))

        sys.path.insert(0, release)
        saved_module = sys.modules.pop('RKHS_NODE', None)
        try:
            node = importlib.import_module('RKHS_NODE')
            if os.path.dirname(os.path.abspath(node.__file__)) != release:
                raise Refused(f'RKHS_NODE was imported from {node.__file__}, not from {release}')
            original_train = node.train_sgd
            original_loader = torch.utils.data.DataLoader

            def train_sgd(model_, train_loader, *args, **kwargs):
                if 'input_embedding' in kwargs:  # the block's training, not a pretraining
                    captured['initial'] = copy.deepcopy(model_.state_dict())
                    captured['block'] = model_
                    model_.register_forward_pre_hook(snapshot)
                    captured['embedding'] = (kwargs['input_embedding'], kwargs['output_embedding'])
                    captured['first_batch'] = next(iter(original_loader(
                        train_loader.dataset, batch_size=BATCH_SIZE, sampler=orders[0][:BATCH_SIZE].tolist())))
                return original_train(model_, train_loader, *args, **kwargs)

            def data_loader(dataset, *args, shuffle=False, **kwargs):
                kwargs['num_workers'] = 0
                if shuffle:
                    return original_loader(dataset, *args, sampler=GivenOrder(orders), **kwargs)
                return original_loader(dataset, *args, shuffle=False, **kwargs)

            argv = [os.path.join(release, 'MNIST_experiments.py'), '--model', model,
                    '--layers', str(layers), '--in_channels', str(CHANNELS), '--dim_int', str(CHANNELS),
                    '--pretrain', str(pretrain), '--epochs', str(epochs), '--lr_init', str(LR),
                    '--batch_size', str(BATCH_SIZE), '--test_batch_size', '1000',
                    '--method', METHOD, '--save', 'side_by_side.pkl']
            out = io.StringIO()
            previous = os.getcwd()
            os.chdir(scratch)
            try:
                with _patched(node, 'train_sgd', train_sgd), \
                        _patched(torch.utils.data, 'DataLoader', data_loader), \
                        _patched(torch, 'load', functools.partial(torch.load, weights_only=False)), \
                        _patched(sys, 'argv', argv), \
                        contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    torch.manual_seed(seed)
                    runpy.run_path(argv[0], run_name='__main__')
            finally:
                os.chdir(previous)
                if log:
                    with open(log, 'a') as f:
                        f.write(out.getvalue())
            import pickle
            with open(os.path.join(scratch, 'MNIST_experiments', 'side_by_side.pkl'), 'rb') as f:
                results = pickle.load(f)
        finally:
            sys.path.remove(release)
            sys.modules.pop('RKHS_NODE', None)
            if saved_module is not None:
                sys.modules['RKHS_NODE'] = saved_module
    block = captured['block']
    if forwards[0] in snapshot_steps:
        captured['snapshots'][forwards[0]] = from_release_state(model, copy.deepcopy(block.state_dict()))
    return {'losses': np.asarray(results['train_loss'], dtype=np.float32), 'results': results,
            'snapshots': captured['snapshots'],
            'initial': captured['initial'], 'final': copy.deepcopy(block.state_dict()),
            'block': block, 'embedding': captured['embedding'], 'first_batch': captured['first_batch']}


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------

def relative_differences(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b) / np.abs(b)


def first_beyond(rel: np.ndarray, bound: float = REL_ROUNDING):
    over = np.nonzero(rel > bound)[0]
    return int(over[0]) + 1 if len(over) else None


def growth(rel: np.ndarray, steps=REPORT_STEPS) -> dict:
    """The largest relative difference over steps 1..s, for each s reached."""
    return {s: float(rel[:s].max()) for s in steps if s <= len(rel)}


def release_times(release_block, x) -> list:
    """The times at which the release's solver evaluates its field in one forward pass."""
    times = []
    handle = release_block.odefunc.register_forward_pre_hook(lambda m, inputs: times.append(float(inputs[0])))
    try:
        with torch.no_grad():
            release_block(x)
    finally:
        handle.remove()
    return times


def one_step_check(model, release_run, images, labels, batch) -> dict:
    """Loss and gradients of both sides from the same weights (the release's, after its last
    step) on one batch: the per-step arithmetic, with no accumulated drift. Each side's float32
    gradient is also compared to the same step in float64 (the project's block and the release's
    A and B in double, same time weights), to tell rounding from a difference in the maths."""
    release_block = copy.deepcopy(release_run['block'])
    release_block._forward_pre_hooks.clear()
    release_in, release_out = release_run['embedding']
    state = from_release_state(model, release_block.state_dict())
    x = to_float(images[batch])

    release_loss = F.cross_entropy(release_out(release_block(release_in(x))), labels[batch])
    release_loss.backward()
    release_grads = from_release_state(model, {n: p.grad if p.grad is not None else torch.zeros_like(p)
                                               for n, p in release_block.named_parameters()})
    block = project_block(model, state)
    input_net, output_net = copy.deepcopy(release_in), copy.deepcopy(release_out)
    project_loss = F.cross_entropy(output_net(block(input_net(x))), labels[batch])
    project_loss.backward()

    exact_block = project_block(model, state).double()
    exact_in, exact_out = copy.deepcopy(release_in).double(), copy.deepcopy(release_out).double()
    exact_loss = F.cross_entropy(exact_out(exact_block(exact_in(x.double()))), labels[batch])
    exact_loss.backward()

    def rel(a, b):
        return float(abs(a - b) / abs(b))

    result = {'loss_rel': rel(project_loss.item(), release_loss.item()),
              'release_loss_vs_float64': rel(release_loss.item(), exact_loss.item()),
              'project_loss_vs_float64': rel(project_loss.item(), exact_loss.item())}
    for name, parameter in block.named_parameters():
        if parameter.grad is None:
            continue
        exact = exact_block.get_parameter(name).grad
        result[f'grad_rel {name}'] = float((parameter.grad - release_grads[name]).norm() / release_grads[name].norm())
        result[f'release grad vs float64 {name}'] = float((release_grads[name].double() - exact).norm() / exact.norm())
        result[f'project grad vs float64 {name}'] = float((parameter.grad.double() - exact).norm() / exact.norm())
    return result


def weights_rel(project_state: dict, release_state: dict) -> dict:
    """||project - release|| / ||release|| for each trained tensor (zero tensors left out)."""
    return {n: float((project_state[n] - release_state[n]).norm() / release_state[n].norm())
            for n in release_state if not n.endswith('omega.weight') and release_state[n].norm() > 0}


SIGNATURE_SEED = 2022
SIGNATURE_DIRECTIONS = 3


def weight_signature(state: dict) -> dict:
    """A few numbers per node of each trained tensor that move with the weights: the node's norm
    and its inner products with SIGNATURE_DIRECTIONS fixed random Gaussian directions, in float64.
    A projection of a node w on a direction r ~ N(0, I) is of the size of ||w||, so dividing a
    difference of two signatures by ||w|| measures ||dw|| / ||w||."""
    generator = torch.Generator().manual_seed(SIGNATURE_SEED)
    signature = {}
    for name in sorted(state):
        if name.endswith('omega.weight'):
            continue
        tensor = state[name].detach().double()
        directions = torch.randn((SIGNATURE_DIRECTIONS, *tensor.shape), generator=generator, dtype=torch.float64)
        nodes = tensor.flatten(1)
        signature[name] = {'node_norms': nodes.norm(dim=1).tolist(),
                           'projections': (directions.flatten(2) * nodes).sum(2).T.tolist()}
    return signature


def signature_difference(mine: dict, reference: dict) -> float:
    """The largest difference between two signatures, relative to each node's norm."""
    worst = 0.0
    for name, want in reference.items():
        got = mine[name]
        for node, norm in enumerate(want['node_norms']):
            if norm == 0:
                continue
            worst = max(worst, abs(got['node_norms'][node] - norm) / norm,
                        *(abs(a - b) / norm for a, b in zip(got['projections'][node], want['projections'][node])))
    return worst


def compare(model: str, release: str, seed: int, permutation_seed: int, steps: int, mnist_root: str,
            embedding_dir: str, images, labels, log=None, control: bool = True, golden_steps: int = 0,
            layers: int = LAYERS, pretrain: int = PRETRAIN) -> dict:
    orders = permutations(permutation_seed, steps)
    snapshot_steps = sorted({s for s in (*REPORT_STEPS, golden_steps, steps) if 0 < s <= steps})
    started = time.time()
    release_run = run_release(release, model, seed, orders, mnist_root, embedding_dir, log, snapshot_steps,
                              layers, pretrain)
    release_seconds = time.time() - started
    checks = {}

    # Same data: the release's first batch through its torchvision ToTensor, against uint8 / 255.
    first_images, first_labels = release_run['first_batch']
    batch = orders[0][:BATCH_SIZE]
    checks['first_batch_images_equal'] = bool(torch.equal(first_images, to_float(images[batch])))
    checks['first_batch_labels_equal'] = bool(torch.equal(first_labels, labels[batch]))

    # Same start: what the release drew, against the rebuild from the seed.
    initial = from_release_state(model, release_run['initial'])
    rebuilt = project_initial_state(model, seed, layers)
    checks['initial_state_rebuilt_bit_for_bit'] = all(torch.equal(initial[n], rebuilt[n]) for n in initial)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        own = models.ResidualODEBlock(model, CHANNELS, CHANNELS, layers, METHOD, 'release').state_dict()
    checks['project_own_draw_from_same_seed_equal'] = all(torch.equal(own[n], initial[n]) for n in initial)

    # Same embedding: the release's loaded modules against the project's A and B from the files.
    embedding = project_embedding(embedding_dir, pretrain)
    checks['embedding_equal'] = all(
        torch.equal(a, b) for mine, theirs in zip(embedding, release_run['embedding'])
        for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))

    # Same ODE grid: the times the release's solver called its field at, against the project's.
    block = project_block(model, initial)
    release_block = copy.deepcopy(release_run['block'])
    release_block._forward_pre_hooks.clear()
    times = release_times(release_block, embedding[0](to_float(images[batch[:8]])))
    checks['evaluation_times_equal'] = times == list(block.schedule.times)

    # Same rate: the release's SGD ran at lr_init throughout (its first decay is at epoch 35).
    checks['release_losses_count'] = int(len(release_run['losses'])) == steps

    started = time.time()
    project, _, project_snapshots = project_losses(model, initial, embedding, images, labels, orders,
                                                   snapshot_steps=snapshot_steps)
    project_seconds = time.time() - started
    release_losses = release_run['losses']
    rel = relative_differences(project, release_losses)
    result = {
        'model': model, 'layers': layers, 'pretrain': pretrain, 'seed': seed, 'permutation_seed': permutation_seed,
        'steps': int(len(release_losses)), 'checks': checks,
        'bit_identical_steps': int(np.argmax(project != release_losses)) if (project != release_losses).any()
        else int(len(project)),
        'first_step_beyond_rounding': first_beyond(rel),
        'max_rel_by_step': growth(rel),
        'weights_rel_by_step': {s: weights_rel(project_snapshots[s], release_run['snapshots'][s])
                                for s in snapshot_steps},
        'one_step_from_release_final_weights': one_step_check(model, release_run, images, labels,
                                                              orders[-1][-BATCH_SIZE:]),
        'release_losses': release_losses.tolist(), 'project_losses': project.tolist(),
        'release_seconds': release_seconds, 'project_seconds': project_seconds,
        'initial_state_sha256': state_sha256(initial),
    }
    if golden_steps:
        result['release_signature'] = weight_signature(release_run['snapshots'][min(golden_steps, steps)])
        result['project_signature'] = weight_signature(project_snapshots[min(golden_steps, steps)])
        result['signature_difference'] = signature_difference(result['project_signature'],
                                                              result['release_signature'])
    if control:
        perturbed, _, control_snapshots = project_losses(model, initial, embedding, images, labels, orders,
                                                         lr=LR_ONE_ULP, snapshot_steps=snapshot_steps)
        control_rel = relative_differences(perturbed, project)
        result['control_lr_one_ulp'] = {
            'first_step_beyond_rounding': first_beyond(control_rel),
            'max_rel_by_step': growth(control_rel),
            'weights_rel_by_step': {s: weights_rel(control_snapshots[s], project_snapshots[s])
                                    for s in snapshot_steps}}
    return result


def golden_record(result: dict, golden_steps: int, embedding_dir: str) -> dict:
    steps = min(golden_steps, result['steps'])
    inputs, outputs = embedding_paths(embedding_dir, passes=result['pretrain'])
    return {
        'what': 'the release script\'s own per-step training losses (its pickle\'s train_loss) and a '
                'signature of its trained weights after the last of them (weight_signature), made by '
                'benchmarks/release_side_by_side.py; the block starts from project_initial_state(model, '
                'seed), the batches are permutations(permutation_seed, steps)',
        'release_commit': RELEASE_COMMIT, 'torch_version': torch.__version__,
        'model': result['model'], 'layers': result['layers'], 'in_channels': CHANNELS, 'dim_int': CHANNELS,
        'pretrain': result['pretrain'], 'method': METHOD, 'time_weights': 'release',
        'batch_size': BATCH_SIZE, 'lr': LR,
        'seed': result['seed'], 'permutation_seed': result['permutation_seed'],
        'embedding_sha256': {os.path.basename(inputs): sha256(inputs), os.path.basename(outputs): sha256(outputs)},
        'initial_state_sha256': result['initial_state_sha256'],
        'steps': steps,
        'release_losses': result['release_losses'][:steps],
        'release_weight_signature': result['release_signature'],
        'project_losses_when_made': result['project_losses'][:steps],
        'project_signature_difference_when_made': result['signature_difference'],
    }


def format_report(result: dict) -> str:
    lines = [f"== {result['model']} L={result['layers']}, {result['pretrain']}-pass embedding, "
             f"seed {result['seed']}, permutation seed {result['permutation_seed']}, {result['steps']} steps "
             f"(release {result['release_seconds']:.0f} s, project {result['project_seconds']:.0f} s)"]
    lines += [f'  check {name}: {value}' for name, value in result['checks'].items()]
    lines.append(f"  losses bit-identical for the first {result['bit_identical_steps']} steps")
    first = result['first_step_beyond_rounding']
    lines.append('  first step whose loss differs beyond rounding (rel > %g): %s'
                 % (REL_ROUNDING, first if first is not None else f'none in {result["steps"]} steps'))
    control = result.get('control_lr_one_ulp', {})
    if control:
        lines.append(f"  control (project, lr 0.5 against 0.5 + 2^-24) first beyond rounding: "
                     f"{control['first_step_beyond_rounding']}")
    lines.append('  step s: max rel. loss difference over steps 1..s | rel. weight difference after s '
                 'steps; [control the same]')
    for s, value in result['max_rel_by_step'].items():
        w = result['weights_rel_by_step'].get(s, {})
        text = f'    s={s:4d}: loss {value:.2e} | weights ' + ', '.join(f'{n.split(".")[-1]} {v:.2e}' for n, v in w.items())
        if control:
            cw = control['weights_rel_by_step'].get(s, {})
            text += (f'   [loss {control["max_rel_by_step"][s]:.2e} | weights '
                     + ', '.join(f'{n.split(".")[-1]} {v:.2e}' for n, v in cw.items()) + ']')
        lines.append(text)
    if 'signature_difference' in result:
        lines.append(f"  weight signature difference (golden check): {result['signature_difference']:.2e}")
    lines += [f'  one step from the release\'s final weights, {n}: {v:.2e}'
              for n, v in result['one_step_from_release_final_weights'].items()]
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train side by side with the release\'s own script '
                                                 '(same start, same batches) and compare step by step.')
    parser.add_argument('--release', help='folder of a release checkout (git archive 54bc56f)')
    parser.add_argument('--models', nargs='+', default=['SHL', 'RKHS'], choices=['SHL', 'RKHS'])
    parser.add_argument('--layers', type=int, default=LAYERS, help='steps of the ODE block (default %(default)s)')
    parser.add_argument('--pretrain', type=int, default=PRETRAIN,
                        help='passes of the release\'s embedding files to start from (default %(default)s)')
    parser.add_argument('--steps', type=int, default=2 * STEPS_PER_EPOCH,
                        help=f'training steps to compare (default {2 * STEPS_PER_EPOCH}, two epochs)')
    parser.add_argument('--seed', type=int, default=DEFAULT_SEED,
                        help='torch.manual_seed before the release script\'s first line (default %(default)s)')
    parser.add_argument('--permutation_seed', type=int, default=None,
                        help='seed of the batch orders (default: --seed)')
    parser.add_argument('--mnist_root', default=default_mnist_root(),
                        help='folder holding MNIST/raw (default: $MNIST_DATA_ROOT or ../shared/data)')
    parser.add_argument('--embedding_dir', default=None,
                        help='folder of the release\'s embedding files (default: <release>/MNIST_pretrained_models)')
    parser.add_argument('--no_control', action='store_true', help='skip the lr + 1 ulp control run')
    parser.add_argument('--json', help='write every number (per-step losses included) to this file; entries '
                                       'already there for other models, depths, embeddings or seeds are kept')
    parser.add_argument('--golden_dir', help='write release_steps_<MODEL>_l<L>_p<P>.json files here')
    parser.add_argument('--golden_steps', type=int, default=60)
    parser.add_argument('--log', help='append the release script\'s own output to this file')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        release = check_release(args.release)
        embedding_dir = args.embedding_dir or os.path.join(release, 'MNIST_pretrained_models')
        embedding_paths(embedding_dir, passes=args.pretrain)
        images, labels = read_mnist_train(args.mnist_root)
    except Refused as exc:
        print(f'release_side_by_side: {exc}', file=sys.stderr)
        return 2
    if args.steps < 1 or args.layers < 1:
        print('release_side_by_side: --steps and --layers must be >= 1', file=sys.stderr)
        return 2
    permutation_seed = args.seed if args.permutation_seed is None else args.permutation_seed
    print(f'torch {torch.__version__}, {torch.get_num_threads()} thread(s); release {release}')
    results = []
    for model in args.models:
        result = compare(model, release, args.seed, permutation_seed, args.steps, args.mnist_root,
                         embedding_dir, images, labels, args.log, control=not args.no_control,
                         golden_steps=args.golden_steps if args.golden_dir else 0,
                         layers=args.layers, pretrain=args.pretrain)
        print(format_report(result), flush=True)
        results.append(result)
        if args.golden_dir:
            path = os.path.join(args.golden_dir, f'release_steps_{model}_l{args.layers}_p{args.pretrain}.json')
            with open(path, 'w') as f:
                json.dump(golden_record(result, args.golden_steps, embedding_dir), f, indent=1)
                f.write('\n')
            print(f'  wrote {path}')
    if args.json:
        write_results(args.json, results)
    return 0


RESULT_KEY = ('model', 'layers', 'pretrain', 'seed', 'permutation_seed', 'steps')


def write_results(path: str, results: list) -> None:
    """Write `results` to the JSON list at `path`, after the entries already there that none of
    them replaces (same model, depth, embedding, seeds and steps), atomically."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            new = {tuple(r[k] for k in RESULT_KEY) for r in results}
            kept = [r for r in json.load(f) if tuple(r[k] for k in RESULT_KEY) not in new]
    files.atomic_write(path, lambda f: json.dump(kept + results, f, indent=1, default=str), binary=False)


if __name__ == '__main__':
    sys.exit(main())
