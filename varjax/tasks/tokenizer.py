"""The tokenizer task (``config.task = "tokenizer"``): one VQGAN-style objective, two plugs.

``config.model_type`` picks the plug between encoder and decoder: ``"vq"``, VAR's multi-scale residual quantizer
(its loss weighted by ``vq_weight``; an EMA of the codebook hits per scale, ``usage_SV``, logged as
``usage_s{k}``, with optional re-initialisation of dead codes from the batch's encoder features), or ``"kl"``,
E-CAR's Gaussian posterior (its KL term weighted by ``kl_weight``, the latent sampled from the posterior). Around
the plug the objective is shared: L1/L2 reconstruction, optional LPIPS, and an optional PatchGAN (hinge or
vanilla) with taming's adaptive weight, switched on at ``config.disc_start``. The generator and the
discriminator are updated in one jitted step (one compiled program for the whole run: the discriminator's start
is a ``jnp.where``). The EMA of the weights (``config.ema_decay``) is the loop's, and is what the model directory
exports by default.

The workdir is a model directory (family ``vq`` or ``kl``): ``varjax tokenize/reconstruct --ckpt WORKDIR`` and
``config.tokenizer_dir=WORKDIR`` of a generator's run work on it. ``config.init_from`` fine-tunes an existing
tokenizer; its architecture is then fixed (only ``dropout`` and ``beta`` may differ).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varjax import losses
from varjax.core import mesh as mesh_lib
from varjax.core import model_dir, optim
from varjax.core.xla_flags import conv_compiler_options
from varjax.data import sources
from varjax.models.discriminator import NLayerDiscriminator
from varjax.models.kl_ae import KLAE, KLAEConfig
from varjax.models.lpips import lpips_distance
from varjax.models.vqvae import VQVAE, VQVAEConfig
from varjax.tasks.base import Derived, Task, fill_model_fields

SOURCES = ("images",)
# Fields of config.vae that may differ from the tokenizer named by config.init_from (they change training only).
FINETUNE_OVERRIDABLE = ("dropout", "beta")
USAGE_MARGIN = 0.08  # the reference: a code is "used" at scale k if its EMA hits >= 0.08 * tokens / vocab


# ------------------------------------------------------------------------------------------------- plugs


@dataclasses.dataclass(frozen=True)
class Plug:
    """What differs between the two tokenizers: the model, its regulariser and the quantizer's bookkeeping."""

    family: str
    config: type
    module: type
    weight_field: str  # config field weighting the regulariser
    metric: str  # the regulariser's name in metrics.jsonl


PLUGS = {
    "vq": Plug("vq", VQVAEConfig, VQVAE, "vq_weight", "vq_loss"),
    "kl": Plug("kl", KLAEConfig, KLAE, "kl_weight", "kl"),
}


def plug_of(cfg) -> Plug:
    if cfg.model_type not in PLUGS:
        raise ValueError(f"config.model_type={cfg.model_type!r}: expected one of {sorted(PLUGS)}.")
    return PLUGS[cfg.model_type]


def _vq_forward(module: VQVAE, img, train: bool):
    """(recon, vq_loss, {hits (S, V), encoder features f}) of the VQ tokenizer."""
    f = module.encode(img, train)
    _, _, f_hat_st, vq_loss, hits = module.quantize.quantize(f, train=True)
    return module.decode(f_hat_st, train), vq_loss, {"hits": hits, "f": f}


def _kl_forward(module: KLAE, img, train: bool, decoder_noise: float = 0.0):
    """(recon, kl, {}) of the KL autoencoder, the latent sampled from the posterior (the 'noise' rng), plus the
    decoder's training noise (``config.decoder_noise``, see ``KLAE.__call__``)."""
    recon, kl, _ = module(img, train, decoder_noise=decoder_noise)
    return recon, kl, {}


def usage_margin(batch_size: int, vae_cfg: VQVAEConfig) -> float:
    """EMA hits at or above which a code counts as used (the reference's margin, same for every scale)."""
    return USAGE_MARGIN * batch_size * vae_cfg.patch_nums[-1] ** 2 / vae_cfg.vocab_size


def update_usage(usage_SV, hits_SV, decay: float):
    """``decay * usage + (1 - decay) * hits`` (float32)."""
    return decay * usage_SV + (1.0 - decay) * hits_SV.astype(jnp.float32)


def reinit_dead_codes(embedding_VC, usage_SV, feats_NC, threshold: float, rng):
    """Replaces codes whose usage summed over scales is below ``threshold`` by random rows of ``feats_NC``.

    Returns ``(embedding, usage, dead_V)``; the replaced codes get usage ``threshold / S`` at every scale (a
    grace period: they are replaced again only if they stay unused).
    """
    dead_V = usage_SV.sum(0) < threshold
    pick = jax.random.randint(rng, (embedding_VC.shape[0],), 0, feats_NC.shape[0])
    emb = jnp.where(dead_V[:, None], feats_NC[pick].astype(embedding_VC.dtype), embedding_VC)
    usage = jnp.where(dead_V[None, :], threshold / usage_SV.shape[0], usage_SV)
    return emb, usage, dead_V


