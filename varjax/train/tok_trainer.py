"""Tokenizer training: ``varjax train-tokenizer --config configs/<file>.py[:args] --workdir DIR [--config.x=y]``.

VQGAN-style objective on VAR's multi-scale VQ-VAE: L1/L2 reconstruction, the quantizer loss, optional LPIPS
and an optional PatchGAN (hinge) with taming's adaptive weight, switched on at ``config.disc_start``. The
generator and the discriminator are updated in one jitted step (one compiled program for the whole run: the
discriminator's start is a ``jnp.where``). The state also keeps an EMA of the tokenizer weights (exported),
an EMA of the codebook hits per scale (``usage_SV``, logged as ``usage_s{k}``) and can re-initialise dead
codes from encoder features of the current batch.

The workdir is a model directory: its ``varjax_model.json`` points at the latest training checkpoint, so
``varjax tokenize/reconstruct --ckpt WORKDIR`` and ``config.tokenizer_dir=WORKDIR`` of ``varjax train`` work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.core import meta

from varjax.ckpt import FORMAT, load_params, read_model_json
from varjax.data import pipeline
from varjax.models.discriminator import NLayerDiscriminator, adaptive_weight, adopt_weight, generator_loss, get_d_loss
from varjax.models.vqvae import VQVAE, VQVAEConfig
from varjax.train import loop, optim, sharding
from varjax.xla_flags import conv_compiler_options

VAE_FIELDS = tuple(f.name for f in dataclasses.fields(VQVAEConfig))
# Fields of config.vae that may differ from the tokenizer named by config.init_from (they change training only).
FINETUNE_OVERRIDABLE = ("dropout", "beta")
USAGE_MARGIN = 0.08  # the reference: a code is "used" at scale k if its EMA hits >= 0.08 * tokens / vocab


def vae_config_from(cfg: ml_collections.ConfigDict) -> VQVAEConfig:
    """``VQVAEConfig`` from ``config.vae`` (unknown fields are an error)."""
    v = dict(cfg.vae)
    unknown = set(v) - set(VAE_FIELDS)
    if unknown:
        raise ValueError(f"config.vae has unknown fields {sorted(unknown)}; known: {sorted(VAE_FIELDS)}.")
    return VQVAEConfig.from_dict({k: val for k, val in v.items() if val is not None})


def finetune_config(cfg: ml_collections.ConfigDict, loaded: VQVAEConfig) -> VQVAEConfig:
    """The loaded tokenizer's config with the overridable fields of ``config.vae``; other differences fail."""
    wanted = vae_config_from(cfg).to_dict()
    have = loaded.to_dict()
    bad = [k for k in have if k not in FINETUNE_OVERRIDABLE and k in cfg.vae and _norm(wanted[k]) != _norm(have[k])]
    if bad:
        diffs = ", ".join(f"config.vae.{k}={wanted[k]!r} (tokenizer: {have[k]!r})" for k in bad)
        raise ValueError(
            f"config.init_from={cfg.init_from!r} holds a tokenizer that does not match the config: {diffs}. "
            "The architecture of the tokenizer being fine-tuned is fixed; set these config.vae fields to the "
            f"tokenizer's values (only {list(FINETUNE_OVERRIDABLE)} may differ)."
        )
    return dataclasses.replace(loaded, **{k: wanted[k] for k in FINETUNE_OVERRIDABLE})


def _norm(v):
    return tuple(v) if isinstance(v, list | tuple) else v


