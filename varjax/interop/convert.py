"""PyTorch state dicts of the release <-> varjax parameter trees, without PyTorch.

Flax parameter paths mirror the torch keys, so a key is derived from a path by a few renaming rules
(``down_0`` -> ``down.0``, ``ada_lin`` -> ``ada_lin.1`` because torch wraps it in ``Sequential(SiLU, Linear)``,
``kernel`` -> ``weight`` with the layout transposed). Every hyper-parameter that the shapes reveal is read off
the state dict; the rest (``patch_nums``, heads without ``attn_l2_norm``) comes from the caller.

Two layouts differ from torch beyond a transpose: the fused QKV kernel (flax (C, 3, H, c), torch (3C, C)) and
the AdaLN kernels (flax (C, 6, C) and bias (6, C), torch (6C, C) and (6C,)); and with ``scan_layers`` the blocks'
parameters are stacked. Conversion always goes through the per-block layout;
``varjax.models.var_params.fit_var_params`` brings any stored layout to the one a config asks for.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import flax
import jax
import numpy as np

from varjax.models.var import VAR, VARConfig, block_causal_mask, level_ids
from varjax.models.var_params import unstack_blocks
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


# Linears whose flax kernel splits the output features into (chunk, ...) axes; torch keeps them flat.
SPLIT_LINEARS = ("mat_qkv", "ada_lin", "shared_ada_lin")


def _is_split(path: Sequence[str], ndim: int) -> bool:
    """A kernel (C, 3, H, c) / (C, 6, C) or bias (6, C) of a split Linear (the head's 2C AdaLN stays flat)."""
    return len(path) >= 2 and path[-2] in SPLIT_LINEARS and ndim >= (3 if path[-1] == "kernel" else 2)


def to_flax_layout(path: Sequence[str], arr: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Torch tensor -> flax layout: conv OIHW -> HWIO, linear (out, in) -> (in, out), then the target shape
    (which splits the fused QKV / AdaLN outputs)."""
    if path[-1] == "kernel" and arr.ndim == 4:
        arr = arr.transpose(2, 3, 1, 0)
    elif path[-1] == "kernel" and arr.ndim == 2:
        arr = arr.T
    return np.ascontiguousarray(arr).reshape(target_shape)


def to_torch_layout(path: Sequence[str], arr: np.ndarray) -> np.ndarray:
    """Inverse of ``to_flax_layout``: the tensor torch stores, with ``expected_torch_shape``."""
    arr = np.asarray(arr)
    if _is_split(path, arr.ndim):
        arr = arr.reshape(arr.shape[0], -1).T if path[-1] == "kernel" else arr.reshape(-1)
    elif path[-1] == "kernel" and arr.ndim == 4:
        arr = arr.transpose(3, 2, 0, 1)
    elif path[-1] == "kernel" and arr.ndim == 2:
        arr = arr.T
    return np.ascontiguousarray(arr)


def expected_torch_shape(path: Sequence[str], shape: tuple[int, ...]) -> tuple[int, ...]:
    if _is_split(path, len(shape)):
        flat = math.prod(shape[1:]) if path[-1] == "kernel" else math.prod(shape)
        return (flat, shape[0]) if path[-1] == "kernel" else (flat,)
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:
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
        want = expected_torch_shape(path, tuple(leaf.shape))
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
        path: to_flax_layout(path, np.asarray(sd[key]).astype(np.float32), tuple(flat[path].shape))
        for path, key in mapping.items()
    }
    return flax.traverse_util.unflatten_dict(out)


def params_to_state_dict(params, share_quant_resi: int = 4) -> dict[str, np.ndarray]:
    """Inverse of ``state_dict_to_params`` (parameters only, per-block layout; buffers are not written)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return {torch_key(p, share_quant_resi): to_torch_layout(p, np.asarray(v)) for p, v in flat.items()}


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
    return flax.core.meta.unbox(flax.core.unfreeze(shapes)["params"])


def abstract_var_params(cfg: VARConfig):
    """Shapes of the per-block parameter tree (whatever ``cfg.scan_layers`` says)."""
    model = VAR(dataclasses.replace(cfg, scan_layers=False, remat="none"))
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
    """-> (VARConfig, params in the per-block layout)."""
    cfg = infer_var_config(sd, patch_nums, num_heads, source)
    params = state_dict_to_params(sd, abstract_var_params(cfg), buffers=VAR_BUFFERS, source=source)
    return cfg, params


# ------------------------------------------------------------------------------------------ export


def vqvae_state_dict(cfg: VQVAEConfig, params) -> dict[str, np.ndarray]:
    """The release's VQVAE state dict (float32), with its buffer ``quantize.ema_vocab_hit_SV`` (zeros)."""
    sd = {k: v.astype(np.float32) for k, v in params_to_state_dict(params, cfg.share_quant_resi).items()}
    sd["quantize.ema_vocab_hit_SV"] = np.zeros((len(cfg.patch_nums), cfg.vocab_size), np.float32)
    return sd


def var_state_dict(cfg: VARConfig, params) -> dict[str, np.ndarray]:
    """The release's VAR state dict (float32) from either block layout, with the buffers it registers:
    ``lvl_1L`` (int64 scale ids), ``attn_bias_for_masking`` (0 / -inf block-causal bias) and every block's
    ``attn.zero_k_bias``."""
    sd = {k: v.astype(np.float32) for k, v in params_to_state_dict(unstack_blocks(params)).items()}
    L, C = cfg.L, cfg.embed_dim
    sd["lvl_1L"] = level_ids(cfg.patch_nums).astype(np.int64).reshape(1, L)
    sd["attn_bias_for_masking"] = np.where(block_causal_mask(cfg.patch_nums), 0.0, -np.inf).astype(
        np.float32
    ).reshape(1, 1, L, L)
    for i in range(cfg.depth):
        sd[f"blocks.{i}.attn.zero_k_bias"] = np.zeros((C,), np.float32)
    return sd


# ------------------------------------------------------------------------------------ official trainer checkpoints

# `torch.save` in the official train.py writes ar-ckpt-last.pth / ar-ckpt-best.pth as
#   {'epoch': ep + 1, 'iter': 0, 'trainer': VARTrainer.state_dict(), 'args': Args.state_dict()}
# with VARTrainer.state_dict() = {'config': {...}, 'var_wo_ddp': VAR state dict, 'vae_local': VQVAE state dict,
# 'var_opt': {'optimizer': AdamW state, 'scaler': GradScaler state (fp16 only)}} and Args.state_dict() an
# OrderedDict of the command-line args (str, int, float, bool, None, tuples). Only the two state dicts, the
# epoch, the iteration and the args are read; the optimizer moments are never loaded.
TRAINER_VAR_KEY = "trainer.var_wo_ddp"
TRAINER_VAE_KEY = "trainer.vae_local"
# Key prefixes of wrapped modules: DistributedDataParallel ('module.') and torch.compile ('_orig_mod.').
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Official args worth printing (utils/arg_util.py), in this order; any arg naming a tokenizer ('vae') is added.
TRAINER_ARGS_SHOWN = (
    "depth", "pn", "patch_nums", "saln", "anorm", "fp16", "bs", "ep", "tblr", "tlr", "twd", "tclip", "ls", "pg",
    "cur_ep", "data_path",
)  # fmt: skip
# The official trainer's shorthands for --pn (arg_util.init_dist_and_get_args).
PN_ALIASES = {
    "256": PATCH_NUMS_256,
    "512": PATCH_NUMS_512,
    "1024": (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


# Keys that only one kind of release file holds: how a tokenizer given as --var (or a VAR as --vae) is recognised.
KIND_MARKERS = {
    "tokenizer": ("quantize.embedding.weight", "encoder.conv_in.weight", "decoder.conv_out.weight"),
    "VAR transformer": ("class_emb.weight", "word_embed.weight", "head.weight"),
}


def state_dict_kind(sd: Mapping[str, np.ndarray]) -> str | None:
    """'tokenizer' or 'VAR transformer' when a state dict's keys say which release file it is; None otherwise."""
    keys = {k.removeprefix("module.").removeprefix("_orig_mod.") for k in sd}
    kinds = [kind for kind, marks in KIND_MARKERS.items() if any(m in keys for m in marks)]
    return kinds[0] if len(kinds) == 1 else None


def strip_wrapper_prefixes(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """Drops the key prefixes DDP and torch.compile add ('module.', '_orig_mod.', nested in any order) when
    every key carries them. Returns (state dict, the prefix removed, '' for none)."""
    sd, removed = dict(sd), ""
    while sd and (p := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)):
        sd, removed = {k[len(p) :]: v for k, v in sd.items()}, removed + p
    return sd, removed


def _patch_nums_of(value) -> tuple[int, ...] | None:
    """A scale schedule from an args value: a tuple/list of ints, or the `pn` string '1_2_3' / '1-2-3' / '256'."""
    if isinstance(value, tuple | list) and value and all(type(v) is int and v > 0 for v in value):
        return tuple(value)
    if isinstance(value, str):
        if value in PN_ALIASES:
            return PN_ALIASES[value]
        parts = value.replace("-", "_").split("_")
        if all(p.isdigit() and int(p) > 0 for p in parts):
            return tuple(int(p) for p in parts)
    return None


@dataclasses.dataclass(frozen=True)
class TrainerCheckpoint:
    """What ``varjax convert`` reads from an official trainer checkpoint (ar-ckpt-last.pth / ar-ckpt-best.pth).

    ``vae_sd`` is None when the file holds no tokenizer (``has_vae`` False) or it was not asked for.
    ``args`` is empty when the file stores none (or stores them in another form, noted in ``args_note``).
    """

    path: str
    var_sd: dict[str, np.ndarray]
    vae_sd: dict[str, np.ndarray] | None
    has_vae: bool
    epoch: object
    iter: object
    args: dict
    config: dict
    args_note: str = ""

    @property
    def patch_nums(self) -> tuple[int, ...] | None:
        """The scales it was trained with: args 'patch_nums' (derived from 'pn'), else 'pn', else the trainer's
        own config; None if none of them says."""
        for value in (self.args.get("patch_nums"), self.args.get("pn"), self.config.get("patch_nums")):
            if (pn := _patch_nums_of(value)) is not None:
                return pn
        return None

    def describe(self) -> list[str]:
        """Lines saying what was read: epoch, iteration, the args that matter, where the tokenizer is."""
        lines = [f"{self.path}: official trainer checkpoint, epoch {self.epoch!r}, iter {self.iter!r}"]
        shown = [k for k in TRAINER_ARGS_SHOWN if k in self.args]
        shown += [k for k in self.args if "vae" in str(k).lower() and k not in shown]
        if shown:
            text = " ".join(f"{k}={_short(self.args[k])}" for k in shown)
            rest = len(self.args) - len(shown)
            lines.append(f"args: {text}" + (f" ({rest} more in the file)" if rest > 0 else ""))
        if self.args_note:
            lines.append(self.args_note)
        if self.has_vae:
            lines.append(f"tokenizer: stored in the file under {TRAINER_VAE_KEY}")
        else:
            lines.append(f"tokenizer: not in the file (no {TRAINER_VAE_KEY})")
        return lines

    def disagreements(self, cfg: VARConfig) -> list[str]:
        """Args that contradict the weights' shapes (the weights are converted as they are)."""
        said = {"depth": cfg.depth, "saln": cfg.shared_aln, "anorm": cfg.attn_l2_norm}
        return [
            f"the args say {k}={self.args[k]!r} but the weights give {v!r}; the weights are converted as they are"
            for k, v in said.items()
            if k in self.args and type(self.args[k]) in (int, bool) and self.args[k] != v
        ]


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_trainer_checkpoint(path, read_vae: bool = True, name: str | None = None) -> TrainerCheckpoint | None:
    """The official trainer checkpoint at ``path``, or None if the file is not one (no ``trainer.var_wo_ddp``).

    Reads through the restricted unpickler of ``torch_io``: nothing in the file is executed, and a global
    outside the allow-list raises ``UnsafeCheckpointError``. Only the selected tensors are read. ``name``: what
    messages call the file when ``path`` is a local copy of it.
    """
    from varjax.interop import torch_io

    if torch_io.checkpoint_format(path) == "safetensors":
        return None
    with torch_io.TorchCheckpoint(path, name=name) as ckpt:
        if not ckpt.has(TRAINER_VAR_KEY):
            return None
        has_vae = ckpt.has(TRAINER_VAE_KEY)
        args = ckpt.value("args") if ckpt.has("args") else {}
        note = ""
        if not isinstance(args, Mapping):  # very old official checkpoints stored str(args)
            note, args = f"args: stored as a {type(args).__name__}, not a dict; not read", {}
        config = ckpt.value("trainer.config") if ckpt.has("trainer.config") else {}
        return TrainerCheckpoint(
            path=str(name or path),
            var_sd=ckpt.state_dict(TRAINER_VAR_KEY),
            vae_sd=ckpt.state_dict(TRAINER_VAE_KEY) if has_vae and read_vae else None,
            has_vae=has_vae,
            epoch=ckpt.value("epoch") if ckpt.has("epoch") else None,
            iter=ckpt.value("iter") if ckpt.has("iter") else None,
            args=dict(args),
            config=dict(config) if isinstance(config, Mapping) else {},
            args_note=note,
        )
