"""Analytic parameter and FLOP counts (varjax/models/flops.py)."""

import json
import math
import types

import numpy as np
import pytest

from tests.conftest import GOLDEN
from varjax.models import flops

LAYOUTS = GOLDEN / "official_checkpoint_layouts.json"
OFFICIAL_PARAMS = {
    "var_d16": 310_283_520,
    "var_d20": 600_917_136,
    "var_d24": 1_033_399_360,
    "var_d30": 2_010_020_356,
    "var_d36": 2_353_893_904,
}
# Registered buffers of the reference model: in the state_dict, not parameters.
BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")

# depth 1, C 8, patch_nums (1, 2): L = 5 tokens, first_l = 1.
TINY = {
    "depth": 1,
    "embed_dim": 8,
    "num_heads": 2,
    "mlp_ratio": 4,
    "vocab_size": 16,
    "Cvae": 4,
    "num_classes": 10,
    "patch_nums": (1, 2),
    "shared_aln": False,
}
D16 = {"depth": 16, "embed_dim": 1024, "num_heads": 16, "patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)}


@pytest.fixture(scope="module")
def layouts():
    with open(LAYOUTS) as f:
        return json.load(f)


@pytest.mark.parametrize("key", sorted(OFFICIAL_PARAMS))
def test_param_formula_matches_official_checkpoints(layouts, key):
    entry = layouts[key]
    assert entry["num_params"] == OFFICIAL_PARAMS[key]
    assert flops.param_count_formula(entry["kwargs"]) == OFFICIAL_PARAMS[key]
    # The state_dict minus its buffers must tell the same story, tensor by tensor.
    from_layout = sum(
        math.prod(shape) for name, shape in entry["state_dict"].items() if name.split(".")[-1] not in BUFFERS
    )
    assert from_layout == OFFICIAL_PARAMS[key]


def test_shared_aln_and_l2_norm_change_the_count():
    base = flops.param_count_formula(TINY)
    C, depth = 8, 1
    shared = flops.param_count_formula({**TINY, "shared_aln": True})
    # One shared Linear(C, 6C) plus a 6C offset per block replaces a Linear(C, 6C) per block.
    assert shared - base == depth * 6 * C - depth * (C * 6 * C + 6 * C) + (C * 6 * C + 6 * C)
    assert base - flops.param_count_formula({**TINY, "attn_l2_norm": False}) == depth * TINY["num_heads"]


def test_tiny_forward_flops_by_hand():
    # Each term: 2 FLOPs per multiply-add x rows x in x out.
    expected = {
        "word_embed": 2 * 4 * 4 * 8,  # L - first_l = 4 tokens, Cvae 4 -> C 8
        "ada_lin": 2 * 8 * 48,  # once per sequence, C -> 6C
        "qkv": 2 * 5 * 8 * 24,
        "attn_scores": 2 * 8 * (1 * 1 + 4 * 5),  # scale 0 sees 1 key, scale 1 (4 queries) sees 5
        "attn_values": 2 * 8 * (1 * 1 + 4 * 5),
        "proj": 2 * 5 * 8 * 8,
        "fc1": 2 * 5 * 8 * 32,
        "fc2": 2 * 5 * 32 * 8,
        "head_ada_lin": 2 * 8 * 16,
        "head": 2 * 5 * 8 * 16,
    }
    assert flops.matmul_flops_breakdown(TINY) == expected
    assert flops.forward_flops_per_sequence(TINY) == 10912
    assert flops.forward_flops_per_sequence(TINY, attention="dense") == 10912 + 2 * 2 * 8 * (25 - 21)
    assert flops.forward_flops_per_token(TINY) == pytest.approx(10912 / 5)
    assert flops.train_flops_per_sequence(TINY) == 3 * 10912
    assert flops.train_compute(TINY, 1000) == 1000 * 3 * 10912
    assert flops.to_pflops(2.5e15) == pytest.approx(2.5)


def test_shared_aln_counts_one_ada_lin():
    for depth in (1, 3):
        per_block = flops.matmul_flops_breakdown({**TINY, "depth": depth})["ada_lin"]
        shared = flops.matmul_flops_breakdown({**TINY, "depth": depth, "shared_aln": True})["ada_lin"]
        assert per_block == depth * 2 * 8 * 48
        assert shared == 2 * 8 * 48


def test_masked_pairs_match_the_block_causal_mask():
    patch_nums = D16["patch_nums"]
    level = np.concatenate([np.full(pn * pn, i) for i, pn in enumerate(patch_nums)])
    allowed = level[:, None] >= level[None, :]  # query scale >= key scale, as in the reference mask
    assert flops.attention_pairs(patch_nums, "masked") == int(allowed.sum())
    assert flops.attention_pairs(patch_nums, "dense") == allowed.size


def test_masked_is_cheaper_than_dense():
    for cfg in (TINY, D16):
        masked = flops.forward_flops_per_sequence(cfg, "masked")
        assert masked < flops.forward_flops_per_sequence(cfg, "dense")
    # A single scale has nothing to mask.
    one_scale = {**TINY, "patch_nums": (3,)}
    assert flops.forward_flops_per_sequence(one_scale, "masked") == flops.forward_flops_per_sequence(
        one_scale, "dense"
    )


def test_flops_affine_and_nearly_linear_in_depth():
    f = {d: flops.forward_flops_per_sequence({**D16, "depth": d}) for d in (8, 16, 24, 32)}
    # Every block costs the same, so equal depth steps add equal FLOPs.
    assert f[16] - f[8] == f[24] - f[16] == f[32] - f[24] > 0
    # The depth-independent part (embedding and head) is small: doubling depth nearly doubles the cost.
    assert f[32] / f[16] == pytest.approx(2.0, rel=0.03)


def test_config_as_object_or_mapping():
    obj = types.SimpleNamespace(**TINY)
    assert flops.forward_flops_per_sequence(obj) == flops.forward_flops_per_sequence(TINY)
    assert flops.param_count_formula(obj) == flops.param_count_formula(TINY)


def test_defaults_are_the_released_models():
    dims = flops.var_dims(D16)
    got = (dims.V, dims.Cvae, dims.H, dims.num_classes, dims.L, dims.first_l)
    assert got == (4096, 32, 4096, 1000, 680, 1)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({k: v for k, v in TINY.items() if k != "depth"}, "lacks the key 'depth'"),
        ({**TINY, "num_heads": 3}, "divisible by num_heads"),
        ({**TINY, "patch_nums": ()}, "patch_nums"),
    ],
)
def test_bad_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        flops.forward_flops_per_sequence(cfg)


def test_bad_attention_mode_and_negative_sequences():
    with pytest.raises(ValueError, match="attention='causal'"):
        flops.forward_flops_per_sequence(TINY, attention="causal")
    with pytest.raises(ValueError, match="num_sequences"):
        flops.train_compute(TINY, -1)
