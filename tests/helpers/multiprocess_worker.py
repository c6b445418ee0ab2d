"""One process of a two-process DP fit on localhost (jax.distributed, CPU gloo).

Usage: python -m tests.helpers.multiprocess_worker PROCESS_ID NUM_PROCESSES PORT [SEED]
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def main():
    pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else None
    keras.distribution.initialize(job_addresses=f"localhost:{port}", num_processes=nproc, process_id=pid)
    from tests.helpers.dist_worker import build

    import keras_dpsgd  # noqa: F401

    model = build(len(jax.devices()))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 8)).astype("float32")
    y = rng.integers(0, 3, size=(240,)).astype("int32")
    # Without a seed, the sampler and noise seeds come from OS entropy on each
    # process and must be agreed (process 0's wins) for the run to be correct.
    model.fit(x, y, batch_size=24, epochs=2, steps_per_epoch=5, l2_norm_clip=1.0,
              noise_multiplier=1.0, physical_batch_size=8, seed=seed, verbose=0)
    out = {"process": pid, "devices": len(jax.devices()),
           "weights": [np.asarray(jax.device_get(v.value.addressable_data(0))).tolist() for v in model.trainable_variables],
           "seed": model.optimizer.config_values()["sampler_seed_words"].tolist(),
           "steps": int(np.asarray(model.optimizer.iterations.value.addressable_data(0)))}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
