"""E-CAR training: ``varjax train --config configs/ecar_<x>.py --workdir DIR`` (configs set ``model_family="ecar"``).

The continuous tokenizer is frozen (a ``varjax train-tokenizer`` workdir of ``model_type="kl"``, named by
``config.tokenizer_dir``); latents are its posterior means, normalised by ``(z - latent_shift) /
latent_scale`` (measured on the first ``config.stats_examples`` training latents unless the config fixes
them). One step: the teacher-forced chain of the multistage flow (``varjax.models.multistage_flow``), one
stage and one time per example, MSE of the velocity, labels dropped to the null class with
``cond_drop_rate`` for classifier-free guidance. ``config.latents_cache`` (a directory with latents.npy
(N, h, w, C) float32 and labels.npy) replaces the image pipeline by pre-encoded latents.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from varjax.ckpt import FORMAT, load_model_dir, read_model_json
from varjax.data import pipeline
from varjax.models import multistage_flow as msf
from varjax.models.ecar import ECAR, ECARConfig
from varjax.models.kl_ae import KLAE, KLAEConfig
from varjax.train import loop, optim

MODEL_FIELDS = {f.name for f in dataclasses.fields(ECARConfig)}
DERIVED = ("num_classes", "Cvae", "latent_shift", "latent_scale")


def ecar_config_from(cfg: ml_collections.ConfigDict, ae_cfg: KLAEConfig, num_classes: int) -> ECARConfig:
    """Model config from ``config.model``; stages default to 1, 2, 4, ... up to the latent side."""
    m = {k: v for k, v in dict(cfg.model).items() if k != "dtype" and v is not None}
    unknown = set(m) - MODEL_FIELDS
    if unknown:
        raise ValueError(f"config.model has unknown fields {sorted(unknown)}; known: {sorted(MODEL_FIELDS)}.")
    side = ae_cfg.latent_size
    pns = tuple(m.pop("patch_nums", ()) or [2**i for i in range(int(np.log2(side)) + 1)])
    if pns[-1] != side:
        raise ValueError(
            f"config.model.patch_nums={pns}: the last stage must have the tokenizer's latent side {side}."
        )
    msf.check_patch_nums(pns, "config.model.patch_nums")
    m = {k: v for k, v in m.items() if k not in DERIVED}
    return ECARConfig(num_classes=num_classes, Cvae=ae_cfg.z_channels, patch_nums=pns, **m)


def latent_stats(lat_NhwC: np.ndarray) -> tuple[float, float]:
    """(mean, std) over all elements."""
    x = np.asarray(lat_NhwC, np.float64)
    return float(x.mean()), float(max(x.std(), 1e-6))


def make_encoder(ae_cfg: KLAEConfig):
    """Jitted ``encode(params, img (B,H,W,3) in [-1, 1]) -> posterior mean (B, h, w, C)``."""
    return jax.jit(lambda p, x: KLAE(ae_cfg).apply({"params": p}, x, method=KLAE.encode))


def encode_split(ae_cfg: KLAEConfig, ae_params, data_cfg, split: str, limit: int | None = None, batch: int = 256):
    """(latents (N, h, w, C) float32, labels (N,)) of the centre crops of ``split`` (the first ``limit``)."""
    enc = make_encoder(ae_cfg)
    data = data_cfg.copy_and_resolve_references()
    data.eval_split = split
    lats, labels, n = [], [], 0
    for b in pipeline.build_eval_iter(data, image_size=ae_cfg.image_size, global_batch_size=batch,
                                      process_index=0, process_count=1):
        keep = b["mask"] > 0
        lats.append(np.asarray(enc(ae_params, jnp.asarray(b["image"])))[keep])
        labels.append(b["label"][keep])
        n += int(keep.sum())
        if limit and n >= limit:
            break
    lat, lab = np.concatenate(lats), np.concatenate(labels)
    return (lat[:limit], lab[:limit]) if limit else (lat, lab)


def write_latents_cache(path: str, latents: np.ndarray, labels: np.ndarray) -> None:
    os.makedirs(path, exist_ok=True)
    for name, arr in (("latents.npy", latents.astype(np.float32)), ("labels.npy", labels.astype(np.int32))):
        tmp = os.path.join(path, name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, os.path.join(path, name))


def latents_cache_iter(path: str, global_batch_size: int, seed: int) -> pipeline.DataIterator:
    """Resumable shuffled batches ``{"latent", "label"}`` of this process's block of a latents cache."""
    files = [os.path.join(path, n) for n in ("latents.npy", "labels.npy")]
    if not all(os.path.isfile(f) for f in files):
        raise ValueError(f"config.latents_cache={path!r}: expected {' and '.join(files)}.")
    lat, lab = np.load(files[0], mmap_mode="r"), np.load(files[1])
    pi, pc = jax.process_index(), jax.process_count()
    per = global_batch_size // pc
    block = len(lab) // pc
    steps = block // per
    if steps == 0:
        raise ValueError(f"config.latents_cache={path!r} holds {len(lab)} examples, fewer than one batch.")
    shard = np.arange(pi * block, (pi + 1) * block)

    def make_epoch(epoch: int, start: int):
        order = np.random.default_rng([seed, pi, epoch]).permutation(shard)
        for step in range(start, steps):
            idx = np.sort(order[step * per:(step + 1) * per])
            yield {"latent": np.asarray(lat[idx], np.float32), "label": lab[idx].astype(np.int32)}

    return pipeline.DataIterator(make_epoch, steps_per_epoch=steps, global_batch_size=global_batch_size, seed=seed)


