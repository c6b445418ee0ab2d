"""Runs a small DP fit on D forced CPU devices and prints JSON results.

Usage: python -m tests.helpers.dist_worker DEVICES SIGMA [--hlo] [--gram-kernel]
(--gram-kernel: a model whose sequence layer takes its ghost norm and its
clipped sum from the fused kernels, keras_dpsgd.kernels, interpreted on CPU.)
(XLA_FLAGS must force the host device count before JAX starts; the test
sets it in the environment of this subprocess.)
"""

import json
import re
import sys

import os

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_dpsgd  # noqa: E402


def build(devices, gram_kernel=False):
    if devices > 1:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=keras.distribution.list_devices()[:devices]))
    keras.utils.set_random_seed(0)
    if gram_kernel:
        # A Dense layer on a sequence (T = 2, 16 -> 16): its Gram norm is the
        # fused kernel's, which must run on each device's own rows.
        inputs = keras.Input((32,))
        h = keras.layers.Dense(16, activation="tanh")(keras.layers.Reshape((2, 16))(inputs))
        model = keras_dpsgd.DPModel(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
        model.compile(optimizer=keras.optimizers.SGD(0.2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model
    inputs = keras.Input((8,))
    # A convolution too, small enough for the Gram form (T = 2, d_in = 4,
    # d_out = 8): its book-keeping sum once made GSPMD all-gather the batch.
    c = keras.layers.Conv1D(8, 2, strides=2, activation="tanh")(keras.layers.Reshape((4, 2))(inputs))
    h = keras.layers.Dense(16, activation="tanh")(keras.layers.Flatten()(c))
    model = keras_dpsgd.DPModel(inputs, keras.layers.Dense(3)(h))
    model.compile(optimizer=keras.optimizers.SGD(0.2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _big_allreduces(text, total):
    """All-reduces in HLO text that move at least `total` floats (the gradient)."""
    n = 0
    for line in text.splitlines():
        if "all-reduce(" in line or "all-reduce-start(" in line:
            shapes = re.findall(r"f32\[([\d,]*)\]", line.split("=")[1].split("all-reduce")[0])
            if any(s and int(np.prod([int(d) for d in s.split(",")])) >= total for s in shapes):
                n += 1
    return n


def hlo_collectives(model, x, y):
    """Collectives in the compiled physical step and in the apply step."""
    from keras_dpsgd.backend import jax as jax_backend

    runner = jax_backend.Runner(model)
    p = 8
    data = (x[:p], y[:p], None, np.ones(p, bool), np.ones(p, bool))
    data = runner.prepare(data)
    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                 optimizer_variables=True, metrics_variables=True)
    step = jax.jit(model.train_step).lower(state, data).compile().as_text()
    apply = jax_backend.apply_function(model).lower(state[0], state[2]).compile().as_text()
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    moving = re.findall(r" (all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", step)
    return {
        "step_allreduces": len(re.findall(r" all-reduce(?:-start)?\(", step)),
        "batch_moving_collectives": sorted(set(moving)),
        "total_params": total,
        "step_big_allreduces": _big_allreduces(step, total),
        "step_conditionals": step.count(" conditional("),
        "apply_big_allreduces": _big_allreduces(apply, total),
    }


def main():
    devices, sigma = int(sys.argv[1]), float(sys.argv[2])
    gram_kernel = "--gram-kernel" in sys.argv
    kernel_calls = []
    if gram_kernel:
        from keras_dpsgd import ghost, kernels

        ghost.GRAM_KERNEL = ghost.SUM_KERNEL = "interpret"
        real_norm, real_sum = kernels.gram_norm, kernels.clipped_sum

        def counted_norm(a, g, **kw):
            kernel_calls.append(["norm", int(a.shape[0])])  # the examples each call sees
            return real_norm(a, g, **kw)

        def counted_sum(a, g, factors, keep, **kw):
            kernel_calls.append(["sum", int(a.shape[0])])
            return real_sum(a, g, factors, keep, **kw)

        kernels.gram_norm, kernels.clipped_sum = counted_norm, counted_sum
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 32 if gram_kernel else 8)).astype("float32")
    y = rng.integers(0, 3, size=(240,)).astype("int32")
    model = build(devices, gram_kernel)
    # Record how each physical batch reaches the step: it must already be
    # split over the devices (placed from the feeder thread).
    from keras_dpsgd.backend import jax as jax_backend

    seen = set()
    run = jax_backend.Runner.run

    def recording_run(self, data):
        x_batch = data[0]
        seen.add((len(x_batch.sharding.device_set), str(getattr(x_batch.sharding, "spec", None))))
        return run(self, data)

    jax_backend.Runner.run = recording_run
    hist = model.fit(x, y, batch_size=24, epochs=2, steps_per_epoch=5, l2_norm_clip=1.0,
                     noise_multiplier=sigma, physical_batch_size=8, seed=3, verbose=0)
    out = {"devices": len(jax.devices()), "shards": model.optimizer.num_shards,
           "weights": [np.asarray(keras.ops.convert_to_numpy(v)).tolist() for v in model.trainable_variables],
           "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
           "epsilon": model.privacy_spent()[0],
           "acc_sharding": str(model.optimizer._accumulators[0].value.sharding),
           "batch_placements": sorted(seen), "kernel_calls": kernel_calls,
           "loss": hist.history["loss"], "nonfinite": hist.history["nonfinite"]}
    if "--hlo" in sys.argv:
        out["hlo"] = hlo_collectives(model, x, y)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
