"""PatchGAN discriminator of VQGAN-style tokenizer training (its loss terms are in ``varjax.losses``).

The network follows taming-transformers' `NLayerDiscriminator` (itself pix2pix's PatchGAN): 4x4 convs with
padding 1, `n_layers` of them with stride 2 and two with stride 1, LeakyReLU(0.2), widths
ndf * min(2^n, 8), weights drawn from N(0, 0.02). Taming normalises with BatchNorm; here the default is
GroupNorm, which keeps no running statistics and does not couple examples across data-parallel shards.
`norm='batch'` restores taming's behaviour (call with `train=True` and `mutable=['batch_stats']`).

Output grid and receptive field, for an input of side S (each stride-2 conv maps s -> floor(s / 2), each
stride-1 conv s -> s - 1):

  side(S, n) = floor(S / 2^n) - 2          receptive field(n) = 9 * 2^n - 2 pixels

so n_layers=3 gives 70x70 patches; S=32 yields a 2x2 grid, S=64 6x6, S=256 30x30. The grid is empty
unless S >= 3 * 2^n (24 for n_layers=3); `NLayerDiscriminator` raises for smaller inputs.

Shapes: B batch, H/W image height/width, h/w patch-grid height/width. Images NHWC, any value range
(the trainer feeds [-1, 1]).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("group", "none", "batch")
LEAKY_SLOPE = 0.2


def patch_grid_side(side: int, n_layers: int) -> int:
    """Side of the logit grid for an input side `side` (pixels); <= 0 means the input is too small."""
    for _ in range(n_layers):
        side //= 2
    return side - 2


def receptive_field(n_layers: int) -> int:
    """Side in pixels of the input patch seen by one output logit."""
    field = 1
    for _ in range(2):  # two stride-1 4x4 convs
        field += 3
    for _ in range(n_layers):  # each stride-2 4x4 conv: r_in = (r_out - 1) * 2 + 4
        field = 2 * field + 2
    return field


def _conv_init(key, shape, dtype=jnp.float32):
    """N(0, 0.02), taming's `weights_init` for convs."""
    return 0.02 * jax.random.normal(key, shape, dtype)


def _norm_scale_init(key, shape, dtype=jnp.float32):
    """N(1, 0.02), taming's `weights_init` for the norm layers' scale."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: `(x_BHWC, train=False) -> logits_Bhw1` (float32), one real/fake logit per patch.

    Attributes:
      ndf: width of the first conv; later convs use ndf * min(2^n, 8).
      n_layers: number of stride-2 convs (3 in taming); see the module docstring for the grid size.
      norm: 'group' (GroupNorm, default), 'none', or 'batch' (taming's BatchNorm, needs `batch_stats`).
      num_groups: GroupNorm groups, reduced to gcd(num_groups, channels) so small widths work.
      dtype: computation dtype; parameters stay float32.
    """

    ndf: int = 64
    n_layers: int = 3
    norm: str = "group"
    num_groups: int = 32
    dtype: jnp.dtype = jnp.float32

    def _normalize(self, h: jax.Array, index: int, train: bool) -> jax.Array:
        if self.norm == "group":
            groups = math.gcd(self.num_groups, h.shape[-1])
            return nn.GroupNorm(
                num_groups=groups,
                epsilon=1e-5,
                dtype=self.dtype,
                scale_init=_norm_scale_init,
                name=f"norm{index}",
            )(h)
        if self.norm == "batch":
            # torch BatchNorm momentum 0.1 is flax momentum 0.9.
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
                scale_init=_norm_scale_init,
                name=f"norm{index}",
            )(h)
        return h

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
        if self.norm not in NORMS:
            raise ValueError(f"NLayerDiscriminator.norm is '{self.norm}'; expected one of {NORMS}.")
        if x_BHWC.ndim != 4:
            raise ValueError(f"NLayerDiscriminator expects NHWC images (B, H, W, C); got {x_BHWC.shape}.")
        side = min(x_BHWC.shape[1:3])
        if patch_grid_side(side, self.n_layers) < 1:
            raise ValueError(
                f"NLayerDiscriminator with n_layers={self.n_layers} needs images of side >= "
                f"{3 * 2**self.n_layers}; got {x_BHWC.shape[1]}x{x_BHWC.shape[2]}. Lower n_layers."
            )
        # Convs followed by a norm carry no bias (the norm's shift replaces it), as in taming.
        with_bias = self.norm == "none"
        pad = ((1, 1), (1, 1))

        def conv(h, features, stride, index, bias):
            return nn.Conv(
                features,
                (4, 4),
                strides=(stride, stride),
                padding=pad,
                use_bias=bias,
                dtype=self.dtype,
                # logical axes for sharding; the 1-channel logit conv stays whole
                kernel_init=nn.with_logical_partitioning(
                    _conv_init, (None, None, "conv_in", "conv_out" if features > 1 else None)
                ),
                bias_init=nn.with_logical_partitioning(
                    nn.initializers.zeros, ("conv_out" if features > 1 else None,)
                ),
                name=f"conv{index}",
            )(h)

        h = conv(x_BHWC.astype(self.dtype), self.ndf, 2, 0, True)
        h = nn.leaky_relu(h, LEAKY_SLOPE)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = conv(h, self.ndf * min(2**n, 8), stride, n, with_bias)
            h = self._normalize(h, n, train)
            h = nn.leaky_relu(h, LEAKY_SLOPE)
        logits_Bhw1 = conv(h, 1, 1, self.n_layers + 1, True)
        return logits_Bhw1.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# Loss terms (pure functions of logits / gradients; every mean runs over all logits of the batch).
