"""Sampler semantics: top-k / top-p filtering as the reference, one compiled program, a d16-sized model on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varjax.models.var import VAR, VARConfig
from varjax.models.vqvae import PATCH_NUMS_256, VQVAE, VQVAEConfig
from varjax.sampling.var import (
    SampleOptions,
    keep_masks,
    make_sampler,
    sample_codes,
    sampling_config,
    top_k_top_p,
    top_k_top_p_filter,
)


def reference_filter(logits, top_k, top_p):
    """The reference's sample_with_top_k_top_p_ masking, written out in numpy."""
    out = logits.copy()
    if top_k > 0:
        kth = np.sort(out, axis=-1)[..., -top_k][..., None]
        out[out < kth] = -np.inf
    if top_p > 0:
        order = np.argsort(out, axis=-1, kind="stable")
        srt = np.take_along_axis(out, order, -1)
        p = np.exp(srt - srt.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        remove = np.cumsum(p, -1) <= 1 - top_p
        remove[..., -1] = False
        mask = np.zeros_like(remove)
        np.put_along_axis(mask, order, remove, -1)
        out[mask] = -np.inf
    return out


def test_top_k_top_p_match_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 50)).astype(np.float32) * 3
    for k, p in [(0, 0.0), (1, 0.0), (7, 0.0), (0, 0.5), (0, 0.96), (10, 0.8), (50, 0.3)]:
        got = np.asarray(top_k_top_p_filter(jnp.asarray(logits), k, p))
        want = reference_filter(logits, k, p)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=f"top_k={k} top_p={p}")
        assert np.isfinite(got).sum(-1).min() >= 1


def reference_smooth_codes(logits, gumbel, ratio, codebook, top_k, top_p):
    """The reference's more_smooth codes: its sampler masks the logits in place, then gumbel_softmax_with_rng
    smooths those masked logits (times 1 + ratio) at temperature max(0.27 (1 - 0.95 ratio), 0.005)."""
    masked = reference_filter(logits, top_k, top_p)
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    z = (masked * (1 + ratio) + gumbel) / tau
    y = np.exp(z - z.max(-1, keepdims=True))
    y /= y.sum(-1, keepdims=True)
    return y @ codebook


def test_more_smooth_smooths_the_filtered_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 64)).astype(np.float32) * 0.3
    codebook = rng.normal(size=(64, 4)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    gumbel = np.asarray(jax.random.gumbel(jax.random.split(key)[1], logits.shape))  # the noise sample_codes draws
    for k, p, ratio in [(5, 0.0, 0.5), (0, 0.6, 1.0), (20, 0.9, 0.25)]:
        opts = SampleOptions(top_k=k, top_p=p, more_smooth=True)
        idx, h = sample_codes(key, jnp.asarray(logits), opts, ratio, jnp.asarray(codebook))
        want = reference_smooth_codes(logits, gumbel, ratio, codebook, k, p)
        np.testing.assert_allclose(np.asarray(h), want, rtol=1e-4, atol=1e-5)
        unfiltered = reference_smooth_codes(logits, gumbel, ratio, codebook, 0, 0.0)
        assert np.abs(want - unfiltered).max() > 1e-3  # the filter matters for these cases
        assert np.isfinite(reference_filter(logits, k, p))[np.arange(2)[:, None], np.arange(6), np.asarray(idx)].all()


def test_sampling_distribution_is_the_renormalised_survivors():
    # One row of 6 logits repeated over many positions: token frequencies must follow softmax over the tokens
    # that survive top-k and top-p, and be zero elsewhere.
    logits = np.log(np.array([0.30, 0.25, 0.20, 0.12, 0.08, 0.05], np.float32))
    n = 40_000
    tiled = jnp.asarray(np.tile(logits, (1, n, 1)))
    for k, p in [(4, 0.0), (0, 0.7), (5, 0.7)]:
        kept = np.isfinite(reference_filter(logits[None, None], k, p))[0, 0]
        want = np.where(kept, np.exp(logits), 0)
        want /= want.sum()
        idx, _ = sample_codes(jax.random.PRNGKey(k), tiled, SampleOptions(top_k=k, top_p=p), 1.0, jnp.eye(6))
        freq = np.bincount(np.asarray(idx).ravel(), minlength=6) / n
        np.testing.assert_allclose(freq, want, atol=0.01, err_msg=f"top_k={k} top_p={p}")


def test_top_k_top_p_returns_sorted_survivors_and_greedy_is_argmax():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 7, 100)).astype(np.float32)
    vals, idx = top_k_top_p(jnp.asarray(logits), 10, 0.5)
    assert vals.shape == idx.shape == (3, 7, 10)
    np.testing.assert_array_equal(
        np.take_along_axis(logits, np.asarray(idx), -1)[np.isfinite(vals)], np.asarray(vals)[np.isfinite(vals)]
    )
    greedy, _ = sample_codes(
        jax.random.PRNGKey(0), jnp.asarray(logits), SampleOptions(top_k=1, top_p=0.0), 1.0, jnp.zeros((100, 2))
    )
    np.testing.assert_array_equal(np.asarray(greedy), logits.argmax(-1))


def test_sampling_config_checks_dtype_and_attention():
    cfg = VARConfig(depth=1, embed_dim=16, num_heads=2)
    with pytest.raises(ValueError, match="--dtype"):
        sampling_config(cfg, SampleOptions(dtype="int8"))
    assert sampling_config(cfg, SampleOptions()) is cfg
    if "attention" in VARConfig.__dataclass_fields__:
        assert sampling_config(cfg, SampleOptions(attention="xla")).attention == "xla"
    else:
        with pytest.raises(ValueError, match="--attention"):
            sampling_config(cfg, SampleOptions(attention="xla"))


