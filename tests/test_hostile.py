"""Hostile inputs: each ends in a clear error or a documented, privacy-safe outcome."""

import warnings

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import ops

import keras_dpsgd
from tests.conftest import compile_sgd, linear_data, small_model, weights_of


def quiet_fit(model, x, y, **kw):
    args = dict(epochs=1, l2_norm_clip=1.0, noise_multiplier=1.0, verbose=0, seed=0)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(x, y, **args)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), frac=st.floats(0.05, 1.0), physical=st.integers(1, 48),
       bad_rows=st.lists(st.integers(0, 39), max_size=5),
       bad_value=st.sampled_from([np.nan, np.inf, -np.inf, 1e30]),
       in_labels=st.booleans())
def test_any_size_and_non_finite_or_huge_values_train_safely(n, frac, physical, bad_rows, bad_value, in_labels):
    x, y = linear_data(n)
    y = y.astype("float32")
    bad = sorted({r for r in bad_rows if r < n})
    for r in bad:
        if in_labels:
            y[r] = bad_value
        else:
            x[r, 0] = bad_value
    batch = max(1.0, frac * n)
    model = small_model(classes=1)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    hist = quiet_fit(model, x, y[:, None], batch_size=batch, steps_per_epoch=3, physical_batch_size=physical)
    # Privacy-safe outcome: training completes, weights stay finite (non-finite
    # rows contribute zero, huge ones are clipped or dropped), every logical
    # step is accounted, and dropped rows are counted.
    assert all(np.isfinite(w).all() for w in weights_of(model))
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 3
    assert hist.history["nonfinite"][0] >= 0
    if not bad:
        assert hist.history["nonfinite"][0] == 0


def test_nan_rows_are_counted_and_excluded_from_the_loss():
    x, y = linear_data(64)
    x[:32] = np.nan
    model = compile_sgd(small_model())
    hist = quiet_fit(model, x, y, batch_size=64, steps_per_epoch=2)  # q = 1: every row each step
    assert hist.history["nonfinite"][0] == 64  # 32 rows x 2 steps
    assert np.isfinite(hist.history["loss"][0])
    assert all(np.isfinite(w).all() for w in weights_of(model))


def test_a_huge_example_moves_the_weights_by_at_most_c_over_expected_batch_size():
    x, y = linear_data(16)
    model = small_model(classes=1)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    w0 = weights_of(model)
    yy = np.zeros((16, 1), "float32")
    yy[0] = 1e15
    quiet_fit(model, x, yy, batch_size=16, steps_per_epoch=1, noise_multiplier=0.0)
    step = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(weights_of(model), w0)))
    assert step <= 16 * 1.0 / 16 + 1e-5  # at most N examples x C / (qN)


def test_n_equal_one_and_physical_batch_larger_than_n():
    x, y = linear_data(1)
    model = compile_sgd(small_model())
    hist = quiet_fit(model, x, y, batch_size=1, physical_batch_size=64, steps_per_epoch=4)
    assert len(hist.history["epsilon"]) == 1 and np.isfinite(hist.history["epsilon"][0])


def test_empty_dataset_is_refused():
    model = compile_sgd(small_model())
    with pytest.raises(ValueError, match="empty"):
        quiet_fit(model, np.zeros((0, 8), "float32"), np.zeros((0,), "int32"), batch_size=1)


@pytest.mark.parametrize("x", [np.array([["a"] * 8] * 4), np.array([[object()] * 8] * 4, dtype=object)])
def test_non_numeric_inputs_are_refused(x):
    model = compile_sgd(small_model())
    with pytest.raises(ValueError, match="numeric"):
        quiet_fit(model, x, np.zeros((4,), "int32"), batch_size=2)


def test_ragged_dict_inputs_are_refused():
    a = keras.Input((4,), name="a")
    b = keras.Input((4,), name="b")
    model = compile_sgd(keras_dpsgd.DPModel({"a": a, "b": b}, keras.layers.Dense(2)(keras.layers.Concatenate()([a, b]))))
    with pytest.raises(ValueError, match="same number of examples"):
        quiet_fit(model, {"a": np.zeros((10, 4), "float32"), "b": np.zeros((9, 4), "float32")},
                  np.zeros((10,), "int32"), batch_size=2)


def test_sample_weights_scale_the_loss_before_clipping():
    # q = 1 and sigma = 0: the update is sum_i clip(w_i g_i) / N exactly.
    x, y = linear_data(32)

    def update(weights):
        model = compile_sgd(small_model(), lr=1.0)
        w0 = weights_of(model)
        quiet_fit(model, x, y, batch_size=32, steps_per_epoch=1, noise_multiplier=0.0,
                  sample_weight=weights)
        return np.sqrt(sum(np.sum((p - q) ** 2) for p, q in zip(weights_of(model), w0)))

    assert update(np.zeros(32, "float32")) == 0.0  # weight 0 removes an example
    small, huge = update(np.ones(32, "float32")), update(np.full(32, 1e6, "float32"))
    assert 0 < small < huge <= 1.0 + 1e-5  # a huge weight is clipped: never above C


def test_one_nan_example_drops_only_itself_in_a_grouped_convolution():
    """I3/I4 across examples: a grouped convolution with several channels per
    group, one NaN image in a batch taken whole (q = 1). Exactly that example
    is dropped on every backend (JAX takes ghost clipping: its vmapped
    gradients mix examples here, see tests/test_ghost.py)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 5, 5, 4)).astype("float32")
    x[2, 1, 1, 0] = np.nan
    y = rng.integers(0, 2, size=(8,)).astype("int32")
    inputs = keras.Input((5, 5, 4))
    h = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, groups=2)(inputs))
    model = keras_dpsgd.DPModel(inputs, keras.layers.Dense(2)(h))
    compile_sgd(model)
    hist = quiet_fit(model, x, y, batch_size=8, steps_per_epoch=1, physical_batch_size=8)
    assert hist.history["nonfinite"][0] == 1
    assert all(np.isfinite(w).all() for w in weights_of(model))
