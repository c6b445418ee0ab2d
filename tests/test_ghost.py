"""Ghost clipping (keras_dpsgd.ghost) equals the vectorized path: per-example
norms, clipped sums, and a whole DP fit. JAX only."""

import numpy as np
import pytest

from tests.conftest import BACKEND

if BACKEND != "jax":
    pytest.skip("ghost clipping is the JAX fast path", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
from keras import layers, ops  # noqa: E402

import keras_dpsgd  # noqa: E402
from keras_dpsgd import clipping, ghost  # noqa: E402
from keras_dpsgd.backend import jax as jax_backend  # noqa: E402


def _compiled(inputs, outputs, loss="mse"):
    model = keras_dpsgd.DPModel(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    model.optimizer.build(model.trainable_variables)
    return model


def _both(model, x, y, mask=None, clip=1.0, sw=None, num_shards=None):
    """(vectorized, ghost) dicts of per-example sq norms, clipped sums, losses."""
    batch = jax.tree_util.tree_leaves(x)[0].shape[0]
    mask = np.ones((batch,), bool) if mask is None else np.asarray(mask)
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in model.metrics_variables], [v.value for v in model.optimizer.variables])

    def run(state, x, y, sw, mask):
        tv, ntv, mv, ov = state
        losses, _, grads, _ = jax_backend.per_example_grads(model, tv, ntv, mv, ov, x, y, sw)
        sums, keep, nonfinite = clipping.clip_and_sum(grads, mask, clip, num_shards=num_shards)
        vec = dict(sq=clipping.per_example_sq_norms(grads), sums=sums, keep=keep, nonfinite=nonfinite,
                   losses=losses)
        r = ghost.clipped_sums(model, tv, ntv, mv, ov, x, y, sw, mask, clip, num_shards=num_shards)
        gh = dict(sq=r.sq_norms, sums=r.sums, keep=r.keep, nonfinite=r.num_nonfinite, losses=r.losses)
        return vec, gh

    # Fast XLA compile options: these small programs are compile-bound on CPU.
    compiled = jax.jit(run).lower(state, x, y, sw, mask).compile(_FAST_COMPILE)
    return jax.tree_util.tree_map(np.asarray, compiled(state, x, y, sw, mask))


_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _assert_match(model, x, y, rtol=1e-5, atol=1e-6, **kw):
    vec, gh = _both(model, x, y, **kw)
    keep = vec["keep"]
    np.testing.assert_allclose(gh["sq"][keep], vec["sq"][keep], rtol=rtol, atol=atol)
    np.testing.assert_array_equal(gh["keep"], vec["keep"])
    assert int(gh["nonfinite"]) == int(vec["nonfinite"])
    for var, v, g in zip(model.trainable_variables, vec["sums"], gh["sums"]):
        assert v.shape == g.shape, var.path
        assert np.all(np.isfinite(g)), var.path
        np.testing.assert_allclose(g, v, rtol=rtol, atol=atol, err_msg=var.path)
    return vec, gh


def _rng(seed=0):
    keras.utils.set_random_seed(seed)
    return np.random.default_rng(seed)


def _branches(shapes, make_branches, dtypes=None):
    """A model with one input per shape, each through its branch, summed to (B, 2)."""
    inputs = [keras.Input(s, dtype=(dtypes or {}).get(i, "float32")) for i, s in enumerate(shapes)]
    outs = [layers.Dense(2)(layers.Flatten()(layers.Activation("tanh")(make(i))))
            for i, make in zip(inputs, make_branches)]
    return _compiled(inputs, layers.Add()(outs) if len(outs) > 1 else outs[0])


@pytest.fixture(params=["gram", "materialize"])
def norm_method(request, monkeypatch):
    monkeypatch.setattr(ghost, "NORM_METHOD", request.param)
    return request.param


# ------------------------------------------------------- norm forms alone


@pytest.mark.parametrize("t,groups", [(1, 1), (5, 1), (4, 3)])
def test_linear_norm_forms_equal_the_materialized_gradient(t, groups, norm_method):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, groups, t, 4)).astype("float32")
    g = rng.normal(size=(3, groups, t, 6)).astype("float32")
    want = np.einsum("bktd,bkte->bkde", a, g)
    rep = ghost.LinearGrad(jnp.asarray(a), jnp.asarray(g), lambda s: s)
    np.testing.assert_allclose(rep.sq_norm(), np.sum(want ** 2, axis=(1, 2, 3)), rtol=1e-5)
    c = np.array([0.5, 0.0, 2.0], "float32")
    keep = np.array([True, False, True])
    a[1] = np.nan  # a dropped row's NaN must not leak into the sum (I4)
    rep = ghost.LinearGrad(jnp.asarray(a), jnp.asarray(g), lambda s: s)
    rep.sq_norm()  # the materialized form is then reused for the sum
    got = rep.clipped_sum(jnp.asarray(c), jnp.asarray(keep), 1)
    np.testing.assert_allclose(got[0], np.einsum("b,bkde->kde", c[keep], want[keep]), rtol=1e-5)
    # The finite fast path (no selects; c_i = 0 drops a finite row exactly),
    # scaling a (d_in < d_out) or g (swapped widths).
    a = np.where(np.isfinite(a), a, 1.0).astype("float32")
    for a_, g_ in ((a, g), (g, a)):
        want_ = np.einsum("bktd,bkte->bkde", a_, g_)
        rep = ghost.LinearGrad(jnp.asarray(a_), jnp.asarray(g_), lambda s: s)
        rep.sq_norm()
        got = rep.clipped_sum(jnp.asarray(c), jnp.asarray(keep), 1, finite=True)
        np.testing.assert_allclose(got[0], np.einsum("b,bkde->kde", c[keep], want_[keep]), rtol=1e-5)


