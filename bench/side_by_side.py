"""varjax against the official PyTorch VAR on the same machine in the same run; prints ratios, writes JSON.

    python bench/side_by_side.py --var-repo /path/to/VAR --torch-python /path/to/torchenv/bin/python \
        [--varjax-python python] [--steps 3] [--only train,sample,decode] --json side_by_side.json

(``bench/side_by_side.sh`` wraps it with this machine's paths.) The official code is a checkout of
``git clone https://github.com/FoundationVision/VAR``; the torch environment is a separate virtualenv
(``python -m venv torchenv && torchenv/bin/pip install torch``): torch is never a varjax dependency.

Benchmarks (random weights, float32, 256px schedule, d8 = width 512, 8 heads, 1000 classes, V 4096):
  train   one training step from token ids, batch 4 (varjax: bench/bench_train.py; official: forward,
          backward, AdamW step of its VAR with idxBl_to_var_input), seconds per step;
  sample  CFG sampling batch 2, cfg 1.5, top-k 900, top-p 0.96, VQVAE decode included, seconds per call;
  decode  the released-shape VQVAE decode (ch 160, z 32) of a batch of 2, seconds per call.
Each number is a median over ``--steps`` calls after a warm-up call; the runs alternate between the two
implementations, benchmark by benchmark, so both see the same machine load. The ratio is varjax / official
(< 1: varjax is faster).

``--memory`` (or ``--only ...,memory``) also measures the peak resident memory of the whole process, each run in
its own process (``bench/memory.py``): a d8 training step at batch 16 (varjax with remat ``dots`` and ``full``) and
sampling at batch 8, with what each process holds (parameters, optimizer state, saved activations).

``--profile`` also splits one training step of each by kind of work (weight products, attention, the rest):
varjax with ``bench/profile_train.py`` (wall time shared among concurrently running XLA ops), the official code
with ``torch.profiler`` (op self time; its eager ops run one after another).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BENCHES = {
    "train": (
        # the blocks as one loop: XLA:CPU fuses an unrolled stack's backward across blocks (see bench/README);
        # remat 'dots' keeps the weight matmuls' outputs and recomputes attention, which moves less memory
        ["bench_train.py", "--depth", "8", "--batch-size", "4", "--dtype", "float32", "--scan-layers",
         "--remat", "dots"],
        ["--what", "train", "--depth", "8", "--batch-size", "4"],
        "step_time_s",
    ),
    "sample": (
        ["bench_sample.py", "--depth", "8", "--batch-size", "2", "--cfg", "1.5", "--top-k", "900", "--top-p", "0.96"],
        ["--what", "sample", "--depth", "8", "--batch-size", "2", "--cfg", "1.5", "--top-k", "900", "--top-p", "0.96"],
        "sample_time_s",
    ),
    "decode": (
        ["bench_sample.py", "--depth", "8", "--batch-size", "2", "--decode-only"],
        ["--what", "decode", "--depth", "8", "--batch-size", "2"],
        "sample_time_s",
    ),
}


def _run(cmd: list[str], env: dict, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    t0 = time.time()
    proc = subprocess.run(cmd + ["--json", out], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(out) as f:
        res = json.load(f)
    os.unlink(out)
    res["process_wall_s"] = time.time() - t0
    return res


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--var-repo", required=True, help="checkout of https://github.com/FoundationVision/VAR")
    p.add_argument("--torch-python", required=True, help="python of a virtualenv with torch")
    p.add_argument("--varjax-python", default=sys.executable, help="python of varjax's environment")
    p.add_argument("--steps", type=int, default=3, help="timed calls per benchmark (after a warm-up call)")
    p.add_argument("--only", default="train,sample,decode",
                   help="comma-separated subset of train,sample,decode,memory")
    p.add_argument("--memory", action="store_true", help="also the peak memory of a d8 step and of sampling")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark process")
    p.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for varjax (cpu, cuda, tpu)")
    p.add_argument("--profile", action="store_true", help="also split one training step of each by kind of work")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    names = [n for n in a.only.split(",") if n and n != "memory"]
    memory = a.memory or "memory" in a.only.split(",")
    bad = [n for n in names if n not in BENCHES]
    if bad:
        raise SystemExit(f"error: --only {bad}: expected names among {', '.join(BENCHES)}.")

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["JAX_PLATFORMS"] = a.platform
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    results = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_before": _load(),
        "benchmarks": {},
    }
    for name in names:
        vj_args, off_args, key = BENCHES[name]
        steps = ["--steps", str(a.steps)]
        vj = _run([a.varjax_python, os.path.join(HERE, vj_args[0]), *vj_args[1:], *steps], env, a.timeout)
        prof = ["--profile"] if a.profile and name == "train" else []
        off = _run(
            [a.torch_python, os.path.join(HERE, "official_bench.py"), "--var-repo", a.var_repo, *off_args, *steps,
             *prof],
            env,
            a.timeout,
        )
        ratio = vj[key] / off[key]
        results["benchmarks"][name] = {"varjax": vj, "official": off, "key": key, "ratio": ratio, "load": _load()}
        print(
            f"[side-by-side] {name:6s} varjax {vj[key]:8.3f} s   official {off[key]:8.3f} s   "
            f"ratio {ratio:.2f}   (load {_load()})",
            flush=True,
        )
        if prof:
            vp = _run([a.varjax_python, os.path.join(HERE, "profile_train.py"), *vj_args[1:]], env, a.timeout)
            vj["profile_s"] = {**vp["wall_s"], "no op running": vp["idle_s"]}
            for k in sorted(set(vj["profile_s"]) | set(off["profile_s"])):
                print(f"[side-by-side] train  {k:16s} varjax {vj['profile_s'].get(k, 0.0):6.2f} s   "
                      f"official {off['profile_s'].get(k, 0.0):6.2f} s", flush=True)
        if a.json:  # after every benchmark, so a long run that is stopped keeps what it measured
            with open(a.json, "w") as f:
                json.dump(results, f, indent=2)
    if memory:
        sys.path.insert(0, HERE)
        import memory as memory_bench

        ns = argparse.Namespace(python=a.varjax_python, torch_python=a.torch_python, var_repo=a.var_repo,
                                timeout=a.timeout, step_remat="dots,full")
        mem_env = dict(env, VARJAX_COMPILE_CACHE="off")  # each process compiles, as a first run does
        mem_env.pop("XLA_FLAGS", None)
        results["memory"] = memory_bench.compare_step(ns, mem_env, tempfile.mkdtemp(prefix="memory_logs_"))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
