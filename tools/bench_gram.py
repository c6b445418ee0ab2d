"""Micro-benchmark of the ghost-norm forms for one sequence layer (JAX only).

Ghost clipping's per-example squared norm of a dense layer's weight gradient
on a sequence, ||A_i^T G_i||_F^2 for A_i (T, d_in) and G_i (T, d_out), can be
computed as:

- ``gram``:        sum((A_i A_i^T) * (G_i G_i^T)), two batched T x T products
                   (what `keras_dpsgd.ghost.LinearGrad` does when it is cheaper);
- ``gram_blocked``: the same products split at T = 128 (T/2 for T <= 128) into the three blocks of
                   the symmetric T x T matrices (P = [:128, :128], Q = [:128, 128:],
                   R = [128:, 128:]; sum = <P,P'> + 2 <Q,Q'> + <R,R'>), for T just
                   above a 128 tile (ViT: T = 197);
- ``materialize``: A_i^T G_i formed (d_in x d_out per example), squared, summed;
- ``gram_highest``: ``gram`` with full float32 matmuls (no TF32);
- ``gram_bf16``:    ``gram`` with bf16 inputs and float32 accumulation (for
                   reference only: too coarse for a DP clip bound);
- ``fused``:       `keras_dpsgd.kernels.gram_norm`, one Pallas (Triton) kernel per
                   layer output, upper triangle only, no T x T matrix in memory
                   (on a GPU; through Pallas' interpreter with --tiny on CPU).

Also timed for scale: ``select_scale``, the `where(keep, c_i * G, 0)` pass over
one tapped tensor that the book-keeping sum reads; ``weight_grad``, the
one matmul A^T (c * G) of the book-keeping sum (= a non-private weight
gradient); ``xla_sum``, the whole book-keeping sum as `ghost.LinearGrad`
writes it (selects, scale, matmul); and ``fused_sum``,
`keras_dpsgd.kernels.clipped_sum` (the same in one Triton kernel; on a GPU or
interpreted with --tiny).

The rows are ViT-B/16's four kinds of sequence layer (T = 197 tokens, width
768, MLP 3072; q, k and v share their input's Gram), and the last column
multiplies by 12 blocks: the norm time of a whole ViT-B/16 step per form.

Usage (GPU machine):  python tools/bench_gram.py --batch 64 --precision tf32
                      python tools/bench_gram.py --tiny      # CPU smoke run
Prints a table; --json writes the numbers.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The fused forms import keras_dpsgd, hence Keras: on the JAX backend whatever the
# machine's default (the GPU machine has no TensorFlow).
os.environ.setdefault("KERAS_BACKEND", "jax")

# name, T, d_in, d_out widths (q, k, v: one input Gram, three output Grams), count per block
VIT_LAYERS = [
    ("qkv (3 x 768 -> 768)", 197, 768, [768, 768, 768], 1),
    ("attention out 768 -> 768", 197, 768, [768], 1),
    ("mlp in 768 -> 3072", 197, 768, [3072], 1),
    ("mlp out 3072 -> 768", 197, 3072, [768], 1),
]
TINY_LAYERS = [("tiny 16 -> 2 x 32", 9, 16, [32, 32], 1), ("tiny 32 -> 16, T 70", 70, 32, [16], 1)]


def forms(jax, jnp, fused=False, interpret=False):
    hi = jax.lax.Precision.HIGHEST

    def gram(a, gs, precision=None):
        aa = jnp.einsum("btd,bsd->bts", a, a, precision=precision)
        out = 0.0
        for g in gs:
            out = out + jnp.sum(aa * jnp.einsum("bte,bse->bts", g, g, precision=precision), axis=(1, 2))
        return out

    def gram_blocked(a, gs):
        t = a.shape[1]
        k = 128 if t > 128 else max(1, t // 2)  # --tiny: split anyway, to check the blocks

        def blocks(x):
            h, t = x[:, :k], x[:, k:]
            return (jnp.einsum("btd,bsd->bts", h, h), jnp.einsum("btd,bsd->bts", h, t),
                    jnp.einsum("btd,bsd->bts", t, t))

        pa, qa, ra = blocks(a)
        out = 0.0
        for g in gs:
            pg, qg, rg = blocks(g)
            out = out + (jnp.sum(pa * pg, axis=(1, 2)) + 2.0 * jnp.sum(qa * qg, axis=(1, 2))
                         + jnp.sum(ra * rg, axis=(1, 2)))
        return out

    def materialize(a, gs):
        out = 0.0
        for g in gs:
            out = out + jnp.sum(jnp.square(jnp.einsum("btd,bte->bde", a, g)), axis=(1, 2))
        return out

    def gram_bf16(a, gs):
        a = a.astype(jnp.bfloat16)
        aa = jnp.einsum("btd,bsd->bts", a, a, preferred_element_type=jnp.float32)
        out = 0.0
        for g in gs:
            g = g.astype(jnp.bfloat16)
            out = out + jnp.sum(aa * jnp.einsum("bte,bse->bts", g, g, preferred_element_type=jnp.float32),
                                axis=(1, 2))
        return out

    def select_scale(a, gs, keep, c):
        return [jnp.where(keep[:, None, None], g * c[:, None, None], 0.0) for g in gs]

    def weight_grad(a, gs, keep, c):
        return [jnp.einsum("btd,bte->de", a, g * c[:, None, None]) for g in gs]

    def xla_sum(a, gs, keep, c):
        """The book-keeping sum as keras_dpsgd.ghost.LinearGrad writes it in XLA."""
        k = keep[:, None, None]
        a = jnp.where(k, a, 0.0)
        return [jnp.einsum("btd,bte->de", a, jnp.where(k, g * c[:, None, None], 0.0)) for g in gs]

    def fused_sum(a, gs, keep, c):
        from keras_dpsgd import kernels

        return [kernels.clipped_sum(a, g, c, keep, interpret=interpret) for g in gs]

    def fused_kernel(a, gs):
        from keras_dpsgd import kernels

        out = 0.0
        for g in gs:
            out = out + kernels.gram_norm(a, g, interpret=interpret)
        return out

    norm_forms = {
        "gram": gram,
        "gram_blocked": gram_blocked,
        "materialize": materialize,
        "gram_highest": lambda a, gs: gram(a, gs, precision=hi),
        "gram_bf16": gram_bf16,
    }
    passes = {"select_scale": select_scale, "weight_grad": weight_grad, "xla_sum": xla_sum}
    if fused:
        norm_forms["fused"] = fused_kernel
        passes["fused_sum"] = fused_sum
    return norm_forms, passes


def timed(jax, fn, args, warmup, steps):
    f = jax.jit(fn)
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="examples per physical batch")
    p.add_argument("--precision", choices=["fp32", "tf32"], default="tf32",
                   help="default matmul precision (ghost norms run at it)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke run)")
    p.add_argument("--json", default=None)
    p.add_argument("--sweep", action="store_true",
                   help="also time both fused kernels over tile sizes, warps and stages per layer "
                        "(best first); --tiny sweeps block sizes only, interpreted")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest" if args.precision == "fp32" else "tensorfloat32")
    gpu = jax.default_backend() == "gpu"
    # The fused kernel needs a GPU (Triton); --tiny runs it interpreted.
    norm_forms, passes = forms(jax, jnp, fused=gpu or args.tiny, interpret=not gpu)
    layers = TINY_LAYERS if args.tiny else VIT_LAYERS
    b = 4 if args.tiny else args.batch
    rng = np.random.default_rng(0)
    rows = []
    for name, t, d_in, d_outs, count in layers:
        a = jnp.asarray(rng.normal(size=(b, t, d_in)).astype("float32"))
        gs = [jnp.asarray(rng.normal(size=(b, t, d)).astype("float32")) for d in d_outs]
        keep = jnp.asarray(rng.random(b) > 0.1)
        c = jnp.asarray(rng.random(b).astype("float32"))
        ref = np.asarray(jax.jit(lambda a, gs: norm_forms["gram"](a, gs, jax.lax.Precision.HIGHEST))(a, gs))
        row = {"layer": name, "T": t, "d_in": d_in, "d_out": d_outs, "per_block": count, "ms": {},
               "max_rel_err": {}}
        gram_flops = 2 * b * t * t * (d_in + sum(d_outs))
        for fname, fn in norm_forms.items():
            row["ms"][fname] = 1e3 * timed(jax, fn, (a, gs), args.warmup, args.steps)
            got = np.asarray(jax.jit(fn)(a, gs))
            row["max_rel_err"][fname] = float(np.max(np.abs(got - ref) / np.abs(ref)))
        for fname, fn in passes.items():
            row["ms"][fname] = 1e3 * timed(jax, fn, (a, gs, keep, c), args.warmup, args.steps)
        if "fused_sum" in passes:  # the fused book-keeping sum against XLA's, largest relative difference
            ref_sum = np.concatenate([np.ravel(s) for s in jax.jit(passes["xla_sum"])(a, gs, keep, c)])
            got_sum = np.concatenate([np.ravel(s) for s in jax.jit(passes["fused_sum"])(a, gs, keep, c)])
            row["fused_sum_rel_err"] = float(np.max(np.abs(got_sum - ref_sum)) / np.max(np.abs(ref_sum)))
        row["gram_tflops"] = gram_flops / (row["ms"]["gram"] * 1e-3) / 1e12
        rows.append(row)

    device = f"{jax.devices()[0].platform}:{getattr(jax.devices()[0], 'device_kind', '')}"
    names = list(norm_forms) + list(passes)
    print(f"# {device}, jax {jax.__version__}, batch {b}, {args.precision}; ms per call (median of {args.steps})")
    print(f"{'layer':<26}" + "".join(f"{n:>14}" for n in names) + f"{'gram TFLOP/s':>14}")
    total = {n: 0.0 for n in names}
    for r in rows:
        print(f"{r['layer']:<26}" + "".join(f"{r['ms'][n]:>14.3f}" for n in names) + f"{r['gram_tflops']:>14.1f}")
        for n in names:
            total[n] += r["ms"][n] * r["per_block"]
    blocks = 1 if args.tiny else 12
    print(f"{'x ' + str(blocks) + ' blocks':<26}" + "".join(f"{blocks * total[n]:>14.2f}" for n in names))
    print("max relative error of the norms vs float32 (highest):")
    for r in rows:
        print(f"  {r['layer']:<24}" + "".join(f" {n}={r['max_rel_err'][n]:.1e}" for n in norm_forms))
    sweep = sweep_fused(jax, jnp, np, layers, b, args, interpret=not gpu) if args.sweep else None
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": device, "jax": jax.__version__, "batch": b, "precision": args.precision,
                       "blocks": blocks, "rows": rows,
                       "per_step_ms": {n: blocks * total[n] for n in names}, "sweep": sweep}, f, indent=2)
    return rows


def sweep_configs(tiny, kernel="norm"):
    """Keyword configurations of `kernels.gram_norm` ("norm") or
    `kernels.clipped_sum` ("sum") to try."""
    if kernel == "norm":
        if tiny:  # interpreted: warps and stages do nothing
            grid = [(16, 16, 4, 2), (32, 16, 4, 2)]
        else:
            grid = [(bt, bk, w, st) for bt in (32, 64, 128) for bk in (32, 64) for w in (4, 8) for st in (2, 3)]
        return [{"block_rows": bt, "block_features": bk, "num_warps": w, "num_stages": st} for bt, bk, w, st in grid]
    if tiny:
        grid = [(16, 16, 4, 2), (32, 16, 4, 2)]
    else:
        grid = [(br, bo, w, st) for br in (32, 64) for bo in (64, 128) for w in (4, 8) for st in (2, 3)]
    return [{"block_rows": br, "block_out": bo, "num_warps": w, "num_stages": st} for br, bo, w, st in grid]


def _sweep_one(jax, np, fn_of, args_, ref, configs, args):
    results = []
    for cfg in configs:
        fn = fn_of(cfg)
        try:
            ms = 1e3 * timed(jax, fn, args_, args.warmup, args.steps)
            got = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(jax.jit(fn)(*args_))])
            err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
            results.append({"config": cfg, "ms": ms, "max_rel_err": err})
        except Exception as e:  # a configuration the compiler refuses (registers, shared memory)
            results.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    results.sort(key=lambda r: r.get("ms", float("inf")))
    return results


def sweep_fused(jax, jnp, np, layers, b, args, interpret):
    """Times `kernels.gram_norm` and `kernels.clipped_sum` per layer and
    configuration; prints the best few; returns
    {layer: {"norm" | "sum": [{config, ms, max_rel_err} | {config, error}]}} (fastest first)."""
    from keras_dpsgd import kernels

    rng = np.random.default_rng(1)
    hi = jax.lax.Precision.HIGHEST
    out = {}
    for name, t, d_in, d_outs, _ in layers:
        a = jnp.asarray(rng.normal(size=(b, t, d_in)).astype("float32"))
        gs = [jnp.asarray(rng.normal(size=(b, t, d)).astype("float32")) for d in d_outs]
        keep = jnp.asarray(rng.random(b) > 0.1)
        c = jnp.asarray(rng.random(b).astype("float32"))
        aa = jnp.einsum("btd,bsd->bts", a, a, precision=hi)
        norm_ref = np.asarray(sum(jnp.sum(aa * jnp.einsum("bte,bse->bts", g, g, precision=hi), axis=(1, 2))
                                  for g in gs))
        k = keep[:, None, None]
        sum_ref = np.concatenate([np.ravel(jnp.einsum("btd,bte->de", jnp.where(k, a, 0.0),
                                                      jnp.where(k, g * c[:, None, None], 0.0), precision=hi))
                                  for g in gs])

        def norm_fn(cfg):
            return lambda a, gs: sum(kernels.gram_norm(a, g, interpret=interpret, **cfg) for g in gs)

        def sum_fn(cfg):
            return lambda a, gs, c, keep: [kernels.clipped_sum(a, g, c, keep, interpret=interpret, **cfg)
                                           for g in gs]

        out[name] = {
            "norm": _sweep_one(jax, np, norm_fn, (a, gs), norm_ref, sweep_configs(args.tiny, "norm"), args),
            "sum": _sweep_one(jax, np, sum_fn, (a, gs, c, keep), sum_ref, sweep_configs(args.tiny, "sum"), args),
        }
        for kind, results in out[name].items():
            print(f"sweep {kind} {name}:")
            for r in results[:4]:
                cfg = " ".join(f"{k.replace('block_', '').replace('num_', '')} {v}" for k, v in r["config"].items())
                what = f"{r['ms']:.3f} ms (err {r['max_rel_err']:.1e})" if "ms" in r else r["error"]
                print(f"  {cfg}: {what}")
            failed = sum("error" in r for r in results)
            if failed:
                print(f"  ({failed} of {len(results)} configurations failed)")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
