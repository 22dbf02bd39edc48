"""Training-step throughput of a VAR config: step time, images/s, tokens/s and MFU.

    python bench/bench_train.py --depth 16 [--width 1024] [--batch-size 64] [--steps 10] [--peak-tflops 989]

Runs the trainer's own jitted step (``varjax.tasks.var``'s step, jitted by ``varjax.train.jit_train_step``:
tokenizer teacher-forcing inputs, forward, backward, AdamW update) on the available devices with synthetic token
batches (random token ids fed as ``tokens``, so the tokenizer's encoder is not timed). FLOPs per step come from
the analytic count in ``varjax.models.flops`` (3 x forward matmul FLOPs, block-causal attention counted as 'masked');
MFU = achieved FLOP/s / (devices x peak FLOP/s). Peak FLOP/s per device come from ``--peak-tflops`` or the
small table below (dense bf16 figures); on a device not in the table MFU is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PEAK_TFLOPS = {  # dense bf16 per device
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


def peak_tflops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, v in PEAK_TFLOPS.items():
        if kind.startswith(name):
            return v
    return None


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=int, default=None, help="embed_dim (default 64 * depth)")
    p.add_argument("--heads", type=int, default=None, help="default: depth")
    p.add_argument("--patch-nums", default="1,2,3,4,5,6,8,10,13,16")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--cvae", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after one compile/warm-up step)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--scan-layers", action="store_true", help="config.model.scan_layers: the blocks as one loop")
    p.add_argument("--remat", default="none", help="config.model.remat: none, full or dots")
    p.add_argument("--attention", default="auto", help="config.model.attention: auto, reference, xla, cudnn, splash")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device (overrides the table)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def build(a: argparse.Namespace):
    """-> (jitted step, sharded state, a few global batches, VARConfig, the step's frozen tokenizer arrays, mesh
    rules) for the parsed flags ``a``; call the step as ``step(state, batch, frozen)`` inside
    ``varjax.core.mesh.mesh_rules(mesh, rules)``, as training does."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from varjax.configs import common

    from varjax import config, tasks, train
    from varjax.core import mesh as mesh_lib
    from varjax.data.sources import DataPlan
    from varjax.models.vqvae import VQVAE, VQVAEConfig

    pns = tuple(int(x) for x in a.patch_nums.split(","))
    # The tokenizer only turns token ids into the teacher-forcing inputs here (its quantizer); a minimal
    # encoder/decoder keeps its initialisation cheap. The codebook size and dimension are the real ones.
    vae_cfg = VQVAEConfig(vocab_size=a.vocab, z_channels=a.cvae, ch=8, ch_mult=(1,) * 5, num_res_blocks=1,
                          using_sa=False, using_mid_sa=False, patch_nums=pns, num_groups=4)
    s = vae_cfg.image_size
    vae_params = jax.jit(lambda r: VQVAE(vae_cfg).init(r, jnp.zeros((1, s, s, 3)))["params"])(
        jax.random.PRNGKey(1))

    cfg = common.var(a.depth)
    cfg.model.embed_dim = a.width
    cfg.model.num_heads = a.heads
    cfg.model.dtype = a.dtype
    cfg.model.scan_layers = a.scan_layers
    cfg.model.remat = a.remat
    cfg.model.attention = a.attention
    cfg.batch_size = a.batch_size
    cfg.total_steps = a.steps + 1
    # synthetic tokens: no tokenizer directory and no dataset are read
    data = DataPlan(source="tokens", cache=None, num_shards=1, steps_per_epoch=1000, num_classes=a.num_classes,
                    image_size=s, config=cfg.data)
    plan = config.resolve(cfg, num_devices=jax.device_count(), process_count=1, tokenizer=(None, vae_cfg),
                          data=data)
    model_cfg = plan.model
    L = model_cfg.L

    mesh = mesh_lib.create_mesh(plan.mesh)
    task = tasks.var.build(plan, mesh, abstract=True)  # the tokenizer's parameters are ours, not a directory's
    frozen = {"vae": jax.device_put(vae_params, mesh_lib.replicated_sharding(mesh))}
    state, state_sh = mesh_lib.create_sharded_state(task.init_fn, mesh, plan.rules, jax.random.PRNGKey(0))
    step = train.jit_train_step(task.step_fn, state_sh, mesh)

    rng = np.random.default_rng(0)

    def batch():
        b = {"tokens": rng.integers(0, a.vocab, (a.batch_size, L), dtype=np.int32),
             "label": rng.integers(0, a.num_classes, (a.batch_size,), dtype=np.int32)}
        return mesh_lib.make_global_batch(b, mesh)

    return step, state, [batch() for _ in range(min(a.steps, 4))], model_cfg, frozen, (mesh, plan.rules)


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    import jax
    import numpy as np

    from varjax.core.mesh import mesh_rules
    from varjax.models import flops

    step, state, batches, model_cfg, frozen, (mesh, rules) = build(a)
    L = model_cfg.L
    with mesh_rules(mesh, rules):  # traced as the trainer traces it (activation constraints act)
        t0 = time.perf_counter()
        state, m = step(state, batches[0], frozen)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []  # one per step, each waited for, so the median matches official_bench.py's
        for i in range(a.steps):
            t0 = time.perf_counter()
            state, m = step(state, batches[i % len(batches)], frozen)
            jax.block_until_ready((state, m))
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))

    n_dev = jax.device_count()
    train_flops = flops.train_flops_per_sequence(model_cfg) * a.batch_size
    peak = a.peak_tflops or peak_tflops(jax.devices()[0])
    res = {
        "device": f"{n_dev} x {jax.devices()[0].device_kind}",
        "platform": jax.devices()[0].platform,
        "depth": model_cfg.depth,
        "embed_dim": model_cfg.embed_dim,
        "num_heads": model_cfg.num_heads,
        "params": flops.param_count_formula(model_cfg),
        "tokens_per_image": L,
        "batch_size": a.batch_size,
        "dtype": a.dtype,
        "compile_and_first_step_s": compile_s,
        "step_time_s": step_s,
        "times_s": times,
        "images_per_s": a.batch_size / step_s,
        "tokens_per_s": a.batch_size * L / step_s,
        "train_tflops_per_step": train_flops / 1e12,
        "achieved_tflops_per_s": train_flops / step_s / 1e12,
        "peak_tflops_per_device": peak,
        "mfu": (train_flops / step_s) / (n_dev * peak * 1e12) if peak else None,
        "loss": float(m["loss"]),
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
