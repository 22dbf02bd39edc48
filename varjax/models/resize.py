"""Resizing that matches ``torch.nn.functional.interpolate`` exactly (NHWC layout).

VAR's quantizer moves features between scales with ``mode='area'`` (down) and ``mode='bicubic'`` (up) and its
decoder upsamples with ``mode='nearest'``. ``jax.image.resize`` uses a different bicubic kernel (Keys a=-0.5),
antialiases on downsampling and treats borders differently, so token ids would not match the released models.

Every resize here is separable and linear, so each is a pair of small (out, in) weight matrices built once in
NumPy (float64, then cast) from static shapes and applied with two einsums. That keeps them differentiable,
shardable and exact up to float32 summation order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # PyTorch's cubic convolution coefficient (OpenCV's too); Keys' classic value is -0.5.


def _cubic_near(x: np.ndarray) -> np.ndarray:
    """Kernel for |x| <= 1."""
    a = _CUBIC_A
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: np.ndarray) -> np.ndarray:
    """Kernel for 1 < |x| < 2."""
    a = _CUBIC_A
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


@functools.lru_cache(maxsize=256)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's bicubic interpolation along one axis, ``align_corners=False``.

    Source coordinate ``(dst + 0.5) * n_in / n_out - 0.5`` is not clamped (torch does not for cubic); the four
    taps ``floor(src) - 1 .. floor(src) + 2`` are clamped to the border, so border pixels absorb the weight of
    taps that fall outside.
    """
    scale = n_in / n_out
    dst = np.arange(n_out, dtype=np.float64)
    src = (dst + 0.5) * scale - 0.5
    base = np.floor(src)
    t = src - base
    coeffs = np.stack([_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t)], axis=1)
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for k in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, n_in - 1)
        np.add.at(w, (np.arange(n_out), idx), coeffs[:, k])
    return w


@functools.lru_cache(maxsize=256)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's ``mode='area'`` (adaptive average pooling) along one axis.

    Output cell i averages input cells ``floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1``; the
    windows overlap when n_out does not divide n_in, exactly as ``adaptive_avg_pool2d`` does.
    """
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        w[i, start:end] = 1.0 / (end - start)
    return w


@functools.lru_cache(maxsize=256)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's bilinear interpolation, ``align_corners=False``, no antialias.

    Unlike cubic, torch clamps negative source coordinates to 0 for linear modes.
    """
    scale = n_in / n_out
    return linear_weights(np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0), n_in)


def linear_weights(src_out: np.ndarray, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of linear interpolation at the source coordinates ``src_out`` (>= 0), the upper
    neighbour clamped to the last input, as torch's and TF's kernels do."""
    lo = np.minimum(np.floor(src_out).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    t = src_out - lo
    w = np.zeros((len(src_out), n_in), dtype=np.float64)
    np.add.at(w, (np.arange(len(src_out)), lo), 1 - t)
    np.add.at(w, (np.arange(len(src_out)), hi), t)
    return w


def _apply_separable(x_BHWC: jax.Array, w_h: np.ndarray, w_w: np.ndarray) -> jax.Array:
    dtype = x_BHWC.dtype
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(w_h, dtype), x_BHWC, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", jnp.asarray(w_w, dtype), x, precision=jax.lax.Precision.HIGHEST)


def resize_bicubic(x_BHWC: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode='bicubic', align_corners=False)`` for NHWC arrays."""
    oh, ow = (size, size) if isinstance(size, int) else size
    _, h, w, _ = x_BHWC.shape
    if (h, w) == (oh, ow):
        return x_BHWC  # torch copies in this case too (the weights would be the identity)
    return _apply_separable(x_BHWC, bicubic_matrix(h, oh), bicubic_matrix(w, ow))


def resize_area(x_BHWC: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode='area')`` for NHWC arrays."""
    oh, ow = (size, size) if isinstance(size, int) else size
    _, h, w, _ = x_BHWC.shape
    if (h, w) == (oh, ow):
        return x_BHWC
    return _apply_separable(x_BHWC, area_matrix(h, oh), area_matrix(w, ow))


def resize_bilinear(x_BHWC: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode='bilinear', align_corners=False)`` for NHWC arrays."""
    oh, ow = (size, size) if isinstance(size, int) else size
    _, h, w, _ = x_BHWC.shape
    if (h, w) == (oh, ow):
        return x_BHWC
    return _apply_separable(x_BHWC, bilinear_matrix(h, oh), bilinear_matrix(w, ow))


def upsample_nearest_2x(x_BHWC: jax.Array) -> jax.Array:
    """``F.interpolate(x, scale_factor=2, mode='nearest')`` for NHWC arrays."""
    return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
