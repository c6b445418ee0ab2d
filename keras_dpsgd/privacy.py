"""Command line: a privacy statement for a DP-SGD training configuration.

Example:
    python -m keras_dpsgd.privacy --num-examples 60000 --batch-size 256 \
        --epochs 15 --noise-multiplier 1.1 --delta 1e-5
    python -m keras_dpsgd.privacy --num-examples 60000 --batch-size 256 \
        --epochs 15 --target-epsilon 3
"""

import argparse
import sys

from keras_dpsgd import accounting


def statement(num_examples, batch_size, epochs, noise_multiplier=None, target_epsilon=None,
              delta=None, steps_per_epoch=None, accountant="rdp"):
    """The privacy statement as text (also used by the CLI)."""
    q = batch_size / num_examples
    if steps_per_epoch is None:
        steps_per_epoch = max(1, round(1 / q))
    steps = int(epochs * steps_per_epoch)
    delta = accounting.default_delta(num_examples) if delta is None else delta
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("Give exactly one of --noise-multiplier or --target-epsilon.")
    if noise_multiplier is None:
        noise_multiplier = accounting.calibrate_noise(target_epsilon, delta, q, steps, accountant)
    eps = accounting.epsilon(q, noise_multiplier, steps, delta, accountant)
    return (
        f"DP-SGD with Poisson sampling over N = {num_examples} examples, expected batch "
        f"size {batch_size} (q = {q:.6g}), {steps} logical steps ({epochs} epochs of "
        f"{steps_per_epoch}), noise multiplier sigma = {noise_multiplier:.6g}:\n"
        f"  ({eps:.4g}, {delta:.3g})-DP with respect to adding or removing one example "
        f"({accountant.upper()} accountant, dp-accounting).\n"
        "  The guarantee holds for Poisson-sampled batches, per-example clipping over all "
        "weights, and noise added once per logical step, as keras_dpsgd.DPModel trains."
    )


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m keras_dpsgd.privacy",
                                description="Print a privacy statement for DP-SGD training.")
    p.add_argument("--num-examples", "-N", type=int, required=True, help="training set size N")
    p.add_argument("--batch-size", type=float, required=True, help="expected logical batch size q*N")
    p.add_argument("--epochs", type=float, required=True)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="default round(N / batch size)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--noise-multiplier", type=float, help="sigma")
    g.add_argument("--target-epsilon", type=float, help="calibrate sigma for this epsilon")
    p.add_argument("--delta", type=float, default=None, help="default 1/(10 N)")
    p.add_argument("--accountant", choices=accounting.ACCOUNTANTS, default="rdp")
    a = p.parse_args(argv)
    try:
        print(statement(a.num_examples, a.batch_size, a.epochs, a.noise_multiplier, a.target_epsilon,
                        a.delta, a.steps_per_epoch, a.accountant))
    except ValueError as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
