"""The gate: every rule a run's flags must follow, checked once, whatever their source.

A command line reaches a run from four places: the flags a user typed, the arguments stored in a
checkpoint (--evaluate), those stored in a resume state (--resume), and a sweep's flags after
"--". `validate` reads each the same way (resnet_ode.flags parses them) and applies the same
rules, then returns a `Config`: the run's values, read-only. Nothing after the gate reads the
command line again, and nothing changes a Config: a changed value is a new Config (`replace`).
"""
from __future__ import annotations

import math
import os
import struct

from .errors import UsageError
from .files import TEMPORARY_NAME_EXTRA, check_writable_folder, name_max

COMMAND_LINE, CHECKPOINT, RESUME_STATE, SWEEP = 'command line', 'checkpoint', 'resume state', 'sweep'
FLOAT32_MAX = 3.4028234663852886e38
SEED_LIMIT = 2 ** 63  # seeds are torch's: [0, 2^63)
# (training, test) images of each dataset; --subset takes at most the training set's
DATASET_SIZES = {'MNIST': (60_000, 10_000), 'CIFAR10': (50_000, 10_000)}
FOLDER_PREFIX = {'MNIST': 'MNIST', 'CIFAR10': 'CIFAR'}  # MNIST_experiments/, CIFAR_checkpoint/, ...
# The flags --evaluate reads; it takes everything else from the checkpoint, so any other flag
# given with it would be ignored in silence.
EVALUATE_READS = frozenset(('evaluate', 'device', 'data_root', 'test_batch_size', 'subset', 'synthetic'))
# What may change between a run and its --resume: where it runs, not what it computes.
RESUME_MAY_CHANGE = ('device', 'data_root', 'resume', 'test_batch_size')
RESUME_SUFFIX, BATCH_RESUME_SUFFIX = '.resume.pt', '.batch-resume.pt'
# What a checkpoint may never be called: the names of results files, resume states and lock
# files, so that a --checkpoint can never replace one (its own run's, or another run's).
NOT_CHECKPOINT_SUFFIXES = ('.pkl', RESUME_SUFFIX, BATCH_RESUME_SUFFIX, '.lock')


class Config:
    """A run's validated values, read-only: `config.layers`, `config.seed`, ... One attribute per
    flag of its script; `given` holds the flags the command line set itself, `rules` the rules
    they passed (its experiment's)."""

    __slots__ = ('_values', 'rules', 'given')

    def __init__(self, rules, values: dict, given=frozenset()):
        object.__setattr__(self, '_values', dict(values))
        object.__setattr__(self, 'rules', rules)
        object.__setattr__(self, 'given', frozenset(given))

    @property
    def dataset(self) -> str:
        """'MNIST', 'CIFAR10' or 'SYNTHETIC': whose run this is."""
        return self.rules.dataset

    def __getattr__(self, name):
        try:
            value = self._values[name]
        except KeyError:
            raise AttributeError(name) from None
        return list(value) if isinstance(value, list) else value

    def __setattr__(self, name, value):
        raise AttributeError(f'a Config is read-only; make a new one with replace({name}=...)')

    def replace(self, **changes) -> 'Config':
        unknown = set(changes) - set(self._values)
        if unknown:
            raise AttributeError(f'no such value: {", ".join(sorted(unknown))}')
        return Config(self.rules, {**self._values, **changes}, self.given)

    def as_dict(self) -> dict:
        """The values as plain Python (stored in checkpoints and resume states)."""
        return {key: list(value) if isinstance(value, (list, tuple)) else value
                for key, value in self._values.items()}

    def __repr__(self):
        return f'Config({self.dataset}, {self._values!r})'


def validate(rules, source, origin: str = COMMAND_LINE, *, stored_device=None) -> Config:
    """The Config of a run of the experiment whose `rules` (mnist.RULES, cifar.RULES or
    synthetic.RULES: its parser and its checks) it must follow, from `source`: an argparse Namespace (the script's parsed command line), a list of words (a sweep's flags after
    "--") or a dict (the arguments a checkpoint or resume state stored). Raises UsageError with
    the first rule broken; for stored arguments the caller names the file.

    Which rules apply follows from `origin`: the values' own rules always; the files a run
    writes for a command line and a resume state; the network's size against the memory of the
    device for all but a sweep's flags (whose grid flags are set per run). stored_device: the
    device an evaluated checkpoint will be loaded on.
    """
    parser = rules.parser()
    if isinstance(source, dict):
        missing = [name for name in rules.network_flags if name not in source]
        if missing:
            raise UsageError(f'its arguments lack {", ".join(missing)}')
        namespace = parser.parse_stored(source)
        namespace._given = frozenset()
    elif isinstance(source, list):
        namespace = parser.parse_raising(source)
    else:
        namespace = source
    values = {key: value for key, value in vars(namespace).items() if not key.startswith('_')}
    if stored_device is not None or origin == CHECKPOINT:
        values['device'] = stored_device
    config = rules.normalised(Config(rules, values, getattr(namespace, '_given', frozenset())))
    if origin == COMMAND_LINE and getattr(config, 'evaluate', None) is not None:
        return _checked_evaluate(config)
    rules.check_values(config)
    if origin in (COMMAND_LINE, RESUME_STATE):
        rules.check_files(config)
    if origin != SWEEP:  # a sweep's flags run elsewhere: its own --gpus says where
        check_device(config.device)
        rules.check_size(config, training=origin != CHECKPOINT)
    return config


