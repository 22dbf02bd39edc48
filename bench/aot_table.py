"""Compiles the released recipes' training steps for TPU slices on this host and tabulates memory per device.

    pip install 'varjax[tpu]'          # libtpu describes the slices; no TPU is needed
    python bench/aot_table.py --json bench/results/aot_tpu.json [--only d16,d36] [--topologies v5p-64,v6e-64]

Each row is one ``varjax compile`` run in its own process (libtpu is loaded once per process), with the
recipe's own batch, mesh, scan and remat unless the row overrides them, and the batch as cached token ids
(``config.data.tokens_cache``: the pod recipe tokenizes ImageNet once). Prints a markdown table: per-device
arguments, temporaries and total against the chip's HBM, whether it fits, model FLOPs per step and the
compile time on this host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# name -> (config, resolution); each recipe's own batch, mesh and remat unless ADJUST overrides them
RECIPES = {
    "d16": ("configs/var_d16.py", 256),
    "d20": ("configs/var_d20.py", 256),
    "d24": ("configs/var_d24.py", 256),
    "d30": ("configs/var_d30.py", 256),
    "d36": ("configs/var_d36.py", 512),
}
# per (recipe, topology) overrides where the recipe's defaults do not fit the slice's HBM
ADJUST = {
    ("d16", "v6e-64"): ["--config.model.remat=dots"],
    ("d20", "v6e-64"): ["--config.model.remat=dots"],
    ("d24", "v6e-64"): ["--config.model.remat=dots", "--config.mesh=[('data',-1),('fsdp',4),('tensor',1)]"],
    ("d24", "v5p-64"): ["--config.model.remat=dots"],
}


def compile_row(recipe: str, topology: str, extra: list[str]) -> dict:
    config, resolution = RECIPES[recipe]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "varjax", "compile", "--config", os.path.join(root, config),
               "--topology", topology, "--resolution", str(resolution), "--json", f.name,
               "--config.data.tokens_cache=cached", *ADJUST.get((recipe, topology), []), *extra]
        print("$", " ".join(cmd[2:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("[compile]"):
                print(line, flush=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"recipe": recipe, "topology": topology, "error": " ".join(tail)}
        with open(f.name) as g:
            info = json.load(g)
    shown = [c for i, c in enumerate(cmd) if c != "--json" and cmd[i - 1] != "--json"]  # not the temporary file
    info.update(recipe=recipe, command="varjax " + " ".join(shown[3:]).replace(root + "/", ""))
    return info


def markdown(rows: list[dict]) -> str:
    gib = 2**30
    out = [
        "| model | res | topology | devices x chip | batch | mesh (data, fsdp, tensor) | remat | arguments | "
        "temporaries | total / HBM per device | fits | model TFLOP/step | compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['recipe']} | | {r['topology']} | | | | | | | | error: {r['error'][:80]} | | |")
            continue
        m, mesh = r["model"], r["mesh"]
        res = 16 * m["patch_nums"][-1]
        out.append(
            f"| d{m['depth']} ({r['params'] / 1e9:.2f} B) | {res} | {r['topology']} | {r['devices']} x "
            f"{r['device_kind']} | {r['batch_size']} | {mesh.get('data')}, {mesh.get('fsdp')}, {mesh.get('tensor')} "
            f"| {r['remat']} | {r['argument_bytes'] / gib:.1f} GiB | {r['temp_bytes'] / gib:.1f} GiB | "
            f"{r['total_bytes'] / gib:.1f} / {r['hbm_bytes'] / gib:.0f} GiB | {'yes' if r['fits'] else 'no'} | "
            f"{r['model_flops_per_step'] / 1e12:.0f} | {r['compile_s']:.0f} s |"
        )
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(RECIPES), help="comma-separated recipes (d16,d20,d24,d30,d36)")
    p.add_argument("--topologies", default="v5p-64,v6e-64", help="comma-separated slice names")
    p.add_argument("--json", help="write every row (the full compile report) here")
    p.add_argument("overrides", nargs="*", help="extra --config.field=value for every row")
    a = p.parse_args(argv)
    rows = []
    for recipe in a.only.split(","):
        if recipe not in RECIPES:
            raise SystemExit(f"error: --only {recipe!r}: expected some of {', '.join(RECIPES)}.")
        for topology in a.topologies.split(","):
            rows.append(compile_row(recipe, topology, a.overrides))
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(rows, f, indent=2)
    print(markdown(rows))


if __name__ == "__main__":
    main()