def test_embedding_norm_form_handles_repeated_ids():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 3, size=(4, 7)).astype("int32")
    g = rng.normal(size=(4, 7, 5)).astype("float32")
    dense = np.zeros((4, 3, 5), "float32")
    for b in range(4):
        np.add.at(dense[b], ids[b], g[b])
    rep = ghost.EmbeddingGrad(jnp.asarray(ids), jnp.asarray(g), 3)
    np.testing.assert_allclose(rep.sq_norm(), np.sum(dense ** 2, axis=(1, 2)), rtol=1e-5)
    c = np.array([1.0, 0.5, 0.0, 0.25], "float32")
    keep = np.array([True, True, False, True])
    got = rep.clipped_sum(jnp.asarray(c), jnp.asarray(keep), 2)  # two shards of two rows
    want = np.einsum("b,bvd->bvd", c * keep, dense).reshape(2, 2, 3, 5).sum(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- rules


EINSUMS = [
    ("abc,cde->abde", (3, 5), (3, 2, 4), "de"),
    ("...b,bc->...c", (2, 3, 5), (4,), "c"),
    ("abcd,cde->abe", (3, 2, 5), (3, 4), "e"),
    ("abc,bcd->ad", (3, 5), (4,), None),
    ("btd,dnh->btnh", (4, 6), (4, 2, 3), "nh"),
    ("btnh,nhd->btd", (4, 2, 3), (4, 6), "d"),
    ("abc,cd->abd", (1, 5), (1, 4), "bd"),
]


def test_dense_and_einsum_dense():
    """Vector inputs, sequences of length 1 and > 1, activations, every
    einsum shape (positions, summed input axes, multi-axis kernels, ellipsis).
    The norm form is chosen by cost: the (3, 12) -> 16 branch takes the Gram
    form, the others materialize (both forms are also tested alone above)."""
    rng = _rng(0)
    shapes = [(5,), (1, 5), (4, 5), (3, 12)] + [e[1] for e in EINSUMS]
    makes = [lambda i: layers.Dense(7, activation="relu")(i)] * 3 + [lambda i: layers.Dense(16)(i)] + [
        lambda i, e=e: layers.EinsumDense(e[0], e[2], bias_axes=e[3], activation="relu")(i) for e in EINSUMS]
    model = _branches(shapes, makes)
    assert not ghost.build_plan(model).fallback
    x = [rng.normal(size=(5,) + s).astype("float32") for s in shapes]
    vec, _ = _assert_match(model, x, rng.normal(size=(5, 2)).astype("float32"), clip=0.5)
    assert np.any(vec["sq"] > 0.25)  # some rows are clipped


def test_embedding_with_repeated_ids_a_shared_table_and_shards():
    rng = _rng(2)
    emb = layers.Embedding(4, 5)  # 9 ids from 4 rows: repeats in every example
    model = _branches([(9,), (9,), (1,)], [emb, emb, layers.Embedding(6, 3)],  # a table called twice
                      dtypes={0: "int32", 1: "int32", 2: "int32"})
    x = [rng.integers(0, 4, size=(6, 9)), rng.integers(-4, 4, size=(6, 9)),  # negative ids wrap
         rng.integers(0, 6, size=(6, 1))]
    x = [t.astype("int32") for t in x]
    _assert_match(model, x, rng.normal(size=(6, 2)).astype("float32"), clip=0.3, num_shards=2)


def _reversible_model(tie_weights, soft_cap=None):
    """ids -> ReversibleEmbedding lookup -> Dense -> the same layer in reverse
    (logits over the vocabulary), as keras-hub's language models use it."""
    ids = keras.Input((6,), dtype="int32")
    emb = layers.ReversibleEmbedding(5, 4, tie_weights=tie_weights, logit_soft_cap=soft_cap)
    h = layers.Dense(4, activation="tanh")(emb(ids))
    logits = emb(h, reverse=True)  # (B, 6, 5)
    return _compiled(ids, layers.Dense(2)(layers.Flatten()(logits))), emb


@pytest.mark.parametrize("tie_weights", [True, False])
def test_reversible_embedding_lookups_and_reverse_projection(tie_weights):
    """Tied: the table's per-example gradient is a scatter of rows plus a
    dense projection gradient, whose cross term the norm must include."""
    rng = _rng(5)
    model, emb = _reversible_model(tie_weights)
    assert not ghost.build_plan(model).fallback
    x = rng.integers(0, 5, size=(5, 6)).astype("int32")  # 6 ids from 5 rows: repeats
    _assert_match(model, x, rng.normal(size=(5, 2)).astype("float32"), clip=0.2, num_shards=None)
    _assert_match(model, x, rng.normal(size=(5, 2)).astype("float32"), clip=0.2,
                  mask=[True, False, True, True, False])
    # I4: NaN gradients in a real row (dropped, counted) and in a padded row
    # (dropped) must not reach the table's sum through the cross term.
    sw = np.array([1.0, np.nan, 1.0, np.nan, 1.0], "float32")
    _, gh = _assert_match(model, x, rng.normal(size=(5, 2)).astype("float32"), clip=0.2, sw=sw,
                          mask=[True, True, True, False, False])
    assert list(gh["keep"]) == [True, False, True, False, False] and int(gh["nonfinite"]) == 1


def test_reversible_embedding_with_a_logit_soft_cap_falls_back():
    rng = _rng(6)
    model, emb = _reversible_model(True, soft_cap=2.0)
    plan = ghost.build_plan(model)
    positions = {id(v): i for i, v in enumerate(model.trainable_variables)}
    assert positions[id(emb.embeddings)] in plan.fallback
    x = rng.integers(0, 5, size=(4, 6)).astype("int32")
    _assert_match(model, x, rng.normal(size=(4, 2)).astype("float32"), clip=0.2)


NORMS = [
    (lambda: layers.LayerNormalization(), (4, 6)),
    (lambda: layers.LayerNormalization(axis=[1, 2]), (4, 6)),
    (lambda: layers.LayerNormalization(center=False), (6,)),
    (lambda: layers.LayerNormalization(rms_scaling=True), (3, 6)),
    (lambda: layers.GroupNormalization(groups=2), (4, 6)),
    (lambda: layers.GroupNormalization(groups=3, axis=1), (6, 2, 2)),
    (lambda: layers.RMSNormalization(), (3, 6)),
    (lambda: layers.RMSNormalization(axis=[1, 2]), (3, 6)),
]


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
def test_layer_and_group_normalization():
    rng = _rng(3)
    norms = [make() for make, _ in NORMS]
    model = _branches([s for _, s in NORMS],
                      [lambda i, n=n, s=s: n(layers.Dense(s[-1])(i)) for n, (_, s) in zip(norms, NORMS)])
    assert not ghost.build_plan(model).fallback  # every norm layer is ruled
    for norm in norms:  # non-trivial gamma / beta
        for v in norm.trainable_variables:
            v.assign(rng.normal(size=v.shape).astype("float32"))
    x = [rng.normal(size=(5,) + s).astype("float32") for _, s in NORMS]
    _assert_match(model, x, rng.normal(size=(5, 2)).astype("float32"), clip=0.5)


CONVS = [
    (lambda: layers.Conv1D(4, 3, strides=2, padding="same"), (9, 3)),
    (lambda: layers.Conv1D(4, 3, padding="causal", dilation_rate=2, groups=2), (8, 2)),
    (lambda: layers.Conv2D(4, (3, 2), strides=(2, 1), groups=2), (7, 6, 2)),
    (lambda: layers.Conv2D(6, 3, padding="same", dilation_rate=(1, 2), groups=3, activation="relu"),
     (5, 6, 6)),
    (lambda: layers.Conv2D(4, 2, data_format="channels_first", groups=2), (4, 5, 5)),
    (lambda: layers.Conv3D(2, 2, strides=(1, 2, 1), padding="same"), (3, 4, 3, 2)),
    (lambda: layers.Conv2D(6, 3, groups=2), (3, 3, 4)),  # one output position (T = 1)
    # Non-overlapping windows (strides = kernel size, as a ViT patch embedding),
    # with a remainder the convolution drops, and with "same" padding.
    (lambda: layers.Conv2D(4, (2, 3), strides=(2, 3)), (5, 7, 2)),
    (lambda: layers.Conv1D(3, 4, strides=4, padding="same"), (9, 2)),
]


def test_conv(norm_method):
    """Strides, valid / same / causal padding, dilation, groups, both data
    formats; norms on patches (Gram) or by per-example weight gradients."""
    rng = _rng(4)
    model = _branches([s for _, s in CONVS], [lambda i, m=m: m()(i) for m, _ in CONVS])
    assert not ghost.build_plan(model).fallback
    x = [rng.normal(size=(4,) + s).astype("float32") for _, s in CONVS]
    y = rng.normal(size=(4, 2)).astype("float32")
    _assert_match(model, x, y, clip=0.5)
    # I4 on the convolutions' sums: a real row with a NaN gradient (dropped,
    # counted) and a padded row (dropped). The reference is the vectorized
    # path with that row's weight 0 instead (vmap does not isolate grouped
    # convolutions' NaN rows: test below).
    mask = [True, True, True, False]
    _, gh = _both(model, x, y, sw=np.array([1.0, np.nan, 1.0, 1.0], "float32"), mask=mask, clip=0.5)
    vec, _ = _both(model, x, y, sw=np.array([1.0, 0.0, 1.0, 1.0], "float32"), mask=mask, clip=0.5)
    assert list(gh["keep"]) == [True, False, True, False] and int(gh["nonfinite"]) == 1
    for var, v, g in zip(model.trainable_variables, vec["sums"], gh["sums"]):
        np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-6, err_msg=var.path)


