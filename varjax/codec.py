"""Jitted tokenizer entry points shared by the commands: images -> tokens, images -> reconstructions, PSNR.

Images here are NHWC in [-1, 1] (the models' range); callers holding [0, 1] images convert at the edge.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from varjax.models.vqvae import VQVAE, VQVAEConfig
from varjax.xla_flags import conv_compiler_options


@functools.lru_cache(maxsize=8)
def tokenizer_fns(vae_cfg: VQVAEConfig):
    """``(tokens(params, img) -> (B, L) int32, recon(params, img) -> (B, H, W, 3) in [-1, 1])``, both jitted."""
    model = VQVAE(vae_cfg)
    jit = functools.partial(jax.jit, compiler_options=conv_compiler_options())

    @jit
    def tokens(params, img_BHW3):
        return jnp.concatenate(model.apply({"params": params}, img_BHW3, method=VQVAE.img_to_idx), axis=1)

    @jit
    def recon(params, img_BHW3):
        return model.apply({"params": params}, img_BHW3, method=VQVAE.img_to_recon)

    return tokens, recon


def batched(fn, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over ``x`` in chunks of ``batch_size`` along axis 0, concatenated on the host."""
    return np.concatenate([np.asarray(fn(x[i : i + batch_size])) for i in range(0, len(x), batch_size)], axis=0)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of images in [0, 1]: (B,)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))
