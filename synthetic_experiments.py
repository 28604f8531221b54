"""The release's synthetic experiment: the paper's convergence claim, in seconds on a CPU.

    python synthetic_experiments.py                              # the release's defaults
    python synthetic_experiments.py -q 8 -r 200 --seed 0 --save q8_r200.pkl

A regression y = -x on N points in R^d, solved by a residual ODE block on R^q (models.py, last
section; the experiment in resnet_ode/synthetic.py): prediction = B x(1), x(0) = A X,
dx/dt = f(t, x), with f the RKHS residual W(t) ReLU(Omega x) (Omega fixed and random) or the SHL
residual (both layers trained). Each epoch is one full-batch gradient step on the mean squared
error. It reproduces the script synthetic.py of the paper's public release (rbarboni/FlowResNets
at 54bc56f), which its README never mentions: the same flags with their short forms and
defaults, the same pickle keys, the same random draws in the same order, written to
synthetic_experiments/<save>. Deviations (docs/deviations.md), each a defect of the release:
SHL runs for any q and r; a non-finite loss ends the run with the curves so far in the pickle
and exit status 3; --method is honoured when given (the release always integrated with midpoint:
that is the default here, --method release).

Exit statuses: 0 done; 2 bad input or refusal (one line on stderr, nothing written); 3 the loss
became non-finite (the pickle is written, with diverged=True); 4 the pickle could not be
written; 130/143 interrupted by SIGINT/SIGTERM (nothing written: a run takes seconds, rerun it).
"""

from resnet_ode import gate, synthetic
from resnet_ode.errors import one_line_errors, run_command


def get_args_parser():
    return synthetic.parser()


@one_line_errors
def main(args) -> int:
    return synthetic.claimed_run(gate.validate(synthetic.RULES, args))


if __name__ == '__main__':
    run_command(main, get_args_parser().parse_args)
