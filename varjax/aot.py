"""``varjax compile``: ahead-of-time compilation of the real VAR training step for a named device topology.

    varjax compile --config configs/var_d16.py --topology v5p-64 [--config.batch_size=512 ...]
    varjax compile --config configs/var_shapes.py:runlocal --topology local

The step is the trainer's own (``varjax.tasks.var``'s step function, jitted by ``varjax.train.jit_train_step``
as training jits it) on the mesh of ``config.mesh`` over the topology's devices. A TPU
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
import math
import os
import time

from varjax import config, tasks
from varjax.core import paths
from varjax.core.devices import hbm_bytes
from varjax.data import sources

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


def _tokenizer(cfg, resolution: int):
    """(dir, config) of the tokenizer: ``config.tokenizer_dir`` when it exists here, else the released
    ``vae_ch160v4096z32`` at ``resolution``."""
    from varjax.core import model_dir
    from varjax.models.vqvae import PATCH_NUMS_256, PATCH_NUMS_512, VQVAEConfig

    if cfg.tokenizer_dir and (paths.resolve(cfg.tokenizer_dir) / model_dir.MODEL_JSON).is_file():
        return tasks.var.tokenizer_of(cfg)
    if resolution not in (256, 512):
        raise ValueError(f"--resolution {resolution}: expected 256 or 512 (the released tokenizer's schedules).")
    return None, VQVAEConfig(patch_nums=PATCH_NUMS_256 if resolution == 256 else PATCH_NUMS_512)


def _data(cfg, image_size: int) -> sources.DataPlan:
    """The data plan without the data: the batch shapes are what matter (epochs only set the schedule, a traced
    function of the step), and the class count of a dataset this host does not have is ImageNet's."""
    source = "tokens" if cfg.data.tokens_cache else "images"
    try:
        num_classes = cfg.model.num_classes or sources.num_classes(cfg.data)
    except Exception as e:  # noqa: BLE001 - the dataset is not on this host
        print(f"[compile] number of classes of {cfg.data.name} unknown here ({type(e).__name__}); using 1000")
        num_classes = 1000
    return sources.DataPlan(source=source, cache=None, num_shards=1, steps_per_epoch=1000, num_classes=num_classes,
                            image_size=image_size, config=cfg.data)


def compile_step(cfg, devices, resolution: int = 256):
    """Lowers and compiles one VAR training step for ``devices``; returns ``(compiled, info dict)``.

    The step is the trainer's own (``varjax.tasks.var``'s, jitted by ``varjax.train.jit_train_step`` with the
    shardings and donation training uses), the tokenizer's parameters an abstract argument.
    """
    import jax
    import numpy as np

    from varjax import train
    from varjax.core import mesh as mesh_lib
    from varjax.models import attention, flops

    cfg = copy.deepcopy(cfg)
    with cfg.unlocked():
        cfg.eval_every = 0  # evaluation is a separate program
    if cfg.task != "var":
        raise ValueError(f"varjax compile compiles VAR training steps; --config names a {cfg.task!r} config.")
    tok = _tokenizer(cfg, resolution)
    plan = config.resolve(cfg, num_devices=len(devices), process_count=1, tokenizer=tok,
                          data=_data(cfg, tok[1].image_size))
    mesh = mesh_lib.create_mesh(plan.mesh, devices=devices)
    task = tasks.var.build(plan, mesh, abstract=True)
    init_fn, step_fn = train.with_ema(task.init_fn, task.step_fn, plan.ema_decay)
    abstract_state = mesh_lib.abstract_sharded_state(init_fn, mesh, plan.rules, jax.random.PRNGKey(plan.seed))
    state_sh = jax.tree.map(lambda a: a.sharding, abstract_state)
    B, model_cfg = plan.batch_size, plan.model
    s = plan.tokenizer.image_size
    import jax.numpy as jnp

    if plan.data.source == "tokens":
        batch = {"tokens": jax.ShapeDtypeStruct((B, model_cfg.L), jnp.int32)}
    else:
        batch = {"image": jax.ShapeDtypeStruct((B, s, s, 3), jnp.float32)}
    batch["label"] = jax.ShapeDtypeStruct((B,), jnp.int32)
    if cfg.pg > 0:
        batch["prog_wp"] = jax.ShapeDtypeStruct((B,), jnp.float32)
    batch_sh = mesh_lib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in batch.items()}
    t0 = time.time()
    jitted = train.jit_train_step(step_fn, state_sh, mesh)
    # traced as the trainer traces it (activation constraints act), and for the target's attention kernel
    with mesh_lib.mesh_rules(mesh, plan.rules), attention.target_platform(devices[0].platform):
        lowered = jitted.lower(abstract_state, batch, task.frozen)
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
        "dtype": plan.dtype,
        "compile_s": compile_s,
        **memory_and_flops(compiled, devices[0]),
        "model_flops_per_step": B * flops.train_flops_per_sequence(model_cfg, "masked"),
        "scan_layers": bool(model_cfg.scan_layers),
        "remat": str(model_cfg.remat),
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


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="VAR config file or shipped name, e.g. var_d16 (fields: "
                   "--config.field=value)")
    p.add_argument("--topology", required=True, help="'local' (this host's devices) or a TPU slice such as v5p-64, "
                   "v4-64, v5e-256, v6e-256 (needs libtpu: pip install 'varjax[tpu]'), or a raw one such as v5:2x4x4")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--resolution", type=int, default=256, help="the released tokenizer's resolution when "
                   "config.tokenizer_dir does not exist here (256 or 512)")


def command(a, rest: list[str]) -> None:
    """``varjax compile``: ``rest`` holds the ``--config.field=value`` overrides."""
    rest, overrides = config.split_overrides(rest)
    if rest:
        raise ValueError(f"unrecognized arguments {rest}; config fields are set with --config.field=value")
    cfg = config.load(a.config, overrides)
    devices = topology_devices(a.topology)
    _, info = compile_step(cfg, devices, a.resolution)
    info["topology"] = a.topology
    print(report(info, a.topology), flush=True)
    if a.json:
        paths.write_json(a.json, info)
