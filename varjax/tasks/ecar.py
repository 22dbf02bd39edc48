"""The E-CAR task: stage-wise continuous tokens with a multistage flow on a frozen KL tokenizer
(``config.task = "ecar"``).

The tokenizer is a ``varjax train-tokenizer`` workdir of ``model_type="kl"`` named by ``config.tokenizer_dir``;
latents are its posterior means, normalised by ``(z - latent_shift) / latent_scale`` (measured on the first
``config.stats_examples`` training latents unless the config fixes them). One step: the teacher-forced chain of the
multistage flow (``varjax.models.multistage_flow``), one time per example and stage, MSE of the velocity, labels
dropped to the null class with ``cond_drop_rate`` for classifier-free guidance. ``config.latents_cache`` (a latent
cache, ``varjax.data.caches``) replaces the image pipeline by pre-encoded latents.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varjax.core import mesh as mesh_lib
from varjax.core import model_dir, optim
from varjax.data import caches
from varjax.models import multistage_flow as msf
from varjax.models.ecar import ECAR, ECARConfig
from varjax.models.kl_ae import KLAE, KLAEConfig
from varjax.sampling import codec
from varjax.tasks import base
from varjax.tasks.base import Task, fill_model_fields, frozen_tokenizer

SOURCES = ("images", "latents")
TRAIN_HINT = "train one with `varjax train-tokenizer --config configs/ecar_tokenizer_shapes.py --workdir DIR`"


derive = base.generator_derive


def defaults(cfg):
    """E-CAR's defaults at this depth (``configs/common.py``)."""
    from varjax.configs import common

    return common.ecar(int(cfg.model.depth))


def tokenizer_of(cfg):
    return frozen_tokenizer(cfg, "kl", TRAIN_HINT)


def model_config(cfg, num_classes: int, tok: KLAEConfig) -> ECARConfig:
    """``config.model`` with the derived sizes; stages default to 1, 2, 4, ... up to the latent side. A latent
    scale of 0 means "measure it" (see :func:`build`)."""
    side = tok.latent_size
    pns = tuple(cfg.model.patch_nums or [2**i for i in range(int(np.log2(side)) + 1)])
    if pns[-1] != side:
        raise ValueError(
            f"config.model.patch_nums={pns}: the last stage must have the tokenizer's latent side {side}."
        )
    msf.check_patch_nums(pns, "config.model.patch_nums")
    fields = {k: v for k, v in dict(cfg.model).items() if k not in ("num_classes", "patch_nums")}
    return fill_model_fields(ECARConfig, fields, dict(num_classes=num_classes, Cvae=tok.z_channels, patch_nums=pns))


def latent_stats(lat_NhwC: np.ndarray) -> tuple[float, float]:
    """(mean, std) over all elements."""
    x = np.asarray(lat_NhwC, np.float64)
    return float(x.mean()), float(max(x.std(), 1e-6))


def measured_model(plan, ae_params) -> ECARConfig:
    """``plan.model`` with the latent shift and scale measured on the first ``stats_examples`` training latents,
    unless the config fixes the scale."""
    cfg = plan.config
    if cfg.model.latent_scale:
        return dataclasses.replace(plan.model, latent_shift=float(cfg.model.latent_shift),
                                   latent_scale=float(cfg.model.latent_scale))
    if plan.data.source == "latents":
        sample = caches.read_cache(plan.data.cache, "latents")[0][: cfg.stats_examples]
    else:
        sample, _ = codec.encode_split(plan.tokenizer, ae_params, cfg.data, cfg.data.train_split,
                                       cfg.stats_examples)
    shift, scale = latent_stats(sample)
    return dataclasses.replace(plan.model, latent_shift=shift, latent_scale=scale)


def build(plan, mesh) -> Task:
    cfg, ae_cfg = plan.config, plan.tokenizer
    ae_params = model_dir.load_params(plan.tokenizer_dir, "vae", sharding=mesh_lib.replicated_sharding(mesh))
    model_cfg = measured_model(plan, ae_params)
    model = ECAR(model_cfg, dtype=jnp.dtype(plan.dtype))
    tx = optim.for_plan(plan)
    pns, wins = model_cfg.patch_nums, model_cfg.windows
    shift, scale = model_cfg.latent_shift, model_cfg.latent_scale
    Cv = model_cfg.Cvae

    def init_fn(rng):
        lab = jnp.zeros((1,), jnp.int32)
        x_in = jnp.zeros((1, model_cfg.L - model_cfg.first_l, Cv))
        x_t = jnp.zeros((1, model_cfg.L, Cv))
        params = model.init(rng, lab, x_in, x_t, jnp.zeros((1, model_cfg.L)))["params"]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32), "rng": rng}

    def latents(batch, ae_params):
        if "latents" in batch:
            z = batch["latents"]
        else:
            z = KLAE(ae_cfg).apply({"params": ae_params}, batch["image"], method=KLAE.encode)
        return (z.astype(jnp.float32) - shift) / scale

    def step_fn(state, batch, frozen):
        rng = jax.random.fold_in(state["rng"], state["step"])
        r_flow, r_drop = jax.random.split(rng)
        ex = msf.training_example(latents(batch, frozen["vae"]), pns, wins, r_flow)
        # the "clean" stage input starts from the true coarser maps; the model refines them into its estimates
        x_in, x_end = (ex["x_in_clean"], ex["x_end"]) if model_cfg.stage_input == "clean" else (ex["x_in"], None)

        def loss_fn(params):
            v = model.apply({"params": params}, batch["label"], x_in, ex["x_t"], ex["t"], train=True,
                            x_end_BLCv=x_end, rngs={"dropout": r_drop})
            return msf.flow_loss(v, ex["v"], ex["stage"], pns, cfg.all_stages)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        hp = optim.current_hparams(opt_state)
        m = {"loss": loss, "lr": hp["lr"], "wd": hp["wd"], "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates)}
        return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}, m

    ema = plan.ema_decay > 0
    return Task(
        init_fn=init_fn,
        step_fn=step_fn,
        frozen={"vae": ae_params},
        manifest=model_dir.manifest("ecar", ae_cfg, {"model_dir": plan.tokenizer_dir}, model_cfg,
                                    model_dir.checkpoint_source(ema), gen_extra={"sample": dict(cfg.sample)}),
        tokens_per_example=model_cfg.L,
        next_step="varjax sample --ckpt {workdir} --labels 0,1,2,3 --out samples.png",
    )
