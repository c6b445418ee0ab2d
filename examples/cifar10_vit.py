"""DP-SGD training of a small Vision Transformer on CIFAR-10.

The model: Conv2D patch embedding (4x4 patches -> 64 tokens), a learned
position embedding, `--depth` pre-norm transformer blocks
(keras.layers.MultiHeadAttention + LayerNormalization + MLP), mean pooling and
a linear head. LayerNormalization is per-example, so it is DP-compatible
(BatchNormalization is not).

Data: `keras.datasets.cifar10.load_data()`. If that fails (no internet, no
cached copy) or `--synthetic` is given, the script falls back to a SYNTHETIC
CIFAR-shaped data set (random images plus a fixed per-class pattern, so there
is a learnable class signal). Results on it say nothing about CIFAR-10; every
line of the output says SYNTHETIC when it is used.

Usage:
    KERAS_BACKEND=jax python examples/cifar10_vit.py --limit 2000 --epochs 2
    KERAS_BACKEND=jax python examples/cifar10_vit.py --limit 256 --epochs 1 \
        --batch-size 64 --physical-batch-size 32            # ~seconds, smoke test
    KERAS_BACKEND=jax python examples/cifar10_vit.py --data-parallel   # all local GPUs

`--data-parallel` (JAX) trains over every local accelerator with
`keras.distribution.DataParallel`: each device clips and sums its own
`--physical-batch-size` rows, and gradients cross devices once per logical
step.

On a 2-core CPU this model is slow under DP (per-example gradients of every
attention weight); `--limit` trains on a random subset of that many examples.
"""

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402
from keras import ops  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_dpsgd  # noqa: E402

# dp-accounting logs a warning for every RDP order it cannot evaluate at this
# sampling rate; it leaves that order out, so epsilon stays a valid upper bound.
# Keep the output readable.
logging.getLogger("absl").setLevel(logging.ERROR)

NUM_CLASSES = 10


def synthetic_cifar(num_train, num_test, seed):
    """CIFAR-10-shaped SYNTHETIC data: uint8 (n, 32, 32, 3) images, int labels.

    Each class has a fixed smooth random pattern; an image is that pattern at
    a random contrast plus pixel noise, so a model can learn the classes (but
    not trivially).
    """
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(NUM_CLASSES, 8, 8, 3))
    templates = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)  # smooth 32x32x3

    def make(n):
        y = rng.integers(0, NUM_CLASSES, size=n)
        contrast = rng.uniform(0.3, 1.0, size=(n, 1, 1, 1))
        x = 128 + 40 * contrast * templates[y] + rng.normal(0, 40, size=(n, 32, 32, 3))
        return np.clip(x, 0, 255).astype("uint8"), y.astype("int64")

    return make(num_train), make(num_test)


def load_data(limit, test_limit, seed, force_synthetic=False):
    source = "CIFAR-10"
    try:
        if force_synthetic:
            raise RuntimeError("--synthetic given")
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as exc:  # no internet / no cached copy
        source = "SYNTHETIC"
        print(f"keras.datasets.cifar10.load_data() unavailable ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0][:200]}).")
        print("Falling back to a SYNTHETIC CIFAR-shaped data set: accuracies below are NOT CIFAR-10 results.")
        n_train = limit or 50000
        (x_train, y_train), (x_test, y_test) = synthetic_cifar(n_train, test_limit or 10000, seed)
    rng = np.random.default_rng(seed)
    if limit and limit < len(x_train):
        keep = rng.choice(len(x_train), size=limit, replace=False)
        x_train, y_train = x_train[keep], y_train[keep]
    if test_limit and test_limit < len(x_test):
        keep = rng.choice(len(x_test), size=test_limit, replace=False)
        x_test, y_test = x_test[keep], y_test[keep]

    def prep(x, y):
        x = x.astype("float32") / 255.0
        x = (x - 0.5) / 0.25
        return x, np.asarray(y).reshape(-1).astype("int32")

    return source, prep(x_train, y_train), prep(x_test, y_test)


class PositionEmbedding(layers.Layer):
    """Adds a learned embedding per token position."""

    def build(self, input_shape):
        self.pos = self.add_weight(shape=tuple(input_shape[1:]), initializer=keras.initializers.RandomNormal(stddev=0.02),
                                   name="position_embedding")

    def call(self, tokens):
        return tokens + ops.expand_dims(self.pos, 0)


