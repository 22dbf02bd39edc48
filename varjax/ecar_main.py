"""``varjax main --model ecar --workdir DIR``: E-CAR on the embedded dataset, with no download.

1. trains the continuous (KL) tokenizer on ``varjax_shapes`` (``configs/ecar_tokenizer_shapes.py``),
2. encodes the training split once (``DIR/latents_train``) and trains E-CAR on it (``configs/ecar_shapes.py``),
3. samples a PNG grid (one row per class, ``DIR/samples.png``) and writes ``DIR/eval.json``: class
   consistency (the dataset's analytic shape detector), sampling GFLOPs per image (XLA's cost analysis of
   the compiled sampler, decoder included) and seconds per image (compiled, warm).

Each stage resumes from its checkpoints. ``--tok.field=value`` / ``--ecar.field=value`` override the configs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from varjax.ecar_sample import FlowSampleOptions, make_sampler


def compiled_sampler(b, opts: FlowSampleOptions, batch: int):
    """(compiled program for ``batch`` labels, its FLOPs per image from XLA's cost analysis)."""
    fn = make_sampler(b.vae_cfg, b.ecar_cfg, opts)
    lab = jnp.zeros((batch,), jnp.int32)
    compiled = fn.lower(b.vae_params, b.ecar_params, lab, jax.random.PRNGKey(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return compiled, float(cost["flops"]) / batch


def evaluate_ecar(ckpt: str, *, per_class: int = 16, opts: FlowSampleOptions | None = None, seed: int = 0,
                  grid: str | None = None) -> dict:
    """Samples ``per_class`` images of every class; class consistency, GFLOPs and seconds per image."""
    from varjax.ckpt import load_model_dir
    from varjax.data.shapes import NUM_CLASSES
    from varjax.evaluate import class_consistency
    from varjax.images import save_grid

    b = load_model_dir(ckpt)
    if b.family != "ecar":
        raise ValueError(f"{ckpt}: holds no E-CAR model (family {b.family!r}).")
    opts = opts or FlowSampleOptions()
    classes = min(b.ecar_cfg.num_classes, NUM_CLASSES)
    labels = np.repeat(np.arange(classes, dtype=np.int32), per_class)
    compiled, flops = compiled_sampler(b, opts, len(labels))
    run = lambda r: compiled(b.vae_params, b.ecar_params, jnp.asarray(labels), r)  # noqa: E731
    jax.block_until_ready(run(jax.random.PRNGKey(seed + 1)))  # warm-up
    t0 = time.perf_counter()
    imgs, _ = run(jax.random.PRNGKey(seed))
    imgs = np.asarray(jax.block_until_ready(imgs))
    dt = time.perf_counter() - t0
    acc, pred = class_consistency(imgs, labels)
    res = {
        "ckpt": str(ckpt),
        "class_consistency": acc,
        "per_class_consistency": [float((pred[labels == c] == c).mean()) for c in range(classes)],
        "num_samples": int(len(labels)),
        "gflops_per_image": flops / 1e9,
        "seconds_per_image": dt / len(labels),
        "sampling": {"cfg": opts.cfg, "steps": opts.steps, "solver": opts.solver, "temperature": opts.temperature,
                     "seed": seed},
        "patch_nums": list(b.ecar_cfg.patch_nums),
        "windows": [list(w) for w in b.ecar_cfg.windows],
    }
    if grid:
        save_grid(grid, imgs, nrow=per_class)
        res["grid"] = str(grid)
    return res


def encode_train_split(ecar_cfg, tokenizer_dir: str, out: str) -> str:
    """Latents (posterior means of the centre crops) of the training split, written once to ``out``."""
    from varjax.ckpt import load_model_dir
    from varjax.train.ecar_trainer import encode_split, write_latents_cache

    if (Path(out) / "latents.npy").is_file():
        return out
    b = load_model_dir(tokenizer_dir)
    lat, lab = encode_split(b.vae_cfg, b.vae_params, ecar_cfg.data, ecar_cfg.data.train_split)
    write_latents_cache(out, lat, lab)
    print(f"[main] latents of {len(lab)} training images written to {out}", flush=True)
    return out


def run(workdir: str, tok_overrides: list[str], ecar_overrides: list[str], per_class: int = 16) -> dict:
    from varjax.main_job import _load_config
    from varjax.train import ecar_trainer, tok_trainer

    wd = Path(workdir)
    t0 = time.time()
    tok_cfg = _load_config("ecar_tokenizer_shapes", tok_overrides, "tok")
    ecar_cfg = _load_config("ecar_shapes", ecar_overrides, "ecar")
    ecar_cfg.tokenizer_dir = str((wd / "tokenizer").resolve())
    print("[main] 1/3 training the continuous tokenizer", flush=True)
    tok_trainer.train(tok_cfg, str(wd / "tokenizer"))
    if not ecar_cfg.latents_cache:
        ecar_cfg.latents_cache = encode_train_split(ecar_cfg, ecar_cfg.tokenizer_dir, str(wd / "latents_train"))
    print(f"[main] 2/3 training E-CAR ({time.time() - t0:.0f}s so far)", flush=True)
    ecar_trainer.train(ecar_cfg, str(wd / "ecar"))
    print(f"[main] 3/3 sampling and evaluating ({time.time() - t0:.0f}s so far)", flush=True)
    opts = FlowSampleOptions(**dict(ecar_cfg.sample))
    res = evaluate_ecar(str(wd / "ecar"), per_class=per_class, opts=opts, grid=str(wd / "samples.png"))
    res["total_seconds"] = time.time() - t0
    (wd / "eval.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(f"[main] samples: {wd / 'samples.png'}   numbers: {wd / 'eval.json'}")
    return res


def run_cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog=argv[0], description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="ecar", choices=("ecar",))
    p.add_argument("--workdir", default="runs/main_ecar")
    p.add_argument("--per-class", type=int, default=16, help="samples per class in the grid and the evaluation")
    a, rest = p.parse_known_args(argv[1:])
    bad = [r for r in rest if not (r.startswith("--tok.") or r.startswith("--ecar."))]
    if bad:
        raise SystemExit(f"error: unknown arguments {bad}; use --tok.field=value or --ecar.field=value")
    run(a.workdir, [r for r in rest if r.startswith("--tok.")], [r for r in rest if r.startswith("--ecar.")],
        a.per_class)


def cmd_sample(a) -> None:
    """``varjax sample --ckpt DIR`` on an E-CAR model directory (guidance ``--cfg``, ``--flow-steps``, ``--solver``;
    steps and solver default to the model directory's ``ecar.sample``)."""
    from varjax.ckpt import load_model_dir, read_model_json
    from varjax.images import save_grid

    b = load_model_dir(a.ckpt)
    defaults = read_model_json(a.ckpt)["ecar"].get("sample", {})
    labels = np.asarray(a.labels, np.int32)
    bad = [int(x) for x in labels if not 0 <= x < b.ecar_cfg.num_classes]
    if bad:
        raise SystemExit(f"error: --labels {bad} out of range; the model has classes 0..{b.ecar_cfg.num_classes - 1}.")
    opts = FlowSampleOptions(cfg=a.cfg, steps=a.flow_steps or int(defaults.get("steps", 8)),
                             solver=a.solver or defaults.get("solver", "euler"),
                             temperature=float(defaults.get("temperature", 1.0)))
    t0 = time.time()
    imgs, lat = make_sampler(b.vae_cfg, b.ecar_cfg, opts)(b.vae_params, b.ecar_params, jnp.asarray(labels),
                                                          jax.random.PRNGKey(a.seed))
    imgs, lat = np.asarray(imgs, np.float32), np.asarray(lat, np.float32)
    print(f"[sample] E-CAR: {len(labels)} images of {imgs.shape[1]}px in {time.time() - t0:.1f}s (compile included)")
    save_grid(a.out, imgs, nrow=min(len(labels), a.nrow or 8))
    print(f"[sample] wrote {a.out}")
    if a.save_npz:
        np.savez(a.save_npz, images=imgs, latents=lat, labels=labels)
        print(f"[sample] wrote {a.save_npz}")
