"""Block-causal attention of VAR: a token sees every token of its own scale and of all coarser scales.

Letters: B batch, Lq / Lk query / key tokens, H heads, c head dim.

``block_causal_attention`` dispatches to one of several implementations of the same math:

- ``reference``: dense einsum scores (B, H, Lq, Lk) with a boolean mask; the definition the others are tested
  against.
- ``xla``: each scale of queries attends to the key prefix it may see, so no mask is needed and the masked
  part of the score matrix (about 40% at 256px) is never computed. Plain XLA ops, fastest on CPU.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (fused flash attention on NVIDIA GPUs,
  bf16/fp16 only) with the mask passed as an additive bias.
- ``splash``: the TPU Pallas splash-attention kernel with the mask given as a static block-sparse mask, so
  fully masked (q, kv) tiles are skipped; tokens are padded to the tile size.
- ``auto``: cudnn on GPU for bf16/fp16, splash on TPU, xla otherwise.

Query i may attend to key j iff ``k_level[j] <= q_level[i]``. In training ``q_level == k_level`` (the level of
every token, ``varjax.models.var.level_ids``); in cached sampling the queries are one scale and the keys all
cached scales, where unfilled cache slots carry a level larger than any query's and so are masked.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # splash tiles are multiples of the TPU lane width

_TARGET_PLATFORM = contextvars.ContextVar("varjax_attention_target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
    """Trace attention for ``platform`` ('cpu', 'gpu', 'tpu') instead of this process's default backend: ``auto``
    and splash's interpret mode follow it. For ahead-of-time compiles of devices this host does not have
    (``varjax compile --topology v5p-64`` on a CPU host traces what a TPU runs: splash, compiled)."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def _platform() -> str:
    return _TARGET_PLATFORM.get() or jax.default_backend()


def block_causal_attention(q_BqHc, k_BkHc, v_BkHc, q_level, k_level, *, scale: float,
                           implementation: str = "auto") -> jax.Array:
    """q (B, Lq, H, c), k/v (B, Lk, H, c); q_level (Lq,), k_level (Lk,) static numpy int arrays (scale index of
    each token). Query i may attend key j iff k_level[j] <= q_level[i]. Softmax in float32. Returns
    (B, Lq, H, c) in v.dtype."""
    q_level, k_level = np.asarray(q_level), np.asarray(k_level)
    if q_level.shape != (q_BqHc.shape[1],) or k_level.shape != (k_BkHc.shape[1],):
        raise ValueError(
            f"block_causal_attention: q_level {q_level.shape} and k_level {k_level.shape} must give one level per "
            f"query ({q_BqHc.shape[1]}) and per key ({k_BkHc.shape[1]})."
        )
    if implementation == "auto":
        implementation = _auto(v_BkHc.dtype)
    fns = {"reference": _reference, "xla": _xla, "cudnn": _cudnn, "splash": _splash}
    if implementation not in fns:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}.")
    return fns[implementation](q_BqHc, k_BkHc, v_BkHc, q_level, k_level, scale)


def _auto(dtype) -> str:
    backend = _platform()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "tpu":
        return "splash"
    return "xla"


def mask_qk(q_level: np.ndarray, k_level: np.ndarray) -> np.ndarray:
    """(Lq, Lk) bool: True where the query may attend to the key."""
    return np.asarray(k_level)[None, :] <= np.asarray(q_level)[:, None]


