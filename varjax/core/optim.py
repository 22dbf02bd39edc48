"""Optimiser recipe of VAR: AdamW(0.9, 0.95), warm-up + annealed lr, cosine weight decay, clipping.

Everything here is counted in *iterations*: one iteration consumes one global batch. With gradient
accumulation (``ac > 1``) the optimiser applies an update every ``ac`` iterations, and the lr/wd used for
that update are the schedule values at the iteration that completes the accumulation, exactly as the
reference loop (which calls its scheduler every iteration and steps the optimiser every ``ac``-th).

Config fields read by :func:`make_optimizer` (``config.opt``; defaults in ``configs/common.py``):

* ``b1``, ``b2``, ``eps``: AdamW moments (reference: 0.9, 0.95, 1e-8).
* ``sche``: lr schedule name, one of 'cos', 'lin', 'lin0', 'lin00', 'lin<float>', 'exp'; None (a generator's
  default) follows the official rule (:func:`schedule_name`): 'lin0', or 'lin<pg>' with progressive training.
* ``wp0``: lr ratio at the first warm-up iteration; ``wpe``: lr ratio at the end of training.
* ``warmup_steps`` / ``warmup_epochs`` / ``warmup_examples`` / ``warmup_fraction``: exactly one set (turned
  into steps once, by ``varjax.config.resolve``; the optimizer receives the step count).
* ``twd`` / ``twde``: weight decay at the start / end (cosine); ``twde`` of 0 or None means ``twd``.
* ``tclip``: global-norm gradient clip (<= 0 disables).
* ``ac``: gradient accumulation iterations per update.
* ``nowd_keys``: parameter-path substrings that never get weight decay (besides biases and 1-D params).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax.core import meta

# Parameter-name substrings excluded from weight decay by the reference VAR trainer.
REFERENCE_NOWD_KEYS = (
    "cls_token", "start_token", "task_token", "cfg_uncond",
    "pos_embed", "pos_1LC", "pos_start", "start_pos", "lvl_embed",
    "gamma", "beta",
    "ada_gss", "moe_bias",
    "scale_mul",
)

_KNOWN_SCHEDULES = "'cos', 'lin', 'lin0', 'lin00', 'lin<float>' (e.g. 'lin0.5'), 'exp'"


def peak_lr(tblr: float, global_batch: int, ac: int = 1) -> float:
    """Peak learning rate ``ac * tblr * global_batch / 256`` (reference linear scaling rule).

    Args:
      tblr: base learning rate for a batch of 256 images.
      global_batch: images per iteration over all devices/hosts (one micro-batch when ``ac > 1``).
      ac: gradient accumulation iterations per update.
    """
    return ac * tblr * global_batch / 256


def _safe_div(num, den: float):
    """``num / den`` for a static denominator; a zero denominator gives 0 instead of inf/nan.

    The zero-denominator case only arises for degenerate schedules (e.g. a 1-iteration run) where the
    reference would divide by zero; the branch it guards is then never selected.
    """
    return num / den if den != 0 else jnp.zeros_like(num)


def _decay_fn(sche: str, wpe: float) -> Callable[[jax.Array], jax.Array]:
    """Post-warm-up lr ratio as a function of ``pasd`` (fraction of the post-warm-up phase, 0 -> 1).

    Raises:
      ValueError: for an unknown schedule name.
    """
    if sche == "cos":
        return lambda pasd: wpe + (1 - wpe) * (0.5 + 0.5 * jnp.cos(math.pi * pasd))

    def flat_then_linear(flat_frac: float):
        # Constant 1 for the first `flat_frac` of the phase, then linear from 1 down to wpe.
        def fn(pasd):
            rest = 1 - pasd
            return jnp.where(pasd < flat_frac, 1.0, wpe + (1 - wpe) * _safe_div(rest, 1 - flat_frac))
        return fn

    if sche == "lin":
        return flat_then_linear(0.15)
    if sche == "lin0":
        return flat_then_linear(0.05)
    if sche == "lin00":
        return lambda pasd: wpe + (1 - wpe) * (1 - pasd)
    if sche == "exp":
        flat = 0.15

        def exp_fn(pasd):
            expo = _safe_div(pasd - flat, 1 - flat) * math.log(wpe)
            return jnp.where(pasd < flat, 1.0, jnp.exp(expo))
        return exp_fn
    if sche.startswith("lin"):
        # 'lin<T>' (progressive training): linear from 1 to `mid` over the first T of the phase, then
        # linear from `mid` to wpe; `mid` is halfway between 1 and where the 'lin' slope would be at T.
        try:
            knee = float(sche[3:])
        except ValueError:
            knee = None
        if knee is not None:
            max_rest = 1 - knee
            mid = (1 + wpe + (1 - wpe) * max_rest) / 2

            def lin_knee(pasd):
                rest = 1 - pasd
                return jnp.where(
                    pasd < knee,
                    1 + (mid - 1) * _safe_div(pasd, knee),
                    wpe + (mid - wpe) * _safe_div(rest, max_rest),
                )
            return lin_knee
    raise ValueError(
        f"Unknown learning-rate schedule sche={sche!r} (config field `sche` of the optimiser config); "
        f"expected one of {_KNOWN_SCHEDULES}."
    )


def schedule_name(sche: str | None, pg: float = 0.0) -> str:
    """The lr schedule a run uses: ``sche`` when set; else the official trainer's rule (``utils/arg_util.py``):
    with progressive training (``pg > 0``) the linear decay ends its first leg at the end of the progression,
    ``f'lin{pg:g}'``, otherwise 'lin0'."""
    if sche:
        return str(sche)
    return f"lin{pg:g}" if pg > 0 else "lin0"


def lr_factor(step, *, sche: str, wp_it: float, max_it: int, wp0: float, wpe: float) -> jax.Array:
    """Learning-rate multiplier (of the peak lr) at iteration ``step``, as the reference ``lr_wd_annealing``.

    Linear warm-up from ``wp0`` to 1 over ``round(wp_it)`` iterations, then the schedule ``sche`` over the
    remaining ``max_it - 1 - wp_it`` iterations, ending at ``wpe``.

    Args:
      step: 0-based iteration, Python int or (traced) integer array of any shape.
      sche: schedule name (static), see module docstring.
      wp_it: warm-up iterations (rounded like the reference).
      max_it: total iterations of the run.
      wp0: lr ratio at iteration 0; wpe: lr ratio at iteration ``max_it - 1``.

    Returns:
      float32 array with the shape of ``step``.
    """
    decay = _decay_fn(sche, wpe)
    wp_it = round(wp_it)
    step = jnp.asarray(step, jnp.float32)
    warm = wp0 + (1 - wp0) * _safe_div(step, wp_it)
    pasd = _safe_div(step - wp_it, max_it - 1 - wp_it)
    return jnp.where(step < wp_it, warm, decay(pasd)).astype(jnp.float32)


def wd_value(step, *, twd: float, twde: float | None, max_it: int) -> jax.Array:
    """Weight decay at iteration ``step``: half-cosine from ``twd`` (step 0) to ``twde`` (step max_it-1).

    ``twde`` of 0 or None falls back to ``twd`` (constant decay), like the reference. Returns float32.
    """
    twde = twde or twd
    pasd = _safe_div(jnp.asarray(step, jnp.float32), max_it - 1)
    return (twde + (twd - twde) * (0.5 + 0.5 * jnp.cos(math.pi * pasd))).astype(jnp.float32)


def _path_name(path: Sequence[Any]) -> str:
    """'/'-joined parameter name from a jax key path, e.g. 'blocks_0/attn/proj/kernel'."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def wd_mask(params: Any, nowd_keys: Sequence[str] = ()) -> Any:
    """Boolean tree, True where weight decay applies (reference ``filter_params``).

    A parameter is decayed iff it has ``ndim > 1``, its name does not end in 'bias', and no substring of
    ``nowd_keys`` occurs in its '/'-joined path. Boxed (``nn.Partitioned``) leaves are judged by their
    value and get a single bool in the box's place.
    """
    def decide(path, leaf):
        value = leaf.unbox() if isinstance(leaf, meta.AxisMetadata) else leaf
        name = _path_name(path)
        ndim = len(getattr(value, "shape", ()))
        return bool(ndim > 1 and not name.endswith("bias") and not any(k in name for k in nowd_keys))

    return jax.tree_util.tree_map_with_path(
        decide, params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata)
    )


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """Global-norm clipping with torch's ``clip_grad_norm_`` formula: ``g * min(1, max / (norm + 1e-6))``."""

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def decoupled_weight_decay(weight_decay, nowd_keys: Sequence[str] = ()) -> optax.GradientTransformation:
    """Adds ``weight_decay * p`` to the update of every parameter selected by :func:`wd_mask`.

    Placed after the Adam scaling and before ``-lr`` scaling this gives torch AdamW exactly:
    ``p <- p * (1 - lr * wd) - lr * adam_update``. The update needs unboxed ``params``.
    """

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "decoupled_weight_decay needs `params`: call optimizer.update(grads, opt_state, params)."
            )
        mask = wd_mask(params, nowd_keys)
        updates = jax.tree.map(
            lambda u, p, m: (u + weight_decay * p).astype(u.dtype) if m else u, updates, params, mask
        )
        return updates, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


