"""The multi-scale residual vector quantizer of VAR (NHWC).

Letters in names: B batch, h/w latent grid (the last scale, e.g. 16 at 256px), C latent channels (Cvae),
V codebook size, S number of scales, pn side of one scale's token map, l = pn * pn tokens of one scale,
L = sum of l over scales.

At scale k the residual ``f_rest`` is area-downsampled to pn_k x pn_k, each cell takes its nearest code, the
code map is bicubic-upsampled back to h x w, passed through a phi convolution
``phi(z) = (1 - r) z + r conv(z)`` and added to ``f_hat`` (and subtracted from the residual). Which phi a scale
uses follows the reference's tick rule (``phi_index``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from varjax.models.resize import resize_area, resize_bicubic


def phi_ticks(num_phi: int) -> np.ndarray:
    """Positions in [0, 1] that the K phi convolutions stand for (the reference's ``ticks``)."""
    k = num_phi
    if k == 4:
        return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k)
    return np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


@functools.lru_cache(maxsize=64)
def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Index of the phi used at scale ``si``: the tick closest to ``si / (S - 1)``."""
    if num_phi == 1:
        return 0
    at = si / max(num_scales - 1, 1)
    return int(np.argmin(np.abs(phi_ticks(num_phi) - at)))


def num_phi_convs(share_quant_resi: int, num_scales: int, default_qresi_counts: int = 0) -> int:
    """How many phi convolutions exist: 0 -> one per scale, 1 -> one shared, K -> K partially shared."""
    if share_quant_resi == 0:
        return default_qresi_counts or num_scales
    return share_quant_resi


def scale_slices(patch_nums: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) of each scale inside the concatenated token sequence."""
    out, cur = [], 0
    for pn in patch_nums:
        out.append((cur, cur + pn * pn))
        cur += pn * pn
    return out


class Phi(nn.Module):
    """``phi(z) = (1 - r) z + r conv3x3(z)``; r = 0 makes it the identity (and holds no parameters)."""

    channels: int
    resi_ratio: float

    @nn.compact
    def __call__(self, h_BhwC: jax.Array) -> jax.Array:
        r = abs(self.resi_ratio)
        if r <= 1e-6:
            return h_BhwC
        conv = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), name="conv")(h_BhwC)
        return h_BhwC * (1 - r) + conv * r


def nearest_code(z_NC: jax.Array, codebook_VC: jax.Array, using_znorm: bool) -> jax.Array:
    """Index (N,) of the nearest code, with the reference's arithmetic so that ties break the same way."""
    z_NC = jax.lax.stop_gradient(z_NC).astype(jnp.float32)
    e_VC = jax.lax.stop_gradient(codebook_VC).astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    if using_znorm:
        z_n = z_NC / jnp.maximum(jnp.linalg.norm(z_NC, axis=-1, keepdims=True), 1e-12)
        e_n = e_VC / jnp.maximum(jnp.linalg.norm(e_VC, axis=-1, keepdims=True), 1e-12)
        return jnp.argmax(jnp.matmul(z_n, e_n.T, precision=hi), axis=1).astype(jnp.int32)
    d = jnp.sum(z_NC**2, axis=1, keepdims=True) + jnp.sum(e_VC**2, axis=1)[None]
    d = d - 2 * jnp.matmul(z_NC, e_VC.T, precision=hi)
    return jnp.argmin(d, axis=1).astype(jnp.int32)


