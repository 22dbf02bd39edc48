"""Conversion of the released checkpoint layouts, and clear errors for state dicts that do not fit."""

import json

import jax
import numpy as np
import pytest

from varjax.interop import convert
from varjax.interop.torch_io import load_state_dict
from varjax.models.vqvae import PATCH_NUMS_256, PATCH_NUMS_512

LAYOUTS = ["vae_ch160v4096z32", "var_d16", "var_d20", "var_d24", "var_d30", "var_d36"]


@pytest.fixture(scope="module")
def layouts(golden_dir):
    return json.loads((golden_dir / "official_checkpoint_layouts.json").read_text())


def shapes_of(layout):
    return {k: jax.ShapeDtypeStruct(tuple(v), np.float32) for k, v in layout["state_dict"].items()}


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", LAYOUTS)
def test_official_layout_converts_with_exact_param_count(layouts, name):
    layout = layouts[name]
    sd = shapes_of(layout)
    if name.startswith("vae"):
        cfg = convert.infer_vqvae_config(sd, tuple(layout["kwargs"]["v_patch_nums"]))
        assert (cfg.vocab_size, cfg.z_channels, cfg.ch, cfg.share_quant_resi) == (4096, 32, 160, 4)
        abstract = convert.abstract_vqvae_params(cfg)
        buffers, share = convert.VAE_BUFFERS, cfg.share_quant_resi
    else:
        cfg = convert.infer_var_config(sd)  # patch_nums and heads inferred from the shapes alone
        kw = layout["kwargs"]
        assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.shared_aln) == (
            kw["depth"],
            kw["embed_dim"],
            kw["num_heads"],
            kw["shared_aln"],
        )
        assert cfg.patch_nums == tuple(kw["patch_nums"])
        assert cfg.patch_nums == (PATCH_NUMS_512 if name == "var_d36" else PATCH_NUMS_256)
        abstract = convert.abstract_var_params(cfg)
        buffers, share = convert.VAR_BUFFERS, 4
    mapping = convert.match_state_dict(
        {k: v.shape for k, v in sd.items()}, abstract, buffers=buffers, share_quant_resi=share
    )
    assert len(mapping) == len(jax.tree.leaves(abstract))
    assert n_params(abstract) == layout["num_params"]


def test_missing_unexpected_and_misshaped_keys_reported_together(golden_dir):
    sd = dict(load_state_dict(golden_dir / "var_public.pth"))
    sd.pop("head.bias")
    sd["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    sd["blocks.1.ffn.fc2.weight"] = np.zeros((5, 5), np.float32)
    with pytest.raises(convert.ConversionError) as e:
        convert.convert_var(sd, (1, 2, 3, 4, 6, 8), source="bad.pth")
    msg = str(e.value)
    assert "bad.pth" in msg and "head.bias" in msg and "blocks.0.attn.extra" in msg
    assert "blocks.1.ffn.fc2.weight" in msg and "(5, 5)" in msg


def test_patch_nums_must_match_position_table(golden_dir):
    sd = load_state_dict(golden_dir / "var_public.pth")
    with pytest.raises(convert.ConversionError, match="patch-nums"):
        convert.convert_var(sd, (1, 2, 3), source="var_public.pth")
    with pytest.raises(convert.ConversionError, match="neither official schedule"):
        convert.convert_var(sd, None, source="var_public.pth")


def test_round_trip_to_state_dict(golden_dir):
    sd = load_state_dict(golden_dir / "vqvae_public.pth")
    cfg, params = convert.convert_vqvae(sd, (1, 2, 3, 4, 6, 8))
    back = convert.params_to_state_dict(params, cfg.share_quant_resi)
    assert set(back) == set(sd) - {"quantize.ema_vocab_hit_SV"}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k])


def test_phi_sharing_modes_map_to_reference_keys():
    assert convert.torch_key(("quantize", "phi_2", "conv", "kernel"), 4) == "quantize.quant_resi.qresi_ls.2.weight"
    assert convert.torch_key(("quantize", "phi_0", "conv", "bias"), 1) == "quantize.quant_resi.qresi.bias"
    assert convert.torch_key(("quantize", "phi_7", "conv", "kernel"), 0) == "quantize.quant_resi.7.weight"
    assert (
        convert.torch_key(("encoder", "down_1", "block_0", "norm1", "scale")) == "encoder.down.1.block.0.norm1.weight"
    )
    assert convert.torch_key(("decoder", "mid", "attn_1", "qkv", "kernel")) == "decoder.mid.attn_1.qkv.weight"
    assert convert.torch_key(("blocks_3", "ada_lin", "kernel")) == "blocks.3.ada_lin.1.weight"
