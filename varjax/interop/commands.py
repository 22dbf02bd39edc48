"""The interop commands: ``convert`` (released or official-trainer PyTorch checkpoints -> a model directory) and
``export`` (a model directory -> the release's ``.pth`` files); each a parser and a function."""

from __future__ import annotations

import argparse
import contextlib
import time

from varjax.core import model_dir, paths
from varjax.core.errors import ints
from varjax.core.mesh import param_count
from varjax.interop import convert
from varjax.interop.torch_io import load_state_dict


def convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vae",
        help="tokenizer .pth or .safetensors (e.g. vae_ch160v4096z32.pth); optional when --var is an official "
        "trainer checkpoint holding it (trainer.vae_local); given, it wins over that one",
    )
    p.add_argument(
        "--var",
        help="transformer .pth or .safetensors (e.g. var_d16.pth), or an official trainer checkpoint "
        "(ar-ckpt-last.pth: weights under trainer.var_wo_ddp, patch_nums from its args)",
    )
    p.add_argument("--patch-nums", type=ints, default=None,
                   help="scales, e.g. 1,2,3,4,5,6,8,10,13,16 (default: from the VAR shapes or the trainer "
                   "checkpoint's args, else the 256px schedule)")
    p.add_argument("--num-heads", type=int, default=None, help="heads, when the checkpoint does not reveal them")
    p.add_argument("--out", required=True, help="output model directory")


def convert_checkpoints(a) -> None:
    t0 = time.time()
    with contextlib.ExitStack() as stack:  # a URL is copied to a local file once, read, and the copy removed
        var_local = stack.enter_context(paths.local_copy(a.var)) if a.var else None
        vae_local = stack.enter_context(paths.local_copy(a.vae)) if a.vae else None
        # An official trainer checkpoint (ar-ckpt-*.pth) holds the transformer and usually the tokenizer.
        trainer = convert.read_trainer_checkpoint(var_local, read_vae=not a.vae, name=str(a.var)) if a.var else None
        sd_var = None
        if a.var:
            sd_var = trainer.var_sd if trainer is not None else load_state_dict(var_local, name=str(a.var))
            _check_kind(sd_var, "--var", a.var, "VAR transformer")
        sd_vae = None
        if a.vae:
            sd_vae = load_state_dict(vae_local, name=str(a.vae))
            _check_kind(sd_vae, "--vae", a.vae, "tokenizer")
    _convert(a, trainer, sd_var, sd_vae, t0)


def _check_kind(sd: dict, flag: str, path, want: str) -> None:
    """Refuses a release file of the other kind (a tokenizer given as --var, a transformer as --vae)."""
    have = convert.state_dict_kind(sd)
    if have is not None and have != want:
        other = "--vae" if flag == "--var" else "--var"
        raise ValueError(
            f"{flag} {path}: the file holds a {have} (keys such as {convert.KIND_MARKERS[have][0]!r}), not a "
            f"{want}. Pass it as {other} {path}, and the {want} file as {flag}."
        )


