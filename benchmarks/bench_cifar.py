"""CIFAR-10 speed benchmark: this project's training path against a torchvision-style pipeline.

    python benchmarks/bench_cifar.py --synthetic --subset 2048          # RKHS, L=10
    python benchmarks/bench_cifar.py --synthetic --subset 16 --layers 1 --batch_size 8   # quick

Both pipelines train the same network (models.CifarResNet, same initial weights); they differ in
how images reach it and how the evaluations are run:
  a  torchvision style: a Dataset over uint8 images that makes one PIL image per sample (as
     torchvision's CIFAR10 does) and applies RandomCrop(32, padding=4), RandomHorizontalFlip,
     ToTensor, Normalize(data.CIFAR_MEAN, data.CIFAR_STD) per image, through a DataLoader; the
     training error on 10,000 random training images through the training transforms, the test
     error on the test set, both through DataLoaders.
  b  this project: uint8 images on the device, batched augmentation (data.CifarTransform),
     engine.train_one_epoch + engine.evaluate.
  c  b with CIFAR_experiments.py's speed options given here (--compile, --channels_last, --amp;
     only when asked: --pipelines b,c plus at least one option), to measure each on the device.
Each: one full training epoch, then the two evaluations; "epoch incl. evals" is their sum.
CIFAR-10 is used when <data_root>/cifar-10-batches-py exists (unless --synthetic); otherwise the
project's synthetic CIFAR-shaped images (data.synthetic_dataset), the same for both pipelines.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import release_style as rs  # noqa: E402
import data  # noqa: E402
import engine  # noqa: E402
import models  # noqa: E402

PIPELINE_NAMES = {'a': 'a: torchvision-style (PIL per image + DataLoader)',
                  'b': 'b: project (device data, batched augmentation)',
                  'c': 'c: project with speed options'}
SPEED_OPTIONS = ('compile', 'channels_last', 'amp')
CIFAR_SHAPE = (3, 32, 32)


def get_args(argv=None):
    p = argparse.ArgumentParser(description='CIFAR-10 speed: project path vs torchvision-style pipeline')
    p.add_argument('--model', default='RKHS', choices=models.MODELS)
    p.add_argument('--layers', type=int, default=10)
    p.add_argument('--batch_size', type=int, default=256)
    p.add_argument('--lr', type=float, default=3e-3, help='SGD rate (CIFAR_experiments default 3e-3)')
    p.add_argument('--data_root', default='data', help='folder holding cifar-10-batches-py (default data)')
    p.add_argument('--synthetic', action='store_true',
                   help='synthetic CIFAR-shaped images (the default when CIFAR-10 is absent)')
    p.add_argument('--subset', type=int, default=None, help='first N training and N test images')
    p.add_argument('--repeats', type=int, default=1)
    p.add_argument('--device', default=None, help='default cuda if available, else cpu')
    p.add_argument('--pipelines', default='a,b',
                   help='comma-separated subset of a,b,c (default a,b; c needs a speed option)')
    p.add_argument('--warmup_steps', type=int, default=1,
                   help='untimed training steps (and a small evaluation) per pipeline first')
    p.add_argument('--workers', type=int, default=None,
                   help='DataLoader workers of pipeline a (default 0 on CPU, 2 on CUDA)')
    p.add_argument('--eval_batch_a', type=int, default=None,
                   help='evaluation batch of pipeline a (default: the project\'s chunk, engine.EVAL_CHUNK)')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--seed', type=int, default=0)
    # CIFAR_experiments.py's speed options, for pipeline c only, to measure each one against b.
    p.add_argument('--compile', action='store_true', help='c: torch.compile the training forward')
    p.add_argument('--channels_last', action='store_true', help='c: channels_last memory format')
    p.add_argument('--amp', action='store_true', help='c: bfloat16 autocast of the training forward')
    args = p.parse_args(argv)
    args.pipelines = [s.strip() for s in args.pipelines.split(',') if s.strip()]
    if not args.pipelines or any(s not in PIPELINE_NAMES for s in args.pipelines):
        p.error(f'--pipelines must be a comma-separated subset of a,b,c, got {args.pipelines}')
    if ('c' in args.pipelines) != any(getattr(args, name) for name in SPEED_OPTIONS):
        p.error('pipeline c is b with speed options: give --pipelines ...,c and at least one of '
                '--compile, --channels_last, --amp, or neither')
    if args.repeats < 1 or args.layers < 1 or args.batch_size < 1:
        p.error('--repeats, --layers and --batch_size must be >= 1')
    if not args.synthetic and not os.path.isdir(os.path.join(args.data_root, data.CIFAR_FOLDER)):
        args.synthetic = True
        args.synthetic_reason = f'{os.path.join(args.data_root, data.CIFAR_FOLDER)} not found'
    return args


def project_eval_chunk(device) -> int:
    return engine.eval_chunk('CIFAR10', device, test_batch_size=10**9)  # the per-device cap


def build_net(args, device) -> models.CifarResNet:
    torch.manual_seed(args.seed)
    return models.CifarResNet(args.model, args.layers).to(device)


def uint8_sets(args):
    """(train, test) DeviceDatasets on the CPU: synthetic or CIFAR-10, cut to --subset."""
    if args.synthetic:
        n_train = min(args.subset or data.CIFAR_TRAIN_SIZE, data.CIFAR_TRAIN_SIZE)
        n_test = min(args.subset or data.CIFAR_TEST_SIZE, data.CIFAR_TEST_SIZE)
        return data.synthetic_dataset(CIFAR_SHAPE, n_train, n_test)
    train, test = data.load_cifar10(args.data_root)
    if args.subset:
        train, test = train.head(args.subset), test.head(args.subset)
    return train, test


class TorchvisionPipeline:
    key = 'a'

    def __init__(self, args, device, train_u8, test_u8):
        from torchvision import transforms

        self.args, self.device = args, device
        normalize = transforms.Normalize(data.CIFAR_MEAN, data.CIFAR_STD)
        train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                       transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                       normalize])
        test_tf = transforms.Compose([transforms.ToTensor(), normalize])
        self.train = rs.PILImageDataset(train_u8.images, train_u8.labels, train_tf)
        self.test = rs.PILImageDataset(test_u8.images, test_u8.labels, test_tf)
        self.eval_batch = args.eval_batch_a or project_eval_chunk(device)
        self.workers = args.workers if args.workers is not None else (2 if device.type == 'cuda' else 0)
        n = len(self.train)
        self.sizes = (n, min(engine.TRAIN_EVAL_SIZE, n), len(self.test))

    def describe(self):
        return f'DataLoader workers {self.workers}, evaluation batch {self.eval_batch}'

    def build(self):
        net = build_net(self.args, self.device)
        optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=self.args.lr)
        return net, optimizer

    def train_eval_loader(self):
        """10,000 random training images, through the training transforms (as the release)."""
        index = torch.randperm(len(self.train))[:engine.TRAIN_EVAL_SIZE].tolist()
        return rs.loader(torch.utils.data.Subset(self.train, index), self.eval_batch, False,
                         self.workers, self.device)

    def flops(self):
        net, _ = self.build()
        return common.train_and_eval_flops(net, CIFAR_SHAPE, self.device)

    def warmup(self, steps):
        net, optimizer = self.build()
        loader = rs.loader(self.train, self.args.batch_size, True, self.workers, self.device)
        rs.train_epoch(net, loader, optimizer, self.device, max_steps=steps)
        small = torch.utils.data.Subset(self.test, range(min(64, len(self.test))))
        rs.error_rate(net, rs.loader(small, self.eval_batch, False, self.workers, self.device), self.device)

    def run(self, memory):
        net, optimizer = self.build()
        train_loader = rs.loader(self.train, self.args.batch_size, True, self.workers, self.device)
        test_loader = rs.loader(self.test, self.eval_batch, False, self.workers, self.device)
        memory.reset()
        with common.Timer(self.device) as train_timer:
            losses = rs.train_epoch(net, train_loader, optimizer, self.device)
        with common.Timer(self.device) as eval_timer:
            train_error = rs.error_rate(net, self.train_eval_loader(), self.device)
            test_error = rs.error_rate(net, test_loader, self.device)
        return common.epoch_result(train_timer, eval_timer, memory, losses, train_error, test_error)


def speed_options(args) -> str:
    chosen = [name for name in SPEED_OPTIONS if getattr(args, name)]
    return ', '.join(f'--{name}' for name in chosen) or 'none'


class ProjectPipeline(common.ProjectPipeline):
    dataset, image_shape = 'CIFAR10', CIFAR_SHAPE
    warmup_eval_images = 64

    def __init__(self, args, device, train_u8, test_u8):
        import CIFAR_experiments

        if self.key == 'b':  # the plain path: none of the speed options
            args = argparse.Namespace(**{**vars(args), **{name: False for name in SPEED_OPTIONS}})
        net = build_net(args, device)
        if args.channels_last:
            net = net.to(memory_format=torch.channels_last)
        wrapped = torch.compile(net) if args.compile else net
        super().__init__(args, device, train_u8, test_u8, net,
                         CIFAR_experiments.make_forward(wrapped, args, device))

    def describe(self):
        return f'{super().describe()}; speed options {speed_options(self.args)}'

    def build_experiment(self, net, train, test):
        """As CIFAR_experiments.main builds it, with the same speed options."""
        transform = data.CifarTransform(self.device)
        return engine.Experiment(
            dataset='CIFAR10', model=net, parts={'model': net},
            parameters=[p for p in net.parameters() if p.requires_grad],
            train_set=train, test_set=test, train_transform=transform.train_batch,
            eval_transform=transform.normalize, train_eval_random=True, results={},
            training_forward=self.training_forward)


class OptionsProjectPipeline(ProjectPipeline):
    key = 'c'


PIPELINES = {'a': TorchvisionPipeline, 'b': ProjectPipeline, 'c': OptionsProjectPipeline}


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    source = 'synthetic' if args.synthetic else f'CIFAR-10 from {args.data_root}'
    if getattr(args, 'synthetic_reason', None):
        source += f' ({args.synthetic_reason})'
    config = (f'{args.model} ResNet, stages [2, 2, {args.layers}, 2], batch {args.batch_size}, '
              f'lr {args.lr}, {source}{f", subset {args.subset}" if args.subset else ""}, '
              f'repeats {args.repeats}, seed {args.seed}, threads {torch.get_num_threads()}, '
              f'speed options of c: {speed_options(args)}')
    common.print_header(device, 'CIFAR-10 speed, in-process', config)
    train_u8, test_u8 = uint8_sets(args)
    pipelines = {key: PIPELINES[key](args, device, train_u8, test_u8) for key in args.pipelines}
    return common.compare(pipelines, PIPELINE_NAMES, device, args.repeats, args.warmup_steps,
                          args.batch_size)


if __name__ == '__main__':
    sys.exit(main())
