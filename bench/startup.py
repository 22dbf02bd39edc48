"""Start-up: seconds from a ``varjax sample`` command's start to its first finished sample, with the persistent
compilation cache cold and warm, for an official d8 converted with ``varjax convert``.

    python bench/startup.py --var-repo /path/to/VAR --torch-python /path/to/torchenv/bin/python [--runs 2] \
        [--dtype float32] --json startup.json

Steps: the official builder makes a random-weight d8 and the released-shape VQVAE and saves them as the release
ships its files (``bench/official_bench.py --save-weights``); ``varjax convert`` turns them into a model directory;
then ``varjax sample --ckpt DIR --labels 0`` runs once with ``VARJAX_COMPILE_CACHE`` pointing at a fresh directory
(cold: every program compiled) and ``--runs`` more times with the same directory (warm: programs loaded from it).
For each run: the wall time to the line ``[sample] 1 images ...`` (the first sample finished, decode included) and
to the command's exit (the PNG written). TensorFlow and TFDS are made unimportable for the varjax commands.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def timed_command(cmd: list[str], env: dict, marker: str) -> dict:
    """Runs ``cmd``; seconds until a stdout line starts with ``marker``, and until exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first is None and line.startswith(marker):
            first = time.perf_counter() - t0
    rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {rc}:\n{''.join(lines)[-3000:]}")
    return {"to_first_sample_s": first, "to_exit_s": total, "output": [ln.rstrip() for ln in lines][-6:]}


def block_tf_dir(base: str) -> str:
    for m in ("tensorflow", "tensorflow_datasets"):
        os.makedirs(os.path.join(base, m), exist_ok=True)
        with open(os.path.join(base, m, "__init__.py"), "w") as f:
            f.write(f"raise ImportError('{m} is made unimportable in this run')\n")
    return base


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--var-repo", required=True, help="checkout of https://github.com/FoundationVision/VAR")
    p.add_argument("--torch-python", required=True, help="python of a virtualenv with torch")
    p.add_argument("--python", default=sys.executable, help="python of varjax's environment")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--runs", type=int, default=2, help="warm runs after the cold one")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="startup_")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join([block_tf_dir(os.path.join(work, "block_tf")), str(ROOT),
                                         os.environ.get("PYTHONPATH", "")])
    res = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
           "cores": os.cpu_count(), "depth": a.depth, "dtype": a.dtype, "load_before": os.getloadavg()}

    weights = os.path.join(work, "pth")
    subprocess.run([a.torch_python, str(HERE / "official_bench.py"), "--var-repo", a.var_repo, "--what", "sample",
                    "--depth", str(a.depth), "--save-weights", weights], env=env, check=True, capture_output=True)
    model = os.path.join(work, "model")
    varjax = [a.python, "-m", "varjax"]
    t0 = time.perf_counter()
    subprocess.run([*varjax, "convert", "--vae", os.path.join(weights, "vae.pth"), "--var",
                    os.path.join(weights, f"var_d{a.depth}.pth"), "--out", model], env=env, check=True,
                   capture_output=True)
    res["convert_s"] = time.perf_counter() - t0

    cache = os.path.join(work, "compile_cache")  # fresh: the first run is cold
    env["VARJAX_COMPILE_CACHE"] = cache
    sample = [*varjax, "sample", "--ckpt", model, "--labels", "0", "--dtype", a.dtype, "--out",
              os.path.join(work, "sample.png")]
    runs = []
    for i in range(1 + a.runs):
        r = timed_command(sample, env, "[sample] 1 images")
        r["cache"] = "cold" if i == 0 else "warm"
        runs.append(r)
        print(f"[startup] {r['cache']}: first sample after {r['to_first_sample_s']:.1f} s, exit after "
              f"{r['to_exit_s']:.1f} s", flush=True)
    res["runs"] = runs
    res["cache_files"] = len(os.listdir(cache)) if os.path.isdir(cache) else 0
    res["load_after"] = os.getloadavg()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
