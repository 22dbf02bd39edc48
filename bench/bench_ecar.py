"""E-CAR vs VAR vs a single-stage flow baseline on the embedded data: sampling cost and class consistency.

    PYTHONPATH=. python bench/bench_ecar.py --out bench/ecar_results.json \
        [--ecar runs/main_ecar/ecar] [--flow runs/flow_baseline] [--var runs/main/var]

The three generators of the embedded main jobs, in one process on one machine, at the same batch:

* E-CAR (``configs/ecar_shapes.py``): stages 1-2-4-8, ``--steps`` flow steps per stage;
* the flow baseline: the same transformer and flow head with a single 8x8 stage that denoises the whole
  time range [0, 1] in ``S * steps`` steps (the same number of solver steps as E-CAR in total);
* VAR (``configs/var_shapes.py`` on ``configs/tokenizer_shapes.py``): scales 1-2-3-4-6-8, guidance 4, top-k 5.

Sampling GFLOPs per image come from XLA's cost analysis of each compiled sampler (tokenizer decoder
included), with the analytic split of E-CAR/baseline into transformer and flow head; seconds per image are
the median of three warm runs. A model directory (a trained workdir) adds its class consistency; without
one the model is built with random weights, which changes nothing in the cost columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from varjax.ecar_sample import FlowSampleOptions, sampling_flops
from varjax.ecar_sample import make_sampler as make_flow_sampler
from varjax.models.ecar import ECAR
from varjax.models.kl_ae import KLAE
from varjax.sample import SampleOptions
from varjax.sample import make_sampler as make_var_sampler

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 6


def _config(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _random_ecar(patch_nums):
    from varjax.train.ecar_trainer import ecar_config_from
    from varjax.train.kl_trainer import ae_config_from

    ae_cfg = ae_config_from(_config("ecar_tokenizer_shapes"))
    c = _config("ecar_shapes")
    c.model.patch_nums = patch_nums
    cfg = ecar_config_from(c, ae_cfg, NUM_CLASSES)
    ae_params = meta.unbox(KLAE(ae_cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                             method=KLAE.init_all)["params"])
    L = cfg.L
    params = meta.unbox(ECAR(cfg).init(jax.random.PRNGKey(1), jnp.zeros((1,), jnp.int32),
                                       jnp.zeros((1, L - cfg.first_l, cfg.Cvae)), jnp.zeros((1, L, cfg.Cvae)),
                                       jnp.zeros((1, L)))["params"])
    return ae_cfg, ae_params, cfg, params


def _random_var():
    from varjax.models.var import VAR
    from varjax.models.vqvae import VQVAE
    from varjax.train.tok_trainer import vae_config_from
    from varjax.train.var_trainer import var_config_from

    vae_cfg = vae_config_from(_config("tokenizer_shapes"))
    var_cfg = var_config_from(_config("var_shapes"), vae_cfg, NUM_CLASSES)
    vae_params = meta.unbox(VQVAE(vae_cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                                method=VQVAE.init_all)["params"])
    x = jnp.zeros((1, var_cfg.L - var_cfg.first_l, var_cfg.Cvae))
    var_params = meta.unbox(VAR(var_cfg).init(jax.random.PRNGKey(1), jnp.zeros((1,), jnp.int32), x,
                                              method=VAR.init_all)["params"])
    return vae_cfg, vae_params, var_cfg, var_params


def _measure(fn, args, labels, repeats: int = 3):
    """(compiled, FLOPs per image from XLA, median warm seconds per image, outputs of the last run)."""
    compiled = fn.lower(*args, jnp.asarray(labels), jax.random.PRNGKey(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    jax.block_until_ready(compiled(*args, jnp.asarray(labels), jax.random.PRNGKey(1)))
    times, out = [], None
    for i in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args, jnp.asarray(labels), jax.random.PRNGKey(100 + i)))
        times.append(time.perf_counter() - t0)
    return float(cost["flops"]) / len(labels), float(np.median(times)) / len(labels), out


def _consistency(imgs, labels) -> float:
    from varjax.evaluate import class_consistency

    return class_consistency(np.asarray(imgs, np.float32), labels)[0]


def bench_flow(name, ckpt, patch_nums, opts, labels) -> dict:
    if ckpt:
        from varjax.ckpt import load_model_dir

        b = load_model_dir(ckpt)
        ae_cfg, ae_params, cfg, params = b.vae_cfg, b.vae_params, b.ecar_cfg, b.ecar_params
    else:
        ae_cfg, ae_params, cfg, params = _random_ecar(patch_nums)
    fn = make_flow_sampler(ae_cfg, cfg, opts)
    flops, sec, (imgs, _) = _measure(fn, (ae_params, params), labels)
    parts = sampling_flops(cfg, opts, 1)
    return {
        "model": name, "params": _count(params), "stages": list(cfg.patch_nums),
        "windows": [[round(a, 4), round(b, 4)] for a, b in cfg.windows],
        "steps_per_stage": opts.steps, "head_token_evals": int(sum(r * r for r in cfg.patch_nums) * opts.steps),
        "gflops_per_image": flops / 1e9, "gflops_transformer": parts["transformer"] / 1e9,
        "gflops_flow_head": parts["flow_head"] / 1e9, "seconds_per_image": sec,
        "class_consistency": _consistency(imgs, labels) if ckpt else None, "ckpt": ckpt,
    }


def bench_var(ckpt, labels) -> dict:
    if ckpt:
        from varjax.ckpt import load_model_dir

        b = load_model_dir(ckpt, need_var=True)
        vae_cfg, vae_params, var_cfg, var_params = b.vae_cfg, b.vae_params, b.var_cfg, b.var_params
    else:
        vae_cfg, vae_params, var_cfg, var_params = _random_var()
    fn = make_var_sampler(vae_cfg, var_cfg, SampleOptions(cfg=4.0, top_k=5, top_p=0.0))  # as in the README table
    flops, sec, (imgs, _) = _measure(fn, (vae_params, var_params), labels)
    return {"model": "VAR", "params": _count(var_params), "stages": list(var_cfg.patch_nums),
            "gflops_per_image": flops / 1e9, "seconds_per_image": sec,
            "class_consistency": _consistency(imgs, labels) if ckpt else None, "ckpt": ckpt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ecar", default="", help="trained E-CAR workdir (e.g. runs/main_ecar/ecar)")
    p.add_argument("--flow", default="", help="trained single-stage flow workdir")
    p.add_argument("--var", default="", help="trained VAR workdir (e.g. runs/main/var)")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="E-CAR flow steps per stage")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance of the flow models (configs/ecar_shapes.py's)")
    p.add_argument("--temperature", type=float, default=0.3, help="noise scale of the flow models' sampling")
    p.add_argument("--out", default="bench/ecar_results.json")
    a = p.parse_args()
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), a.per_class)
    stages = _config("ecar_shapes").model.patch_nums or (1, 2, 4, 8)
    S = len(stages)
    ecar_opts = FlowSampleOptions(cfg=a.cfg, steps=a.steps, temperature=a.temperature)
    flow_opts = dataclasses.replace(ecar_opts, steps=a.steps * S)
    rows = [
        bench_flow("E-CAR", a.ecar, stages, ecar_opts, labels),
        bench_flow("flow, 1 stage", a.flow, (stages[-1],), flow_opts, labels),
        bench_var(a.var, labels),
    ]
    res = {"device": str(jax.devices()[0]), "batch": int(len(labels)), "rows": rows}
    Path(a.out).write_text(json.dumps(res, indent=2))
    print("| model | params | stages | GFLOPs/img | s/img | class consistency |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        cc = "-" if r["class_consistency"] is None else f"{100 * r['class_consistency']:.1f}%"
        print(f"| {r['model']} | {r['params']:,} | {r['stages']} | {r['gflops_per_image']:.3f} | "
              f"{r['seconds_per_image']:.4f} | {cc} |")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
