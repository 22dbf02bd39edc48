"""The Flax FID Inception against pytorch-fid on the same random weights (tests/data/inception_golden.npz)."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from varjax.eval.inception import load_inception
from varjax.interop.torch_io import save_state_dict_pth
from varjax.models.inception import InceptionV3, torch_layout

DATA = Path(__file__).resolve().parent / "data"


def _recipe():
    spec = importlib.util.spec_from_file_location("make_inception_golden", DATA / "make_inception_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def weights_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    save_state_dict_pth(path, _recipe().random_state_dict(torch_layout()))
    return path


@pytest.fixture(scope="module")
def outputs(weights_pth):
    g = np.load(DATA / "inception_golden.npz")
    params = load_inception(weights_pth)
    out = jax.jit(InceptionV3().apply)({"params": params}, g["images"])
    return g, jax.tree.map(np.asarray, out)


def test_pool3_and_logits_match_pytorch_fid(outputs):
    g, out = outputs
    np.testing.assert_allclose(out["pool3"], g["pool3"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["logits"], g["logits"], atol=1e-4, rtol=0)


def test_spatial_features_are_mixed_6_conv(outputs):
    g, out = outputs
    assert out["spatial"].shape == (3, 7 * 17 * 17)
    np.testing.assert_allclose(out["spatial"], g["spatial"], atol=1e-4, rtol=0)


def test_bfloat16_features_stay_close(weights_pth, outputs):
    import jax.numpy as jnp

    g, out = outputs
    bf = jax.jit(InceptionV3(dtype=jnp.bfloat16).apply)({"params": load_inception(weights_pth)}, g["images"])
    rel = np.linalg.norm(np.asarray(bf["pool3"]) - g["pool3"]) / np.linalg.norm(g["pool3"])
    assert bf["pool3"].dtype == np.float32 and rel < 0.05


def test_adm_preprocessing_resizes_as_tf1():
    import tensorflow as tf

    from varjax.models.inception import resize_tf1_bilinear

    x = np.random.default_rng(0).uniform(0, 255, (1, 40, 256, 3)).astype(np.float32)
    ref = tf.compat.v1.image.resize_bilinear(x, [299, 299], align_corners=False).numpy()
    np.testing.assert_allclose(np.asarray(resize_tf1_bilinear(x, 299)), ref, atol=1e-4, rtol=0)


def test_tfds_input_reads_a_named_config_once_in_order(shapes_data):
    from varjax.eval.inception import tfds_image_batches

    count, batches = tfds_image_batches("tfds:varjax_shapes/tiny/test", 20, 16)  # NAME/CONFIG/SPLIT
    images = np.concatenate(list(batches))
    assert count == 48 and images.shape == (48, 16, 16, 3) and images.dtype == np.uint8
    again = np.concatenate(list(tfds_image_batches("tfds:varjax_shapes/tiny/test", 48, 16)[1]))
    np.testing.assert_array_equal(images, again)  # unshuffled: statistics of a split do not depend on the batch
    with pytest.raises(ValueError, match="tfds:NAME/SPLIT"):
        tfds_image_batches("tfds:imagenet2012", 8, 16)


def test_missing_weights_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--inception"):
        load_inception(None)
    save_state_dict_pth(tmp_path / "bad.pth", {"fc.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="not the FID Inception"):
        load_inception(tmp_path / "bad.pth")



def test_fid_command_from_npz_and_folder_then_from_saved_statistics(weights_pth, tmp_path, capsys):
    import json

    from PIL import Image

    from varjax.cli import main

    g = (np.load(DATA / "inception_golden.npz")["images"] * 255).round().astype(np.uint8)  # (3, 40, 48, 3)
    smp = np.concatenate([g, g[:, :, ::-1]])  # the reference images first, then mirrored
    ref = np.concatenate([g[:, ::-1], 255 - g])
    np.savez(tmp_path / "samples.npz", arr_0=smp, arr_1=np.zeros(len(smp), np.int64))
    (tmp_path / "ref").mkdir()
    for i, im in enumerate(ref):
        Image.fromarray(im).save(tmp_path / "ref" / f"{i:03d}.png")
    out = tmp_path / "fid.json"
    main(["fid", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref"),
          "--inception", str(weights_pth), "--out", str(out), "--batch-size", "8"])
    res = json.loads(out.read_text())
    assert {"fid", "sfid", "is", "precision", "recall"} <= set(res) and res["fid"] > 0 and res["sfid"] > 0
    assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1 and res["is"] >= 1
    # features of the sharded, padded batch (6 images on 8 devices) equal the reference network's
    s_stats = np.load(tmp_path / "fid.samples_stats.npz")
    golden = np.load(DATA / "inception_golden.npz")
    np.testing.assert_allclose(s_stats["pool3"][:3], golden["pool3"], atol=1e-2)  # inputs rounded to uint8
    np.testing.assert_allclose(s_stats["mu"], s_stats["pool3"].mean(0), rtol=1e-6)
    # the saved statistics are inputs themselves; no Inception needed
    out2 = tmp_path / "again.json"
    main(["fid", "--samples", str(tmp_path / "fid.samples_stats.npz"), "--ref", str(tmp_path / "fid.ref_stats.npz"),
          "--out", str(out2)])
    res2 = json.loads(out2.read_text())
    for k in ("fid", "sfid", "is", "precision", "recall"):
        assert res2[k] == pytest.approx(res[k], rel=1e-9), k
    assert not (tmp_path / "again.samples_stats.npz").exists()
    # images without weights: the error names the flag
    with pytest.raises(SystemExit) as e:
        main(["fid", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "fid.ref_stats.npz")])
    assert e.value.code == 2 and "--inception" in capsys.readouterr().err