def codebook_init(key: jax.Array, shape_VC: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """Codebook (V, C) drawn from uniform(-1/V, 1/V): the reference's ``eini(-1)``, taming's VQ init.

    Symmetric around zero, so the codes start spread around the (roughly centred) encoder features; flax's
    ``uniform(scale)`` would draw from [0, scale) and put every code in the positive orthant.
    """
    bound = 1.0 / shape_VC[0]
    return jax.random.uniform(key, shape_VC, dtype, minval=-bound, maxval=bound)


class VectorQuantizer(nn.Module):
    """Multi-scale residual quantizer; parameters: ``embedding`` (V, C) and ``phi_{k}/conv``."""

    vocab_size: int
    channels: int
    patch_nums: tuple[int, ...]
    using_znorm: bool = False
    beta: float = 0.25
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0

    def setup(self):
        self.embedding = self.param("embedding", codebook_init, (self.vocab_size, self.channels))
        n = num_phi_convs(self.share_quant_resi, len(self.patch_nums), self.default_qresi_counts)
        self.phis = [Phi(self.channels, self.quant_resi, name=f"phi_{k}") for k in range(n)]

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def phi(self, si: int, h_BhwC: jax.Array) -> jax.Array:
        return self.phis[phi_index(si, self.num_scales, len(self.phis))](h_BhwC)

    def lookup(self, idx_Bl: jax.Array, pn: int) -> jax.Array:
        """Codes of a (B, pn*pn) id map as a (B, pn, pn, C) feature map."""
        return jnp.take(self.embedding, idx_Bl, axis=0).reshape(idx_Bl.shape[0], pn, pn, self.channels)

    def _scale_step(self, si: int, h_BpnpnC: jax.Array, hw: int) -> jax.Array:
        """Upsample one scale's codes to the last scale and apply its phi."""
        if si != self.num_scales - 1:
            h_BpnpnC = resize_bicubic(h_BpnpnC, hw)
        return self.phi(si, h_BpnpnC)

    def quantize(self, f_BhwC: jax.Array, train: bool = False):
        """Residual quantization of encoder features.

        Returns ``(idx_list, fhat_list, f_hat_st, vq_loss, hits_SV)``: per-scale ids (B, l) int32, the
        accumulated f_hat after each scale (B, h, w, C), the straight-through output (equal to the last f_hat in
        value, with the gradient of ``f``), the quantizer loss (mean over scales of
        ``beta * |sg(f_hat) - f|^2 + |f_hat - sg(f)|^2``) and the codebook hit counts per scale (S, V).
        """
        f = f_BhwC.astype(jnp.float32)
        B, h, w, C = f.shape
        assert h == w == self.patch_nums[-1], f"feature map {h}x{w} != last scale {self.patch_nums[-1]}"
        f_ng = jax.lax.stop_gradient(f)
        f_rest, f_hat = f_ng, jnp.zeros_like(f)
        idx_list, fhat_list, hits, loss = [], [], [], 0.0
        for si, pn in enumerate(self.patch_nums):
            z = resize_area(f_rest, pn) if si != self.num_scales - 1 else f_rest
            idx_N = nearest_code(z.reshape(-1, C), self.embedding, self.using_znorm)
            idx_Bl = idx_N.reshape(B, pn * pn)
            h_q = self._scale_step(si, self.lookup(idx_Bl, pn), h)
            f_hat = f_hat + h_q
            f_rest = f_rest - jax.lax.stop_gradient(h_q)
            idx_list.append(idx_Bl)
            fhat_list.append(f_hat)
            hits.append(jnp.zeros((self.vocab_size,), jnp.int32).at[idx_N].add(1))
            if train:
                commit = jnp.mean((jax.lax.stop_gradient(f_hat) - f) ** 2)
                codebook = jnp.mean((f_hat - f_ng) ** 2)
                loss = loss + self.beta * commit + codebook
        vq_loss = loss / self.num_scales
        f_hat_st = jax.lax.stop_gradient(f_hat) - f_ng + f
        return idx_list, fhat_list, f_hat_st, vq_loss, jnp.stack(hits)

    def idx_to_fhat(self, idx_list: Sequence[jax.Array]) -> jax.Array:
        """Sum of all scales' upsampled, phi-refined codes: (B, h, w, C) (the reference's ``embed_to_fhat``)."""
        hw = self.patch_nums[-1]
        f_hat = 0.0
        for si, (idx_Bl, pn) in enumerate(zip(idx_list, self.patch_nums, strict=True)):
            f_hat = f_hat + self._scale_step(si, self.lookup(idx_Bl, pn), hw)
        return f_hat

    def idx_to_var_input(self, idx_list: Sequence[jax.Array]) -> jax.Array:
        """Teacher-forcing input of the transformer: (B, L - first_l, C).

        For each scale k < S-1, the f_hat accumulated up to k, area-downsampled to the next scale's grid
        (the reference's ``idxBl_to_var_input``).
        """
        hw = self.patch_nums[-1]
        f_hat, nxt = 0.0, []
        for si in range(self.num_scales - 1):
            f_hat = f_hat + self._scale_step(si, self.lookup(idx_list[si], self.patch_nums[si]), hw)
            pn_next = self.patch_nums[si + 1]
            x = resize_area(f_hat, pn_next)
            nxt.append(x.reshape(x.shape[0], pn_next * pn_next, self.channels))
        return jnp.concatenate(nxt, axis=1)

    def next_ar_input(self, si: int, f_hat: jax.Array, h_BpnpnC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One sampling step: add scale ``si``'s codes to f_hat; return (f_hat, next scale's input map)."""
        f_hat = f_hat + self._scale_step(si, h_BpnpnC, self.patch_nums[-1])
        if si == self.num_scales - 1:
            return f_hat, f_hat
        return f_hat, resize_area(f_hat, self.patch_nums[si + 1])