def _conv_model(make_conv, shape, extra=None):
    inputs = keras.Input(shape)
    h = layers.Flatten()(make_conv()(inputs))
    if extra is not None:
        h = extra(h)
    return _compiled(inputs, layers.Dense(2)(h))


def test_vmapped_grouped_conv_kernel_gradients_are_not_isolated_on_xla():
    """Why `ghost.unisolated_vmap_weights` exists: under jax.vmap, one
    example's NaN makes every example's kernel gradient NaN for a grouped
    convolution with several channels per group, not for groups = 1 or a pure
    depthwise convolution. If XLA stops mixing them, this fails, and the
    restriction in fit can go."""
    rng = _rng(12)
    cases = [(lambda: layers.Conv2D(4, 3, groups=2), (5, 5, 4), True),
             (lambda: layers.DepthwiseConv2D(3, depth_multiplier=2), (5, 5, 2), True),
             (lambda: layers.Conv2D(4, 3), (5, 5, 4), False),
             (lambda: layers.DepthwiseConv2D(3), (5, 5, 2), False)]
    for conv, shape, mixed in cases:
        model = _conv_model(conv, shape)
        assert bool(ghost.unisolated_vmap_weights(model)) == mixed
        x = rng.normal(size=(4,) + shape).astype("float32")
        x[1, 0] = np.nan
        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        out = jax.jit(lambda tv, x, y: jax_backend.per_example_grads(model, tv, ntv, [], [], x, y, None))(
            tv, x, np.zeros((4, 2), "float32"))
        kernel = np.asarray(out[2][0]).reshape(4, -1)  # the convolution's kernel comes first
        rows = np.where(~np.all(np.isfinite(kernel), axis=1))[0].tolist()
        assert rows == ([0, 1, 2, 3] if mixed else [1]), (conv().name, rows)


