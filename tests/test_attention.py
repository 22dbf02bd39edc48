"""Block-causal attention: every implementation matches the dense reference in value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varjax.models.attention import block_causal_attention, mask_qk, scale_blocks
from varjax.models.var import level_ids

PATCH_NUMS = (1, 2, 3, 4)
B, H, C = 2, 2, 16


def _qkv(Lq, Lk, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, Lq, H, C), dtype), jax.random.normal(ks[1], (B, Lk, H, C), dtype),
            jax.random.normal(ks[2], (B, Lk, H, C), dtype))


def training_case():
    lvl = level_ids(PATCH_NUMS)
    return lvl, lvl


def sampling_case():
    """Queries: scale 2 (9 tokens); keys: scales 0..2 then 5 unfilled cache slots with a level above all."""
    lvl = level_ids(PATCH_NUMS)
    q_level = lvl[lvl == 2]
    k_level = np.concatenate([lvl[lvl <= 2], np.full(5, len(PATCH_NUMS), np.int32)])
    return q_level, k_level


CASES = {"training": training_case, "sampling": sampling_case}


def _impls():
    skip = _splash_skip()
    out = ["xla", "auto", pytest.param("splash", marks=pytest.mark.skipif(bool(skip), reason=skip or "-"))]
    gpu = any(d.platform == "gpu" for d in jax.devices())
    out.append(pytest.param("cudnn", marks=pytest.mark.skipif(not gpu, reason="cudnn needs an NVIDIA GPU")))
    return out


def _splash_skip() -> str:
    """Empty when splash attention can run here (on TPU, or in Pallas interpret mode elsewhere)."""
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the installed jax
        return f"splash attention cannot be imported: {e}"
    return ""


def _loss_and_grads(impl, q, k, v, q_level, k_level, scale):
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape[:3] + (v.shape[-1],))

    def f(q, k, v):
        o = block_causal_attention(q, k, v, q_level, k_level, scale=scale, implementation=impl)
        return (o.astype(jnp.float32) * w).sum(), o

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", _impls())
def test_matches_reference(impl, case):
    q_level, k_level = CASES[case]()
    q, k, v = _qkv(len(q_level), len(k_level), dtype=jnp.bfloat16 if impl == "cudnn" else jnp.float32)
    scale = 0.25 / np.sqrt(C)
    out, grads = _loss_and_grads(impl, q, k, v, q_level, k_level, scale)
    ref_out, ref_grads = _loss_and_grads("reference", q, k, v, q_level, k_level, scale)
    tol = 2e-2 if impl == "cudnn" else 1e-5
    assert out.shape == q.shape and out.dtype == v.dtype
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=tol, rtol=tol)
    for g, rg in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.float32(g), np.float32(rg), atol=tol, rtol=tol)


def test_reference_is_masked_softmax():
    """The reference itself, against a per-query loop over the visible keys in numpy (float64)."""
    q_level, k_level = sampling_case()
    q, k, v = (np.float64(x) for x in _qkv(len(q_level), len(k_level), seed=3))
    out = np.asarray(block_causal_attention(*(jnp.float32(x) for x in (q, k, v)), q_level, k_level, scale=0.5,
                                            implementation="reference"))
    for i in range(len(q_level)):
        vis = k_level <= q_level[i]
        s = np.einsum("bhc,bkhc->bhk", q[:, i], k[:, vis]) * 0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[:, i], np.einsum("bhk,bkhc->bhc", p, v[:, vis]), atol=1e-5)


def test_scale_blocks_cover_the_mask():
    lvl = level_ids((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    allowed = mask_qk(lvl, lvl)
    blocks = scale_blocks(lvl, lvl)
    assert len(blocks) == 10 and blocks[0][0] == 0 and blocks[-1][1] == len(lvl)
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    for qs, qe, ke in blocks:  # exactly the visible keys: all before k_end, none after
        assert allowed[qs:qe, :ke].all() and not allowed[qs:qe, ke:].any()
    q_level, k_level = sampling_case()
    assert scale_blocks(q_level, k_level) == [(0, 9, 14)]
    assert scale_blocks(lvl[::-1], lvl) is None


def test_unsorted_levels_fall_back_to_the_mask():
    lvl = level_ids(PATCH_NUMS)[::-1].copy()
    q, k, v = _qkv(len(lvl), len(lvl), seed=5)
    args = (q, k, v, lvl, lvl)
    np.testing.assert_allclose(block_causal_attention(*args, scale=0.3, implementation="xla"),
                               block_causal_attention(*args, scale=0.3, implementation="reference"), atol=1e-6)


def test_bad_levels_are_rejected():
    q, k, v = _qkv(3, 3)
    with pytest.raises(ValueError, match="one level per"):
        block_causal_attention(q, k, v, np.zeros(2, int), np.zeros(3, int), scale=1.0)
    with pytest.raises(ValueError, match="not one of"):
        block_causal_attention(q, k, v, np.zeros(3, int), np.zeros(3, int), scale=1.0, implementation="flash")


def test_splash_under_a_mesh_runs_per_shard_and_matches_reference():
    """Under the trainer's mesh context the splash kernel runs in a shard_map over the batch and head shards
    (XLA cannot partition a Mosaic kernel); values and gradients still match the reference."""
    from varjax.core import mesh as sharding

    skip = _splash_skip()
    if skip:
        pytest.skip(skip)
    mesh = sharding.create_mesh([("data", 2), ("fsdp", 1), ("tensor", 2)], devices=jax.devices()[:4])
    q_level, k_level = training_case()
    q, k, v = _qkv(len(q_level), len(k_level), seed=3)
    scale = 0.25 / np.sqrt(C)
    ref_out, ref_grads = _loss_and_grads("reference", q, k, v, q_level, k_level, scale)
    with sharding.mesh_rules(mesh):
        fn = jax.jit(lambda q, k, v: _loss_and_grads("splash", q, k, v, q_level, k_level, scale))
        hlo = fn.lower(q, k, v).as_text()
        out, grads = fn(q, k, v)
    assert "shard_map" in hlo or "manual" in hlo.lower()
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.float32(g), np.float32(rg), atol=1e-5, rtol=1e-5)


def test_auto_follows_the_target_platform():
    """``varjax compile --topology`` traces on a CPU host what a TPU or GPU runs."""
    from varjax.models.attention import _auto, target_platform

    with target_platform("tpu"):
        assert _auto(jnp.bfloat16) == "splash"
        with target_platform("gpu"):
            assert _auto(jnp.bfloat16) == "cudnn" and _auto(jnp.float32) == "xla"
        assert _auto(jnp.float32) == "splash"
    assert _auto(jnp.float32) == {"tpu": "splash"}.get(jax.default_backend(), "xla")
