"""Data parallelism on JAX (keras.distribution.DataParallel), on forced CPU devices.

Each run is a subprocess: the host device count must be fixed before JAX starts.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution DP path is JAX's")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(devices, sigma, hlo=False, gram_kernel=False):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               KERAS_BACKEND="jax", PYTHONPATH=ROOT)
    cmd = ([sys.executable, "-m", "tests.helpers.dist_worker", str(devices), str(sigma)]
           + (["--hlo"] if hlo else []) + (["--gram-kernel"] if gram_kernel else []))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    out["flat"] = np.concatenate([np.ravel(np.asarray(w)) for w in out["weights"]])
    return out


@pytest.fixture(scope="module")
def single():
    return {0.0: run(1, 0.0), 1.0: run(1, 1.0)}


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_data_parallel_training_equals_the_single_device_run(single, devices, sigma):
    out = run(devices, sigma)
    assert out["shards"] == devices
    # Every physical batch arrives split over all devices along the batch
    # axis (Keras' distribution is thread-local: a feeder thread that did not
    # re-enter it placed whole batches on one device).
    assert out["batch_placements"] == [[devices, "P('batch', None)"]]
    assert out["steps"] == single[sigma]["steps"] == 10
    assert out["epsilon"] == single[sigma]["epsilon"]
    # Same Poisson draws, same noise (replicated key, added once after the
    # reduction): only the float summation order differs.
    np.testing.assert_allclose(out["flat"], single[sigma]["flat"], rtol=1e-5, atol=1e-6)
    # The logged loss, kept as per-device partial sums during each logical
    # step, is the single-device run's.
    np.testing.assert_allclose(out["loss"], single[sigma]["loss"], rtol=1e-5)
    assert out["nonfinite"] == single[sigma]["nonfinite"] == [0.0, 0.0]


def test_gradients_cross_devices_once_per_logical_step():
    out = run(4, 1.0, hlo=True)
    assert "P('batch'" in out["acc_sharding"]  # one partial sum per device
    hlo = out["hlo"]
    # The physical step (every physical batch) moves no gradient between
    # devices and has no branch (whose predicate XLA:GPU reads on the host)...
    assert hlo["step_big_allreduces"] == 0
    # Nor anything else: the logged loss and non-finite count stay per-device
    # partial sums until the logical step ends (no compiled metrics here).
    assert hlo["step_allreduces"] == 0
    assert hlo["step_conditionals"] == 0
    # ...and no rows: each device clips its own examples.
    assert hlo["batch_moving_collectives"] == []
    # The apply step (once per logical step) reduces the gradient exactly once.
    assert hlo["apply_big_allreduces"] == 1


def test_the_fused_kernels_run_on_each_devices_rows():
    """With ghost.GRAM_KERNEL and SUM_KERNEL set, the kernels run per device
    (shard_map) on their own rows, the step still moves no rows and has no
    all-reduce, and training equals the single-device run with the kernels."""
    one = run(1, 1.0, gram_kernel=True)
    two = run(2, 1.0, hlo=True, gram_kernel=True)
    # Traced once per compile: the whole physical batch of 8 rows on one
    # device, 4 rows per device on two; both kernels.
    for out, rows in ((one, 8), (two, 4)):
        assert {kind for kind, _ in out["kernel_calls"]} == {"norm", "sum"}, out["kernel_calls"]
        assert all(r == rows for _, r in out["kernel_calls"]), out["kernel_calls"]
    assert two["hlo"]["step_allreduces"] == 0
    assert two["hlo"]["batch_moving_collectives"] == []
    assert two["hlo"]["step_big_allreduces"] == 0
    np.testing.assert_allclose(two["flat"], one["flat"], rtol=1e-5, atol=1e-6)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(seed=None):
    port = free_port()
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    args = [str(seed)] if seed is not None else []
    procs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.multiprocess_worker", str(i), "2", str(port)] + args,
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
        out = json.loads(line[len("RESULT "):])
        out["flat"] = np.concatenate([np.ravel(np.asarray(w)) for w in out["weights"]])
        outs.append(out)
    return outs


def test_two_processes_on_localhost_agree_with_each_other_and_with_one_process(single):
    a, b = run_two_processes()  # seeds from OS entropy: must be agreed across processes
    assert a["devices"] == b["devices"] == 2
    assert a["seed"] == b["seed"] and a["steps"] == b["steps"] == 10
    np.testing.assert_array_equal(a["flat"], b["flat"])
    c, d = run_two_processes(seed=3)  # the seed of the single-device reference
    np.testing.assert_allclose(c["flat"], single[1.0]["flat"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("devices", [1, 2])
def test_the_dp_step_compiles_once_under_data_parallel(devices):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", KERAS_BACKEND="jax",
               PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.compile_count_worker", str(devices)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    assert int(line.split()[1]) == 1
