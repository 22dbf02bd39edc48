"""The FID Inception-v3 (the TensorFlow 2015 graph as ported to PyTorch by pytorch-fid / torch-fidelity), NHWC.

It differs from torchvision's Inception-v3 where the TF graph does: average pools inside the A, C and E
blocks ignore the padding (``count_include_pad=False``), the last E block max-pools its pool branch, and the
classifier has 1008 outputs. Batch norm uses eps 1e-3 with the stored running statistics.

Input: images (B, H, W, 3) in [0, 1]. ``preprocess="torch"`` (default, pytorch-fid) resizes them bilinearly to
299 as ``F.interpolate(align_corners=False)`` (half-pixel centres) and scales to [-1, 1] (2x - 1);
``preprocess="adm"`` does what the TF graph behind the ADM evaluator does with 0..255 inputs: TF1's legacy
``ResizeBilinear`` (source = dest * in / out, no half-pixel offset) and (x - 128) / 128. Outputs (all float32):

- ``pool3`` (B, 2048): the final average pool (FID, precision / recall);
- ``logits`` (B, 1008): ``fc(pool3)``; ``logits_unbiased``: the same without the bias, the TF graph's
  ``softmax/logits/MatMul`` that the Inception Score uses;
- ``spatial`` (B, 2023): the first 7 channels of ``mixed_6/conv`` (Mixed_6d's 1x1 branch, 17x17), flattened
  in (H, W, C) order, as the ADM evaluator takes them for sFID.

Module names follow the torch state dict (``Mixed_5b.branch1x1.conv.weight`` -> ``Mixed_5b/branch1x1/kernel``),
so :func:`convert_inception` is a rename and a transpose.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from varjax.models.resize import linear_weights, resize_bilinear

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # the ADM evaluator keeps mixed_6/conv[..., :7]
BN_EPS = 1e-3


class BasicConv(nn.Module):
    """Conv (no bias) -> batch norm (running statistics) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel
        k = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            k.astype(self.dtype),
            (self.stride, self.stride),
            ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )
        mul = scale * jax.lax.rsqrt(var + BN_EPS)
        return nn.relu(y * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype))