@pytest.mark.parametrize("make,shape", [
    (lambda: layers.LSTM(4), (5, 3)),
    (lambda: layers.MultiHeadAttention(2, 2), (5, 4)),
    (lambda: layers.Conv2DTranspose(3, 3, strides=2), (4, 4, 2)),
    (lambda: layers.SeparableConv2D(4, 3), (6, 6, 3)),
    (lambda: layers.Conv2D(3, 3, dilation_rate=2), (7, 7, 2)),
    (lambda: layers.GroupNormalization(2), (4, 4, 4)),
    (lambda: layers.ConvLSTM2D(2, 3), (3, 5, 5, 2)),
], ids=["lstm", "attention", "conv_transpose", "separable_m1", "dilated_conv", "group_norm", "conv_lstm"])
def test_vmapped_per_example_gradients_stay_isolated_elsewhere(make, shape):
    """The other side of the test above: for these layers one example's NaN
    reaches only its own per-example gradient under jax.vmap (an audit of 22
    Keras layers found the grouped convolutions above the only exception)."""
    rng = _rng(13)
    inputs = keras.Input(shape)
    layer = make()
    h = layer(inputs, inputs) if isinstance(layer, layers.MultiHeadAttention) else layer(inputs)
    model = _compiled(inputs, layers.Dense(2)(layers.Flatten()(h)))
    assert not ghost.unisolated_vmap_weights(model)
    x = rng.normal(size=(4,) + shape).astype("float32")
    sw = np.array([1.0, np.nan, 1.0, 1.0], "float32")
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    out = jax.jit(lambda tv, x, y, sw: jax_backend.per_example_grads(model, tv, ntv, [], [], x, y, sw))(
        tv, x, np.zeros((4, 2), "float32"), sw)
    for var, g in zip(model.trainable_variables, out[2]):
        rows = np.asarray(g).reshape(4, -1)
        assert np.all(np.isfinite(rows[[0, 2, 3]])), var.path
        assert not np.all(np.isfinite(rows[1])), var.path