def _convert(a, trainer, sd_var, sd_vae, t0: float) -> None:
    var_cfg = var_params = None
    patch_nums = a.patch_nums
    source = {"vae": str(a.vae) if a.vae else None, "var": str(a.var) if a.var else None}
    if trainer is not None:
        for line in trainer.describe():
            print(f"[convert] {line}")
        epoch, it = _json_scalar(trainer.epoch), _json_scalar(trainer.iter)
        source.update(var_key=convert.TRAINER_VAR_KEY, epoch=epoch, iter=it)
        if patch_nums is None and trainer.patch_nums is not None:
            patch_nums = trainer.patch_nums
            print(f"[convert] patch_nums {','.join(map(str, patch_nums))} from the checkpoint")
        elif patch_nums is not None and trainer.patch_nums not in (None, patch_nums):
            print(f"[convert] --patch-nums {patch_nums} given: used instead of the checkpoint's {trainer.patch_nums}")
    sd_vae, vae_name = _convert_vae_source(a, trainer, sd_vae)  # before the VAR's conversion: fails fast
    if trainer is not None and not a.vae:
        source.update(vae=str(a.var), vae_key=convert.TRAINER_VAE_KEY)
    if a.var:
        sd_var = _unwrapped(sd_var, a.var)
        var_cfg, var_params = convert.convert_var(sd_var, patch_nums, a.num_heads, source=str(a.var))
        patch_nums = var_cfg.patch_nums
        print(
            f"[convert] {a.var}: VAR depth {var_cfg.depth}, width {var_cfg.embed_dim}, heads {var_cfg.num_heads}, "
            f"classes {var_cfg.num_classes}, shared_aln {var_cfg.shared_aln}, {param_count(var_params):,} params"
        )
        for note in trainer.disagreements(var_cfg) if trainer is not None else ():
            print(f"[convert] note: {note}")
    vae_cfg, vae_params = convert.convert_vqvae(sd_vae, patch_nums or convert.PATCH_NUMS_256, source=vae_name)
    if var_cfg is not None and (var_cfg.vocab_size, var_cfg.Cvae) != (vae_cfg.vocab_size, vae_cfg.z_channels):
        raise ValueError(
            f"{a.var} expects a codebook of {var_cfg.vocab_size} x {var_cfg.Cvae} but {vae_name} has "
            f"{vae_cfg.vocab_size} x {vae_cfg.z_channels}; they do not belong together."
        )
    print(
        f"[convert] {vae_name}: VQVAE ch {vae_cfg.ch}, codebook {vae_cfg.vocab_size}x{vae_cfg.z_channels}, "
        f"{vae_cfg.image_size}px, patch_nums {vae_cfg.patch_nums}, {param_count(vae_params):,} params"
    )
    family = "vq" if var_cfg is None else "var"
    model_dir.save_model_dir(a.out, family, vae_cfg, vae_params, var_cfg, var_params, source=source)
    print(f"[convert] wrote {a.out} in {time.time() - t0:.1f}s")


def _unwrapped(sd: dict, name) -> dict:
    """``sd`` without the 'module.' (DDP) / '_orig_mod.' (torch.compile) prefix every key carries, if any."""
    sd, removed = convert.strip_wrapper_prefixes(sd)
    if removed:
        print(f"[convert] {name}: removed the key prefix {removed!r} of a wrapped (DDP / compiled) module")
    return sd


def _convert_vae_source(a, trainer, sd_vae: dict | None) -> tuple[dict, str]:
    """(tokenizer state dict, its name): ``--vae`` if given, else the one stored in the trainer checkpoint."""
    if a.vae:
        if trainer is not None and trainer.has_vae:
            print(f"[convert] --vae {a.vae} given: it is used instead of the tokenizer stored in {a.var}")
        return _unwrapped(sd_vae, a.vae), str(a.vae)
    if trainer is not None and trainer.vae_sd is not None:
        return _unwrapped(trainer.vae_sd, a.var), f"{a.var} ({convert.TRAINER_VAE_KEY})"
    if trainer is not None:
        raise ValueError(
            f"{a.var} is an official trainer checkpoint (epoch {trainer.epoch!r}) without the tokenizer: it has "
            f"no '{convert.TRAINER_VAE_KEY}'. Pass the tokenizer it was trained with as --vae, e.g. "
            "--vae vae_ch160v4096z32.pth (the file the official trainer loads)."
        )
    if a.var:
        raise ValueError(
            f"--vae is required: {a.var} is a plain state dict, not an official trainer checkpoint holding the "
            f"tokenizer ('{convert.TRAINER_VAE_KEY}'). Pass the tokenizer file, e.g. --vae vae_ch160v4096z32.pth."
        )
    raise ValueError("convert needs --vae (the tokenizer .pth/.safetensors), --var, or both.")


def _json_scalar(value):
    """``value`` if JSON can record it as it is, else its repr."""
    return value if value is None or type(value) in (bool, int, float, str) else repr(value)


def export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="model directory (varjax convert) or `varjax train` workdir")
    p.add_argument("--out", required=True, help="output directory for vae.pth and var.pth")
    p.add_argument("--no-ema", action="store_true", help="the raw trained weights instead of their EMA")


def export(a) -> None:
    from varjax.interop.export import export_model

    written = export_model(a.ckpt, a.out, ema=not a.no_ema)
    for what, path in written.items():
        print(f"[export] wrote {path} ({what})")
    if "var" not in written:
        print(f"[export] {a.ckpt} holds only a tokenizer: no var.pth written")
