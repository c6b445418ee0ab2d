#!/usr/bin/env python
"""Stacked bars of where a step's GPU time goes: one bar per trace of
`tools/profile_summary.py --json` files, split by named scope (forward,
backward, dp_ghost_norms, dp_ghost_sums, ...), in ms per step.

  python tools/profile_plot.py prof.json [more.json ...] -o fig.png [--labels A,B,...]

Labels default to the profiled variant's folder name (tools/bench.py names
it <model>_<variant>).
"""

import argparse
import json
import os
import sys

ORDER = ["forward", "backward", "dp_ghost_norms", "dp_ghost_sums", "dp_clip_and_sum", "dp_noise_and_update"]
COLORS = {"forward": "#4c72b0", "backward": "#55a868", "dp_ghost_norms": "#c44e52", "dp_ghost_sums": "#dd8452",
          "dp_clip_and_sum": "#dd8452", "dp_noise_and_update": "#8172b3"}


def _label(trace):
    """The bench variant folder above plugins/profile/<date>/."""
    parts = os.path.normpath(trace).split(os.sep)
    return parts[parts.index("plugins") - 1] if "plugins" in parts else os.path.basename(trace)


def load(paths):
    """[(label, {scope: ms per step}, total ms)] over all traces in the files."""
    rows = []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        for entry in doc if isinstance(doc, list) else [doc]:
            cats = entry.get("categories_ms_per_step") or {}
            if cats:
                rows.append((_label(entry.get("trace", path)), cats, float(entry.get("ms_per_step", sum(cats.values())))))
    if not rows:
        raise SystemExit("no traces with per-scope times in " + ", ".join(paths))
    return rows


def plot(rows, out_path, title=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = [s for s in ORDER if any(s in c for _, c, _ in rows)]
    scopes += sorted({s for _, c, _ in rows for s in c} - set(scopes))
    fig, ax = plt.subplots(figsize=(10, 1.8 + 0.7 * len(rows)))
    for y, (label, cats, total) in enumerate(rows):
        left = 0.0
        for s in scopes:
            w = cats.get(s, 0.0)
            if w <= 0:
                continue
            ax.barh(y, w, left=left, color=COLORS.get(s), edgecolor="white",
                    label=s if s not in ax.get_legend_handles_labels()[1] else None)
            if w > 2.5:
                ax.text(left + w / 2, y, f"{w:.1f}", ha="center", va="center", color="white", fontsize=8)
            left += w
        ax.text(left + 0.5, y, f"{total:.1f} ms", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("GPU kernel time per step (ms), by named scope")
    ax.set_xlim(0, max(t for _, _, t in rows) * 1.15)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=8, ncol=len(scopes), frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="tools/profile_summary.py --json files")
    p.add_argument("-o", "--out", required=True, help="PNG to write")
    p.add_argument("--labels", default=None, help="comma-separated bar labels, one per trace, in order")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    rows = load(args.json)
    if args.labels:
        labels = args.labels.split(",")
        if len(labels) != len(rows):
            raise SystemExit(f"{len(labels)} labels for {len(rows)} traces")
        rows = [(lab, c, t) for lab, (_, c, t) in zip(labels, rows)]
    print(plot(rows, args.out, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
