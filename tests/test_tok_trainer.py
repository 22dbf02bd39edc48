"""Tokenizer trainer: loss, discriminator/adaptive weight, EMA and usage bookkeeping, end-to-end into VAR."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from tests import _tiny
from varjax import config, train
from varjax.core import metrics, model_dir
from varjax.models.vqvae import VQVAE
from varjax.tasks import tokenizer as tt

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(**overrides):
    """16x16 images, 2 levels, scales 1-2-4-8: compiles and steps in well under a second."""
    c = _tiny.load("tokenizer_shapes:runlocal")
    c.vae.ch_mult = (1, 2)
    c.vae.ch = 16
    c.vae.num_groups = 4
    c.batch_size = 4
    c.eval_every = 0
    c.image_every = 0
    c.disc.n_layers = 2
    c.disc.ndf = 8
    return _tiny.set_fields(c, **overrides)


def make_task(cfg, total_steps=100):
    """(task with the loop's EMA, its init and step, model config, initial state) on one device."""
    from varjax.core import mesh as mesh_lib

    cfg.total_steps = total_steps
    plan = _tiny.plan_without_data(cfg)
    mesh = mesh_lib.create_mesh(plan.mesh, devices=jax.devices()[:1])
    task = tt.build(plan, mesh)
    init_fn, step_fn = train.with_ema(task.init_fn, task.step_fn, plan.ema_decay)
    state = meta.unbox(jax.jit(init_fn)(jax.random.PRNGKey(0)))  # parameters carry logical-axis boxes
    return task, jax.jit(step_fn), plan.model, state


def batch_of(n=4, side=16, seed=0):
    """Smooth random images in [-1, 1] (blocky, so the tiny tokenizer can fit them)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(-1, 1, (n, side // 4, side // 4, 3)).astype(np.float32)
    return {"image": jnp.asarray(np.repeat(np.repeat(small, 4, 1), 4, 2)), "label": jnp.zeros((n,), jnp.int32)}


def test_loss_falls_on_a_fixed_batch():
    cfg = tiny_cfg(ema_decay=0.0)
    task, step, _, state = make_task(cfg, total_steps=1000)
    batch = batch_of()
    losses, recon, psnrs = [], [], []
    for _ in range(40):
        state, m = step(state, batch, task.frozen)
        losses.append(float(m["loss"]))
        recon.append(float(m["recon_l1"] + m["recon_l2"]))
        psnrs.append(float(m["psnr"]))
    assert all(np.isfinite(losses))
    # the reconstruction part falls steadily (the quantizer term first grows with the encoder's features)
    assert np.mean(recon[-5:]) < 0.5 * np.mean(recon[:3]), recon
    assert losses[-1] < max(losses), losses
    assert psnrs[-1] > psnrs[0] + 5, psnrs
    assert int(state["step"]) == 40
    # with ema_decay 0 there is no EMA: the exported weights are the trained weights
    assert "ema_params" not in state
    assert task.manifest["vae"]["params"]["subtree"] == ["params"]


def test_discriminator_and_adaptive_weight_after_disc_start():
    cfg = tiny_cfg(disc_weight=0.5, disc_start=1, adaptive_disc_weight=True)
    task, step, _, state = make_task(cfg)
    batch = batch_of()
    d0 = state["disc_params"]
    s1, m1 = step(state, batch, task.frozen)  # step 0 < disc_start: discriminator frozen, no adversarial term
    assert float(m1["disc_factor"]) == 0.0 and float(m1["d_weight"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, s1["disc_params"], jax.device_get(d0))
    s2, m2 = step(s1, batch, task.frozen)  # step 1: on
    assert float(m2["disc_factor"]) == 1.0
    for k in ("loss", "g_loss", "d_loss", "d_weight", "grad_norm"):
        assert np.isfinite(float(m2[k])), k
    assert float(m2["d_weight"]) > 0
    assert float(m2["d_loss"]) > 0
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), s2["disc_params"], s1["disc_params"]))
    assert any(changed)
    leaves = jax.tree.leaves(s2["params"]) + jax.tree.leaves(s2["disc_params"])
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


# The EMA and usage tests train one program (both decays set), the loss test another (no EMA).
BOOKKEEPING = dict(ema_decay=0.9, usage_decay=0.5)


def test_ema_bookkeeping_two_steps():
    d = BOOKKEEPING["ema_decay"]
    task, step, _, state = make_task(tiny_cfg(**BOOKKEEPING))
    p0 = np.asarray(state["params"]["decoder"]["conv_out"]["bias"])
    s1, _ = step(state, batch_of(seed=1), task.frozen)
    p1 = np.asarray(s1["params"]["decoder"]["conv_out"]["bias"])
    s2, _ = step(s1, batch_of(seed=2), task.frozen)
    p2 = np.asarray(s2["params"]["decoder"]["conv_out"]["bias"])
    assert not np.allclose(p0, p1)
    want = d * (d * p0 + (1 - d) * p1) + (1 - d) * p2
    np.testing.assert_allclose(np.asarray(s2["ema_params"]["decoder"]["conv_out"]["bias"]), want, rtol=1e-5, atol=1e-7)
    # the model directory's default weights are the EMA, the raw ones beside them
    assert task.manifest["vae"]["params"]["subtree"] == ["ema_params"]
    assert task.manifest["vae"]["params"]["raw_subtree"] == ["params"]


def hits_of(vae_cfg, params, img):
    idx = jax.jit(lambda p, x: VQVAE(vae_cfg).apply({"params": p}, x, method=VQVAE.img_to_idx))(params, img)
    out = np.zeros((len(idx), vae_cfg.vocab_size), np.float32)
    for k, i in enumerate(idx):
        np.add.at(out[k], np.asarray(i).ravel(), 1)
    return out


def test_usage_bookkeeping_against_hand_counted_hits():
    u = BOOKKEEPING["usage_decay"]
    cfg = tiny_cfg(**BOOKKEEPING)
    task, step, vae_cfg, state = make_task(cfg)
    b1, b2 = batch_of(seed=3), batch_of(seed=4)
    h1 = hits_of(vae_cfg, state["params"], b1["image"])
    assert h1.sum(1).tolist() == [4 * p * p for p in vae_cfg.patch_nums]
    s1, _ = step(state, b1, task.frozen)
    h2 = hits_of(vae_cfg, s1["params"], b2["image"])
    s2, m2 = step(s1, b2, task.frozen)
    want = u * ((1 - u) * h1) + (1 - u) * h2
    np.testing.assert_allclose(np.asarray(s2["usage_SV"]), want, rtol=1e-6)
    margin = tt.usage_margin(cfg.batch_size, vae_cfg)
    for k in range(len(vae_cfg.patch_nums)):
        np.testing.assert_allclose(float(m2[f"usage_s{k}"]), np.mean(want[k] >= margin) * 100, rtol=1e-6)
    assert float(m2["dead_codes"]) == np.sum(want.sum(0) < cfg.dead_code_threshold)


def test_dead_code_reinit_uses_batch_features():
    emb = jnp.arange(12.0).reshape(4, 3)
    usage = jnp.asarray([[1.0, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.001]])
    feats = 100 + jnp.arange(15.0).reshape(5, 3)
    new, new_usage, dead = tt.reinit_dead_codes(emb, usage, feats, 0.01, jax.random.PRNGKey(0))
    assert dead.tolist() == [False, True, False, True]
    np.testing.assert_array_equal(new[jnp.asarray([0, 2])], emb[jnp.asarray([0, 2])])
    feat_rows = {tuple(r) for r in np.asarray(feats).tolist()}
    assert tuple(np.asarray(new[1]).tolist()) in feat_rows and tuple(np.asarray(new[3]).tolist()) in feat_rows
    np.testing.assert_allclose(np.asarray(new_usage)[:, 1], [0.005, 0.005])
    again, _, _ = tt.reinit_dead_codes(emb, usage, feats, 0.01, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(again, new)  # deterministic given the rng


def test_init_from_must_match_architecture(tmp_path):
    cfg = tiny_cfg()
    loaded = tt.model_config(cfg)
    model_dir.write_manifest(tmp_path, model_dir.manifest("vq", loaded, {"dir": "vae"}))  # only the manifest is read
    cfg.init_from = str(tmp_path)
    cfg.vae.dropout = 0.1
    assert tt.model_config(cfg).dropout == 0.1
    cfg.vae.vocab_size = 128
    with pytest.raises(ValueError, match="config.vae.vocab_size"):
        tt.model_config(cfg)
    cfg.init_from = ""
    cfg.require_init_from = True
    with pytest.raises(ValueError, match="config.init_from is empty"):
        tt.model_config(cfg)


def test_end_to_end_checkpoint_feeds_tokenize_and_var_training(shapes_data, tmp_path):
    # (tests/test_distributed_launch.py trains this config too: one compile for both, through the cache)
    cfg = _tiny.load("tokenizer_shapes:runlocal", total_steps=2, ckpt_every=2, eval_every=2, image_every=2,
                     async_ckpt=False)
    wd = str(tmp_path / "tok")
    last = train.train(config.resolve(cfg), wd)
    assert np.isfinite(last["loss"]) and "val_psnr" in last and "usage_s0" in last
    rows = metrics.read_jsonl(str(Path(wd) / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    assert (Path(wd) / "checkpoints" / "2").is_dir()
    man = json.loads((Path(wd) / "varjax_model.json").read_text())
    assert man["family"] == "vq" and man["vae"]["params"]["subtree"] == ["ema_params"] and "var" not in man

    tok = model_dir.load_model_dir(wd)
    assert tok.family == "vq" and not tok.is_generator and tok.tok_cfg == tt.model_config(cfg)
    img = batch_of(n=2, side=32)["image"]
    rec = jax.jit(lambda p, x: VQVAE(tok.tok_cfg).apply({"params": p}, x, method=VQVAE.img_to_recon))(tok.tok_params,
                                                                                                       img)
    assert rec.shape == img.shape and bool(jnp.all(jnp.isfinite(rec)))

    vcfg = _tiny.var_config(wd, total_steps=2)
    out = train.train(config.resolve(vcfg), str(tmp_path / "var"))
    assert np.isfinite(out["loss"])


def test_decoder_finetune_keeps_the_encoder_exactly(shapes_data, tmp_path):
    """``configs/ecar_decoder_shapes.py`` after the KL tokenizer (as ``varjax main --model ecar`` runs them): the
    encoder, and so every latent, is unchanged to the bit; the decoder trained on noisy latents is not."""
    tok, dec = str(tmp_path / "tok"), str(tmp_path / "dec")
    train.train(config.resolve(_tiny.load("ecar_tokenizer_shapes:runlocal", total_steps=2, eval_every=0,
                                          image_every=0, **_tiny.QUIET)), tok)
    cfg = _tiny.load("ecar_decoder_shapes:runlocal", total_steps=2, eval_every=0, image_every=0, init_from=tok,
                     **_tiny.QUIET)
    assert tuple(cfg.freeze) == ("encoder",) and cfg.decoder_noise > 0
    last = train.train(config.resolve(cfg), dec)
    assert np.isfinite(last["loss"])
    before, after = model_dir.load_model_dir(tok).tok_params, model_dir.load_model_dir(dec).tok_params
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["encoder"]),
                                                    jax.tree.leaves(after["encoder"]), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["decoder"]),
                                                        jax.tree.leaves(after["decoder"]), strict=True))


def test_freeze_names_the_unknown_group():
    with pytest.raises(ValueError, match=r"config.freeze names \['encodr'\]"):
        tt.freeze({"encoder": 1, "decoder": 2}, {"encoder": 0, "decoder": 0}, ("encodr",))
    assert tt.freeze({"encoder": 1, "decoder": 2}, {"encoder": 0, "decoder": 0}, ("encoder",)) == {
        "encoder": 0, "decoder": 2}
