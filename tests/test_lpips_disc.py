"""LPIPS against a plain numpy reimplementation; PatchGAN shapes, receptive field and GAN loss terms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varjax import losses
from varjax.models import discriminator as disc
from varjax.models import lpips

# ---------------------------------------------------------------------------------------------------------
# numpy reference of lpips v0.1 (vgg), written from torchvision's vgg16 config, independent of the module.

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAP_INDICES = (3, 8, 15, 22, 29)  # torchvision `features` index of relu1_2 ... relu5_3
SLICE_STARTS = (0, 4, 9, 16, 23)  # lpips slices cut `features` at these indices


def vgg_layers():
    """[(features index, 'conv'|'relu'|'pool', C_in, C_out)] of torchvision vgg16 up to relu5_3."""
    layers, idx, c_in = [], 0, 3
    for item in VGG16_CFG:
        if item == "M":
            layers.append((idx, "pool", c_in, c_in))
            idx += 1
        else:
            layers.append((idx, "conv", c_in, item))
            layers.append((idx + 1, "relu", item, item))
            idx += 2
            c_in = item
    return layers


def random_torch_sds(seed=0):
    """(lin_sd, vgg_sd) with torch layouts; He-scaled so activations neither vanish nor explode."""
    rng = np.random.default_rng(seed)
    vgg_sd = {"classifier.0.weight": np.zeros((2, 2), np.float32)}  # extra keys must be ignored
    for idx, kind, c_in, c_out in vgg_layers():
        if kind == "conv":
            std = np.sqrt(2.0 / (9 * c_in))
            weight = std * rng.standard_normal((c_out, c_in, 3, 3))
            vgg_sd[f"features.{idx}.weight"] = weight.astype(np.float32)
            vgg_sd[f"features.{idx}.bias"] = (0.1 * rng.standard_normal(c_out)).astype(np.float32)
    lin_sd = {
        f"lin{k}.model.1.weight": rng.uniform(0, 0.2, (1, c, 1, 1)).astype(np.float32)
        for k, c in enumerate((64, 128, 256, 512, 512))
    }
    return lin_sd, vgg_sd


def combined_sd(lin_sd, vgg_sd):
    """The layout of a full `lpips.LPIPS` state dict."""
    sd = dict(lin_sd)
    sd["scaling_layer.shift"] = np.array([-0.030, -0.088, -0.188], np.float32).reshape(1, 3, 1, 1)
    sd["scaling_layer.scale"] = np.array([0.458, 0.448, 0.450], np.float32).reshape(1, 3, 1, 1)
    for key, value in vgg_sd.items():
        if key.startswith("features."):
            idx = int(key.split(".")[1])
            s = sum(idx >= start for start in SLICE_STARTS)
            sd[f"net.slice{s}.{idx}.{key.split('.')[2]}"] = value
    return sd


def np_conv3x3(x_NCHW, w_OIHW, b_O):
    """Stride-1, padding-1 cross-correlation via im2col."""
    n, c, h, w = x_NCHW.shape
    xp = np.pad(x_NCHW, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=2)  # N,C,9,H,W
    cols = cols.reshape(n, c * 9, h * w)
    out = np.einsum("ok,nkp->nop", w_OIHW.reshape(w_OIHW.shape[0], c * 9), cols)
    return out.reshape(n, -1, h, w) + b_O[None, :, None, None]


def np_lpips(lin_sd, vgg_sd, x_NHWC, y_NHWC):
    shift = np.array([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = np.array([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)

    def features(img):
        h = (img.transpose(0, 3, 1, 2).astype(np.float64) - shift) / scale
        taps = []
        for idx, kind, _, _ in vgg_layers():
            if kind == "conv":
                w = vgg_sd[f"features.{idx}.weight"].astype(np.float64)
                h = np_conv3x3(h, w, vgg_sd[f"features.{idx}.bias"].astype(np.float64))
            elif kind == "relu":
                h = np.maximum(h, 0)
            else:
                n, c, hh, ww = h.shape
                h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
            if idx in TAP_INDICES:
                taps.append(h)
        return taps

    total = 0.0
    for k, (fx, fy) in enumerate(zip(features(x_NHWC), features(y_NHWC), strict=True)):
        fx = fx / (np.sqrt(np.sum(fx**2, axis=1, keepdims=True)) + 1e-10)
        fy = fy / (np.sqrt(np.sum(fy**2, axis=1, keepdims=True)) + 1e-10)
        w = lin_sd[f"lin{k}.model.1.weight"].astype(np.float64)
        lin = np.einsum("oc,nchw->nohw", w[:, :, 0, 0], (fx - fy) ** 2)
        total = total + lin.mean(axis=(1, 2, 3))
    return total


# ---------------------------------------------------------------------------------------------------------
# LPIPS


@pytest.fixture(scope="module")
def sds():
    return random_torch_sds()


@pytest.fixture(scope="module")
def params(sds):
    return lpips.convert_lpips_params(*sds)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
    return x, y


lpips_fn = jax.jit(lpips.lpips_distance)


def test_lpips_matches_numpy_reference(sds, params, images):
    x, y = images
    got = np.asarray(lpips_fn(params, x, y))
    want = np_lpips(*sds, x, y)
    assert got.shape == (2,)
    assert np.all(want > 1e-3)  # a non-trivial distance, so the comparison means something
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_lpips_combined_layout_gives_same_params(sds, params):
    from_combined = lpips.convert_lpips_params(combined_sd(*sds))
    jax.tree.map(np.testing.assert_array_equal, from_combined, params)


def test_converted_tree_matches_module_init(params):
    image = jnp.zeros((1, 16, 16, 3))
    shapes = jax.eval_shape(lpips.LPIPS().init, jax.random.key(0), image, image)
    want = jax.tree.map(lambda a: a.shape, shapes["params"])
    assert jax.tree.map(lambda a: a.shape, params) == want


def test_lpips_identity_is_zero_and_grad_is_finite(params, images):
    x, y = images
    np.testing.assert_allclose(np.asarray(lpips_fn(params, x, x)), 0.0, atol=1e-7)

    grad_fn = jax.jit(jax.grad(lambda p, a, b: lpips.lpips_distance(p, a, b).sum(), argnums=(0, 1)))
    g_params, g_x = grad_fn(params, x, y)
    assert np.all(np.isfinite(g_x)) and np.abs(g_x).max() > 0
    # Parameters are frozen: stop_gradient makes their gradient exactly zero.
    assert all(float(jnp.abs(leaf).max()) == 0.0 for leaf in jax.tree.leaves(g_params))
    _, g_same = grad_fn(params, x, x)
    assert np.all(np.isfinite(g_same))


def test_lpips_rejects_bad_shapes(params):
    with pytest.raises(ValueError, match="at least 16x16"):
        lpips.lpips_distance(params, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="equal shape"):
        lpips.lpips_distance(params, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 32, 32, 3)))


def test_unit_normalize_value_and_finite_grad_at_zero():
    f = jnp.array([[[[3.0, 4.0], [0.0, 0.0]]]])  # (1, 1, 2, 2): one regular, one all-zero pixel
    np.testing.assert_allclose(lpips.unit_normalize(f), [[[[0.6, 0.8], [0.0, 0.0]]]], rtol=1e-6)
    g = jax.grad(lambda a: jnp.sum(lpips.unit_normalize(a) ** 2))(f)
    assert np.all(np.isfinite(g))


def test_convert_names_missing_keys(sds):
    lin_sd, vgg_sd = sds
    lin_sd = {k: v for k, v in lin_sd.items() if k != "lin3.model.1.weight"}
    with pytest.raises(ValueError, match="lin3.model.1.weight"):
        lpips.convert_lpips_params(lin_sd, vgg_sd)
    vgg_sd = {k: v for k, v in sds[1].items() if k not in ("features.28.bias", "features.5.weight")}
    with pytest.raises(ValueError, match=r"features\.5\.weight, features\.28\.bias"):
        lpips.convert_lpips_params(sds[0], vgg_sd)
    with pytest.raises(ValueError, match="vgg16"):
        lpips.convert_lpips_params(sds[0])  # lin-only file and no backbone


def test_convert_rejects_bad_shape_and_scaling(sds):
    lin_sd = dict(sds[0], **{"lin0.model.1.weight": np.zeros((1, 32, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"lin0\.model\.1\.weight.*\(1, 64, 1, 1\)"):
        lpips.convert_lpips_params(lin_sd, sds[1])
    sd = combined_sd(*sds)
    sd["scaling_layer.scale"] = np.ones((1, 3, 1, 1), np.float32)
    with pytest.raises(ValueError, match="scaling_layer.scale"):
        lpips.convert_lpips_params(sd)


def test_load_lpips_params_from_files(tmp_path, sds, params):
    """The tokenizer task reads the two files named by its config (``lpips_lin_path``, ``lpips_vgg_path``)."""
    import ml_collections

    from varjax.interop import torch_io
    from varjax.tasks.tokenizer import load_lpips

    lin_path, vgg_path = str(tmp_path / "vgg_lin.pth"), str(tmp_path / "vgg16.pth")
    torch_io.save_state_dict_pth(lin_path, sds[0])
    torch_io.save_state_dict_pth(vgg_path, sds[1])
    cfg = ml_collections.ConfigDict(dict(lpips_lin_path=lin_path, lpips_vgg_path=vgg_path, lpips_weight=1.0))
    loaded = load_lpips(cfg)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    cfg.lpips_weight = 0.0
    assert load_lpips(cfg) is None  # off: nothing read


# ---------------------------------------------------------------------------------------------------------
# Discriminator


def numpy_variables(module, x, seed=0):
    """Variables of `module` drawn with numpy: threefry init compiles slowly on a small CPU."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    return jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32), shapes)


