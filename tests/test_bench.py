"""tools/bench.py --tiny end to end (JAX variants) and tools/bench_plot.py on its JSON."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("jax")
pytest.importorskip("keras")
# The bench runs its own JAX subprocesses; once per suite run is enough.
pytestmark = pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax",
                                reason="tools/bench.py is tested in the KERAS_BACKEND=jax run")


def test_bench_tiny_jax_variants_and_plot(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "bench.py"), "--tiny", "--models", "vit_b16",
         "--only", "keras,keras_dpsgd", "--steps", "3", "--warmup", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The table is printed, one row per variant.
    assert "variant" in proc.stdout and "ex/s" in proc.stdout
    for name in ("keras ", "keras_dpsgd ", "keras_dpsgd_fit "):
        assert f"vit_b16      {name}" in proc.stdout, proc.stdout

    doc = json.loads(out.read_text())
    rows = {r["variant"]: r for r in doc["results"]}
    assert set(rows) == {"keras", "keras_dpsgd", "keras_dpsgd_accumulate", "keras_dpsgd_fit"}, doc["results"]
    for name, r in rows.items():
        assert r["status"] == "ok", r
        assert r["examples_per_s"] > 0, r
        assert r["compiles"]["train_step_compiles"] >= 1, r
    # One compile of the DP step serves fit (Poisson sizes vary) and direct calls.
    assert rows["keras_dpsgd"]["compiles"]["train_step_compiles"] == 1
    assert rows["keras_dpsgd"]["recompiled_for_direct_call"] is False
    # The accumulate-only step runs the same executable (is_last is data).
    assert rows["keras_dpsgd_accumulate"]["compiles"]["train_step_compiles"] == 1
    assert "keras_dpsgd / keras" in doc["ratios"]["vit_b16"]

    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "bench_plot.py"), str(out), "-o", str(png)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_failure_is_reported_not_fatal(tmp_path):
    """A variant whose framework is missing or broken shows up as a row."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(tmp_path / "nothing"))
    # A fake 'opacus' that fails on import: the variant must fail, the run not.
    fake = tmp_path / "nothing" / "opacus"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "bench.py"), "--tiny", "--models", "resnet18_gn",
         "--only", "opacus_hooks", "--steps", "1", "--warmup", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    (row,) = doc["results"]
    assert row["variant"] == "opacus_hooks"
    assert row["status"] in ("failed", "skipped")
    assert "opacus_hooks" in proc.stdout