def test_fit_refuses_unisolated_per_example_gradients():
    """Grouped convolutions with several channels per group: vectorized
    clipping is refused with what to do instead; auto takes ghost (the
    convolution's norm and sum come from patches) even where it would
    otherwise pick vectorized; ghost is refused if the kernel falls back."""
    grouped = lambda **kw: layers.Conv2D(4, 3, groups=2, **kw)  # noqa: E731
    batch = (np.zeros((8, 5, 5, 4), "float32"), np.zeros((8, 2), "float32"), None)
    model = _conv_model(grouped, (5, 5, 4))
    with pytest.raises(ValueError, match="clipping='vectorized'.*not hold.*clipping='ghost'"):
        ghost.select_clipping(model, "vectorized", batch)
    # An unruled layer holding most parameters: auto would pick vectorized.
    big = _conv_model(grouped, (5, 5, 4), extra=lambda h: layers.SimpleRNN(64)(layers.Reshape((4, 9))(h)))
    assert ghost.choose_clipping(big, "auto", batch)[0] == "vectorized"
    assert ghost.select_clipping(big, "auto", batch) == "ghost"
    regularized = _conv_model(lambda: grouped(kernel_regularizer=keras.regularizers.L2(0.1)), (5, 5, 4))
    with pytest.raises(ValueError, match="clipping='ghost'"):
        ghost.select_clipping(regularized, "ghost", batch)
    with pytest.raises(ValueError, match="depth_multiplier=1"):
        ghost.select_clipping(_conv_model(lambda: layers.DepthwiseConv2D(3, depth_multiplier=2), (5, 5, 4)),
                              "auto", batch)
    # Through fit, and fine where the gradients are isolated.
    with pytest.raises(ValueError, match="not hold"):
        model.fit(batch[0], batch[1], batch_size=4, l2_norm_clip=1.0, noise_multiplier=1.0,
                  clipping="vectorized", verbose=0)
    # Refused before any step or accounting: the same model then trains with ghost.
    assert int(model.optimizer.iterations.value) == 0
    hist = model.fit(batch[0], batch[1], batch_size=4, l2_norm_clip=1.0, noise_multiplier=1.0,
                     clipping="ghost", verbose=0, steps_per_epoch=2)
    assert model._dp_clipping == "ghost" and len(hist.history["epsilon"]) == 1
    assert int(model.optimizer.iterations.value) == 2
    ok = _conv_model(lambda: layers.DepthwiseConv2D(3), (5, 5, 4))
    assert ghost.select_clipping(ok, "vectorized", batch) == "vectorized"


# ------------------------------------------------- models, masks, policies


class Scale(layers.Layer):
    """A layer with no ghost rule and its own weight."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


def _transformer(vocab=11, seq=6, d=8, heads=2, dropout=0.0):
    ids = keras.Input((seq,), dtype="int32")
    h = layers.Embedding(vocab, d)(ids)
    att = layers.MultiHeadAttention(heads, d // heads, dropout=dropout)(h, h)
    h = layers.LayerNormalization()(h + att)
    f = layers.Dense(2 * d, activation="gelu")(h)
    h = layers.LayerNormalization()(h + layers.Dense(d)(f))
    return ids, layers.Dense(3)(layers.GlobalAveragePooling1D()(h))


def _sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_mixed_ruled_and_unruled_layers_with_dropout_and_regularizer():
    rng = _rng(5)
    inputs = keras.Input((4, 5))
    regularized = layers.Dense(6, kernel_regularizer=keras.regularizers.L2(0.1))
    h = Scale()(regularized(inputs))
    h = layers.Dropout(0.3)(layers.PReLU()(h))  # per-example dropout keys as on the vmap path
    h = layers.SimpleRNN(3)(h)
    model = _compiled(inputs, layers.Dense(2)(h), loss=_sparse_ce())
    plan = ghost.build_plan(model)
    tv = model.trainable_variables
    fallback = {tv[i].path for i in plan.fallback}
    assert fallback == {v.path for v in tv if "dense" not in v.path} | {regularized.kernel.path}
    x = rng.normal(size=(6, 4, 5)).astype("float32")
    _assert_match(model, x, rng.integers(0, 2, size=(6,)).astype("int32"), clip=0.4)


class TiedOutput(layers.Layer):
    """Reads an Embedding's table outside the Embedding's call (tied weights)."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, h):
        return ops.matmul(h, ops.transpose(self.embedding.embeddings))


def test_weights_read_outside_their_layer_fall_back():
    rng = _rng(9)
    ids = keras.Input((5,), dtype="int32")
    emb = layers.Embedding(7, 4)
    h = layers.Dense(4)(emb(ids))
    model = _compiled(ids, TiedOutput(emb)(layers.GlobalAveragePooling1D()(h)), loss=_sparse_ce())
    x = rng.integers(0, 7, size=(6, 5)).astype("int32")
    y = rng.integers(0, 7, size=(6,)).astype("int32")
    assert model.trainable_variables.index(emb.embeddings) not in ghost.build_plan(model).fallback
    plan, num_outside = ghost._settled_plan(model, (x, y, None))
    assert num_outside == 1 and model.trainable_variables.index(emb.embeddings) in plan.fallback
    _assert_match(model, x, y, clip=0.3)  # clipped_sums finds it too


