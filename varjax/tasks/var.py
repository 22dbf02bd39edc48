"""The VAR task: next-scale prediction on a frozen multi-scale VQ tokenizer (``config.task = "var"``).

The objective is the reference's: teacher-forcing inputs from the tokenizer (images encoded in the step, or a
token cache), cross-entropy (optional label smoothing) averaged uniformly over all tokens, class dropout, drop
path, optional progressive training (``config.pg``). Evaluation reports the reference's test losses and
accuracies (``L_mean``, ``L_tail``, ``acc_mean``, ``acc_tail``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import meta

from varjax import losses
from varjax.core import mesh as mesh_lib
from varjax.core import model_dir, optim
from varjax.data import sources
from varjax.models import flops
from varjax.models.var import VAR, VARConfig
from varjax.models.vqvae import VQVAE, VQVAEConfig, split_scales
from varjax.tasks import base
from varjax.tasks.base import Task, fill_model_fields, frozen_tokenizer

SOURCES = ("images", "tokens")
TRAIN_HINT = "convert the released one with `varjax convert --vae vae_ch160v4096z32.pth --out DIR`, or train one " \
    "with `varjax train-tokenizer --config configs/tokenizer_shapes.py --workdir DIR`"


derive = base.generator_derive


def defaults(cfg):
    """The reference recipe at this depth (``configs/common.py``)."""
    from varjax.configs import common

    return common.var(int(cfg.model.depth))


def tokenizer_of(cfg):
    return frozen_tokenizer(cfg, "vq", TRAIN_HINT)


def model_config(cfg, num_classes: int, tok: VQVAEConfig) -> VARConfig:
    """The official width/heads/drop-path rules for ``depth`` (64 * depth, depth, 0.1 * depth / 24), overridden by
    the fields ``config.model`` sets; sizes of the codebook and scales from the tokenizer."""
    depth = int(cfg.model.depth)
    rules = dict(embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24)
    fields = {k: (rules.get(k) if v is None else v) for k, v in dict(cfg.model).items()}
    derived = dict(num_classes=num_classes, vocab_size=tok.vocab_size, Cvae=tok.z_channels,
                   patch_nums=tuple(tok.patch_nums))
    return fill_model_fields(VARConfig, fields, derived)


def prog_stage(step: int, *, pg: float, pg0: int, wp_it: float, max_it: int, num_scales: int) -> int:
    """The reference's progressive-training stage (index of the last trained scale) at ``step``; -1 = all."""
    if pg <= 0:
        return -1
    if step <= wp_it:
        si = pg0
    elif step >= max_it * pg:
        si = num_scales - 1
    else:
        progress = min(max((step - wp_it) / (max_it * pg - wp_it), 0), 1)
        si = pg0 + round(progress * (num_scales - 1 - pg0))
    return -1 if si == num_scales - 1 else si


def stage_start(step: int, stage_fn) -> int:
    """First step of the progressive stage that ``step`` is in.

    Stages never go back, so each stage is one contiguous run of steps: a binary search over [0, step].
    """
    si, lo, hi = stage_fn(step), 0, step
    while lo < hi:
        mid = (lo + hi) // 2
        if stage_fn(mid) == si:
            hi = mid
        else:
            lo = mid + 1
    return lo


def prog_warmup(step: int, stage_fn, pgwp_it: float, first: int | None = None) -> float:
    """Loss weight of the newest scale: ramps over ``pgwp_it`` steps after each stage change (the first stage
    is not ramped, since the lr warm-up already covers it). ``first``: the stage's first step, when known."""
    si = stage_fn(step)
    if stage_fn(0) == si:
        return 1.0
    first = stage_start(step, stage_fn) if first is None else first
    return max(min((step - first + 1) / max(pgwp_it, 1e-9), 1.0), 0.01)


def teacher_forcing_inputs(vae: VQVAE, vae_params, patch_nums, batch):
    """(gt tokens (B, L), transformer input (B, L - first_l, Cv)) from a batch of images or cached tokens."""
    if "tokens" in batch:
        idx = split_scales(batch["tokens"], patch_nums)
    else:
        idx = vae.apply({"params": vae_params}, batch["image"], method=VQVAE.img_to_idx)
    x = vae.apply({"params": vae_params}, idx, method=VQVAE.idx_to_var_input)
    return jnp.concatenate(idx, axis=1), x