def _checked_evaluate(config: Config) -> Config:
    """--evaluate reads only the checkpoint, the device and the data: every other flag would be
    ignored in silence, so it is refused."""
    ignored = sorted(config.given - EVALUATE_READS)
    if ignored:
        raise UsageError(f'--evaluate takes the network from the checkpoint and writes nothing, so '
                         f'it would ignore {", ".join("--" + dest for dest in ignored)}: drop '
                         f'{"it" if len(ignored) == 1 else "them"}')
    check_evaluation_sizes(config)
    check_device(config.device)
    if not os.path.isfile(config.evaluate):
        from .files import special_file_kind
        kind = special_file_kind(config.evaluate)
        raise UsageError(f'--evaluate: {config.evaluate} is {kind}, not a checkpoint file' if kind else
                         f'--evaluate: no such checkpoint file {config.evaluate}')
    return config


# ---------------------------------------------------------------------------------------------
# Rules on values
# ---------------------------------------------------------------------------------------------

def at_least(name: str, value, low):
    if value is not None and value < low:
        raise UsageError(f'--{name} must be >= {low}, got {value}')


def check_evaluation_sizes(config):
    """--test_batch_size and --subset, which training and --evaluate both read: at least 1 image,
    and --subset no more than the dataset's training set."""
    for name in ('test_batch_size', 'subset'):
        at_least(name, getattr(config, name), 1)
    if config.subset is not None and config.subset > DATASET_SIZES[config.dataset][0]:
        raise UsageError(f'--subset {config.subset} is more than the {DATASET_SIZES[config.dataset][0]:,} '
                         f'training images')


def check_seed(name: str, seed):
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise UsageError(f'--{name} must be in [0, 2^63), got {seed}')


def positive_float32(name: str, value):
    """A rate or a scale of float32 weights: positive, finite, and within float32's range (a
    larger one overflows in the first update; a smaller one rounds to 0 and nothing trains)."""
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f'--{name} must be positive and finite, got {value}')
    if value > FLOAT32_MAX or struct.unpack('f', struct.pack('f', value))[0] == 0:
        raise UsageError(f'--{name} {value} is outside the range of float32, the precision of the '
                         f'weights it scales (about 1.4e-45 to {FLOAT32_MAX:.4g})')


def within_float32(name: str, value, non_negative: bool = False):
    """A finite value that float32 can hold (it scales float32 data), >= 0 if asked."""
    low = 0 if non_negative else -FLOAT32_MAX
    if not (math.isfinite(value) and low <= value <= FLOAT32_MAX):
        raise UsageError(f'--{name} must be {">= 0 and " if non_negative else ""}within the range of '
                         f'float32, the precision of the data it scales (about {FLOAT32_MAX:.4g}), '
                         f'got {value}')


def check_decay_steps(steps: list):
    if any(step < 1 for step in steps):
        raise UsageError(f'--decay_steps are epochs >= 1 (a decay at 0 would act before training), '
                         f'got {" ".join(map(str, steps))}')
    repeated = sorted({step for step in steps if steps.count(step) > 1})
    if repeated:
        raise UsageError(f'--decay_steps lists epoch {repeated[0]} more than once (each listing '
                         f'multiplies the rate again), got {" ".join(map(str, steps))}')


def has_control_characters(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def check_save_name(save: str):
    if (os.path.basename(save) != save or '/' in save or '\\' in save or save.startswith('.')
            or not save.endswith('.pkl') or len(save) <= len('.pkl') or has_control_characters(save)):
        raise UsageError(f'--save must be a plain file name ending in .pkl (no folders, no .., no '
                         f'control characters), got {save!r}')


def check_results_dir(folder: str):
    if not folder:
        raise UsageError('--results_dir must name a folder, got an empty name (use . for this one)')
    check_writable_folder('--results_dir', folder)


def check_device(name):
    import torch
    if not name:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f'--device: unknown device {name!r}') from None
    if device.type not in ('cpu', 'cuda'):
        raise UsageError(f'--device must be cpu or cuda[:N], got {name!r}')
    if device.type == 'cpu' and device.index not in (None, 0):
        raise UsageError(f'--device {name}: there is one CPU device, cpu')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: CUDA is not available on this machine')
    count = torch.cuda.device_count() if device.type == 'cuda' else 0
    if device.type == 'cuda' and device.index is not None and device.index >= count:
        raise UsageError(f'--device {name}: this machine has {count} CUDA device(s), cuda:0 to '
                         f'cuda:{count - 1}')