def test_transformer_block_masked_and_nonfinite_rows_and_layers_restored():
    rng = _rng(6)
    ids, out = _transformer()
    model = _compiled(ids, out, loss=_sparse_ce())
    assert not ghost.build_plan(model).fallback  # every weight has a rule
    dense = [layer for layer in model._flatten_layers() if type(layer) is layers.Dense]
    activations = [layer.activation for layer in dense]
    x = rng.integers(0, 11, size=(8, 6)).astype("int32")
    y = rng.integers(0, 3, size=(8,)).astype("int32")
    sw = np.ones((8,), "float32")
    sw[2] = np.nan  # a real row whose gradient is NaN: dropped and counted
    sw[6] = np.nan  # a padded row with a NaN gradient: dropped, not counted
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
    _, gh = _assert_match(model, x, y, mask=mask, sw=sw, clip=0.2)
    assert list(gh["keep"]) == [True, True, False, True, True, True, False, False]
    assert int(gh["nonfinite"]) == 1
    # The taps are gone after tracing: no instance `call`, activations restored.
    assert all("call" not in layer.__dict__ for layer in model._flatten_layers())
    assert all(layer.activation is act for layer, act in zip(dense, activations))


def _primitives(jaxpr, out=None):
    """Primitive names of a jaxpr and of every jaxpr nested in it."""
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        out.append(eqn.primitive.name)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    _primitives(sub, out)
    return out