def build_vit(dim=64, depth=2, heads=4, mlp_dim=128, patch=4, dropout=0.0):
    inputs = keras.Input((32, 32, 3))
    h = layers.Conv2D(dim, patch, strides=patch, name="patch_embedding")(inputs)  # (8, 8, dim)
    h = layers.Reshape(((32 // patch) ** 2, dim))(h)
    h = PositionEmbedding()(h)
    for i in range(depth):
        a = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(h)
        a = layers.MultiHeadAttention(num_heads=heads, key_dim=dim // heads, dropout=dropout,
                                      name=f"block{i}_attention")(a, a)
        h = layers.Add()([h, a])
        m = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(h)
        m = layers.Dense(mlp_dim, activation="gelu", name=f"block{i}_mlp1")(m)
        m = layers.Dense(dim, name=f"block{i}_mlp2")(m)
        h = layers.Add()([h, m])
    h = layers.LayerNormalization(epsilon=1e-6, name="final_ln")(h)
    h = layers.GlobalAveragePooling1D()(h)
    outputs = layers.Dense(NUM_CLASSES, name="head")(h)
    return keras_dpsgd.DPModel(inputs, outputs, name="dp_vit")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--target-delta", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) logical batch size")
    p.add_argument("--physical-batch-size", type=int, default=64, help="rows per compiled step (memory knob)")
    p.add_argument("--limit", type=int, default=5000, help="train on this many examples (0: all)")
    p.add_argument("--test-limit", type=int, default=2000, help="evaluate on this many test examples (0: all)")
    p.add_argument("--l2-norm-clip", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--synthetic", action="store_true", help="skip the download; use SYNTHETIC data")
    p.add_argument("--clipping", default=None, choices=["auto", "vectorized", "ghost"],
                   help="per-example clipping implementation (fit's clipping=; default: keras_dpsgd's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1)
    p.add_argument("--data-parallel", action="store_true",
                   help="JAX: keras.distribution.DataParallel over all local devices; "
                        "--physical-batch-size rows per device")
    args = p.parse_args(argv)
    physical = args.physical_batch_size
    devices = 1
    if args.data_parallel:
        if keras.backend.backend() != "jax":
            p.error("--data-parallel needs KERAS_BACKEND=jax (keras.distribution)")
        # Before building the model: its variables are laid out for the devices.
        local = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=local))
        devices = len(local)
        physical *= devices

    t_start = time.perf_counter()
    source, (x_train, y_train), (x_test, y_test) = load_data(args.limit, args.test_limit, args.seed,
                                                             args.synthetic)
    tag = " [SYNTHETIC DATA]" if source == "SYNTHETIC" else ""
    n = len(x_train)
    print(f"data: {source}{tag}, {n} train / {len(x_test)} test examples "
          f"(keras {keras.__version__}, backend {keras.backend.backend()})")

    keras.utils.set_random_seed(args.seed)
    model = build_vit(dim=args.dim, depth=args.depth, heads=args.heads, mlp_dim=2 * args.dim)
    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    t0 = time.perf_counter()
    history = model.fit(
        x_train, y_train,
        batch_size=args.batch_size, epochs=args.epochs,
        physical_batch_size=physical,
        l2_norm_clip=args.l2_norm_clip, target_epsilon=args.target_epsilon,
        target_delta=args.target_delta, seed=args.seed, verbose=args.verbose,
        **({"clipping": args.clipping} if args.clipping else {}),
    )
    train_s = time.perf_counter() - t0
    acc = model.evaluate(x_test, y_test, batch_size=256, verbose=0, return_dict=True)["accuracy"]
    eps, delta = model.privacy_spent()
    cfg = model.optimizer.config_values()

    print()
    print("=" * 70)
    print(f"SUMMARY  DP ViT ({model.count_params()} parameters) on {source}{tag}, seed {args.seed}")
    print(f"  test accuracy: {acc:.4f}{tag}   (chance 0.10)")
    print(f"  epsilon = {eps:.3f}, delta = {delta:.0e}  (target epsilon {args.target_epsilon:g}, RDP accountant)")
    print(f"  {cfg['logical_steps']} logical steps, Poisson q = {args.batch_size / n:.4f} (expected batch "
          f"{args.batch_size}, physical {physical} = {args.physical_batch_size} x {devices} device(s)), noise multiplier "
          f"{cfg['noise_multiplier']:.3f}, clip {args.l2_norm_clip:g}, "
          f"{getattr(model, '_dp_clipping', None) or 'vectorized'} clipping")
    print(f"  train accuracy (last epoch, on Poisson batches): {history.history['accuracy'][-1]:.4f}")
    print(f"  train time {train_s:.1f} s, wall time {time.perf_counter() - t_start:.1f} s")
    print("=" * 70)
    return {"source": source, "accuracy": float(acc), "epsilon": float(eps), "delta": float(delta)}


if __name__ == "__main__":
    main()
