"""Continuous-tokenizer training (``config.model_type = "kl"`` in ``varjax train-tokenizer``).

The KL-regularised autoencoder of E-CAR (``varjax.models.kl_ae``) on the tokenizer trainer's skeleton:
L1/L2 reconstruction, ``kl_weight`` times the KL term, optional LPIPS and optional PatchGAN with taming's
adaptive weight from ``config.disc_start`` (the same pieces and config fields as the VQ tokenizer trainer),
an EMA of the weights (exported). The workdir is a model directory of family ``kl``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from varjax.ckpt import FORMAT
from varjax.models.discriminator import NLayerDiscriminator, adaptive_weight, adopt_weight, generator_loss, get_d_loss
from varjax.models.kl_ae import KLAE, KLAEConfig
from varjax.train import loop, optim
from varjax.train.tok_trainer import ema_update, load_lpips, lpips_distance, psnr_01

AE_FIELDS = tuple(f.name for f in dataclasses.fields(KLAEConfig))


def ae_config_from(cfg: ml_collections.ConfigDict) -> KLAEConfig:
    v = dict(cfg.vae)
    unknown = set(v) - set(AE_FIELDS)
    if unknown:
        raise ValueError(
            f"config.vae has unknown fields {sorted(unknown)} for model_type 'kl'; known: {sorted(AE_FIELDS)}."
        )
    return KLAEConfig.from_dict({k: val for k, val in v.items() if val is not None})


def build_task(setup: loop.Setup, ae_cfg: KLAEConfig, lpips_params=None) -> loop.Task:
    cfg = setup.cfg
    ae = KLAE(ae_cfg)
    disc = NLayerDiscriminator(ndf=cfg.disc.ndf, n_layers=cfg.disc.n_layers, norm=cfg.disc.norm)
    use_disc, use_lpips = cfg.disc_weight > 0, lpips_params is not None
    d_loss_fn = get_d_loss(cfg.disc_loss)
    tx = optim.make_optimizer(cfg.opt, peak_lr=cfg.lr, total_steps=setup.total_steps,
                              steps_per_epoch=setup.steps_per_epoch, examples_per_step=cfg.batch_size)
    disc_tx = optax.adam(cfg.disc_lr, b1=cfg.disc_b1, b2=cfg.disc_b2)
    side = ae_cfg.image_size
    if lpips_params is not None:
        lpips_params = jax.tree.map(jnp.asarray, lpips_params)

    def init_fn(rng):
        r_ae, r_disc = jax.random.split(rng)
        img = jnp.zeros((1, side, side, 3), jnp.float32)
        params = ae.init(r_ae, img, method=KLAE.init_all)["params"]
        disc_params = disc.init(r_disc, img)["params"]
        return {"params": params, "ema_params": jax.tree.map(jnp.copy, params), "disc_params": disc_params,
                "opt_state": tx.init(params), "disc_opt_state": disc_tx.init(disc_params),
                "step": jnp.zeros((), jnp.int32), "rng": rng}

    def step_fn(state, batch):
        img = batch["image"].astype(jnp.float32)
        step = state["step"]
        r_drop, r_noise = jax.random.split(jax.random.fold_in(state["rng"], step))
        disc_factor = adopt_weight(1.0, step, cfg.disc_start) if use_disc else jnp.zeros((), jnp.float32)

        def losses(params):
            recon, kl, _ = ae.apply({"params": params}, img, True, rngs={"dropout": r_drop, "noise": r_noise})
            l1, l2 = jnp.mean(jnp.abs(recon - img)), jnp.mean(jnp.square(recon - img))
            lp = jnp.mean(lpips_distance(lpips_params, recon, img)) if use_lpips else jnp.zeros(())
            nll = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.lpips_weight * lp + cfg.kl_weight * kl
            g = generator_loss(disc.apply({"params": state["disc_params"]}, recon)) if use_disc else jnp.zeros(())
            return (nll, g), {"recon": recon, "l1": l1, "l2": l2, "kl": kl, "lpips": lp}

        (nll, g_loss), vjp, aux = jax.vjp(losses, state["params"], has_aux=True)
        one, zero = jnp.ones(()), jnp.zeros(())
        (grads,) = vjp((one, zero))
        d_weight = jnp.zeros((), jnp.float32)
        if use_disc:
            (g_grads,) = vjp((zero, one))
            last = ("decoder", "conv_out", "kernel")
            aw = adaptive_weight(grads[last[0]][last[1]][last[2]], g_grads[last[0]][last[1]][last[2]]) \
                if cfg.adaptive_disc_weight else jnp.ones((), jnp.float32)
            d_weight = disc_factor * cfg.disc_weight * aw
            grads = jax.tree.map(lambda a, b: a + d_weight * b, grads, g_grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        disc_params, disc_opt_state = state["disc_params"], state["disc_opt_state"]
        d_loss = jnp.zeros((), jnp.float32)
        if use_disc:
            fake = jax.lax.stop_gradient(aux["recon"])

            def d_objective(dp):
                return d_loss_fn(disc.apply({"params": dp}, img), disc.apply({"params": dp}, fake))

            d_loss, d_grads = jax.value_and_grad(d_objective)(disc_params)
            d_updates, new_dos = disc_tx.update(d_grads, disc_opt_state)
            on = disc_factor > 0
            disc_params = jax.tree.map(lambda n, o: jnp.where(on, n, o), optax.apply_updates(disc_params, d_updates),
                                       disc_params)
            disc_opt_state = jax.tree.map(lambda n, o: jnp.where(on, n, o), new_dos, disc_opt_state)
        recon01 = (jnp.clip(aux["recon"], -1, 1) + 1) / 2
        m = {"loss": nll + d_weight * g_loss, "recon_l1": aux["l1"], "recon_l2": aux["l2"], "kl": aux["kl"],
             "psnr": jnp.mean(psnr_01(recon01, (img + 1) / 2)), "g_loss": g_loss, "d_loss": d_loss,
             "d_weight": d_weight, "grad_norm": optax.tree.norm(grads), "lr": optim.current_hparams(opt_state)["lr"]}
        if use_lpips:
            m["lpips"] = aux["lpips"]
        new = {"params": params, "ema_params": ema_update(state["ema_params"], params, float(cfg.ema_decay)),
               "disc_params": disc_params, "opt_state": opt_state, "disc_opt_state": disc_opt_state,
               "step": step + 1, "rng": state["rng"]}
        return new, m

    return loop.Task(init_fn=init_fn, step_fn=step_fn, conv_bound=True)


def model_json(ae_cfg: KLAEConfig, export_key: str) -> dict:
    return {
        "format": FORMAT,
        "version": 1,
        "family": "kl",
        "vae": {"family": "kl", "config": ae_cfg.to_dict(),
                "params": {"checkpoint": "checkpoints", "item": "state", "subtree": [export_key]}},
        "var": None,
    }


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    ae_cfg = ae_config_from(cfg)
    lpips_params = load_lpips(cfg)
    setup = loop.prepare(cfg, workdir, ae_cfg.image_size)
    task = build_task(setup, ae_cfg, lpips_params)
    task.model_json = model_json(ae_cfg, "ema_params" if cfg.ema_decay > 0 else "params")
    return loop.train_and_evaluate(setup, task)


def kl_tokenizer_run() -> ml_collections.ConfigDict:
    """The tokenizer trainer's defaults with the KL autoencoder in ``config.vae``."""
    from varjax.train.tok_trainer import tokenizer_run

    c = tokenizer_run()
    c.model_type = "kl"
    c.vae = ml_collections.ConfigDict(KLAEConfig().to_dict())
    c.kl_weight = 1e-6
    return c
