"""Data-parallel scaling on k GPUs: keras-dpsgd vs non-private Keras (JAX).

For each k in --gpus, one subprocess sees GPUs 0..k-1 (CUDA_VISIBLE_DEVICES)
and runs, under keras.distribution.DataParallel over all k:
- keras-dpsgd: `DPModel.fit` with Poisson sampling, expected logical batch
  --logical-batch, physical batch --per-gpu * k (each GPU clips its own rows,
  one all-reduce per logical step); throughput = real examples / wall time of
  the logical steps after the first (which compiles);
- non-private Keras: the jitted train step of `keras.Model` on a fixed global
  batch of --per-gpu * k rows already on the devices (all-reduce every step);
  throughput = batch / median step time after warm-up.
Scaling efficiency = T_k / (k * T_1). Prints a table, writes JSON; with
matplotlib installed also a PNG (efficiency and throughput vs GPUs).

Usage (GPU machine):
    python tools/bench_scaling.py --gpus 1,2,4 --model vit_b16 --logical-batch 8192
    python tools/bench_scaling.py --tiny --gpus 1,2    # CPU, forced host devices
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(args):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from tools import bench

    jax, keras, counter = bench.jax_setup(args)
    import numpy as np

    k = len(jax.devices())
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
    spec = bench.model_spec(args.model, args.tiny)
    rec = {"gpus": k, "model": args.model, "device": bench.jax_device(jax), "per_gpu": args.per_gpu}
    phys = args.per_gpu * k
    xb, yb = bench.make_data(spec, max(phys, 256), "nhwc")

    # Non-private: jitted stateless step on a fixed global batch.
    base = bench.build_keras_model(args.model, spec)
    base.compile(optimizer=keras.optimizers.SGD(0.01),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    base.fit(xb[:phys], yb[:phys], batch_size=phys, epochs=1, verbose=0)  # builds and compiles
    from keras.src.backend.jax.trainer import _distribute_data

    data = _distribute_data((xb[:phys], yb[:phys]))
    state = base._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                optimizer_variables=True, metrics_variables=True)
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        logs, state = base.train_function(state, iter([data]))
        jax.block_until_ready(state[0])
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    rec["nonprivate_examples_per_s"] = phys / statistics.median(times)
    del base, state

    # keras-dpsgd: Poisson fit with one all-reduce per logical step.
    keras.utils.set_random_seed(0)
    _, _, model = bench.private_model(args)
    n = int(args.logical_batch / args.sampling_rate)
    x_all = bench.SyntheticRows(n, xb)
    y_all = np.random.default_rng(1).integers(0, spec["classes"], size=(n,), dtype=np.int32)
    timer = bench.FitTimer(jax, counter)
    traced = _trace_fit_window(jax, args, k)
    # With a trace, one more logical step runs after the timed ones and is
    # traced there: the profiler's own cost (seconds to collect and write a
    # multi-GPU trace) stays out of the timed steps.
    extra = 1 if args.profile_dir else 0
    model.fit(x_all, y_all, batch_size=args.logical_batch, epochs=1, steps_per_epoch=args.logical_steps + extra,
              l2_norm_clip=1.0, noise_multiplier=1.0, physical_batch_size=phys, seed=0, verbose=0,
              callbacks=[timer], **({"clipping": args.clipping} if args.clipping else {}))
    from keras_dpsgd import sampling

    sampler = sampling.PoissonSampler(n, args.logical_batch / n, model.optimizer.config_values()["sampler_seed_words"])
    times = timer.times[:args.logical_steps]
    sizes = [len(sampler.sample(t)) for t in range(len(times))]
    steady = list(zip(sizes, times))[1:]
    if any(timer.compiled[1:args.logical_steps]):
        print(f"# warning: a timed logical step compiled: {timer.compiled}", flush=True)
    rec["dp_compiled_per_step"] = list(timer.compiled)
    rec["dp_examples_per_s"] = sum(s for s, _ in steady) / sum(t for _, t in steady)
    rec["dp_step_s"] = [round(t, 3) for t in times]
    if extra:
        rec["dp_traced_step_s"] = round(timer.times[-1], 3)
    rec["dp_logical_sizes"] = sizes
    rec["dp_physical_batch"] = phys
    rec["dp_shards"] = model.optimizer.num_shards
    rec["compiles"] = counter.summary()
    traced()
    print("RESULT " + json.dumps(rec), flush=True)


def _trace_fit_window(jax, args, k):
    """With --profile-dir: trace --profile-batches physical batches of the
    extra, untimed logical step that ends the fit (Perfetto JSON in <dir>/gpus<k>; summarize
    with tools/profile_summary.py --gaps). Returns a function that stops a
    trace still running."""
    if not args.profile_dir:
        return lambda: None
    from keras_dpsgd.backend import jax as jax_backend

    import numpy as np

    run = jax_backend.Runner.run
    state = {"logical": 0, "in_step": 0, "traced": 0, "on": False}

    def traced_run(self, data):
        last = bool(np.asarray(jax.device_get(data[4])).reshape(-1)[0])
        state["in_step"] += 1
        # From the 2nd physical batch of the last logical step on.
        if (state["logical"] == args.logical_steps and state["in_step"] == 2 and not state["on"]
                and not state["traced"]):
            jax.profiler.start_trace(os.path.join(args.profile_dir, f"gpus{k}"), create_perfetto_trace=True)
            state["on"] = True
        out = run(self, data)
        if state["on"]:
            state["traced"] += 1
            if state["traced"] >= args.profile_batches or last:
                jax.block_until_ready(self.state)
                jax.profiler.stop_trace()
                state["on"] = False
        if last:
            state["logical"] += 1
            state["in_step"] = 0
        return out

    jax_backend.Runner.run = traced_run

    def stop():
        if state["on"]:
            jax.profiler.stop_trace()
            state["on"] = False

    return stop


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="1,2,4")
    p.add_argument("--model", default="vit_b16")
    p.add_argument("--per-gpu", type=int, default=64, help="physical rows per GPU")
    p.add_argument("--logical-batch", type=float, default=8192.0, help="expected logical batch q*N")
    p.add_argument("--sampling-rate", type=float, default=0.5, help="q (sets N)")
    p.add_argument("--logical-steps", type=int, default=3, help="the first one (compile) is not timed")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="tf32")
    p.add_argument("--clipping", default=None)
    p.add_argument("--tiny", action="store_true", help="small model on forced CPU devices")
    p.add_argument("--jax-cache-dir", default=None)
    p.add_argument("--json", default="out/scaling.json")
    p.add_argument("--profile-dir", default=None,
                   help="trace a few physical batches of the timed logical step (one trace per GPU count)")
    p.add_argument("--profile-batches", type=int, default=6)
    p.add_argument("--merge", default=None,
                   help="comma list of JSON files from earlier runs (e.g. one per GPU count): "
                        "print and plot them together into --json, run nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    results = []
    if args.merge:
        for path in args.merge.split(","):
            if not os.path.exists(path):
                print(f"# {path}: missing (that run did not finish), left out", flush=True)
                continue
            with open(path) as f:
                results.extend(json.load(f)["results"])
        results.sort(key=lambda r: r["gpus"])
        return report(args, results)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    for k in [int(g) for g in args.gpus.split(",")]:
        env = dict(os.environ, KERAS_BACKEND="jax", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        if args.tiny:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={k}"
            env["JAX_PLATFORMS"] = "cpu"
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(k))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker"] + [a for a in (argv or sys.argv[1:])]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results.append({"gpus": k, "error": (proc.stderr or proc.stdout)[-2000:]})
            print(f"{k} GPU(s): FAILED\n{results[-1]['error']}", flush=True)
            continue
        r = json.loads(lines[-1][7:])
        r["wall_s"] = time.perf_counter() - t
        results.append(r)
        print(f"{k} GPU(s) done in {r['wall_s']:.0f} s: DP {r['dp_examples_per_s']:.1f} ex/s, "
              f"non-private {r['nonprivate_examples_per_s']:.1f} ex/s", flush=True)
        with open(args.json, "w") as f:  # after every configuration, in case a later one is cut off
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return report(args, results)


def report(args, results):
    """Efficiencies against the 1-GPU row; table on stdout; JSON and PNG at --json."""
    ok = [r for r in results if "error" not in r]
    one = next((r for r in ok if r["gpus"] == 1), None)
    print(f"\n{'GPUs':>4} {'DP ex/s':>10} {'DP eff':>7} {'non-priv ex/s':>14} {'non-priv eff':>12}  device")
    for r in ok:
        if one:
            r["dp_efficiency"] = r["dp_examples_per_s"] / (r["gpus"] * one["dp_examples_per_s"])
            r["nonprivate_efficiency"] = r["nonprivate_examples_per_s"] / (r["gpus"] * one["nonprivate_examples_per_s"])
        print(f"{r['gpus']:>4} {r['dp_examples_per_s']:>10.1f} {r.get('dp_efficiency', float('nan')):>7.3f} "
              f"{r['nonprivate_examples_per_s']:>14.1f} {r.get('nonprivate_efficiency', float('nan')):>12.3f}  {r['device']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if ok and one:
            fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
            g = [r["gpus"] for r in ok]
            ax[0].plot(g, [r["dp_efficiency"] for r in ok], "o-", label="keras-dpsgd (Poisson, masked)")
            ax[0].plot(g, [r["nonprivate_efficiency"] for r in ok], "s--", label="Keras, not private")
            ax[0].set(xlabel="GPUs", ylabel="scaling efficiency T_k / (k T_1)", ylim=(0, 1.05), xticks=g)
            ax[0].legend(fontsize=8)
            ax[1].plot(g, [r["dp_examples_per_s"] for r in ok], "o-", label="keras-dpsgd")
            ax[1].plot(g, [r["nonprivate_examples_per_s"] for r in ok], "s--", label="Keras, not private")
            ax[1].set(xlabel="GPUs", ylabel="examples / s", xticks=g)
            fig.suptitle(f"{args.model}, {args.per_gpu} rows per GPU, logical batch {args.logical_batch:g}")
            fig.tight_layout()
            fig.savefig(os.path.splitext(args.json)[0] + ".png", dpi=120)
    except ImportError:
        pass
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
