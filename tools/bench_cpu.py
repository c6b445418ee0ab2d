"""CPU micro-benchmark: DP-SGD physical step vs. non-private step, and compiles.

Model: a small CNN (Conv2D/GroupNormalization x2 + Dense, 20.6k parameters) on
random 28x28x1 inputs with 10 classes; the non-private model is a plain
`keras.Model` of the same architecture and initial weights; both use SGD.

What is measured:

1. Step time (the headline ratio). The compiled per-physical-batch step is
   called `--steps` times on one fixed full batch of p = `--batch` rows, after
   `--warmup` untimed calls; we report the median wall time per call.
   JAX: the function each fit loop calls (`model.train_function`, Keras' own
   `jax.jit` of `train_step`), threading the returned state as fit does, with
   `jax.block_until_ready` after every call.
   - non-private: `keras.Model.train_step` (forward + backward + SGD update).
   - DP "accumulate": keras-dpsgd's step on a physical batch that is not the
     last of its logical batch (per-example gradients or ghost norms, clipping,
     masked sum into the accumulators) -- the common case.
   - DP "apply": the last physical batch of a logical batch (the same, plus
     Gaussian noise, division by qN and the SGD update).
   A logical batch of k physical batches costs (k-1) accumulate + 1 apply.
   Other backends: DP times the backend Runner's `run` (what fit calls per
   physical batch); non-private times `keras.Model.train_on_batch`.

2. End-to-end fit time per physical batch (adds the host work: Poisson
   sampling, gathering, masking, accounting and Python dispatch). DP: a second
   `fit` of `--fit-steps` logical steps (the first one compiled), expected
   logical batch 4p so that the number of physical batches per logical step
   varies; time / number of physical batches actually run (counted by wrapping
   the backend Runner's `run`). Non-private: `keras.Model.fit` over
   N = 4p x `--fit-steps` examples in batches of p (after a warm-up fit).

3. Compiles (JAX). `jax_log_compiles` is on during the first DP fit (>= 20
   Poisson logical steps, noise_multiplier fixed) and a logging handler counts
   the "Compiling jit(<name>)" messages; those whose name contains train_step
   are train-step compiles (design target: exactly 1 whatever the Poisson batch
   sizes; 0 in the second fit). TensorFlow: the Runner's tf.function tracing
   count, if it has one.

Where `DPModel.fit` has `clipping=`, each implementation ("vectorized",
"ghost") is measured on its own fresh model (`--clipping` picks one).

Usage:
    KERAS_BACKEND=jax python tools/bench_cpu.py [--batch 64] [--steps 50] [--json out.json]
    KERAS_BACKEND=jax python tools/bench_cpu.py --sampler-scale [--scale-steps 30] [--json out.json]

`--sampler-scale` measures something else: the share of DPModel.fit time
spent in Poisson sampling and in gathering rows, on a 10 M-example
memory-mapped training set written under /tmp and deleted at the end (see
`sampler_scale()`).

`--backend` sets KERAS_BACKEND before Keras is imported. JAX is the supported
backend; on another backend the script measures what it can, or prints
"not yet supported" and exits with status 3 when keras_dpsgd cannot train the
model there. Timings on a shared 2-core machine are noisy: compare ratios,
not absolutes, and rerun.
"""

import argparse
import inspect
import json
import logging
import os
import platform
import re
import statistics
import sys
import time

