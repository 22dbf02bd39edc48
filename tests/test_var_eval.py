"""VAR evaluation: the reference trainer's eval losses (class labels dropped at cond_drop_rate, as its
``VAR.forward`` does in eval mode too) with a fixed key, and the undropped values."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varjax.models.var import VAR, VARConfig
from varjax.models.vqvae import VQVAE, VQVAEConfig
from varjax.tasks.var import eval_label_drop, make_eval_fn

PNS = (1, 2, 4)
NCLS = 5


@pytest.fixture(scope="module")
def models():
    vae_cfg = VQVAEConfig(vocab_size=32, z_channels=8, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, using_sa=False,
                          using_mid_sa=False, patch_nums=PNS, num_groups=4)
    vae_params = jax.jit(lambda k: VQVAE(vae_cfg).init(k, jnp.zeros((1, 16, 16, 3)), method=VQVAE.init_all))(
        jax.random.PRNGKey(0))["params"]
    var_cfg = VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=NCLS, vocab_size=32, Cvae=8, patch_nums=PNS,
                        cond_drop_rate=0.5, init_adaln_gamma=0.1)
    L = var_cfg.L
    var_params = jax.jit(lambda k: VAR(var_cfg).init(k, jnp.zeros((1,), jnp.int32), jnp.zeros((1, L - 1, 8)),
                                                     method=VAR.init_all))(jax.random.PRNGKey(1))["params"]
    rng = np.random.default_rng(0)
    batches = [
        {"image": rng.uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32),
         "label": rng.integers(0, NCLS, 6).astype(np.int32),
         "mask": np.array([1, 1, 1, 1, 1, 0 if i else 1], np.float32)}
        for i in range(2)
    ]
    return vae_cfg, vae_params, var_cfg, var_params, batches


def reference_stats(vae_cfg, vae_params, var_cfg, var_params, batches, labels_per_batch):
    """The reference's eval_ep sums (CE mean over tokens and over the last scale, argmax accuracy) in numpy."""
    vae, var = VQVAE(vae_cfg), VAR(var_cfg)

    @jax.jit
    def forward(image, labels):
        idx = vae.apply({"params": vae_params}, image, method=VQVAE.img_to_idx)
        x = vae.apply({"params": vae_params}, idx, method=VQVAE.idx_to_var_input)
        return jnp.concatenate(idx, axis=1), var.apply({"params": var_params}, labels, x, train=False)

    last = PNS[-1] ** 2
    tot = np.zeros(4)
    n = 0.0
    for b, labels in zip(batches, labels_per_batch, strict=True):
        gt, logits = forward(jnp.asarray(b["image"]), jnp.asarray(labels))
        gt, logits = np.asarray(gt), np.asarray(logits, np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, gt[..., None], -1)[..., 0]
        hit = logits.argmax(-1) == gt
        for i in np.nonzero(b["mask"])[0]:
            tot += [nll[i].mean(), nll[i, -last:].mean(), hit[i].mean() * 100, hit[i, -last:].mean() * 100]
            n += 1
    return dict(zip(("L_mean", "L_tail", "acc_mean", "acc_tail"), tot / n, strict=True))


def test_eval_drops_labels_like_the_reference_with_a_fixed_key(models):
    vae_cfg, vae_params, var_cfg, var_params, batches = models
    evaluate = make_eval_fn(vae_cfg, var_cfg, seed=7)
    got = evaluate(var_params, vae_params, batches)
    again = evaluate(var_params, vae_params, batches)
    assert got == again  # deterministic

    # the reference: label_B = where(rand(B) < cond_drop_rate, num_classes, label_B), here with fixed draws
    dropped = [np.where(np.random.default_rng((7, i)).random(len(b["label"])) < 0.5, NCLS, b["label"])
               for i, b in enumerate(batches)]
    assert all((eval_label_drop(7, i, len(b["label"]), 0.5) == (d == NCLS)).all() for i, (b, d) in
               enumerate(zip(batches, dropped, strict=True)))
    n_null = sum(int((d == NCLS).sum()) for d in dropped)
    assert 0 < n_null < 12  # some, not all, labels became the null class
    want = reference_stats(vae_cfg, vae_params, var_cfg, var_params, batches, dropped)
    want_nodrop = reference_stats(vae_cfg, vae_params, var_cfg, var_params, batches, [b["label"] for b in batches])
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
        np.testing.assert_allclose(got[f"{k}_nodrop"], want_nodrop[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert abs(got["L_mean"] - got["L_mean_nodrop"]) > 1e-6  # the class does change the prediction


def test_drop_rate_bounds(models):
    vae_cfg, vae_params, var_cfg, var_params, batches = models
    none = make_eval_fn(vae_cfg, dataclasses.replace(var_cfg, cond_drop_rate=0.0))(var_params, vae_params, batches)
    for k in ("L_mean", "L_tail", "acc_mean", "acc_tail"):
        assert none[k] == none[f"{k}_nodrop"]
    every = make_eval_fn(vae_cfg, dataclasses.replace(var_cfg, cond_drop_rate=1.0))(var_params, vae_params, batches)
    null = [np.full_like(b["label"], NCLS) for b in batches]
    want = reference_stats(vae_cfg, vae_params, var_cfg, var_params, batches, null)
    np.testing.assert_allclose(every["L_mean"], want["L_mean"], rtol=1e-5)
    np.testing.assert_allclose(every["L_mean_nodrop"], none["L_mean_nodrop"], rtol=1e-6)
