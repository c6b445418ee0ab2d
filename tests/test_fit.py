"""DPModel.fit end to end: I2, I5, I6, I7 and the Keras conventions."""

import logging
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_dpsgd
from keras_dpsgd import accounting, sampling
from tests.conftest import compile_sgd, jax_only, linear_data, small_model, weights_of


def zero_grad_model(d=64, units=64, seed=0):
    """A model whose loss has zero gradient: every update is pure noise."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((d,))
    outputs = keras.layers.Dense(units, use_bias=False)(inputs)
    model = keras_dpsgd.DPModel(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=lambda yt, yp: 0.0 * ops.sum(yp, axis=-1))
    return model


class RecordWeights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.kernels = []

    def on_train_batch_end(self, batch, logs=None):
        self.kernels.append(np.array(ops.convert_to_numpy(self.model.trainable_variables[0])))


def test_noise_std_is_sigma_c_over_expected_batch_size_and_fresh_every_step():
    n, e, sigma, clip = 1600, 16, 1.3, 0.7
    model = zero_grad_model()
    w0 = weights_of(model)[0]
    rec = RecordWeights()
    x = np.zeros((n, 64), "float32")
    model.fit(x, np.zeros((n, 64), "float32"), batch_size=e, epochs=1, steps_per_epoch=12,
              l2_norm_clip=clip, noise_multiplier=sigma, physical_batch_size=8, seed=3,
              callbacks=[rec], verbose=0)
    sizes = [len(sampling.PoissonSampler(n, e / n, model.optimizer.config_values()["sampler_seed_words"]).sample(t))
             for t in range(12)]
    assert len(set(sizes)) > 3  # actual sizes vary; the noise scale must not
    kernels = [w0] + rec.kernels
    deltas = [b - a for a, b in zip(kernels[:-1], kernels[1:])]
    want = sigma * clip / e  # I6: divided by the expected size q*N, never the actual one
    for d in deltas:
        # 4096 draws: the sample std is within 6% of the truth with prob > 1 - 1e-8.
        # Noise per physical batch (2-3 per step here) or division by the actual
        # size (which varies by ~25% here) breaks this on some step.
        assert np.std(d) == pytest.approx(want, rel=0.06)
        assert abs(np.mean(d)) < 5 * want / 64
    # The "same noise every step" pitfall (untracked seed state on JAX).
    for a, b in zip(deltas[:-1], deltas[1:]):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.1
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 12  # logical steps


def test_result_does_not_depend_on_physical_batch_size():
    # I2: sampling, noise and the update belong to the logical step.
    x, y = linear_data(300)
    out = []
    for p in (4, 32, 128):
        model = compile_sgd(small_model())
        model.fit(x, y, batch_size=30, epochs=1, steps_per_epoch=5, l2_norm_clip=1.0,
                  noise_multiplier=0.5, physical_batch_size=p, seed=11, verbose=0)
        out.append(weights_of(model))
    for other in out[1:]:
        for a, b in zip(out[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_update_is_clipped_sum_over_expected_batch_size():
    # sigma = 0, identical examples with huge gradients: each contributes exactly
    # C / (q N) to the update (sensitivity <= C / (q N) per example).
    n, e, clip = 200, 20, 0.5
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras_dpsgd.DPModel(inputs, keras.layers.Dense(1, use_bias=False)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    w0 = weights_of(model)[0]
    x = np.ones((n, 4), "float32")
    y = np.full((n, 1), 1e6, "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=e, epochs=1, steps_per_epoch=1, l2_norm_clip=clip,
                  noise_multiplier=0.0, physical_batch_size=8, seed=5, verbose=0)
    size = len(sampling.PoissonSampler(n, e / n, model.optimizer.config_values()["sampler_seed_words"]).sample(0))
    assert size > 0
    step = weights_of(model)[0] - w0
    assert np.linalg.norm(step) == pytest.approx(size * clip / e, rel=1e-4)


def test_fit_learns_reports_epsilon_and_accounts_logical_steps():
    x, y = linear_data(512, seed=2)
    model = compile_sgd(small_model(dropout=0.1), lr=0.5)
    hist = model.fit(x, y, batch_size=64, epochs=3, l2_norm_clip=1.0, noise_multiplier=1.0,
                     physical_batch_size=32, seed=1, validation_data=(x, y), verbose=0)
    steps = 3 * 8  # default steps_per_epoch = round(1 / q) = 8
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == steps
    eps = hist.history["epsilon"]
    assert len(eps) == 3 and eps[0] < eps[1] < eps[2]
    want = accounting.epsilon(64 / 512, 1.0, steps, 1 / 5120)
    assert eps[-1] == pytest.approx(want, rel=1e-5)
    spent, delta = model.privacy_spent()
    assert spent == pytest.approx(want, rel=1e-5) and delta == pytest.approx(1 / 5120)
    assert hist.history["val_accuracy"][-1] > 0.75
    assert all(np.isfinite(hist.history["loss"]))


def test_target_epsilon_is_met_and_training_refuses_to_exceed_it():
    x, y = linear_data(400)
    model = compile_sgd(small_model())
    model.fit(x, y, batch_size=40, epochs=2, l2_norm_clip=1.0, target_epsilon=2.0,
              target_delta=1e-5, seed=0, verbose=0)
    eps, delta = model.privacy_spent()
    assert 1.9 < eps <= 2.0 and delta == 1e-5
    with pytest.raises(keras_dpsgd.PrivacyBudgetExceededError, match="budget"):
        model.fit(x, y, batch_size=40, epochs=1, l2_norm_clip=1.0, target_epsilon=2.0,
                  target_delta=1e-5, verbose=0)
    assert model.privacy_spent()[0] == eps


class StopAfter(keras.callbacks.Callback):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 >= self.steps:
            self.model.stop_training = True


def test_budget_stop_mid_fit():
    # Calibrated for 20 steps, interrupted after 5, then asked for 30 more:
    # the second fit stops when the next step would exceed the budget.
    x, y = linear_data(200)
    model = compile_sgd(small_model())
    kw = dict(batch_size=20, l2_norm_clip=1.0, target_epsilon=1.5, target_delta=1e-5, verbose=0)
    model.fit(x, y, epochs=2, seed=0, callbacks=[StopAfter(5)], **kw)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 5
    sigma = model.optimizer.config_values()["noise_multiplier"]
    budget = accounting.max_steps(1.5, 1e-5, 0.1, sigma)
    assert 20 <= budget < 35
    with pytest.warns(UserWarning, match="would exceed target_epsilon"):
        hist = model.fit(x, y, epochs=3, **kw)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == budget
    assert model.privacy_spent()[0] <= 1.5
    assert hist.history["epsilon"][-1] <= 1.5


def test_second_fit_continues_the_same_streams():
    x, y = linear_data(200)
    a = compile_sgd(small_model())
    a.fit(x, y, batch_size=20, epochs=2, l2_norm_clip=1.0, noise_multiplier=1.0, seed=4, verbose=0)
    b = compile_sgd(small_model())
    b.fit(x, y, batch_size=20, epochs=1, l2_norm_clip=1.0, noise_multiplier=1.0, seed=4, verbose=0)
    b.fit(x, y, batch_size=20, epochs=1, l2_norm_clip=1.0, noise_multiplier=1.0, verbose=0)
    for u, v in zip(weights_of(a), weights_of(b)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    assert int(ops.convert_to_numpy(b.optimizer.iterations)) == 20


def test_changing_the_sampling_rate_after_training_is_refused():
    x, y = linear_data(200)
    model = compile_sgd(small_model())
    model.fit(x, y, batch_size=20, epochs=1, l2_norm_clip=1.0, noise_multiplier=1.0, verbose=0)
    with pytest.raises(ValueError, match="sampling rate"):
        model.fit(x, y, batch_size=40, epochs=1, l2_norm_clip=1.0, noise_multiplier=1.0, verbose=0)


def test_zero_noise_warns_that_epsilon_is_infinite():
    x, y = linear_data(64)
    model = compile_sgd(small_model())
    with pytest.warns(UserWarning, match="NO PRIVACY"):
        hist = model.fit(x, y, batch_size=16, epochs=1, l2_norm_clip=1.0, noise_multiplier=0.0, verbose=0)
    assert hist.history["epsilon"] == [float("inf")]


def test_optimizers_with_state_and_schedules_work():
    x, y = linear_data(128)
    for opt in (keras.optimizers.Adam(1e-2), keras.optimizers.AdamW(1e-2),
                keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9), momentum=0.9)):
        model = small_model()
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        w0 = weights_of(model)
        model.fit(x, y, batch_size=32, epochs=1, l2_norm_clip=1.0, noise_multiplier=1.0, verbose=0)
        assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 4
        assert not np.allclose(w0[0], weights_of(model)[0])


def test_make_private_shares_weights_for_sequential_functional_and_subclassed():
    x, y = linear_data(128)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d1 = keras.layers.Dense(8, activation="relu")
            self.d2 = keras.layers.Dense(2)

        def call(self, x, training=None):
            return self.d2(self.d1(x))

    inputs = keras.Input((8,))
    functional = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(8)(inputs)))
    sequential = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    for base in (sequential, functional, Sub()):
        private = keras_dpsgd.make_private(base)
        compile_sgd(private)
        private.fit(x, y, batch_size=32, epochs=1, l2_norm_clip=1.0, noise_multiplier=0.5, verbose=0)
        before = [np.array(ops.convert_to_numpy(v)) for v in base.trainable_variables]
        private.fit(x, y, batch_size=32, epochs=1, l2_norm_clip=1.0, noise_multiplier=0.5, verbose=0)
        after = [np.array(ops.convert_to_numpy(v)) for v in base.trainable_variables]
        assert any(not np.allclose(a, b) for a, b in zip(before, after))
        assert private.trainable_variables[0] is base.trainable_variables[0]


def test_saved_model_resumes_with_accounting_and_streams_intact(tmp_path):
    x, y = linear_data(200)
    kw = dict(batch_size=20, l2_norm_clip=1.0, noise_multiplier=1.0, verbose=0)
    ref = compile_sgd(small_model())
    ref.fit(x, y, epochs=2, seed=9, **kw)

    first = compile_sgd(small_model())
    first.fit(x, y, epochs=1, seed=9, **kw)
    path = str(tmp_path / "dp.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)  # no custom_objects needed
    assert isinstance(resumed, keras_dpsgd.DPModel)
    assert int(ops.convert_to_numpy(resumed.optimizer.iterations)) == 10
    assert resumed.privacy_spent() == pytest.approx(first.privacy_spent())
    resumed.fit(x, y, epochs=1, **kw)
    for u, v in zip(weights_of(ref), weights_of(resumed)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    assert resumed.privacy_spent() == pytest.approx(ref.privacy_spent())


def test_progress_bar_shows_epsilon(capsys):
    x, y = linear_data(64)
    model = compile_sgd(small_model())
    model.fit(x, y, batch_size=16, epochs=1, l2_norm_clip=1.0, noise_multiplier=1.0, verbose=2)
    out = capsys.readouterr().out
    assert "epsilon" in out and "delta" in out


@jax_only
def test_train_step_compiles_once_per_fit_whatever_the_poisson_sizes(caplog):
    import jax

    x, y = linear_data(400)
    model = compile_sgd(small_model(dropout=0.2))
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.DEBUG):
            model.fit(x, y, batch_size=40, epochs=2, l2_norm_clip=1.0, noise_multiplier=1.0,
                      physical_batch_size=16, seed=0, verbose=0)
    finally:
        jax.config.update("jax_log_compiles", False)
    sizes = {len(sampling.PoissonSampler(400, 0.1, model.optimizer.config_values()["sampler_seed_words"]).sample(t))
             for t in range(20)}
    assert len(sizes) > 3
    compiles = [r for r in caplog.records if "Compiling" in r.getMessage() and "train_step" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage()[:120] for r in compiles]


@jax_only
def test_dropout_masks_differ_between_examples():
    import jax.numpy as jnp

    from keras_dpsgd.backend import jax as jb

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32,))
    h = keras.layers.Dropout(0.5)(inputs)
    model = keras_dpsgd.DPModel(inputs, keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")(h))
    model.compile(optimizer="sgd", loss=lambda yt, yp: ops.sum(yp, axis=-1))
    model.build((None, 32))
    model.optimizer.build(model.trainable_variables)
    x = np.ones((4, 32), "float32")
    _, _, grads, _ = jb.per_example_grads(
        model, [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
        [v.value for v in model.metrics_variables], [v.value for v in model.optimizer.variables],
        jnp.asarray(x), jnp.zeros((4, 1)), None)
    g = np.asarray(grads[0])[:, :, 0]  # per-example kernel gradient = dropout mask * 2
    assert set(np.unique(g)) <= {0.0, 2.0}
    assert len({tuple(r) for r in g}) == 4


def test_weights_loaded_before_the_optimizer_is_built_keep_the_accounting(tmp_path):
    # Keras would skip the optimizer state (count mismatch) and restart the step
    # counter at zero: accounting would forget the steps already taken.
    x, y = linear_data(200)
    kw = dict(batch_size=20, l2_norm_clip=1.0, noise_multiplier=1.0, verbose=0)
    a = compile_sgd(small_model())
    a.fit(x, y, epochs=1, seed=2, **kw)
    path = str(tmp_path / "a.weights.h5")
    a.save_weights(path)
    b = compile_sgd(small_model())
    assert not b.optimizer.built
    b.load_weights(path)
    b.fit(x, y, epochs=1, **kw)
    assert int(ops.convert_to_numpy(b.optimizer.iterations)) == 20
    assert b.privacy_spent()[0] == pytest.approx(accounting.epsilon(0.1, 1.0, 20, 1 / 2000), rel=1e-6)


def test_secure_mode_refuses_seeds_and_draws_fresh_noise_keys_every_step():
    x, y = linear_data(64)
    model = compile_sgd(small_model())
    with pytest.raises(ValueError, match="secure_mode"):
        model.fit(x, y, batch_size=16, l2_norm_clip=1.0, noise_multiplier=1.0, seed=1, secure_mode=True)
    n, e, sigma, clip = 1600, 16, 1.3, 0.7
    model = zero_grad_model()
    w0 = weights_of(model)[0]
    rec = RecordWeights()
    model.fit(np.zeros((n, 64), "float32"), np.zeros((n, 64), "float32"), batch_size=e, epochs=1,
              steps_per_epoch=6, l2_norm_clip=clip, noise_multiplier=sigma, physical_batch_size=8,
              secure_mode=True, callbacks=[rec], verbose=0)
    kernels = [w0] + rec.kernels
    deltas = [b - a for a, b in zip(kernels[:-1], kernels[1:])]
    for d in deltas:
        assert np.std(d) == pytest.approx(sigma * clip / e, rel=0.06)
    for a, b in zip(deltas[:-1], deltas[1:]):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.1
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 6


def test_an_error_while_reading_data_surfaces_in_fit():
    class Broken:
        def __len__(self):
            return 64

        def __getitem__(self, idx):
            raise OSError("disk gone")

    model = compile_sgd(small_model())
    x, y = linear_data(64)
    with pytest.raises(OSError, match="disk gone"):
        model.fit(Broken(), y, batch_size=16, l2_norm_clip=1.0, noise_multiplier=1.0, verbose=0)


def test_noise_multiplier_is_never_stored_below_the_calibrated_value():
    # float32 storage must round sigma up (and delta down): otherwise the noise
    # used is below what the budget needs and the reported epsilon exceeds it.
    inp = keras.Input((3,))
    m = keras_dpsgd.DPModel(inp, keras.layers.Dense(2)(inp))
    m.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(size=(100, 3)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    h = m.fit(x, y, batch_size=22, epochs=8, steps_per_epoch=5, l2_norm_clip=1.0, target_epsilon=2.0,
              target_delta=1e-5, seed=0, verbose=0)
    calibrated = accounting.calibrate_noise(2.0, 1e-5, 0.22, 40)
    assert m.optimizer.config_values()["noise_multiplier"] >= calibrated
    assert m.privacy_spent()[0] <= 2.0 and h.history["epsilon"][-1] <= 2.0


def test_evaluate_returns_what_keras_returns():
    x, y = linear_data(64)
    model = compile_sgd(small_model())
    hist = model.fit(x, y, batch_size=16, epochs=1, l2_norm_clip=1.0, noise_multiplier=1.0,
                     validation_data=(x, y), verbose=0)
    assert "nonfinite" in hist.history and "val_nonfinite" not in hist.history
    loss, acc = model.evaluate(x, y, verbose=0)
    assert np.isfinite(loss) and 0 <= acc <= 1


def test_logged_loss_is_the_mean_over_real_rows_of_all_physical_batches():
    """With a learning rate of 0 and no noise the weights stay fixed and every
    example has the same loss L (equal rows): the loss logged per logical step
    and per epoch is L whatever the Poisson sizes, physical batches and
    padding (padded rows and partial sums across physical batches must not
    change the mean); nonfinite is 0."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = keras_dpsgd.DPModel(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = np.ones((200, 3), "float32")
    y = np.full((200, 1), 2.0, "float32")
    expected = float(np.mean((np.asarray(model.predict(x[:1], verbose=0)) - 2.0) ** 2))
    assert expected > 0.1

    class StepLosses(keras.callbacks.Callback):
        seen = []

        def on_train_batch_end(self, batch, logs=None):
            self.seen.append(float(logs["loss"]))

    steps = StepLosses()
    with pytest.warns(UserWarning, match="NO PRIVACY"):
        hist = model.fit(x, y, batch_size=30, epochs=2, steps_per_epoch=3, l2_norm_clip=1.0,
                         noise_multiplier=0.0, physical_batch_size=8, seed=1, verbose=0, callbacks=[steps])
    assert len(steps.seen) == 6
    np.testing.assert_allclose(steps.seen, expected, rtol=1e-5)
    np.testing.assert_allclose(hist.history["loss"], expected, rtol=1e-5)
    assert hist.history["nonfinite"] == [0.0, 0.0]