# ------------------------------------------------------------------------------------------- resolving


def defaults(cfg):
    """The tokenizer defaults of this model type (``configs/common.py``)."""
    from varjax.configs import common

    return common.tokenizer(str(cfg.model_type))


def tokenizer_of(cfg):
    return None, None


def _norm(v):
    return tuple(v) if isinstance(v, list | tuple) else v


def model_config(cfg, num_classes: int = 0, tok=None):
    """The tokenizer's config from ``config.vae``; when fine-tuning (``config.init_from``), the loaded tokenizer's
    with the overridable fields, any other difference being an error. A ``config.vae`` field left None is the
    loaded tokenizer's (a fine-tune recipe leaves the architecture to the directory it starts from)."""
    del num_classes, tok
    plug = plug_of(cfg)
    if cfg.require_init_from and not cfg.init_from:
        raise ValueError(
            "config.init_from is empty: this config fine-tunes an existing tokenizer; pass "
            "--config.init_from=DIR (a `varjax convert` output or a `varjax train-tokenizer` workdir)."
        )
    wanted = fill_model_fields(plug.config, dict(cfg.vae), {}, section="config.vae")
    if not cfg.init_from:
        return wanted
    man = model_dir.read_manifest(cfg.init_from)
    if model_dir.tokenizer_family(man) != plug.family or man.get("vae") is None:
        raise ValueError(f"config.init_from={cfg.init_from!r} holds no {plug.family!r} tokenizer.")
    loaded = plug.config.from_dict(man["vae"]["config"])
    want, have = wanted.to_dict(), loaded.to_dict()
    bad = [k for k in have if k not in FINETUNE_OVERRIDABLE and cfg.vae.get(k) is not None
           and _norm(want[k]) != _norm(have[k])]
    if bad:
        diffs = ", ".join(f"config.vae.{k}={want[k]!r} (tokenizer: {have[k]!r})" for k in bad)
        raise ValueError(
            f"config.init_from={cfg.init_from!r} holds a tokenizer that does not match the config: {diffs}. "
            "The architecture of the tokenizer being fine-tuned is fixed; set these config.vae fields to the "
            f"tokenizer's values (only {list(FINETUNE_OVERRIDABLE)} may differ)."
        )
    return dataclasses.replace(loaded, **{k: want[k] for k in FINETUNE_OVERRIDABLE if cfg.vae.get(k) is not None})


def derive(cfg, tok=None) -> Derived:
    """Unconditional (no class count needed), float32, the absolute learning rate ``config.lr``."""
    return Derived(image_size=model_config(cfg).image_size, num_classes=0, dtype="float32", peak_lr=cfg.lr)


def _check(cfg) -> None:
    if cfg.disc_loss not in ("hinge", "vanilla"):
        raise ValueError(f"config.disc_loss={cfg.disc_loss!r}; expected 'hinge' or 'vanilla'.")
    if cfg.disc.norm not in ("group", "none"):
        raise ValueError(
            f"config.disc.norm={cfg.disc.norm!r}; the tokenizer trainer supports 'group' or 'none' (BatchNorm "
            "statistics are not kept in the training state)."
        )
    if cfg.model_type == "vq" and not 0.0 <= cfg.usage_decay < 1.0:
        raise ValueError(f"config.usage_decay={cfg.usage_decay} must be in [0, 1).")
    if cfg.lpips_weight > 0 and not cfg.lpips_lin_path and cfg.lpips_vgg_path:
        raise ValueError("config.lpips_vgg_path is set but config.lpips_lin_path is empty; LPIPS needs both.")
    if cfg.freeze and not cfg.init_from:
        raise ValueError(f"config.freeze={tuple(cfg.freeze)!r} keeps those weights as they start, but config.init_from "
                         "is empty: name the tokenizer whose weights they are.")


def freeze(params: dict, start: dict, groups: tuple[str, ...]) -> dict:
    """``params`` with the top-level ``groups`` taken from ``start`` (a frozen encoder stays exactly as loaded;
    restoring after the update also undoes weight decay and momentum on it)."""
    missing = [g for g in groups if g not in params]
    if missing:
        raise ValueError(f"config.freeze names {missing}, not parameter groups of this tokenizer; set it to some "
                         f"of {sorted(params)} (e.g. --config.freeze='(\"encoder\",)').")
    return {**params, **{g: start[g] for g in groups}}