class Schedules(NamedTuple):
    """Per-update hyper-parameters. ``update`` is the 0-based count of applied optimiser updates."""

    lr: Callable[[jax.Array], jax.Array]
    wd: Callable[[jax.Array], jax.Array]


def make_schedules(cfg_opt, *, peak_lr: float, total_steps: int, warmup_steps: int,
                   sche: str | None = None) -> Schedules:
    """lr and wd as functions of the update count (see module docstring for the fields of ``cfg_opt``).

    Args:
      cfg_opt: optimiser ConfigDict.
      peak_lr: lr at the end of warm-up (see :func:`peak_lr`).
      total_steps: iterations of the whole run (reference ``max_it``).
      warmup_steps: warm-up iterations (reference ``wp_it``).
      sche: the schedule's name, resolved (``Plan.lr_schedule``); None: ``schedule_name(cfg_opt.sche)``.
    """
    ac = int(cfg_opt.ac)
    # Read the fields once so later edits of the config cannot change a built optimiser.
    lr_kw = dict(sche=sche or schedule_name(cfg_opt.sche), wp_it=warmup_steps, max_it=total_steps,
                 wp0=float(cfg_opt.wp0), wpe=float(cfg_opt.wpe))
    wd_kw = dict(twd=float(cfg_opt.twd), twde=cfg_opt.twde, max_it=total_steps)
    _decay_fn(lr_kw["sche"], lr_kw["wpe"])  # fail early on a bad schedule name

    def iteration(update):
        # Iteration that completes accumulation number `update`: the reference's g_it at its stepping.
        return update * ac + ac - 1

    def lr(update):
        return peak_lr * lr_factor(iteration(update), **lr_kw)

    def wd(update):
        return wd_value(iteration(update), **wd_kw)

    return Schedules(lr=lr, wd=wd)