@pytest.mark.parametrize("side, n_layers, grid", [(32, 3, 2), (64, 3, 6), (32, 2, 6), (24, 3, 1)])
def test_discriminator_output_shape(side, n_layers, grid):
    d = disc.NLayerDiscriminator(ndf=8, n_layers=n_layers)
    x = jnp.zeros((2, side, side, 3))
    out = jax.eval_shape(lambda: d.init_with_output(jax.random.key(0), x)[0])
    assert out.shape == (2, grid, grid, 1)
    assert disc.patch_grid_side(side, n_layers) == grid


def test_discriminator_rejects_too_small_input_and_bad_norm():
    with pytest.raises(ValueError, match="side >= 24"):
        disc.NLayerDiscriminator(ndf=8, n_layers=3).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="norm is 'layer'"):
        disc.NLayerDiscriminator(ndf=8, norm="layer").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_receptive_field_matches_gradient_support():
    assert disc.receptive_field(3) == 70  # pix2pix's "70x70 PatchGAN"
    n_layers = 2
    d = disc.NLayerDiscriminator(ndf=4, n_layers=n_layers, norm="none")  # a norm would mix all pixels
    x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
    variables = numpy_variables(d, x)
    g = jax.jit(jax.grad(lambda a: d.apply(variables, a)[0, 5, 5, 0]))(x)
    rows, cols = np.nonzero(np.abs(np.asarray(g[0])).sum(-1))
    assert rows.max() - rows.min() + 1 == disc.receptive_field(n_layers) == 34
    assert cols.max() - cols.min() + 1 == 34


