"""Fused ghost-clipping kernels (JAX Pallas, Triton on NVIDIA GPUs). Experimental.

`gram_norm` (per-example squared norms, below) and `clipped_sum` (the
book-keeping sum sum_i c_i A_i^T G_i, with the selection of dropped rows and
the scaling done on the tiles in registers instead of as separate passes over
the tapped tensors; ghost.SUM_KERNEL chooses it).

The Gram form of a sequence layer's per-example squared gradient norm,

    ||A_i^T G_i||_F^2 = sum_{t,s} (a_t . a_s) (g_t . g_s),   A_i (T, d_a), G_i (T, d_g),

is two batched T x T matrix products, an elementwise product and a sum when
written in XLA (`keras_dpsgd.ghost.LinearGrad`). On ViT-B/16 (T = 197) those
products run at a fraction of the GPU's matmul rate and write B x T x T
matrices that are read once (BENCHMARKS.md, run G). `gram_norm` computes the
same sum in one kernel: one program per (example, row tile, column tile) of
the symmetric T x T matrices, the upper triangle only (off-diagonal tiles
count twice), both tile products accumulated over the feature axis in
registers and reduced to one number. No T x T matrix reaches memory.

The products run at the default matmul precision (`jax_default_matmul_precision`:
TF32 for float32 unless "highest"), as the XLA form does.

`keras_dpsgd.ghost.GRAM_KERNEL` chooses it ("triton"; "interpret" runs the
same kernel through Pallas' interpreter, on any backend, for tests); the
default ("xla") keeps the XLA form. Under data parallelism `ghost` runs it
on each device's own rows (`jax.shard_map`). It is not the default until GPU
measurements show it faster (`tools/bench_gram.py`).
"""

import functools

import jax
import jax.numpy as jnp


def _feature_block(d):
    """Largest of 64, 32, 16 that divides d (None: not supported)."""
    for bk in (64, 32, 16):
        if d % bk == 0:
            return bk
    return None


def _row_block(t):
    """Row tile: 64 for long sequences, else the next power of two >= T (>= 16)."""
    if t >= 64:
        return 64
    return max(16, 1 << (t - 1).bit_length())


def supported(t, d_a, d_g):
    """Whether `gram_norm` takes these shapes (feature sizes multiples of 16, T > 1)."""
    return t > 1 and _feature_block(d_a) is not None and _feature_block(d_g) is not None