def load_lpips(cfg) -> Any:
    """LPIPS parameters when ``config.lpips_weight > 0`` and ``config.lpips_lin_path`` is set, else None."""
    if not cfg.lpips_lin_path or cfg.lpips_weight <= 0:
        why = "no config.lpips_lin_path" if not cfg.lpips_lin_path else "config.lpips_weight is 0"
        print(f"[train-tokenizer] perceptual loss: off ({why})", flush=True)
        return None
    from varjax.interop.torch_io import load_state_dict
    from varjax.models.lpips import convert_lpips_params

    print(f"[train-tokenizer] perceptual loss: on (weight {cfg.lpips_weight})", flush=True)
    lin_sd = load_state_dict(cfg.lpips_lin_path)
    vgg_sd = load_state_dict(cfg.lpips_vgg_path) if cfg.lpips_vgg_path else None
    return convert_lpips_params(lin_sd, vgg_sd)


# ------------------------------------------------------------------------------------------------- task


def build(plan, mesh) -> Task:
    cfg, model_cfg = plan.config, plan.model
    _check(cfg)
    plug = plug_of(cfg)
    vq = plug.family == "vq"
    model = plug.module(model_cfg)
    forward = _vq_forward if vq else functools.partial(_kl_forward, decoder_noise=float(cfg.decoder_noise))
    disc = NLayerDiscriminator(ndf=cfg.disc.ndf, n_layers=cfg.disc.n_layers, norm=cfg.disc.norm)
    use_disc = cfg.disc_weight > 0
    print("[train-tokenizer] discriminator: " + (f"on from step {cfg.disc_start} (weight {cfg.disc_weight})"
                                                  if use_disc else "off (config.disc_weight is 0)"), flush=True)
    lpips_params = load_lpips(cfg)
    use_lpips = lpips_params is not None
    d_loss_fn = losses.get_d_loss(cfg.disc_loss)
    tx = optim.for_plan(plan)
    disc_tx = optax.adam(cfg.disc_lr, b1=cfg.disc_b1, b2=cfg.disc_b2)
    side = model_cfg.image_size
    reg_weight = float(cfg[plug.weight_field])
    frozen_groups = tuple(cfg.freeze)
    if vq:
        S, V = len(model_cfg.patch_nums), model_cfg.vocab_size
        margin = usage_margin(plan.batch_size, model_cfg)

    def init_fn(rng):
        r_model, r_disc = jax.random.split(rng)
        img = jnp.zeros((1, side, side, 3), jnp.float32)
        params = model.init(r_model, img, method=plug.module.init_all)["params"]
        disc_params = disc.init(r_disc, img)["params"]
        state = {"params": params, "disc_params": disc_params, "opt_state": tx.init(params),
                 "disc_opt_state": disc_tx.init(disc_params), "step": jnp.zeros((), jnp.int32), "rng": rng}
        if vq:
            state["usage_SV"] = jnp.zeros((S, V), jnp.float32)
        return state

    def step_fn(state, batch, frozen):
        img = batch["image"].astype(jnp.float32)
        step = state["step"]
        # the second key is the plug's: dead-code picks (vq) or the posterior's noise (kl)
        r_drop, r_plug = jax.random.split(jax.random.fold_in(state["rng"], step))
        disc_factor = losses.adopt_weight(1.0, step, cfg.disc_start) if use_disc else jnp.zeros((), jnp.float32)

        def objectives(params):
            # frozen groups are constants here: no gradient, so no backward pass through a frozen encoder
            params = freeze(params, jax.lax.stop_gradient(params), frozen_groups)
            recon, reg, aux = model.apply({"params": params}, img, True, method=forward,
                                          rngs={"dropout": r_drop, "noise": r_plug})
            l1, l2 = losses.reconstruction_losses(recon, img)
            lp = jnp.mean(lpips_distance(frozen["lpips"], recon, img)) if use_lpips else jnp.zeros(())
            nll = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.lpips_weight * lp
            g = losses.generator_loss(disc.apply({"params": state["disc_params"]}, recon)) if use_disc \
                else jnp.zeros(())
            return (nll, reg, g), {"recon": recon, "l1": l1, "l2": l2, "lpips": lp, **aux}

        (nll, reg, g_loss), vjp, aux = jax.vjp(objectives, state["params"], has_aux=True)
        one, zero = jnp.ones(()), jnp.zeros(())
        (grads,) = vjp((one, jnp.asarray(reg_weight, jnp.float32), zero))
        d_weight = jnp.zeros((), jnp.float32)
        if use_disc:
            (g_grads,) = vjp((zero, zero, one))
            last = lambda g: g["decoder"]["conv_out"]["kernel"]  # noqa: E731 - taming's last layer
            aw = losses.adaptive_weight(last(grads), last(g_grads)) if cfg.adaptive_disc_weight \
                else jnp.ones((), jnp.float32)
            d_weight = disc_factor * cfg.disc_weight * aw
            grads = jax.tree.map(lambda a, b: a + d_weight * b, grads, g_grads)
        loss = nll + reg_weight * reg + d_weight * g_loss
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = freeze(optax.apply_updates(state["params"], updates), state["params"], frozen_groups)

        # Discriminator on real images and the detached reconstructions; frozen before disc_start.
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
        m = {
            "loss": loss, "recon_l1": aux["l1"], "recon_l2": aux["l2"], plug.metric: reg,
            "psnr": jnp.mean(losses.psnr(recon01, (img + 1) / 2)), "g_loss": g_loss, "d_loss": d_loss,
            "d_weight": d_weight, "disc_factor": jnp.asarray(disc_factor, jnp.float32),
            "grad_norm": optax.tree.norm(grads), "lr": optim.current_hparams(opt_state)["lr"],
        }
        if use_lpips:
            m["lpips"] = aux["lpips"]
        new = {**state, "params": params, "disc_params": disc_params, "opt_state": opt_state,
               "disc_opt_state": disc_opt_state, "step": step + 1}
        if vq:
            usage = update_usage(state["usage_SV"], aux["hits"], cfg.usage_decay)
            dead_V = usage.sum(0) < cfg.dead_code_threshold
            if cfg.reinit_dead_codes:
                feats = jax.lax.stop_gradient(aux["f"]).reshape(-1, model_cfg.z_channels)
                emb, new_usage, _ = reinit_dead_codes(
                    params["quantize"]["embedding"], usage, feats, cfg.dead_code_threshold, r_plug)
                now = (step + 1) % cfg.dead_code_every == 0
                emb = jnp.where(now, emb, params["quantize"]["embedding"])
                new["params"] = {**params, "quantize": {**params["quantize"], "embedding": emb}}
                usage = jnp.where(now, new_usage, usage)
            new["usage_SV"] = usage
            m["dead_codes"] = dead_V.sum().astype(jnp.float32)
            for k in range(S):
                m[f"usage_s{k}"] = jnp.mean(usage[k] >= margin) * 100
        return new, m

    ema = plan.ema_decay > 0
    export_key = "ema_params" if ema else "params"
    replicated = mesh_lib.replicated_sharding(mesh)
    jit = functools.partial(jax.jit, out_shardings=replicated, compiler_options=conv_compiler_options())

    def recon(params, img):
        return model.apply({"params": params}, img, method=plug.module.img_to_recon)

    recon_batch = jit(recon)

    @jit
    def psnr_sums(params, img, mask):
        p = losses.psnr((recon(params, img) + 1) / 2, (img + 1) / 2)
        return jnp.stack([(p * mask).sum(), mask.sum()])

    def batches():
        return sources.eval_batches(cfg.data, image_size=side, global_batch_size=plan.batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count())

    eval_fn = None
    if cfg.eval_every:
        held_out = batches()

        def eval_fn(state):
            tot = np.zeros(2)
            for b in held_out:
                g = mesh_lib.make_global_batch({"image": b["image"], "mask": b["mask"].astype(np.float32)}, mesh)
                tot += np.asarray(psnr_sums(state[export_key], g["image"], g["mask"]))
            return {"val_psnr": float(tot[0] / max(tot[1], 1.0))}

    fixed: dict = {}

    def on_log(step, state, writer):
        """Held-out images beside their reconstructions (TensorBoard), every ``config.image_every`` steps."""
        if not cfg.image_every or step % cfg.image_every:
            return
        if "img" not in fixed:
            fixed["img"] = mesh_lib.make_global_batch(next(iter(batches()))["image"], mesh)
            fixed["host"] = np.asarray(jax.jit(lambda x: x, out_shardings=replicated)(fixed["img"]))
        n = cfg.image_count
        rec = np.asarray(recon_batch(state[export_key], fixed["img"]))[:n]
        pair = np.concatenate([fixed["host"][:n], rec], axis=2)  # original | reconstruction, side by side
        writer.write_images(step, {"recon": np.round((pair + 1) * 127.5).clip(0, 255).astype(np.uint8)})

    latent_side = side // model_cfg.downsample
    return Task(
        init_fn=init_fn,
        step_fn=step_fn,
        frozen={"lpips": jax.device_put(lpips_params, replicated)} if use_lpips else None,
        eval_fn=eval_fn,
        on_log=on_log,
        manifest=model_dir.manifest(plug.family, model_cfg, model_dir.checkpoint_source(ema)),
        conv_bound=True,
        tokens_per_example=latent_side * latent_side,
        progress_keys=("psnr",) + (("g_loss", "d_loss") if use_disc else ()),
        next_step="varjax reconstruct --ckpt {workdir} --images DIR --out recon",
    )
