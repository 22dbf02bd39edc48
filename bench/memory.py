"""Peak memory of varjax and the official PyTorch VAR side by side on the CPU, as the OS sees each process.

    python bench/memory.py --var-repo /path/to/VAR --torch-python /path/to/torchenv/bin/python \
        [--only step,search] [--warm-cache] [--cap-gib 16] --json memory.json

``step``: the peak resident memory (RSS) of the whole process for one d8 training step at batch 16 (from token
ids, float32, the same step as bench/side_by_side.py's ``train``: varjax with scanned blocks and each remat policy
of ``--step-remat``, by default ``dots``, the faster on a CPU, and ``full``, the smaller) and for sampling at
batch 8 (cfg 1.5, top-k 900, top-p 0.96, the released-shape VQVAE decode included), varjax and official
alternating, each in its own process. Each process also says what its memory holds: the RSS once the models
exist, XLA's buffer plan of the step (arguments: parameters, optimizer state, the frozen tokenizer, the batch;
temporaries: activations and gradients) for varjax, and for the official code the bytes of its parameters,
gradients, AdamW state and the tensors autograd saves for the backward pass. With ``--warm-cache`` each varjax
worker is also measured a second way: run once into an empty persistent compilation cache, then again, loading
its program from disk without compiling (as a job that restarts does), which leaves out the compiler's own memory.

``search``: the largest d16 training batch (float32) each fits in ``--cap-gib`` of memory, by doubling from
batch 1. Each trial is its own process, runs one training step (varjax) or two (official: AdamW creates its
state in the first), and is watched every 50 ms: a process whose RSS passes the cap is killed and the trial
counts as not fitting. A trial starts only when the machine has the cap plus 1 GiB available
(``MemAvailable``), so that no trial pushes it into swap or the OOM killer; otherwise it waits, then is reported
as not run. Peak RSS comes from the kernel (``wait4``'s ``ru_maxrss`` of the finished process).

Workers (run by the above; any of them alone prints its JSON):
    python bench/memory.py varjax-train --depth 8 --batch 16 --remat dots --steps 1 --json F
    python bench/memory.py varjax-sample --depth 8 --batch 8 --json F
and XLA's buffer plan of the d16 step (compiled, not run) per remat policy and batch:
    python bench/memory.py plan --depth 16 --remat none,dots,full --batches 8,32 --json F
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_memory import proc_bytes  # bench/ is the script's directory

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GIB = 2**30


# ----------------------------------------------------------------------------------------------- watching


def mem_available() -> int | None:
    """MemAvailable of the machine in bytes (Linux), or None."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants now (0 once gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += proc_bytes(f"/proc/{p}/status", "VmRSS") or 0
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def watch(cmd: list[str], env: dict, cap_bytes: int | None, timeout_s: float, log: str) -> dict:
    """Runs ``cmd``, killing it when its RSS passes ``cap_bytes`` or it runs past ``timeout_s``.

    Returns {rc, seconds, peak_rss_bytes (the kernel's), peak_rss_seen_bytes (polled), killed: None|'cap'|'timeout'}.
    """
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    seen, killed, status, ru = 0, None, 0, None
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = tree_rss(proc.pid)
        seen = max(seen, rss)
        over = cap_bytes is not None and rss > cap_bytes
        if killed is None and (over or time.time() - t0 > timeout_s):
            killed = "cap" if over else "timeout"
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return {"rc": proc.returncode, "seconds": time.time() - t0, "peak_rss_bytes": ru.ru_maxrss * 1024,
            "peak_rss_seen_bytes": seen, "killed": killed}