def make_optimizer(cfg_opt, *, peak_lr: float, total_steps: int, warmup_steps: int,
                   sche: str | None = None) -> optax.GradientTransformation:
    """AdamW of the reference: clip -> Adam -> decoupled wd (masked) -> -lr, with optional accumulation.

    The lr and wd are injected hyper-parameters, so the values used by the latest update can be read
    back from the state with :func:`current_hparams`. With ``cfg_opt.ac > 1`` the transform is an
    ``optax.MultiSteps`` that averages ``ac`` gradients (the reference scales each micro-loss by 1/ac and
    sums) and updates on every ``ac``-th call. Arguments as in :func:`make_schedules`.
    """
    schedules = make_schedules(cfg_opt, peak_lr=peak_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                               sche=sche)
    tclip = float(cfg_opt.tclip or 0.0)
    nowd_keys = tuple(cfg_opt.nowd_keys or ())

    def adamw(learning_rate, weight_decay):
        parts = []
        if tclip > 0:
            parts.append(clip_by_global_norm_torch(tclip))
        parts += [
            optax.scale_by_adam(b1=cfg_opt.b1, b2=cfg_opt.b2, eps=cfg_opt.eps),
            decoupled_weight_decay(weight_decay, nowd_keys),
            optax.scale_by_learning_rate(learning_rate),
        ]
        return optax.chain(*parts)

    tx = optax.inject_hyperparams(adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=schedules.lr, weight_decay=schedules.wd
    )
    if int(cfg_opt.ac) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(cfg_opt.ac)).gradient_transformation()
    return tx


def current_hparams(opt_state) -> dict[str, jax.Array]:
    """``{'lr': ..., 'wd': ...}`` used by the latest applied update (initial values before any update).

    Works on the state of :func:`make_optimizer`, with or without gradient accumulation.
    """
    state = opt_state
    if isinstance(state, optax.MultiStepsState):
        state = state.inner_opt_state
    hparams = getattr(state, "hyperparams", None)
    if hparams is None:
        raise ValueError(
            f"current_hparams expects the state of varjax.core.optim.make_optimizer; got {type(opt_state)}."
        )
    return {"lr": hparams["learning_rate"], "wd": hparams["weight_decay"]}


def current_lr(opt_state) -> jax.Array:
    """Learning rate used by the latest applied update (see :func:`current_hparams`)."""
    return current_hparams(opt_state)["lr"]


def for_plan(plan) -> optax.GradientTransformation:
    """The optimizer of a resolved run (``varjax.config.Plan``): ``config.opt`` with the plan's peak learning rate,
    schedule, total and warm-up steps."""
    return make_optimizer(plan.config.opt, peak_lr=plan.peak_lr, total_steps=plan.total_steps,
                          warmup_steps=plan.warmup_steps, sche=plan.lr_schedule)
