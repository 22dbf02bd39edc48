"""The Flax FID Inception against pytorch-fid on the same random weights (tests/data/inception_golden.npz)."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from varjax.models.inception import InceptionV3, load_inception, torch_layout
from varjax.torch_io import save_state_dict_pth

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


def test_missing_weights_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--inception"):
        load_inception(None)
    save_state_dict_pth(tmp_path / "bad.pth", {"fc.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="not the FID Inception"):
        load_inception(tmp_path / "bad.pth")