EVAL_KEYS = ("L_mean", "L_tail", "acc_mean", "acc_tail")


def eval_label_drop(seed: int, batch_index: int, batch_size: int, rate: float) -> np.ndarray:
    """Which examples of evaluation batch ``batch_index`` get the null class: (B,) bool, ``u < rate`` for
    uniform draws of a numpy generator seeded with ``(seed, batch_index)``.

    The reference's ``VAR.forward`` drops labels at ``cond_drop_rate`` in evaluation too (its ``eval_ep`` calls
    the same forward), so its reported test losses are on class-dropped batches. Drawing on the host with a
    fixed seed makes the choice the same on every machine, mesh and process count.
    """
    return np.random.default_rng((seed, batch_index)).random(batch_size) < rate


def make_eval_fn(vae_cfg: VQVAEConfig, model_cfg: VARConfig, dtype=jnp.float32, seed: int = 0):
    """``evaluate(params, vae_params, batches, mesh=None) -> dict`` over eval batches (padded examples carry
    ``mask`` 0 and are not counted).

    ``L_mean``, ``L_tail``, ``acc_mean``, ``acc_tail`` are computed as the reference trainer computes them: the
    labels of each batch are replaced by the null class at ``model_cfg.cond_drop_rate``, here with a fixed
    draw per batch (``eval_label_drop``), so the numbers are deterministic. The same four with ``_nodrop``
    appended use the true labels of every example.
    """
    vae, var = VQVAE(vae_cfg), VAR(model_cfg, dtype=dtype)
    pns = model_cfg.patch_nums
    rate, null = float(model_cfg.cond_drop_rate), model_cfg.num_classes

    @jax.jit
    def batch_stats(params, vae_params, batch):
        gt_BL, x = teacher_forcing_inputs(vae, vae_params, pns, batch)

        def stats(label_B):
            logits = var.apply({"params": params}, label_B, x, train=False)
            return losses.eval_stats(logits, gt_BL, pns[-1] ** 2, batch["mask"])

        nodrop = stats(batch["label"])
        return (stats(batch["label_dropped"]) if rate > 0 else nodrop), nodrop

    def evaluate(params, vae_params, batches, mesh=None) -> dict:
        tot, tot_nodrop = np.zeros(5), np.zeros(5)
        for i, b in enumerate(batches):
            b = {k: v for k, v in b.items() if k in ("image", "tokens", "label", "mask")}
            B, p = len(b["label"]), jax.process_index()  # this process's slice of the global batch
            drop_B = eval_label_drop(seed, i, B * jax.process_count(), rate)[p * B : (p + 1) * B]
            b["label_dropped"] = np.where(drop_B, null, b["label"]).astype(np.int32)
            if mesh is not None:
                b = mesh_lib.make_global_batch(b, mesh)
            dropped, nodrop = jax.device_get(batch_stats(params, vae_params, b))
            tot += np.asarray(dropped)
            tot_nodrop += np.asarray(nodrop)
        out = {k: float(v) for k, v in zip(EVAL_KEYS, tot[:4] / max(tot[4], 1), strict=True)}
        out.update({f"{k}_nodrop": float(v) for k, v in zip(EVAL_KEYS, tot_nodrop[:4] / max(tot_nodrop[4], 1),
                                                             strict=True)})
        return out

    return evaluate


def abstract_tokenizer(vae_cfg: VQVAEConfig, sharding) -> dict:
    """The tokenizer's parameters as ``jax.ShapeDtypeStruct`` (nothing computed or read)."""
    s = vae_cfg.image_size
    tree = jax.eval_shape(lambda r: VQVAE(vae_cfg).init(r, jnp.zeros((1, s, s, 3)), method=VQVAE.init_all)["params"],
                          jax.random.PRNGKey(0))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), meta.unbox(tree))


