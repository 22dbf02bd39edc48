"""Block-causal attention of VAR: a query of scale s sees every key of scales <= s.

Letters: B batch, Lq / Lk query / key tokens, H heads, c head dim. ``q_level`` / ``k_level`` hold the scale
index of each token; they are static (numpy), so the mask is a compile-time constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def block_causal_attention(q_BqHc, k_BkHc, v_BkHc, q_level, k_level, *, scale: float, implementation: str = "auto"
                           ) -> jax.Array:
    """q (B, Lq, H, c), k/v (B, Lk, H, c); q_level (Lq,), k_level (Lk,) static numpy int arrays (scale index of
    each token). Query i may attend key j iff k_level[j] <= q_level[i]. Softmax in float32. Returns
    (B, Lq, H, c) in v.dtype.

    This is the dense reference (every ``implementation`` runs it): (B, H, Lq, Lk) float32 scores.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation is {implementation!r}; expected one of {IMPLEMENTATIONS}.")
    mask_qk = np.asarray(k_level)[None, :] <= np.asarray(q_level)[:, None]
    att = jnp.einsum("bqhc,bkhc->bhqk", q_BqHc, k_BkHc).astype(jnp.float32) * scale
    if not mask_qk.all():
        att = jnp.where(jnp.asarray(mask_qk)[None, None], att, -jnp.inf)
    att = jax.nn.softmax(att, axis=-1).astype(v_BkHc.dtype)
    return jnp.einsum("bhqk,bkhc->bqhc", att, v_BkHc)
