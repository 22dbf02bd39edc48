"""Multistage flow matching of E-CAR: time windows, re-noising between stages and training targets.

Notation: ``x1`` is the clean (normalised) latent at the finest resolution r_{S-1}; time t runs from 0 (pure
noise) to 1 (clean), as in pyramidal flow matching (arXiv 2410.05954). Stage s works at resolution r_s
(``patch_nums``, each an integer multiple of the one before, e.g. 1, 2, 4, 8), with f_s = r_s / r_{s-1},
``D_s(x1)`` the area (mean-pool) downsampling of x1 to r_s and ``U`` nearest upsampling by f_s.

Time windows. Stage s integrates t from a_s to b_s. a_0 = 0 and b_{S-1} = 1: the first stage starts from
pure noise, only the last one ends clean. The starts a_s default to s / S; each end follows from the next
start by the re-noising rule below: b_s = f a_{s+1} / (1 + (f - 1) a_{s+1}) with f = f_{s+1}.

Inside a stage the path is the straight line between its end points, which share one noise map n ~ N(0, I)
at r_s (so the flow is straight, as in pyramidal flow)::

    start_s = a_s U(D_{s-1}(x1)) + (1 - a_s) n        (start_0 = n)
    end_s   = b_s D_s(x1)        + (1 - b_s) n
    x(tau)  = (1 - tau) start_s + tau end_s,  tau in [0, 1],  t = a_s + tau (b_s - a_s)
    target velocity (per unit tau) = end_s - start_s

Re-noising (stage s -> s+1, with f = f_{s+1} and a = a_{s+1}): the end of stage s has mean b_s D_s(x1) and
noise (1 - b_s) n; after nearest upsampling that noise is the same in every f x f block. The next start is::

    start_{s+1} = c U(end_s) + (1 - a) (m - U(mean_f(m))),    m ~ N(0, I) at r_{s+1},  c = (1 + (f - 1) a) / f

c makes the mean a U(D_s(x1)) (since c b_s = a). The upsampled noise has variance (c (1 - b_s))^2 =
((1 - a) / f)^2 per element, fully correlated in a block, i.e. exactly the block-mean component of an
N(0, (1 - a)^2 I) noise; the fresh term adds the missing block-mean-free component, so the start has noise
N(0, (1 - a)^2 I) with no correlation left: exactly the marginal the next stage was trained on. For f = 2 this
is pyramidal flow's rule (rescale by (1 + a) / 2, b = 2a / (1 + a), corrective noise of variance
3 (1 - a)^2 / 4 with -1/3 correlation inside a block).

Clean estimate at a stage end (the "clean" stage input of ``varjax.models.ecar``). Split a map into its
block-mean part P = U mean_f (what the coarser stage fixed) and the rest Q = I - P. On P the path of stage s
is the straight line t D_s(x1) + (1 - t) n (t from a_s to b_s); on Q it rises from 0 to b_s D_s(x1) while
the noise falls from 1 - a_s to 1 - b_s. From the end point x and the velocity v (per unit tau) at tau = 1,
with y = x + (1 - b) v / (b - a)::

    x_hat = P y + (b - a) / (b (1 - a)) Q y        (exactly D_s(x1) for the teacher's velocity)

For stage 0 (a = 0) both parts agree: x_hat = x + (1 - b) v / b, the usual x_t + (1 - t) dx/dt.

Teacher forcing. Training draws the chain the sampler produces under a perfect flow: n_0 fresh, each later
start re-noised from the previous end with the rule above, and n_s read back from that start. The
transformer's input for stage s >= 1 is U(end_{s-1}): what the sampler holds when stage s begins.

Shapes: B batch, r side of a stage's map, C latent channels, S stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_patch_nums(patch_nums: Sequence[int], where: str = "patch_nums") -> None:
    bad = [(a, b) for a, b in zip(patch_nums, patch_nums[1:], strict=False) if b <= a or b % a]
    if not patch_nums or bad:
        raise ValueError(
            f"{where}={tuple(patch_nums)}: the stages of the multistage flow need increasing resolutions, each an "
            f"integer multiple of the previous one (e.g. (1, 2, 4, 8)); offending pairs: {bad}."
        )


def default_starts(num_stages: int) -> tuple[float, ...]:
    """a_s = s / S."""
    return tuple(s / num_stages for s in range(num_stages))


def end_from_next_start(a_next: float, f: int) -> float:
    """b_s such that re-noising by factor f lands exactly at noise level a_{s+1}."""
    return f * a_next / (1.0 + (f - 1) * a_next)


def windows(patch_nums: Sequence[int], starts: Sequence[float] | None = None) -> tuple[tuple[float, float], ...]:
    """((a_s, b_s), ...) for every stage."""
    check_patch_nums(patch_nums)
    S = len(patch_nums)
    starts = tuple(starts) if starts else default_starts(S)
    if len(starts) != S or starts[0] != 0.0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError(
            f"stage_starts={starts}: expected {S} increasing times in [0, 1) starting at 0.0 (one per stage)."
        )
    if starts[-1] >= 1.0:
        raise ValueError(f"stage_starts={starts}: the last stage must start before t = 1.")
    ends = [end_from_next_start(starts[s + 1], patch_nums[s + 1] // patch_nums[s]) for s in range(S - 1)] + [1.0]
    return tuple((float(a), float(b)) for a, b in zip(starts, ends, strict=True))


def upsample(x_BrrC: jax.Array, f: int) -> jax.Array:
    """Nearest upsampling by an integer factor."""
    return jnp.repeat(jnp.repeat(x_BrrC, f, axis=1), f, axis=2)


def mean_pool(x_BrrC: jax.Array, f: int) -> jax.Array:
    """Area downsampling by an integer factor."""
    B, H, W, C = x_BrrC.shape
    return x_BrrC.reshape(B, H // f, f, W // f, f, C).mean(axis=(2, 4))


def renoise(end_BrrC: jax.Array, a_next: float, f: int, rng: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Start of the next stage (resolution f times higher) from the end of this one (see module docstring);
    ``temperature`` scales the fresh noise (1 is the exact rule)."""
    c = (1.0 + (f - 1) * a_next) / f
    up = upsample(end_BrrC, f)
    m = temperature * jax.random.normal(rng, up.shape, up.dtype)
    return c * up + (1.0 - a_next) * (m - upsample(mean_pool(m, f), f))


