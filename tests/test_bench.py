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
    # Back-to-back steps (one sync at the end) for the two step rows, and their ratio.
    for name in ("keras", "keras_dpsgd"):
        assert rows[name]["pipelined_examples_per_s"] > 0, rows[name]
        # Host time to dispatch one step: part of the synchronized step's time.
        # (Bound with room for timing noise over 3 steps.)
        assert 0 < rows[name]["dispatch_ms"] < 2 * rows[name]["median_step_ms"], rows[name]
    pipelined = doc["ratios"]["vit_b16"]["keras_dpsgd / keras (pipelined)"]
    assert pipelined == pytest.approx(rows["keras_dpsgd"]["pipelined_examples_per_s"]
                                      / rows["keras"]["pipelined_examples_per_s"])

    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "bench_plot.py"), str(out), "-o", str(png)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_ghost_settings_are_applied_and_recorded(tmp_path):
    """--ghost-set sets keras_dpsgd.ghost attributes in the workers (a typo fails
    the variant, not silently) and the JSON rows record them."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    base = [sys.executable, os.path.join(REPO, "tools", "bench.py"), "--tiny", "--models", "vit_b16",
            "--only", "keras_dpsgd", "--dp-clipping", "ghost", "--steps", "2", "--warmup", "1"]
    proc = subprocess.run(base + ["--ghost-set", "FINITE_FAST_PATH=False", "--ghost-set", "NORM_METHOD='gram'",
                                  "--json", str(out)], capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert rows and all(r["status"] == "ok" for r in rows), rows
    assert all(r["ghost_settings"] == {"FINITE_FAST_PATH": False, "NORM_METHOD": "gram"} for r in rows), rows
    proc = subprocess.run(base + ["--ghost-set", "NO_SUCH_SETTING=1", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["status"] == "failed" and "NO_SUCH_SETTING" in row.get("error", ""), row


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


def test_bench_scaling_tiny_two_devices_with_a_traced_window(tmp_path):
    """tools/bench_scaling.py on forced CPU devices: one row per device
    count, efficiencies against the 1-device row, a trace of the timed
    logical step that profile_summary.py --gaps reads."""
    out, prof = tmp_path / "scaling.json", tmp_path / "prof"
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "bench_scaling.py"), "--tiny", "--gpus", "1,2",
         "--logical-batch", "64", "--sampling-rate", "0.5", "--logical-steps", "2", "--per-gpu", "8",
         "--clipping", "ghost", "--steps", "3", "--warmup", "1", "--json", str(out),
         "--profile-dir", str(prof), "--profile-batches", "2"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["gpus"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {1, 2}
    assert rows[1]["dp_efficiency"] == 1.0
    assert rows[2]["dp_shards"] == 2 and rows[2]["dp_physical_batch"] == 16
    assert 0 < rows[2]["dp_efficiency"] and 0 < rows[2]["nonprivate_efficiency"]
    summary = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "profile_summary.py"), str(prof), "--gaps",
         "--json", str(tmp_path / "gaps.json")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert summary.returncode == 0, summary.stdout + summary.stderr
    gaps = json.loads((tmp_path / "gaps.json").read_text())
    assert len(gaps) == 2  # one trace per device count
    assert all(g["host_top_ms"] for g in gaps)  # host-side events were traced


def test_profile_summary_categories_and_busy_time(tmp_path):
    """profile_summary.py on a hand-made Perfetto trace: scope categories,
    kernel kinds, and busy time as the union of overlapping kernels."""
    import gzip

    sys.path.insert(0, REPO)
    from tools import profile_summary

    def kernel(name, ts, dur, op):
        return {"ph": "X", "pid": 7, "name": name, "ts": ts, "dur": dur, "args": {"name": op, "hlo_op": name}}

    events = [
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "Host Threads"}},
        kernel("sm90_xmma_gemm_a", 0, 400, "jit(train_step)/vmap(jvp(vit))/dense/dot_general"),
        kernel("loop_fusion_1", 300, 300, "jit(train_step)/vmap(transpose(jvp(vit)))/dense/mul"),
        kernel("gemm_fusion_dot_2", 1000, 200, "jit(train_step)/dp_ghost_norms/dot_general"),
        kernel("input_reduce_fusion", 1300, 100, "jit(train_step)/dp_ghost_sums/reduce_sum"),
        {"ph": "X", "pid": 1, "name": "PjitFunction(train_step)", "ts": 0, "dur": 50},
    ]
    d = tmp_path / "t"
    d.mkdir()
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    r = profile_summary.summarize(str(d / "perfetto_trace.json.gz"), steps=1, top=5)
    assert r["categories_ms_per_step"] == pytest.approx(
        {"forward": 0.4, "backward": 0.3, "dp_ghost_norms": 0.2, "dp_ghost_sums": 0.1})
    kinds = {(c, k): v for c, k, v in r["category_and_kernel_kind_ms_per_step"]}
    assert kinds[("forward", "matmul")] == pytest.approx(0.4)
    assert kinds[("dp_ghost_sums", "reduction")] == pytest.approx(0.1)
    g = profile_summary.gaps(str(d / "perfetto_trace.json.gz"))
    dev = g["devices"]["/device:GPU:0"]
    # Kernels cover [0, 600], [1000, 1200], [1300, 1400] of a 1400 us window: 0.9 ms busy.
    assert dev["busy_ms"] == pytest.approx(0.9) and dev["window_ms"] == pytest.approx(1.4)
    assert g["host_top_ms"][0][0] == "PjitFunction(train_step)"


def test_bench_gram_tiny_forms_agree(tmp_path):
    """tools/bench_gram.py --tiny: every norm form is timed, and every exact
    form agrees with the float32 Gram norm (bf16 only roughly)."""
    from tools import bench_gram

    out = tmp_path / "gram.json"
    rows = bench_gram.main(["--tiny", "--steps", "2", "--warmup", "1", "--sweep", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert len(rows) == len(bench_gram.TINY_LAYERS) == len(doc["rows"])
    for r in doc["rows"]:
        assert set(r["ms"]) == {"gram", "gram_blocked", "materialize", "gram_highest", "gram_bf16", "fused",
                                "select_scale", "weight_grad", "xla_sum", "fused_sum"}
        assert r["fused_sum_rel_err"] < 1e-5, r
        assert all(v > 0 for v in r["ms"].values()), r
        for form in ("gram", "gram_blocked", "materialize", "gram_highest", "fused"):
            assert r["max_rel_err"][form] < 1e-5, (form, r)
        assert r["max_rel_err"]["gram_bf16"] < 5e-2, r
    assert doc["per_step_ms"]["gram"] == pytest.approx(sum(r["ms"]["gram"] for r in doc["rows"]))
    # The sweep tried every configuration of both kernels on every layer, each exact.
    assert set(doc["sweep"]) == {r["layer"] for r in doc["rows"]}
    for per_kernel in doc["sweep"].values():
        assert set(per_kernel) == {"norm", "sum"}
        for kind, results in per_kernel.items():
            assert len(results) == len(bench_gram.sweep_configs(True, kind))
            assert all(r["max_rel_err"] < 1e-5 for r in results), results
            assert [r["ms"] for r in results] == sorted(r["ms"] for r in results)


def test_bench_tiny_torch_models_run(tmp_path):
    """The torch twins of the bench models (the Opacus baselines' networks)
    train a step: BERT and ResNet-18-GN (ViT is timm's, not installed here)."""
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "bench.py"), "--tiny", "--models", "bert_base,resnet18_gn",
         "--only", "torch", "--steps", "2", "--warmup", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"bert_base", "resnet18_gn"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["examples_per_s"] > 0, r
        # Steps back to back too, as for the JAX rows (pipelined vs pipelined).
        assert r["pipelined_examples_per_s"] > 0, r
        assert 0 < r["dispatch_ms"] < 2 * r["median_step_ms"], r


def test_vmap_leak_reports_each_case_on_this_device():
    """tools/vmap_leak.py: example 1's NaN always reaches its own kernel
    gradient; on XLA:CPU grouped convolutions with several channels per group
    also reach every other example (the reason for
    ghost.unisolated_vmap_weights), the others stay isolated."""
    import jax

    from tools import vmap_leak

    assert vmap_leak.nonfinite_rows(4, 4, 1) == [1]
    assert vmap_leak.nonfinite_rows(2, 2, 2) == [1]
    for c_in, c_out in ((4, 4), (2, 4)):
        rows = vmap_leak.nonfinite_rows(c_in, c_out, 2)
        assert 1 in rows, (c_in, c_out, rows)
        if jax.default_backend() == "cpu":
            assert rows == [0, 1, 2, 3], (c_in, c_out, rows)


def test_profile_plot_stacks_scopes_per_trace(tmp_path):
    """tools/profile_plot.py: one bar per trace of profile_summary JSON files,
    labelled by the bench variant folder unless --labels says otherwise."""
    pytest.importorskip("matplotlib")
    from tools import profile_plot

    trace = "/p/vit_b16_keras_dpsgd_ghost/plugins/profile/2026_01_01/perfetto_trace.json.gz"
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"trace": "/p/vit_b16_keras/plugins/profile/x/t.json.gz", "ms_per_step": 5.0,
                              "categories_ms_per_step": {"forward": 3.0, "backward": 2.0}},
                             {"trace": trace, "ms_per_step": 7.0,
                              "categories_ms_per_step": {"forward": 3.0, "dp_ghost_norms": 1.5,
                                                         "dp_ghost_sums": 2.5}}]))
    rows = profile_plot.load([str(a)])
    assert [r[0] for r in rows] == ["vit_b16_keras", "vit_b16_keras_dpsgd_ghost"]
    assert rows[1][1]["dp_ghost_sums"] == 2.5 and rows[1][2] == 7.0
    png = tmp_path / "p.png"
    assert profile_plot.main([str(a), "-o", str(png), "--labels", "np,dp"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        profile_plot.main([str(a), "-o", str(png), "--labels", "only-one"])
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(SystemExit):
        profile_plot.load([str(empty)])


def test_bench_ratios_pair_pipelined_rows_of_both_frameworks():
    """Pipelined ratios are formed for every pair whose two rows have a
    pipelined rate (keras-dpsgd against Keras and against Opacus)."""
    from tools import bench

    def row(variant, sync, piped=None):
        return {"model": "m", "variant": variant, "status": "ok", "examples_per_s": sync,
                "pipelined_examples_per_s": piped}

    got = bench.ratios([row("keras", 100.0, 110.0), row("keras_dpsgd", 80.0, 99.0),
                        row("opacus_ghost", 40.0, 45.0), row("opacus_hooks", 20.0)])["m"]
    assert got["keras_dpsgd / opacus_ghost"] == pytest.approx(2.0)
    assert got["keras_dpsgd / opacus_ghost (pipelined)"] == pytest.approx(99.0 / 45.0)
    assert got["keras_dpsgd / keras (pipelined)"] == pytest.approx(0.9)
    assert "keras_dpsgd / opacus_hooks (pipelined)" not in got  # no pipelined rate for that row
