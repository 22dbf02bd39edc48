"""VAR's sampler: KV-cached class-conditional sampling over scales, and zero-shot editing (VAR paper section 5).

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

from varjax.core.xla_flags import conv_compiler_options
from varjax.models.resize import resize_area, resize_bilinear
from varjax.models.var import VAR, VARConfig
from varjax.models.vqvae import VQVAE, VQVAEConfig


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    cfg: float = 1.5  # guidance at the last scale; ramps linearly from 0 at the first
    top_k: int = 900  # 0 = no top-k
    top_p: float = 0.96  # 0 = no top-p
    more_smooth: bool = False  # Gumbel-softmax smoothing of the codes (visualisation only, as in the reference)
    dtype: str = "float32"  # compute dtype of the transformer blocks and the decoder: float32, bfloat16, float16
    attention: str | None = None  # VARConfig.attention for sampling (None keeps the model's)


DTYPES = ("float32", "bfloat16", "float16")


def top_k_top_p(logits_BlV: jax.Array, top_k: int, top_p: float) -> tuple[jax.Array, jax.Array]:
    """The tokens the reference's ``sample_with_top_k_top_p_`` keeps, from one ``lax.top_k``.

    Returns ``(vals_BlK, idx_BlK)``: the K = top_k largest logits in descending order with their token ids,
    removed ones set to -inf. top-p then works inside those K survivors only (the reference's full-vocabulary
    ascending sort sees the others as -inf, i.e. probability 0): in ascending order the cumulative probability
    of the survivors is computed and tokens with cumulative probability <= 1 - top_p are removed, never the
    most likely one. Ties with the K-th logit beyond the K returned are dropped (the reference keeps them);
    with continuous logits that does not happen.
    """
    V = logits_BlV.shape[-1]
    K = top_k if 0 < top_k < V else V
    vals, idx = jax.lax.top_k(logits_BlV, K)
    if top_p > 0:
        asc = vals[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
        remove = (cum <= 1 - top_p).at[..., -1].set(False)[..., ::-1]
        vals = jnp.where(remove, -jnp.inf, vals)
    return vals, idx


def top_k_top_p_filter(logits_BlV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """The logits with what the reference's ``sample_with_top_k_top_p_`` removes set to -inf (its in-place
    masking): every logit below the smallest survivor of :func:`top_k_top_p` is removed."""
    vals, _ = top_k_top_p(logits_BlV, top_k, top_p)
    smallest = jnp.min(jnp.where(jnp.isfinite(vals), vals, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BlV < smallest, -jnp.inf, logits_BlV)


def gumbel_smooth_weights(filtered_BlV: jax.Array, gumbel_BlV: jax.Array, ratio: float) -> jax.Array:
    """The reference's ``more_smooth`` code weights: softmax((logits * (1 + r) + g) / tau) over the vocabulary.

    ``filtered_BlV`` are the top-k/top-p-filtered logits (the reference smooths the logits its sampler masked
    in place, so removed tokens get weight 0); ``gumbel_BlV`` is standard Gumbel noise.
    """
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)  # annealed as in MaskGIT
    return jax.nn.softmax((filtered_BlV * (1 + ratio) + gumbel_BlV) / tau, axis=-1)


def sample_codes(rng, logits_BlV, opts: SampleOptions, ratio: float, codebook_VC):
    """One scale's sampling: ``(idx_Bl int32, h_BlC codes)`` from the guided logits.

    The token is drawn among the top-k/top-p survivors; the codes are the codebook rows of the tokens, or with
    ``more_smooth`` the Gumbel-smoothed mixture of codes over the filtered logits (the tokens stay sampled).
    """
    k_sample, k_gumbel = jax.random.split(rng)
    vals_BlK, idx_BlK = top_k_top_p(logits_BlV, opts.top_k, opts.top_p)
    pick_Bl = jax.random.categorical(k_sample, vals_BlK, axis=-1)
    idx_Bl = jnp.take_along_axis(idx_BlK, pick_Bl[..., None], axis=-1)[..., 0].astype(jnp.int32)
    if not opts.more_smooth:
        return idx_Bl, jnp.take(codebook_VC, idx_Bl, axis=0)
    filtered = top_k_top_p_filter(logits_BlV, opts.top_k, opts.top_p)
    g = jax.random.gumbel(k_gumbel, logits_BlV.shape, logits_BlV.dtype)
    y = gumbel_smooth_weights(filtered, g, ratio)
    return idx_Bl, jnp.einsum("blv,vc->blc", y, codebook_VC)


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


def generate(
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
    dtype = jnp.dtype(opts.dtype)
    vae, var = VQVAE(vae_cfg), VAR(var_cfg, dtype=dtype)
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
        rng, k_scale = jax.random.split(rng)
        idx_Bl, h_BlC = sample_codes(k_scale, logits, opts, ratio, codebook)
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
    if dtype != jnp.float32:  # the decoder computes in the parameters' dtype
        vp = {"params": jax.tree.map(lambda a: a.astype(dtype), vae_params)}
        f_hat = f_hat.astype(dtype)
    img = vae.apply(vp, f_hat, method=VQVAE.fhat_to_img).astype(jnp.float32)
    return (img + 1) * 0.5, jnp.concatenate(tokens, axis=1)


def sampling_config(var_cfg: VARConfig, opts: SampleOptions) -> VARConfig:
    """The model config used for sampling: ``opts.attention`` replaces the config's attention kernel."""
    if opts.dtype not in DTYPES:
        raise ValueError(f"--dtype {opts.dtype!r} is not supported; expected one of {', '.join(DTYPES)}.")
    if opts.attention is None:
        return var_cfg
    if "attention" not in {f.name for f in dataclasses.fields(var_cfg)}:
        raise ValueError(f"--attention {opts.attention!r}: this version of VARConfig has no attention field.")
    return dataclasses.replace(var_cfg, attention=opts.attention)