def _avg_pool_3x3(x):
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, dtype=self.dtype)
        b1 = C(64, (1, 1), name="branch1x1")(x)
        b5 = C(64, (5, 5), padding=(2, 2), name="branch5x5_2")(C(48, (1, 1), name="branch5x5_1")(x))
        b3 = C(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = C(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = C(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = C(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, dtype=self.dtype)
        b3 = C(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = C(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = C(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = C(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x).astype(b3.dtype)], axis=-1)


class InceptionC(nn.Module):
    """Also returns its 1x1 branch: Mixed_6d's is the ADM evaluator's ``mixed_6/conv``."""

    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C, c7 = functools.partial(BasicConv, dtype=self.dtype), self.channels_7x7
        b1 = C(192, (1, 1), name="branch1x1")(x)
        b7 = C(c7, (1, 1), name="branch7x7_1")(x)
        b7 = C(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = C(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = C(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = C(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = C(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = C(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = C(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = C(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, dtype=self.dtype)
        b3 = C(320, (3, 3), stride=2, name="branch3x3_2")(C(192, (1, 1), name="branch3x3_1")(x))
        b7 = C(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = C(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = C(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = C(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x).astype(b3.dtype)], axis=-1)


class InceptionE(nn.Module):
    max_pool: bool  # the FID graph's last block max-pools its pool branch (FIDInceptionE_2)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, dtype=self.dtype)
        b1 = C(320, (1, 1), name="branch1x1")(x)
        b3 = C(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                C(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                C(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = C(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = C(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                C(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                C(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = C(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


@functools.lru_cache(maxsize=16)
def tf1_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of TF1's ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False)."""
    # float32 coordinates, as the TF kernel computes them
    return linear_weights((np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)).astype(np.float64), n_in)


def resize_tf1_bilinear(x_BHWC: jax.Array, size: int) -> jax.Array:
    _, h, w, _ = x_BHWC.shape
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(tf1_bilinear_matrix(h, size), x_BHWC.dtype), x_BHWC, precision=hi)
    return jnp.einsum("pw,bowc->bopc", jnp.asarray(tf1_bilinear_matrix(w, size), x_BHWC.dtype), x, precision=hi)


PREPROCESS = ("torch", "adm")


class InceptionV3(nn.Module):
    """FID Inception-v3: images (B, H, W, 3) in [0, 1] -> dict of pool3, logits, logits_unbiased, spatial."""

    dtype: Any = jnp.float32  # compute dtype of the convolutions; outputs are float32
    preprocess: str = "torch"  # "torch" (pytorch-fid) or "adm" (the ADM evaluator's TF graph)

    @nn.compact
    def __call__(self, images_BHW3):
        C = functools.partial(BasicConv, dtype=self.dtype)
        x = images_BHW3.astype(jnp.float32)
        if self.preprocess == "torch":
            x = resize_bilinear(x, INPUT_SIZE) * 2 - 1
        elif self.preprocess == "adm":
            x = (resize_tf1_bilinear(x * 255, INPUT_SIZE) - 128) / 128
        else:
            raise ValueError(f"--preprocess {self.preprocess!r}: expected one of {PREPROCESS}.")
        x = C(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = C(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = C(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = C(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = C(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        for name, pf in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pf, dtype=self.dtype, name=name)(x)
        x = InceptionB(dtype=self.dtype, name="Mixed_6a")(x)
        spatial = None
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x, b1 = InceptionC(c7, dtype=self.dtype, name=name)(x)
            if name == "Mixed_6d":
                spatial = b1[..., :SPATIAL_CHANNELS]
        x = InceptionD(dtype=self.dtype, name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, dtype=self.dtype, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, dtype=self.dtype, name="Mixed_7c")(x)
        pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        fc = nn.Dense(1008, precision=jax.lax.Precision.HIGHEST, name="fc")
        logits = fc(pool3)
        return {
            "pool3": pool3,
            "logits": logits,
            "logits_unbiased": logits - fc.variables["params"]["bias"],
            "spatial": spatial.astype(jnp.float32).reshape(spatial.shape[0], -1),
        }


# ----------------------------------------------------------------------------------------------------
# Weights: the torch state dict of pytorch-fid's pt_inception-2015-12-05-*.pth.

_BN_NAMES = {"bn.weight": "scale", "bn.bias": "bias", "bn.running_mean": "mean", "bn.running_var": "var"}


def param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax parameter path -> shape, without computing anything."""
    tree = jax.eval_shape(lambda: InceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3))))["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _torch_name(path: tuple[str, ...]) -> str:
    *mod, leaf = path
    if mod == ["fc"]:
        return f"fc.{'weight' if leaf == 'kernel' else 'bias'}"
    suffix = "conv.weight" if leaf == "kernel" else {v: k for k, v in _BN_NAMES.items()}[leaf]
    return ".".join(mod) + "." + suffix


def torch_layout() -> dict[str, tuple[int, ...]]:
    """Torch state-dict name -> torch shape of the FID Inception (``num_batches_tracked`` left out)."""
    out = {}
    for path, shape in param_shapes().items():
        if path[-1] == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        out[_torch_name(path)] = shape
    return out


def convert_inception(sd: dict[str, np.ndarray], source: str = "state dict") -> dict:
    """pytorch-fid's Inception state dict -> Flax params of :class:`InceptionV3` (float32)."""
    shapes = param_shapes()
    names = {_torch_name(p): p for p in shapes}
    keys = {k for k in sd if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(names) - keys), sorted(keys - set(names))
    if missing or unexpected:
        raise ValueError(
            f"{source}: not the FID Inception-v3 state dict (pytorch-fid's pt_inception-2015-12-05-*.pth); "
            f"missing {len(missing)} keys {missing[:5]}, unexpected {len(unexpected)} keys {unexpected[:5]}."
        )
    params: dict = {}
    for name, path in names.items():
        v = np.asarray(sd[name], np.float32)
        if path[-1] == "kernel":
            v = v.T if v.ndim == 2 else v.transpose(2, 3, 1, 0)
        if v.shape != shapes[path]:
            raise ValueError(f"{source}: {name} has shape {sd[name].shape}, expected {torch_layout()[name]}.")
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return params
