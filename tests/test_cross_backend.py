"""The compiled step computes the same DP quantity on every backend.

Each backend's step (per-example gradients, I3 clipping, I4 masking, I2
accumulation, I6 division by q*N) is checked against one float64 numpy
reference with hand-derived gradients, so jax, tensorflow and torch agree with
each other through it. Run once per backend (tools/run_tests.py).
"""

import numpy as np
import pytest
import keras
from keras import ops

import keras_dpsgd
from keras_dpsgd import backend as dp_backend

from tests.conftest import BACKEND

D, K = 5, 3  # features, classes


def softmax_model(weights_seed=0):
    inputs = keras.Input((D,))
    outputs = keras.layers.Dense(K)(inputs)
    model = keras_dpsgd.DPModel(inputs, outputs)
    rng = np.random.default_rng(weights_seed)
    kernel = (rng.normal(size=(D, K)) * 0.5).astype("float32")
    bias = (rng.normal(size=(K,)) * 0.1).astype("float32")
    model.set_weights([kernel, bias])
    return model, kernel.astype(np.float64), bias.astype(np.float64)


def reference_clipped_sum(kernel, bias, x, y, sample_weight, mask, clip):
    """sum_i where(mask_i, min(1, C/||g_i||) g_i, 0) with g_i the gradient of
    w_i * CE(softmax(x_i W + b), y_i): dW = w_i x_i (p_i - e_y)^T, db = w_i (p_i - e_y)."""
    x = x.astype(np.float64)
    logits = x @ kernel + bias
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    r = p - np.eye(K)[y]
    if sample_weight is not None:
        r = r * sample_weight.astype(np.float64)[:, None]
    g_kernel = x[:, :, None] * r[:, None, :]
    g_bias = r
    norms = np.sqrt((g_kernel ** 2).sum(axis=(1, 2)) + (g_bias ** 2).sum(axis=1))
    c = np.where(mask, np.minimum(1.0, clip / norms), 0.0)
    return np.einsum("b,bij->ij", c, g_kernel), np.einsum("b,bj->j", c, g_bias), norms


def np_(t):
    return np.asarray(ops.convert_to_numpy(t), dtype=np.float64)


def accumulated(model):
    """The optimizer's accumulated clipped sums, one per weight (summed over
    the per-device partial sums when the accumulators have a shard axis)."""
    out = []
    for acc, v in zip(model.optimizer._accumulators, model.trainable_variables):
        a = np_(acc)
        out.append(a.sum(axis=0) if a.ndim == len(v.shape) + 1 else a)
    return out


def configured(model, clip, expected_batch_size, x, y, sample_weight=None):
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model._symbolic_build(data_batch=(x, y, sample_weight))
    opt = model.optimizer
    opt.build(model.trainable_variables)
    opt.configure(l2_norm_clip=clip, noise_multiplier=0.0, expected_batch_size=expected_batch_size,
                  sampling_rate=expected_batch_size / 100.0, target_delta=1e-5,
                  noise_seed_words=[1, 2])
    return opt


def assert_close(got, want, rtol=1e-5):
    # Relative to the size of the quantity: float32 compute, float64 reference.
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)
    assert np.linalg.norm(got - want) <= rtol * np.linalg.norm(want)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample_weight"])
def test_step_matches_float64_reference_clipped_masked_sum(weighted):
    check_step_against_reference(weighted)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA or not is a TensorFlow choice")
@pytest.mark.parametrize("xla", [True, False], ids=["xla", "no_xla"])
def test_tensorflow_step_matches_reference_with_and_without_xla(xla, monkeypatch):
    from keras_dpsgd.backend import tensorflow as tf_backend

    monkeypatch.setattr(tf_backend, "use_xla", lambda model: xla)
    check_step_against_reference(weighted=True)


def check_step_against_reference(weighted):
    rng = np.random.default_rng(42)
    p = 8
    x = (rng.normal(size=(2 * p, D)) * np.linspace(0.2, 4.0, 2 * p)[:, None]).astype("float32")
    y = rng.integers(0, K, size=(2 * p,)).astype("int32")
    sw = rng.uniform(0.5, 2.0, size=(2 * p,)).astype("float32") if weighted else None
    # Physical batch 1: full. Physical batch 2: 5 real rows, 3 padded rows that
    # point at example 0 (as sampling.physical_batches pads) and are masked out.
    idx2 = np.array([8, 9, 10, 11, 12, 0, 0, 0])
    batches = [(np.arange(p), np.ones(p, bool), False), (idx2, np.arange(p) < 5, True)]
    clip, expected = 1.0, 6.5

    model, kernel, bias = softmax_model()
    opt = configured(model, clip, expected, x[:p], y[:p], None if sw is None else sw[:p])
    ref = [reference_clipped_sum(kernel, bias, x[i], y[i], None if sw is None else sw[i], m, clip)
           for i, m, _ in batches]
    norms = np.concatenate([ref[0][2], ref[1][2][:5]])
    assert (norms > clip).any() and (norms < clip).any(), "the data must exercise both branches"

    runner = dp_backend.impl.Runner(model)
    runner.begin_epoch()
    i, m, last = batches[0]
    runner.run((x[i], y[i], None if sw is None else sw[i], m, np.full((p,), last)))
    runner.sync()
    # After a non-last physical batch: the clipped sum is accumulated, no update.
    acc_kernel, acc_bias = accumulated(model)
    assert_close(acc_kernel, ref[0][0])
    assert_close(acc_bias, ref[0][1])
    np.testing.assert_array_equal(np_(model.trainable_variables[0]), kernel)
    assert int(np_(opt.iterations)) == 0

    i, m, last = batches[1]
    runner.run((x[i], y[i], None if sw is None else sw[i], m, np.full((p,), last)))
    runner.end()
    # After the last one: one SGD(1.0) update by (sum of both batches) / (q*N).
    want_kernel = (ref[0][0] + ref[1][0]) / expected
    want_bias = (ref[0][1] + ref[1][1]) / expected
    assert_close(kernel - np_(model.trainable_variables[0]), want_kernel, rtol=2e-5)
    assert_close(bias - np_(model.trainable_variables[1]), want_bias, rtol=2e-5)
    assert int(np_(opt.iterations)) == 1
    for a in opt._accumulators:
        np.testing.assert_array_equal(np_(a), 0.0)


