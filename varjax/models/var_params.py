"""Stored layouts of the VAR transformer's parameters, and the one function that fits any of them to a config.

Two layouts differ beyond names: with ``scan_layers`` the blocks' parameters are stacked under ``blocks`` with a
leading (depth,) axis instead of ``blocks_0`` ... ``blocks_{depth-1}``; and ``PARAM_LAYOUT`` 1 (model directories
written before layout 2) keeps the fused QKV kernel flat (C, 3C) and the AdaLN kernels (C, 6C) / biases (6C,),
where layout 2 splits them (C, 3, H, c) and (C, 6, C) / (6, C) so that tensor parallelism splits them at head and
chunk boundaries. Model directories, exports and conversion all go through :func:`fit_var_params`.
"""

from __future__ import annotations

import re

import flax
import jax
import numpy as np

from varjax.models.var import VARConfig


def _block_index(name: str) -> int | None:
    m = re.fullmatch(r"blocks_(\d+)", name)
    return int(m.group(1)) if m else None


def stack_blocks(params) -> dict:
    """Per-block tree (``blocks_0`` ... ``blocks_{n-1}``) -> ``blocks`` with every leaf stacked on axis 0
    (the ``scan_layers`` layout). A tree that is already stacked is returned as it is."""
    params = dict(flax.core.unfreeze(params))
    idx = sorted(i for k in params if (i := _block_index(k)) is not None)
    if not idx:
        return params
    if idx != list(range(len(idx))):
        raise ValueError(f"block parameters are not numbered 0..{len(idx) - 1}: blocks_{idx}.")
    blocks = [params.pop(f"blocks_{i}") for i in idx]
    return {**params, "blocks": jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)}


def unstack_blocks(params) -> dict:
    """Inverse of ``stack_blocks``: ``blocks`` with a leading (depth,) axis -> ``blocks_0`` ... A per-block tree is
    returned as it is."""
    params = dict(flax.core.unfreeze(params))
    if "blocks" not in params:
        return params
    stacked = params.pop("blocks")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
        params[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
    return params


def _split_layout(path: tuple[str, ...], arr: np.ndarray, cfg: VARConfig) -> np.ndarray:
    """Layout 1 (flat (C, 3C) QKV and (C, 6C) / (6C,) AdaLN leaves) -> layout 2 (split); others unchanged."""
    C, H = cfg.embed_dim, cfg.num_heads
    if len(path) < 2:
        return arr
    if path[-2:] == ("mat_qkv", "kernel") and arr.ndim == 2:
        return arr.reshape(C, 3, H, C // H)
    is_ada = path[-2] == "shared_ada_lin" or (path[-2] == "ada_lin" and path[0] != "head_nm")
    if is_ada and path[-1] == "kernel" and arr.ndim == 2:
        return arr.reshape(arr.shape[0], 6, C)
    if is_ada and path[-1] == "bias" and arr.ndim == 1:
        return arr.reshape(6, C)
    return arr


def fit_var_params(params, cfg: VARConfig) -> dict:
    """Any stored VAR parameter layout (per-block or stacked; flat or split QKV / AdaLN, i.e. model directories
    written before ``PARAM_LAYOUT`` 2) -> the layout ``cfg`` builds (``cfg.scan_layers``)."""
    flat = flax.traverse_util.flatten_dict(unstack_blocks(params))
    per_block = flax.traverse_util.unflatten_dict({p: _split_layout(p, np.asarray(v), cfg) for p, v in flat.items()})
    return stack_blocks(per_block) if cfg.scan_layers else per_block