def pick_device(config):
    """The torch device of a run: --device, else cuda when available, else cpu."""
    import torch
    if config.device:
        return torch.device(config.device)
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


# ---------------------------------------------------------------------------------------------
# The files a run writes
# ---------------------------------------------------------------------------------------------

def checkpoint_path(config) -> str:
    """--checkpoint, or <prefix>_checkpoint/<save name>.pth."""
    stem = os.path.splitext(config.save)[0]
    return config.checkpoint or os.path.join(f'{FOLDER_PREFIX[config.dataset]}_checkpoint', f'{stem}.pth')


def seed_list_text(seeds) -> str:
    """Seeds as a short, lossless text: '3-5-7'; three or more consecutive ascending seeds as a
    range, '0to19' (so that a sweep's 20 or 100 consecutive seeds make a short name)."""
    parts, start = [], 0
    while start < len(seeds):
        end = start
        while end + 1 < len(seeds) and seeds[end + 1] == seeds[end] + 1:
            end += 1
        if end - start >= 2:
            parts.append(f'{seeds[start]}to{seeds[end]}')
        else:
            parts.extend(str(seed) for seed in seeds[start:end + 1])
        start = end + 1
    return '-'.join(parts)


def parse_seed_list_text(text: str) -> list[int] | None:
    """The seeds that seed_list_text wrote, or None for text it never writes."""
    seeds = []
    for part in text.split('-'):
        low, _, high = part.partition('to')
        if not (low.isdigit() and (not high or high.isdigit())) or len(part) > 40:
            return None
        seeds.extend(range(int(low), int(high) + 1) if high else [int(low)])
        if len(seeds) > 100_000:
            return None
    return seeds if seed_list_text(seeds) == text else None


def resume_state_name(stem: str, seeds=None) -> str:
    """The file name of a run's resume state, in its results folder: '<save stem>.resume.pt' for a
    single run, '<save stem>_s<seeds>.batch-resume.pt' for the batch of a --seeds run (seeds as
    seed_list_text writes them). The two forms can never be the same name."""
    if not seeds:
        return stem + RESUME_SUFFIX
    return f'{stem}_s{seed_list_text(list(seeds))}{BATCH_RESUME_SUFFIX}'


def metrics_name(stem: str) -> str:
    """The per-epoch metrics file beside a run's results pickle."""
    return stem + '.metrics.jsonl'


def written_names(config) -> list[tuple[str, str]]:
    """Every file a run writes, as (folder, file name): results, metrics, resume state, locks,
    checkpoint; with --seeds, those of each member (<stem>_s<S>) and the batch's state and lock."""
    stem = os.path.splitext(config.save)[0]
    checkpoint = checkpoint_path(config)
    checkpoint_folder = os.path.dirname(checkpoint) or '.'
    checkpoint_stem = os.path.splitext(os.path.basename(checkpoint))[0]
    results, seeds = config.results_dir, getattr(config, 'seeds', None)

    def run_names(stem, checkpoint_name):  # the files of one run, or of one --seeds member
        return [(results, f'{stem}.pkl'), (results, metrics_name(stem)), (results, f'.{stem}.lock'),
                (checkpoint_folder, checkpoint_name), (checkpoint_folder, f'.{checkpoint_name}.lock')]
    if not seeds:
        return run_names(stem, os.path.basename(checkpoint)) + [(results, resume_state_name(stem))]
    state = resume_state_name(stem, seeds)
    return [(results, state), (results, f'.{state}.lock')] + [
        name for seed in seeds for name in run_names(f'{stem}_s{seed}', f'{checkpoint_stem}_s{seed}.pth')]


def check_checkpoint_name(path: str | None):
    """A --checkpoint names a file (not a folder) that is not a results file, a resume state or
    a lock file, so that writing it can never replace one of those."""
    if path is None:
        return
    if (not path or path.endswith(('/', os.sep)) or os.path.basename(path) in ('.', '..')
            or os.path.isdir(path)):
        raise UsageError(f'--checkpoint must name a file, such as {os.path.join(path or ".", "run.pth")}; '
                         f'got the folder {path!r}')
    if path.endswith(NOT_CHECKPOINT_SUFFIXES):
        raise UsageError(f'--checkpoint {path}: a checkpoint may not end in '
                         f'{", ".join(NOT_CHECKPOINT_SUFFIXES)}, the names of results files, '
                         f'resume states and locks (it would replace one); use .pth')
    if has_control_characters(path):
        raise UsageError(f'--checkpoint may not hold control characters, got {path!r}')