def test_discriminator_params_and_norm_variants():
    x = jnp.zeros((2, 32, 32, 3))
    # The 'rbg' key compiles much faster than threefry on CPU; the init itself does not depend on it.
    v = jax.jit(disc.NLayerDiscriminator(ndf=64).init)(jax.random.key(0, impl="rbg"), x)
    kernel = np.asarray(nn.unbox(v["params"])["conv0"]["kernel"])
    assert kernel.shape == (4, 4, 3, 64) and abs(kernel.std() - 0.02) < 0.002
    assert "bias" not in v["params"]["conv1"] and "norm1" in v["params"]  # norm replaces the bias
    v_none = jax.eval_shape(disc.NLayerDiscriminator(ndf=8, norm="none").init, jax.random.key(0), x)
    assert "bias" in v_none["params"]["conv1"] and "norm1" not in v_none["params"]
    d_bn = disc.NLayerDiscriminator(ndf=8, norm="batch")
    v_bn = numpy_variables(d_bn, x)
    out, updates = jax.jit(lambda v, a: d_bn.apply(v, a, train=True, mutable=["batch_stats"]))(v_bn, x + 1.0)
    assert out.shape == (2, 2, 2, 1)
    # Running statistics moved from their initial value: BatchNorm ran in training mode.
    assert not np.allclose(updates["batch_stats"]["norm1"]["mean"], v_bn["batch_stats"]["norm1"]["mean"])


