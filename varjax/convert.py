"""PyTorch state dicts of the release <-> varjax parameter trees, without PyTorch.

Flax parameter paths mirror the torch keys, so a key is derived from a path by a few renaming rules
(``down_0`` -> ``down.0``, ``ada_lin`` -> ``ada_lin.1`` because torch wraps it in ``Sequential(SiLU, Linear)``,
``kernel`` -> ``weight`` with the layout transposed). Every hyper-parameter that the shapes reveal is read off
the state dict; the rest (``patch_nums``, heads without ``attn_l2_norm``) comes from the caller.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import flax
import jax
import numpy as np

from varjax.models.var import VAR, VARConfig
from varjax.models.vqvae import PATCH_NUMS_256, PATCH_NUMS_512, VQVAE, VQVAEConfig

# Buffers the reference registers: recomputed from the config here, so they are accepted and dropped.
VAE_BUFFERS = (r"quantize\.ema_vocab_hit_SV",)
VAR_BUFFERS = (r"lvl_1L", r"attn_bias_for_masking", r"blocks\.\d+\.attn\.zero_k_bias")

KNOWN_PATCH_NUMS = {sum(p * p for p in pn): pn for pn in (PATCH_NUMS_256, PATCH_NUMS_512)}


class ConversionError(ValueError):
    """A state dict does not match the model it is converted into."""


# ----------------------------------------------------------------------------------------------- key mapping


def _phi_prefix(share_quant_resi: int) -> str:
    return {0: "quant_resi.{k}", 1: "quant_resi.qresi"}.get(share_quant_resi, "quant_resi.qresi_ls.{k}")


def torch_key(path: Sequence[str], share_quant_resi: int = 4) -> str:
    """Torch state-dict key of the flax parameter at ``path`` (a tuple of names)."""
    parts: list[str] = []
    in_level = False
    for seg in path[:-1]:
        m = re.fullmatch(r"(down|up|blocks)_(\d+)", seg)
        if m:
            parts += [m.group(1), m.group(2)]
            in_level = m.group(1) in ("down", "up")
            continue
        m = re.fullmatch(r"(block|attn)_(\d+)", seg)
        if m and in_level:
            parts += [m.group(1), m.group(2)]
        elif seg in ("downsample", "upsample"):
            parts += [seg, "conv"]
        elif seg in ("ada_lin", "shared_ada_lin"):
            parts += [seg, "1"]
        elif re.fullmatch(r"phi_\d+", seg):
            parts.append(_phi_prefix(share_quant_resi).format(k=seg.split("_")[1]))
        elif seg == "conv" and parts and "quant_resi" in parts[-1]:
            continue  # Phi is itself the Conv2d in torch
        else:
            parts.append(seg)
    leaf = path[-1]
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    if leaf == "weight" and path[-1] == "embedding" and path[-2] == "quantize":
        parts.append("embedding")
    return ".".join(parts + [leaf])


def to_flax_layout(name: str, arr: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Torch tensor -> flax layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if name == "kernel" and arr.ndim == 4:
        arr = arr.transpose(2, 3, 1, 0)
    elif name == "kernel" and arr.ndim == 2:
        arr = arr.T
    return np.ascontiguousarray(arr).reshape(target_shape)


def to_torch_layout(name: str, arr: np.ndarray, torch_shape: tuple[int, ...] | None = None) -> np.ndarray:
    if name == "kernel" and arr.ndim == 4:
        arr = arr.transpose(3, 2, 0, 1)
    elif name == "kernel" and arr.ndim == 2:
        arr = arr.T
    arr = np.ascontiguousarray(arr)
    return arr.reshape(torch_shape) if torch_shape is not None else arr


def expected_torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if name == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if name == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def match_state_dict(
    shapes: Mapping[str, tuple[int, ...]],
    abstract_params,
    *,
    buffers: Sequence[str],
    share_quant_resi: int = 4,
    source: str = "state dict",
) -> dict[tuple[str, ...], str]:
    """Maps every flax parameter path to its torch key, checking names and shapes only.

    Every key must be used: missing, unexpected and mis-shaped keys are reported together in one error.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract_params))
    mapping, missing, bad_shape = {}, [], []
    for path, leaf in flat.items():
        key = torch_key(path, share_quant_resi)
        want = expected_torch_shape(path[-1], tuple(leaf.shape))
        if key not in shapes:
            missing.append(f"{key} {want}")
        elif tuple(shapes[key]) != want and (path[-1] == "kernel" or np.prod(shapes[key]) != np.prod(want)):
            bad_shape.append(f"{key}: file has {tuple(shapes[key])}, model expects {want}")
        else:
            mapping[path] = key
    buffer_re = re.compile("|".join(f"(?:{b})" for b in buffers)) if buffers else None
    used = set(mapping.values()) | {k.split(" ")[0] for k in bad_shape}
    unexpected = [k for k in shapes if k not in used and not (buffer_re and buffer_re.fullmatch(k))]
    if missing or unexpected or bad_shape:
        lines = [f"{source} does not match the model it is converted into."]
        if missing:
            lines.append(f"Missing keys ({len(missing)}): " + ", ".join(missing) + ".")
        if unexpected:
            lines.append(f"Unexpected keys ({len(unexpected)}): " + ", ".join(unexpected) + ".")
        if bad_shape:
            lines.append(f"Mis-shaped keys ({len(bad_shape)}): " + "; ".join(bad_shape) + ".")
        raise ConversionError(" ".join(lines))
    return mapping


