"""The analytic FLOP count (varjax/models/flops.py) against XLA's cost analysis of the compiled forward pass.

With ``attention='reference'`` the model computes the full L x L attention scores and then applies the
block-causal mask, so the compiled program does the dense attention work: XLA's count matches
``attention='dense'``, not ``'masked'`` (the work a block-sparse kernel would do, and the convention of the
scaling-law compute C). XLA also counts the element-wise work (norms, softmax, GELU, AdaLN modulation) that
the formula leaves out, so it lies a few percent above the dense count, never below it. The ``xla`` path
computes one score block per scale over the keys that scale may see, so its count lies between the two.
"""

import jax
import jax.numpy as jnp
import pytest
from flax.core import meta

from varjax.models import flops
from varjax.models.var import VAR, VARConfig


def xla_forward_flops(cfg: VARConfig, batch: int) -> float:
    lab = jnp.zeros((batch,), jnp.int32)
    x = jnp.zeros((batch, cfg.L - cfg.first_l, cfg.Cvae), jnp.float32)
    init = lambda r: VAR(cfg).init(r, lab[:1], x[:1], method=VAR.init_all)["params"]  # noqa: E731
    params = meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
    fwd = jax.jit(lambda p, lb, xx: VAR(cfg).apply({"params": p}, lb, xx))
    cost = fwd.lower(params, lab, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _cfg(C, patch_nums, V, attention="reference"):
    return VARConfig(depth=2, embed_dim=C, num_heads=2, num_classes=10, vocab_size=V, Cvae=8, patch_nums=patch_nums,
                     attention=attention)


@pytest.mark.parametrize("C,V", [(64, 64), (128, 256)])
def test_matmul_dominated_config_matches_within_a_few_percent(C, V):
    cfg = _cfg(C, (1, 2, 3, 4), V)
    B = 4
    xla = xla_forward_flops(cfg, B)
    dense = flops.forward_flops_per_sequence(cfg, attention="dense") * B
    assert dense <= xla <= 1.06 * dense, (xla, dense)
    # the batch enters linearly
    assert xla_forward_flops(cfg, 2 * B) == pytest.approx(2 * xla, rel=1e-3)


def test_attention_heavy_config_counts_dense_attention():
    cfg = _cfg(32, (1, 2, 3, 4, 5, 6, 8), 16)  # L = 155: attention is a large share of the work
    B = 2
    xla = xla_forward_flops(cfg, B)
    dense = flops.forward_flops_per_sequence(cfg, attention="dense") * B
    masked = flops.forward_flops_per_sequence(cfg, attention="masked") * B
    assert masked < 0.85 * dense  # the two conventions differ clearly here
    assert dense <= xla <= 1.12 * dense, (xla, dense)
    assert xla > 1.2 * masked  # the program does not skip the masked-out scores
    per_scale = xla_forward_flops(_cfg(32, (1, 2, 3, 4, 5, 6, 8), 16, attention="xla"), B)
    assert masked <= per_scale < 0.95 * xla, (per_scale, masked, xla)  # the per-scale path skips most of them
