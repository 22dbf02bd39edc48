"""Loss terms and training statistics shared by the tasks: cross-entropy and hit rates (VAR), reconstruction,
GAN and adaptive weight (tokenizers), EMA and PSNR.

Letters: B batch, L tokens, V vocabulary; images NHWC.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

# ---------------------------------------------------------------------------------------------- token losses


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


# ------------------------------------------------------------------------------------- reconstruction and GAN


def reconstruction_losses(recon_BHW3, img_BHW3) -> tuple[jax.Array, jax.Array]:
    """(L1, L2): mean absolute and mean squared error over every pixel and channel."""
    return jnp.mean(jnp.abs(recon_BHW3 - img_BHW3)), jnp.mean(jnp.square(recon_BHW3 - img_BHW3))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))), a scalar."""
    loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake))
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Non-saturating BCE: 0.5 * (mean(softplus(-real)) + mean(softplus(fake))), a scalar."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def get_d_loss(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The discriminator loss called `name` ('hinge' or 'vanilla')."""
    if name not in D_LOSSES:
        raise ValueError(f"Discriminator loss '{name}' is unknown; expected one of {sorted(D_LOSSES)}.")
    return D_LOSSES[name]


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """Generator's adversarial loss -mean(logits_fake), a scalar (taming uses it with both D losses)."""
    return -jnp.mean(logits_fake)


def adopt_weight(weight, step, threshold, value=0.0):
    """`value` while `step < threshold` (the discriminator has not started), else `weight`.

    Works with a traced `step` inside jit, returning a scalar array in that case.
    """
    return jnp.where(step < threshold, value, weight)


def adaptive_weight(nll_grads, g_grads, max_weight: float = 1e4, eps: float = 1e-4) -> jax.Array:
    """VQGAN's balance between reconstruction and adversarial terms: ||g_nll|| / (||g_g|| + eps).

    Args:
      nll_grads: gradient of the reconstruction (+ perceptual) loss w.r.t. the decoder's last layer weight;
        an array or a pytree of arrays (the norm is then taken over all leaves).
      g_grads: gradient of `generator_loss` w.r.t. the same weight, same structure.
      max_weight: upper clip (taming: 1e4); the lower clip is 0.

    Returns:
      Scalar float32 weight, gradient-stopped. Taming multiplies it by `disc_weight`; the caller does that.
    """
    ratio = optax.tree.norm(nll_grads) / (optax.tree.norm(g_grads) + eps)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight).astype(jnp.float32))


# ------------------------------------------------------------------------------------------------- EMA, PSNR


def ema_update(ema, params, decay: float):
    """``decay * ema + (1 - decay) * params`` leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def psnr(x_BHW3, y_BHW3):
    """Per-image PSNR (dB) of two image batches in [0, 1]: (B,). Works on numpy and JAX arrays."""
    mse = jnp.mean(jnp.square(jnp.asarray(x_BHW3, jnp.float32) - jnp.asarray(y_BHW3, jnp.float32)), axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))
