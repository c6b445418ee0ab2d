"""A DP model saved on one backend continues DP training on another (I7)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from keras_dpsgd import accounting
from tests.conftest import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="runs its own subprocesses; once per suite")


def run(backend, mode, path):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.save_load_worker", mode, str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(l[7:]) for l in proc.stdout.splitlines() if l.startswith("RESULT ")]


@pytest.mark.parametrize("target", ["tensorflow", "torch"])
def test_train_on_jax_save_then_continue_on_another_backend(tmp_path, target):
    if importlib.util.find_spec(target) is None:
        pytest.skip(f"{target} is not installed")
    path = tmp_path / "dp.keras"
    (trained,) = run("jax", "train", path)
    loaded, continued = run(target, "resume", path)
    assert loaded["backend"] == continued["backend"] == target
    # The accountant's state came across intact...
    assert loaded["steps"] == trained["steps"] == 10
    assert loaded["epsilon"] == trained["epsilon"] and loaded["seed"] == trained["seed"]
    # ...and training continued it: 10 more logical steps, composed.
    assert continued["steps"] == 20 and continued["finite"]
    assert continued["epsilon"] == pytest.approx(
        accounting.epsilon(continued["q"], continued["sigma"], 20, 1 / 2000), rel=1e-6)