def clean_estimate(x_end_BrrC: jax.Array, v_BrrC: jax.Array, a: float, b: float, f: int) -> jax.Array:
    """Clean map D_s(x1) estimated from the stage's end point and velocity (per unit tau) at tau = 1; ``f``
    is the factor from the previous stage (1 for the first). See the module docstring."""
    y = x_end_BrrC + (1.0 - b) / (b - a) * v_BrrC
    if f == 1 or a == 0.0:
        return y
    p = upsample(mean_pool(y, f), f)
    return p + (b - a) / (b * (1.0 - a)) * (y - p)


def pyramid(x1_BhwC: jax.Array, patch_nums: Sequence[int]) -> list[jax.Array]:
    """[D_s(x1)] for every stage, coarse to fine."""
    top = patch_nums[-1]
    return [mean_pool(x1_BhwC, top // r) if r != top else x1_BhwC for r in patch_nums]


def teacher_chain(x1_BhwC: jax.Array, patch_nums: Sequence[int], wins, rng: jax.Array):
    """(starts, ends): per stage (B, r_s, r_s, C) end points of the sampler's chain for this x1."""
    targets = pyramid(x1_BhwC, patch_nums)
    keys = jax.random.split(rng, len(patch_nums))
    starts, ends = [], []
    for s, (a, b) in enumerate(wins):
        if s == 0:
            start = jax.random.normal(keys[0], targets[0].shape, targets[0].dtype)
            n = start
        else:
            f = patch_nums[s] // patch_nums[s - 1]
            start = renoise(ends[-1], a, f, keys[s])
            n = (start - a * upsample(targets[s - 1], f)) / (1.0 - a)
        starts.append(start)
        ends.append(b * targets[s] + (1.0 - b) * n)
    return starts, ends


def flatten(maps: Sequence[jax.Array]) -> jax.Array:
    """[(B, r_s, r_s, C)] -> (B, L, C), stages concatenated coarse to fine, row-major inside a stage."""
    return jnp.concatenate([m.reshape(m.shape[0], -1, m.shape[-1]) for m in maps], axis=1)


def transformer_inputs(ends: Sequence[jax.Array], patch_nums: Sequence[int]) -> jax.Array:
    """(B, L - r_0^2, C): U(end_{s-1}) at every stage s >= 1."""
    ups = [upsample(ends[s - 1], patch_nums[s] // patch_nums[s - 1]) for s in range(1, len(patch_nums))]
    if not ups:
        return jnp.zeros((ends[0].shape[0], 0, ends[0].shape[-1]), ends[0].dtype)
    return flatten(ups)


def stage_of_token(patch_nums: Sequence[int]) -> np.ndarray:
    """(L,) stage index of every token."""
    return np.concatenate([np.full(r * r, s, np.int32) for s, r in enumerate(patch_nums)])


def training_example(x1_BhwC: jax.Array, patch_nums: Sequence[int], wins, rng: jax.Array) -> dict:
    """Everything one flow-matching step needs, per token (L = sum r_s^2).

    Returns x_in (B, L - r_0^2, C) transformer inputs, x_t (B, L, C) points on the paths, t_BL global times,
    v (B, L, C) target velocities and stage_B (B,) the stage drawn for each example (uniformly); for the
    "clean" stage input also x_in_clean (B, L - r_0^2, C), U(D_{s-1}(x1)) at every stage s >= 1, and x_end
    (B, L, C), every stage's end point.
    """
    r_chain, r_tau, r_stage = jax.random.split(rng, 3)
    starts, ends = teacher_chain(x1_BhwC, patch_nums, wins, r_chain)
    B, S = x1_BhwC.shape[0], len(patch_nums)
    tau_BS = jax.random.uniform(r_tau, (B, S))
    lvl = jnp.asarray(stage_of_token(patch_nums))
    tau_BL = tau_BS[:, lvl]
    a = jnp.asarray([w[0] for w in wins], jnp.float32)[lvl]
    b = jnp.asarray([w[1] for w in wins], jnp.float32)[lvl]
    x0, xe = flatten(starts), flatten(ends)
    return {
        "x_in": transformer_inputs(ends, patch_nums),
        "x_t": (1.0 - tau_BL[..., None]) * x0 + tau_BL[..., None] * xe,
        "t": a[None] + tau_BL * (b - a)[None],
        "v": xe - x0,
        "stage": jax.random.randint(r_stage, (B,), 0, S),
        "x_in_clean": transformer_inputs(pyramid(x1_BhwC, patch_nums), patch_nums),
        "x_end": xe,
    }


def flow_loss(v_pred_BLC: jax.Array, v_BLC: jax.Array, stage_B: jax.Array, patch_nums: Sequence[int],
              all_stages: bool = False) -> jax.Array:
    """MSE of the velocity: mean over the drawn stage's tokens and channels, then over the batch.

    With ``all_stages`` every stage counts, each with weight 1 / S (the per-stage means averaged).
    """
    lvl = jnp.asarray(stage_of_token(patch_nums))
    sizes = jnp.asarray([r * r for r in patch_nums], jnp.float32)
    err_BL = jnp.mean(jnp.square(v_pred_BLC.astype(jnp.float32) - v_BLC), axis=-1)
    if all_stages:
        w_BL = jnp.broadcast_to(1.0 / (sizes[lvl] * len(patch_nums)), err_BL.shape)
    else:
        w_BL = (lvl[None] == stage_B[:, None]) / sizes[lvl][None]
    return jnp.mean(jnp.sum(err_BL * w_BL, axis=1))
