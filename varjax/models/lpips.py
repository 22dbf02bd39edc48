"""LPIPS perceptual distance (v0.1, VGG16 backbone) as a frozen Flax module.

Computes exactly what the `lpips` package's `LPIPS(net='vgg', version='0.1')` returns in eval mode:

  1. scaling layer: (x - shift) / scale per RGB channel, inputs in [-1, 1];
  2. VGG16 `features` up to relu5_3, tapped after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3;
  3. per tap: unit-normalise each pixel's channel vector, x / (||x||_2 + 1e-10);
  4. squared difference of the two images' normalised features;
  5. learned non-negative 1x1 projection to one channel ("lin" layer, no bias; its dropout is off in eval);
  6. spatial mean, then sum over the five taps.

Because the 1x1 projection is linear, step 5 is applied after the spatial mean of step 6; the result is
identical and cheaper.

Shapes: B batch, H/W image height/width, C channels. Images are NHWC in [-1, 1].

The parameters are meant to stay frozen: `lpips_distance` wraps them in `stop_gradient` so only the
input images receive gradients.

Parameter layouts accepted by `convert_lpips_params` (torch state dicts as `dict[str, np.ndarray]`, conv
weights OIHW):
  (a) `lin{k}.model.1.weight` (1, C_k, 1, 1), as in the `lpips` package's `weights/v0.1/vgg.pth`, with
  (b) torchvision's `vgg16` state dict: `features.{0,2,5,...,28}.weight` / `.bias`;
  (c) or one combined `lpips.LPIPS` state dict: `net.slice{s}.{i}.weight` / `.bias`, `lin{k}.model.1.weight`
      and the `scaling_layer.shift` / `.scale` buffers.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Scaling-layer constants of lpips v0.1 (per RGB channel, applied to images in [-1, 1]).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# VGG16 `features` convolutions as (flax name, torchvision index, lpips slice, C_out). Every conv is 3x3,
# stride 1, padding 1, followed by ReLU; a 2x2/2 max pool precedes the first conv of slices 2..5.
VGG16_CONVS = (
    ("conv1_1", 0, 1, 64),
    ("conv1_2", 2, 1, 64),
    ("conv2_1", 5, 2, 128),
    ("conv2_2", 7, 2, 128),
    ("conv3_1", 10, 3, 256),
    ("conv3_2", 12, 3, 256),
    ("conv3_3", 14, 3, 256),
    ("conv4_1", 17, 4, 512),
    ("conv4_2", 19, 4, 512),
    ("conv4_3", 21, 4, 512),
    ("conv5_1", 24, 5, 512),
    ("conv5_2", 26, 5, 512),
    ("conv5_3", 28, 5, 512),
)
# Channels of the five taps (relu1_2 ... relu5_3), i.e. the input width of lin0 ... lin4.
TAP_CHANNELS = (64, 128, 256, 512, 512)
NUM_TAPS = len(TAP_CHANNELS)
EPS = 1e-10


def unit_normalize(f_BhwC: jax.Array, eps: float = EPS) -> jax.Array:
    """Divides each pixel's channel vector by its L2 norm plus `eps`; shape preserved.

    The norm is written so its gradient stays finite where a whole channel vector is zero (common after
    ReLU): d sqrt(s)/ds is infinite at s = 0, and 0 * inf would make the input gradient NaN. The value is
    identical to `f / (sqrt(sum f^2) + eps)`.
    """
    sq_Bhw1 = jnp.sum(jnp.square(f_BhwC), axis=-1, keepdims=True)
    positive = sq_Bhw1 > 0
    norm_Bhw1 = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq_Bhw1, 1.0)), 0.0)
    return f_BhwC / (norm_Bhw1 + eps)


class VGG16Features(nn.Module):
    """VGG16 `features` up to relu5_3; returns the five LPIPS taps, tap k of shape (B, H/2^k, W/2^k, C_k)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHW3: jax.Array) -> list[jax.Array]:
        taps = []
        h = x_BHW3
        for i, (name, _, slice_id, c_out) in enumerate(VGG16_CONVS):
            if i > 0 and VGG16_CONVS[i - 1][2] != slice_id:
                taps.append(h)
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            h = nn.Conv(c_out, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=name)(h)
            h = nn.relu(h)
        taps.append(h)
        return taps


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with the VGG16 backbone.

    Call: `(x_BHW3, y_BHW3) -> d_B`, images in [-1, 1] of equal shape, H and W at least 16 so relu5_3 is
    non-empty. Returns the per-image distance in float32 (lpips returns it as (B, 1, 1, 1)).
    """

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHW3: jax.Array, y_BHW3: jax.Array) -> jax.Array:
        if x_BHW3.shape != y_BHW3.shape or x_BHW3.ndim != 4 or x_BHW3.shape[-1] != 3:
            raise ValueError(
                f"LPIPS expects two NHWC RGB image batches of equal shape (B, H, W, 3); got {x_BHW3.shape} "
                f"and {y_BHW3.shape}."
            )
        if min(x_BHW3.shape[1:3]) < 16:
            raise ValueError(
                f"LPIPS needs images of at least 16x16 (four 2x2 poolings precede relu5_3); got "
                f"{x_BHW3.shape[1]}x{x_BHW3.shape[2]}."
            )
        b = x_BHW3.shape[0]
        shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
        # One backbone pass over both batches halves the number of kernel launches.
        xy_BHW3 = (jnp.concatenate([x_BHW3, y_BHW3], axis=0).astype(jnp.float32) - shift) / scale
        taps = VGG16Features(dtype=self.dtype, name="vgg")(xy_BHW3.astype(self.dtype))
        d_B = jnp.zeros((b,), jnp.float32)
        for k, f_BhwC in enumerate(taps):
            f_BhwC = unit_normalize(f_BhwC.astype(jnp.float32))
            diff_BC = jnp.mean(jnp.square(f_BhwC[:b] - f_BhwC[b:]), axis=(1, 2))
            d_B = d_B + nn.Dense(1, use_bias=False, name=f"lin{k}")(diff_BC)[:, 0]
        return d_B


def lpips_distance(params, x_BHW3: jax.Array, y_BHW3: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """LPIPS distance (B,) with frozen `params`: gradients reach the images, never the weights."""
    frozen = jax.lax.stop_gradient(params)
    return LPIPS(dtype=dtype).apply({"params": frozen}, x_BHW3, y_BHW3)


# ---------------------------------------------------------------------------------------------------------
# Conversion from torch state dicts.


def _lin_key(k: int) -> str:
    return f"lin{k}.model.1.weight"


def _vgg_keys(combined: bool) -> list[tuple[str, str, str, int, int]]:
    """(flax conv name, torch weight key, torch bias key, C_in, C_out) for each VGG16 conv."""
    rows, c_in = [], 3
    for name, index, slice_id, c_out in VGG16_CONVS:
        prefix = f"net.slice{slice_id}.{index}" if combined else f"features.{index}"
        rows.append((name, f"{prefix}.weight", f"{prefix}.bias", c_in, c_out))
        c_in = c_out
    return rows


def _is_combined(sd: Mapping[str, np.ndarray]) -> bool:
    return any(key.startswith("net.slice") for key in sd)


def _take(sd: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    value = np.asarray(sd[key], dtype=np.float32)
    if value.shape != shape:
        raise ValueError(f"LPIPS weights: {source} key '{key}' has shape {value.shape}; expected {shape}.")
    return value


def _require(sd: Mapping[str, np.ndarray], keys: list[str], source: str, layout: str) -> None:
    missing = [key for key in keys if key not in sd]
    if missing:
        raise ValueError(
            f"LPIPS weights: {source} lacks {len(missing)} of the {len(keys)} keys expected for {layout}: "
            f"{', '.join(missing)}. Present keys start with: {', '.join(sorted(sd)[:8]) or '(none)'}."
        )


def _check_scaling(sd: Mapping[str, np.ndarray], source: str) -> None:
    """The combined layout carries the scaling-layer buffers; they must match the fixed v0.1 constants."""
    for key, expected in (("scaling_layer.shift", SHIFT), ("scaling_layer.scale", SCALE)):
        if key in sd and not np.allclose(np.asarray(sd[key]).reshape(-1), expected, atol=1e-6):
            raise ValueError(
                f"LPIPS weights: {source} key '{key}' is {np.asarray(sd[key]).reshape(-1).tolist()}; this "
                f"module implements lpips v0.1, whose value is {list(expected)}."
            )


def _convert(lin_sd, vgg_sd, lin_source: str, vgg_source: str) -> dict:
    combined = vgg_sd is None
    if combined and not _is_combined(lin_sd):
        raise ValueError(
            f"LPIPS weights: {lin_source} holds no VGG16 weights (no 'net.slice*' keys), so the torchvision "
            "vgg16 state dict (keys 'features.N.weight') must be given as well."
        )
    backbone_sd, backbone_source = (lin_sd, lin_source) if combined else (vgg_sd, vgg_source)
    rows = _vgg_keys(combined)
    layout = "an lpips.LPIPS state dict" if combined else "the torchvision vgg16 state dict"
    _require(lin_sd, [_lin_key(k) for k in range(NUM_TAPS)], lin_source, "the lpips 'lin' layers")
    _require(backbone_sd, [key for row in rows for key in row[1:3]], backbone_source, layout)
    _check_scaling(lin_sd, lin_source)

    vgg = {}
    for name, w_key, b_key, c_in, c_out in rows:
        w_OIHW = _take(backbone_sd, w_key, (c_out, c_in, 3, 3), backbone_source)
        vgg[name] = {
            "kernel": np.ascontiguousarray(w_OIHW.transpose(2, 3, 1, 0)),  # flax conv kernel is HWIO
            "bias": _take(backbone_sd, b_key, (c_out,), backbone_source),
        }
    params = {"vgg": vgg}
    for k, c in enumerate(TAP_CHANNELS):
        w_1C11 = _take(lin_sd, _lin_key(k), (1, c, 1, 1), lin_source)
        params[f"lin{k}"] = {"kernel": w_1C11.reshape(1, c).T.copy()}  # flax dense kernel is (in, out)
    return params


def convert_lpips_params(lin_sd: Mapping[str, np.ndarray], vgg_sd: Mapping[str, np.ndarray] | None = None):
    """Torch state dicts -> `LPIPS` params (nested dict of float32 numpy arrays).

    Args:
      lin_sd: either the lpips package's `vgg.pth` content (`lin{0..4}.model.1.weight`, each (1, C, 1, 1)),
        or a full `lpips.LPIPS` state dict that also holds `net.slice{s}.{i}.weight/bias`.
      vgg_sd: the torchvision `vgg16` state dict (`features.{i}.weight` OIHW, `features.{i}.bias`); needed
        only when `lin_sd` has no `net.slice*` keys. When given, it is the source of the backbone weights.

    Raises:
      ValueError naming every missing key, or a key whose shape is wrong.
    """
    return _convert(lin_sd, vgg_sd, "lin_sd", "vgg_sd")