@functools.lru_cache(maxsize=16)
def make_sampler(vae_cfg: VQVAEConfig, var_cfg: VARConfig, opts: SampleOptions):
    """Compiled ``sample(vae_params, var_params, label_B, rng[, gt_tokens_BL, keep_hw])``.

    Returns ``(images (B, H, W, 3) float32 in [0, 1], tokens (B, L) int32)``. With ``gt_tokens_BL`` (the input
    image's tokens) and ``keep_hw`` (B, h, w) in [0, 1] it edits (VAR section 5): tokens where ``keep_hw`` is 1
    are teacher-forced at every scale and the rest generated: in-painting (keep outside a hole), out-painting
    (keep inside) and class-conditional editing (a new label for the generated region).
    """
    # the decode's convolutions are most of a call's time on CPU: their kernels (varjax.xla_flags)
    return jax.jit(functools.partial(generate, vae_cfg, sampling_config(var_cfg, opts), opts),
                   compiler_options=conv_compiler_options())


def mask_to_keep(mask_HW: np.ndarray, hw: int) -> np.ndarray:
    """Pixel mask (H, W), nonzero/True = region to generate -> (hw, hw) keep map in [0, 1] (area-averaged)."""
    gen = jnp.asarray(mask_HW, jnp.float32)[None, :, :, None]
    gen = resize_area(gen, hw)[0, :, :, 0]
    return np.asarray(1.0 - gen)


EXTRA = "tokens"  # what a sample carries besides its image: (L,) int32 tokens of all scales, coarse to fine


def options(defaults: dict, *, cfg: float | None = None, top_k: int | None = None, top_p: float | None = None,
            more_smooth: bool = False, dtype: str = "float32", attention: str | None = None, **unused) -> SampleOptions:
    """Sampling options from command-line values (None: the model directory's default, else the release's)."""
    del unused
    base = SampleOptions(**{k: v for k, v in defaults.items() if k in SampleOptions.__dataclass_fields__})
    return dataclasses.replace(
        base,
        cfg=base.cfg if cfg is None else cfg,
        top_k=base.top_k if top_k is None else top_k,
        top_p=base.top_p if top_p is None else top_p,
        more_smooth=more_smooth,
        dtype=dtype,
        attention=attention,
    )


def describe(opts: SampleOptions) -> dict:
    return {"cfg": opts.cfg, "top_k": opts.top_k, "top_p": opts.top_p}
