"""KV-cached class-conditional sampling over scales, and zero-shot editing (VAR paper section 5).

The loop over scales is unrolled inside one ``jax.jit``: every scale has static shapes (its token count and
the keys of all coarser scales), so the whole generation is a single compiled program with no Python per
token or per scale at run time.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from varjax.models.var import VAR, VARConfig
from varjax.models.vqvae import VQVAE, VQVAEConfig
from varjax.resize import resize_area, resize_bilinear


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    cfg: float = 1.5  # guidance at the last scale; ramps linearly from 0 at the first
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False  # Gumbel-softmax smoothing of the codes (visualisation only, as in the reference)
    dtype: str = "float32"  # compute dtype of the transformer blocks (e.g. "bfloat16")


def top_k_top_p_filter(logits_BlV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets to -inf what the reference's ``sample_with_top_k_top_p_`` removes.

    top-k keeps logits >= the k-th largest; top-p removes the smallest-probability tokens whose cumulative
    probability (ascending) is <= 1 - top_p, never the most likely one.
    """
    V = logits_BlV.shape[-1]
    if top_k > 0:
        kth = jax.lax.top_k(logits_BlV, min(top_k, V))[0][..., -1:]
        logits_BlV = jnp.where(logits_BlV < kth, -jnp.inf, logits_BlV)
    if top_p > 0:
        order = jnp.argsort(logits_BlV, axis=-1)  # ascending
        sorted_logits = jnp.take_along_axis(logits_BlV, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = (cum <= 1 - top_p).at[..., -1].set(False)
        inverse = jnp.argsort(order, axis=-1)
        remove = jnp.take_along_axis(remove_sorted, inverse, axis=-1)
        logits_BlV = jnp.where(remove, -jnp.inf, logits_BlV)
    return logits_BlV


def gumbel_smooth_codes(rng, logits_BlV, ratio: float, codebook_VC) -> jax.Array:
    """The reference's ``more_smooth`` codes: softmax((logits * (1 + r) + gumbel) / tau) @ codebook."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)  # annealed as in MaskGIT
    g = jax.random.gumbel(rng, logits_BlV.shape, logits_BlV.dtype)
    y = jax.nn.softmax((logits_BlV * (1 + ratio) + g) / tau, axis=-1)
    return jnp.einsum("blv,vc->blc", y, codebook_VC)


def keep_masks(keep_hw: jax.Array, patch_nums) -> list[jax.Array]:
    """Per-scale (B, pn*pn) bool masks of tokens forced to the ground truth when editing.

    ``keep_hw`` (B, h, w) in [0, 1] is at the last scale's resolution (1 = keep the input image). Each scale
    takes a bilinear resize thresholded at 0.5, and scales of at most 3 tokens are always kept, as in the
    reference's zero-shot editing.
    """
    out = []
    for pn in patch_nums:
        m = resize_bilinear(keep_hw[..., None].astype(jnp.float32), pn)[..., 0] > 0.5
        if pn * pn <= 3:
            m = jnp.ones_like(m)
        out.append(m.reshape(m.shape[0], pn * pn))
    return out


def _generate(
    vae_cfg: VQVAEConfig,
    var_cfg: VARConfig,
    opts: SampleOptions,
    vae_params,
    var_params,
    label_B,
    rng,
    gt_tokens_BL=None,
    keep_hw=None,
):
    vae, var = VQVAE(vae_cfg), VAR(var_cfg, dtype=jnp.dtype(opts.dtype))
    vp, tp = {"params": vae_params}, {"params": var_params}
    pns = var_cfg.patch_nums
    S, B, Cv = len(pns), label_B.shape[0], var_cfg.Cvae
    codebook = vae.apply(vp, method=VQVAE.codebook)
    cond_BD = var.apply(
        tp, jnp.concatenate([label_B, jnp.full_like(label_B, var_cfg.num_classes)]), method=VAR.embed_class
    )
    x = var.apply(tp, cond_BD, method=VAR.first_tokens)
    f_hat = jnp.zeros((B, pns[-1], pns[-1], Cv), jnp.float32)
    keeps = keep_masks(keep_hw, pns) if keep_hw is not None else None
    caches, tokens, cur = None, [], 0
    for si, pn in enumerate(pns):
        ratio = si / (S - 1) if S > 1 else 1.0
        logits, caches = var.apply(tp, x, cond_BD, caches, method=VAR.step)
        t = opts.cfg * ratio
        logits = (1 + t) * logits[:B] - t * logits[B:]
        rng, k_sample, k_gumbel = jax.random.split(rng, 3)
        idx_Bl = jax.random.categorical(k_sample, top_k_top_p_filter(logits, opts.top_k, opts.top_p), axis=-1)
        if opts.more_smooth:
            h_BlC = gumbel_smooth_codes(k_gumbel, logits, ratio, codebook)
        else:
            h_BlC = jnp.take(codebook, idx_Bl, axis=0)
        if keeps is not None:
            gt = gt_tokens_BL[:, cur : cur + pn * pn]
            idx_Bl = jnp.where(keeps[si], gt, idx_Bl)
            h_BlC = jnp.where(keeps[si][..., None], jnp.take(codebook, gt, axis=0), h_BlC)
        tokens.append(idx_Bl.astype(jnp.int32))
        f_hat, nxt = vae.apply(vp, si, f_hat, h_BlC.reshape(B, pn, pn, Cv), method=VQVAE.next_ar_input)
        cur += pn * pn
        if si != S - 1:
            x = var.apply(tp, nxt.reshape(B, -1, Cv), cur, method=VAR.embed_next)
            x = jnp.concatenate([x, x], axis=0)  # conditional and unconditional halves for CFG
    img = vae.apply(vp, f_hat, method=VQVAE.fhat_to_img)
    return (img + 1) * 0.5, jnp.concatenate(tokens, axis=1)


@functools.lru_cache(maxsize=16)
def make_sampler(vae_cfg: VQVAEConfig, var_cfg: VARConfig, opts: SampleOptions):
    """Compiled ``sample(vae_params, var_params, label_B, rng) -> (images (B,H,W,3) in [0,1], tokens (B,L))``."""
    return jax.jit(functools.partial(_generate, vae_cfg, var_cfg, opts))


@functools.lru_cache(maxsize=16)
def make_editor(vae_cfg: VQVAEConfig, var_cfg: VARConfig, opts: SampleOptions):
    """Compiled ``edit(vae_params, var_params, label_B, rng, gt_tokens_BL, keep_hw)``.

    Tokens where ``keep_hw`` (B, h, w) is 1 are teacher-forced to ``gt_tokens_BL`` (the input image's tokens)
    at every scale; the rest are generated: in-painting (keep outside a hole), out-painting (keep inside) and
    class-conditional editing (a new label for the generated region).
    """
    return jax.jit(functools.partial(_generate, vae_cfg, var_cfg, opts))


def mask_to_keep(mask_HW: np.ndarray, hw: int) -> np.ndarray:
    """Pixel mask (H, W), nonzero/True = region to generate -> (hw, hw) keep map in [0, 1] (area-averaged)."""
    gen = jnp.asarray(mask_HW, jnp.float32)[None, :, :, None]
    gen = resize_area(gen, hw)[0, :, :, 0]
    return np.asarray(1.0 - gen)