EXIT_NOT_SUPPORTED = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["jax", "tensorflow", "torch"], default=None,
                   help="Keras backend (default: $KERAS_BACKEND or jax)")
    p.add_argument("--batch", type=int, default=64, help="physical batch size p")
    p.add_argument("--steps", type=int, default=50, help="timed calls of each step function")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument("--fit-steps", type=int, default=20, help="logical steps in each DP fit (>= 20 recommended)")
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--clipping", choices=["all", "vectorized", "ghost"], default="all",
                   help="DP clipping implementation(s) to time, where fit() has clipping= (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--sampler-scale", action="store_true",
                   help="instead: time Poisson sampling and gathering in fit() on a 10 M-example "
                        "memory-mapped training set under /tmp (see sampler_scale())")
    p.add_argument("--scale-n", type=int, default=10_000_000, help="--sampler-scale: training-set size N")
    p.add_argument("--scale-batch", type=int, default=1024, help="--sampler-scale: expected logical batch")
    p.add_argument("--scale-physical", type=int, default=1152,
                   help="--sampler-scale: physical batch (default E[B] + 4 sd, so ~1 physical batch per step)")
    p.add_argument("--scale-steps", type=int, default=30, help="--sampler-scale: logical steps per timed fit")
    p.add_argument("--scale-dir", default="/tmp", help="--sampler-scale: where the memmap files go")
    p.add_argument("--scale-hidden", type=int, default=256, help="--sampler-scale: MLP width")
    p.add_argument("--scale-hidden-layers", type=int, default=0,
                   help="--sampler-scale: hidden Dense layers (0: a single Dense(10) layer)")
    return p.parse_args(argv)


args = parse_args()
os.environ["KERAS_BACKEND"] = args.backend or os.environ.get("KERAS_BACKEND", "jax")
BACKEND = os.environ["KERAS_BACKEND"]


def not_supported(why):
    print(f"backend {BACKEND}: not yet supported ({why})")
    sys.exit(EXIT_NOT_SUPPORTED)


import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:
    import keras_dpsgd  # noqa: E402
    from keras_dpsgd import backend as dp_backend  # noqa: E402
except ImportError as exc:
    not_supported(f"keras_dpsgd: {type(exc).__name__}: {exc}")

if BACKEND == "jax":
    import jax  # noqa: E402


