"""Continuous tokenizer of E-CAR: a KL-regularised autoencoder (Flax linen, images NHWC in [-1, 1]).

The encoder and decoder are VAR's VQ-VAE building blocks (``varjax.models.vqvae.Encoder``/``Decoder``); the
encoder emits ``2 * z_channels`` maps, the mean and log-variance of a diagonal Gaussian posterior, and the
decoder reads a ``z_channels`` latent. No quantizer: the latent is the token map. The KL term is the usual
``0.5 * sum(mu^2 + var - 1 - logvar)`` per latent element, averaged over elements (so ``kl_weight`` does
not depend on the latent size).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from varjax.models.dict_config import DictConfig
from varjax.models.vqvae import Decoder, Encoder, VQVAEConfig


@dataclasses.dataclass(frozen=True)
class KLAEConfig(DictConfig):
    """Hyper-parameters of the continuous tokenizer. Downsampling is ``2 ** (len(ch_mult) - 1)``."""

    z_channels: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True
    using_mid_sa: bool = True
    dropout: float = 0.0
    num_groups: int = 32
    image_size: int = 256

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    def blocks_cfg(self, z_channels: int) -> VQVAEConfig:
        """The VQ-VAE config whose Encoder/Decoder have this layout and ``z_channels`` latent maps."""
        return VQVAEConfig(
            z_channels=z_channels,
            ch=self.ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            using_sa=self.using_sa,
            using_mid_sa=self.using_mid_sa,
            dropout=self.dropout,
            num_groups=self.num_groups,
        )


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element, averaged over everything: a scalar."""
    return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


class KLAE(nn.Module):
    """Call methods with ``model.apply({'params': p}, x, method=KLAE.<name>)``."""

    cfg: KLAEConfig

    def setup(self):
        c = self.cfg
        self.encoder = Encoder(c.blocks_cfg(2 * c.z_channels))
        self.decoder = Decoder(c.blocks_cfg(c.z_channels))

    def __call__(self, img_BHW3: jax.Array, train: bool = False, sample: bool = True, decoder_noise: float = 0.0):
        """Training forward: ``(recon_BHW3, kl, mean_BhwC)``; the latent is sampled from the posterior when
        ``sample`` (needs the 'noise' rng), else the mean.

        ``decoder_noise`` > 0 adds Gaussian noise of standard deviation ``u * decoder_noise * std(mean)`` per
        example (u uniform in [0, 1], std over the batch and held constant for the gradient). With a small KL
        weight the posterior's own noise is about 1% of the latent's spread, so the decoder never sees a latent
        a little off the encoder's; a generator's latents are, and it would decode their errors as texture and
        colour. Scaling by the latent's spread leaves the encoder no way to shrink the noise by growing the
        latent.
        """
        mean, logvar = self.posterior(img_BHW3, train)
        z = mean
        if sample:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(self.make_rng("noise"), mean.shape)
        if decoder_noise > 0:
            r_level, r_noise = jax.random.split(self.make_rng("noise"))
            level_B = jax.random.uniform(r_level, (mean.shape[0], 1, 1, 1)) * decoder_noise
            spread = jax.lax.stop_gradient(jnp.std(mean))
            z = z + level_B * spread * jax.random.normal(r_noise, mean.shape)
        return self.decode(z, train), kl_divergence(mean, logvar), mean

    def posterior(self, img_BHW3: jax.Array, train: bool = False):
        """(mean, logvar), each (B, h, w, z_channels); logvar clipped to [-30, 20] as in latent diffusion."""
        h = self.encoder(img_BHW3, train)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, img_BHW3: jax.Array) -> jax.Array:
        """Posterior mean (B, h, w, z_channels): the deterministic latent of an image."""
        return self.posterior(img_BHW3)[0]

    def decode(self, z_BhwC: jax.Array, train: bool = False) -> jax.Array:
        """Latent -> image (B, H, W, 3), not clamped."""
        return self.decoder(z_BhwC, train)

    def img_to_recon(self, img_BHW3: jax.Array) -> jax.Array:
        return jnp.clip(self.decode(self.encode(img_BHW3)), -1, 1)

    def init_all(self, img_BHW3: jax.Array):
        return self(img_BHW3, sample=False)
