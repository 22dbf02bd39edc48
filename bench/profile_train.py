"""Where the wall time of one training step goes, by kind of work (XLA:CPU).

    python bench/profile_train.py --depth 8 --batch-size 4 --dtype float32 --scan-layers --remat dots \\
        [--json F] [--png F] [--trace-dir DIR]

Takes the step of ``bench_train.py`` (same flags), compiles it once, runs it twice to warm up, then once under
``jax.profiler`` and splits that step's wall time among the compiled program's ops.

Why not sum op durations: XLA:CPU runs independent ops at the same time, and runs matmuls with a transposed
operand asynchronously (an event ``dot.N`` when it starts and ``end: dot.N`` when it is done). Summed op
durations then exceed the step's wall time, and an op that shares the cores looks slower than it is. Here each
instant of the step is shared equally among the ops running at that instant.

Each op is put in a category from its HLO name and the ``op_name`` of the JAX operation it came from (the
compiled HLO's metadata): the transformer's weight products, the attention (its products and softmax), the
scan's stacked buffers (zero-filled, then written once per block) and everything else. Achieved GFLOP/s use the
analytic FLOPs of ``varjax.models.flops`` (3 x forward; attention counted for the visible key prefix only).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import bench_train

WEIGHT_OPS = re.compile(r"mat_qkv|/proj/|/fc1/|/fc2/|/head/|word_embed|ada_lin")
ATTENTION_OPS = re.compile(r"/attn/")
CATEGORIES = ("weight products", "attention", "scan buffers", "other")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op_name it came from ('' when it has none)."""
    names = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*", hlo_text, re.M):
        op = re.search(r'op_name="([^"]*)"', m.group(0))
        names.setdefault(m.group(1), op.group(1) if op else "")
    return names


def category(hlo_name: str, op_name: str) -> str:
    if hlo_name.startswith("wrapped_broadcast") or "dynamic-update-slice" in hlo_name:
        return "scan buffers"
    if WEIGHT_OPS.search(op_name) and ("dot" in hlo_name or "ynn" in hlo_name):
        return "weight products"
    if ATTENTION_OPS.search(op_name) and not WEIGHT_OPS.search(op_name):
        return "attention"
    return "other"


def op_intervals(events: list[dict], ops: dict[str, str]) -> list[tuple[float, float, str]]:
    """(start_us, end_us, hlo_name) of every op event; an asynchronous op ends at its matching ``end:`` event."""
    events = sorted((e for e in events if e.get("ph") == "X" and "dur" in e), key=lambda e: e["ts"])
    ends = collections.defaultdict(collections.deque)  # asynchronous matmul -> its end times, in order
    for e in events:
        if e["name"].startswith("end: dot") and e["name"][5:] in ops:
            ends[e["name"][5:]].append(e["ts"] + e["dur"])
    out = []
    for e in events:
        name = e["name"]
        if name not in ops:
            continue
        start, end = e["ts"], e["ts"] + e["dur"]
        pending = ends.get(name)
        while pending and pending[0] < start:
            pending.popleft()
        if pending:  # done at its own end event, the first one after it started
            end = max(end, pending.popleft())
        out.append((start, end, name))
    return out


def wall_shares(intervals: list[tuple[float, float, str]]) -> tuple[collections.Counter, float, float]:
    """-> (microseconds of wall time per op name, each instant split among the running ops; span; idle)."""
    points = sorted([(s, 1, i) for i, (s, _, _) in enumerate(intervals)]
                    + [(e, -1, i) for i, (_, e, _) in enumerate(intervals)])
    share, active, last, idle = collections.Counter(), set(), None, 0.0
    for t, kind, i in points:
        if last is not None and t > last:
            if active:
                for j in active:
                    share[intervals[j][2]] += (t - last) / len(active)
            else:
                idle += t - last
        last = t
        (active.add if kind == 1 else active.discard)(i)
    return share, (points[-1][0] - points[0][0]) if points else 0.0, idle


def analytic_gflop(model_cfg, batch_size: int) -> dict[str, float]:
    from varjax.models import flops

    b = flops.matmul_flops_breakdown(model_cfg, "masked")
    attention = b.get("attn_scores", 0) + b.get("attn_values", 0)
    return {"weight products": 3 * batch_size * (sum(b.values()) - attention) / 1e9,
            "attention": 3 * batch_size * attention / 1e9}


