"""Ghost clipping with book-keeping for Keras models on JAX (DESIGN.md section 5).

The vectorized path materializes every example's gradient of every weight
(B copies of the model's gradient). Ghost clipping (Li et al. 2022, "ghost
norm"; Bu et al., ICML 2023, "book-keeping") gets the same clipped sum from
two per-layer quantities: the layer's input a_i and the gradient g_i of the
example's loss w.r.t. the layer's (pre-activation) output:

- per-example squared norms of each weight's gradient, without forming it:
  for a dense layer on a vector input ||a_i g_i^T||^2 = ||a_i||^2 ||g_i||^2;
  on a sequence (T positions) either the Gram form <a_i a_i^T, g_i g_i^T>
  (cost T^2 (d_in + d_out)) or the materialized a_i^T g_i (cost T d_in d_out),
  whichever is cheaper for that layer;
- the clipped sum sum_i c_i a_i^T g_i as ONE weighted matmul over the batch
  (book-keeping: no second backward pass).

How a and g are obtained (JAX): the per-example forward (the same vmapped,
batch-of-one `compute_loss_and_updates` as the vectorized path, so losses,
predictions and dropout keys are identical) runs with every ruled layer's
`call` temporarily wrapped: the wrapper records the layer's input and adds a
zero "tap" to its (pre-activation) output. The gradient w.r.t. the taps is g;
it costs a backward pass through the activations only. Weights of layers
without a rule, weights with a regularizer, weights held by several layers,
and weights the forward reads outside their own layer's call (tied weights;
found by `discover` in the jaxpr) fall back to per-example gradients, taken
in the same vmapped pass for those weights only. The per-example norm is the
exact total over all trainable weights (flat clipping, I3); masked and
non-finite rows get c_i = 0 and are removed with `where` (I4), as in
`keras_dpsgd.clipping`. Norms and sums are float32 whatever the dtype policy.

Rules are registered per exact layer class (a subclass may change `call`):
Dense, EinsumDense, Embedding, ReversibleEmbedding (also keras-hub's
unchanged subclass), LayerNormalization, GroupNormalization,
RMSNormalization, Conv1D/2D/3D; keras-hub's PositionEmbedding and
RMSNormalization.
`register_rule` adds more. Norm and sum rules use keras.ops;
the tracing machinery and the convolution pieces (patches, weight
gradients) use JAX.
"""

import contextlib
import logging
import math
import string
from typing import NamedTuple

import jax
import jax.numpy as jnp
import keras
import numpy as np
from keras import ops
from keras import tree

from keras_dpsgd import clipping
from keras_dpsgd.backend import common

logger = logging.getLogger("keras_dpsgd")

# "auto": Gram form vs materialized a_i^T g_i by cost, per layer. Tests force
# "gram" or "materialize" to check both forms.
NORM_METHOD = "auto"

# The Gram form's kernel: "xla" (two batched matmuls, default), "triton" (the
# fused Pallas kernel of keras_dpsgd.kernels on NVIDIA GPUs, each device on
# its own rows under data parallelism; other backends use the XLA form) or
# "interpret" (the same kernel through Pallas' interpreter, any backend: tests).
GRAM_KERNEL = "xla"
# The book-keeping sum's kernel, same choices: "triton" runs
# keras_dpsgd.kernels.clipped_sum (select, scale and matmul in one pass).
SUM_KERNEL = "xla"

# When every row's squared norm is finite, the book-keeping sums of dense-like
# layers (Dense, EinsumDense, convolutions) skip the per-row `where` selects
# (I4) and scale one operand by c_i (0 for padded and dropped rows, which are
# then finite, so they add exactly 0). One on-device branch (lax.cond) on all(isfinite(norms)) picks this path
# or the selecting one; both are compiled. Off under data parallelism (the
# predicate would need an all-reduce) and for tests of the selecting path.
# Also off when every such layer's taps are 16-bit (mixed precision): the sums
# cast them to float32 anyway and the selects fuse into those casts
# (materialized per-example gradients excepted), so the fast path saves
# little, while XLA:GPU runs a conditional outside CUDA graphs by copying the
# predicate to the host and blocking the host until the GPU reaches it
# (ConditionalThunk). On an H200, ResNet-18-GN (mixed_bfloat16, batch 256)
# ran 22 % faster synchronized and 38 % faster pipelined without the branch
# (BENCHMARKS.md, sixth session, run V). In float32 (TF32) the branch pays:
# ViT-B/16 3.5 % faster than the plain selects, ResNet-18-GN the same, and a
# branch-free variant (scale-and-select one operand, scatter zeros into the
# other's dropped rows) was slower than both (seventh session, run W).
FINITE_FAST_PATH = True

# Under a mixed-precision policy the taps (layer inputs, output gradients) are
# 16-bit floats. True: they enter the norm products (Gram form, materialized
# a_i^T g_i) as they are, with float32 accumulation. That gives the same
# numbers as casting them to float32 first (a product of two 16-bit floats is
# exact in float32, also in TF32), at half the memory traffic and, on GPUs, at
# the 16-bit matmul rate. The book-keeping sums always cast to float32: their
# scaled operand c_i a_i must not be rounded to 16 bits (it would loosen the
# clip bound). False casts the taps for the norms too (tests, A/B runs).
HALF_PRECISION_NORM_PRODUCTS = True

# clipping="auto" picks ghost when the fallback (per-example gradients) holds
# at most this fraction of the trainable parameters.
AUTO_MAX_FALLBACK_FRACTION = 0.25


class GhostUnsupportedError(ValueError):
    """A ruled layer was used in a way its rule does not cover."""


# --------------------------------------------------------------------------
# Per-example gradient representations: each gives per-example squared norms
# (float32, (B,)) and the clipped, masked sum as per-shard partial sums
# (float32, (shards, *weight_shape); shards = 1 without data parallelism).


def _expand(v, ndim):
    return ops.reshape(v, (-1,) + (1,) * (ndim - 1))


def _select(t, keep):
    """where(keep_i, t_i, 0): a dropped row is exactly zero even if NaN (I4)."""
    return ops.where(_expand(keep, len(t.shape)), t, ops.zeros_like(t))


def _shard(t, shards):
    """(B, ...) -> (shards, B / shards, ...): contiguous row groups, one per device."""
    return ops.reshape(t, (shards, -1) + tuple(t.shape[1:]))


def _use_gram(t, d_in, d_out):
    if NORM_METHOD != "auto":
        return NORM_METHOD == "gram"
    # Gram: T^2 (d_in + d_out) flops, B T^2 memory; materialize: T d_in d_out
    # flops, B d_in d_out memory.
    return t * (d_in + d_out) < d_in * d_out


def _fused_gram(t, d_in, d_out):
    """Whether the Gram norm goes to keras_dpsgd.kernels (GRAM_KERNEL)."""
    from keras_dpsgd import kernels

    return _use_kernel(GRAM_KERNEL, "GRAM_KERNEL") and kernels.supported(t, d_in, d_out)


def _use_kernel(setting, name):
    if setting == "xla":
        return False
    if setting not in ("triton", "interpret"):
        raise ValueError(f"{name} must be 'xla', 'triton' or 'interpret', got {setting!r}.")
    return setting == "interpret" or jax.default_backend() == "gpu"


def _per_device(fn, *args):
    """fn on all rows, or under data parallelism on each device's own rows
    (shard_map: GSPMD cannot split a Pallas call and would gather the batch
    onto every device); fn's outputs are batch-first."""
    from keras_dpsgd.backend import jax as jax_backend

    dist, shards = jax_backend._data_parallel()
    if dist is None or shards == 1:
        return fn(*args)
    spec = jax.sharding.PartitionSpec(dist.batch_dim_name)
    return jax.shard_map(fn, mesh=dist.device_mesh.backend_mesh, in_specs=(spec,) * len(args), out_specs=spec,
                         check_vma=False)(*args)


