"""Where the device time goes: a summary of a JAX Perfetto trace.

`tools/bench.py --profile-dir D` traces a few train steps of each JAX variant
into D/<model>_<variant>/.../perfetto_trace.json.gz. This script reads such
traces and prints, per trace, the device (GPU) kernel time per traced step
split into categories, and the most expensive kernels:

- dp_ghost_norms / dp_ghost_sums / dp_clip_and_sum / dp_noise_and_update:
  keras-dpsgd's named scopes (ghost norms, book-keeping sums, vectorized
  clipping, the noisy update);
- backward: ops under a JAX transpose (the backward pass);
- forward: the rest of the model's ops;
- other: kernels with no op name in the trace.

Categories come from the op names (HLO metadata) that XLA attaches to GPU
kernel events. Usage:

    python tools/profile_summary.py D [--steps 3] [--top 15] [--json out.json]
"""

import argparse
import collections
import glob
import gzip
import json
import os
import sys

SCOPES = ("dp_ghost_norms", "dp_ghost_sums", "dp_clip_and_sum", "dp_noise_and_update")


def _events(path):
    with gzip.open(path, "rt") as f:
        doc = json.load(f)
    return doc["traceEvents"] if isinstance(doc, dict) else doc


def _device_pids(events):
    """Process ids whose name says GPU/device (not the host threads)."""
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e.get("pid")] = str((e.get("args") or {}).get("name", ""))
    return {pid for pid, n in names.items() if ("GPU" in n or "/device:" in n) and "host" not in n.lower()}, names


def category(text):
    for scope in SCOPES:
        if scope in text:
            return scope
    if not text:
        return "other"
    if "transpose(" in text or "transpose[" in text:
        return "backward"
    return "forward"


def kind(kernel_name):
    n = kernel_name.lower()
    if any(k in n for k in ("gemm", "xmma", "cutlass", "cublas", "matmul", "triton_gemm")):
        return "matmul"
    if "conv" in n and ("cudnn" in n or "implicit" in n):
        return "convolution"
    if "memcpy" in n or "memset" in n:
        return "copy"
    if "reduce" in n or "reduction" in n:
        return "reduction"
    return "elementwise/other"


def _union_ms(intervals):
    """Length of the union of (start, end) intervals, in ms (trace times are us)."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e3


def gaps(path, top=12):
    """Per device: how busy it was over the traced window (kernel-time union /
    window), and the host-side events that took longest (to tell a
    device-bound step from one waiting on the host or on other devices)."""
    events = _events(path)
    pids, names = _device_pids(events)
    kernels = [e for e in events if e.get("ph") == "X" and e.get("dur") is not None]
    per_dev = collections.defaultdict(list)
    for e in kernels:
        if e.get("pid") in pids:
            per_dev[names[e["pid"]]].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    out = {"trace": path, "devices": {}}
    for dev, iv in sorted(per_dev.items()):
        window = (max(b for _, b in iv) - min(a for a, _ in iv)) / 1e3
        busy = _union_ms(iv)
        out["devices"][dev] = {"window_ms": window, "busy_ms": busy, "busy_fraction": busy / window if window else None}
    host = collections.Counter()
    count = collections.Counter()
    for e in kernels:
        if e.get("pid") not in pids:
            host[e.get("name", "?")[:70]] += float(e["dur"]) / 1e3
            count[e.get("name", "?")[:70]] += 1
    out["host_top_ms"] = [(k, v, count[k]) for k, v in host.most_common(top)]
    return out


def summarize(path, steps, top):
    events = _events(path)
    pids, names = _device_pids(events)
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in pids and e.get("dur") is not None]
    by_cat = collections.Counter()
    by_kind = collections.Counter()
    by_kernel = collections.Counter()
    cat_of_kernel = {}
    for e in kernels:
        args = e.get("args") or {}
        text = " ".join(str(v) for k, v in args.items() if k not in ("correlation_id",))
        c = category(text)
        dur = float(e["dur"]) / 1e3  # us -> ms
        by_cat[c] += dur
        by_kind[(c, kind(str(e.get("name", ""))))] += dur
        key = str(args.get("hlo_op") or args.get("name") or e.get("name"))[:80]
        by_kernel[key] += dur
        cat_of_kernel[key] = c
    total = sum(by_cat.values())
    return {
        "trace": path,
        "device_processes": sorted(names[p] for p in pids),
        "kernels": len(kernels),
        "ms_per_step": total / steps,
        "categories_ms_per_step": {k: v / steps for k, v in by_cat.most_common()},
        "category_and_kernel_kind_ms_per_step": [(c, k, v / steps) for (c, k), v in by_kind.most_common()],
        "top_kernels_ms_per_step": [(k, v / steps, cat_of_kernel[k]) for k, v in by_kernel.most_common(top)],
        "sample_args": next(((e.get("name"), e.get("args")) for e in kernels if e.get("args")), None),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="profile directories (searched recursively)")
    p.add_argument("--steps", type=int, default=3, help="steps in each trace")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", default=None)
    p.add_argument("--gaps", action="store_true",
                   help="instead: per device, busy time over the traced window, and the longest host events")
    args = p.parse_args(argv)
    paths = sorted({f for d in args.dirs for f in glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"),
                                                             recursive=True)})
    if not paths:
        print("no perfetto_trace.json.gz found", file=sys.stderr)
        return 1
    if args.gaps:
        out = [gaps(path, args.top) for path in paths]
        for r in out:
            print(f"\n## {os.path.relpath(r['trace'])}")
            for dev, d in r["devices"].items():
                print(f"  {dev}: busy {d['busy_ms']:.1f} of {d['window_ms']:.1f} ms ({100 * (d['busy_fraction'] or 0):.0f} %)")
            print("  longest host events (total ms, count):")
            for k, v, n in r["host_top_ms"]:
                print(f"    {v:9.1f} ms {n:6d}  {k}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return 0
    out = []
    for path in paths:
        r = summarize(path, args.steps, args.top)
        out.append(r)
        print(f"\n## {os.path.relpath(path)}")
        print(f"device processes: {r['device_processes']}; kernels: {r['kernels']}; "
              f"device kernel time {r['ms_per_step']:.2f} ms/step")
        for k, v in r["categories_ms_per_step"].items():
            print(f"  {k:<22} {v:9.2f} ms  {100 * v / max(r['ms_per_step'], 1e-9):5.1f} %")
        print("  by category and kernel kind:")
        for c, k, v in r["category_and_kernel_kind_ms_per_step"][:12]:
            print(f"    {c:<22} {k:<18} {v:9.2f} ms")
        print("  top kernels:")
        for k, v, c in r["top_kernels_ms_per_step"]:
            print(f"    {v:8.2f} ms  {c:<20} {k}")
        if r["sample_args"]:
            print(f"  (sample kernel event: {str(r['sample_args'])[:300]})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
