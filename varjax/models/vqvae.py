"""VAR's multi-scale VQ-VAE tokenizer (Flax linen, images NHWC in [-1, 1]).

The encoder/decoder follow the release (the latent-diffusion vq-f16 layout): ch_mult (1, 1, 2, 2, 4), two
residual blocks per level, GroupNorm(32, eps 1e-6), self-attention at the lowest resolution and in the middle,
stride-2 convolutions with (0, 1, 0, 1) padding, nearest 2x upsampling followed by a convolution.
Submodule names mirror the PyTorch state-dict keys (``down_0/block_1`` for ``down.0.block.1``) so that
conversion is a mechanical renaming (see ``varjax.interop.convert``). Conv kernels (kh, kw, in, out) carry the logical
axes ``conv_in`` / ``conv_out`` (``varjax.core.mesh`` maps them onto the mesh); the RGB output conv keeps
its 3 channels whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from varjax.models.dict_config import DictConfig
from varjax.models.quant import VectorQuantizer
from varjax.models.resize import upsample_nearest_2x

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclasses.dataclass(frozen=True)
class VQVAEConfig(DictConfig):
    """Hyper-parameters of the tokenizer (defaults: the released ``vae_ch160v4096z32``)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True
    using_mid_sa: bool = True
    dropout: float = 0.0
    beta: float = 0.25
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    num_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample


def _norm(name: str, groups: int) -> nn.GroupNorm:
    # Two-pass variance: the one-pass E[x^2]-E[x]^2 form drifts from torch by more than the parity tolerance.
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, name=name)


