import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

jax_only = pytest.mark.skipif(BACKEND != "jax", reason="inspects the JAX step")


def linear_data(n=256, d=8, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    w = rng.normal(size=(d, classes))
    y = np.argmax(x @ w, axis=1).astype("int32")
    return x, y


def small_model(d=8, classes=2, dropout=0.0, seed=0):
    import keras_dpsgd

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((d,))
    h = keras.layers.Dense(16, activation="tanh")(inputs)
    if dropout:
        h = keras.layers.Dropout(dropout)(h)
    outputs = keras.layers.Dense(classes)(h)
    return keras_dpsgd.DPModel(inputs, outputs)


def compile_sgd(model, lr=0.1, metrics=("accuracy",)):
    model.compile(optimizer=keras.optimizers.SGD(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=list(metrics))
    return model


def weights_of(model):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]
