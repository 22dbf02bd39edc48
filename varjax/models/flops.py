"""Analytic parameter and FLOP counts of the VAR transformer.

Everything here is plain integer arithmetic on the architecture's hyper-parameters, so it can be checked by
hand and compared with XLA's cost analysis of a compiled forward pass (`matmul_flops_breakdown` lists each
matmul separately for that purpose).

Conventions:
  * A multiply-add counts as 2 FLOPs. Only matrix products are counted; bias adds, norms, softmax, SiLU and
    other element-wise work are left out (they are a few percent of the total at the sizes in the paper).
  * One "sequence" is one image's full token pyramid, L = sum(pn**2) tokens over all scales, processed with
    teacher forcing and the block-causal mask: a token of scale s attends to every token of scales <= s.
  * Training costs 3x the forward pass (the backward pass costs about twice the forward).

Letters: C = embed_dim, H = round(C * mlp_ratio) (FFN hidden width), V = vocab_size, Cvae = the tokenizer's
code dimension, L = tokens per sequence, first_l = tokens of the first scale (taken from the class embedding
instead of `word_embed`).

The config can be a dict, an `ml_collections.ConfigDict` or any object with attributes. Required keys:
`depth`, `embed_dim`, `num_heads`, `patch_nums`. Optional keys default to the released models' values:
`mlp_ratio` 4.0, `vocab_size` 4096, `Cvae` 32, `num_classes` 1000, `shared_aln` False, `attn_l2_norm` True.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from varjax.models.var import ScaleSchedule

REQUIRED_KEYS = ("depth", "embed_dim", "num_heads", "patch_nums")
DEFAULTS: dict[str, Any] = {
    "mlp_ratio": 4.0,
    "vocab_size": 4096,
    "Cvae": 32,
    "num_classes": 1000,
    "shared_aln": False,
    "attn_l2_norm": True,
}
ATTENTION_MODES = ("masked", "dense")
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class VarDims(ScaleSchedule):
    """The integer sizes that determine VAR's parameter and FLOP counts."""

    depth: int
    C: int
    num_heads: int
    H: int
    V: int
    Cvae: int
    num_classes: int
    patch_nums: tuple[int, ...]
    shared_aln: bool
    attn_l2_norm: bool



def _lookup(cfg: Any, key: str) -> Any:
    """Reads `key` from a mapping or an attribute-style config; `_MISSING` when absent."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, _MISSING)
    return getattr(cfg, key, _MISSING)


def var_dims(cfg: Any) -> VarDims:
    """Reads and checks the architecture sizes from a config (see the module docstring for the keys)."""
    values = {}
    for key in REQUIRED_KEYS:
        value = _lookup(cfg, key)
        if value is _MISSING:
            raise ValueError(
                f"varjax.models.flops: the model config lacks the key '{key}'. The FLOP and parameter "
                f"formulas need {', '.join(REQUIRED_KEYS)}; optional keys and their defaults are {DEFAULTS}."
            )
        values[key] = value
    for key, default in DEFAULTS.items():
        value = _lookup(cfg, key)
        values[key] = default if value is _MISSING or value is None else value

    patch_nums = tuple(int(pn) for pn in values["patch_nums"])
    depth, C, heads = int(values["depth"]), int(values["embed_dim"]), int(values["num_heads"])
    if not patch_nums or min(patch_nums) < 1 or depth < 1 or C < 1 or heads < 1 or C % heads:
        raise ValueError(
            "varjax.models.flops: invalid model config: expected depth >= 1, embed_dim >= 1 divisible by "
            "num_heads, and a non-empty patch_nums of positive integers; got "
            f"depth={depth}, embed_dim={C}, num_heads={heads}, patch_nums={patch_nums}."
        )
    return VarDims(
        depth=depth,
        C=C,
        num_heads=heads,
        # Same rounding as the reference FFN: hidden_features=round(embed_dim * mlp_ratio).
        H=round(C * float(values["mlp_ratio"])),
        V=int(values["vocab_size"]),
        Cvae=int(values["Cvae"]),
        num_classes=int(values["num_classes"]),
        patch_nums=patch_nums,
        shared_aln=bool(values["shared_aln"]),
        attn_l2_norm=bool(values["attn_l2_norm"]),
    )


def attention_pairs(patch_nums: tuple[int, ...], attention: str = "masked") -> int:
    """Number of (query, key) pairs one attention head scores over one sequence.

    'masked': a query of scale s sees the cumulative tokens of scales 0..s, so the count is
    sum_s pn_s**2 * cum_s. 'dense': every query sees all L keys, L**2 (what a dense kernel computes
    before the mask is applied).
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(
            f"varjax.models.flops: attention='{attention}' is not supported; expected one of "
            f"{ATTENTION_MODES}."
        )
    sizes = [pn * pn for pn in patch_nums]
    if attention == "dense":
        return sum(sizes) ** 2
    pairs, cum = 0, 0
    for n in sizes:
        cum += n
        pairs += n * cum
    return pairs


