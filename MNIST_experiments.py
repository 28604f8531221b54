"""Figures 1 and 2: train a residual ODE block between frozen input and output networks on MNIST.

    python MNIST_experiments.py --layers 5 --epochs 1 --data_root ../shared/data --save smoke.pkl

Writes the training curves to MNIST_experiments/<save> (the release's pickle schema) and the
best model to MNIST_checkpoint/<save name>.pth. See README.md for every flag and file; the
method itself is in models.py, the training loop in resnet_ode/training.py.
"""
import sys

from resnet_ode import gate, launch, mnist, training
from resnet_ode.errors import EXIT_DIVERGED, PretrainingStopped, one_line_errors, run_command


def get_args_parser():
    return mnist.parser()


@one_line_errors
def main(args) -> int:
    config = gate.validate(mnist.RULES, args)
    if config.evaluate:
        return mnist.evaluate(config)
    try:
        with launch.start_run(config) as started:
            experiment = mnist.build_experiment(started)  # data, A and B, the ODE block of each seed
            return training.fit(experiment, started)      # train, evaluate, checkpoint, pickle
    except PretrainingStopped as exc:  # the claim has removed what it created: nothing is left
        print(exc, file=sys.stderr if exc.status == EXIT_DIVERGED else sys.stdout)
        return exc.status


if __name__ == '__main__':
    run_command(main, get_args_parser().parse_args)
