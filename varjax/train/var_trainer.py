"""VAR training: ``varjax train --config configs/<file>.py[:args] --workdir DIR [--config.field=value ...]``.

The tokenizer is frozen (a converted or trained model directory named by ``config.tokenizer_dir``); the
objective is the reference's: teacher-forcing inputs from the tokenizer, cross-entropy (optional label
smoothing) averaged uniformly over all tokens, class dropout, drop path, optional progressive training.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from varjax import paths
from varjax.ckpt import FORMAT, load_model_dir, read_model_json
from varjax.data import pipeline
from varjax.models.var import PARAM_LAYOUT, VAR, VARConfig
from varjax.models.vqvae import VQVAE, VQVAEConfig, split_scales
from varjax.train import loop, optim

MODEL_FIELDS = {f for f in VARConfig.__dataclass_fields__}


def var_config_from(cfg: ml_collections.ConfigDict, vae_cfg: VQVAEConfig, num_classes: int) -> VARConfig:
    """Model config: the official width/heads/drop-path rules for ``depth``, overridden by ``config.model``."""
    m = dict(cfg.model)
    unknown = set(m) - MODEL_FIELDS - {"dtype"}
    if unknown:
        raise ValueError(f"config.model has unknown fields {sorted(unknown)}; known: {sorted(MODEL_FIELDS)}.")
    depth = int(m.pop("depth"))
    base = dict(embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24)
    base.update({k: v for k, v in m.items() if k != "dtype" and v is not None})
    return VARConfig(
        depth=depth,
        num_classes=num_classes,
        vocab_size=vae_cfg.vocab_size,
        Cvae=vae_cfg.z_channels,
        patch_nums=tuple(vae_cfg.patch_nums),
        **{k: v for k, v in base.items() if k not in ("num_classes", "vocab_size", "Cvae", "patch_nums")},
    )


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


def token_loss(logits_BLV, gt_BL, label_smooth: float, weight_L):
    """Cross-entropy with label smoothing, per-token weights (1/L each) summed, then mean over the batch."""
    loss_BL = smoothed_cross_entropy(logits_BLV, gt_BL, label_smooth)
    return (loss_BL * weight_L[None]).sum(-1).mean()


def _shifted_lse(logits_BLV):
    """(logits - max in float32, log-sum-exp of that): the two halves of a stable log-softmax."""
    x = logits_BLV.astype(jnp.float32)
    shifted = x - jax.lax.stop_gradient(x.max(-1, keepdims=True))
    return shifted, jnp.log(jnp.exp(shifted).sum(-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def smoothed_cross_entropy(logits_BLV, gt_BL, label_smooth: float):
    """(B, L) float32 ``torch.nn.CrossEntropyLoss(label_smoothing=ls, reduction='none')``.

    The log-softmax is taken in float32 from logits in any dtype; the backward keeps only the logits (in their
    own dtype) and the (B, L) log-sum-exp, not a float32 (B, L, V) log-probability tensor.
    """
    return _smoothed_ce_fwd(logits_BLV, gt_BL, label_smooth)[0]


def _smoothed_ce_fwd(logits_BLV, gt_BL, label_smooth):
    shifted, lse_BL = _shifted_lse(logits_BLV)
    nll = lse_BL - jnp.take_along_axis(shifted, gt_BL[..., None], axis=-1)[..., 0]
    loss_BL = (1 - label_smooth) * nll + label_smooth * (lse_BL - shifted.mean(-1)) if label_smooth > 0 else nll
    lse_abs = lse_BL + logits_BLV.max(-1).astype(jnp.float32)  # log-sum-exp of the unshifted logits
    return loss_BL, (logits_BLV, gt_BL, lse_abs)


def _smoothed_ce_bwd(label_smooth, res, g_BL):
    logits_BLV, gt_BL, lse_BL = res
    V = logits_BLV.shape[-1]
    p = jnp.exp(logits_BLV.astype(jnp.float32) - lse_BL[..., None])
    target = jax.nn.one_hot(gt_BL, V, dtype=jnp.float32) * (1 - label_smooth) + label_smooth / V
    return ((p - target) * g_BL[..., None]).astype(logits_BLV.dtype), None


smoothed_cross_entropy.defvjp(_smoothed_ce_fwd, _smoothed_ce_bwd)


def hit_rates(logits_BLV, gt_BL, last_l: int | None):
    """Top-1 accuracies in % (all tokens, and the last ``last_l`` tokens when given), without gradients."""
    hit = (jnp.argmax(jax.lax.stop_gradient(logits_BLV), -1) == gt_BL).astype(jnp.float32)
    out = {"train_acc_mean": hit.mean() * 100}
    if last_l:
        out["train_acc_tail"] = hit[:, -last_l:].mean() * 100
    return out


def eval_stats(logits_BLV, gt_BL, last_l: int, mask_B):
    """Sums over valid examples of L_mean, L_tail, acc_mean, acc_tail (accuracies in %) and the count."""
    logp = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, gt_BL[..., None], axis=-1)[..., 0]
    hit = (jnp.argmax(logits_BLV, -1) == gt_BL).astype(jnp.float32)
    per = jnp.stack([nll.mean(1), nll[:, -last_l:].mean(1), hit.mean(1) * 100, hit[:, -last_l:].mean(1) * 100])
    return jnp.concatenate([(per * mask_B[None]).sum(1), mask_B.sum()[None]])


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


def make_eval_fn(vae_cfg: VQVAEConfig, vae_params, model_cfg: VARConfig, dtype=jnp.float32, seed: int = 0):
    """``evaluate(params, batches, mesh=None) -> dict`` over eval batches (padded examples carry ``mask`` 0 and
    are not counted).

    ``L_mean``, ``L_tail``, ``acc_mean``, ``acc_tail`` are computed as the reference trainer computes them: the
    labels of each batch are replaced by the null class at ``model_cfg.cond_drop_rate``, here with a fixed
    draw per batch (``eval_label_drop``), so the numbers are deterministic. The same four with ``_nodrop``
    appended use the true labels of every example.
    """
    vae, var = VQVAE(vae_cfg), VAR(model_cfg, dtype=dtype)
    pns = model_cfg.patch_nums
    rate, null = float(model_cfg.cond_drop_rate), model_cfg.num_classes

    @jax.jit
    def batch_stats(params, batch):
        gt_BL, x = teacher_forcing_inputs(vae, vae_params, pns, batch)

        def stats(label_B):
            logits = var.apply({"params": params}, label_B, x, train=False)
            return eval_stats(logits, gt_BL, pns[-1] ** 2, batch["mask"])

        nodrop = stats(batch["label"])
        return (stats(batch["label_dropped"]) if rate > 0 else nodrop), nodrop

    def evaluate(params, batches, mesh=None) -> dict:
        from varjax.train.sharding import make_global_batch

        tot, tot_nodrop = np.zeros(5), np.zeros(5)
        for i, b in enumerate(batches):
            b = {k: v for k, v in b.items() if k in ("image", "tokens", "label", "mask")}
            B, p = len(b["label"]), jax.process_index()  # this process's slice of the global batch
            drop_B = eval_label_drop(seed, i, B * jax.process_count(), rate)[p * B : (p + 1) * B]
            b["label_dropped"] = np.where(drop_B, null, b["label"]).astype(np.int32)
            if mesh is not None:
                b = make_global_batch(b, mesh)
            dropped, nodrop = jax.device_get(batch_stats(params, b))
            tot += np.asarray(dropped)
            tot_nodrop += np.asarray(nodrop)
        out = {k: float(v) for k, v in zip(EVAL_KEYS, tot[:4] / max(tot[4], 1), strict=True)}
        out.update({f"{k}_nodrop": float(v) for k, v in zip(EVAL_KEYS, tot_nodrop[:4] / max(tot_nodrop[4], 1),
                                                             strict=True)})
        return out

    return evaluate


def build_task(setup: loop.Setup, vae_cfg: VQVAEConfig, vae_params, model_cfg: VARConfig, dtype) -> loop.Task:
    cfg = setup.cfg
    vae, var = VQVAE(vae_cfg), VAR(model_cfg, dtype=dtype)
    peak = optim.peak_lr(cfg.tblr, cfg.batch_size, cfg.opt.get("ac", 1))
    tx = optim.make_optimizer(
        cfg.opt,
        peak_lr=peak,
        total_steps=setup.total_steps,
        steps_per_epoch=setup.steps_per_epoch,
        examples_per_step=cfg.batch_size,
    )
    vae_params = jax.device_put(vae_params, jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec()))
    L, pns = model_cfg.L, model_cfg.patch_nums
    last_l = pns[-1] ** 2
    S = len(pns)

    def init_fn(rng):
        lab = jnp.zeros((1,), jnp.int32)
        x = jnp.zeros((1, L - model_cfg.first_l, model_cfg.Cvae), jnp.float32)
        params = var.init(rng, lab, x, method=VAR.init_all)["params"]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32), "rng": rng}

    def inputs(batch):
        gt_BL, x = teacher_forcing_inputs(vae, vae_params, pns, batch)
        return gt_BL, x.astype(dtype)  # the model's compute dtype

    def make_step(prog_si: int):
        ed = L if prog_si < 0 else sum(p * p for p in pns[: prog_si + 1])
        bg = ed - (pns[prog_si] ** 2 if prog_si >= 0 else 0)

        def step_fn(state, batch):
            gt_BL, x = inputs(batch)
            gt_BL = gt_BL[:, :ed]
            rng = jax.random.fold_in(state["rng"], state["step"])
            prog_wp = batch["prog_wp"][0] if "prog_wp" in batch else 1.0
            weight = jnp.full((ed,), 1.0 / L)
            if prog_si >= 0:
                weight = weight.at[bg:ed].multiply(jnp.clip(prog_wp, 0.0, 1.0))

            def loss_fn(params):
                # the accuracies are taken here so that the (B, L, V) logits die inside the loss
                logits = var.apply(
                    {"params": params}, batch["label"], x, train=True, prog_si=prog_si, rngs={"dropout": rng}
                )
                hits = hit_rates(logits, gt_BL, last_l if prog_si < 0 else None)
                return token_loss(logits, gt_BL, cfg.ls, weight), hits

            (loss, hits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            hp = optim.current_hparams(opt_state)
            m = {
                "loss": loss,
                "lr": hp["lr"],
                "wd": hp["wd"],
                "grad_norm": optax.global_norm(grads),
                "param_norm": optax.global_norm(params),
                "update_norm": optax.global_norm(updates),
                "prog_si": jnp.asarray(prog_si, jnp.float32),
                **hits,
            }
            new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
            return new, m

        return step_fn

    wp_it = _warmup_steps(cfg, setup)
    stage = functools.partial(prog_stage, pg=cfg.pg, pg0=cfg.pg0, wp_it=wp_it, max_it=setup.total_steps, num_scales=S)
    # the reference's default: total_epochs / 300 epochs of ramp per stage
    pgwp_it = cfg.pgwp * setup.steps_per_epoch if cfg.pgwp > 0 else setup.total_steps / 300

    eval_iter = None
    if cfg.get("eval_every"):
        eval_iter = pipeline.build_eval_iter(
            cfg.data,
            image_size=vae_cfg.image_size,
            global_batch_size=cfg.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    evaluate = make_eval_fn(vae_cfg, vae_params, model_cfg, dtype)

    def eval_fn(state):
        return evaluate(state["params"], eval_iter, setup.mesh)

    task = loop.Task(
        init_fn=init_fn,
        step_fn=make_step(-1),
        eval_fn=eval_fn if eval_iter is not None else None,
        step_variant=(lambda s: stage(s)) if cfg.pg > 0 else None,
        step_fn_for=make_step,
    )
    if cfg.pg > 0:  # each batch carries the loss weight of the newest scale for its step
        setup.train_iter = _with_prog_wp(setup.train_iter, stage, pgwp_it)
    return task


def _warmup_steps(cfg, setup) -> float:
    from varjax.train.config_utils import steps_from

    o = cfg.opt
    if any(o.get(f"warmup_{k}") for k in ("steps", "epochs", "examples")):
        return steps_from(o, "warmup", steps_per_epoch=setup.steps_per_epoch, examples_per_step=cfg.batch_size)
    return o.get("warmup_fraction", 0.02) * setup.total_steps


def model_json(cfg, vae_cfg: VQVAEConfig, model_cfg: VARConfig) -> dict:
    return {
        "format": FORMAT,
        "version": 1,
        "vae": {"config": vae_cfg.to_dict(), "params": {"model_dir": str(paths.resolve(cfg.tokenizer_dir))}},
        "var": {
            "config": model_cfg.to_dict(),
            "params": {"checkpoint": "checkpoints", "item": "state", "subtree": ["params"]},
            "param_layout": PARAM_LAYOUT,
        },
    }


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Builds everything from the config and trains; returns the last logged metrics."""
    if cfg.get("model_family", "var") == "ecar":  # continuous tokens, multistage flow
        from varjax.train import ecar_trainer

        return ecar_trainer.train(cfg, workdir)
    meta = read_model_json(cfg.tokenizer_dir)
    if meta.get("vae") is None:
        load_model_dir(cfg.tokenizer_dir)  # raises the explanatory error
    # prepare() starts jax.distributed, which must come before any JAX call (loading parameters is one)
    setup = loop.prepare(cfg, workdir, VQVAEConfig.from_dict(meta["vae"]["config"]).image_size)
    tok = load_model_dir(cfg.tokenizer_dir)
    ncls = cfg.model.get("num_classes") or pipeline.num_classes(cfg.data)
    model_cfg = var_config_from(cfg, tok.vae_cfg, ncls)
    dtype = jnp.dtype(cfg.model.get("dtype", "float32"))
    task = build_task(setup, tok.vae_cfg, tok.vae_params, model_cfg, dtype)
    task.model_json = model_json(cfg, tok.vae_cfg, model_cfg)
    return loop.train_and_evaluate(setup, task)


class _with_prog_wp:
    """Wraps the data iterator to attach the progressive-training loss weight of the step to each batch.

    The current stage and its first step are carried from step to step (O(1) per step); after a restore the
    first step is found once by :func:`stage_start`.
    """

    def __init__(self, it, stage, pgwp_it):
        self._it, self._stage, self._pgwp = it, stage, pgwp_it
        self.steps_per_epoch = it.steps_per_epoch
        self._step = 0
        self._si, self._first = None, 0

    def __next__(self):
        b = dict(next(self._it))
        si = self._stage(self._step)
        if si != self._si:
            self._first = self._step if self._si is not None else stage_start(self._step, self._stage)
            self._si = si
        wp = prog_warmup(self._step, self._stage, self._pgwp, first=self._first)
        b["prog_wp"] = np.full((len(b["label"]),), wp, np.float32)
        self._step += 1
        return b

    def state(self):
        return {**self._it.state(), "step": self._step}

    def restore(self, s):
        self._step = int(s.get("step", 0))
        self._si = None
        self._it.restore({k: v for k, v in s.items() if k != "step"})


def run_cli(argv: list[str]) -> None:
    from varjax.train.cli_flags import run_with_config

    run_with_config(argv, train, "VAR transformer")
