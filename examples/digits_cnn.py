"""DP-SGD vs. non-private training of a small CNN on scikit-learn's digits.

The data set (1,797 8x8 grey-scale digits) ships with scikit-learn, so this
runs offline. The same architecture (Conv2D + GroupNormalization + Dense; no
BatchNormalization, which mixes examples and is refused by DP training) is
trained twice:

  (a) with DP-SGD through `keras_dpsgd.DPModel` (Poisson sampling, per-example
      clipping, Gaussian noise; the noise is calibrated so that the whole run
      spends `--target-epsilon` at delta = 1e-5), and
  (b) without privacy, as a plain `keras.Model`.

Both are evaluated on the same held-out 20% test split.

Usage:
    KERAS_BACKEND=jax python examples/digits_cnn.py            # full run
    KERAS_BACKEND=jax python examples/digits_cnn.py --quick    # smoke test

`--seed` fixes the split, the initial weights and the DP sampling/noise
streams (for reproducible experiments; a production run leaves the DP streams
to OS entropy, i.e. no seed).
"""

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_dpsgd  # noqa: E402

# dp-accounting logs a warning for every RDP order it cannot evaluate at this
# sampling rate; it leaves that order out, so epsilon stays a valid upper bound.
# Keep the output readable.
logging.getLogger("absl").setLevel(logging.ERROR)

TARGET_DELTA = 1e-5


def load_data(seed):
    digits = load_digits()
    x = (digits.images.astype("float32") / 16.0)[..., None]  # (1797, 8, 8, 1) in [0, 1]
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def build_model(model_class, width=16):
    """Conv2D + GroupNormalization + Dense. tanh activations (bounded, which
    tends to help under clipping) and few parameters (noise grows with them)."""
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(width, 3, padding="same")(inputs)
    h = keras.layers.GroupNormalization(groups=4)(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.Conv2D(2 * width, 3, strides=2, padding="same")(h)  # 4x4
    h = keras.layers.GroupNormalization(groups=4)(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(10)(h)
    return model_class(inputs, outputs, name=f"digits_cnn_{model_class.__name__.lower()}")


def compile_model(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40, help="DP epochs (of round(1/q) logical steps each)")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--batch-size", type=int, default=128, help="expected (Poisson) logical batch size")
    p.add_argument("--physical-batch-size", type=int, default=None)
    p.add_argument("--l2-norm-clip", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=5e-3, help="Adam learning rate for DP training")
    p.add_argument("--baseline-epochs", type=int, default=30, help="epochs of the non-private model")
    p.add_argument("--baseline-learning-rate", type=float, default=3e-3)
    p.add_argument("--clipping", default=None, choices=["auto", "vectorized", "ghost"],
                   help="per-example clipping implementation (fit's clipping=; default: keras_dpsgd's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run for tests (accuracy is not meaningful)")
    p.add_argument("--verbose", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 2
        args.baseline_epochs = 1

    t_start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data(args.seed)
    n = len(x_train)
    print(f"digits: {n} train / {len(x_test)} test examples, 8x8x1, 10 classes "
          f"(keras {keras.__version__}, backend {keras.backend.backend()})")

    # (a) DP-SGD.
    keras.utils.set_random_seed(args.seed)
    dp_model = build_model(keras_dpsgd.DPModel)
    compile_model(dp_model, args.learning_rate)
    t0 = time.perf_counter()
    dp_model.fit(
        x_train, y_train,
        batch_size=args.batch_size, epochs=args.epochs,
        l2_norm_clip=args.l2_norm_clip, target_epsilon=args.target_epsilon,
        target_delta=TARGET_DELTA, physical_batch_size=args.physical_batch_size,
        seed=args.seed, verbose=args.verbose,
        **({"clipping": args.clipping} if args.clipping else {}),
    )
    dp_train_s = time.perf_counter() - t0
    dp_acc = dp_model.evaluate(x_test, y_test, batch_size=256, verbose=0, return_dict=True)["accuracy"]
    eps, delta = dp_model.privacy_spent()
    sigma = dp_model.optimizer.config_values()["noise_multiplier"]
    steps = int(keras.ops.convert_to_numpy(dp_model.optimizer.iterations))

    # (b) Non-private, same architecture.
    keras.utils.set_random_seed(args.seed)
    model = build_model(keras.Model)
    compile_model(model, args.baseline_learning_rate)
    t0 = time.perf_counter()
    model.fit(x_train, y_train, batch_size=32, epochs=args.baseline_epochs,
              shuffle=True, verbose=args.verbose)
    np_train_s = time.perf_counter() - t0
    np_acc = model.evaluate(x_test, y_test, batch_size=256, verbose=0, return_dict=True)["accuracy"]

    total_s = time.perf_counter() - t_start
    q = args.batch_size / n
    print()
    print("=" * 64)
    print(f"SUMMARY  digits CNN ({dp_model.count_params()} parameters), seed {args.seed}"
          + ("  [--quick: accuracy not meaningful]" if args.quick else ""))
    print(f"  DP-SGD      test accuracy: {dp_acc:.4f}   (train {dp_train_s:.1f} s)")
    print(f"  non-private test accuracy: {np_acc:.4f}   (train {np_train_s:.1f} s; "
          f"{args.baseline_epochs} epochs of shuffled batches of 32, Adam lr {args.baseline_learning_rate:g})")
    print(f"  epsilon = {eps:.4f}, delta = {delta:.0e}  (target epsilon {args.target_epsilon:g}, RDP accountant)")
    print(f"  DP setup: {steps} logical steps, Poisson q = {q:.4f} (expected batch {args.batch_size}), "
          f"noise multiplier {sigma:.3f}, clip {args.l2_norm_clip:g}, Adam lr {args.learning_rate:g}, "
          f"{getattr(dp_model, '_dp_clipping', None) or 'vectorized'} clipping")
    print(f"  wall time: {total_s:.1f} s")
    print("=" * 64)
    return {"dp_accuracy": float(dp_acc), "nonprivate_accuracy": float(np_acc), "epsilon": float(eps),
            "delta": float(delta), "wall_s": total_s}


if __name__ == "__main__":
    main()