def test_finite_fast_path_is_one_branch_on_all_norms_finite(monkeypatch):
    """The sums of dense-like layers sit in one lax.cond on all(isfinite(norms)):
    the finite branch has no selects over the tapped tensors, the other keeps
    them (I4). Both give the vectorized result (test above for NaN rows)."""
    rng = _rng(9)
    ids, out = _transformer()
    model = _compiled(ids, out, loss=_sparse_ce())
    x = rng.integers(0, 11, size=(6, 6)).astype("int32")
    y = rng.integers(0, 3, size=(6,)).astype("int32")
    mask = np.array([1, 1, 1, 1, 0, 0], bool)
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in model.metrics_variables], [v.value for v in model.optimizer.variables])

    def make_run():  # a new function each time: JAX caches traces per function
        def run(state, x, y, mask):
            tv, ntv, mv, ov = state
            return ghost.clipped_sums(model, tv, ntv, mv, ov, x, y, None, mask, 0.2).sums
        return run

    jaxpr = jax.make_jaxpr(make_run())(state, x, y, mask).jaxpr
    conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 1
    slow, fast = conds[0].params["branches"]  # index 0: predicate False

    def row_selects(branch):  # selects over per-example (B, ...) tensors, nested jaxprs included
        found = []

        def walk(jaxpr):
            for e in jaxpr.eqns:
                shape = tuple(e.outvars[0].aval.shape) if e.outvars else ()
                if e.primitive.name == "select_n" and len(shape) >= 3 and shape[0] == 6:
                    found.append(shape)
                for p in e.params.values():
                    for sub in (p if isinstance(p, (list, tuple)) else [p]):
                        sub = getattr(sub, "jaxpr", sub)
                        if hasattr(sub, "eqns"):
                            walk(sub)
        walk(branch.jaxpr)
        return found

    assert row_selects(slow) and not row_selects(fast)
    fast_sums = jax.jit(make_run())(state, x, y, mask)

    monkeypatch.setattr(ghost, "FINITE_FAST_PATH", False)
    assert (_primitives(jax.make_jaxpr(make_run())(state, x, y, mask).jaxpr).count("cond")
            == _primitives(jaxpr).count("cond") - 1)
    for a, b in zip(fast_sums, jax.jit(make_run())(state, x, y, mask)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    _assert_match(model, x, y, mask=mask, clip=0.2)  # the selecting path on finite rows


def test_bf16_policy_relaxed_tolerance():
    rng = _rng(8)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = _branches(
            [(6,), (6, 6, 2)],
            [lambda i: layers.LayerNormalization()(layers.Dense(8)(layers.Embedding(11, 8)(i))),
             lambda i: layers.GroupNormalization(groups=2)(layers.Conv2D(4, 3, padding="same")(i))],
            dtypes={0: "int32"})
    finally:
        keras.config.set_dtype_policy("float32")
    x = [rng.integers(0, 11, size=(6, 6)).astype("int32"), rng.normal(size=(6, 6, 6, 2)).astype("float32")]
    vec, gh = _both(model, x, rng.normal(size=(6, 2)).astype("float32"), clip=0.5)
    assert gh["sq"].dtype == np.float32 and all(s.dtype == np.float32 for s in gh["sums"])
    np.testing.assert_allclose(gh["sq"], vec["sq"], rtol=3e-2)
    scale = max(np.abs(v).max() for v in vec["sums"])
    for var, v, g in zip(model.trainable_variables, vec["sums"], gh["sums"]):
        np.testing.assert_allclose(g, v, rtol=5e-2, atol=1e-2 * scale, err_msg=var.path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_taps_norm_products_exact_in_float32(dtype, norm_method, monkeypatch):
    """16-bit taps enter the norm products as they are, accumulated in
    float32: the same numbers as casting them to float32 first (every
    product of two 16-bit floats is exact in float32), and the sums, whose
    scaled operand must not be rounded to 16 bits, are float32."""
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.normal(size=(3, 2, 7, 5)), dtype)
    g = jnp.asarray(rng.normal(size=(3, 2, 7, 6)), dtype)
    want = np.einsum("bktd,bkte->bkde", np.asarray(a, np.float64), np.asarray(g, np.float64))
    factors = jnp.asarray([0.3, 1.0, 0.7], "float32")
    keep = jnp.asarray([True, True, True])
    got = {}
    for half in (True, False):
        monkeypatch.setattr(ghost, "HALF_PRECISION_NORM_PRODUCTS", half)

        def run(a, g):
            rep = ghost.LinearGrad(a, g, lambda s: s)
            return rep.sq_norm(), rep.clipped_sum(factors, keep, 1, finite=True)

        got[half] = jax.jit(run)(a, g)
        dots = [e for e in jax.make_jaxpr(run)(a, g).eqns if e.primitive.name == "dot_general"]
        operand_dtypes = {str(v.aval.dtype) for e in dots for v in e.invars}
        if half:
            # The norm products read the 16-bit taps; the sum reads float32.
            assert operand_dtypes == {dtype, "float32"}, operand_dtypes
        else:
            assert operand_dtypes == {"float32"}, operand_dtypes
        sq, s = got[half]
        assert sq.dtype == jnp.float32 and s.dtype == jnp.float32
        np.testing.assert_allclose(sq, np.sum(want ** 2, axis=(1, 2, 3)), rtol=1e-5)
        np.testing.assert_allclose(s[0], np.einsum("b,bkde->kde", np.asarray(factors, np.float64), want),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[True][0], got[False][0], rtol=1e-6)
    np.testing.assert_array_equal(got[True][1], got[False][1])


def test_bf16_policy_drops_nonfinite_rows_without_the_branch():
    """I4 under mixed_bfloat16, where the sums never take the finite fast
    path's branch: a real row with a NaN gradient (dropped, counted) and a
    padded NaN row add exactly 0 to every sum, dense-on-sequence and
    convolution layers alike. Reference: the vectorized path with that row's
    weight 0 instead."""
    rng = _rng(11)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = _branches([(5, 4), (6, 6, 2)], [lambda i: layers.Dense(6)(i),
                                                  lambda i: layers.Conv2D(3, 3, padding="same")(i)])
    finally:
        keras.config.set_dtype_policy("float32")
    x = [rng.normal(size=(4, 5, 4)).astype("float32"), rng.normal(size=(4, 6, 6, 2)).astype("float32")]
    y = rng.normal(size=(4, 2)).astype("float32")
    mask = [True, True, True, False]
    _, gh = _both(model, x, y, sw=np.array([1.0, np.nan, 1.0, np.nan], "float32"), mask=mask, clip=0.5)
    vec, _ = _both(model, x, y, sw=np.array([1.0, 0.0, 1.0, 1.0], "float32"), mask=mask, clip=0.5)
    assert list(gh["keep"]) == [True, False, True, False] and int(gh["nonfinite"]) == 1
    scale = max(np.abs(v).max() for v in vec["sums"])
    for var, v, g in zip(model.trainable_variables, vec["sums"], gh["sums"]):
        assert np.all(np.isfinite(g)), var.path
        np.testing.assert_allclose(g, v, rtol=5e-2, atol=1e-2 * scale, err_msg=var.path)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_bf16_reversible_embedding_16bit_products(tie_weights, monkeypatch):
    """Under mixed_bfloat16 the reverse projection's taps (h, logit
    gradients) enter the norm products as 16-bit floats: the same norms and
    sums as casting them first, and close to the vectorized path."""
    rng = _rng(10)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model, _ = _reversible_model(tie_weights)
    finally:
        keras.config.set_dtype_policy("float32")
    x = rng.integers(0, 5, size=(5, 6)).astype("int32")
    y = rng.normal(size=(5, 2)).astype("float32")
    tv, ntv = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
    mv, ov = [v.value for v in model.metrics_variables], [v.value for v in model.optimizer.variables]

    def logit_gram_operands():
        """dtypes of the norm products' operands shaped like the logit
        gradients (..., T, V)."""
        jaxpr = jax.make_jaxpr(lambda x, y: ghost.clipped_sums(
            model, tv, ntv, mv, ov, x, y, None, jnp.ones((5,), bool), 0.2).sq_norms)(x, y)
        return {str(v.aval.dtype) for e in jaxpr.eqns if e.primitive.name == "dot_general"
                and "dp_ghost_norms" in str(e.source_info.name_stack)
                for v in e.invars if v.aval.shape[-2:] == (6, 5)}

    assert logit_gram_operands() == {"bfloat16"}
    vec, half = _both(model, x, y, clip=0.2)
    monkeypatch.setattr(ghost, "HALF_PRECISION_NORM_PRODUCTS", False)
    assert logit_gram_operands() == {"float32"}
    _, cast = _both(model, x, y, clip=0.2)
    np.testing.assert_allclose(half["sq"], cast["sq"], rtol=1e-5)
    np.testing.assert_allclose(half["sq"], vec["sq"], rtol=3e-2)
    for var, a, b in zip(model.trainable_variables, half["sums"], cast["sums"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=var.path)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_finite_fast_path_branch_only_for_float32_taps(policy):
    """The book-keeping sums branch (lax.cond) to the select-free path only
    where it saves a pass: with 16-bit taps the selects fuse into the casts
    to float32, and the branch would only cost a host round trip on GPUs."""
    rng = _rng(9)
    keras.config.set_dtype_policy(policy)
    try:
        model = _branches([(5, 4), (6, 6, 2)], [lambda i: layers.Dense(6)(i),
                                                  lambda i: layers.Conv2D(3, 3)(i)])
    finally:
        keras.config.set_dtype_policy("float32")
    x = [rng.normal(size=(4, 5, 4)).astype("float32"), rng.normal(size=(4, 6, 6, 2)).astype("float32")]
    y = rng.normal(size=(4, 2)).astype("float32")
    tv, ntv = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
    mv, ov = [v.value for v in model.metrics_variables], [v.value for v in model.optimizer.variables]

    def run(x, y):
        return ghost.clipped_sums(model, tv, ntv, mv, ov, x, y, None, jnp.ones((4,), bool), 1.0).sums

    prims = {e.primitive.name for e in jax.make_jaxpr(run)(x, y).eqns}
    assert ("cond" in prims) == (policy == "float32"), sorted(prims)


# ------------------------------------------------------------- fit


def _fit(clipping):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    ids = keras.Input((5,), dtype="int32")
    h = layers.Dropout(0.2)(layers.Dense(8, activation="relu")(layers.Embedding(7, 4)(ids)))
    model = keras_dpsgd.DPModel(ids, layers.Dense(3)(layers.Flatten()(h)))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=_sparse_ce(), metrics=["accuracy"])
    x = rng.integers(0, 7, size=(64, 5)).astype("int32")
    y = rng.integers(0, 3, size=(64,)).astype("int32")
    hist = model.fit(x, y, batch_size=10, epochs=1, steps_per_epoch=2, physical_batch_size=8,
                     l2_norm_clip=0.5, noise_multiplier=1.1, seed=3, clipping=clipping, verbose=0)
    return model, hist


def test_fit_ghost_equals_vectorized():
    vec, hv = _fit("vectorized")
    gh, hg = _fit("ghost")
    assert vec._dp_clipping == "vectorized" and gh._dp_clipping == "ghost"
    for a, b in zip(vec.trainable_variables, gh.trainable_variables):
        np.testing.assert_allclose(np.asarray(b.value), np.asarray(a.value), rtol=1e-4, atol=1e-4,
                                   err_msg=a.path)
    for k in ("loss", "accuracy"):
        np.testing.assert_allclose(hg.history[k], hv.history[k], rtol=1e-4)


def test_auto_picks_ghost_when_covered_and_vectorized_otherwise(caplog):
    inputs = keras.Input((5,))
    covered = _compiled(inputs, layers.Dense(2)(layers.Dense(4)(inputs)))
    inputs = keras.Input((4, 5))
    rnn = _compiled(inputs, layers.Dense(2)(layers.SimpleRNN(8)(inputs)))
    for model, shape, want in ((covered, (8, 5), "ghost"), (rnn, (8, 4, 5), "vectorized")):
        batch = (np.zeros(shape, "float32"), np.zeros((8, 2), "float32"), None)
        with caplog.at_level("INFO", logger="keras_dpsgd"):
            assert ghost.select_clipping(model, "auto", batch) == want
            assert model._dp_clipping == want
            ghost.select_clipping(model, "auto", batch)
        assert caplog.text.count(f"uses {want} clipping") == 1  # logged once
        caplog.clear()
    assert ghost.select_clipping(rnn, "ghost", batch) == "ghost"  # the fallback still works
    with pytest.raises(ValueError, match="clipping must be"):
        covered.fit(np.zeros((8, 5)), np.zeros((8, 2)), batch_size=4, l2_norm_clip=1.0,
                    noise_multiplier=1.0, clipping="fast")
