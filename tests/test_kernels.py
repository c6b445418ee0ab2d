"""The fused ghost-norm kernel (keras_dpsgd.kernels): the same per-example
norms as the XLA Gram form, through Pallas' interpreter on CPU; and it lowers
to a Triton kernel for NVIDIA GPUs. JAX only."""

import numpy as np
import pytest

from tests.conftest import BACKEND

if BACKEND != "jax":
    pytest.skip("the fused kernel is JAX's", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from keras_dpsgd import ghost, kernels  # noqa: E402


def _reference(a, g):
    a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
    return np.einsum("nts,nts->n", np.einsum("ntd,nsd->nts", a, a), np.einsum("nte,nse->nts", g, g))


@pytest.mark.parametrize("n,t,d_a,d_g", [
    (3, 13, 16, 32),    # T below one 16-row tile
    (2, 70, 64, 48),    # two 64-row tiles, the second mostly past T; d_g in 16-blocks
    (2, 197, 32, 64),   # ViT's T: four tiles, upper triangle only
    (1, 2, 16, 16),
])
def test_gram_norm_equals_the_gram_form(n, t, d_a, d_g):
    rng = np.random.default_rng(t)
    a = rng.normal(size=(n, t, d_a)).astype("float32")
    g = rng.normal(size=(n, t, d_g)).astype("float32")
    got = np.asarray(jax.jit(lambda a, g: kernels.gram_norm(a, g, interpret=True))(a, g))
    np.testing.assert_allclose(got, _reference(a, g), rtol=2e-5)


def test_gram_norm_refuses_shapes_it_does_not_cover():
    assert kernels.supported(197, 768, 3072)
    assert not kernels.supported(1, 16, 16)      # T = 1 has its own closed form
    assert not kernels.supported(9, 27, 16)      # conv patches of 3x3x3
    with pytest.raises(ValueError, match="unsupported shapes"):
        kernels.gram_norm(jnp.ones((2, 5, 20)), jnp.ones((2, 5, 16)), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        kernels.gram_norm(jnp.ones((2, 5, 32)), jnp.ones((2, 5, 32)), interpret=True, block_rows=24)
    with pytest.raises(ValueError, match="must divide"):
        kernels.gram_norm(jnp.ones((2, 5, 48)), jnp.ones((2, 5, 32)), interpret=True, block_features=32)


def test_gram_norm_lowers_to_a_triton_kernel_for_cuda():
    """Cross-platform lowering on the CPU machine checks what Pallas' Triton
    lowering requires (block shapes, masked loads, dot sizes) at ViT-B/16's
    shapes: the module holds one Triton custom call, named."""
    a = jax.ShapeDtypeStruct((64, 197, 768), jnp.float32)
    g = jax.ShapeDtypeStruct((64, 197, 3072), jnp.float32)
    text = jax.jit(kernels.gram_norm).trace(a, g).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "dp_gram_norm" in text


def test_clipped_sum_equals_the_masked_weighted_sum_and_drops_nan_rows():
    rng = np.random.default_rng(5)
    for n, t, d_a, d_g in [(3, 13, 16, 32), (4, 70, 64, 48)]:  # rows not a multiple of the row block
        a = rng.normal(size=(n, t, d_a)).astype("float32")
        g = rng.normal(size=(n, t, d_g)).astype("float32")
        c = rng.random(n).astype("float32")
        keep = np.ones(n, bool)
        keep[1] = False
        a[1, 0, 0], g[1, 2, 3] = np.nan, np.inf  # a dropped example's rows: exactly zero (I4)
        got = np.asarray(jax.jit(lambda *z: kernels.clipped_sum(*z, interpret=True))(a, g, c, keep))
        kept = keep[:, None, None]
        ref = np.einsum("ntd,nte->de", np.where(kept, a, 0.0).astype(np.float64),
                        np.where(kept, g * c[:, None, None], 0.0).astype(np.float64))
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-5)
    assert not kernels.sum_supported(27, 16)
    with pytest.raises(ValueError, match="unsupported shapes"):
        kernels.clipped_sum(jnp.ones((2, 5, 20)), jnp.ones((2, 5, 16)), jnp.ones(2), jnp.ones(2, bool))


def test_clipped_sum_lowers_to_a_triton_kernel_for_cuda():
    args = (jax.ShapeDtypeStruct((64, 197, 768), jnp.float32), jax.ShapeDtypeStruct((64, 197, 3072), jnp.float32),
            jax.ShapeDtypeStruct((64,), jnp.float32), jax.ShapeDtypeStruct((64,), jnp.bool_))
    text = jax.jit(kernels.clipped_sum).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "dp_clipped_sum" in text


@pytest.fixture
def count_kernel_calls(monkeypatch):
    calls = []
    real_norm, real_sum = kernels.gram_norm, kernels.clipped_sum

    def counted_norm(a, g, interpret=False):
        calls.append(("norm", a.shape, g.shape))
        return real_norm(a, g, interpret=interpret)

    def counted_sum(a, g, factors, keep, interpret=False):
        calls.append(("sum", a.shape, g.shape))
        return real_sum(a, g, factors, keep, interpret=interpret)

    monkeypatch.setattr(kernels, "gram_norm", counted_norm)
    monkeypatch.setattr(kernels, "clipped_sum", counted_sum)
    monkeypatch.setattr(ghost, "NORM_METHOD", "gram")
    return calls


def test_ghost_clipping_with_the_kernel_matches_the_vectorized_path(monkeypatch, count_kernel_calls):
    """A transformer block's norms through the kernel (masked and NaN rows
    included) match per-example gradients; the kernel served every
    sequence layer (q, k, v, attention output, both MLP layers)."""
    from tests.test_ghost import _assert_match, _compiled, _rng, _sparse_ce, _transformer

    monkeypatch.setattr(ghost, "GRAM_KERNEL", "interpret")
    monkeypatch.setattr(ghost, "SUM_KERNEL", "interpret")
    rng = _rng(11)
    ids, out = _transformer(seq=6, d=16, heads=2)
    model = _compiled(ids, out, loss=_sparse_ce())
    x = rng.integers(0, 11, size=(6, 6)).astype("int32")
    y = rng.integers(0, 3, size=(6,)).astype("int32")
    sw = np.ones((6,), "float32")
    sw[1] = np.nan
    _, gh = _assert_match(model, x, y, mask=[1, 1, 1, 1, 1, 0], sw=sw, clip=0.3)
    assert list(gh["keep"]) == [True, False, True, True, True, False]
    # Both kernels served every sequence layer (q, k, v, attention output,
    # both MLP layers); not the 3-class head (3 outputs: not a multiple of 16).
    assert [c[0] for c in count_kernel_calls].count("norm") == 6, count_kernel_calls
    assert [c[0] for c in count_kernel_calls].count("sum") == 6, count_kernel_calls


def test_triton_setting_off_gpu_uses_the_xla_form(monkeypatch, count_kernel_calls):
    from tests.test_ghost import _assert_match, _compiled, _rng, _sparse_ce, _transformer

    monkeypatch.setattr(ghost, "GRAM_KERNEL", "triton")
    monkeypatch.setattr(ghost, "SUM_KERNEL", "triton")
    assert jax.default_backend() != "gpu"
    rng = _rng(12)
    ids, out = _transformer(seq=6, d=16, heads=2)
    model = _compiled(ids, out, loss=_sparse_ce())
    _assert_match(model, rng.integers(0, 11, size=(4, 6)).astype("int32"),
                  rng.integers(0, 3, size=(4,)).astype("int32"), clip=0.3)
    assert count_kernel_calls == []
    monkeypatch.setattr(ghost, "GRAM_KERNEL", "cuda")
    with pytest.raises(ValueError, match="GRAM_KERNEL"):
        ghost._fused_gram(6, 16, 16)