def run_json(cmd: list[str], env: dict, cap_bytes: int | None, timeout_s: float, log: str) -> dict:
    """``watch`` of a worker that writes ``--json``; its JSON merged into the result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    os.unlink(path)
    res = watch([*cmd, "--json", path], env, cap_bytes, timeout_s, log)
    if os.path.exists(path):
        with open(path) as f:
            res["result"] = json.load(f)
        os.unlink(path)
    elif res["rc"] != 0 and not res["killed"]:
        with open(log) as f:
            res["error"] = f.read()[-1500:]
    return res


# ------------------------------------------------------------------------------------------------- workers


def _shapes(depth: int):
    sys.path.insert(0, str(HERE))
    import gpu_suite

    return gpu_suite, dataclasses.replace(gpu_suite.FULL, depth=depth)


def current_rss() -> int:
    return tree_rss(os.getpid())


def worker_varjax_train(a) -> dict:
    import jax

    gs, sh = _shapes(a.depth)
    t0 = time.time()
    prog = gs.TrainProgram(sh, a.batch, a.remat, dtype=a.dtype)
    res = {"impl": "varjax", "what": "train", "depth": a.depth, "batch_size": a.batch, "remat": a.remat,
           "dtype": a.dtype, "scan_layers": True, "compile_s": prog.compile_s,
           "rss_before_compile_bytes": prog.rss_before_compile, "rss_after_build_bytes": prog.rss_after_compile,
           "program_memory": gs.program_memory(prog.compiled)}
    times = []
    for _ in range(1 + a.steps):
        t1 = time.time()
        jax.block_until_ready(prog.step())
        times.append(time.time() - t1)
    res.update(times_s=times, wall_s=time.time() - t0, peak_rss_bytes=gs.peak_rss_bytes())
    return res


def worker_plan(a) -> dict:
    """XLA's buffer plan of the d16 training step for each remat policy and batch, compiled for this CPU without
    running it (no state allocated): how its device memory grows with the batch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from varjax import config, tasks
    from varjax.core import mesh as mesh_lib
    from varjax.data.sources import DataPlan
    from varjax.train import jit_train_step, with_ema

    gs, sh = _shapes(a.depth)
    rows = []
    for remat in a.remat.split(","):
        for batch in (int(b) for b in a.batches.split(",")):
            cfg = gs.configs_common().var(sh.depth)
            cfg.batch_size, cfg.total_steps = batch, 1000
            cfg.model.update(num_classes=sh.num_classes, scan_layers=True, remat=remat, dtype=a.dtype)
            tok = gs.vae_config(sh)
            data = DataPlan(source="tokens", cache=None, num_shards=1, steps_per_epoch=1000,
                            num_classes=sh.num_classes, image_size=tok.image_size, config=cfg.data)
            plan = config.resolve(cfg, num_devices=1, process_count=1, tokenizer=(None, tok), data=data)
            mesh = mesh_lib.create_mesh(plan.mesh)
            task = tasks.get("var").build(plan, mesh, abstract=True)
            init_fn, step_fn = with_ema(task.init_fn, task.step_fn, plan.ema_decay)
            state = mesh_lib.abstract_sharded_state(init_fn, mesh, plan.rules, jax.random.PRNGKey(0))
            shardings = jax.tree.map(lambda x: x.sharding, state)
            batch_ = {"tokens": jax.ShapeDtypeStruct((batch, plan.model.L), jnp.int32),
                      "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
            t0 = time.time()
            with mesh_lib.mesh_rules(mesh, plan.rules):
                compiled = jit_train_step(step_fn, shardings, mesh).lower(state, batch_, task.frozen).compile()
            mem = gs.program_memory(compiled)
            state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
            rows.append({"remat": remat, "batch_size": batch, "compile_s": time.time() - t0, "program_memory": mem,
                         "state_bytes": state_bytes})
            print(f"[plan] d{sh.depth} remat {remat} batch {batch}: arguments {mem['argument'] / GIB:.2f} GiB, "
                  f"temporaries {mem['temp'] / GIB:.2f} GiB", flush=True)
    return {"depth": sh.depth, "dtype": a.dtype, "rows": rows}


def worker_varjax_sample(a) -> dict:
    import jax
    import jax.numpy as jnp

    from varjax.models.var import VARConfig
    from varjax.sampling.var import SampleOptions, make_sampler

    gs, sh = _shapes(a.depth)
    vae_cfg = gs.vae_config(sh)
    var_cfg = VARConfig.official(sh.depth, patch_nums=sh.patch_nums)
    var_params, vae_params = gs.random_var(var_cfg), gs.random_vqvae(vae_cfg)
    rss_models = current_rss()
    labels = jnp.arange(a.batch, dtype=jnp.int32) % var_cfg.num_classes
    args = (vae_params, var_params, labels, jax.random.PRNGKey(0))
    t0 = time.time()
    compiled = make_sampler(vae_cfg, var_cfg, SampleOptions(cfg=1.5, top_k=900, top_p=0.96, dtype=a.dtype)).lower(
        *args).compile()
    compile_s, rss_compiled = time.time() - t0, current_rss()
    times = []
    for _ in range(1 + a.steps):
        t1 = time.time()
        jax.block_until_ready(compiled(*args))
        times.append(time.time() - t1)
    return {"impl": "varjax", "what": "sample", "depth": a.depth, "batch_size": a.batch, "dtype": a.dtype,
            "rss_before_compile_bytes": rss_models, "rss_after_build_bytes": rss_compiled, "compile_s": compile_s,
            "program_memory": gs.program_memory(compiled), "times_s": times, "peak_rss_bytes": gs.peak_rss_bytes()}


# --------------------------------------------------------------------------------------------------- driver


def _official(a, what: str, depth: int, batch: int, steps: int, breakdown: bool = False) -> list[str]:
    cmd = [a.torch_python, str(HERE / "official_bench.py"), "--var-repo", a.var_repo, "--what", what, "--depth",
           str(depth), "--batch-size", str(batch), "--steps", str(steps)]
    return cmd + (["--memory-breakdown"] if breakdown else [])


def _varjax(a, what: str, depth: int, batch: int, steps: int, remat: str = "dots") -> list[str]:
    cmd = [a.python, str(Path(__file__).resolve()), f"varjax-{what}", "--depth", str(depth), "--batch", str(batch),
           "--steps", str(steps)]
    return cmd + (["--remat", remat] if what == "train" else [])


def _wait_for_room(need: int, patience_s: float) -> bool:
    t0 = time.time()
    while True:
        avail = mem_available()
        if avail is None or avail >= need:
            return True
        if time.time() - t0 > patience_s:
            return False
        time.sleep(10)


def compare_step(a, env: dict, logdir: str) -> dict:
    """d8 training step at batch 16 (varjax with each of ``--step-remat``) and sampling at batch 8: varjax and
    official, alternating."""
    out = {}
    # warm: the same worker run once before into an empty persistent compilation cache, so that the measured
    # process loads its program from disk instead of running the compiler (a resumed job's second start)
    states = ["cold", "warm"] if a.warm_cache else ["cold"]
    cache_env = dict(env, JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="memory_cache_"),
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0") if a.warm_cache else env
    for what, batch in (("train", 16), ("sample", 8)):
        o = None
        for remat in a.step_remat.split(",") if what == "train" else [""]:
            for state in states:
                cmd, name = _varjax(a, what, 8, batch, 1, remat or "dots"), f"varjax_{what}{remat}_{state}"
                if state == "warm":
                    run_json(cmd, cache_env, None, a.timeout, os.path.join(logdir, name + "_fill.log"))
                v = run_json(cmd, cache_env if state == "warm" else env, None, a.timeout,
                             os.path.join(logdir, name + ".log"))
                if o is None:
                    o = run_json(_official(a, what, 8, batch, 1, breakdown=what == "train"), env, None, a.timeout,
                                 os.path.join(logdir, f"official_{what}.log"))
                ratio = v["peak_rss_bytes"] / o["peak_rss_bytes"] if o.get("peak_rss_bytes") else None
                key = "_".join(k for k in (what, remat, "warm" if state == "warm" else "") if k)
                out[key] = {"batch_size": batch, "remat": remat or None, "compile_cache": state, "varjax": v,
                            "official": o, "ratio": ratio}
                print(f"[memory] d8 {what} batch {batch}{' remat ' + remat if remat else ''}"
                      f"{', compile cache warm' if state == 'warm' else ''}: varjax "
                      f"{v['peak_rss_bytes'] / GIB:.2f} GiB, official {o['peak_rss_bytes'] / GIB:.2f} GiB, ratio "
                      f"{ratio:.2f}", flush=True)
    return out


def search(a, env: dict, logdir: str, impl: str, remat: str = "dots") -> dict:
    """Largest d16 float32 training batch within the cap, by doubling from 1."""
    cap = int(a.cap_gib * GIB)
    trials, best, batch = [], None, 1
    while batch <= a.max_batch:
        if not _wait_for_room(cap + GIB, a.patience):
            trials.append({"batch_size": batch, "status": "not run: the machine lacked the memory for the cap"})
            break
        cmd = _varjax(a, "train", 16, batch, 0, remat) if impl == "varjax" else _official(a, "train", 16, batch, 1)
        r = run_json(cmd, env, cap, a.timeout, os.path.join(logdir, f"search_{impl}_{remat}_b{batch}.log"))
        fits = r["rc"] == 0 and not r["killed"] and r["peak_rss_bytes"] <= cap
        status = "fits" if fits else ("over the cap" if r["killed"] == "cap" or r["peak_rss_bytes"] > cap else
                                      f"failed ({r['killed'] or 'rc ' + str(r['rc'])})")
        trials.append({"batch_size": batch, "status": status, "peak_rss_bytes": r["peak_rss_bytes"],
                       "seconds": r["seconds"], "result": r.get("result"), "error": r.get("error")})
        print(f"[memory] d16 {impl}{' ' + remat if impl == 'varjax' else ''} batch {batch}: {status}, peak "
              f"{r['peak_rss_bytes'] / GIB:.2f} GiB in {r['seconds']:.0f} s", flush=True)
        if not fits:
            break
        best, batch = batch, batch * 2
    return {"impl": impl, "remat": remat if impl == "varjax" else None, "cap_gib": a.cap_gib, "largest_batch": best,
            "trials": trials}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="compare", choices=("compare", "varjax-train", "varjax-sample", "plan"))
    p.add_argument("--var-repo", help="checkout of https://github.com/FoundationVision/VAR")
    p.add_argument("--torch-python", help="python of a virtualenv with torch")
    p.add_argument("--python", default=sys.executable, help="python of varjax's environment")
    p.add_argument("--only", default="step,search", help="comma-separated subset of step,search")
    p.add_argument("--step-remat", default="dots,full", help="varjax remat policies of the d8 step, comma-separated")
    p.add_argument("--warm-cache", action="store_true",
                   help="step: also measure varjax with its programs loaded from a warm compilation cache")
    p.add_argument("--search-remat", default="dots", help="varjax remat policies to search with, comma-separated")
    p.add_argument("--cap-gib", type=float, default=16.0)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--patience", type=float, default=600, help="seconds to wait for free memory before a trial")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    p.add_argument("--depth", type=int, default=8, help="workers: model depth")
    p.add_argument("--batch", type=int, default=16, help="workers: batch")
    p.add_argument("--steps", type=int, default=1, help="workers: calls after the first")
    p.add_argument("--remat", default="dots", help="varjax-train: remat policy (plan: comma-separated)")
    p.add_argument("--batches", default="8,32", help="plan: batches, comma-separated")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.mode != "compare":
        res = {"varjax-train": worker_varjax_train, "varjax-sample": worker_varjax_sample, "plan": worker_plan}[
            a.mode](a)
    else:
        if not (a.var_repo and a.torch_python):
            p.error("compare needs --var-repo and --torch-python")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", VARJAX_COMPILE_CACHE="off")
        env.pop("XLA_FLAGS", None)
        logdir = tempfile.mkdtemp(prefix="memory_logs_")
        print(f"[memory] logs in {logdir}", flush=True)
        res = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
               "cores": os.cpu_count(), "mem_total_bytes": _mem_total()}
        only = a.only.split(",")
        if "step" in only:
            res["step"] = compare_step(a, env, logdir)
            _save(a, res)
        if "search" in only:
            res["search"] = [search(a, env, logdir, "official")]
            _save(a, res)
            for remat in a.search_remat.split(","):
                res["search"].append(search(a, env, logdir, "varjax", remat))
                _save(a, res)
    _save(a, res)
    return res


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None


def _save(a, res: dict) -> None:
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2, default=str)


if __name__ == "__main__":
    sys.exit(main() and 0)