def check_name_lengths(config):
    """Refuse a --save, --checkpoint or --seeds whose files the file system could not create.
    File systems count bytes, not characters ('€' is 3 bytes in UTF-8)."""
    for folder, name in written_names(config):
        size, limit = len(os.fsencode(name)), name_max(folder) - TEMPORARY_NAME_EXTRA
        if size <= limit:
            continue
        if BATCH_RESUME_SUFFIX in name:
            raise UsageError(f'--seeds: the name of the batch\'s resume state, {name[:40]}..., is '
                             f'too long ({size} bytes; this file system allows {limit} here): give '
                             f'fewer seeds, or consecutive ones (written as a range, 0to19)')
        raise UsageError(f'--save/--checkpoint: the file name {name[:40]}... is too long '
                         f'({size} bytes; this file system allows {limit} here)')


# ---------------------------------------------------------------------------------------------
# The memory a network needs: an absurd size is refused before anything is built
# ---------------------------------------------------------------------------------------------

# The time schedule of an ODE block keeps about this many bytes of Python objects per evaluation.
SCHEDULE_BYTES_PER_EVALUATION = 200


def memory_limit(device) -> tuple[int, str]:
    """(bytes, what they are) of the memory a run on `device` can use at most: the GPU's, or the
    machine's RAM (or the container's limit, when lower)."""
    if device.type == 'cuda':
        import torch
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f'{device}\'s memory'
    limit = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    try:
        with open('/sys/fs/cgroup/memory.max') as f:
            text = f.read().strip()
        if text.isdigit():
            limit = min(limit, int(text))
    except OSError:
        pass
    return limit, 'this machine\'s memory'


def refuse_beyond_memory(what: str, needed: int, device):
    limit, where = memory_limit(device)
    if needed > limit:
        raise UsageError(f'{what}: the network would need at least {needed / 2 ** 30:,.1f} GiB '
                         f'(parameters, gradients and one batch\'s activations), more than '
                         f'{where} ({limit / 2 ** 30:,.1f} GiB)')


def tensor_count(build, size: int) -> int:
    """Parameters and buffers of build(size), a module whose count is linear in its argument:
    read off build(1) and build(2), made on the meta device (nothing allocated)."""
    import torch
    with torch.device('meta'):
        one, two = (sum(t.numel() for t in (*module.parameters(), *module.buffers()))
                    for module in (build(1), build(2)))
    return one + (two - one) * (size - 1)


# ---------------------------------------------------------------------------------------------
# The rules every experiment shares
# ---------------------------------------------------------------------------------------------

class Rules:
    """An experiment's flags and their rules: its parser, the values a command line may give,
    the files a run writes, the memory its network needs. Each experiment module subclasses it
    (mnist.RULES, cifar.RULES, synthetic.RULES)."""

    dataset = None
    network_flags = ()  # the arguments that decide the network: every checkpoint must hold them

    def parser(self):
        raise NotImplementedError

    def normalised(self, config):
        return config

    def resolved(self, config):
        """The config with the defaults that follow from its seed filled in (MNIST's embedding
        seed), once the seed is known (given, or drawn when the run starts)."""
        return config

    def check_values(self, config):
        raise NotImplementedError

    def check_files(self, config):
        check_results_dir(config.results_dir)

    def check_size(self, config, training: bool):
        pass


class TrainingRules(Rules):
    """The rules both image experiments share (MNIST_experiments.py, CIFAR_experiments.py)."""

    def check_values(self, config):
        for name in ('layers', 'batch_size'):
            at_least(name, getattr(config, name), 1)
        check_evaluation_sizes(config)
        at_least('epochs', config.epochs, 0)
        positive_float32('lr_init', config.lr_init)
        positive_float32('decay_rate', config.decay_rate)
        check_decay_steps(config.decay_steps)
        check_seed('seed', config.seed)
        check_save_name(config.save)
        from .distributed import world_size
        if config.batch_size % world_size():
            raise UsageError(f'--batch_size {config.batch_size} (global) must be divisible by the '
                             f'{world_size()} processes')

    def check_files(self, config):
        """The places a training run writes can be written, and no name it writes is refused."""
        check_save_name(config.save)
        check_checkpoint_name(config.checkpoint)
        check_results_dir(config.results_dir)
        check_writable_folder('--checkpoint', os.path.dirname(checkpoint_path(config)))
        check_name_lengths(config)
