"""``varjax compile``: ahead-of-time compilation of the real VAR training step for a named device topology.

    varjax compile --config configs/var_d16.py --topology v5p-64 [--config.batch_size=512 ...]
    varjax compile --config configs/var_shapes.py:runlocal --topology local

The step is the trainer's own (``var_trainer.build_task``'s step function, jitted with the shardings and
donation of ``loop.train_and_evaluate``) on the mesh of ``config.mesh`` over the topology's devices. A TPU
topology (``v5p-64``, ``v4-64``, ``v5e-256``, ``v6e-256``... or a raw ``v5:2x4x4``) comes from libtpu through
``jax.experimental.topologies.get_topology_desc`` and needs no TPU (``pip install 'varjax[tpu]'``);
``local`` compiles for the devices of this host. Prints per-device memory (arguments, outputs, temporaries,
total against the chip's HBM), FLOPs per step from XLA's cost analysis and whether the step fits.

The batch is abstract: cached tokens (B, L) when ``config.data.tokens_cache`` is set, else images
(B, H, W, 3) encoded by the tokenizer inside the step, as in training. The tokenizer's config comes from
``config.tokenizer_dir`` when it exists, else the released ``vae_ch160v4096z32`` at ``--resolution``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time

HBM_GIB = {  # per chip (v4/v5p: one megacore device per chip)
    "TPU v4": 32,
    "TPU v5 lite": 16,
    "TPU v5e": 16,
    "TPU v5": 95,
    "TPU v5p": 95,
    "TPU v6 lite": 32,
    "TPU v6e": 32,
    "NVIDIA H100": 80,
    "NVIDIA H200": 141,
    "NVIDIA A100": 80,
}

# chips -> (topology, wrap) for the TPU families (MaxText's accelerator_to_spec_map lists the same slices)
_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}
_TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_FAMILIES = {"v4": ("v4", 3), "v5p": ("v5", 3), "v5e": ("v5e", 2), "v6e": ("v6e", 2)}


@dataclasses.dataclass(frozen=True)
class TopologySpec:
    name: str  # libtpu's topology name, e.g. "v5:2x4x4"
    chip_config: str  # "megacore" (v4, v5p) or "default"
    wrap: tuple[bool, bool, bool]


def tpu_topology(name: str) -> TopologySpec:
    """``v5p-64`` (cores for v4/v5p, chips for v5e/v6e), or a raw ``v5:2x4x4`` -> libtpu's topology arguments."""
    if ":" in name:
        family = name.split(":")[0]
        chips = math.prod(int(x) for x in name.split(":")[1].split("x"))
        megacore = family in ("v4", "v5")
        return TopologySpec(name, "megacore" if megacore else "default", _wrap(chips, 3 if megacore else 2))
    family, _, count = name.partition("-")
    if family not in _FAMILIES or not count.isdigit():
        raise ValueError(_bad_topology(name))
    prefix, ndim = _FAMILIES[family]
    chips = int(count) // 2 if ndim == 3 else int(count)  # v4/v5p names count TensorCores (2 per chip)
    shapes = _TORUS_3D if ndim == 3 else _TORUS_2D
    if chips not in shapes:
        raise ValueError(_bad_topology(name))
    return TopologySpec(f"{prefix}:{shapes[chips]}", "megacore" if ndim == 3 else "default", _wrap(chips, ndim))


def _wrap(chips: int, ndim: int) -> tuple[bool, bool, bool]:
    if ndim == 3:
        return (True, True, True) if chips >= 64 else (False, False, False)
    return {128: (False, True, False), 256: (True, True, False)}.get(chips, (False, False, False))


def _bad_topology(name: str) -> str:
    return (
        f"--topology {name!r} is not a known slice; expected 'local', a slice name such as v4-64, v5p-64, "
        f"v5e-256, v6e-256 (v4/v5p: {sorted(2 * c for c in _TORUS_3D)} cores; v5e/v6e: {sorted(_TORUS_2D)} chips) "
        "or a raw libtpu topology such as v5:2x4x4."
    )


def topology_devices(name: str) -> list:
    """The devices to compile for: this host's (``local``) or a TPU slice's, without TPUs (needs libtpu)."""
    import jax

    if name == "local":
        return jax.devices()
    spec = tpu_topology(name)
    # libtpu takes a host-wide lock when it loads; describing a topology uses no TPU, so let it share
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=spec.name,
            chip_config_name=spec.chip_config,
            chips_per_host_bounds=(2, 2, 1),
            num_slices=1,
            wrap=spec.wrap,
        )
    except Exception as e:  # libtpu missing or refusing the topology
        raise ValueError(
            f"--topology {name}: could not describe the TPU topology {spec.name} ({type(e).__name__}: {e}). "
            "TPU topologies need libtpu: pip install 'varjax[tpu]' (or pip install libtpu)."
        ) from None
    return list(desc.devices)