def matmul_flops_breakdown(cfg: Any, attention: str = "masked") -> dict[str, int]:
    """Forward FLOPs per sequence of each matmul family, summed over all blocks.

    Keys: word_embed, ada_lin (per-block AdaLN, or the one shared AdaLN Linear when shared_aln), qkv,
    attn_scores (QK^T), attn_values (AV), proj, fc1, fc2, head_ada_lin, head. The AdaLN Linears act on the
    class condition, once per sequence rather than per token. The class embedding is a lookup (0 FLOPs).
    """
    d = var_dims(cfg)
    pairs = attention_pairs(d.patch_nums, attention)
    ada_lin_layers = 1 if d.shared_aln else d.depth
    return {
        "word_embed": 2 * (d.L - d.first_l) * d.Cvae * d.C,
        "ada_lin": ada_lin_layers * 2 * d.C * 6 * d.C,
        "qkv": d.depth * 2 * d.L * d.C * 3 * d.C,
        # Summed over heads, the head dim adds up to C: 2 FLOPs * C per (query, key) pair.
        "attn_scores": d.depth * 2 * d.C * pairs,
        "attn_values": d.depth * 2 * d.C * pairs,
        "proj": d.depth * 2 * d.L * d.C * d.C,
        "fc1": d.depth * 2 * d.L * d.C * d.H,
        "fc2": d.depth * 2 * d.L * d.H * d.C,
        "head_ada_lin": 2 * d.C * 2 * d.C,
        "head": 2 * d.L * d.C * d.V,
    }


def forward_flops_per_sequence(cfg: Any, attention: str = "masked") -> int:
    """Forward-pass FLOPs for one sequence of L tokens (one image), matmuls only."""
    return sum(matmul_flops_breakdown(cfg, attention).values())


def forward_flops_per_token(cfg: Any, attention: str = "masked") -> float:
    """Forward-pass FLOPs per token: `forward_flops_per_sequence` / L."""
    return forward_flops_per_sequence(cfg, attention) / var_dims(cfg).L


def train_flops_per_sequence(cfg: Any, attention: str = "masked") -> int:
    """Training FLOPs for one sequence: forward + backward = 3 x forward."""
    return 3 * forward_flops_per_sequence(cfg, attention)


def train_compute(cfg: Any, num_sequences: int | float, attention: str = "masked") -> int | float:
    """Total training FLOPs after `num_sequences` sequences (images seen, counting repeats over epochs)."""
    if num_sequences < 0:
        raise ValueError(
            "varjax.models.flops: train_compute needs num_sequences >= 0 (images seen in training); "
            f"got {num_sequences}."
        )
    return num_sequences * train_flops_per_sequence(cfg, attention)


def to_pflops(flops: int | float) -> float:
    """FLOPs -> PFLOPs (1e15 FLOPs; an amount of work, not a rate)."""
    return flops / 1e15


def param_count_breakdown(cfg: Any) -> dict[str, int]:
    """Trainable parameters per component, matching the reference's `parameters()` (buffers excluded)."""
    d = var_dims(cfg)
    C, H = d.C, d.H
    per_block = {
        "mat_qkv": 3 * C * C,  # no bias; q_bias and v_bias are separate, k has a zero buffer
        "qv_bias": 2 * C,
        "scale_mul": d.num_heads if d.attn_l2_norm else 0,
        "proj": C * C + C,
        "fc1": C * H + H,
        "fc2": H * C + C,
        # Shared AdaLN keeps one Linear for all blocks and a learned 6C offset per block.
        "ada": 6 * C if d.shared_aln else C * 6 * C + 6 * C,
    }
    counts = {
        "class_emb": (d.num_classes + 1) * C,  # +1: the "no class" row used for classifier-free guidance
        "pos_start": d.first_l * C,
        "pos_1LC": d.L * C,
        "lvl_embed": len(d.patch_nums) * C,
        "word_embed": d.Cvae * C + C,
        "shared_ada_lin": C * 6 * C + 6 * C if d.shared_aln else 0,
    }
    counts.update({f"blocks.{name}": d.depth * n for name, n in per_block.items()})
    counts["head_nm"] = C * 2 * C + 2 * C
    counts["head"] = C * d.V + d.V
    return counts


def param_count_formula(cfg: Any) -> int:
    """Total trainable parameters of VAR for this config."""
    return sum(param_count_breakdown(cfg).values())
