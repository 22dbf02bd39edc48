"""Sampling latency/throughput of the compiled sampler (transformer + top-k/top-p + VQVAE decode).

    python bench/bench_sample.py --ckpt DIR --batch-size 2 --steps 5 [--cfg 1.5 --top-k 900 --top-p 0.96]
    python bench/bench_sample.py --depth 8 --batch-size 2 --steps 3 --json out.json   # random weights
    python bench/bench_sample.py --depth 8 --batch-size 2 --steps 3 --decode-only     # the VQVAE decode alone

``--ckpt`` is a model directory (``varjax convert`` / ``varjax train``); ``--depth`` instead builds a VAR of
the release's shape for that depth (width 64 * depth, 1000 classes) and the released tokenizer's shape
(``vae_ch160v4096z32``, 256px or ``--resolution 512``) with random weights. ``sample_time_s`` is the median
wall time of one call of the one compiled program (all scales and the decode, after a warm-up call that
compiles), ``images_per_s`` = batch / sample_time_s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time


def random_models(depth: int, resolution: int, width: int | None = None):
    """(vae_cfg, vae_params, var_cfg, var_params) of the released shapes with random weights."""
    import jax
    import jax.numpy as jnp
    from flax.core import meta

    from varjax.models.var import VAR, VARConfig
    from varjax.models.vqvae import PATCH_NUMS_256, PATCH_NUMS_512, VQVAE, VQVAEConfig

    pns = PATCH_NUMS_256 if resolution == 256 else PATCH_NUMS_512
    vae_cfg = VQVAEConfig(patch_nums=pns)
    var_cfg = VARConfig.official(depth, patch_nums=pns, shared_aln=resolution == 512)
    if width:
        var_cfg = dataclasses.replace(var_cfg, embed_dim=width)
    s = vae_cfg.image_size
    var_params = jax.jit(
        lambda r: meta.unbox(
            VAR(var_cfg).init(
                r, jnp.zeros((1,), jnp.int32), jnp.zeros((1, var_cfg.L - 1, var_cfg.Cvae)), method=VAR.init_all
            )["params"]
        )
    )(jax.random.PRNGKey(0))
    vae_params = jax.jit(lambda r: VQVAE(vae_cfg).init(r, jnp.zeros((1, s, s, 3)), method=VQVAE.init_all)["params"])(
        jax.random.PRNGKey(1)
    )
    return vae_cfg, vae_params, var_cfg, var_params


def timed(fn, args, steps: int) -> tuple[float, list[float]]:
    """(first call incl. compile, per-call wall times of ``steps`` further calls), results awaited."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="model directory with a VAR")
    src.add_argument("--depth", type=int, help="random weights of the release's shape for this depth")
    p.add_argument("--width", type=int, default=None, help="with --depth: embed_dim (default 64 * depth)")
    p.add_argument("--resolution", type=int, default=256, choices=(256, 512), help="with --depth")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed calls after one compile/warm-up call")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.96)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--attention", default=None, help="VARConfig.attention (default: the model's)")
    p.add_argument("--decode-only", action="store_true", help="time only the VQVAE decode of a random f_hat")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from varjax.core.xla_flags import conv_compiler_options
    from varjax.models.vqvae import VQVAE
    from varjax.sampling.var import SampleOptions, make_sampler

    if a.ckpt:
        from varjax.core.model_dir import load_model_dir

        b = load_model_dir(a.ckpt, need_generator=True)
        if b.family != "var":
            raise SystemExit(f"error: --ckpt {a.ckpt} holds a {b.family!r} model; this benchmark samples a VAR.")
        vae_cfg, vae_params, var_cfg, var_params = b.tok_cfg, b.tok_params, b.gen_cfg, b.gen_params
    else:
        vae_cfg, vae_params, var_cfg, var_params = random_models(a.depth, a.resolution, a.width)
    B = a.batch_size
    if a.decode_only:
        hw = vae_cfg.patch_nums[-1]
        f_hat = jax.random.normal(jax.random.PRNGKey(2), (B, hw, hw, vae_cfg.z_channels))
        dt = jnp.dtype(a.dtype)
        fn = jax.jit(
            lambda p, f: VQVAE(vae_cfg).apply(
                {"params": jax.tree.map(lambda x: x.astype(dt), p)}, f.astype(dt), method=VQVAE.fhat_to_img
            ),
            compiler_options=conv_compiler_options(),  # as the sampler compiles its decode
        )
        first, times = timed(fn, (vae_params, f_hat), a.steps)
    else:
        opts = SampleOptions(a.cfg, a.top_k, a.top_p, dtype=a.dtype, attention=a.attention)
        sampler = make_sampler(vae_cfg, var_cfg, opts)
        labels = jnp.arange(B, dtype=jnp.int32) % var_cfg.num_classes
        first, times = timed(sampler, (vae_params, var_params, labels, jax.random.PRNGKey(0)), a.steps)
    med = statistics.median(times)
    res = {
        "what": "vqvae_decode" if a.decode_only else "sample",
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "depth": var_cfg.depth,
        "embed_dim": var_cfg.embed_dim,
        "image_size": vae_cfg.image_size,
        "batch_size": B,
        "cfg": a.cfg,
        "top_k": a.top_k,
        "top_p": a.top_p,
        "dtype": a.dtype,
        "compile_and_first_call_s": first,
        "times_s": times,
        "sample_time_s": med,
        "images_per_s": B / med,
    }
    for k, v in res.items():
        print(f"{k:>26}: {v:.4g}" if isinstance(v, float) else f"{k:>26}: {v}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
