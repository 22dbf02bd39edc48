"""``varjax export``: convert -> export gives back the official files exactly (names, shapes, dtypes, values,
buffers included), from either block layout."""

import dataclasses

import numpy as np
import pytest

from varjax import cli
from varjax.core import model_dir
from varjax.interop import convert
from varjax.interop.torch_io import load_state_dict
from varjax.models import var_params

PATCH_NUMS = (1, 2, 3, 4, 6, 8)


@pytest.fixture(scope="module")
def exported(golden_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    cli.main(["convert", "--vae", str(golden_dir / "vqvae_public.pth"), "--var", str(golden_dir / "var_public.pth"),
              "--patch-nums", "1,2,3,4,6,8", "--out", str(base / "model")])
    cli.main(["export", "--ckpt", str(base / "model"), "--out", str(base / "out")])
    return base


def assert_identical(a: dict, b: dict):
    assert set(a) == set(b), (set(a) ^ set(b))
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert (x.shape, x.dtype) == (y.shape, y.dtype), k
        np.testing.assert_array_equal(x, y, err_msg=k)


@pytest.mark.parametrize("name", ["vqvae", "var"])
def test_convert_then_export_is_exact(golden_dir, exported, name):
    out = exported / "out" / ("vae.pth" if name == "vqvae" else "var.pth")
    assert_identical(load_state_dict(out), load_state_dict(golden_dir / f"{name}_public.pth"))


def test_stacked_layout_and_old_model_dirs_export_the_same(golden_dir, exported, tmp_path):
    sd = load_state_dict(golden_dir / "var_public.pth")
    cfg, params = convert.convert_var(sd, PATCH_NUMS)
    assert set(params) >= {"blocks_0", "blocks_1"}
    stacked = var_params.stack_blocks(params)
    assert stacked["blocks"]["attn"]["mat_qkv"]["kernel"].shape == (2, 128, 3, 2, 64)
    assert_identical(convert.var_state_dict(cfg, stacked), sd)
    # a model directory of parameter layout 1 (flat QKV / AdaLN kernels), saved with scan_layers on
    bundle = model_dir.load_model_dir(exported / "model")
    flat = dict(params)
    for i in range(cfg.depth):
        blk = {**flat[f"blocks_{i}"]}
        blk["attn"] = {**blk["attn"], "mat_qkv": {"kernel": blk["attn"]["mat_qkv"]["kernel"].reshape(128, 384)}}
        blk["ada_lin"] = {"kernel": blk["ada_lin"]["kernel"].reshape(128, 768), "bias": blk["ada_lin"]["bias"].ravel()}
        flat[f"blocks_{i}"] = blk
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    model_dir.save_model_dir(tmp_path / "old", "var", bundle.tok_cfg, bundle.tok_params, scan_cfg, flat)
    loaded = model_dir.load_model_dir(tmp_path / "old")
    assert loaded.gen_params["blocks"]["ada_lin"]["kernel"].shape == (2, 128, 6, 128)  # reshaped and stacked
    cli.main(["export", "--ckpt", str(tmp_path / "old"), "--out", str(tmp_path / "out")])
    assert_identical(load_state_dict(tmp_path / "out" / "var.pth"), sd)
