"""I8 (no example-mixing layers), I9 (random-access inputs only), parameters."""

import keras
import numpy as np
import pytest

import keras_dpsgd
from tests.conftest import BACKEND, compile_sgd, linear_data, small_model

X, Y = linear_data(64)


def fit(model, **kw):
    args = dict(batch_size=16, epochs=1, l2_norm_clip=1.0, noise_multiplier=1.0, verbose=0)
    args.update(kw)
    return model.fit(kw.pop("x", X), kw.pop("y", Y), **{k: v for k, v in args.items() if k not in ("x", "y")})


def test_batch_normalization_nested_in_a_submodel_is_refused_with_the_fix():
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(name="bn_inside")], name="block")
    inputs = keras.Input((8,))
    model = keras_dpsgd.DPModel(inputs, keras.layers.Dense(2)(inner(inputs)))
    compile_sgd(model)
    with pytest.raises(ValueError, match="bn_inside.*GroupNormalization"):
        fit(model)
    with pytest.raises(ValueError, match="bn_inside"):
        keras_dpsgd.make_private(keras.Sequential([keras.Input((8,)), inner]))


def test_group_normalization_is_accepted():
    inputs = keras.Input((8,))
    h = keras.layers.Reshape((8, 1))(inputs)
    h = keras.layers.GroupNormalization(groups=1)(h)
    model = compile_sgd(keras_dpsgd.DPModel(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(h))))
    assert "epsilon" in fit(model).history


def generator():
    while True:
        yield X[:8], Y[:8]


class Batches(keras.utils.PyDataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return X[:16], Y[:16]


@pytest.mark.parametrize("make_x", [generator, lambda: Batches(), lambda: iter(X)])
def test_inputs_without_random_access_are_refused_with_the_reason(make_x):
    model = compile_sgd(small_model())
    with pytest.raises(ValueError, match="Poisson"):
        model.fit(make_x(), batch_size=16, l2_norm_clip=1.0, noise_multiplier=1.0, verbose=0)


def test_tf_data_dataset_is_refused():
    tf = pytest.importorskip("tensorflow")
    ds = tf.data.Dataset.from_tensor_slices((X, Y)).batch(8)
    model = compile_sgd(small_model())
    with pytest.raises(ValueError, match="tf.data.Dataset"):
        model.fit(ds, batch_size=16, l2_norm_clip=1.0, noise_multiplier=1.0, verbose=0)


class IndexSource:
    """A custom random-access source: __len__ and __getitem__(index_array)."""

    def __init__(self, a):
        self.a = a

    def __len__(self):
        return len(self.a)

    def __getitem__(self, idx):
        return self.a[np.asarray(idx)]


def test_custom_random_access_source_and_dict_inputs_are_accepted():
    model = compile_sgd(small_model())
    assert fit(model, x=IndexSource(X), y=IndexSource(Y)).history["epsilon"][0] > 0
    a = keras.Input((4,), name="a")
    b = keras.Input((4,), name="b")
    out = keras.layers.Dense(2)(keras.layers.Concatenate()([a, b]))
    model2 = compile_sgd(keras_dpsgd.DPModel({"a": a, "b": b}, out))
    assert fit(model2, x={"a": X[:, :4], "b": X[:, 4:]}).history["loss"][0] > 0


@pytest.mark.parametrize("kw,match", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=65), "larger than the number"),
    (dict(batch_size=None), "batch_size"),
    (dict(l2_norm_clip=0.0), "l2_norm_clip"),
    (dict(l2_norm_clip=None), "l2_norm_clip"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(noise_multiplier=None), "exactly one"),
    (dict(target_epsilon=1.0), "exactly one"),
    (dict(noise_multiplier=None, target_epsilon=0.0), "target_epsilon"),
    (dict(target_delta=0.0), "target_delta"),
    (dict(target_delta=1.0), "target_delta"),
    (dict(physical_batch_size=0), "physical_batch_size"),
    (dict(physical_batch_size=2.5), "physical_batch_size"),
    (dict(steps_per_epoch=0), "steps_per_epoch"),
    (dict(accountant="moments"), "accountant"),
    (dict(clipping="fast"), "clipping"),
    (dict(shuffle=True), "shuffle"),
    (dict(validation_split=0.1), "validation_split"),
])
def test_invalid_parameters_are_refused_with_a_clear_message(kw, match):
    model = compile_sgd(small_model())
    with pytest.raises(ValueError, match=match):
        fit(model, **kw)


def test_mismatched_x_y_lengths_are_refused():
    model = compile_sgd(small_model())
    with pytest.raises(ValueError, match="same number of examples"):
        fit(model, y=Y[:10])


def test_gradient_accumulation_on_the_inner_optimizer_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        model.compile(optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), loss="mse")


def test_subclassed_dpmodel_works_after_functional_use():
    inputs = keras.Input((8,))
    keras_dpsgd.DPModel(inputs, keras.layers.Dense(2)(inputs))  # functional use first

    class Mine(keras_dpsgd.DPModel):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    model = compile_sgd(Mine())
    assert fit(model).history["epsilon"][0] > 0


@pytest.mark.skipif(BACKEND == "jax", reason="ghost clipping exists on JAX")
def test_ghost_clipping_outside_jax_is_refused_and_auto_falls_back():
    model = compile_sgd(small_model())
    with pytest.raises(ValueError, match="JAX"):
        fit(model, clipping="ghost")
    assert "epsilon" in fit(model, clipping="auto").history
