"""Parity with the official PyTorch VAR: every array of io_public.npz, from the .pth files beside it."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varjax.interop.convert import convert_var, convert_vqvae
from varjax.interop.torch_io import load_state_dict
from varjax.models.resize import resize_area, resize_bicubic
from varjax.models.var import VAR
from varjax.models.var_params import fit_var_params
from varjax.models.vqvae import VQVAE, split_scales
from varjax.sampling.var import SampleOptions, make_sampler


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def ref(golden_dir):
    g = dict(np.load(golden_dir / "io_public.npz"))
    case = json.loads((golden_dir / "case_public.json").read_text())
    pn = tuple(int(x) for x in g["patch_nums"])
    vae_cfg, vae_params = convert_vqvae(load_state_dict(golden_dir / "vqvae_public.pth"), pn)
    var_cfg, var_params = convert_var(load_state_dict(golden_dir / "var_public.pth"), pn)
    return dict(g=g, case=case, pn=pn, vae_cfg=vae_cfg, vae=vae_params, var_cfg=var_cfg, var=var_params)


def vae_apply(ref, method, *args):
    return VQVAE(ref["vae_cfg"]).apply({"params": ref["vae"]}, *args, method=method)


def test_inferred_configs_match_case(ref):
    c, v = ref["case"]["vqvae"], ref["case"]["var"]
    assert ref["vae_cfg"].vocab_size == c["vocab_size"] and ref["vae_cfg"].z_channels == c["z_channels"]
    assert ref["vae_cfg"].ch == c["ch"] and ref["vae_cfg"].share_quant_resi == c["share_quant_resi"]
    assert (ref["var_cfg"].depth, ref["var_cfg"].embed_dim, ref["var_cfg"].num_heads) == (
        v["depth"],
        v["embed_dim"],
        v["num_heads"],
    )
    assert ref["var_cfg"].num_classes == v["num_classes"] and ref["var_cfg"].attn_l2_norm == v["attn_l2_norm"]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 10, 16, 20])
def test_resizes_match_torch(ref, size):
    src = jnp.asarray(nhwc(ref["g"]["interp_src"]))
    np.testing.assert_allclose(resize_bicubic(src, size), nhwc(ref["g"][f"bicubic_13_to_{size}"]), atol=1e-5)
    np.testing.assert_allclose(resize_area(src, size), nhwc(ref["g"][f"area_13_to_{size}"]), atol=1e-5)


def test_encoder_features(ref):
    f = vae_apply(ref, VQVAE.encode, jnp.asarray(nhwc(ref["g"]["img"])))
    np.testing.assert_allclose(f, nhwc(ref["g"]["f_BChw"]), atol=1e-4)


def test_tokens_identical(ref):
    idx = vae_apply(ref, VQVAE.img_to_idx, jnp.asarray(nhwc(ref["g"]["img"])))
    np.testing.assert_array_equal(np.concatenate([np.asarray(i) for i in idx], 1), ref["g"]["idx_BL"])


def test_fhat_and_reconstruction(ref):
    img = jnp.asarray(nhwc(ref["g"]["img"]))
    np.testing.assert_allclose(vae_apply(ref, VQVAE.img_to_fhat, img)[-1], nhwc(ref["g"]["fhat_last_BChw"]), atol=1e-4)
    np.testing.assert_allclose(vae_apply(ref, VQVAE.img_to_recon, img), nhwc(ref["g"]["recon_last"]), atol=1e-3)


def test_idx_to_img_and_var_input(ref):
    idx = split_scales(jnp.asarray(ref["g"]["idx_BL"]), ref["pn"])
    np.testing.assert_allclose(vae_apply(ref, VQVAE.idx_to_img, idx), nhwc(ref["g"]["idx_to_img_last"]), atol=1e-3)
    np.testing.assert_allclose(vae_apply(ref, VQVAE.idx_to_var_input, idx), ref["g"]["var_input_BLC"], atol=1e-4)


def test_vq_loss_and_straight_through(ref):
    f = jnp.asarray(nhwc(ref["g"]["f_BChw"]))
    _, fhats, f_st, loss, hits = vae_apply(ref, VQVAE.quantize_features, f, True)
    assert abs(float(loss) - float(ref["g"]["vq_loss"])) < 1e-5
    np.testing.assert_allclose(f_st, fhats[-1], atol=1e-5)  # value of f_hat, gradient of f
    assert hits.shape == (len(ref["pn"]), ref["vae_cfg"].vocab_size)
    assert int(hits.sum()) == f.shape[0] * sum(p * p for p in ref["pn"])

    def st_sum(x):
        return vae_apply(ref, VQVAE.quantize_features, x, True)[2].sum()

    np.testing.assert_allclose(jax.grad(st_sum)(f), np.ones(f.shape), atol=1e-6)


# (scan_layers, remat): the execution options must not change what is computed
VARIANTS = [(False, "none"), (True, "none"), (False, "full"), (True, "dots")]


def variant(ref, scan_layers, remat):
    cfg = dataclasses.replace(ref["var_cfg"], scan_layers=scan_layers, remat=remat)
    return cfg, fit_var_params(ref["var"], cfg)


def logits_and_grad(cfg, params, g):
    def loss(p):
        logits = VAR(cfg).apply({"params": p}, jnp.asarray(g["label"]), jnp.asarray(g["var_input_BLC"]))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, logits), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grad


@pytest.fixture(scope="module")
def plain_grad(ref):
    return logits_and_grad(*variant(ref, False, "none"), ref["g"])[1]


@pytest.mark.parametrize("scan_layers,remat", VARIANTS)
def test_logits(ref, plain_grad, scan_layers, remat):
    cfg, params = variant(ref, scan_layers, remat)
    logits, grad = logits_and_grad(cfg, params, ref["g"])
    np.testing.assert_allclose(logits, ref["g"]["logits_BLV"], atol=1e-4)
    grad = fit_var_params(jax.device_get(grad), ref["var_cfg"])  # back to the per-block layout
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, jax.device_get(plain_grad))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_cfg_sampling(ref, scan_layers):
    g = ref["g"]
    cfg, params = variant(ref, scan_layers, "none")
    sampler = make_sampler(ref["vae_cfg"], cfg, SampleOptions(cfg=float(g["cfg"]), top_k=1, top_p=0.0))
    img, tokens = sampler(ref["vae"], params, jnp.asarray(g["label"], jnp.int32), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(tokens), g["sample_idx_BL"])
    np.testing.assert_allclose(img, nhwc(g["sample_img"]), atol=1e-3)
