"""Train-and-save on one backend, load-and-continue on another.

Usage: KERAS_BACKEND=b python -m tests.helpers.save_load_worker train|resume PATH
"""

import json
import sys

import keras
import numpy as np

import keras_dpsgd

KW = dict(batch_size=20, epochs=1, l2_norm_clip=1.0, noise_multiplier=1.0, physical_batch_size=8, verbose=0)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def report(model):
    cfg = model.optimizer.config_values()
    eps, delta = model.privacy_spent()
    print("RESULT " + json.dumps({
        "backend": keras.backend.backend(), "steps": cfg["logical_steps"], "epsilon": eps,
        "delta": delta, "sigma": cfg["noise_multiplier"], "q": cfg["sampling_rate"],
        "seed": cfg["sampler_seed_words"].tolist(),
        "finite": bool(all(np.isfinite(w).all() for w in model.get_weights()))}), flush=True)


def main():
    mode, path = sys.argv[1], sys.argv[2]
    x, y = data()
    if mode == "train":
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        h = keras.layers.Dense(8, activation="tanh")(inputs)
        model = keras_dpsgd.DPModel(inputs, keras.layers.Dense(2)(h))
        model.compile(optimizer=keras.optimizers.Adam(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        model.fit(x, y, seed=7, **KW)
        model.save(path)
    else:
        model = keras.saving.load_model(path)
        report(model)  # as loaded
        model.fit(x, y, **KW)
    report(model)


if __name__ == "__main__":
    main()