def build(plan, mesh, abstract: bool = False) -> Task:
    """The VAR task; with ``abstract`` the tokenizer's parameters are shapes only (ahead-of-time compilation for
    devices this host does not have) and nothing is read from disk."""
    cfg, model_cfg, vae_cfg = plan.config, plan.model, plan.tokenizer
    dt = jnp.dtype(plan.dtype)
    vae, var = VQVAE(vae_cfg), VAR(model_cfg, dtype=dt)
    tx = optim.for_plan(plan)
    replicated = mesh_lib.replicated_sharding(mesh)
    vae_params = abstract_tokenizer(vae_cfg, replicated) if abstract else \
        model_dir.load_params(plan.tokenizer_dir, "vae", sharding=replicated)
    L, pns = model_cfg.L, model_cfg.patch_nums
    last_l = pns[-1] ** 2

    def init_fn(rng):
        lab = jnp.zeros((1,), jnp.int32)
        x = jnp.zeros((1, L - model_cfg.first_l, model_cfg.Cvae), jnp.float32)
        params = var.init(rng, lab, x, method=VAR.init_all)["params"]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32), "rng": rng}

    def make_step(prog_si: int):
        ed = L if prog_si < 0 else sum(p * p for p in pns[: prog_si + 1])
        bg = ed - (pns[prog_si] ** 2 if prog_si >= 0 else 0)

        def step_fn(state, batch, frozen):
            gt_BL, x = teacher_forcing_inputs(vae, frozen["vae"], pns, batch)
            gt_BL, x = gt_BL[:, :ed], x.astype(dt)  # the model's compute dtype
            rng = jax.random.fold_in(state["rng"], state["step"])
            weight = jnp.full((ed,), 1.0 / L)
            if prog_si >= 0:
                weight = weight.at[bg:ed].multiply(jnp.clip(batch["prog_wp"][0], 0.0, 1.0))

            def loss_fn(params):
                # the accuracies are taken here so that the (B, L, V) logits die inside the loss
                logits = var.apply(
                    {"params": params}, batch["label"], x, train=True, prog_si=prog_si, rngs={"dropout": rng}
                )
                hits = losses.hit_rates(logits, gt_BL, last_l if prog_si < 0 else None)
                return losses.token_loss(logits, gt_BL, cfg.ls, weight), hits

            (loss, hits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            hp = optim.current_hparams(opt_state)
            m = {
                "loss": loss,
                "lr": hp["lr"],
                "wd": hp["wd"],
                "grad_norm": optax.tree.norm(grads),
                "param_norm": optax.tree.norm(params),
                "update_norm": optax.tree.norm(updates),
                "prog_si": jnp.asarray(prog_si, jnp.float32),
                **hits,
            }
            return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}, m

        return step_fn

    S = len(pns)
    stage = functools.partial(prog_stage, pg=cfg.pg, pg0=cfg.pg0, wp_it=plan.warmup_steps, max_it=plan.total_steps,
                              num_scales=S)
    # the reference's default: total_epochs / 300 epochs of ramp per stage
    pgwp_it = cfg.pgwp * plan.steps_per_epoch if cfg.pgwp > 0 else plan.total_steps / 300

    def batch_extras(step: int, batch: dict) -> dict:
        """The loss weight of the newest scale at ``step`` (progressive training)."""
        return {**batch, "prog_wp": np.full((len(batch["label"]),), prog_warmup(step, stage, pgwp_it), np.float32)}

    eval_fn = None
    if cfg.eval_every and not abstract:
        evaluate = make_eval_fn(vae_cfg, model_cfg, dt, plan.seed)
        batches = sources.eval_batches(cfg.data, image_size=vae_cfg.image_size, global_batch_size=plan.batch_size,
                                       process_index=jax.process_index(), process_count=jax.process_count())

        def eval_fn(state):
            return evaluate(state["params"], vae_params, batches, mesh)

    ema = plan.ema_decay > 0
    return Task(
        init_fn=init_fn,
        step_fn=make_step(-1),
        frozen={"vae": vae_params},
        eval_fn=eval_fn,
        step_variant=stage if cfg.pg > 0 else None,
        step_fn_for=make_step,
        batch_extras=batch_extras if cfg.pg > 0 else None,
        manifest=model_dir.manifest("var", vae_cfg, {"model_dir": str(plan.tokenizer_dir)}, model_cfg,
                                    model_dir.checkpoint_source(ema)),
        tokens_per_example=L,
        flops_per_example=float(flops.train_flops_per_sequence(model_cfg, "masked")),
        progress_keys=("train_acc_mean", "train_acc_tail") + (("prog_si",) if cfg.pg > 0 else ()),
        next_step="varjax sample --ckpt {workdir} --labels 0,1,2,3 --out samples.png",
    )