@pytest.mark.parametrize("layer_seed", [None, 3], ids=["unseeded", "seeded"])
def test_examples_in_one_physical_batch_get_different_dropout_masks(layer_seed):
    # Identical rows, Dropout, then a linear output: example i's gradient is
    # proportional to its dropout mask m_i. With C tiny every gradient is
    # clipped to norm C, so ||sum|| = B*C exactly iff all masks are equal.
    d, p, clip = 32, 8, 1e-3
    inputs = keras.Input((d,))
    h = keras.layers.Dropout(0.5, seed=layer_seed)(inputs)
    outputs = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")(h)
    model = keras_dpsgd.DPModel(inputs, outputs)
    x = np.ones((p, d), "float32")
    y = np.zeros((p, 1), "float32")
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    model._symbolic_build(data_batch=(x, y, None))
    opt = model.optimizer
    opt.build(model.trainable_variables)
    opt.configure(l2_norm_clip=clip, noise_multiplier=0.0, expected_batch_size=p,
                  sampling_rate=0.5, target_delta=1e-5, noise_seed_words=[1, 2])
    runner = dp_backend.impl.Runner(model)
    runner.begin_epoch()
    sums = []
    for _ in range(2):
        runner.run((x, y, None, np.ones(p, bool), np.zeros(p, bool)))
        runner.sync()
        sums.append(accumulated(model)[0].copy())
    runner.end()
    first, second = sums[0], sums[1] - sums[0]
    assert np.linalg.norm(first) < 0.95 * p * clip, "all examples shared one dropout mask"
    # The layer's randomness advances between physical batches too.
    assert not np.allclose(first, second)


def test_one_fit_traces_the_step_once():
    traces = []

    class CountingDPModel(keras_dpsgd.DPModel):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(8, activation="relu")
            self.dropout = keras.layers.Dropout(0.2)
            self.out = keras.layers.Dense(2)

        def call(self, x, training=False):
            return self.out(self.dropout(self.hidden(x), training=training))

        def train_step(self, *args):
            traces.append(1)  # Python runs only while tracing (jax, tensorflow)
            return super().train_step(*args)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = CountingDPModel()
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    # Expected logical batch 16 over physical batches of 8: several physical
    # batches per step, padded ones, and (by chance) different counts per step.
    model.fit(x, y, batch_size=16, epochs=2, steps_per_epoch=4, l2_norm_clip=1.0,
              noise_multiplier=1.0, physical_batch_size=8, seed=0, verbose=0)
    assert int(np_(model.optimizer.iterations)) == 8
    if BACKEND == "torch":
        assert len(traces) >= 8  # eager: one Python call per physical batch
    else:
        assert len(traces) == 1
        # A second fit reuses the traced step (same physical shape).
        model.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=2, l2_norm_clip=1.0,
                  noise_multiplier=1.0, physical_batch_size=8, verbose=0)
        assert len(traces) == 1


def test_gaussian_noise_is_a_pure_function_of_seed_step_and_index():
    seed = ops.convert_to_tensor(np.array([7, -3], np.int32))

    def draw(step, index, s=seed):
        return np_(dp_backend.gaussian_noise(s, ops.convert_to_tensor(step, "int32"), index, (2000,)))

    a = draw(5, 0)
    np.testing.assert_array_equal(a, draw(5, 0))
    for other in (draw(6, 0), draw(5, 1),
                  draw(5, 0, ops.convert_to_tensor(np.array([8, -3], np.int32)))):
        assert np.abs(np.corrcoef(a, other)[0, 1]) < 0.1
    assert abs(a.mean()) < 0.1 and abs(a.std() - 1.0) < 0.1


def test_gaussian_noises_are_the_per_variable_draws():
    """What the optimizer draws per logical step (`gaussian_noises`, keys
    derived in one vectorized op on JAX) is exactly gaussian_noise(seed,
    step, i, shape_i) for each variable i: fresh per variable, same numbers."""
    seed = ops.convert_to_tensor(np.array([7, -3], np.int32))
    step = ops.convert_to_tensor(4, "int32")
    shapes = [(3, 5), (7,), (), (2, 1, 4)]
    got = [np_(n) for n in dp_backend.gaussian_noises(seed, step, shapes)]
    assert [g.shape for g in got] == shapes
    for i, (g, shape) in enumerate(zip(got, shapes)):
        np.testing.assert_array_equal(g, np_(dp_backend.gaussian_noise(seed, step, i, shape)))
    assert not np.array_equal(got[0].reshape(-1)[:4], got[3].reshape(-1)[:4])