def _fused_clipped_sum(a, g, factors, keep):
    """kernels.clipped_sum per device: (shards, d_in, d_out) partial sums."""
    from keras_dpsgd import kernels

    def local(a, g, factors, keep):
        return kernels.clipped_sum(a, g, factors, keep, interpret=SUM_KERNEL == "interpret")[None]

    return _per_device(local, a, g, factors, keep)


def _fused_gram_norm(a, g):
    """kernels.gram_norm on (N, T, d) rows; under data parallelism each device
    runs it on its own rows (shard_map: GSPMD cannot split a Pallas call and
    would gather the batch onto every device)."""
    import functools

    from keras_dpsgd import kernels

    return _per_device(functools.partial(kernels.gram_norm, interpret=GRAM_KERNEL == "interpret"), a, g)


def _gram_sq_norm(a, g):
    """sum over groups of <a_i a_i^T, g_i g_i^T> for A (B, k, T, d_in), G (B, k, T, d_out).

    (Splitting T into blocks and forming only the upper-triangular block
    products of these symmetric Grams was 11 % slower per ViT-B/16 step on
    an H200 than one T x T product, BENCHMARKS.md, fourth session.)"""
    aa = _product("bktd,bksd->bkts", a, a)
    gg = _product("bkte,bkse->bkts", g, g)
    return ops.sum(aa * gg, axis=(1, 2, 3))


def _product(spec, x, y):
    """einsum accumulated in float32; 16-bit operands stay 16-bit
    (HALF_PRECISION_NORM_PRODUCTS), others are cast to float32."""
    if not HALF_PRECISION_NORM_PRODUCTS or x.dtype != y.dtype or not _is_half(x):
        x, y = _f32(x), _f32(y)
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


def _is_half(t):
    return t.dtype in (jnp.bfloat16, jnp.float16)


def _taps(t):
    """A tap for LinearGrad: 16-bit floats as they are (LinearGrad casts
    where it needs float32), anything else as float32."""
    return t if _is_half(t) else _f32(t)


class LinearGrad:
    """Per-example gradient a_i^T g_i (per group) of a dense-like weight.

    A: (B, groups, T, d_in), G: (B, groups, T, d_out), float32 or (under a
    mixed-precision policy) 16-bit floats: the norm products accumulate in
    float32 (`_product`), the sums cast to float32 first.
    `to_weight` maps (shards, groups, d_in, d_out) sums to (shards, *weight_shape).
    The norm uses the Gram form, or forms a_i^T g_i when that is cheaper
    (then reused for the sum); otherwise the sum is one weighted matmul.
    """

    finite_fast_path = True  # clipped_sum(..., finite=True): see FINITE_FAST_PATH

    def __init__(self, a, g, to_weight):
        self.a, self.g, self.to_weight = a, g, to_weight
        self.materialized = None

    @property
    def half_taps(self):
        """Both operands 16-bit: the selecting sum costs what the finite fast
        path costs (see FINITE_FAST_PATH)."""
        return _is_half(self.a) and _is_half(self.g)

    def sq_norm(self):
        a, g = self.a, self.g
        t, d_in, d_out = a.shape[2], a.shape[3], g.shape[3]
        if t == 1:
            a, g = _f32(a), _f32(g)
            return ops.sum(ops.sum(ops.square(a), axis=(2, 3)) * ops.sum(ops.square(g), axis=(2, 3)), axis=1)
        if _use_gram(t, d_in, d_out):
            if _fused_gram(t, d_in, d_out):
                b, k = a.shape[0], a.shape[1]
                a, g = _f32(a), _f32(g)
                sq = _fused_gram_norm(ops.reshape(a, (b * k, t, d_in)), ops.reshape(g, (b * k, t, d_out)))
                return ops.sum(ops.reshape(sq, (b, k)), axis=1)
            return _gram_sq_norm(a, g)
        # Cheaper to form a_i^T g_i (small next to the activations); it is
        # then reused for the sum.
        self.materialized = _product("bktd,bkte->bkde", a, g)
        return ops.sum(ops.square(self.materialized), axis=(1, 2, 3))

    def clipped_sum(self, factors, keep, shards, finite=False):
        """sum_i where(keep_i, c_i a_i^T g_i, 0) per shard. With `finite` (the
        caller checked that every row's norm, hence every row of a and g, is
        finite) the selects are left out and only the smaller operand is
        scaled: dropped rows have c_i = 0 and add exactly 0."""
        if self.materialized is not None:
            if finite:
                s = ops.einsum("nb,nbkde->nkde", _shard(factors, shards), _shard(self.materialized, shards))
            else:
                s = clipping.weighted_sum([self.materialized], factors, keep, shards)[0]
            return self.to_weight(s)
        if self.a.shape[1] == 1 and _use_kernel(SUM_KERNEL, "SUM_KERNEL"):
            from keras_dpsgd import kernels

            if kernels.sum_supported(self.a.shape[3], self.g.shape[3]):
                s = _fused_clipped_sum(_f32(self.a[:, 0]), _f32(self.g[:, 0]), factors, keep)
                return self.to_weight(ops.expand_dims(s, 1))
        a, g = _f32(self.a), _f32(self.g)
        c = _expand(factors, 4)
        if not finite:
            a, g = _select(a, keep), _select(g * c, keep)
        elif math.prod(a.shape[2:]) <= math.prod(g.shape[2:]):
            a = a * c
        else:
            g = g * c
        if a.shape[1] == 1:
            # One contracting axis (rows x positions): a plain GEMM per shard.
            a = ops.reshape(a, (shards, -1, a.shape[3]))
            g = ops.reshape(g, (shards, -1, g.shape[3]))
            return self.to_weight(ops.expand_dims(ops.einsum("nrd,nre->nde", a, g), 1))
        return self.to_weight(ops.einsum("nbktd,nbkte->nkde", _shard(a, shards), _shard(g, shards)))


class PerExampleGrad:
    """A small weight's per-example gradient, materialized: (B, *weight_shape)."""

    def __init__(self, grads):
        self.grads = ops.cast(grads, "float32")

    def sq_norm(self):
        return clipping.per_example_sq_norms([self.grads])

    def clipped_sum(self, factors, keep, shards):
        return clipping.weighted_sum([self.grads], factors, keep, shards)[0]


class EmbeddingGrad:
    """Per-example gradient of an embedding table: rows g_it scatter-added at
    ids_it (repeated ids within an example add up).

    ||grad_i||^2 = sum_{t,t'} [id_t == id_t'] <g_t, g_t'>; the sum is one
    segment-sum of c_i g_it over all (i, t).
    """

    def __init__(self, ids, g, vocab):
        self.ids, self.g, self.vocab = ids, g, vocab  # (B, T) int32, (B, T, D) f32

    def sq_norm(self):
        if self.ids.shape[1] == 1:
            return ops.sum(ops.square(self.g), axis=(1, 2))
        same = ops.expand_dims(self.ids, 2) == ops.expand_dims(self.ids, 1)
        gg = ops.einsum("btd,bsd->bts", self.g, self.g)
        return ops.sum(ops.where(same, gg, ops.zeros_like(gg)), axis=(1, 2))

    def clipped_sum(self, factors, keep, shards):
        g = _select(self.g * _expand(factors, 3), keep)
        d = g.shape[-1]
        # Shard n's rows go to segments [n V, (n + 1) V).
        ids = _shard(self.ids, shards) + ops.reshape(ops.arange(shards, dtype="int32") * self.vocab, (-1, 1, 1))
        s = ops.segment_sum(ops.reshape(g, (-1, d)), ops.reshape(ids, (-1,)),
                            num_segments=shards * self.vocab)
        return ops.reshape(s, (shards, self.vocab, d))