def build(model_class):
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same")(inputs)
    h = keras.layers.GroupNormalization(groups=4)(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Conv2D(32, 3, strides=2, padding="same")(h)
    h = keras.layers.GroupNormalization(groups=4)(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(10)(h)
    model = model_class(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


class CompileCounter(logging.Handler):
    """Counts jax_log_compiles' "Compiling jit(<name>) ..." messages (JAX only;
    elsewhere a no-op whose counts are None)."""

    PATTERN = re.compile(r"Compiling (?:jit\()?([\w<>.-]+)\)?")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.names = None

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            m = self.PATTERN.match(msg)
            self.names.append(m.group(1) if m else msg[:60])

    def __enter__(self):
        if BACKEND != "jax":
            return self
        self.names = []
        jax.config.update("jax_log_compiles", True)
        self._logger = logging.getLogger("jax")
        self._old = (self._logger.level, self._logger.propagate)
        self._logger.setLevel(logging.WARNING)
        self._logger.propagate = False  # keep the compile log off the console
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        if BACKEND != "jax":
            return
        self._logger.removeHandler(self)
        self._logger.setLevel(self._old[0])
        self._logger.propagate = self._old[1]
        jax.config.update("jax_log_compiles", False)

    @property
    def train_step(self):
        return None if self.names is None else sum("train_step" in n for n in self.names)

    @property
    def total(self):
        return None if self.names is None else len(self.names)


class PhysicalBatchCounter:
    """Counts the DP fit loop's compiled-step calls (one per physical batch) by
    wrapping the backend Runner's `run` for the duration of a `with`; keeps the
    runners it saw (TensorFlow: their tf.function tracing counts)."""

    def __enter__(self):
        self.count = 0
        self.runners = []
        runner_cls = dp_backend.impl.Runner
        self._orig = orig = runner_cls.run

        def run(runner, data):
            self.count += 1
            if not any(r is runner for r in self.runners):
                self.runners.append(runner)
            return orig(runner, data)

        runner_cls.run = run
        return self

    def __exit__(self, *exc):
        dp_backend.impl.Runner.run = self._orig

    def tracing_count(self):
        counts = [r.function.experimental_get_tracing_count() for r in self.runners
                  if hasattr(getattr(r, "function", None), "experimental_get_tracing_count")]
        return sum(counts) if counts else None


def time_interleaved(fns, calls, warmup):
    """{name: (median s, min s)} per call of each zero-argument fn.

    The functions are called round-robin (one call of each per round), so
    that load from other processes on a shared machine hits all of them alike
    and their ratio stays meaningful even when absolute times drift."""
    times = {name: [] for name in fns}
    for i in range(warmup + calls):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def jax_step_fn(model, data, last=False):
    """A call of model.train_function (Keras' jit of train_step) on one fixed
    batch, threading the state as fit does, blocking until it is done; with
    `last`, followed by the noisy update that ends a logical step (newer
    keras_dpsgd runs it as a separate jitted step)."""
    model.make_train_function()
    apply = getattr(dp_backend.impl, "apply_function", None) if last else None
    apply = apply(model) if apply else None
    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                 optimizer_variables=True, metrics_variables=True,
                                 purge_model_variables=False)
    # The step donates its state; work on copies so the model's variables stay valid.
    box = [jax.tree_util.tree_map(lambda a: jax.numpy.array(a, copy=True), state)]
    train_function = model.train_function

    def call():
        logs, box[0] = train_function(box[0], iter([data]))
        if apply is not None:
            tv, ntv, ov, mv = box[0]
            tv, ov = apply(tv, ov)
            box[0] = (tv, ntv, ov, mv)
        jax.block_until_ready((logs, box[0]))

    return call


def dp_runner_step_fn(model, data):
    """Other backends: a call of the backend Runner's run (what DP fit calls
    per physical batch). This trains the model further."""
    runner = dp_backend.impl.Runner(model)
    runner.begin_epoch()

    def call():
        logs = runner.run(data)
        keras.tree.map_structure(keras.ops.convert_to_numpy, logs)  # wait for the result

    return call


def clipping_modes(requested):
    """fit(clipping=...) values to benchmark; [None] if this keras_dpsgd has no such argument."""
    if "clipping" not in inspect.signature(keras_dpsgd.DPModel.fit).parameters:
        return [None]
    modes = ["vectorized", "ghost"] if BACKEND == "jax" else ["vectorized"]
    return modes if requested == "all" else [requested]


def measure_dp(mode, weights, x, y, xb, yb):
    p = args.batch
    keras.utils.set_random_seed(args.seed)
    dp = build(keras_dpsgd.DPModel)
    dp.set_weights(weights)
    fit_kwargs = dict(batch_size=4 * p, epochs=1, steps_per_epoch=args.fit_steps, l2_norm_clip=1.0,
                      noise_multiplier=args.noise_multiplier, physical_batch_size=p, verbose=0)
    if mode is not None:
        fit_kwargs["clipping"] = mode
    # Fit #1 compiles (and builds and configures the DP model): count compiles.
    with CompileCounter() as cc1, PhysicalBatchCounter() as pb1:
        t0 = time.perf_counter()
        dp.fit(x, y, seed=args.seed, **fit_kwargs)
        fit1_s = time.perf_counter() - t0
    used = getattr(dp, "_dp_clipping", None) or mode or "vectorized"
    # Fit #2 is compiled already: end-to-end time per physical batch.
    with CompileCounter() as cc2, PhysicalBatchCounter() as pb2:
        t0 = time.perf_counter()
        dp.fit(x, y, **fit_kwargs)
        fit2_s = time.perf_counter() - t0
    eps, delta = dp.privacy_spent()  # before the step timing (which, off JAX, trains the model further)
    mask = np.ones((p,), bool)
    step_fns = {}
    for kind, last in (("accumulate", False), ("apply", True)):
        data = (xb, yb, None, mask, np.full((p,), last))
        if BACKEND == "jax" and hasattr(dp_backend.impl, "apply_function"):
            data = data[:4] + (None,)  # as fit passes it: the step does not read is_last
        step_fns[kind] = jax_step_fn(dp, data, last) if BACKEND == "jax" else dp_runner_step_fn(dp, data)
    return step_fns, {
        "clipping_requested": mode, "clipping_used": used,
        "fit_ms_per_physical_batch": 1e3 * fit2_s / max(pb2.count, 1),
        "fit1_s": fit1_s, "fit2_s": fit2_s,
        "fit1_physical_batches": pb1.count, "fit2_physical_batches": pb2.count,
        "train_step_compiles_fit1": cc1.train_step, "all_compiles_fit1": cc1.total,
        "train_step_compiles_fit2": cc2.train_step, "all_compiles_fit2": cc2.total,
        "compiled_functions_fit1": sorted(set(cc1.names or [])),
        "tf_function_traces_fit1": pb1.tracing_count(), "tf_function_traces_fit2": pb2.tracing_count(),
        "epsilon": eps, "delta": delta,
    }


def _compiles(r, fit):
    if r[f"train_step_compiles_{fit}"] is not None:
        return f"train_step compiles: {r[f'train_step_compiles_{fit}']} (all jit compiles: {r[f'all_compiles_{fit}']})"
    if r[f"tf_function_traces_{fit}"] is not None:
        return f"tf.function traces: {r[f'tf_function_traces_{fit}']}"
    return "compiles: n/a on this backend"


def main():
    p = args.batch
    rng = np.random.default_rng(args.seed)
    n = args.fit_steps * 4 * p
    x = rng.normal(size=(n, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=(n,)).astype("int32")
    xb, yb = x[:p], y[:p]

    keras.utils.set_random_seed(args.seed)
    plain = build(keras.Model)
    weights = plain.get_weights()
    versions = f"keras {keras.__version__}, " + (f"jax {jax.__version__}, " if BACKEND == "jax" else "")
    print(f"bench_cpu: backend {BACKEND}, {versions}numpy {np.__version__}, {os.cpu_count()} CPU(s) "
          f"{platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print(f"model: small CNN, {plain.count_params()} parameters, input 28x28x1, physical batch p = {p}")

    dp_results = []
    step_fns = {}
    for mode in clipping_modes(args.clipping):
        try:
            fns, r = measure_dp(mode, weights, x, y, xb, yb)
            dp_results.append(r)
            step_fns.update({(r["clipping_used"], kind): fn for kind, fn in fns.items()})
        except Exception as exc:  # noqa: BLE001
            if BACKEND == "jax":
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            not_supported(f"DP fit failed: {type(exc).__name__}: {first}")

    # Non-private: keras.Model.fit over the same N examples in batches of p (after a warm-up fit).
    plain.fit(x[: 2 * p], y[: 2 * p], batch_size=p, epochs=1, verbose=0)
    t0 = time.perf_counter()
    plain.fit(x, y, batch_size=p, epochs=1, verbose=0, shuffle=True)
    np_fit_ms = 1e3 * (time.perf_counter() - t0) / (n // p)
    if BACKEND == "jax":
        step_fns["nonprivate"] = jax_step_fn(plain, (xb, yb, None))
    else:
        step_fns["nonprivate"] = lambda: plain.train_on_batch(xb, yb)
    timed = time_interleaved(step_fns, args.steps, args.warmup)
    np_ms, np_min_ms = (1e3 * t for t in timed["nonprivate"])
    for r in dp_results:
        for kind in ("accumulate", "apply"):
            med, low = timed[(r["clipping_used"], kind)]
            r[f"{kind}_step_ms"], r[f"{kind}_step_min_ms"] = 1e3 * med, 1e3 * low

    print()
    print(f"{'measure (p = %d), median ms' % p:<52} {'non-private':>11} {'DP-SGD':>9} {'DP/non-private':>15}")
    print("-" * 90)
    step_name = "jitted step" if BACKEND == "jax" else "step"
    for r in dp_results:
        label = f"[{r['clipping_used']}]"
        for name, a, b in (
            (f"{label} {step_name}, accumulate", np_ms, r["accumulate_step_ms"]),
            (f"{label} {step_name}, apply (+noise +update)", np_ms, r["apply_step_ms"]),
            (f"{label} fit, per physical batch (end to end)", np_fit_ms, r["fit_ms_per_physical_batch"]),
        ):
            print(f"{name:<52} {a:>11.2f} {b:>9.2f} {b / a:>15.2f}")
    print("-" * 90)
    for r in dp_results:
        label = f"[{r['clipping_used']}]"
        print(f"{label} DP fit #1: {args.fit_steps} Poisson logical steps (expected batch {4 * p}), "
              f"{r['fit1_physical_batches']} physical batches, {r['fit1_s']:.1f} s: {_compiles(r, 'fit1')}")
        print(f"{label} DP fit #2: {args.fit_steps} more logical steps, {r['fit2_physical_batches']} "
              f"physical batches, {r['fit2_s']:.1f} s: {_compiles(r, 'fit2')}")
    r = dp_results[0]
    print(f"epsilon after both fits (sigma {args.noise_multiplier:g}, q {4 * p / n:.4f}, "
          f"{2 * args.fit_steps} logical steps): {r['epsilon']:.3f} at delta {r['delta']:.1e}")
    for r in dp_results:
        print(f"step-time ratio DP/non-private [{r['clipping_used']}]: "
              f"{r['accumulate_step_ms'] / np_ms:.2f} (accumulate), {r['apply_step_ms'] / np_ms:.2f} (apply); "
              f"fastest calls: {r['accumulate_step_min_ms'] / np_min_ms:.2f}, {r['apply_step_min_ms'] / np_min_ms:.2f}")
    print("note: shared 2-core CPU, timings are noisy (step functions are timed round-robin so load hits "
          "all alike); rerun and compare ratios")

    result = {
        "backend": BACKEND, "keras": keras.__version__, "numpy": np.__version__,
        "jax": jax.__version__ if BACKEND == "jax" else None,
        "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
        "physical_batch": p, "timed_calls": args.steps, "params": plain.count_params(),
        "dp_fit_logical_steps": args.fit_steps,
        "nonprivate_step_ms": np_ms, "nonprivate_step_min_ms": np_min_ms,
        "nonprivate_fit_ms_per_batch": np_fit_ms,
        "dp": [dict(r, ratio_accumulate=r["accumulate_step_ms"] / np_ms,
                    ratio_apply=r["apply_step_ms"] / np_ms,
                    ratio_fit=r["fit_ms_per_physical_batch"] / np_fit_ms) for r in dp_results],
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


class _Intervals:
    """Wraps `cls.name` so that every call on a thread other than the main one
    (or on any thread, with main_too) appends its (start, end) to a list."""

    def __init__(self, cls, name, main_too=False):
        self.cls, self.name, self.main_too = cls, name, main_too
        self.spans = []

    def __enter__(self):
        import threading
        self._orig = orig = getattr(self.cls, self.name)
        spans, main_too, main = self.spans, self.main_too, threading.main_thread()

        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                if main_too or threading.current_thread() is not main:
                    spans.append((t0, time.perf_counter()))

        setattr(self.cls, self.name, wrapped)
        return self

    def __exit__(self, *exc):
        setattr(self.cls, self.name, self._orig)

    def total(self):
        return sum(b - a for a, b in self.spans)


def _overlap(spans, others):
    """Seconds of `spans` that lie inside the union of `others` (both lists of (start, end))."""
    others = sorted(others)
    total = 0.0
    for a, b in spans:
        for c, d in others:
            if c >= b:
                break
            total += max(0.0, min(b, d) - max(a, c))
    return total


def _evict(path):
    """Drop the file's pages from the OS page cache (Linux; no root needed), so the next
    gathers read from disk. Best effort: returns False where posix_fadvise is missing."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def sampler_scale():
    """--sampler-scale: the cost of Poisson sampling and of gathering rows in
    DPModel.fit on a large memory-mapped training set.

    Writes N x 16 float16 features and N int32 labels with
    np.lib.format.open_memmap under --scale-dir (N = 10 M: 320 MB + 40 MB),
    reopens them read-only (mmap_mode="r"), and trains a tiny DPModel
    (Dense(10) on the 16 features) with expected batch --scale-batch. A first
    fit of 3 logical steps compiles; then two timed fits of --scale-steps
    logical steps each: "cold" after the files' pages were evicted from the
    page cache (posix_fadvise DONTNEED), "warm" right after (pages of the
    rows touched so far are cached, most rows are not).

    PoissonSampler.sample, RandomAccessData.take and the Runner's prepare are
    wrapped with timers. In fit they run on BatchFeeder's background thread,
    ahead of the train step; the main thread's wait for the next physical
    batch (BatchFeeder.logical_batch's queue) is timed too: that is the part
    of sampling + gathering that does not overlap the step. The files are
    deleted at the end."""
    from keras_dpsgd import sampling

    n, eb, p, steps = args.scale_n, args.scale_batch, args.scale_physical, args.scale_steps
    xpath = os.path.join(args.scale_dir, f"bench_cpu_scale_x_{os.getpid()}.npy")
    ypath = os.path.join(args.scale_dir, f"bench_cpu_scale_y_{os.getpid()}.npy")
    rows = []
    try:
        t0 = time.perf_counter()
        xw = np.lib.format.open_memmap(xpath, mode="w+", dtype=np.float16, shape=(n, 16))
        yw = np.lib.format.open_memmap(ypath, mode="w+", dtype=np.int32, shape=(n,))
        rng = np.random.default_rng(args.seed)
        chunk = 1_000_000
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            xw[i:i + m] = rng.standard_normal((m, 16), dtype=np.float32).astype(np.float16)
            yw[i:i + m] = rng.integers(0, 10, size=m, dtype=np.int32)
        xw.flush(), yw.flush()
        del xw, yw
        write_s = time.perf_counter() - t0
        x = np.load(xpath, mmap_mode="r")
        y = np.load(ypath, mmap_mode="r")
        size_mb = (os.path.getsize(xpath) + os.path.getsize(ypath)) / 1e6
        print(f"bench_cpu --sampler-scale: backend {BACKEND}, keras {keras.__version__}, numpy {np.__version__}, "
              f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}")
        print(f"memmap: x {x.shape} {x.dtype}, y {y.shape} {y.dtype}, {size_mb:.0f} MB under {args.scale_dir} "
              f"(written in {write_s:.1f} s); type {type(x).__name__}")

        keras.utils.set_random_seed(args.seed)
        inputs = keras.Input((16,))
        h = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32"))(inputs)
        for _ in range(args.scale_hidden_layers):
            h = keras.layers.Dense(args.scale_hidden, activation="relu")(h)
        model = keras_dpsgd.DPModel(inputs, keras.layers.Dense(10)(h))
        model.compile(optimizer=keras.optimizers.SGD(0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        kw = dict(batch_size=eb, epochs=1, l2_norm_clip=1.0, noise_multiplier=args.noise_multiplier,
                  physical_batch_size=p, verbose=0)
        t0 = time.perf_counter()
        model.fit(x, y, steps_per_epoch=3, seed=args.seed, **kw)  # builds, configures, compiles
        print(f"first fit (3 logical steps, compiles): {time.perf_counter() - t0:.1f} s")

        runner_cls = dp_backend.impl.Runner
        for label in ("cold", "warm"):
            evicted = _evict(xpath) and _evict(ypath) if label == "cold" else False
            wait_spans = []
            orig_lb = sampling.BatchFeeder.logical_batch

            def logical_batch(feeder, step, _orig=orig_lb, _spans=wait_spans):
                it = _orig(feeder, step)
                while True:
                    t0 = time.perf_counter()
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                    finally:
                        _spans.append((t0, time.perf_counter()))
                    yield batch

            sampling.BatchFeeder.logical_batch = logical_batch
            try:
                with _Intervals(sampling.PoissonSampler, "sample") as ts, \
                        _Intervals(sampling.RandomAccessData, "take") as tg, \
                        _Intervals(runner_cls, "run", main_too=True) as tr, \
                        (_Intervals(runner_cls, "prepare") if hasattr(runner_cls, "prepare")
                         else _Intervals(_Null, "f")) as tp:
                    t0 = time.perf_counter()
                    model.fit(x, y, steps_per_epoch=steps, **kw)
                    fit_s = time.perf_counter() - t0
            finally:
                sampling.BatchFeeder.logical_batch = orig_lb
            # The feeder draws ahead (a few logical steps past the last trained one, abandoned at
            # close): per logical step = time of the calls made / sample calls made (one per step).
            s_sp, g_sp = ts.spans, tg.spans
            host = s_sp + g_sp + tp.spans
            per = max(len(s_sp), 1)
            r = {
                "cache": label, "evicted": evicted, "N": n, "expected_batch": eb, "physical_batch": p,
                "logical_steps": steps, "physical_batches": len(tr.spans), "fit_s": fit_s,
                "ms_per_step": 1e3 * fit_s / steps,
                "sample_calls": len(ts.spans), "sample_ms_per_step": 1e3 * sum(b - a for a, b in s_sp) / per,
                "sample_ms_min": 1e3 * min((b - a for a, b in s_sp), default=0.0),
                "take_calls": len(tg.spans), "take_ms_per_step": 1e3 * sum(b - a for a, b in g_sp) / per,
                "prepare_ms_per_step": 1e3 * tp.total() / per,
                "run_ms_per_step": 1e3 * tr.total() / steps,
                "main_wait_ms_per_step": 1e3 * sum(b - a for a, b in wait_spans) / steps,
                "feeder_overlap_with_run": (_overlap(host, tr.spans) / max(sum(b - a for a, b in host), 1e-12)),
            }
            host_ms = r["sample_ms_per_step"] + r["take_ms_per_step"] + r["prepare_ms_per_step"]
            r["feeder_ms_per_step"] = host_ms
            r["hidden_fraction"] = max(0.0, 1.0 - r["main_wait_ms_per_step"] / host_ms) if host_ms else None
            r["sample_pct"] = 100 * r["sample_ms_per_step"] / r["ms_per_step"]
            r["take_pct"] = 100 * r["take_ms_per_step"] / r["ms_per_step"]
            rows.append(r)
    finally:
        for path in (xpath, ypath):
            if os.path.exists(path):
                os.remove(path)
        print(f"deleted {xpath} and {ypath}: {not os.path.exists(xpath) and not os.path.exists(ypath)}")

    print()
    hdr = (f"{'cache':<6} {'N':>11} {'E[B]':>6} {'ms/step':>8} {'ms sample':>10} {'% sample':>9} {'ms gather':>10} "
           f"{'% gather':>9} {'ms prepare':>11} {'ms run':>7} {'ms wait':>8} {'overlap':>8} {'hidden':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['cache']:<6} {r['N']:>11,} {r['expected_batch']:>6} {r['ms_per_step']:>8.2f} "
              f"{r['sample_ms_per_step']:>10.3f} {r['sample_pct']:>8.2f}% {r['take_ms_per_step']:>10.3f} "
              f"{r['take_pct']:>8.2f}% {r['prepare_ms_per_step']:>11.3f} {r['run_ms_per_step']:>7.2f} "
              f"{r['main_wait_ms_per_step']:>8.2f} {100 * r['feeder_overlap_with_run']:>7.1f}% "
              f"{100 * (r['hidden_fraction'] or 0):>6.1f}%")
    for r in rows:
        print(f"{r['cache']}: {r['sample_calls']} sample calls (the feeder draws ahead of the {r['logical_steps']} "
              f"trained steps), fastest {r['sample_ms_min']:.3f} ms; {r['take_calls']} gathers; "
              f"{r['physical_batches']} physical batches run")
    print("ms/step: fit wall time / logical steps. sample, gather (RandomAccessData.take), prepare (device "
          "placement) run on the feeder thread; 'ms wait': the main thread's wait for the next batch (the "
          "host cost not hidden behind the step); 'overlap': share of feeder time spent while the main "
          "thread was inside Runner.run (on JAX run only dispatches, the step computes asynchronously after it); "
          "'hidden': 1 - wait / (sample + gather + prepare), the share of feeder work not waited for.")
    print("note: shared 2-core CPU, timings are noisy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": BACKEND, "load_average_1min": os.getloadavg()[0], "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return rows


class _Null:
    f = staticmethod(lambda: None)


if __name__ == "__main__":
    if args.sampler_scale:
        sampler_scale()
    else:
        main()
