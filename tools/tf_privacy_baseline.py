#!/usr/bin/env python
"""TF-Privacy 0.9.0 baseline on CPU: DP / non-private step-time ratio.

TF-Privacy needs Keras 2 and numpy < 2, so it cannot share keras_dpsgd's
environment. This script makes its own virtual environment under /tmp
(tensorflow-privacy==0.9.0 with tensorflow==2.14.1, Python 3.11; about 2 GB
and 1-2 minutes the first time), then times on CPU, on the TF-Privacy MNIST
tutorial CNN with random 28x28x1 inputs and a fixed batch:

  nonprivate   Keras 2 SGD
  dp_keras_sgd DPKerasSGDOptimizer, num_microbatches = batch (per-example clipping)
  dp_fast      DPSequential with the fast (ghost) clipping layer registry

and prints each median step time and the DP / non-private ratios. With
--compare (default on) it also times the same CNN here with keras-dpsgd
(current interpreter, JAX backend, physical DP step with mask all True) and
plain Keras 3 on JAX, so the two DP overhead ratios can be compared on one
machine.

  python tools/tf_privacy_baseline.py [--batch 64] [--steps 30] [--venv /tmp/tfp-baseline-venv]

Slow (venv creation, TF import); not part of the test suite.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

PINS = ["tensorflow-privacy==0.9.0", "tensorflow==2.14.1"]

CHILD = r'''
import json, os, statistics, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
import numpy as np
import tensorflow as tf
import tensorflow_privacy as tfp

batch, steps, warmup = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
x = rng.standard_normal((batch, 28, 28, 1), dtype=np.float32)
y = tf.keras.utils.to_categorical(rng.integers(0, 10, size=(batch,)), 10)

def layers():
    L = tf.keras.layers
    return [L.Conv2D(16, 8, strides=2, padding="same", activation="relu", input_shape=(28, 28, 1)),
            L.MaxPool2D(2, 1), L.Conv2D(32, 4, strides=2, padding="valid", activation="relu"),
            L.MaxPool2D(2, 1), L.Flatten(), L.Dense(32, activation="relu"), L.Dense(10)]

def timed(model):
    for _ in range(warmup):
        model.train_on_batch(x, y)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter(); model.train_on_batch(x, y); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

def emit(name, fn):
    try:
        med = fn()
        print(json.dumps({"variant": name, "median_step_ms": med * 1e3,
                          "examples_per_s": batch / med}), flush=True)
    except Exception as e:
        print(json.dumps({"variant": name, "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)

def nonprivate():
    m = tf.keras.Sequential(layers())
    m.compile(optimizer=tf.keras.optimizers.SGD(0.15),
              loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True))
    return timed(m)

def dp_keras_sgd():
    from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras import DPKerasSGDOptimizer
    m = tf.keras.Sequential(layers())
    opt = DPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.1, num_microbatches=batch,
                              learning_rate=0.15)
    m.compile(optimizer=opt, loss=tf.keras.losses.CategoricalCrossentropy(
        from_logits=True, reduction=tf.losses.Reduction.NONE))
    return timed(m)

def dp_fast():
    from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry
    from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPSequential
    m = DPSequential(l2_norm_clip=1.0, noise_multiplier=1.1,
                     layer_registry=layer_registry.make_default_layer_registry(),
                     layers=layers())
    m.compile(optimizer=tf.keras.optimizers.SGD(0.15),
              loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True))
    return timed(m)

print(json.dumps({"versions": {"tensorflow": tf.__version__,
                               "tensorflow_privacy": getattr(tfp, "__version__", "0.9.0"),
                               "numpy": np.__version__}}), flush=True)
emit("nonprivate", nonprivate)
emit("dp_keras_sgd", dp_keras_sgd)
emit("dp_fast", dp_fast)
'''


def ensure_venv(venv, python):
    py = os.path.join(venv, "bin", "python")
    ok = os.path.exists(py) and subprocess.run(
        [py, "-c", "import tensorflow_privacy"], capture_output=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).returncode == 0
    if ok:
        return py
    if os.path.exists(venv):
        shutil.rmtree(venv)
    print(f"# creating {venv} with {python} and installing {' '.join(PINS)} (1-2 min)", flush=True)
    subprocess.run([python, "-m", "venv", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", *PINS], check=True)
    return py


def keras_dpsgd_compare(batch, steps, warmup):
    """Same CNN in Keras 3 on JAX: the jitted non-private step and keras-dpsgd's
    physical DP step (mask all True), both called directly on device data and
    synchronized every step (as tools/bench.py does)."""
    os.environ["KERAS_BACKEND"] = "jax"
    import importlib.util

    if importlib.util.find_spec("keras_dpsgd") is None:  # else: the one on PYTHONPATH
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import keras
    import numpy as np

    import keras_dpsgd

    rng = np.random.default_rng(0)
    n = batch * 4
    x = rng.standard_normal((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=(n,)).astype(np.int32)
    xb, yb = x[:batch], y[:batch]

    def build():
        L = keras.layers
        inp = keras.Input((28, 28, 1))
        h = L.Conv2D(16, 8, strides=2, padding="same", activation="relu")(inp)
        h = L.MaxPool2D(2, 1)(h)
        h = L.Conv2D(32, 4, strides=2, padding="valid", activation="relu")(h)
        h = L.MaxPool2D(2, 1)(h)
        h = L.Dense(32, activation="relu")(L.Flatten()(h))
        return keras.Model(inp, L.Dense(10)(h))

    def timed(model, data, apply=None):
        box = [model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                    optimizer_variables=True, metrics_variables=True,
                                    purge_model_variables=True)]

        def step():
            _, box[0] = model.train_function(box[0], iter([data]))
            if apply is not None:  # the noisy update that ends a logical step
                tv, ntv, ov, mv = box[0]
                tv, ov = apply(tv, ov)
                box[0] = (tv, ntv, ov, mv)
            jax.block_until_ready(box[0][0])

        for _ in range(warmup):
            step()
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    out = {"backend": "jax", "keras": keras.__version__, "jax": jax.__version__}
    m = build()
    m.compile(optimizer=keras.optimizers.SGD(0.15), loss=loss)
    m.train_on_batch(xb, yb)  # builds and compiles
    out["nonprivate_ms"] = timed(m, (jax.device_put(xb), jax.device_put(yb), None)) * 1e3

    dp = keras_dpsgd.make_private(build())
    dp.compile(optimizer=keras.optimizers.SGD(0.15), loss=loss)
    # One short fit builds and configures everything (and compiles the step).
    dp.fit(x, y, batch_size=batch, epochs=1, steps_per_epoch=1, l2_norm_clip=1.0,
           noise_multiplier=1.1, physical_batch_size=batch, seed=0, verbose=0)
    mask = jax.device_put(np.ones((batch,), bool))
    from keras_dpsgd.backend import jax as jax_backend

    apply = getattr(jax_backend, "apply_function", None)
    data = (jax.device_put(xb), jax.device_put(yb), None, mask, None if apply else mask)
    out["dp_physical_step_ms"] = timed(dp, data, apply(dp) if apply else None) * 1e3
    out["dp_ratio"] = out["dp_physical_step_ms"] / out["nonprivate_ms"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--venv", default="/tmp/tfp-baseline-venv")
    p.add_argument("--python", default=shutil.which("python3.11") or "python3.11",
                   help="interpreter for the venv (TF 2.14 needs Python <= 3.11)")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the keras-dpsgd measurement in this interpreter")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    py = ensure_venv(args.venv, args.python)
    proc = subprocess.run([py, "-c", CHILD, str(args.batch), str(args.steps), str(args.warmup)],
                          capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=""))
    rows, meta = {}, {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            if "versions" in d:
                meta = d["versions"]
            else:
                rows[d["variant"]] = d
    if proc.returncode != 0 and not rows:
        sys.stderr.write(proc.stderr[-3000:])
        return 1
    print(f"TF-Privacy baseline on CPU ({os.cpu_count()} cores), TF-Privacy tutorial CNN, "
          f"batch {args.batch}, median of {args.steps} steps; {meta}")
    base = rows.get("nonprivate", {}).get("median_step_ms")
    for name in ("nonprivate", "dp_keras_sgd", "dp_fast"):
        r = rows.get(name, {})
        if "error" in r or "median_step_ms" not in r:
            print(f"  {name:<14} failed: {r.get('error', 'no result')}")
            continue
        ratio = f"  DP/non-private = {r['median_step_ms'] / base:.2f}" if base and name != "nonprivate" else ""
        print(f"  {name:<14} {r['median_step_ms']:8.2f} ms/step {r['examples_per_s']:9.1f} ex/s{ratio}")
    result = {"tf_privacy": rows, "tf_privacy_versions": meta, "batch": args.batch, "steps": args.steps}
    if args.compare:
        try:
            cmp = keras_dpsgd_compare(args.batch, args.steps, args.warmup)
            result["keras_dpsgd"] = cmp
            print(f"  keras-dpsgd ({cmp['backend']}): non-private {cmp['nonprivate_ms']:.2f} ms/step, "
                  f"DP physical step {cmp['dp_physical_step_ms']:.2f} ms/step, "
                  f"DP/non-private = {cmp['dp_ratio']:.2f}")
        except Exception as e:  # report, do not fail the baseline
            print(f"  keras-dpsgd comparison failed: {type(e).__name__}: {e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