def build_task(setup: loop.Setup, ae_cfg: KLAEConfig, ae_params, model_cfg: ECARConfig, dtype) -> loop.Task:
    cfg = setup.cfg
    model = ECAR(model_cfg, dtype=dtype)
    tx = optim.make_optimizer(cfg.opt, peak_lr=optim.peak_lr(cfg.tblr, cfg.batch_size, cfg.opt.get("ac", 1)),
                              total_steps=setup.total_steps, steps_per_epoch=setup.steps_per_epoch,
                              examples_per_step=cfg.batch_size)
    ae_params = jax.device_put(ae_params, jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec()))
    pns, wins = model_cfg.patch_nums, model_cfg.windows
    shift, scale = model_cfg.latent_shift, model_cfg.latent_scale
    Cv = model_cfg.Cvae
    all_stages = bool(cfg.get("all_stages", False))

    def init_fn(rng):
        lab = jnp.zeros((1,), jnp.int32)
        x_in = jnp.zeros((1, model_cfg.L - model_cfg.first_l, Cv))
        x_t = jnp.zeros((1, model_cfg.L, Cv))
        params = model.init(rng, lab, x_in, x_t, jnp.zeros((1, model_cfg.L)))["params"]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32), "rng": rng}

    def latents(batch):
        if "latent" in batch:
            z = batch["latent"]
        else:
            z = KLAE(ae_cfg).apply({"params": ae_params}, batch["image"], method=KLAE.encode)
        return (z.astype(jnp.float32) - shift) / scale

    def step_fn(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        r_flow, r_drop = jax.random.split(rng)
        ex = msf.training_example(latents(batch), pns, wins, r_flow)

        def loss_fn(params):
            v = model.apply({"params": params}, batch["label"], ex["x_in"], ex["x_t"], ex["t"], train=True,
                            rngs={"dropout": r_drop})
            return msf.flow_loss(v, ex["v"], ex["stage"], pns, all_stages)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        hp = optim.current_hparams(opt_state)
        m = {"loss": loss, "lr": hp["lr"], "wd": hp["wd"], "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}, m

    return loop.Task(init_fn=init_fn, step_fn=step_fn)


def model_json(cfg, ae_cfg: KLAEConfig, model_cfg: ECARConfig) -> dict:
    return {
        "format": FORMAT,
        "version": 1,
        "family": "ecar",
        "vae": {"family": "kl", "config": ae_cfg.to_dict(),
                "params": {"model_dir": os.path.abspath(cfg.tokenizer_dir)}},
        "var": None,
        "ecar": {
            "config": model_cfg.to_dict(),
            "params": {"checkpoint": "checkpoints", "item": "state", "subtree": ["params"]},
            "sample": dict(cfg.sample),
        },
    }


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Builds everything from the config and trains; returns the last logged metrics."""
    meta = read_model_json(cfg.tokenizer_dir)
    if (meta.get("vae") or {}).get("family") != "kl":
        raise ValueError(
            f"config.tokenizer_dir={cfg.tokenizer_dir!r} is not a continuous (KL) tokenizer; train one with "
            "`varjax train-tokenizer --config configs/ecar_tokenizer_shapes.py --workdir DIR`."
        )
    ae_cfg = KLAEConfig.from_dict(meta["vae"]["config"])
    setup = loop.prepare(cfg, workdir, ae_cfg.image_size)
    tok = load_model_dir(cfg.tokenizer_dir)
    if cfg.get("latents_cache"):
        setup.train_iter = latents_cache_iter(cfg.latents_cache, cfg.batch_size, cfg.seed)
        setup.steps_per_epoch = setup.train_iter.steps_per_epoch
    ncls = cfg.model.get("num_classes") or pipeline.num_classes(cfg.data)
    model_cfg = ecar_config_from(cfg, tok.vae_cfg, ncls)
    if cfg.model.get("latent_scale"):
        model_cfg = dataclasses.replace(model_cfg, latent_shift=float(cfg.model.get("latent_shift") or 0.0),
                                        latent_scale=float(cfg.model.latent_scale))
    else:
        if cfg.get("latents_cache"):
            sample = np.load(os.path.join(cfg.latents_cache, "latents.npy"), mmap_mode="r")[: cfg.stats_examples]
        else:
            sample, _ = encode_split(tok.vae_cfg, tok.vae_params, cfg.data, cfg.data.train_split, cfg.stats_examples)
        shift, scale = latent_stats(sample)
        model_cfg = dataclasses.replace(model_cfg, latent_shift=shift, latent_scale=scale)
    dtype = jnp.dtype(cfg.model.get("dtype", "float32"))
    task = build_task(setup, tok.vae_cfg, tok.vae_params, model_cfg, dtype)
    task.model_json = model_json(cfg, tok.vae_cfg, model_cfg)
    return loop.train_and_evaluate(setup, task)


def ecar_run(depth: int) -> ml_collections.ConfigDict:
    """Defaults of an E-CAR run (VAR's optimizer recipe; model fields of ``ECARConfig``)."""
    from varjax.train.config_base import var_run

    c = var_run(depth)
    c.model_family = "ecar"
    c.latents_cache = ""
    c.stats_examples = 1024
    c.all_stages = False  # False: one stage per example (the stage-sampling objective); True: every stage
    c.model = ml_collections.ConfigDict(dict(
        depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
        num_classes=ml_collections.FieldReference(None, field_type=int),
        patch_nums=ml_collections.FieldReference(None, field_type=tuple),
        stage_starts=(), attn_l2_norm=True, cond_drop_rate=0.1, mlp_ratio=4.0, head_width=64 * depth,
        head_depth=6, time_dim=256, latent_shift=0.0, latent_scale=0.0, dtype="bfloat16",
    ))
    # defaults of `varjax sample` on the model directory
    c.sample = ml_collections.ConfigDict(dict(cfg=3.0, steps=8, solver="euler", temperature=1.0))
    return c


def run_cli(argv: list[str]) -> None:
    from varjax.train.cli_flags import run_with_config

    run_with_config(argv, train, "E-CAR")


def imagenet_ecar_run(depth: int, *, batch_size: int, epochs: float, tblr: float, head_depth: int,
                      tokenizer_dir: str, runlocal: bool = False) -> ml_collections.ConfigDict:
    """An E-CAR run on ImageNet 256px at a VAR-comparable size: VAR-d``depth``'s transformer (width 64*depth,
    depth heads, drop path 0.1*depth/24), a flow head as wide as the transformer, stages 1-2-4-8-16 on a
    16x16 continuous latent (``configs/ecar_tokenizer_imagenet.py``), VAR's optimizer recipe.

    ``runlocal`` keeps the model but trains 2 steps of batch 8 on the embedded shapes data (it still needs a
    256px continuous tokenizer directory).
    """
    c = ecar_run(depth)
    c.tokenizer_dir = tokenizer_dir
    c.batch_size = batch_size
    c.total_epochs = float(epochs)
    c.tblr = tblr
    c.model.head_depth = head_depth
    c.model.patch_nums = (1, 2, 4, 8, 16)
    c.opt.wpe = 0.1
    if runlocal:
        c.data.name = "varjax_shapes/tiny"
        c.data.eval_split = "test"
        c.total_epochs = None
        c.total_steps = 2
        c.batch_size = 8
        c.log_every = 1
        c.ckpt_every = 2
        c.stats_examples = 64
    return c
