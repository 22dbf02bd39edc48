"""Jitted tokenizer entry points: images -> tokens or latents, images -> reconstructions, a split -> a cache.

Images here are NHWC in [-1, 1] (the models' range) unless a name says ``01``; callers holding [0, 1] images
convert at the edge. The VQ tokenizer gives tokens and reconstructions; the KL autoencoder reconstructions
(through its posterior mean).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from varjax.core.metrics import compiled_flops
from varjax.core.xla_flags import conv_compiler_options
from varjax.data import sources
from varjax.models.kl_ae import KLAE, KLAEConfig
from varjax.models.vqvae import VQVAE, VQVAEConfig


@functools.lru_cache(maxsize=8)
def tokenizer_fns(vae_cfg: VQVAEConfig):
    """``(tokens(params, img) -> (B, L) int32, recon(params, img) -> (B, H, W, 3) in [-1, 1])``, both jitted."""
    model = VQVAE(vae_cfg)
    jit = functools.partial(jax.jit, compiler_options=conv_compiler_options())

    @jit
    def tokens(params, img_BHW3):
        return jnp.concatenate(model.apply({"params": params}, img_BHW3, method=VQVAE.img_to_idx), axis=1)

    return tokens, recon_fn(vae_cfg)


@functools.lru_cache(maxsize=8)
def recon_fn(tok_cfg: VQVAEConfig | KLAEConfig):
    """Jitted ``recon(params, img (B, H, W, 3) in [-1, 1]) -> (B, H, W, 3) in [-1, 1]`` of either tokenizer."""
    module = (KLAE if isinstance(tok_cfg, KLAEConfig) else VQVAE)(tok_cfg)
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method=type(module).img_to_recon),
                   compiler_options=conv_compiler_options())


@functools.lru_cache(maxsize=8)
def encoder_fn(tok_cfg: VQVAEConfig | KLAEConfig):
    """Jitted ``encode(params, img (B, H, W, 3) in [-1, 1])``: the VQ tokenizer's tokens (B, L) int32, or the KL
    autoencoder's posterior mean (B, h, w, C): what a token or latent cache holds."""
    if isinstance(tok_cfg, KLAEConfig):
        module = KLAE(tok_cfg)
        return jax.jit(lambda p, x: module.apply({"params": p}, x, method=KLAE.encode),
                       compiler_options=conv_compiler_options())
    return tokenizer_fns(tok_cfg)[0]


def decoder_gflops_per_image(tok_cfg: VQVAEConfig | KLAEConfig, tok_params, batch: int = 8) -> float:
    """XLA's FLOP count (GFLOPs per image) of the tokenizer's decoder alone: the part of every sampler's cost that
    does not depend on the generator (a latent map (B, H/d, W/d, z_channels) -> image)."""
    module = (KLAE if isinstance(tok_cfg, KLAEConfig) else VQVAE)(tok_cfg)
    side = tok_cfg.image_size // tok_cfg.downsample
    z = jax.ShapeDtypeStruct((batch, side, side, tok_cfg.z_channels), jnp.float32)
    fn = jax.jit(lambda p, z_BhwC: module.apply({"params": p}, z_BhwC, method=type(module).decode),
                 compiler_options=conv_compiler_options())
    return compiled_flops(fn.lower(tok_params, z).compile()) / batch / 1e9


def batched(fn, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over ``x`` in chunks of ``batch_size`` along axis 0, concatenated on the host."""
    return np.concatenate([np.asarray(fn(x[i : i + batch_size])) for i in range(0, len(x), batch_size)], axis=0)


def reconstruct(tok_cfg, tok_params, images01: np.ndarray, batch: int = 64) -> np.ndarray:
    """The tokenizer's reconstructions (n, H, W, 3) in [0, 1] (clipped) of images in [0, 1]."""
    recon = recon_fn(tok_cfg)
    out = batched(lambda x: (recon(tok_params, x * 2 - 1) + 1) / 2, images01, batch)
    return np.clip(np.asarray(out, np.float32), 0.0, 1.0)


def encode_split(tok_cfg, tok_params, data_cfg, split: str, limit: int | None = None, batch: int = 256):
    """(codes, labels (N,)) of the centre crops of ``split`` (its first ``limit``): tokens (N, L) int32 for a VQ
    tokenizer, posterior means (N, h, w, C) float32 for a KL autoencoder (see :func:`encoder_fn`)."""
    enc = encoder_fn(tok_cfg)
    codes, labels, n = [], [], 0
    for b in sources.eval_batches(data_cfg, image_size=tok_cfg.image_size, global_batch_size=batch, process_index=0,
                                  process_count=1, split=split):
        keep = b["mask"] > 0
        codes.append(np.asarray(enc(tok_params, jnp.asarray(b["image"])))[keep])
        labels.append(b["label"][keep])
        n += int(keep.sum())
        if limit and n >= limit:
            break
    out, lab = np.concatenate(codes), np.concatenate(labels)
    return (out[:limit], lab[:limit]) if limit else (out, lab)
