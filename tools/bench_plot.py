#!/usr/bin/env python
"""Bar chart of a tools/bench.py JSON file: examples/s per variant, one panel
per model, peak device memory written on each bar.

  python tools/bench_plot.py out/bench.json            # writes out/bench.png
  python tools/bench_plot.py out/bench.json -o fig.png
"""

import argparse
import json
import os
import sys

ORDER = ["keras", "keras_dpsgd", "keras_dpsgd_fit", "jax_privacy", "torch", "opacus_hooks",
         "opacus_ghost", "opacus_hooks_ootb", "opacus_ghost_ootb", "keras_dpsgd_poisson"]
JAX = {"keras", "keras_dpsgd", "keras_dpsgd_fit", "jax_privacy", "keras_dpsgd_poisson"}


def _order(variant):
    return ORDER.index(variant) if variant in ORDER else len(ORDER)


def plot(doc, out_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc.get("results", [])
    meta = doc.get("meta", {})
    models = []
    for r in results:
        if r.get("model") not in models:
            models.append(r.get("model"))
    if not models:
        raise SystemExit("no results in the JSON file")
    fig, axes = plt.subplots(len(models), 1, figsize=(10, 3.6 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        rows = sorted((r for r in results if r.get("model") == model), key=lambda r: _order(r["variant"]))
        if len(rows) == 1 and rows[0]["variant"] == "keras_dpsgd_poisson":
            _plot_poisson(ax, rows[0])
            continue
        names = [r["variant"] for r in rows]
        vals = [r.get("examples_per_s") or 0.0 if r.get("status") in ("ok", "partial") else 0.0
                for r in rows]
        colors = ["#1f77b4" if n in JAX else "#ff7f0e" for n in names]
        bars = ax.bar(range(len(rows)), vals, color=colors)
        top = max(vals) if any(vals) else 1.0
        for bar, r, v in zip(bars, rows, vals):
            if r.get("status") not in ("ok", "partial") or not v:
                text = r.get("status", "failed")
                bar.set_hatch("//")
                ax.text(bar.get_x() + bar.get_width() / 2, top * 0.02, text, ha="center",
                        va="bottom", rotation=90, fontsize=8, color="red")
                continue
            peak = r.get("peak_gib")
            label = f"{v:.0f}" + (f"\n{peak:.1f} GiB" if peak else "")
            ax.text(bar.get_x() + bar.get_width() / 2, v, label, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("examples / s")
        ax.set_ylim(0, top * 1.25)
        ax.set_title(f"{model}: physical batch {rows[0].get('batch', meta.get('batch'))}, "
                     f"{meta.get('precision', '')}", fontsize=10)
    gpus = meta.get("gpus")
    fig.suptitle("DP-SGD throughput (blue: JAX, orange: PyTorch)"
                 + (f" on {gpus[0]}" if gpus else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def _plot_poisson(ax, r):
    vals = r.get("examples_per_s_per_step") or []
    ax.bar(range(len(vals)), vals, color="#1f77b4")
    for i, v in enumerate(vals):
        tag = " (compile)" if (r.get("train_step_compiled_in_step") or [0] * len(vals))[i] else ""
        ax.text(i, v, f"{v:.0f}{tag}", ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("logical step")
    ax.set_ylabel("real examples / s")
    ax.set_title(f"keras-dpsgd {r.get('model')}: E[logical batch] {r.get('expected_logical_batch')}, "
                 f"physical {r.get('physical_batch')}", fontsize=10)


def main(argv=None):
    p = argparse.ArgumentParser(description="tools/bench.py JSON -> PNG bar chart")
    p.add_argument("json")
    p.add_argument("-o", "--out", default=None, help="PNG path (default: JSON path with .png)")
    args = p.parse_args(argv)
    with open(args.json) as f:
        doc = json.load(f)
    out = args.out or os.path.splitext(args.json)[0] + ".png"
    plot(doc, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