def _kernel(a_ref, g_ref, o_ref, *, t, bt, d_a, bk_a, d_g, bk_g):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when(i <= j)
    def _():
        rows_i = (i * bt + jnp.arange(bt) < t)[:, None]
        rows_j = (j * bt + jnp.arange(bt) < t)[:, None]

        def gram(ref, d, bk):
            def body(k, acc):
                x = plgpu.load(ref.at[pl.ds(i * bt, bt), pl.ds(k * bk, bk)], mask=rows_i, other=0.0)
                y = plgpu.load(ref.at[pl.ds(j * bt, bt), pl.ds(k * bk, bk)], mask=rows_j, other=0.0)
                return acc + jax.lax.dot_general(x, y, (((1,), (1,)), ((), ())),
                                                 preferred_element_type=jnp.float32)

            return jax.lax.fori_loop(0, d // bk, body, jnp.zeros((bt, bt), jnp.float32))

        s = jnp.sum(gram(a_ref, d_a, bk_a) * gram(g_ref, d_g, bk_g))
        o_ref[...] = jnp.where(i == j, s, 2.0 * s)

    @pl.when(i > j)
    def _():
        o_ref[...] = jnp.zeros((), jnp.float32)


def gram_norm(a, g, interpret=False, block_rows=None, block_features=None, num_warps=4, num_stages=2):
    """sum_{t,s} (a_t . a_s)(g_t . g_s) per row of a (N, T, d_a), g (N, T, d_g).

    float32 in and out; shapes must pass `supported`. Returns (N,).
    Tuning (`tools/bench_gram.py --sweep` times them): `block_rows`, the T
    tile (a power of two >= 16; default 64, or the next power of two >= T
    for short sequences); `block_features`, the feature chunk of each tile
    product (16, 32 or 64 dividing both feature sizes; default the largest
    that divides each); Triton's `num_warps` and `num_stages`.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    n, t, d_a = a.shape
    d_g = g.shape[2]
    if g.shape[:2] != (n, t) or not supported(t, d_a, d_g):
        raise ValueError(f"gram_norm: unsupported shapes {a.shape} and {g.shape}.")
    bt = block_rows or _row_block(t)
    bk_a, bk_g = (block_features, block_features) if block_features else (_feature_block(d_a), _feature_block(d_g))
    if bt < 16 or bt & (bt - 1) or d_a % bk_a or d_g % bk_g:
        raise ValueError(f"gram_norm: block_rows {bt} must be a power of two >= 16 and "
                         f"block_features {block_features} must divide {d_a} and {d_g}.")
    tiles = pl.cdiv(t, bt)
    kernel = functools.partial(_kernel, t=t, bt=bt, d_a=d_a, bk_a=bk_a, d_g=d_g, bk_g=bk_g)
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, tiles, tiles), jnp.float32),
        grid=(n, tiles, tiles),
        in_specs=[pl.BlockSpec((None, t, d_a), lambda e, i, j: (e, 0, 0)),
                  pl.BlockSpec((None, t, d_g), lambda e, i, j: (e, 0, 0))],
        out_specs=pl.BlockSpec((None, None, None), lambda e, i, j: (e, i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="dp_gram_norm",
    )(a.astype(jnp.float32), g.astype(jnp.float32))
    return jnp.sum(partial, axis=(1, 2))


# ----------------------------------------------------------------------------
# Book-keeping sum: sum_i c_i A_i^T G_i with dropped rows exactly zero.


def _out_block(d, want):
    """The largest of `want`, 64, 32, 16 (at most `want`) that divides d."""
    return next(b for b in (want, 64, 32, 16) if b <= want and d % b == 0)


def sum_supported(d_a, d_g):
    """Whether `clipped_sum` takes these feature sizes (multiples of 16)."""
    return _feature_block(d_a) is not None and _feature_block(d_g) is not None


def _sum_kernel(a_ref, g_ref, w_ref, k_ref, o_ref, *, rows, br, bm, bn):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    i, j = pl.program_id(0), pl.program_id(1)

    def body(r, acc):
        idx = r * br + jnp.arange(br)
        inside = idx < rows
        keep = plgpu.load(k_ref.at[pl.ds(r * br, br)], mask=inside, other=0) > 0
        w = plgpu.load(w_ref.at[pl.ds(r * br, br)], mask=inside, other=0.0)
        a = plgpu.load(a_ref.at[pl.ds(r * br, br), pl.ds(i * bm, bm)], mask=inside[:, None], other=0.0)
        g = plgpu.load(g_ref.at[pl.ds(r * br, br), pl.ds(j * bn, bn)], mask=inside[:, None], other=0.0)
        # where(), not a product: a dropped row may hold NaN or Inf (I4).
        a = jnp.where(keep[:, None], a, 0.0)
        g = jnp.where(keep[:, None], g * w[:, None], 0.0)
        return acc + jax.lax.dot_general(a, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    o_ref[...] = jax.lax.fori_loop(0, pl.cdiv(rows, br), body, jnp.zeros((bm, bn), jnp.float32))


def clipped_sum(a, g, factors, keep, interpret=False, block_rows=32, block_out=64, num_warps=4, num_stages=3):
    """sum_i [keep_i] c_i A_i^T G_i for a (N, T, d_a), g (N, T, d_g), factors
    c (N,), keep (N,) bool: the book-keeping sum of one dense-like layer in
    one kernel. Rows of dropped examples are selected away inside the kernel
    (exactly zero even if NaN), so neither input is rewritten in memory.
    Returns (d_a, d_g) float32. Tuning: `block_rows`, the rows per step of
    the contraction (examples x positions, flattened); `block_out`, the
    output tile's side (128, 64, 32 or 16; smaller where a feature size is
    not a multiple of it)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    n, t, d_a = a.shape
    d_g = g.shape[2]
    if g.shape[:2] != (n, t) or not sum_supported(d_a, d_g):
        raise ValueError(f"clipped_sum: unsupported shapes {a.shape} and {g.shape}.")
    bm, bn = _out_block(d_a, block_out), _out_block(d_g, block_out)
    rows = n * t
    a2 = jnp.reshape(a.astype(jnp.float32), (rows, d_a))
    g2 = jnp.reshape(g.astype(jnp.float32), (rows, d_g))
    w = jnp.repeat(factors.astype(jnp.float32), t)
    k = jnp.repeat(keep.astype(jnp.int32), t)
    kernel = functools.partial(_sum_kernel, rows=rows, br=block_rows, bm=bm, bn=bn)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((d_a, d_g), jnp.float32),
        grid=(d_a // bm, d_g // bn),
        in_specs=[pl.BlockSpec((rows, d_a), lambda i, j: (0, 0)),
                  pl.BlockSpec((rows, d_g), lambda i, j: (0, 0)),
                  pl.BlockSpec((rows,), lambda i, j: (0,)),
                  pl.BlockSpec((rows,), lambda i, j: (0,))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="dp_clipped_sum",
    )(a2, g2, w, k)