def plot(seconds: dict[str, float], idle: float, gflop_s: dict[str, float], title: str, path: str) -> None:
    """One horizontal bar: the step's wall time split by category, with the achieved GFLOP/s of the products."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [(k, seconds.get(k, 0.0), c) for k, c in
             zip(CATEGORIES, ("#4c72b0", "#dd8452", "#c44e52", "#8c8c8c"), strict=True)]
    parts.append(("no op running", idle, "#e0e0e0"))
    total = sum(w for _, w, _ in parts)
    fig, ax = plt.subplots(figsize=(8, 1.9))
    left = 0.0
    for name, w, color in parts:
        ax.barh([0], [w], left=left, color=color, label=name)
        if w > 0.08 * total:
            rate = f"\n{gflop_s[name]:.0f} GFLOP/s" if name in gflop_s else ""
            ax.text(left + w / 2, 0, f"{w:.2f} s{rate}", ha="center", va="center", color="white", fontsize=8)
        left += w
    ax.set_yticks([])
    ax.set_xlim(0, total)
    ax.set_xlabel("wall time of one step (s)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(ncol=5, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.42), frameon=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.85, bottom=0.42)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> dict:
    p = bench_train.parser(__doc__)
    p.add_argument("--png", default=None, help="also draw the split as a bar")
    p.add_argument("--trace-dir", default=None, help="keep the jax.profiler trace here (default: a temp dir)")
    p.set_defaults(steps=2)
    a = p.parse_args(argv)

    import jax

    from varjax.core.mesh import mesh_rules

    step, state, batches, model_cfg, frozen, (mesh, rules) = bench_train.build(a)
    with mesh_rules(mesh, rules):  # traced as the trainer traces it
        compiled = step.lower(state, batches[0], frozen).compile()  # one compile: its HLO names the ops in the trace
    ops = hlo_op_names(compiled.as_text())
    for b in batches[:2]:  # warm-up steps
        state, m = compiled(state, b, frozen)
        jax.block_until_ready((state, m))
    trace_dir = a.trace_dir or tempfile.mkdtemp(prefix="varjax_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        state, m = compiled(state, batches[0], frozen)
        jax.block_until_ready((state, m))
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        sys.exit(f"bench/profile_train.py: no perfetto_trace.json.gz under {trace_dir}; this jax's profiler "
                 "wrote no op events, so there is nothing to split.")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        events = json.load(f)["traceEvents"]

    share, span_us, idle_us = wall_shares(op_intervals(events, ops))
    by_cat = collections.Counter()
    for name, us in share.items():
        by_cat[category(name, ops[name])] += us / 1e6
    gflop = analytic_gflop(model_cfg, a.batch_size)
    rates = {k: gflop[k] / by_cat[k] for k in gflop if by_cat.get(k)}
    top = [{"op": n, "category": category(n, ops[n]), "op_name": ops[n], "wall_ms": us / 1e3}
           for n, us in share.most_common(15)]

    print(f"{'category':>16}  {'wall s':>7}  {'share':>6}  {'GFLOP':>6}  {'GFLOP/s':>7}")
    for k in CATEGORIES:
        g, r = gflop.get(k), rates.get(k)
        print(f"{k:>16}  {by_cat.get(k, 0.0):7.3f}  {by_cat.get(k, 0.0) / (span_us / 1e6):6.1%}  "
              f"{'' if g is None else f'{g:6.1f}'}  {'' if r is None else f'{r:7.0f}'}")
    print(f"{'no op running':>16}  {idle_us / 1e6:7.3f}")
    print(f"{'profiled step':>16}  {span_us / 1e6:7.3f}")
    print("largest ops (wall ms, op):")
    for t in top[:10]:
        print(f"  {t['wall_ms']:8.1f}  {t['op']}  {t['op_name'][-70:]}")

    res = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "depth": model_cfg.depth,
           "batch_size": a.batch_size, "dtype": a.dtype, "scan_layers": a.scan_layers, "remat": a.remat,
           "profiled_step_s": span_us / 1e6, "idle_s": idle_us / 1e6,
           "wall_s": {k: by_cat.get(k, 0.0) for k in CATEGORIES}, "analytic_gflop": gflop,
           "achieved_gflop_per_s": rates, "top_ops": top}
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    if a.png:
        plot(res["wall_s"], res["idle_s"], rates, f"d{model_cfg.depth} train step, batch {a.batch_size}, {a.dtype}, "
             f"{res['device']} ({res['profiled_step_s']:.2f} s)", a.png)
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