def _dense(q, k, v, mask_qk_, scale):
    """Dense softmax attention on (B, L, H, c) tensors, scores and softmax in float32; ``mask_qk_`` None means
    every key is visible."""
    s = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask_qk_ is not None:
        s = jnp.where(mask_qk_, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhc->bqhc", p, v)


def _reference(q, k, v, q_level, k_level, scale):
    return _dense(q, k, v, jnp.asarray(mask_qk(q_level, k_level)), scale).astype(v.dtype)


def scale_blocks(q_level: np.ndarray, k_level: np.ndarray) -> list[tuple[int, int, int]] | None:
    """Runs ``(q_start, q_end, k_end)`` of queries of one scale; every key before ``k_end`` is visible to the
    run and none after it. None when the levels are not sorted (then no run has a key prefix)."""
    q_level, k_level = np.asarray(q_level), np.asarray(k_level)
    if np.any(np.diff(q_level) < 0) or np.any(np.diff(k_level) < 0):
        return None
    starts = np.flatnonzero(np.diff(q_level, prepend=q_level[:1] - 1))
    ends = np.append(starts[1:], len(q_level))
    k_ends = np.searchsorted(k_level, q_level[starts], side="right")
    return [(int(a), int(b), int(e)) for a, b, e in zip(starts, ends, k_ends, strict=True)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def key_prefixes(x_BHLc: jax.Array, ends: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """The prefixes ``x[:, :, :e]`` for each ``e`` in ``ends``.

    The gradient is accumulated in place, the longest prefix's gradient first and each shorter one added into
    its leading rows. Differentiating the slices directly pads every prefix's gradient to the full length
    and sums the padded copies: one full-size buffer per scale and per tensor.
    """
    return tuple(x_BHLc[:, :, :e] for e in ends)


def _key_prefixes_fwd(x_BHLc, ends):
    return key_prefixes(x_BHLc, ends), x_BHLc.shape[2]


def _key_prefixes_bwd(ends, length, grads):
    order = sorted(range(len(ends)), key=lambda i: -ends[i])
    dx = grads[order[0]]
    dx = jnp.pad(dx, ((0, 0), (0, 0), (0, length - dx.shape[2]), (0, 0)))
    for i in order[1:]:
        dx = jax.lax.dynamic_update_slice_in_dim(dx, dx[:, :, : ends[i]] + grads[i], 0, axis=2)
    return (dx,)


key_prefixes.defvjp(_key_prefixes_fwd, _key_prefixes_bwd)


def _xla(q, k, v, q_level, k_level, scale):
    """One dense attention per scale of queries over the key prefix it sees: no mask, and the masked part of
    the score matrix (about 40% at 256px) is never computed. Fastest on CPU (about 1.7x the reference's speed
    for a d8 layer, forward and backward; ``jax.nn.dot_product_attention(implementation="xla")`` with the mask
    is 1.6x slower than the reference).

    q, k and v go to the heads-major (B, H, L, c) layout once, so each scale's two products read contiguous
    slices and the backward pass has one transpose per tensor instead of one per scale."""
    blocks = scale_blocks(q_level, k_level)
    if blocks is None:
        return _reference(q, k, v, q_level, k_level, scale)
    q_BHqc, k_BHkc, v_BHkc = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    k_ends = tuple(ke for _, _, ke in blocks)
    k_prefixes, v_prefixes = key_prefixes(k_BHkc, k_ends), key_prefixes(v_BHkc, k_ends)
    outs = []
    for (qs, qe, _), k_BHec, v_BHec in zip(blocks, k_prefixes, v_prefixes, strict=True):
        s = jnp.einsum("bhqc,bhkc->bhqk", q_BHqc[:, :, qs:qe], k_BHec, preferred_element_type=jnp.float32) * scale
        # softmax with the normalisation after the value product: the (l, ke) probabilities are never
        # divided, only the (l, c) output is (the max shift cancels, so it carries no gradient)
        e = jnp.exp(s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True)))
        o = jnp.einsum("bhqk,bhkc->bhqc", e.astype(v.dtype), v_BHec, preferred_element_type=jnp.float32)
        outs.append((o / e.sum(axis=-1, keepdims=True)).astype(v.dtype))
    out_BHqc = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return jnp.swapaxes(out_BHqc, 1, 2)


def _cudnn(q, k, v, q_level, k_level, scale):
    """cuDNN flash attention (B, L, H, c layout, as here); the block-causal mask goes in as an additive bias."""
    if jnp.dtype(v.dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention implementation 'cudnn' needs bfloat16 or float16 inputs, got {v.dtype}; use "
            "implementation='xla' (or 'auto') for float32."
        )
    allowed = mask_qk(q_level, k_level)
    bias = jnp.asarray(np.where(allowed, 0.0, -1e9)[None, None], dtype=v.dtype)  # (1, 1, Lq, Lk)
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), bias=bias, scale=scale,
                                        implementation="cudnn").astype(v.dtype)


def _splash(q, k, v, q_level, k_level, scale, interpret: bool | None = None):
    """TPU splash attention, vmapped over the batch, with a static block-sparse mask.

    Tokens are padded to a multiple of ``SPLASH_BLOCK``: padded keys are masked for every query, padded queries
    see the real keys (so no softmax row is empty) and are dropped afterwards. The kernel does not scale the
    logits, so q is scaled first. Under a device mesh (``jax.set_mesh``, as the trainer traces) the kernel runs
    in a ``shard_map`` over the batch and head shards of the logical rules ``batch`` and ``heads``: XLA does
    not partition a Mosaic kernel by itself.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if interpret is None:
        interpret = _platform() != "tpu"
    Lq, Lk = q.shape[1], k.shape[1]
    pq, pk = -Lq % SPLASH_BLOCK, -Lk % SPLASH_BLOCK
    top = int(max(q_level.max(), k_level.max()))
    ql = np.concatenate([q_level, np.full(pq, k_level.max())])
    kl = np.concatenate([k_level, np.full(pk, top + 1)])
    mask = mask_qk(ql, kl)

    def attend(q_bhLc, k_bhLc, v_bhLc):  # one device's (batch, heads) shard
        kernel = sa.make_splash_mha_single_device(
            sa.MultiHeadMask([sa.NumpyMask(mask)] * q_bhLc.shape[1]),
            block_sizes=sa.BlockSizes.get_default(),
            interpret=interpret,
        )
        return jax.vmap(kernel)(q_bhLc, k_bhLc, v_bhLc)

    def to_hlc(x, pad):  # (B, L, H, c) -> (B, H, L + pad, c)
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))

    args = (to_hlc((q.astype(jnp.float32) * scale).astype(q.dtype), pq), to_hlc(k, pk), to_hlc(v, pk))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = attend(*args)
    else:
        spec = nn.logical_to_mesh_axes(("batch", "heads", None, None))
        out = jax.shard_map(attend, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(*args)
    return jnp.swapaxes(out[:, :, :Lq], 1, 2).astype(v.dtype)