def test_hinge_and_vanilla_d_loss_values():
    real = jnp.array([2.0, 0.5, -1.0])
    fake = jnp.array([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1.
    np.testing.assert_allclose(losses.hinge_d_loss(real, fake), 0.5 * (5 / 6 + 1.0), rtol=1e-6)
    softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
    want = 0.5 * (np.mean(softplus(-np.asarray(real))) + np.mean(softplus(np.asarray(fake))))
    np.testing.assert_allclose(losses.vanilla_d_loss(real, fake), want, rtol=1e-6)
    np.testing.assert_allclose(losses.generator_loss(fake), 1 / 3, rtol=1e-6)
    assert losses.get_d_loss("hinge") is losses.hinge_d_loss
    with pytest.raises(ValueError, match="'wgan' is unknown"):
        losses.get_d_loss("wgan")


def test_adopt_weight_before_and_after_start():
    assert float(losses.adopt_weight(0.8, 99, 100)) == 0.0
    assert float(losses.adopt_weight(0.8, 100, 100)) == pytest.approx(0.8)
    jitted = jax.jit(lambda step: losses.adopt_weight(0.8, step, 100))
    assert float(jitted(jnp.int32(5))) == 0.0 and float(jitted(jnp.int32(500))) == pytest.approx(0.8)


def test_adaptive_weight_values_clip_and_stop_gradient():
    nll = jnp.array([[3.0, 0.0], [0.0, 4.0]])  # ||.|| = 5
    g = jnp.array([[0.0, 2.0], [0.0, 0.0]])  # ||.|| = 2
    np.testing.assert_allclose(losses.adaptive_weight(nll, g), 5.0 / (2.0 + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(losses.adaptive_weight(nll, jnp.zeros_like(g)), 1e4)  # 5 / 1e-4 clipped
    tree = {"kernel": nll, "bias": jnp.array([0.0])}
    g_tree = {"kernel": g, "bias": jnp.array([0.0])}
    np.testing.assert_allclose(losses.adaptive_weight(tree, g_tree), 5 / 2.0001, rtol=1e-6)
    grad = jax.grad(lambda a: losses.adaptive_weight(a, g))(nll)
    assert float(jnp.abs(grad).max()) == 0.0


def test_gan_losses_have_finite_gradients():
    d = disc.NLayerDiscriminator(ndf=8, n_layers=3)
    key_r, key_f = jax.random.split(jax.random.key(2))
    real = jax.random.uniform(key_r, (2, 32, 32, 3), minval=-1, maxval=1)
    fake = jax.random.uniform(key_f, (2, 32, 32, 3), minval=-1, maxval=1)
    params = numpy_variables(d, real)["params"]

    def d_loss(p, r, f):
        return losses.hinge_d_loss(d.apply({"params": p}, r), d.apply({"params": p}, f))

    def g_loss(p, f):
        return losses.generator_loss(d.apply({"params": p}, f))

    d_grads = jax.jit(jax.grad(d_loss, argnums=(0, 1, 2)))(params, real, fake)
    g_grads = jax.jit(jax.grad(g_loss, argnums=(0, 1)))(params, fake)
    for grads in (d_grads, g_grads):
        leaves = jax.tree.leaves(grads)
        assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
        assert any(float(jnp.abs(leaf).max()) > 0 for leaf in leaves)