def test_logged_loss_leaves_out_padded_rows():
    """Padding rows are copies of example 0 (mask False). Example 0 here has a
    loss 10^4 times the others', so counting padding in the logged loss would
    show; the logged epoch loss must equal the mean over the rows the Poisson
    draws actually took (lr 0, no noise: fixed weights)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = keras_dpsgd.DPModel(inputs, keras.layers.Dense(1, kernel_initializer="zeros")(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    n = 120
    x = np.ones((n, 3), "float32")
    y = np.ones((n, 1), "float32")
    y[0] = 100.0  # prediction is 0 + bias 0: loss 10^4 for example 0, 1 for the others
    per_example = (y[:, 0] - 0.0) ** 2
    with pytest.warns(UserWarning, match="NO PRIVACY"):
        hist = model.fit(x, y, batch_size=20, epochs=1, steps_per_epoch=4, l2_norm_clip=1.0,
                         noise_multiplier=0.0, physical_batch_size=16, seed=2, verbose=0)
    sampler = sampling.PoissonSampler(n, 20 / n, model.optimizer.config_values()["sampler_seed_words"])
    drawn = np.concatenate([sampler.sample(t) for t in range(4)])
    assert sum(len(sampler.sample(t)) % 16 for t in range(4)) > 0  # some steps were padded
    np.testing.assert_allclose(hist.history["loss"][0], per_example[drawn].mean(), rtol=1e-5)
