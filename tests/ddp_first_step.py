"""Helper for test_distributed.py, run plainly (one process) or under torchrun.

`ddp_first_step.py OUT`: one SGD step of the MNIST setup through the real engine; the ODE block's
gradient is saved to OUT. `ddp_first_step.py OUT PREFIX` then also has every rank pretrain A and B
and save them to PREFIX<rank>.pt, in the same process group (one torchrun for both checks)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from resnet_ode import data, distributed, gate, mnist, pretraining, signals, training

GLOBAL_BATCH = 64


def first_step(out_path, dist):
    args = gate.validate(mnist.RULES, ['--synthetic', '--layers', '3', '--in_channels', '8', '--dim_int', '4',
                                       '--seed', '0', '--batch_size', str(GLOBAL_BATCH), '--embedding_seed', '0'],
                         gate.SWEEP)
    train, test = data.synthetic_dataset(data.MNIST_IMAGE_SHAPE, GLOBAL_BATCH, 16)
    net, _ = mnist.build_network(args, None)
    net.freeze_embedding()
    with torch.no_grad():  # a non-zero start, so that every node gets a gradient
        net.ode_block.func.output_weight.normal_(0, 0.05)
    exp = training.Experiment(
        dataset='MNIST', model=net, parts={}, parameters=list(net.ode_block.parameters()),
        train_set=train, test_set=test,
        train_transform=lambda images, generator: data.mnist_to_float(images),
        eval_transform=data.mnist_to_float,
        train_eval_sample=mnist.first_training_images(
            train, mnist.TRAIN_ERROR_IMAGES), eval_chunk=16,
        facts={}, training_forward=dist.wrap(net))
    # lr 0 keeps the weights, so the gradient is the first step's, on the one global batch.
    optimizer = torch.optim.SGD(exp.parameters, lr=0.0)
    generator = torch.Generator().manual_seed(0)
    with signals.StopRequest() as stop:
        outcome = training.train_one_epoch(exp, optimizer, [generator], GLOBAL_BATCH, dist, stop, 'step')
    if dist.is_main:
        torch.save({'grads': [p.grad for p in exp.parameters], 'loss': outcome.losses}, out_path)


def pretrain_on_every_rank(out_prefix, dist):
    """Each rank pretrains A and B through the script's own function and saves what it has."""
    args = gate.validate(mnist.RULES, ['--synthetic', '--in_channels', '4', '--pretrain', '1', '--pretrain_lr', '0.05',
                                       '--batch_size', str(GLOBAL_BATCH), '--seed', '0', '--embedding_seed', '0'],
                         gate.SWEEP)
    train, _ = data.synthetic_dataset(data.MNIST_IMAGE_SHAPE, 4 * GLOBAL_BATCH, 16)
    net, _ = mnist.build_network(args, None)
    pretraining.pretrain(net, train, args, dist, signals.StopRequest())
    net.freeze_embedding()
    torch.save({'input_net': net.input_net.state_dict(), 'output_net': net.output_net.state_dict()},
               f'{out_prefix}{dist.rank}.pt')


if __name__ == '__main__':
    group = distributed.setup(torch.device('cpu'))
    first_step(sys.argv[1], group)
    if len(sys.argv) > 2:
        pretrain_on_every_rank(sys.argv[2], group)
    group.close()