def test_keep_masks_force_tiny_scales_and_threshold():
    keep = jnp.zeros((1, 8, 8)).at[:, :4].set(1.0)  # keep the top half
    masks = keep_masks(keep, (1, 2, 4, 8))
    assert masks[0].all()  # a scale of <= 3 tokens always keeps the input
    np.testing.assert_array_equal(np.asarray(masks[1]).reshape(2, 2), [[True, True], [False, False]])
    m8 = np.asarray(masks[3]).reshape(8, 8)
    assert m8[:4].all() and not m8[4:].any()


def tiny_vae_cfg(patch_nums=PATCH_NUMS_256, vocab=4096):
    return VQVAEConfig(
        vocab_size=vocab,
        z_channels=32,
        ch=8,
        ch_mult=(1, 1, 1, 1, 1),
        num_res_blocks=1,
        using_sa=False,
        using_mid_sa=False,
        num_groups=8,
        patch_nums=patch_nums,
    )


def init_params(model, *args, method):
    # one compiled program: run op by op, an init dispatches (and compiles) hundreds of small ones
    return jax.jit(lambda *a: model.init(jax.random.PRNGKey(0), *a, method=method)["params"])(*args)


def abstract_params(model, *args, method):
    """Parameter shapes of ``model`` without computing them (jax.eval_shape), unboxed."""
    return flax_unbox(jax.eval_shape(lambda: init_params(model, *args, method=method)))


def test_d16_sized_sampling_lowers_to_one_program():
    # The transformer has the released d16 shape (310M parameters, 10 scales, 4096 codes); the parameters stay
    # abstract and nothing runs; the tokenizer is narrow. XLA's compile of the same code path is exercised by
    # test_ten_scale_sampling_reuses_its_program (all 10 scales, a narrow width), and at d16 by the GPU suite.
    var_cfg = VARConfig.official(16, num_classes=1000)
    vae_cfg = tiny_vae_cfg()
    var_params = abstract_params(
        VAR(var_cfg), jnp.zeros((1,), jnp.int32), jnp.zeros((1, var_cfg.L - 1, 32)), method=VAR.init_all
    )
    assert sum(x.size for x in jax.tree.leaves(var_params)) == 310_283_520
    vae_params = abstract_params(VQVAE(vae_cfg), jnp.zeros((1, 256, 256, 3)), method=VQVAE.init_all)
    sampler = make_sampler(vae_cfg, var_cfg, SampleOptions(cfg=1.5, top_k=900, top_p=0.96))
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    lowered = sampler.lower(vae_params, var_params, labels, jax.random.PRNGKey(0))
    assert lowered.as_text().count("func.func public @main") == 1  # the whole generation is one program
    out = lowered.out_info
    assert out[0].shape == (2, 256, 256, 3) and out[1].shape == (2, 680)


def test_ten_scale_sampling_reuses_its_program():
    # All 10 scales of the 256px schedule and 4096 codes, at a narrow width so it runs quickly.
    var_cfg = VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=1000, vocab_size=4096, Cvae=32)
    vae_cfg = tiny_vae_cfg()
    var_params = init_params(
        VAR(var_cfg), jnp.zeros((1,), jnp.int32), jnp.zeros((1, var_cfg.L - 1, 32)), method=VAR.init_all
    )
    vae_params = init_params(VQVAE(vae_cfg), jnp.zeros((1, 256, 256, 3)), method=VQVAE.init_all)
    sampler = make_sampler(vae_cfg, var_cfg, SampleOptions(cfg=1.5, top_k=900, top_p=0.96))
    labels = jnp.asarray([1, 980], jnp.int32)
    img, tokens = sampler(vae_params, var_params, labels, jax.random.PRNGKey(0))
    img2, tokens2 = sampler(vae_params, var_params, labels, jax.random.PRNGKey(1))
    assert sampler._cache_size() == 1  # the second call reused the one compiled program
    assert img.shape == (2, 256, 256, 3) and tokens.shape == (2, 680)
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 4096
    assert (np.asarray(tokens) != np.asarray(tokens2)).any()  # a different seed samples differently


def flax_unbox(tree):
    from flax.core import meta

    return meta.unbox(tree)


def test_bfloat16_sampling_computes_in_bfloat16():
    pns = (1, 2, 4)
    var_cfg = VARConfig(depth=1, embed_dim=32, num_heads=2, num_classes=4, vocab_size=64, Cvae=8, patch_nums=pns)
    vae_cfg = VQVAEConfig(
        vocab_size=64,
        z_channels=8,
        ch=8,
        ch_mult=(1, 1),
        num_res_blocks=1,
        using_sa=False,
        using_mid_sa=False,
        num_groups=4,
        patch_nums=pns,
    )
    var_params = flax_unbox(
        init_params(VAR(var_cfg), jnp.zeros((1,), jnp.int32), jnp.zeros((1, var_cfg.L - 1, 8)), method=VAR.init_all)
    )
    vae_params = init_params(VQVAE(vae_cfg), jnp.zeros((1, 8, 8, 3)), method=VQVAE.init_all)
    labels = jnp.asarray([0, 3], jnp.int32)
    sampler = make_sampler(vae_cfg, var_cfg, SampleOptions(top_k=10, top_p=0.9, dtype="bfloat16"))
    hlo = sampler.lower(vae_params, var_params, labels, jax.random.PRNGKey(0)).as_text()
    assert "bf16" in hlo and hlo.count("func.func public @main") == 1
    img, tokens = sampler(vae_params, var_params, labels, jax.random.PRNGKey(0))
    assert img.dtype == jnp.float32 and img.shape == (2, 8, 8, 3)
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    assert tokens.shape == (2, var_cfg.L) and int(tokens.min()) >= 0 and int(tokens.max()) < 64
