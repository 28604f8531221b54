"""Figure 3: train a ResNet18-layout network of RKHS or SHL residual blocks on CIFAR-10.

    python CIFAR_experiments.py --model SHL --layers 10 --save SHL_l10.pkl

Writes the training curves to CIFAR_experiments/<save> (the release's pickle schema) and the
best model to CIFAR_checkpoint/<save name>.pth. See README.md for every flag and file.
"""

from resnet_ode import cifar, gate, launch, training
from resnet_ode.errors import one_line_errors, run_command


def get_args_parser():
    return cifar.parser()


@one_line_errors
def main(args) -> int:
    config = gate.validate(cifar.RULES, args)
    if config.evaluate:
        return cifar.evaluate(config)
    with launch.start_run(config) as started:
        return training.fit(cifar.build_experiment(started), started)


if __name__ == '__main__':
    run_command(main, get_args_parser().parse_args)
