"""I7: a run killed with SIGKILL and restarted accounts exactly like an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(backup_dir, marker=None):
    cmd = [sys.executable, "-m", "tests.helpers.resume_worker", str(backup_dir)] + ([str(marker)] if marker else [])
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=600)


def result(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_sigkill_mid_epoch_then_restart_equals_an_uninterrupted_run(tmp_path):
    ref = result(run(tmp_path / "ref"))
    killed = run(tmp_path / "backup", tmp_path / "marker")
    assert killed.returncode == -signal.SIGKILL  # really killed, no clean-up ran
    assert os.listdir(tmp_path / "backup")  # epoch 1 was backed up
    resumed = result(run(tmp_path / "backup", tmp_path / "marker"))
    assert resumed["steps"] == ref["steps"] == 18
    assert resumed["epsilon"] == ref["epsilon"]
    # Same steps, same Poisson draws and the same noise as the uninterrupted run.
    for a, b in zip(resumed["weights"], ref["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
