"""I3 (flat per-example clipping) and I4 (padded / non-finite rows contribute zero)."""

import numpy as np
import pytest
from keras import ops

from keras_dpsgd import clipping


def np_(t):
    return np.asarray(ops.convert_to_numpy(t))


def reference(grads, mask, clip):
    b = grads[0].shape[0]
    flat = np.concatenate([g.reshape(b, -1) for g in grads], axis=1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)
    keep = mask & np.isfinite(norms)
    c = np.where(keep, clip / np.maximum(np.where(np.isfinite(norms), norms, 1), clip), 0.0)
    return [np.einsum("b,b...->...", c, np.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0)) for g in grads]


def test_clipping_is_flat_over_all_weights_and_matches_reference():
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(6, 3, 4)).astype("float32") * 3, rng.normal(size=(6, 5)).astype("float32")]
    mask = np.array([1, 1, 1, 1, 0, 1], bool)
    sums, keep, bad = clipping.clip_and_sum([ops.convert_to_tensor(g) for g in grads], mask, 1.5)
    for got, want in zip(sums, reference(grads, mask, 1.5)):
        np.testing.assert_allclose(np_(got), want, rtol=1e-5, atol=1e-6)
    assert int(np_(bad)) == 0


def test_each_clipped_example_has_norm_at_most_c():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(5, 100)).astype("float32") * np.array([0.01, 1, 10, 100, 1e6])[:, None].astype("float32")
    for i in range(5):
        m = np.zeros(5, bool)
        m[i] = True
        (s,), _, _ = clipping.clip_and_sum([ops.convert_to_tensor(g)], m, 1.0)
        assert np.linalg.norm(np_(s)) <= 1.0 + 1e-5
    # Small gradients are left alone (clip factor 1).
    m = np.array([1, 0, 0, 0, 0], bool)
    (s,), _, _ = clipping.clip_and_sum([ops.convert_to_tensor(g)], m, 1.0)
    np.testing.assert_allclose(np_(s), g[0], rtol=1e-6)


def test_padded_rows_with_nan_gradients_contribute_zero():
    g = np.ones((4, 3), "float32")
    g[2] = np.nan
    g[3] = np.inf
    mask = np.array([1, 1, 0, 0], bool)
    (s,), keep, bad = clipping.clip_and_sum([ops.convert_to_tensor(g)], mask, 100.0)
    # g * mask would give NaN here (NaN * 0 = NaN); where() gives exactly zero.
    np.testing.assert_array_equal(np_(s), [2.0, 2.0, 2.0])
    assert int(np_(bad)) == 0


def test_real_rows_with_non_finite_gradients_are_dropped_and_counted():
    g = np.ones((3, 2), "float32")
    g[1, 0] = np.nan
    (s,), keep, bad = clipping.clip_and_sum([ops.convert_to_tensor(g)], np.ones(3, bool), 100.0)
    np.testing.assert_array_equal(np_(s), [2.0, 2.0])
    assert int(np_(bad)) == 1 and np_(keep).tolist() == [True, False, True]


@pytest.mark.parametrize("clip", [0.1, 1.0, 10.0])
def test_sum_sensitivity_is_at_most_c_per_example(clip):
    # Adding one (arbitrarily large) example changes the sum by at most C.
    rng = np.random.default_rng(2)
    g = rng.normal(size=(8, 20)).astype("float32")
    g[7] *= 1e30
    with_ = np_(clipping.clip_and_sum([ops.convert_to_tensor(g)], np.ones(8, bool), clip)[0][0])
    without = np_(clipping.clip_and_sum([ops.convert_to_tensor(g)], np.arange(8) < 7, clip)[0][0])
    assert np.linalg.norm(with_ - without) <= clip * (1 + 1e-5)