class RowsGrad:
    """Per-example gradient that is `rows` (B, T, d) at rows [start, start + T)
    of a (num_rows, d) table and zero elsewhere (distinct rows)."""

    def __init__(self, rows, start, num_rows):
        self.rows, self.start, self.num_rows = rows, start, num_rows

    def sq_norm(self):
        return ops.sum(ops.square(self.rows), axis=(1, 2))

    def clipped_sum(self, factors, keep, shards):
        s = ops.sum(_shard(_select(self.rows * _expand(factors, 3), keep), shards), axis=1)
        return ops.pad(s, [[0, 0], [self.start, self.num_rows - self.start - s.shape[1]], [0, 0]])


class ZeroGrad:
    """A ruled weight whose layer was not called: zero gradient."""

    def __init__(self, batch, shape):
        self.batch, self.shape = batch, tuple(shape)

    def sq_norm(self):
        return ops.zeros((self.batch,), "float32")

    def clipped_sum(self, factors, keep, shards):
        return ops.zeros((shards,) + self.shape, "float32")


# --------------------------------------------------------------------------
# Rules. `calls` is a list of (a, g) per call of the layer in the forward,
# each with the example axis first: a is the layer's input as its `call`
# received it (B, *input_shape_seen_by_call), g the gradient w.r.t. the
# tapped output (B, *output_shape). `roles` are the weights to produce.


def _f32(t):
    return ops.cast(t, "float32")


def _merge_example_axis(t):
    """(B, n, ...) -> (B*n, ...): the vmapped example axis with the layer's own batch axis."""
    return ops.reshape(t, (-1,) + tuple(t.shape[2:]))


def _unbroadcast(t, shape):
    """Sum t (B, *s) down to (B, *shape), where `shape` broadcasts to s (right-aligned)."""
    lead = len(t.shape) - 1 - len(shape)
    if lead > 0:
        t = ops.sum(t, axis=tuple(range(1, 1 + lead)))
    axes = tuple(i + 1 for i, n in enumerate(shape) if n == 1 and t.shape[i + 1] != 1)
    if axes:
        t = ops.sum(t, axis=axes, keepdims=True)
    return ops.reshape(t, (-1,) + tuple(shape))


def _sum_calls(per_call):
    out = per_call[0]
    for t in per_call[1:]:
        out = out + t
    return out


def _variable(layer, *names):
    for name in names:
        v = layer.__dict__.get(name)
        if isinstance(v, keras.Variable):
            return v
    return None


def _plain(layer):
    return not getattr(layer, "quantization_mode", None) and not getattr(layer, "lora_enabled", False)


class GhostRule:
    """Base class. `tap` is "pre_activation" (the layer applies
    `self.activation` last, and the tap goes before it) or "output"."""

    tap = "output"
    # True: `prepare` also gets, per call, the call's other arguments (Python
    # values only: {"args": (...), name: value}).
    uses_call_options = False

    def variables(self, layer):
        """{role: keras.Variable or None}, or None when this layer's
        configuration is not covered (it then falls back)."""
        raise NotImplementedError

    def prepare(self, layer, calls, roles):
        """{role: gradient representation} for the roles asked."""
        raise NotImplementedError


class DenseRule(GhostRule):
    tap = "pre_activation"

    def variables(self, layer):
        if not _plain(layer):
            return None
        return {"kernel": _variable(layer, "_kernel"), "bias": _variable(layer, "bias")}

    def prepare(self, layer, calls, roles):
        d_in, d_out = layer._kernel.shape
        out = {}
        if "kernel" in roles:
            a = ops.concatenate([ops.reshape(_taps(a), (a.shape[0], 1, -1, d_in)) for a, _ in calls], axis=2)
            g = ops.concatenate([ops.reshape(_taps(g), (g.shape[0], 1, -1, d_out)) for _, g in calls], axis=2)
            out["kernel"] = LinearGrad(a, g, lambda s: ops.reshape(s, (-1, d_in, d_out)))
        if "bias" in roles:
            out["bias"] = PerExampleGrad(_sum_calls(
                [ops.sum(ops.reshape(_f32(g), (g.shape[0], -1, d_out)), axis=1) for _, g in calls]))
        return out


def _einsum_parts(equation):
    equation = equation.replace(" ", "")
    lhs, rest = equation.split(",")
    kernel, out = rest.split("->")
    return lhs, kernel, out


class EinsumDenseRule(GhostRule):
    """EinsumDense as a dense layer: kernel axes split into those contracted
    with the input (d_in) and those in the output (d_out); input/output axes
    not in the kernel are positions (T); input-only axes are summed first."""

    tap = "pre_activation"

    def variables(self, layer):
        if not _plain(layer):
            return None
        lhs, kernel, out = (p.replace("...", "") for p in _einsum_parts(layer.equation))
        for part in (lhs, kernel, out):
            if len(set(part)) != len(part):
                return None
        for c in kernel:
            if (c in lhs) == (c in out):  # diagonal or kernel-only axis
                return None
        return {"kernel": _variable(layer, "_kernel"), "bias": _variable(layer, "bias")}

    def prepare(self, layer, calls, roles):
        kshape = tuple(layer._kernel.shape)
        out = {}
        if "kernel" in roles:
            a_all, g_all = [], []
            for a, g in calls:
                lhs, kernel, outp = _einsum_parts(layer.equation)
                spare = [c for c in string.ascii_letters if c not in layer.equation]
                if "..." in lhs:
                    n = (len(a.shape) - 1) - (len(lhs) - 3)
                    ell = "".join(spare[:n])
                    spare = spare[n:]
                    lhs, outp = lhs.replace("...", ell), outp.replace("...", ell)
                ex = spare[0]
                pos = "".join(c for c in lhs if c in outp and c not in kernel)
                k_in = "".join(c for c in lhs if c in kernel)
                k_out = "".join(c for c in kernel if c in outp)
                a = ops.einsum(f"{ex}{lhs}->{ex}{pos}{k_in}", _taps(a))
                g = ops.einsum(f"{ex}{outp}->{ex}{pos}{k_out}", _taps(g))
                sizes = dict(zip(kernel, kshape))
                d_in = math.prod(sizes[c] for c in k_in)
                d_out = math.prod(sizes[c] for c in k_out)
                a_all.append(ops.reshape(a, (a.shape[0], 1, -1, d_in)))
                g_all.append(ops.reshape(g, (g.shape[0], 1, -1, d_out)))

            def to_weight(s, k_in=k_in, k_out=k_out, kernel=kernel, sizes=sizes, n=spare[1]):
                s = ops.reshape(s, (-1,) + tuple(sizes[c] for c in k_in + k_out))
                return ops.einsum(f"{n}{k_in}{k_out}->{n}{kernel}", s)

            out["kernel"] = LinearGrad(ops.concatenate(a_all, axis=2), ops.concatenate(g_all, axis=2), to_weight)
        if "bias" in roles:
            bshape = tuple(layer.bias.shape)
            out["bias"] = PerExampleGrad(_sum_calls([_unbroadcast(_f32(g), bshape) for _, g in calls]))
        return out


