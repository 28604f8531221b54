"""CIFAR-10 speed: the same models.CifarResNet (same initial weights) fed a = torchvision style (a PIL
image per sample, RandomCrop, RandomHorizontalFlip, ToTensor, Normalize, through DataLoaders), b = this
project (uint8 images on the device, batched augmentation), c = b with CIFAR_experiments.py's speed
options; one training epoch then the two evaluations each. Synthetic images unless CIFAR-10 is there.

    python benchmarks/bench_cifar.py --synthetic --subset 2048 [--pipelines b,c --compile]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torchvision import transforms as T

import models
from benchmarks import measure
from benchmarks import release_style as rs
from resnet_ode import cifar, distributed, evaluation

NAMES = {'a': 'a: torchvision-style (PIL per image + DataLoader)',
         'b': 'b: project (device data, batched augmentation)', 'c': 'c: project with speed options'}
SPEED_OPTIONS = ('compile', 'channels_last', 'amp')


def main(argv=None):
    p = argparse.ArgumentParser(description='CIFAR-10 speed: project path vs torchvision-style pipeline')
    rs.add_arguments(p, layers=10, lr=3e-3, mnist=False)
    args, device = measure.parse_args(p, argv, warmup_steps=1, c_options=SPEED_OPTIONS)
    args.synthetic = args.synthetic or not os.path.isdir(os.path.join(args.data_root, cifar.CIFAR_FOLDER))
    measure.print_header(device, 'CIFAR-10 speed, in-process', args)
    train, test = cifar.load_datasets(args, distributed.SINGLE)
    chunk_caps = cifar.EVAL_CHUNK

    def cifar_net():
        torch.manual_seed(args.seed)
        return models.CifarResNet(args.model, args.layers).to(device)

    def torchvision_pipeline():
        normalize = T.Normalize(cifar.CIFAR_MEAN, cifar.CIFAR_STD)
        pil_train = rs.PILImages(train, T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                                   T.ToTensor(), normalize]))

        def random_train_images():  # as the release: 10,000 drawn anew at each evaluation
            index = torch.randperm(len(pil_train))[:cifar.TRAIN_EVAL_SIZE]
            return torch.utils.data.Subset(pil_train, index.tolist())
        return rs.ReleasePipeline(args, device, cifar_net, pil_train,
                                  rs.PILImages(test, T.Compose([T.ToTensor(), normalize])),
                                  random_train_images, evaluation.eval_chunk(chunk_caps, device, 10**9))

    def project_pipeline(options):  # as resnet_ode.cifar builds it, with these speed options
        net, transform = cifar_net(), cifar.CifarTransform(device)
        net = net.to(memory_format=torch.channels_last) if options.channels_last else net
        wrapped = torch.compile(net) if options.compile else net
        forward = cifar.make_forward(wrapped, options, device)
        return measure.ProjectPipeline(
            args, device, net, forward, train, test, chunk_caps,
            lambda train: cifar.random_training_images(train, transform),
            parameters=[p for p in net.parameters() if p.requires_grad],
            train_transform=transform.train_batch, eval_transform=transform.normalize)
    plain = argparse.Namespace(**{**vars(args), **dict.fromkeys(SPEED_OPTIONS, False)})  # b: none
    pipelines = {key: torchvision_pipeline() if key == 'a'
                 else project_pipeline(args if key == 'c' else plain) for key in args.pipelines}
    return measure.compare(pipelines, NAMES, (3, 32, 32), device, args)


if __name__ == '__main__':
    sys.exit(main())