def state_dict_to_params(
    sd: Mapping[str, np.ndarray],
    abstract_params,
    *,
    buffers: Sequence[str],
    share_quant_resi: int = 4,
    source: str = "state dict",
):
    """Fills a flax param tree (shapes from ``abstract_params``) from a torch state dict (float32)."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    mapping = match_state_dict(
        shapes, abstract_params, buffers=buffers, share_quant_resi=share_quant_resi, source=source
    )
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract_params))
    out = {
        path: to_flax_layout(path[-1], np.asarray(sd[key]).astype(np.float32), tuple(flat[path].shape))
        for path, key in mapping.items()
    }
    return flax.traverse_util.unflatten_dict(out)


def params_to_state_dict(params, share_quant_resi: int = 4) -> dict[str, np.ndarray]:
    """Inverse of ``state_dict_to_params`` (parameters only; buffers are not written)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return {torch_key(p, share_quant_resi): to_torch_layout(p[-1], np.asarray(v)) for p, v in flat.items()}


# ------------------------------------------------------------------------------------ hyper-parameter inference


def _shape(sd, key, source):
    if key not in sd:
        raise ConversionError(f"{source}: key '{key}' is missing; it is needed to infer the model's shape.")
    return tuple(sd[key].shape)


def infer_vqvae_config(sd: Mapping[str, np.ndarray], patch_nums: Sequence[int], source="VQVAE state dict"):
    """Reads ch, ch_mult, z_channels, vocab size, res blocks, attention and phi sharing off the shapes."""
    ch = _shape(sd, "encoder.conv_in.weight", source)[0]
    z = _shape(sd, "quant_conv.weight", source)[0]
    ks = _shape(sd, "quant_conv.weight", source)[2]
    vocab = _shape(sd, "quantize.embedding.weight", source)[0]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise ConversionError(f"{source}: no 'encoder.down.<i>' keys; this is not a VAR/VQGAN-style tokenizer.")
    ch_mult = tuple(_shape(sd, f"encoder.down.{i}.block.0.conv1.weight", source)[0] // ch for i in levels)
    nrb = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    top = levels[-1]
    using_sa = any(k.startswith(f"encoder.down.{top}.attn.") for k in sd)
    using_mid_sa = any(k.startswith("encoder.mid.attn_1.") for k in sd)
    if "quantize.quant_resi.qresi.weight" in sd:
        share, counts = 1, 0
    elif any(k.startswith("quantize.quant_resi.qresi_ls.") for k in sd):
        share = len({k.split(".")[3] for k in sd if k.startswith("quantize.quant_resi.qresi_ls.")})
        counts = 0
    else:
        n = len({k.split(".")[2] for k in sd if re.match(r"quantize\.quant_resi\.\d+\.", k)})
        share, counts = 0, (n if n != len(patch_nums) else 0)
    quant_resi = 0.5 if any(k.startswith("quantize.quant_resi.") for k in sd) else 0.0
    groups = 32
    return VQVAEConfig(
        vocab_size=vocab,
        z_channels=z,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=nrb,
        using_sa=using_sa,
        using_mid_sa=using_mid_sa,
        quant_conv_ks=ks,
        quant_resi=quant_resi,
        share_quant_resi=share,
        default_qresi_counts=counts,
        patch_nums=tuple(patch_nums),
        num_groups=groups,
    )


def default_patch_nums(L: int, source: str) -> tuple[int, ...]:
    if L in KNOWN_PATCH_NUMS:
        return KNOWN_PATCH_NUMS[L]
    raise ConversionError(
        f"{source}: pos_1LC holds {L} tokens, which matches neither official schedule "
        f"(256px: {PATCH_NUMS_256}, L=680; 512px: {PATCH_NUMS_512}, L=2240). Pass --patch-nums explicitly."
    )


def infer_var_config(
    sd: Mapping[str, np.ndarray],
    patch_nums: Sequence[int] | None = None,
    num_heads: int | None = None,
    source: str = "VAR state dict",
) -> VARConfig:
    ncls1, C = _shape(sd, "class_emb.weight", source)
    Cvae = _shape(sd, "word_embed.weight", source)[1]
    V = _shape(sd, "head.weight", source)[0]
    L = _shape(sd, "pos_1LC", source)[1]
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    hidden = _shape(sd, "blocks.0.ffn.fc1.weight", source)[0]
    shared_aln = "blocks.0.ada_gss" in sd
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in sd
    heads_from_sd = _shape(sd, "blocks.0.attn.scale_mul_1H11", source)[1] if attn_l2_norm else None
    if heads_from_sd is not None and num_heads is not None and num_heads != heads_from_sd:
        raise ConversionError(
            f"{source}: --num-heads {num_heads} contradicts blocks.0.attn.scale_mul_1H11, which has "
            f"{heads_from_sd} heads."
        )
    heads = heads_from_sd or num_heads or depth  # the release ties heads to depth (head dim 64)
    if C % heads:
        raise ConversionError(f"{source}: width {C} is not divisible by {heads} heads; pass --num-heads.")
    pn = tuple(patch_nums) if patch_nums else default_patch_nums(L, source)
    if sum(p * p for p in pn) != L:
        raise ConversionError(
            f"{source}: --patch-nums {','.join(map(str, pn))} gives {sum(p * p for p in pn)} tokens but "
            f"pos_1LC holds {L}."
        )
    return VARConfig(
        depth=depth,
        embed_dim=C,
        num_heads=heads,
        num_classes=ncls1 - 1,
        vocab_size=V,
        Cvae=Cvae,
        patch_nums=pn,
        mlp_ratio=hidden / C,
        shared_aln=shared_aln,
        attn_l2_norm=attn_l2_norm,
        cond_drop_rate=0.1,
        drop_path_rate=0.1 * depth / 24,
    )


# ------------------------------------------------------------------------------------------ abstract params


def abstract_vqvae_params(cfg: VQVAEConfig):
    model = VQVAE(cfg)
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, method=VQVAE.init_all), x)
    return flax.core.unfreeze(shapes)["params"]


def abstract_var_params(cfg: VARConfig):
    model = VAR(cfg)
    lab = jax.ShapeDtypeStruct((1,), np.int32)
    x = jax.ShapeDtypeStruct((1, cfg.L - cfg.first_l, cfg.Cvae), np.float32)
    shapes = jax.eval_shape(lambda a, b: model.init(jax.random.PRNGKey(0), a, b, method=VAR.init_all), lab, x)
    return flax.core.meta.unbox(flax.core.unfreeze(shapes)["params"])


def convert_vqvae(sd, patch_nums: Sequence[int], source="VQVAE state dict"):
    """-> (VQVAEConfig, params)."""
    cfg = infer_vqvae_config(sd, patch_nums, source)
    params = state_dict_to_params(
        sd, abstract_vqvae_params(cfg), buffers=VAE_BUFFERS, share_quant_resi=cfg.share_quant_resi, source=source
    )
    return cfg, params


def convert_var(sd, patch_nums=None, num_heads=None, source="VAR state dict"):
    """-> (VARConfig, params)."""
    cfg = infer_var_config(sd, patch_nums, num_heads, source)
    params = state_dict_to_params(sd, abstract_var_params(cfg), buffers=VAR_BUFFERS, source=source)
    return cfg, params