def hbm_bytes(device) -> int | None:
    kind = getattr(device, "device_kind", "")
    for prefix, gib in sorted(HBM_GIB.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return gib * 2**30
    return None


def _tokenizer_config(cfg, resolution: int):
    from varjax.ckpt import read_model_json
    from varjax.models.vqvae import PATCH_NUMS_256, PATCH_NUMS_512, VQVAEConfig

    if cfg.get("tokenizer_dir") and os.path.isdir(cfg.tokenizer_dir):
        return VQVAEConfig.from_dict(read_model_json(cfg.tokenizer_dir)["vae"]["config"])
    if resolution not in (256, 512):
        raise ValueError(f"--resolution {resolution}: expected 256 or 512 (the released tokenizer's schedules).")
    return VQVAEConfig(patch_nums=PATCH_NUMS_256 if resolution == 256 else PATCH_NUMS_512)


def _num_classes(data_cfg) -> int:
    from varjax.data import pipeline

    try:
        return pipeline.num_classes(data_cfg)
    except Exception as e:  # the dataset is not on this host: ImageNet's 1000 classes
        print(f"[compile] number of classes of {data_cfg.name} unknown here ({type(e).__name__}); using 1000")
        return 1000


class _NoData:
    """Stands in for the training data iterator: only its epoch length is read while building the step."""

    steps_per_epoch = 1000  # schedules are traced functions of the step: the compiled program does not depend on it


def compile_step(cfg, devices, resolution: int = 256):
    """Lowers and compiles one training step; returns ``(compiled, info dict)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax.core import meta

    from varjax.models import attention
    from varjax.models.vqvae import VQVAE
    from varjax.scaling.flops import train_flops_per_sequence
    from varjax.train import loop, sharding
    from varjax.train.var_trainer import build_task, var_config_from

    cfg = copy.deepcopy(cfg)
    with cfg.unlocked():
        cfg.eval_every = 0  # evaluation is a separate program
    vae_cfg = _tokenizer_config(cfg, resolution)
    ncls = cfg.model.get("num_classes") or _num_classes(cfg.data)
    model_cfg = var_config_from(cfg, vae_cfg, ncls)
    dtype = jnp.dtype(cfg.model.get("dtype", "float32"))
    mesh = sharding.create_mesh(cfg.mesh, devices=devices)
    rules = sharding.normalize_rules(cfg.get("rules"))
    sharding.check_batch_divisible(cfg.batch_size, mesh, field="config.batch_size")
    total = 100_000
    setup = loop.Setup(cfg, "", mesh, rules, _NoData(), total, _NoData.steps_per_epoch, True)

    s = vae_cfg.image_size
    vae_abstract = meta.unbox(jax.eval_shape(
        lambda r: VQVAE(vae_cfg).init(r, jnp.zeros((1, s, s, 3)), method=VQVAE.init_all)["params"],
        jax.random.PRNGKey(0),
    ))

    def task_for(vae_params):
        # The tokenizer's parameters are an argument of the compiled step here (the trainer closes over them):
        # the same values on every device, without materialising them on a host that has no such devices.
        return build_task(setup, vae_cfg, vae_params, model_cfg, dtype)

    def init_fn(rng):
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), vae_abstract)
        return task_for(zeros).init_fn(rng)

    abstract_state = sharding.abstract_sharded_state(init_fn, mesh, rules, jax.random.PRNGKey(cfg.seed))
    state_sh = jax.tree.map(lambda a: a.sharding, abstract_state)
    B = cfg.batch_size
    if cfg.data.get("tokens_cache"):
        batch = {"tokens": jax.ShapeDtypeStruct((B, model_cfg.L), jnp.int32)}
    else:
        batch = {"image": jax.ShapeDtypeStruct((B, s, s, 3), jnp.float32)}
    batch["label"] = jax.ShapeDtypeStruct((B,), jnp.int32)
    if cfg.pg > 0:
        batch["prog_wp"] = jax.ShapeDtypeStruct((B,), jnp.float32)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in batch.items()}
    replicated = sharding.replicated_sharding(mesh)
    vae_in = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), vae_abstract)

    def step(state, b, vae_params):
        return task_for(vae_params).step_fn(state, b)

    t0 = time.time()
    # jitted as loop.train_and_evaluate does: explicit state/batch shardings, metrics replicated, state donated
    jitted = jax.jit(
        step, in_shardings=(state_sh, batch_sh, replicated), out_shardings=(state_sh, replicated), donate_argnums=0
    )
    # traced as the trainer traces it (activation constraints act), and for the target's attention kernel
    with sharding.mesh_rules(mesh, rules), attention.target_platform(devices[0].platform):
        lowered = jitted.lower(abstract_state, batch, vae_in)
    compiled = lowered.compile()
    compile_s = time.time() - t0
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_state["params"]))
    info = {
        "model": dataclasses.asdict(model_cfg),
        "params": n_params,
        "batch_size": B,
        "mesh": dict(mesh.shape),
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "dtype": str(dtype),
        "compile_s": compile_s,
        **memory_and_flops(compiled, devices[0]),
        "model_flops_per_step": B * train_flops_per_sequence(dataclasses.asdict(model_cfg), "masked"),
        "scan_layers": bool(cfg.model.get("scan_layers", False)),
        "remat": str(cfg.model.get("remat", "none")),
    }
    return compiled, info


def memory_and_flops(compiled, device) -> dict:
    """Per-device bytes (arguments, outputs, temporaries, total) and FLOPs of a compiled program."""
    m = compiled.memory_analysis()
    out = {}
    if m is not None:
        arg, outp = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
        alias, temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
        out.update(argument_bytes=arg, output_bytes=outp, alias_bytes=alias, temp_bytes=temp)
        out["total_bytes"] = arg + outp - alias + temp  # donated outputs reuse their arguments' buffers
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    out["flops_per_device"] = float(cost.get("flops", 0.0)) if cost else None
    hbm = hbm_bytes(device)
    out["hbm_bytes"] = hbm
    out["fits"] = (out["total_bytes"] <= hbm) if hbm and "total_bytes" in out else None
    return out


def report(info: dict, topology: str) -> str:
    gib = 2**30

    def g(k):
        return f"{info[k] / gib:8.2f} GiB" if info.get(k) is not None else "       n/a"

    m = info["model"]
    L = sum(p * p for p in m["patch_nums"])
    lines = [
        f"[compile] VAR d{m['depth']} (width {m['embed_dim']}, {info['params']:,} params, L={L}), "
        f"batch {info['batch_size']}, {info['dtype']}, scan_layers {info.get('scan_layers')}, "
        f"remat {info.get('remat')}",
        f"[compile] topology {topology}: {info['devices']} x {info['device_kind']}, mesh {info['mesh']}, "
        f"compiled in {info['compile_s']:.1f}s",
        f"[compile] per device: arguments {g('argument_bytes')}, outputs {g('output_bytes')} "
        f"(aliased {g('alias_bytes')}), temporaries {g('temp_bytes')}",
        f"[compile] per device: total {g('total_bytes')} of HBM {g('hbm_bytes')}",
    ]
    if info.get("flops_per_device") is not None:
        f = info["flops_per_device"]
        # XLA's cost analysis counts a while loop's body once: with scanned blocks it sees one block per step
        note = " (XLA counts the scanned block loop once)" if info.get("scan_layers") else ""
        lines.append(f"[compile] FLOPs per step (XLA): {f:.4g} per device, {f * info['devices']:.4g} in all{note}")
    if info.get("model_flops_per_step"):
        lines.append(f"[compile] model FLOPs per step (3 x forward matmuls): {info['model_flops_per_step']:.4g}")
    fits = info.get("fits")
    lines.append(f"[compile] fits: {'yes' if fits else 'no' if fits is not None else 'unknown (no HBM figure)'}")
    return "\n".join(lines)


def _pop_flag(argv: list[str], name: str, default=None):
    """Removes ``--name VALUE`` / ``--name=VALUE`` from argv; returns VALUE (or ``default``)."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if a.startswith(name + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return default


def run_cli(argv: list[str]) -> None:
    from varjax.train.cli_flags import run_with_config

    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(f"usage: {argv[0]} --config NAME|FILE.py[:args] --topology NAME [--json F] [--resolution 256|512] "
              "[--config.field=value ...]\n\n" + (__doc__ or ""))
        return
    topology = _pop_flag(argv, "--topology")
    json_out = _pop_flag(argv, "--json")
    resolution = int(_pop_flag(argv, "--resolution", "256"))
    if not topology:
        raise SystemExit(
            "error: varjax compile needs --topology NAME: 'local' (this host's devices) or a TPU slice such as "
            "v5p-64, v4-64, v5e-256 (needs libtpu: pip install 'varjax[tpu]')."
        )

    def fn(cfg, _workdir):
        devices = topology_devices(topology)
        _, info = compile_step(cfg, devices, resolution)
        info["topology"] = topology
        print(report(info, topology), flush=True)
        if json_out:
            with open(json_out, "w") as f:
                json.dump(info, f, indent=2)

    run_with_config(argv, fn, "VAR transformer", needs_workdir=False)


if __name__ == "__main__":
    run_cli(sys.argv)