class ConvGrad:
    """Per-example gradient of a convolution kernel (Conv1D/2D/3D, any
    strides, padding, dilation, groups).

    `calls` holds, per call, the input (B, n, *spatial, C_in) and the output
    gradient (B, n, *out_spatial, F), float32 or 16-bit (`_taps`), channels last, causal padding
    already applied. Per group the kernel is a dense layer on patches:
    d_in = prod(kernel_size) * C_in / groups, d_out = F / groups, T = output
    positions (summed over calls). Norms and sum are `LinearGrad`'s on the
    patches (extracted by strided slicing): the Gram form when cheaper (at
    T = 1 just ||patch||^2 ||g||^2) and then the sum as ONE weighted matmul
    of patches and output gradients over the batch (book-keeping); else each
    example's kernel gradient as one batched matmul, reused for the sum.
    Convolution weight gradients are avoided on purpose: vmapped (per example,
    or per device shard) they lower to grouped convolutions, which are slow
    and which GSPMD does not split over the batch (it all-gathered the
    inputs on every device).
    """

    finite_fast_path = True

    def __init__(self, layer, calls):
        self.layer, self.calls = layer, calls
        self.kshape = tuple(layer.kernel.shape)
        self.linear = None

    def _patches(self, a):
        """(n, *spatial, C) -> (n, *out_spatial, prod(kernel_size), C)."""
        layer = self.layer
        ks, st, dil = tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate)
        spatial = tuple(a.shape[1:-1])
        window = tuple((k - 1) * d + 1 for k, d in zip(ks, dil))
        if layer.padding == "same":
            pads = jax.lax.padtype_to_pads(spatial, window, st, "SAME")
            a = jnp.pad(a, [(0, 0)] + list(pads) + [(0, 0)])
            spatial = tuple(a.shape[1:-1])
        out = tuple((n - w) // s + 1 for n, w, s in zip(spatial, window, st))
        if st == ks and all(d == 1 for d in dil):
            # Non-overlapping windows (e.g. a ViT patch embedding): one
            # reshape and transpose. The strided slices below would make
            # prod(kernel_size) badly coalesced copies.
            a = a[(slice(None),) + tuple(slice(0, m * k) for m, k in zip(out, ks)) + (slice(None),)]
            split = [a.shape[0]] + [d for m, k in zip(out, ks) for d in (m, k)] + [a.shape[-1]]
            a = jnp.reshape(a, split)
            r = len(ks)
            perm = (0,) + tuple(1 + 2 * i for i in range(r)) + tuple(2 + 2 * i for i in range(r)) + (2 * r + 1,)
            a = jnp.transpose(a, perm)
            return jnp.reshape(a, (a.shape[0],) + out + (math.prod(ks), a.shape[-1]))
        slices = []
        for offset in np.ndindex(*ks):
            begin = (0,) + tuple(o * d for o, d in zip(offset, dil)) + (0,)
            limit = (a.shape[0],) + tuple(b + (m - 1) * s + 1 for b, m, s in zip(begin[1:], out, st)) + (a.shape[-1],)
            slices.append(jax.lax.slice(a, begin, limit, (1,) + st + (1,)))
        return jnp.stack(slices, axis=-2)

    @property
    def half_taps(self):
        return all(_is_half(a) and _is_half(g) for a, g in self.calls)

    def _to_kernel(self, s):
        """(shards, groups, K * C_g, F_g) -> (shards, *kernel_size, C_g, groups * F_g)."""
        groups = self.layer.groups
        k = math.prod(self.kshape[:-2])
        c_g, f = self.kshape[-2], self.kshape[-1]
        s = ops.reshape(s, (-1, groups, k, c_g, f // groups))
        s = ops.transpose(s, (0, 2, 3, 1, 4))
        return ops.reshape(s, (-1,) + self.kshape)

    def sq_norm(self):
        groups = self.layer.groups
        k = math.prod(self.kshape[:-2])
        c_g, f = self.kshape[-2], self.kshape[-1]
        a_all, g_all = [], []
        for a, g in self.calls:
            b = a.shape[0]
            p = self._patches(_merge_example_axis(a))  # (b n, *out, K, C)
            p = ops.reshape(p, (b, -1, k, groups, c_g))
            a_all.append(ops.reshape(ops.transpose(p, (0, 3, 1, 2, 4)), (b, groups, -1, k * c_g)))
            g_all.append(ops.transpose(ops.reshape(g, (b, -1, groups, f // groups)), (0, 2, 1, 3)))
        self.linear = LinearGrad(ops.concatenate(a_all, axis=2), ops.concatenate(g_all, axis=2),
                                 self._to_kernel)
        return self.linear.sq_norm()

    def clipped_sum(self, factors, keep, shards, finite=False):
        if self.linear is None:
            self.sq_norm()
        return self.linear.clipped_sum(factors, keep, shards, finite=finite)


class ConvRule(GhostRule):
    """Conv1D/2D/3D: see `ConvGrad`; bias gradient = sum of g over positions.
    Strides, padding (valid, same, causal), dilation, groups, both data formats."""

    tap = "pre_activation"

    def variables(self, layer):
        if not _plain(layer):
            return None
        return {"kernel": _variable(layer, "kernel", "_kernel"), "bias": _variable(layer, "bias")}

    def prepare(self, layer, calls, roles):
        filters = layer.kernel.shape[-1]
        prepared, bias = [], []
        for a, g in calls:
            a, g = _taps(a), _taps(g)
            if layer.data_format == "channels_first":
                a, g = ops.moveaxis(a, 2, -1), ops.moveaxis(g, 2, -1)
            if layer.padding == "causal":
                left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
                a = ops.pad(a, [[0, 0], [0, 0], [left, 0], [0, 0]])
            prepared.append((a, g))
            bias.append(ops.sum(ops.reshape(_f32(g), (g.shape[0], -1, filters)), axis=1))
        out = {}
        if "kernel" in roles:
            out["kernel"] = ConvGrad(layer, prepared)
        if "bias" in roles:
            out["bias"] = PerExampleGrad(_sum_calls(bias))
        return out


class EmbeddingRule(GhostRule):
    tap = "output"

    def variables(self, layer):
        if not _plain(layer):
            return None
        return {"embeddings": _variable(layer, "_embeddings")}

    def prepare(self, layer, calls, roles):
        d, vocab = layer.output_dim, layer.input_dim
        ids = ops.concatenate([ops.reshape(ops.cast(a, "int32"), (a.shape[0], -1)) for a, _ in calls], axis=1)
        g = ops.concatenate([ops.reshape(_f32(g), (g.shape[0], -1, d)) for _, g in calls], axis=1)
        # As the lookup (jnp.take): ids in [-V, 0) wrap around; ids out of
        # range read NaN and get no gradient, so they contribute nothing here.
        ids = ops.where(ids < 0, ids + vocab, ids)
        valid = ops.logical_and(ids >= 0, ids < vocab)
        g = ops.where(ops.expand_dims(valid, -1), g, ops.zeros_like(g))
        return {"embeddings": EmbeddingGrad(ops.where(valid, ids, ops.zeros_like(ids)), g, vocab)}


class TiedEmbeddingGrad:
    """Per-example gradient of an embedding table that is both looked up
    (rows g_t scattered at ids_t: S_i) and used as the output projection
    (logits = h E^T: R_i = G_i^T H_i), i.e. a tied ReversibleEmbedding.

    ||S + R||^2 = ||S||^2 + ||R||^2 + 2 <S, R>, with
    <S, R> = sum_{t,s} G[s, id_t] <h_s, g_t>; ||R||^2 in Gram form
    (T^2 (D + V)), never a V x D matrix per example. The sum is the
    segment-sum of the lookups plus one weighted product for the projection.
    """

    def __init__(self, lookup, h, g_logits):
        self.lookup = lookup                  # EmbeddingGrad (ids (B, T1), g (B, T1, D)) or None
        self.h, self.g_logits = h, g_logits   # (B, T2, D), (B, T2, V)

    def sq_norm(self):
        h, g = self.h, self.g_logits  # float32 or 16-bit (`_taps`)
        hh = _product("btd,bsd->bts", h, h)
        gg = _product("btv,bsv->bts", g, g)
        out = ops.sum(hh * gg, axis=(1, 2))
        if self.lookup is not None:
            out = out + self.lookup.sq_norm()
            picked = _f32(jnp.take_along_axis(g, self.lookup.ids[:, None, :], axis=2))  # (B, T2, T1): G[s, id_t]
            dots = _product("bsd,btd->bst", h, self.lookup.g)
            out = out + 2.0 * ops.sum(picked * dots, axis=(1, 2))
        return out

    def clipped_sum(self, factors, keep, shards):
        g = _shard(_select(_f32(self.g_logits) * _expand(factors, 3), keep), shards)
        h = _shard(_select(_f32(self.h), keep), shards)
        out = ops.einsum("nbsv,nbsd->nvd", g, h)
        if self.lookup is not None:
            out = out + self.lookup.clipped_sum(factors, keep, shards)
        return out


class ReversibleEmbeddingRule(GhostRule):
    """keras.layers.ReversibleEmbedding (and keras-hub's subclass): lookups as
    `EmbeddingRule`; `reverse=True` calls (logits = h E^T, or h W with untied
    `reverse_embeddings`) as a dense layer; a tied table used both ways by
    `TiedEmbeddingGrad`. A `logit_soft_cap` (the tap would sit after it)
    is not covered: such a layer falls back."""

    tap = "output"
    uses_call_options = True

    def variables(self, layer):
        if not _plain(layer) or getattr(layer, "logit_soft_cap", None) is not None:
            return None
        roles = {"embeddings": _variable(layer, "_embeddings")}
        if not layer.tie_weights:
            roles["reverse_embeddings"] = _variable(layer, "reverse_embeddings")
        return roles

    def prepare(self, layer, calls, roles, options):
        d, vocab = layer.output_dim, layer.input_dim
        lookups, reverses = [], []
        for (a, g), opt in zip(calls, options):
            reverse = opt.get("reverse", opt["args"][0] if opt["args"] else False)
            if reverse is None:
                raise GhostUnsupportedError(
                    f"ReversibleEmbedding {layer.name!r}: `reverse` must be a Python bool.")
            (reverses if reverse else lookups).append((a, g))
        lookup = None
        if lookups:
            lookup = EmbeddingRule().prepare(layer, lookups, ("embeddings",))["embeddings"]
        h = g_logits = None
        if reverses:
            h = ops.concatenate([ops.reshape(_taps(a), (a.shape[0], -1, d)) for a, _ in reverses], axis=1)
            g_logits = ops.concatenate([ops.reshape(_taps(g), (g.shape[0], -1, vocab)) for _, g in reverses], axis=1)
        out = {}
        if layer.tie_weights:
            if "embeddings" in roles:
                if reverses:
                    out["embeddings"] = TiedEmbeddingGrad(lookup, h, g_logits)
                elif lookup is not None:
                    out["embeddings"] = lookup
            return out
        if "embeddings" in roles and lookup is not None:
            out["embeddings"] = lookup
        if "reverse_embeddings" in roles and reverses:
            out["reverse_embeddings"] = LinearGrad(
                ops.expand_dims(h, 1), ops.expand_dims(g_logits, 1), lambda s: ops.reshape(s, (-1, d, vocab)))
        return out


class _AffineNormRule(GhostRule):
    """Normalization layers whose output is xhat * gamma + beta (broadcast):
    per-example d gamma = sum(g * xhat), d beta = sum(g) over the axes gamma
    is broadcast along. xhat comes from the layer itself with gamma = 1,
    beta = 0 (Keras' own normalization code, so every option matches).
    `scale` / `shift` name the layer's attributes for gamma and beta (the
    roles keep those names); `shift = None`: no beta."""

    tap = "output"
    scale, shift = "gamma", "beta"

    def variables(self, layer):
        roles = {self.scale: _variable(layer, self.scale)}
        if self.shift is not None:
            roles[self.shift] = _variable(layer, self.shift)
        known = {id(v) for v in roles.values() if v is not None}
        if any(id(v) not in known for v in layer.variables):
            return None
        return roles

    def _reduce(self, layer, t):
        raise NotImplementedError

    def prepare(self, layer, calls, roles):
        gamma = _variable(layer, self.scale)
        beta = _variable(layer, self.shift) if self.shift is not None else None
        dgamma, dbeta = [], []
        for a, g in calls:
            g = _f32(g)
            if self.scale in roles:
                def value(v):
                    return ops.ones(v.shape, v.dtype) if v is gamma else ops.zeros(v.shape, v.dtype)

                xhat, _ = layer.stateless_call([value(v) for v in layer.trainable_variables],
                                               [value(v) for v in layer.non_trainable_variables],
                                               _merge_example_axis(a))
                xhat = ops.reshape(_f32(xhat), g.shape)
                dgamma.append(ops.reshape(self._reduce(layer, g * xhat), (-1,) + tuple(gamma.shape)))
            if self.shift is not None and self.shift in roles:
                dbeta.append(ops.reshape(self._reduce(layer, g), (-1,) + tuple(beta.shape)))
        out = {}
        if self.scale in roles:
            out[self.scale] = PerExampleGrad(_sum_calls(dgamma))
        if self.shift is not None and self.shift in roles:
            out[self.shift] = PerExampleGrad(_sum_calls(dbeta))
        return out


class LayerNormalizationRule(_AffineNormRule):
    def _reduce(self, layer, t):
        rank = len(t.shape) - 1  # the rank the layer saw
        axis = getattr(layer, "axis", -1)
        axes = axis if isinstance(axis, (list, tuple)) else [axis]
        keep = sorted(ax % rank for ax in axes)
        return ops.sum(t, axis=tuple(d + 1 for d in range(rank) if d not in keep))


class GroupNormalizationRule(_AffineNormRule):
    def _reduce(self, layer, t):
        rank = len(t.shape) - 1
        channel = layer.axis % rank
        return ops.sum(t, axis=tuple(d + 1 for d in range(rank) if d != channel))


class RMSNormalizationRule(LayerNormalizationRule):
    """x * rsqrt(mean(x^2) + eps) * scale over `axis` (default -1): Keras'
    RMSNormalization and keras-hub's."""

    scale, shift = "scale", None


class PositionEmbeddingRule(GhostRule):
    """keras-hub's PositionEmbedding: the output is the table's rows
    [start_index, start_index + T) broadcast over the batch, so an
    example's gradient is its output gradient summed over its leading axes,
    placed at those rows (distinct rows: its squared norm is that of the
    output gradient). `start_index` must be a Python int; per-token
    `positions` (vLLM serving) are not covered."""

    tap = "output"
    uses_call_options = True

    def variables(self, layer):
        v = _variable(layer, "position_embeddings")
        if v is None or len(layer.variables) != 1:
            return None
        return {"embeddings": v}

    def prepare(self, layer, calls, roles, options):
        rows_total, d = (int(n) for n in layer.position_embeddings.shape)
        placed = []
        for (a, g), opt in zip(calls, options):
            if opt.get("positions", opt["args"][1] if len(opt["args"]) > 1 else None) is not None:
                raise GhostUnsupportedError(f"PositionEmbedding {layer.name!r}: per-token positions.")
            start = opt.get("start_index", opt["args"][0] if opt["args"] else 0)
            if start is None:
                raise GhostUnsupportedError(
                    f"PositionEmbedding {layer.name!r}: `start_index` must be a Python int.")
            t = int(g.shape[-2])
            rows = ops.sum(ops.reshape(_f32(g), (g.shape[0], -1, t, d)), axis=1)
            placed.append((int(start), rows))
        if len(placed) == 1:
            start, rows = placed[0]
            return {"embeddings": RowsGrad(rows, start, rows_total)}
        full = [ops.pad(r, [[0, 0], [st, rows_total - st - r.shape[1]], [0, 0]]) for st, r in placed]
        return {"embeddings": PerExampleGrad(_sum_calls(full))}


RULES = {
    keras.layers.Dense: DenseRule(),
    keras.layers.EinsumDense: EinsumDenseRule(),
    keras.layers.Embedding: EmbeddingRule(),
    keras.layers.ReversibleEmbedding: ReversibleEmbeddingRule(),
    keras.layers.LayerNormalization: LayerNormalizationRule(),
    keras.layers.GroupNormalization: GroupNormalizationRule(),
    keras.layers.RMSNormalization: RMSNormalizationRule(),
    keras.layers.Conv1D: ConvRule(),
    keras.layers.Conv2D: ConvRule(),
    keras.layers.Conv3D: ConvRule(),
}


def _register_keras_hub():
    """keras-hub's layers with rules, registered when keras_hub is imported:
    its ReversibleEmbedding (a subclass of Keras' that changes no method; the
    same rule), PositionEmbedding and RMSNormalization."""
    import sys

    hub_layers = getattr(sys.modules.get("keras_hub"), "layers", None)
    if hub_layers is None:
        return
    cls = getattr(hub_layers, "ReversibleEmbedding", None)
    if (cls is not None and cls not in RULES and issubclass(cls, keras.layers.ReversibleEmbedding)
            and not any(k in cls.__dict__ for k in ("call", "build", "__init__"))):
        RULES[cls] = RULES[keras.layers.ReversibleEmbedding]
    for name, rule in (("PositionEmbedding", PositionEmbeddingRule), ("RMSNormalization", RMSNormalizationRule)):
        cls = getattr(hub_layers, name, None)
        if cls is not None and cls not in RULES:
            RULES[cls] = rule()


def register_rule(layer_class, rule):
    """Registers a `GhostRule` for exactly `layer_class` (not its subclasses)."""
    if not isinstance(rule, GhostRule):
        raise TypeError(f"rule must be a GhostRule, got {type(rule).__name__}.")
    RULES[layer_class] = rule


# --------------------------------------------------------------------------
# Plan: which trainable weights are ruled (and by which layer), which fall back.


class _Entry(NamedTuple):
    layer: object
    rule: GhostRule
    roles: dict  # role -> position in model.trainable_variables


class Plan(NamedTuple):
    entries: list
    fallback: list  # positions in model.trainable_variables

    def describe(self, model):
        tv = model.trainable_variables
        fb = sum(int(np.prod(tv[i].shape)) for i in self.fallback)
        total = sum(int(np.prod(v.shape)) for v in tv)
        return fb, total


def build_plan(model, exclude=()):
    """Assigns each trainable weight to a ghost rule or to the fallback.

    A weight falls back when its layer's exact class has no rule (or the
    layer's configuration is not covered: LoRA, quantized, unusual einsum),
    when it has a regularizer (its penalty's gradient does not pass through
    the layer output), when several layers hold it (tied weights), or when
    its id is in `exclude` (`discover` finds weights read outside their
    layer's call).
    """
    tv = model.trainable_variables
    pos = {id(v): i for i, v in enumerate(tv)}
    _register_keras_hub()
    layers = model._flatten_layers(include_self=True, recursive=True)
    owners = {}
    for layer in layers:
        for v in layer._trainable_variables:
            owners[id(v)] = owners.get(id(v), 0) + 1
    entries, ruled = [], set()
    for layer in layers[1:]:
        rule = RULES.get(type(layer))
        if rule is None or not layer.built:
            continue
        variables = rule.variables(layer)
        if not variables:
            continue
        roles = {}
        for role, v in variables.items():
            if v is None or id(v) not in pos or pos[id(v)] in ruled:
                continue
            if getattr(v, "regularizer", None) is not None or owners.get(id(v), 0) != 1:
                continue
            if id(v) in exclude:
                continue
            roles[role] = pos[id(v)]
        if roles:
            entries.append(_Entry(layer, rule, roles))
            ruled.update(roles.values())
    return Plan(entries, [i for i in range(len(tv)) if i not in ruled])


# --------------------------------------------------------------------------
# Taps: record inputs and add zero taps to ruled layers' outputs.


class _Taps:
    """Context manager wrapping each ruled layer's `call` for one trace.

    With `taps=None` (discovery) it records the shape and dtype of every
    tapped tensor; otherwise it adds taps[entry][k] to the k-th call's
    tapped tensor. Inputs are recorded in both modes. With `inside` (a dict
    {id(variable): value} per entry), the layer's ruled variables take those
    values only while its call runs (the stateless scope holds other values
    elsewhere): `discover` uses it to find reads outside the call. The
    wrappers are instance attributes removed on exit, so the layers are left
    as found.
    """

    def __init__(self, entries, taps=None, inside=None):
        self.entries = entries
        self.taps = taps
        self.inside = inside
        self.inputs = [[] for _ in entries]
        # Per call, the call's extra arguments where they are plain Python
        # values (e.g. ReversibleEmbedding's reverse=True); arrays as None.
        self.options = [[] for _ in entries]
        self.specs = [[] for _ in entries]
        self._saved = []

    @contextlib.contextmanager
    def _inside(self, idx):
        if self.inside is None:
            yield
            return
        from keras.src.backend.common.stateless_scope import get_stateless_scope

        mapping = get_stateless_scope().state_mapping
        saved = {k: mapping.get(k, _MISSING) for k in self.inside[idx]}
        mapping.update(self.inside[idx])
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is _MISSING:
                    mapping.pop(k, None)
                else:
                    mapping[k] = v

    def _wrap(self, idx, entry):
        layer, rule = entry.layer, entry.rule
        original = layer.call

        def tap(t, n):
            if self.taps is None:
                self.specs[idx].append(jax.ShapeDtypeStruct(t.shape, t.dtype))
                return t
            return t + self.taps[idx][n]

        def call(*args, **kwargs):
            if not args:
                raise GhostUnsupportedError(
                    f"{type(layer).__name__} {layer.name!r} was called without a positional input.")
            n = len(self.inputs[idx])
            self.inputs[idx].append(args[0])
            self.options[idx].append(
                {"args": tuple(_static(v) for v in args[1:]),
                 **{k: _static(v) for k, v in kwargs.items()}})
            if rule.tap != "pre_activation":
                with self._inside(idx):
                    return tap(original(*args, **kwargs), n)
            activation = layer.activation
            count = [0]

            def hooked(t):
                count[0] += 1
                t = tap(t, n)
                return t if activation is None else activation(t)

            object.__setattr__(layer, "activation", hooked)
            try:
                with self._inside(idx):
                    out = original(*args, **kwargs)
            finally:
                object.__setattr__(layer, "activation", activation)
            if count[0] != 1:
                raise GhostUnsupportedError(
                    f"{type(layer).__name__} {layer.name!r}: its call did not apply its activation "
                    "exactly once, so the ghost rule cannot see its pre-activation output.")
            return out

        return call

    def __enter__(self):
        for idx, entry in enumerate(self.entries):
            layer = entry.layer
            self._saved.append((layer, layer.__dict__.get("call", _MISSING)))
            object.__setattr__(layer, "call", self._wrap(idx, entry))
        return self

    def __exit__(self, *exc):
        for layer, old in reversed(self._saved):
            if old is _MISSING:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", old)
        self._saved = []
        return False


_MISSING = object()


def _static(v):
    return v if isinstance(v, (bool, int, float, str, type(None))) else None


# --------------------------------------------------------------------------
# The ghost step.


class GhostResult(NamedTuple):
    losses: object          # (B,) per-example losses (unscaled), as the vectorized path
    y_pred: object          # predictions, batch first
    sums: list              # float32 clipped, masked sums, one per trainable weight
    keep: object            # bool (B,)
    num_nonfinite: object   # int32 scalar
    non_trainable: list     # advanced non-trainable state
    sq_norms: object        # float32 (B,) per-example squared gradient norms


def _first(a):
    return None if a is None else tree.map_structure(lambda t: t[0], a)


def _forward(model, tapper, tv, ntv, metrics_vars, optimizer_vars, xi, yi, swi):
    """One example's loss through Keras' own compute_loss_and_updates, as on
    the vectorized path (batch of one), with the taps in place."""
    with tapper:
        loss, (unscaled, y_pred, _, _) = model.compute_loss_and_updates(
            tv, ntv, metrics_vars, common.add_batch_axis(xi), common.add_batch_axis(yi), common.add_batch_axis(swi),
            training=True, optimizer_variables=optimizer_vars)
    return loss, (unscaled, tree.map_structure(lambda a: a[0], y_pred))


def discover(model, plan, trainable, ntv, metrics_vars, optimizer_vars, xi, yi, swi):
    """One abstract trace of one example's forward.

    Returns (specs, outside): the shape and dtype of every tapped tensor per
    entry and call; and the ids of ruled variables that the forward reads
    outside their own layer's call (for instance a tied output projection
    reading an Embedding's table). Their gradient would not pass through the
    layer's output, so they must fall back. Found by giving each ruled
    variable a separate input outside its layer's call and checking, in the
    jaxpr, whether that input is used at all.
    """
    if not plan.entries:
        return [], set()
    tvars = model.trainable_variables
    ruled = [p for e in plan.entries for p in e.roles.values()]
    holder = {}

    def f(outside, tv, ntv, mv, ov, xi, yi, swi):
        inside = [{id(tvars[p]): tv[p] for p in e.roles.values()} for e in plan.entries]
        tv = list(tv)
        for p, v in zip(ruled, outside):
            tv[p] = v
        tapper = _Taps(plan.entries, None, inside)
        loss, _ = _forward(model, tapper, tv, ntv, mv, ov, xi, yi, swi)
        holder["specs"] = tapper.specs
        return loss

    closed = jax.make_jaxpr(f)([trainable[p] for p in ruled], list(trainable), ntv, metrics_vars,
                               optimizer_vars, xi, yi, swi)
    jaxpr = closed.jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    outside = {id(tvars[p]) for p, v in zip(ruled, jaxpr.invars[:len(ruled)]) if id(v) in used}
    return holder["specs"], outside


def clipped_sums(model, trainable, non_trainable, metrics_vars, optimizer_vars,
                 x, y, sample_weight, mask, l2_norm_clip, num_shards=None, plan=None):
    """Per-example clipping and masked summation by ghost norms + book-keeping.

    Same contract as `per_example_grads` followed by
    `clipping.clip_and_sum(..., num_shards)` on the vectorized path (sums are
    weight-shaped, or (num_shards, ...) partial sums); returns a `GhostResult`.
    """
    plan = plan or build_plan(model)
    batch = jax.tree_util.tree_leaves(x)[0].shape[0]
    from keras_dpsgd.backend import jax as jax_backend  # the same per-example keys as the vectorized path

    per_ex_ntv, ntv_axes, new_ntv = jax_backend.per_example_seed_states(model, non_trainable, batch)
    trainable = list(trainable)

    # Discovery: tapped shapes, and ruled weights read outside their layer
    # (those fall back: their per-example gradient is then taken by vmap).
    one_ntv = [t[0] if a == 0 else t for t, a in zip(per_ex_ntv, ntv_axes)]
    example = (one_ntv, metrics_vars, optimizer_vars, _first(x), _first(y), _first(sample_weight))
    specs, outside = discover(model, plan, trainable, *example)
    if outside:
        plan = build_plan(model, exclude=outside)
        specs, _ = discover(model, plan, trainable, *example)
    taps = [[jnp.zeros((batch,) + tuple(s.shape), s.dtype) for s in per_call] for per_call in specs]
    fb_pos = list(plan.fallback)

    options = {}

    def loss_and_inputs(fb_vals, taps, tv, ntv, xi, yi, swi):
        tv = list(tv)
        for p, v in zip(fb_pos, fb_vals):
            tv[p] = v
        tapper = _Taps(plan.entries, taps)
        options["calls"] = tapper.options  # Python values, read after the trace
        loss, (unscaled, y_pred) = _forward(model, tapper, tv, ntv, metrics_vars, optimizer_vars, xi, yi, swi)
        return loss, (unscaled, y_pred, tapper.inputs)

    grad_fn = jax.vmap(jax.value_and_grad(loss_and_inputs, argnums=(0, 1), has_aux=True),
                       in_axes=(None, 0, None, ntv_axes, 0, 0, 0))
    fb_vals = [trainable[p] for p in fb_pos]
    (_, (losses, y_pred, inputs)), (fb_grads, tap_grads) = grad_fn(
        fb_vals, taps, trainable, per_ex_ntv, x, y, sample_weight)

    # Named scopes label the norm and sum work in profiles (tools/profile_summary.py).
    with jax.named_scope("dp_ghost_norms"):
        reps = {}
        for entry, ins, gs, opts in zip(plan.entries, inputs, tap_grads, options["calls"]):
            if ins and entry.rule.uses_call_options:
                got = entry.rule.prepare(entry.layer, list(zip(ins, gs)), tuple(entry.roles), opts)
            elif ins:
                got = entry.rule.prepare(entry.layer, list(zip(ins, gs)), tuple(entry.roles))
            else:
                got = {}
            for role, p in entry.roles.items():
                rep = got.get(role)
                reps[p] = ZeroGrad(batch, trainable[p].shape) if rep is None else rep

        sq = ops.zeros((batch,), "float32")
        for p in sorted(reps):
            sq = sq + reps[p].sq_norm()
        if fb_grads:
            sq = sq + clipping.per_example_sq_norms(fb_grads)
    factors, keep = clipping.clip_factors(sq, mask, l2_norm_clip)
    shards = num_shards or 1
    sums = [None] * len(trainable)
    with jax.named_scope("dp_ghost_sums"):
        # Dense-like weights (Dense, EinsumDense, convolutions on patches).
        linear = [p for p, rep in reps.items() if getattr(rep, "finite_fast_path", False)]

        def linear_sums(finite):
            return [ops.cast(reps[p].clipped_sum(factors, keep, shards, finite=finite), "float32") for p in linear]

        fast = (FINITE_FAST_PATH and shards == 1 and not _use_kernel(SUM_KERNEL, "SUM_KERNEL")
                and not all(reps[p].half_taps for p in linear))
        if linear and fast:
            # Every norm finite (the usual case): no selects. Otherwise the
            # selecting path drops the non-finite rows exactly (I4). (The
            # fused sum kernel selects in registers: no branch for it.)
            got = jax.lax.cond(jnp.all(jnp.isfinite(sq)), lambda: linear_sums(True), lambda: linear_sums(False))
        else:
            got = linear_sums(False)
        got = dict(zip(linear, got))
        for p, rep in reps.items():
            s = got[p] if p in got else ops.cast(rep.clipped_sum(factors, keep, shards), "float32")
            s = ops.reshape(s, (shards,) + tuple(trainable[p].shape))
            sums[p] = s if num_shards else s[0]
        for p, s in zip(fb_pos, clipping.weighted_sum(fb_grads, factors, keep, num_shards)):
            sums[p] = s
    nonfinite = ops.logical_and(ops.cast(mask, "bool"), ops.logical_not(keep))
    return GhostResult(losses, y_pred, sums, keep, ops.sum(ops.cast(nonfinite, "int32")), new_ntv, sq)


# --------------------------------------------------------------------------
# Choosing the path (fit(clipping=...)).


def _abstract(values):
    return [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for v in values]


def check_traceable(model, data_batch, plan=None):
    """Traces the ghost step abstractly on one physical batch (raises if it cannot)."""
    x, y, sw = data_batch
    batch = jax.tree_util.tree_leaves(x)[0].shape[0]
    opt_vars = model.optimizer.variables if model.optimizer is not None else []

    def run(tv, ntv, mv, ov, x, y, sw):
        r = clipped_sums(model, tv, ntv, mv, ov, x, y, sw, jnp.ones((batch,), bool), 1.0, plan=plan)
        return r.sums, r.sq_norms

    jax.eval_shape(run, _abstract(model.trainable_variables), _abstract(model.non_trainable_variables),
                   _abstract(model.metrics_variables), _abstract(opt_vars), x, y, sw)


def _settled_plan(model, data_batch):
    """The plan after `discover` (weights read outside their layer fall back)."""
    x, y, sw = data_batch
    opt_vars = model.optimizer.variables if model.optimizer is not None else []
    plan = build_plan(model)
    _, outside = discover(model, plan, _abstract(model.trainable_variables),
                          _abstract(model.non_trainable_variables), _abstract(model.metrics_variables),
                          _abstract(opt_vars), _first(x), _first(y), _first(sw))
    return (build_plan(model, exclude=outside) if outside else plan), len(outside)


def choose_clipping(model, clipping, data_batch):
    """("ghost" | "vectorized", reason) for fit(clipping=...)."""
    if clipping == "vectorized":
        return "vectorized", "requested"
    try:
        plan, num_outside = _settled_plan(model, data_batch)
        fb, total = plan.describe(model)
        if clipping == "auto":
            if not plan.entries:
                return "vectorized", "no trainable layer has a ghost rule"
            if fb > AUTO_MAX_FALLBACK_FRACTION * total:
                return "vectorized", (f"{fb} of {total} trainable parameters have no ghost rule "
                                      f"(more than {AUTO_MAX_FALLBACK_FRACTION:.0%})")
        check_traceable(model, data_batch, plan)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: use vmap
        if clipping == "ghost":
            raise ValueError(f"clipping='ghost' cannot handle this model: {type(e).__name__}: {e}. "
                             "Use clipping='vectorized'.") from e
        return "vectorized", f"ghost clipping could not trace the model ({type(e).__name__}: {e})"
    ruled = sorted({type(e.layer).__name__ for e in plan.entries})
    reason = f"rules for {', '.join(ruled) or 'no layer'}"
    if fb:
        reason += f"; {fb} of {total} parameters by per-example gradients"
    if num_outside:
        reason += f" ({num_outside} weight(s) read outside their layer's call, e.g. tied)"
    return "ghost", reason


def unisolated_vmap_weights(model):
    """{id(variable): description} of trainable convolution kernels whose
    per-example gradient, taken by `jax.vmap`, is NOT isolated between
    examples: grouped convolutions with more than one input or output channel
    per group (Conv1D/2D/3D with groups > 1, DepthwiseConv1D/2D and
    SeparableConv1D/2D with depth_multiplier > 1).

    vmap turns the kernel gradient of such a convolution into one with a
    batch group count, which XLA lowers with a mask: one example's NaN or Inf
    gradient then makes every example's kernel gradient NaN (measured on
    XLA:CPU with jax 0.10; `tests/test_ghost.py` checks that this still
    happens). Those examples would be dropped as non-finite, so one example
    could remove the whole physical batch: the sum's sensitivity would no
    longer be bounded by C (I3, I4). Pure depthwise convolutions (one channel
    in and out per group) and groups = 1 were isolated in the same test. The
    TensorFlow and PyTorch backends were isolated too. On an H200 (XLA:GPU,
    jax 0.11.2) the same gradients were isolated (`tools/vmap_leak.py`), but
    the refusal applies on every platform: whether XLA mixes them depends on
    its lowering, which can change with the version, the device and the
    shapes.
    """
    kl = keras.layers
    convs = (kl.Conv1D, kl.Conv2D, kl.Conv3D)
    depthwise = (kl.DepthwiseConv1D, kl.DepthwiseConv2D)
    separable = (kl.SeparableConv1D, kl.SeparableConv2D)
    found = {}
    for layer in model._flatten_layers(include_self=False):
        if not layer.trainable:
            continue
        if isinstance(layer, convs) and getattr(layer, "groups", 1) > 1:
            kernel = getattr(layer, "kernel", None)
            if kernel is not None and (kernel.shape[-2] > 1 or layer.filters // layer.groups > 1):
                found[id(kernel)] = f"{type(layer).__name__} {layer.name!r} (groups={layer.groups})"
        elif isinstance(layer, depthwise + separable) and getattr(layer, "depth_multiplier", 1) > 1:
            kernel = getattr(layer, "depthwise_kernel" if isinstance(layer, separable) else "kernel", None)
            if kernel is not None:
                found[id(kernel)] = (f"{type(layer).__name__} {layer.name!r} "
                                     f"(depth_multiplier={layer.depth_multiplier})")
    trainable = {id(v) for v in model.trainable_variables}
    return {k: v for k, v in found.items() if k in trainable}


def _vmapped(model, bad, plan):
    """The entries of `bad` whose gradients `plan` (None: the vectorized path)
    takes by vmap: all of them, or a ghost plan's fallback weights."""
    if plan is None:
        return bad
    fallback = {id(model.trainable_variables[p]) for p in plan.fallback}
    return {k: v for k, v in bad.items() if k in fallback}


def _refuse_unisolated(bad, clipping):
    """Raises for the weights in `bad` (see `unisolated_vmap_weights`)."""
    raise ValueError(
        f"keras_dpsgd: fit(clipping={clipping!r}) on JAX would take per-example gradients of "
        f"{', '.join(sorted(set(bad.values())))} with jax.vmap. For grouped convolutions with more than "
        "one channel in or out per group XLA mixes examples there: one example with a NaN or Inf gradient "
        "makes every example's kernel gradient NaN, so its whole batch would be dropped and the clipping "
        "bound would not hold. Use clipping='ghost' or 'auto' (Conv1D/2D/3D with groups have ghost rules, "
        "unless a kernel regularizer or a read outside the layer makes the weight fall back), "
        "depth_multiplier=1 for depthwise and separable convolutions, or the TensorFlow or PyTorch "
        "backend, where these gradients are isolated.")


def select_clipping(model, clipping, data_batch):
    """Resolves fit(clipping=...) for `model` (JAX), stores it as
    `model._dp_clipping`, resets the compiled step when it changes, and logs
    the choice once. Raises if the choice would take per-example gradients
    that are not isolated between examples (`unisolated_vmap_weights`)."""
    shapes = tree.map_structure(lambda t: (tuple(np.shape(t)), str(getattr(t, "dtype", ""))), data_batch)
    key = repr((clipping, shapes, [(v.path, tuple(v.shape)) for v in model.trainable_variables]))
    cached = model.__dict__.get("_dp_clipping_choice")
    if cached is not None and cached[0] == key:
        mode = cached[1]
    else:
        mode, reason = choose_clipping(model, clipping, data_batch)
        bad = unisolated_vmap_weights(model)
        plan = None
        if bad and mode == "vectorized" and clipping == "auto":
            # Ghost takes those kernels' norms and sums from patches (no vmap)
            # unless they fall back.
            try:
                plan = _settled_plan(model, data_batch)[0]
                if not _vmapped(model, bad, plan):
                    check_traceable(model, data_batch, plan)
                    mode, reason = "ghost", (f"grouped convolutions need it ({reason}, but vectorized "
                                             "gradients of grouped convolutions are not isolated on JAX)")
            except Exception:  # noqa: BLE001 - ghost cannot trace it: refused below
                pass
        if bad:
            if mode == "ghost" and plan is None:
                plan = _settled_plan(model, data_batch)[0]
            bad = _vmapped(model, bad, plan if mode == "ghost" else None)
            if bad:
                _refuse_unisolated(bad, clipping)
        if model.__dict__.get("_dp_clipping") != mode or cached is None:
            logger.info("keras_dpsgd: clipping=%r uses %s clipping (%s).", clipping, mode, reason)
        object.__setattr__(model, "_dp_clipping_choice", (key, mode))
    if model.__dict__.get("_dp_clipping") != mode:
        object.__setattr__(model, "_dp_clipping", mode)
        model.train_function = None
    return mode