def _conv(features: int, k: int, name: str, stride: int = 1, padding=None, out_axis: str | None = "conv_out"
          ) -> nn.Conv:
    pad = ((k // 2, k // 2), (k // 2, k // 2)) if padding is None else padding
    return nn.Conv(
        features,
        (k, k),
        strides=(stride, stride),
        padding=pad,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, (None, None, "conv_in", out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
    )


class ResnetBlock(nn.Module):
    out_channels: int
    groups: int = 32
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = _conv(self.out_channels, 3, "conv1")(nn.silu(_norm("norm1", self.groups)(x)))
        h = nn.silu(_norm("norm2", self.groups)(h))
        if self.dropout > 1e-6:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_channels, 3, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over the h*w positions."""

    groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        qkv = _conv(3 * C, 1, "qkv")(_norm("norm", self.groups)(x)).reshape(B, H * W, 3 * C)
        q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
        w = jnp.einsum("bic,bjc->bij", q, k) * (C**-0.5)
        h = jnp.einsum("bij,bjc->bic", jax.nn.softmax(w, axis=-1), v).reshape(B, H, W, C)
        return x + _conv(C, 1, "proj_out")(h)


class Level(nn.Module):
    """One resolution level: residual blocks, optional attention after each, optional resampling."""

    out_channels: int
    num_blocks: int
    with_attn: bool
    resample: str | None  # "down", "up" or None
    groups: int = 32
    dropout: float = 0.0

    @nn.compact
    def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.num_blocks):
            h = ResnetBlock(self.out_channels, self.groups, self.dropout, name=f"block_{i}")(h, train)
            if self.with_attn:
                h = AttnBlock(self.groups, name=f"attn_{i}")(h)
        if self.resample == "down":
            # torch pads right/bottom by one then convolves with stride 2 and no padding
            h = _conv(h.shape[-1], 3, "downsample", stride=2, padding=((0, 1), (0, 1)))(h)
        elif self.resample == "up":
            h = _conv(h.shape[-1], 3, "upsample")(upsample_nearest_2x(h))
        return h


class Mid(nn.Module):
    channels: int
    using_mid_sa: bool
    groups: int = 32
    dropout: float = 0.0

    @nn.compact
    def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
        h = ResnetBlock(self.channels, self.groups, self.dropout, name="block_1")(h, train)
        if self.using_mid_sa:
            h = AttnBlock(self.groups, name="attn_1")(h)
        return ResnetBlock(self.channels, self.groups, self.dropout, name="block_2")(h, train)


class Encoder(nn.Module):
    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, x_BHW3: jax.Array, train: bool = False) -> jax.Array:
        c = self.cfg
        n = len(c.ch_mult)
        h = _conv(c.ch, 3, "conv_in")(x_BHW3)
        for i, mult in enumerate(c.ch_mult):
            h = Level(
                c.ch * mult,
                c.num_res_blocks,
                c.using_sa and i == n - 1,
                "down" if i != n - 1 else None,
                c.num_groups,
                c.dropout,
                name=f"down_{i}",
            )(h, train)
        h = Mid(h.shape[-1], c.using_mid_sa, c.num_groups, c.dropout, name="mid")(h, train)
        h = nn.silu(_norm("norm_out", c.num_groups)(h))
        return _conv(c.z_channels, 3, "conv_out")(h)


class Decoder(nn.Module):
    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, z_BhwC: jax.Array, train: bool = False) -> jax.Array:
        c = self.cfg
        n = len(c.ch_mult)
        h = _conv(c.ch * c.ch_mult[-1], 3, "conv_in")(z_BhwC)
        h = Mid(h.shape[-1], c.using_mid_sa, c.num_groups, c.dropout, name="mid")(h, train)
        for i in reversed(range(n)):
            h = Level(
                c.ch * c.ch_mult[i],
                c.num_res_blocks + 1,
                c.using_sa and i == n - 1,
                "up" if i != 0 else None,
                c.num_groups,
                c.dropout,
                name=f"up_{i}",
            )(h, train)
        h = nn.silu(_norm("norm_out", c.num_groups)(h))
        return _conv(3, 3, "conv_out", out_axis=None)(h)


class VQVAE(nn.Module):
    """Tokenizer. Call methods with ``model.apply({'params': p}, x, method=VQVAE.<name>)``."""

    cfg: VQVAEConfig

    def setup(self):
        c = self.cfg
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = _conv(c.z_channels, c.quant_conv_ks, "quant_conv")
        self.post_quant_conv = _conv(c.z_channels, c.quant_conv_ks, "post_quant_conv")
        self.quantize = VectorQuantizer(
            vocab_size=c.vocab_size,
            channels=c.z_channels,
            patch_nums=tuple(c.patch_nums),
            using_znorm=c.using_znorm,
            beta=c.beta,
            quant_resi=c.quant_resi,
            share_quant_resi=c.share_quant_resi,
            default_qresi_counts=c.default_qresi_counts,
        )

    def __call__(self, img_BHW3: jax.Array, train: bool = False):
        """Training forward: ``(recon_BHW3, vq_loss, hits_SV)`` (recon not clamped, as in the reference)."""
        f = self.encode(img_BHW3, train)
        _, _, f_hat_st, vq_loss, hits = self.quantize.quantize(f, train=True)
        return self.decode(f_hat_st, train), vq_loss, hits

    def encode(self, img_BHW3: jax.Array, train: bool = False) -> jax.Array:
        """``quant_conv(encoder(img))``: (B, h, w, C)."""
        return self.quant_conv(self.encoder(img_BHW3, train))

    def decode(self, f_hat_BhwC: jax.Array, train: bool = False) -> jax.Array:
        """``decoder(post_quant_conv(f_hat))`` without clamping: (B, H, W, 3)."""
        return self.decoder(self.post_quant_conv(f_hat_BhwC), train)

    def fhat_to_img(self, f_hat_BhwC: jax.Array) -> jax.Array:
        return jnp.clip(self.decode(f_hat_BhwC), -1, 1)

    def img_to_idx(self, img_BHW3: jax.Array) -> list[jax.Array]:
        """Per-scale token ids, coarse to fine: list of (B, pn*pn) int32."""
        return self.quantize.quantize(self.encode(img_BHW3))[0]

    def img_to_fhat(self, img_BHW3: jax.Array) -> list[jax.Array]:
        return self.quantize.quantize(self.encode(img_BHW3))[1]

    def img_to_recon(self, img_BHW3: jax.Array) -> jax.Array:
        """Reconstruction from all scales, clamped to [-1, 1]."""
        return self.fhat_to_img(self.img_to_fhat(img_BHW3)[-1])

    def idx_to_img(self, idx_list: Sequence[jax.Array]) -> jax.Array:
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list))

    def idx_to_fhat(self, idx_list: Sequence[jax.Array]) -> jax.Array:
        return self.quantize.idx_to_fhat(idx_list)

    def idx_to_var_input(self, idx_list: Sequence[jax.Array]) -> jax.Array:
        return self.quantize.idx_to_var_input(idx_list)

    def quantize_features(self, f_BhwC: jax.Array, train: bool = False):
        return self.quantize.quantize(f_BhwC, train=train)

    def next_ar_input(self, si: int, f_hat: jax.Array, h_BpnpnC: jax.Array):
        return self.quantize.next_ar_input(si, f_hat, h_BpnpnC)

    def lookup(self, idx_Bl: jax.Array, pn: int) -> jax.Array:
        return self.quantize.lookup(idx_Bl, pn)

    def codebook(self) -> jax.Array:
        return self.quantize.embedding

    def init_all(self, img_BHW3: jax.Array) -> jax.Array:
        """Touches every submodule so that ``init`` creates all parameters."""
        out, _, _ = self(img_BHW3, train=False)
        return out


def split_scales(tokens_BL: jax.Array, patch_nums: Sequence[int]) -> list[jax.Array]:
    """(B, L) concatenated tokens -> list of (B, pn*pn)."""
    out, cur = [], 0
    for pn in patch_nums:
        out.append(tokens_BL[:, cur : cur + pn * pn])
        cur += pn * pn
    return out
