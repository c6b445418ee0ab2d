"""Counts compiles of the DP train step in one fit under DataParallel(D).

Usage: python -m tests.helpers.compile_count_worker D
"""

import logging
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402


class Count(logging.Handler):
    n = 0

    def emit(self, record):
        if "Compiling jit(train_step" in record.getMessage():
            Count.n += 1


def main():
    devices = int(sys.argv[1])
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices()[:devices]))
    from tests.conftest import compile_sgd, linear_data, small_model

    x, y = linear_data(256)
    model = compile_sgd(small_model(dropout=0.1))
    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jax").addHandler(Count())
    logging.getLogger("jax").setLevel(logging.DEBUG)
    model.fit(x, y, batch_size=32, epochs=2, steps_per_epoch=3, l2_norm_clip=1.0, noise_multiplier=1.0,
              physical_batch_size=16, verbose=0)
    print(f"RESULT {Count.n}", flush=True)


if __name__ == "__main__":
    main()