def psnr_01(x_BHW3, y_BHW3):
    """Per-image PSNR (dB) of two image batches in [0, 1]: (B,)."""
    mse = jnp.mean(jnp.square(x_BHW3 - y_BHW3), axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def usage_margin(batch_size: int, vae_cfg: VQVAEConfig) -> float:
    """EMA hits at or above which a code counts as used (the reference's margin, same for every scale)."""
    return USAGE_MARGIN * batch_size * vae_cfg.patch_nums[-1] ** 2 / vae_cfg.vocab_size


def update_usage(usage_SV, hits_SV, decay: float):
    """``decay * usage + (1 - decay) * hits`` (float32)."""
    return decay * usage_SV + (1.0 - decay) * hits_SV.astype(jnp.float32)


def ema_update(ema, params, decay: float):
    """``decay * ema + (1 - decay) * params`` leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


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


def _forward_with_features(module: VQVAE, img, train: bool):
    """Like ``VQVAE.__call__`` but also returns the encoder features (for dead-code re-initialisation)."""
    f = module.encode(img, train)
    _, _, f_hat_st, vq_loss, hits = module.quantize.quantize(f, train=True)
    return module.decode(f_hat_st, train), vq_loss, hits, f


def _check_cfg(cfg) -> None:
    if cfg.disc_loss not in ("hinge", "vanilla"):
        raise ValueError(f"config.disc_loss={cfg.disc_loss!r}; expected 'hinge' or 'vanilla'.")
    if cfg.disc.norm not in ("group", "none"):
        raise ValueError(
            f"config.disc.norm={cfg.disc.norm!r}; the tokenizer trainer supports 'group' or 'none' (BatchNorm "
            "statistics are not kept in the training state)."
        )
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay={cfg.ema_decay} must be in [0, 1) (0 disables the EMA).")
    if not 0.0 <= cfg.usage_decay < 1.0:
        raise ValueError(f"config.usage_decay={cfg.usage_decay} must be in [0, 1).")
    if cfg.lpips_weight > 0 and not cfg.lpips_lin_path and cfg.lpips_vgg_path:
        raise ValueError("config.lpips_vgg_path is set but config.lpips_lin_path is empty; LPIPS needs both.")


def load_lpips(cfg):
    """LPIPS parameters when ``config.lpips_weight > 0`` and ``config.lpips_lin_path`` is set, else None."""
    if not cfg.lpips_lin_path:
        print("[train-tokenizer] perceptual loss: off (no config.lpips_lin_path)", flush=True)
        return None
    if cfg.lpips_weight <= 0:
        print("[train-tokenizer] perceptual loss: off (config.lpips_weight is 0)", flush=True)
        return None
    from varjax.models.lpips import load_lpips_params

    print(f"[train-tokenizer] perceptual loss: on (weight {cfg.lpips_weight})", flush=True)
    return load_lpips_params(cfg.lpips_lin_path, cfg.lpips_vgg_path or None)


def build_task(setup: loop.Setup, vae_cfg: VQVAEConfig, init_params=None, lpips_params=None) -> loop.Task:
    """The tokenizer task; ``init_params`` (tokenizer params to fine-tune) replaces the random init."""
    cfg = setup.cfg
    _check_cfg(cfg)
    vae = VQVAE(vae_cfg)
    disc = NLayerDiscriminator(ndf=cfg.disc.ndf, n_layers=cfg.disc.n_layers, norm=cfg.disc.norm)
    use_disc = cfg.disc_weight > 0
    use_lpips = lpips_params is not None
    d_loss_fn = get_d_loss(cfg.disc_loss)
    tx = optim.make_optimizer(
        cfg.opt,
        peak_lr=cfg.lr,
        total_steps=setup.total_steps,
        steps_per_epoch=setup.steps_per_epoch,
        examples_per_step=cfg.batch_size,
    )
    disc_tx = optax.adam(cfg.disc_lr, b1=cfg.disc_b1, b2=cfg.disc_b2)
    S, V, side = len(vae_cfg.patch_nums), vae_cfg.vocab_size, vae_cfg.image_size
    margin = usage_margin(cfg.batch_size, vae_cfg)
    ema_d, use_d = float(cfg.ema_decay), float(cfg.usage_decay)
    if init_params is not None:
        init_params = jax.tree.map(jnp.asarray, init_params)
    if lpips_params is not None:
        lpips_params = jax.tree.map(jnp.asarray, lpips_params)

    def init_fn(rng):
        r_vae, r_disc = jax.random.split(rng)
        img = jnp.zeros((1, side, side, 3), jnp.float32)
        params = vae.init(r_vae, img)["params"]
        if init_params is not None:
            _check_same_structure(params, init_params, cfg.init_from)
            params = init_params
        disc_params = disc.init(r_disc, img)["params"]
        return {
            "params": params,
            "ema_params": jax.tree.map(jnp.copy, params),
            "disc_params": disc_params,
            "opt_state": tx.init(params),
            "disc_opt_state": disc_tx.init(disc_params),
            "usage_SV": jnp.zeros((S, V), jnp.float32),
            "step": jnp.zeros((), jnp.int32),
            "rng": rng,
        }

    def step_fn(state, batch):
        img = batch["image"].astype(jnp.float32)
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        r_drop, r_dead = jax.random.split(rng)
        disc_factor = adopt_weight(1.0, step, cfg.disc_start) if use_disc else jnp.zeros((), jnp.float32)

        def losses(params):
            recon, vq_loss, hits, f = vae.apply(
                {"params": params}, img, True, method=_forward_with_features, rngs={"dropout": r_drop}
            )
            l1 = jnp.mean(jnp.abs(recon - img))
            l2 = jnp.mean(jnp.square(recon - img))
            nll = cfg.l1_weight * l1 + cfg.l2_weight * l2
            lp = jnp.mean(lpips_distance(lpips_params, recon, img)) if use_lpips else jnp.zeros(())
            nll = nll + cfg.lpips_weight * lp
            g = generator_loss(disc.apply({"params": state["disc_params"]}, recon)) if use_disc else jnp.zeros(())
            aux = {"recon": recon, "hits": hits, "f": f, "l1": l1, "l2": l2, "lpips": lp}
            return (nll, vq_loss, g), aux

        (nll, vq_loss, g_loss), vjp, aux = jax.vjp(losses, state["params"], has_aux=True)
        one, zero = jnp.ones(()), jnp.zeros(())
        (grads,) = vjp((one, jnp.asarray(cfg.vq_weight, jnp.float32), zero))
        if use_disc:
            (g_grads,) = vjp((zero, zero, one))
            last = ("decoder", "conv_out", "kernel")
            if cfg.adaptive_disc_weight:
                aw = adaptive_weight(_get(grads, last), _get(g_grads, last))
            else:
                aw = jnp.ones((), jnp.float32)
            d_weight = disc_factor * cfg.disc_weight * aw
            grads = jax.tree.map(lambda a, b: a + d_weight * b, grads, g_grads)
        else:
            d_weight = jnp.zeros((), jnp.float32)
        loss = nll + cfg.vq_weight * vq_loss + d_weight * g_loss
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)

        # Discriminator (hinge) on real images and the detached reconstructions; frozen before disc_start.
        disc_params, disc_opt_state = state["disc_params"], state["disc_opt_state"]
        d_loss = jnp.zeros((), jnp.float32)
        if use_disc:
            fake = jax.lax.stop_gradient(aux["recon"])

            def d_objective(dp):
                return d_loss_fn(disc.apply({"params": dp}, img), disc.apply({"params": dp}, fake))

            d_loss, d_grads = jax.value_and_grad(d_objective)(disc_params)
            d_updates, new_dos = disc_tx.update(d_grads, disc_opt_state)
            new_dp = optax.apply_updates(disc_params, d_updates)
            on = disc_factor > 0
            disc_params = jax.tree.map(lambda n, o: jnp.where(on, n, o), new_dp, disc_params)
            disc_opt_state = jax.tree.map(lambda n, o: jnp.where(on, n, o), new_dos, disc_opt_state)

        usage = update_usage(state["usage_SV"], aux["hits"], use_d)
        dead_V = usage.sum(0) < cfg.dead_code_threshold
        if cfg.reinit_dead_codes:
            feats = jax.lax.stop_gradient(aux["f"]).reshape(-1, vae_cfg.z_channels)
            emb, new_usage, _ = reinit_dead_codes(
                params["quantize"]["embedding"], usage, feats, cfg.dead_code_threshold, r_dead
            )
            now = (step + 1) % cfg.dead_code_every == 0
            emb = jnp.where(now, emb, params["quantize"]["embedding"])
            params = {**params, "quantize": {**params["quantize"], "embedding": emb}}
            usage = jnp.where(now, new_usage, usage)
        ema = ema_update(state["ema_params"], params, ema_d)

        recon01 = (jnp.clip(aux["recon"], -1, 1) + 1) / 2
        hp = optim.current_hparams(opt_state)
        m = {
            "loss": loss,
            "recon_l1": aux["l1"],
            "recon_l2": aux["l2"],
            "psnr": jnp.mean(psnr_01(recon01, (img + 1) / 2)),
            "vq_loss": vq_loss,
            "g_loss": g_loss,
            "d_loss": d_loss,
            "d_weight": d_weight,
            "disc_factor": jnp.asarray(disc_factor, jnp.float32),
            "grad_norm": optax.tree.norm(grads),
            "lr": hp["lr"],
            "dead_codes": dead_V.sum().astype(jnp.float32),
        }
        if use_lpips:
            m["lpips"] = aux["lpips"]
        for k in range(S):
            m[f"usage_s{k}"] = jnp.mean(usage[k] >= margin) * 100
        new = {
            "params": params,
            "ema_params": ema,
            "disc_params": disc_params,
            "opt_state": opt_state,
            "disc_opt_state": disc_opt_state,
            "usage_SV": usage,
            "step": step + 1,
            "rng": state["rng"],
        }
        return new, m

    export_key = "ema_params" if ema_d > 0 else "params"

    # Evaluation and image logging run on global batches (each process loads its share, as in training);
    # their outputs are replicated so every process can read them.
    replicated = sharding.replicated_sharding(setup.mesh) if setup.mesh is not None else None

    @functools.partial(jax.jit, out_shardings=replicated, compiler_options=conv_compiler_options())
    def recon_batch(params, img):
        return vae.apply({"params": params}, img, method=VQVAE.img_to_recon)

    @functools.partial(jax.jit, out_shardings=replicated, compiler_options=conv_compiler_options())
    def psnr_sums(params, img, mask):
        rec = vae.apply({"params": params}, img, method=VQVAE.img_to_recon)
        p = psnr_01((rec + 1) / 2, (img + 1) / 2)
        return jnp.stack([(p * mask).sum(), mask.sum()])

    eval_iter = None
    if cfg.get("eval_every"):
        eval_iter = pipeline.build_eval_iter(
            cfg.data,
            image_size=side,
            global_batch_size=cfg.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def eval_fn(state):
        tot = np.zeros(2)
        for b in eval_iter:
            g = sharding.make_global_batch({"image": b["image"], "mask": b["mask"].astype(np.float32)}, setup.mesh)
            tot += np.asarray(psnr_sums(state[export_key], g["image"], g["mask"]))
        return {"val_psnr": float(tot[0] / max(tot[1], 1.0))}

    fixed: dict = {}

    def on_log(step, state, writer):
        every = cfg.get("image_every", 0)
        if not every or step % every:
            return
        if "img" not in fixed:
            it = pipeline.build_eval_iter(
                cfg.data, image_size=side, global_batch_size=cfg.batch_size, process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
            local = next(iter(it))["image"]
            fixed["img"] = sharding.make_global_batch(local, setup.mesh)
            fixed["host"] = np.asarray(
                jax.jit(lambda x: x, out_shardings=replicated)(fixed["img"])[: cfg.get("image_count", 8)])
        n = cfg.get("image_count", 8)
        rec = np.asarray(recon_batch(state[export_key], fixed["img"]))[:n]
        pair = np.concatenate([fixed["host"], rec], axis=2)  # original | reconstruction, side by side
        writer.write_images(step, {"recon": np.round((pair + 1) * 127.5).clip(0, 255).astype(np.uint8)})

    task = loop.Task(
        init_fn=init_fn,
        step_fn=step_fn,
        eval_fn=eval_fn if eval_iter is not None else None,
        on_log=on_log,
        conv_bound=True,
    )
    task.export_key = export_key
    return task


def lpips_distance(params, x, y):
    from varjax.models.lpips import lpips_distance as dist

    return dist(params, x, y)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _check_same_structure(init, loaded, where) -> None:
    init = meta.unbox(init)  # the fresh init carries logical-axis boxes
    a = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(init)}
    b = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
    if a != b:
        missing, extra = sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5]
        shape = [k for k in set(a) & set(b) if a[k] != b[k]][:5]
        raise ValueError(
            f"config.init_from={where!r}: its parameters do not fit the tokenizer built from its config "
            f"(missing {missing}, unexpected {extra}, wrong shapes {shape})."
        )


def model_json(vae_cfg: VQVAEConfig, export_key: str) -> dict:
    return {
        "format": FORMAT,
        "version": 1,
        "vae": {
            "config": vae_cfg.to_dict(),
            "params": {"checkpoint": "checkpoints", "item": "state", "subtree": [export_key]},
        },
        "var": None,
    }


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Builds everything from the config and trains; returns the last logged metrics."""
    if cfg.get("model_type", "vq") == "kl":  # the continuous (KL) tokenizer of E-CAR
        from varjax.train import kl_trainer

        return kl_trainer.train(cfg, workdir)
    init_params = None
    if cfg.get("require_init_from") and not cfg.init_from:
        raise ValueError(
            "config.init_from is empty: this config fine-tunes an existing tokenizer; pass "
            "--config.init_from=DIR (a `varjax convert` output or a `varjax train-tokenizer` workdir)."
        )
    if cfg.init_from:
        meta = read_model_json(cfg.init_from)
        if meta.get("vae") is None:
            raise ValueError(f"config.init_from={cfg.init_from!r} holds no tokenizer ('vae' entry).")
        vae_cfg = finetune_config(cfg, VQVAEConfig.from_dict(meta["vae"]["config"]))
    else:
        vae_cfg = vae_config_from(cfg)
    # prepare() starts jax.distributed, which must come before any JAX call (loading parameters is one)
    setup = loop.prepare(cfg, workdir, vae_cfg.image_size, name="train-tokenizer")
    if cfg.init_from:
        init_params = load_params(cfg.init_from, "vae")
        print(f"[train-tokenizer] fine-tuning the tokenizer in {cfg.init_from}", flush=True)
    lpips_params = load_lpips(cfg)
    if cfg.disc_weight <= 0:
        print("[train-tokenizer] discriminator: off (config.disc_weight is 0)", flush=True)
    else:
        print(f"[train-tokenizer] discriminator: on from step {cfg.disc_start} (weight {cfg.disc_weight})", flush=True)
    task = build_task(setup, vae_cfg, init_params, lpips_params)
    task.model_json = model_json(vae_cfg, task.export_key)
    return loop.train_and_evaluate(setup, task)


def tokenizer_run() -> ml_collections.ConfigDict:
    """Defaults of a tokenizer run (``base_run()`` plus the tokenizer fields); configs override them."""
    from varjax.train.config_base import base_run

    c = base_run()
    c.vae = ml_collections.ConfigDict(
        {k: v for k, v in VQVAEConfig().to_dict().items() if k in (
            "ch", "ch_mult", "z_channels", "vocab_size", "num_res_blocks", "using_sa", "using_mid_sa", "patch_nums",
            "num_groups", "beta", "using_znorm", "quant_resi", "share_quant_resi", "dropout")}
    )
    c.init_from = ""  # a model directory (converted tokenizer or earlier run) to fine-tune
    c.lr = 1e-4  # peak learning rate (absolute)
    c.l1_weight = 1.0
    c.l2_weight = 1.0
    c.vq_weight = 1.0
    c.lpips_weight = 0.0
    c.lpips_lin_path = ""
    c.lpips_vgg_path = ""
    c.disc_weight = 0.0
    c.disc_start = 0
    c.disc_loss = "hinge"
    c.adaptive_disc_weight = True
    c.disc = ml_collections.ConfigDict(dict(ndf=64, n_layers=3, norm="group"))
    c.disc_lr = 1e-4
    c.disc_b1 = 0.5
    c.disc_b2 = 0.9
    c.ema_decay = 0.999
    c.usage_decay = 0.99
    c.reinit_dead_codes = False
    c.dead_code_threshold = 0.01
    c.dead_code_every = 200
    c.image_every = 0
    c.image_count = 8
    c.opt.twd = 0.0
    c.opt.twde = 0.0
    c.opt.b1, c.opt.b2 = 0.9, 0.99
    c.opt.tclip = 1.0
    c.opt.sche = "cos"
    c.opt.wpe = 0.1
    return c


def run_cli(argv: list[str]) -> None:
    from varjax.train.cli_flags import run_with_config

    run_with_config(argv, train, "tokenizer")
