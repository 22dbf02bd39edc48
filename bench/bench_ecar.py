"""E-CAR against a DiT-style flow baseline and VAR on the embedded data: sampling cost, class consistency, diversity.

    varjax main --model ecar --workdir runs/main_ecar          # E-CAR, coherent flow (and its KL tokenizer)
    varjax main --workdir runs/main                            # VAR
    varjax train --config configs/ecar_shapes.py:mlp --workdir runs/ecar_mlp \
        --config.tokenizer_dir=runs/main_ecar/decoder --config.latents_cache=runs/main_ecar/latents_train
    varjax train --config configs/ecar_shapes.py:dit --workdir runs/dit_baseline \
        --config.tokenizer_dir=runs/main_ecar/decoder --config.latents_cache=runs/main_ecar/latents_train
    python bench/bench_ecar.py --ecar runs/main_ecar/ecar --ecar-mlp runs/ecar_mlp --dit runs/dit_baseline \
        --var runs/main/var --out bench/ecar_results.json

Every generator of the comparison, in one process on one machine, scored as ``varjax eval`` scores it
(``varjax.eval.consistency.evaluate``: ``--per-class`` samples of each of the 6 classes, seed 0):

* **DiT flow** (``--dit``, ``configs/ecar_shapes.py:dit``): no stage-wise transformer, one 8x8 stage over the
  whole time range [0, 1], every token denoised jointly at every step by a 4-block DiT; parameters within 10% of
  E-CAR's; the same Euler solver at 8, 16 and 32 steps;
* **E-CAR, coherent flow** (``--ecar``, ``configs/ecar_shapes.py``): stages 1-2-4-8, the stage-wise transformer
  once per stage and the 2-block flow DiT at every flow step, with the directory's steps per stage (the recipe's
  8, 8, 2, 2) and with 8 on every stage;
* **E-CAR, MLP head** (``--ecar-mlp``, ``configs/ecar_shapes.py:mlp``): the same stages with MAR's per-token head;
* **VAR** (``--var``, the VAR main job's model): the main job's sampling (no guidance, top-p 0.8), the former
  one (guidance 4, top-k 2) and a wider draw at guidance 4 (``--var-wide``: top-k, top-p).

The flow models sample at temperature 1 with each directory's guidance. Columns: parameters of the generator;
sampling GFLOPs per image of the generator (XLA's cost analysis of the compiled sampler less that of the tokenizer
decoder, which every row on one tokenizer pays alike) and with the decoder; seconds per
image (compiled programs, batches of 64, this machine's CPU); class consistency (the dataset's shape detector) and
its lowest class; ``shape_fd`` and ``shape_recall`` against 600 held-out test images (``varjax.eval.shape_metrics``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np


def _params(ckpt: str) -> int:
    from varjax.core.model_dir import load_model_dir

    b = load_model_dir(ckpt, need_generator=True)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(b.gen_params)))


def row(name: str, ckpt: str, per_class: int, **flags) -> dict:
    """One row: ``varjax eval``'s numbers of ``ckpt`` under the sampling ``flags``."""
    from varjax.eval.consistency import evaluate

    res = evaluate(ckpt, per_class_n=per_class, num_heldout=64, flags=flags, seed=0)
    keep = ("class_consistency", "per_class_consistency", "shape_fd", "shape_recall", "shape_precision",
            "shape_fd_floor", "shape_fd_real", "gflops_per_image", "decoder_gflops_per_image", "seconds_per_image",
            "sampling")
    out = {"model": name, "ckpt": ckpt, "params": _params(ckpt), **{k: res.get(k) for k in keep}}
    out["min_class_consistency"] = min(res["per_class_consistency"])
    out["generator_gflops_per_image"] = res["gflops_per_image"] - res["decoder_gflops_per_image"]
    print(f"[bench_ecar] {fmt(out)}", flush=True)
    return out


def fmt(r: dict) -> str:
    return (f"| {r['model']} | {r['params']:,} | {r['generator_gflops_per_image']:.3f} | {r['gflops_per_image']:.3f} | "
            f"{r['seconds_per_image']:.4f} | "
            f"{100 * r['class_consistency']:.1f}% (min {100 * r['min_class_consistency']:.1f}%) | "
            f"{r['shape_fd']:.2f} | {r['shape_recall']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ecar", required=True, help="E-CAR workdir with the coherent flow (runs/main_ecar/ecar)")
    p.add_argument("--ecar-mlp", required=True, help="E-CAR workdir with the per-token MLP head")
    p.add_argument("--dit", required=True, help="DiT flow baseline workdir (configs/ecar_shapes.py:dit)")
    p.add_argument("--var", required=True, help="VAR workdir (runs/main/var)")
    p.add_argument("--per-class", type=int, default=64, help="samples per class scored (as varjax eval)")
    p.add_argument("--dit-steps", default="8,16,32", help="solver steps of the DiT flow baseline")
    p.add_argument("--var-wide", default="0,0.95", help="top-k,top-p of VAR's wider draw")
    p.add_argument("--out", default="bench/ecar_results.json")
    a = p.parse_args()
    t0 = time.time()
    rows = [row(f"DiT flow, {n} steps", a.dit, a.per_class, flow_steps=int(n), temperature=1.0)
            for n in a.dit_steps.split(",")]
    rows.append(row("E-CAR, MLP head", a.ecar_mlp, a.per_class, temperature=1.0))
    rows.append(row("E-CAR, coherent flow", a.ecar, a.per_class, temperature=1.0))
    rows.append(row("E-CAR, coherent flow, 8 steps every stage", a.ecar, a.per_class, temperature=1.0, flow_steps=8))
    rows.append(row("VAR, main job (no guidance, top-p 0.8)", a.var, a.per_class, cfg=1.0, top_k=0, top_p=0.8))
    k, tp = a.var_wide.split(",")
    rows.append(row("VAR, guidance 4, top-k 2", a.var, a.per_class, cfg=4.0, top_k=2, top_p=0.0))
    rows.append(row(f"VAR, guidance 4, top-k {k} top-p {tp}", a.var, a.per_class, cfg=4.0, top_k=int(k),
                    top_p=float(tp)))
    res = {"command": "python bench/bench_ecar.py " + " ".join(f"--{x} {getattr(a, x.replace('-', '_'))}" for x in
                                                                ("ecar", "ecar-mlp", "dit", "var", "per-class")),
           "machine": f"{platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} device(s)",
           "date": time.strftime("%Y-%m-%d"), "seconds": time.time() - t0, "rows": rows}
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print("| model | params | generator GFLOPs/img | with decoder | s/img | class consistency | shape_fd | "
          "shape_recall |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(fmt(r))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
