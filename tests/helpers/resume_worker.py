"""A DP fit with keras.callbacks.BackupAndRestore that may SIGKILL itself.

Usage: python -m tests.helpers.resume_worker BACKUP_DIR [KILL_MARKER]
With KILL_MARKER, the process kills itself (SIGKILL, no clean-up) in the middle
of epoch 2 unless the marker file exists; it creates the marker first, so the
restarted process runs to the end.
"""

import json
import os
import signal
import sys

import keras
import numpy as np

import keras_dpsgd


class KillMidEpoch(keras.callbacks.Callback):
    def __init__(self, marker):
        super().__init__()
        self.marker = marker
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.marker and self.epoch == 1 and batch == 3 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    backup_dir = sys.argv[1]
    marker = sys.argv[2] if len(sys.argv) > 2 else None
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    # No dropout: Keras does not checkpoint SeedGenerator state, so dropout
    # masks after a restore differ (privacy is unaffected; exact equality is).
    h = keras.layers.Dense(16, activation="tanh")(inputs)
    model = keras_dpsgd.DPModel(inputs, keras.layers.Dense(3)(h))
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 8)).astype("float32")
    y = rng.integers(0, 3, size=(240,)).astype("int32")
    hist = model.fit(x, y, batch_size=24, epochs=3, steps_per_epoch=6, l2_norm_clip=1.0,
                     noise_multiplier=1.0, physical_batch_size=8, seed=5, verbose=0,
                     callbacks=[keras.callbacks.BackupAndRestore(backup_dir), KillMidEpoch(marker)])
    out = {"steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
           "epsilon": model.privacy_spent()[0], "history_epsilon": hist.history["epsilon"],
           "weights": [np.asarray(keras.ops.convert_to_numpy(v)).ravel().tolist() for v in model.trainable_variables]}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
