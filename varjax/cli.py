"""Command line: ``varjax <command> ...`` (also ``python -m varjax``).

Model commands (argparse): convert, sample, tokenize, reconstruct, edit, export.
Training commands (ml_collections config files, ``--config.field=value`` overrides): train, train-tokenizer,
eval, sweep, main, compile.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

TRAINING_COMMANDS = {
    "train": "varjax.train.var_trainer",
    "train-tokenizer": "varjax.train.tok_trainer",
    "eval": "varjax.evaluate",
    "sweep": "varjax.scaling.sweep",
    "main": "varjax.main_job",
    "compile": "varjax.aot",
    "sample-many": "varjax.sample_many",
    "fid": "varjax.fid_eval",
}


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.replace("_", ",").split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def cmd_convert(a) -> None:
    from varjax import ckpt, convert
    from varjax.torch_io import load_state_dict
    from varjax.train.sharding import param_count

    t0 = time.time()
    var_cfg = var_params = None
    patch_nums = a.patch_nums
    source = {"vae": str(a.vae) if a.vae else None, "var": str(a.var) if a.var else None}
    # An official trainer checkpoint (ar-ckpt-*.pth) holds the transformer and usually the tokenizer.
    trainer = convert.read_trainer_checkpoint(a.var, read_vae=not a.vae) if a.var else None
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
    sd_vae, vae_name = _convert_vae_source(a, trainer)  # before the VAR's conversion: a missing --vae fails fast
    if trainer is not None and not a.vae:
        source.update(vae=str(a.var), vae_key=convert.TRAINER_VAE_KEY)
    if a.var:
        sd_var = trainer.var_sd if trainer is not None else load_state_dict(a.var)
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
        raise SystemExit(
            f"error: {a.var} expects a codebook of {var_cfg.vocab_size} x {var_cfg.Cvae} but {vae_name} has "
            f"{vae_cfg.vocab_size} x {vae_cfg.z_channels}; they do not belong together."
        )
    print(
        f"[convert] {vae_name}: VQVAE ch {vae_cfg.ch}, codebook {vae_cfg.vocab_size}x{vae_cfg.z_channels}, "
        f"{vae_cfg.image_size}px, patch_nums {vae_cfg.patch_nums}, {param_count(vae_params):,} params"
    )
    ckpt.save_model_dir(a.out, vae_cfg, vae_params, var_cfg, var_params, extra={"source": source})
    print(f"[convert] wrote {a.out} in {time.time() - t0:.1f}s")


def _unwrapped(sd: dict, name) -> dict:
    """``sd`` without the 'module.' (DDP) / '_orig_mod.' (torch.compile) prefix every key carries, if any."""
    from varjax import convert

    sd, removed = convert.strip_wrapper_prefixes(sd)
    if removed:
        print(f"[convert] {name}: removed the key prefix {removed!r} of a wrapped (DDP / compiled) module")
    return sd


def _convert_vae_source(a, trainer) -> tuple[dict, str]:
    """(tokenizer state dict, its name): ``--vae`` if given, else the one stored in the trainer checkpoint."""
    from varjax import convert
    from varjax.torch_io import load_state_dict

    if a.vae:
        if trainer is not None and trainer.has_vae:
            print(f"[convert] --vae {a.vae} given: it is used instead of the tokenizer stored in {a.var}")
        return _unwrapped(load_state_dict(a.vae), a.vae), str(a.vae)
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


def _savez(path, **arrays) -> None:
    """``np.savez`` to a local path or URL."""
    import io

    from varjax import paths

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    paths.write_bytes(path, buf.getvalue())


def _load_bundle(path, need_var=False):
    from varjax.ckpt import load_model_dir

    return load_model_dir(path, need_var=need_var)


def cmd_sample(a) -> None:
    import jax
    import jax.numpy as jnp

    from varjax.ckpt import read_model_json
    from varjax.images import save_grid
    from varjax.sample import SampleOptions, make_sampler

    if read_model_json(a.ckpt).get("family") == "ecar":  # continuous tokens: the E-CAR sampler
        from varjax.ecar_main import cmd_sample as sample_ecar

        return sample_ecar(a)
    b = _load_bundle(a.ckpt, need_var=True)
    labels = np.asarray(a.labels, np.int32)
    bad = [int(x) for x in labels if not 0 <= x < b.var_cfg.num_classes]
    if bad:
        raise SystemExit(f"error: --labels {bad} out of range; the model has classes 0..{b.var_cfg.num_classes - 1}.")
    opts = SampleOptions(a.cfg, a.top_k, a.top_p, a.more_smooth, dtype=a.dtype, attention=a.attention)
    sampler = make_sampler(b.vae_cfg, b.var_cfg, opts)
    t0 = time.time()
    imgs, tokens = sampler(b.vae_params, b.var_params, jnp.asarray(labels), jax.random.PRNGKey(a.seed))
    imgs, tokens = np.asarray(imgs, np.float32), np.asarray(tokens, np.int32)
    print(f"[sample] {len(labels)} images of {imgs.shape[1]}px in {time.time() - t0:.1f}s (compile included)")
    save_grid(a.out, imgs, nrow=min(len(labels), a.nrow or 8))
    print(f"[sample] wrote {a.out}")
    if a.save_npz:
        _savez(a.save_npz, images=imgs, tokens=tokens, labels=labels)
        print(f"[sample] wrote {a.save_npz}")


def cmd_tokenize(a) -> None:
    from varjax.codec import batched, tokenizer_fns
    from varjax.images import load_images

    b = _load_bundle(a.ckpt)
    imgs = load_images(a.images, size=b.vae_cfg.image_size)
    tok_fn, _ = tokenizer_fns(b.vae_cfg)
    tokens = batched(lambda x: tok_fn(b.vae_params, x * 2 - 1), imgs, a.batch_size).astype(np.int32)
    _savez(a.out, tokens=tokens, patch_nums=np.asarray(b.vae_cfg.patch_nums, np.int32))
    print(f"[tokenize] {len(imgs)} images -> tokens {tokens.shape} written to {a.out}")


def cmd_reconstruct(a) -> None:
    from varjax.codec import batched, psnr, tokenizer_fns
    from varjax.images import load_images, save_png

    b = _load_bundle(a.ckpt)
    imgs = load_images(a.images, size=b.vae_cfg.image_size)
    _, rec_fn = tokenizer_fns(b.vae_cfg)
    rec = batched(lambda x: (rec_fn(b.vae_params, x * 2 - 1) + 1) * 0.5, imgs, a.batch_size).astype(np.float32)
    db = float(psnr(rec, imgs).mean())
    out = a.out
    if str(out).endswith(".npz"):
        _savez(out, images=rec)
    else:
        for i, r in enumerate(rec):
            save_png(f"{str(out).rstrip('/')}/{i:05d}.png", r)
    print(f"[reconstruct] {len(imgs)} images, PSNR {db:.2f} dB, written to {out}")


def cmd_edit(a) -> None:
    import jax
    import jax.numpy as jnp

    from varjax.codec import tokenizer_fns
    from varjax.images import load_image_file, load_mask, save_png
    from varjax.sample import SampleOptions, make_sampler, mask_to_keep

    b = _load_bundle(a.ckpt, need_var=True)
    size = b.vae_cfg.image_size
    if not 0 <= a.label <= b.var_cfg.num_classes:
        raise SystemExit(
            f"error: --label {a.label} out of range 0..{b.var_cfg.num_classes} "
            f"({b.var_cfg.num_classes} = unconditional)."
        )
    img = load_image_file(a.image, size)[None]
    gen = load_mask(a.mask, size)
    tok_fn, _ = tokenizer_fns(b.vae_cfg)
    gt = tok_fn(b.vae_params, jnp.asarray(img) * 2 - 1)
    keep = jnp.asarray(mask_to_keep(gen, b.vae_cfg.patch_nums[-1]))[None]
    editor = make_sampler(b.vae_cfg, b.var_cfg, SampleOptions(a.cfg, a.top_k, a.top_p, a.more_smooth))
    out, _ = editor(b.vae_params, b.var_params, jnp.asarray([a.label], jnp.int32), jax.random.PRNGKey(a.seed), gt, keep)
    save_png(a.out, np.asarray(out[0]))
    print(f"[edit] wrote {a.out} (generated {gen.mean() * 100:.0f}% of the image, label {a.label})")


def cmd_export(a) -> None:
    from varjax.export import cmd_export as run

    run(a)


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    from varjax.user_errors import at_least, in_range

    p.add_argument("--cfg", type=at_least(0.0), default=1.5, help="guidance scale >= 0 at the last scale")
    p.add_argument("--top-k", type=at_least(0, int), default=900, help="keep the k most likely codes (0: all)")
    p.add_argument("--top-p", type=in_range(0.0, 1.0), default=0.96, help="nucleus mass in [0, 1] (0: off)")


def build_parser() -> argparse.ArgumentParser:
    from varjax.user_errors import at_least

    p = argparse.ArgumentParser(prog="varjax", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error (first argument)")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert released PyTorch checkpoints (no PyTorch needed)")
    c.add_argument(
        "--vae",
        help="tokenizer .pth or .safetensors (e.g. vae_ch160v4096z32.pth); optional when --var is an official "
        "trainer checkpoint holding it (trainer.vae_local); given, it wins over that one",
    )
    c.add_argument(
        "--var",
        help="transformer .pth or .safetensors (e.g. var_d16.pth), or an official trainer checkpoint "
        "(ar-ckpt-last.pth: weights under trainer.var_wo_ddp, patch_nums from its args)",
    )
    c.add_argument(
        "--patch-nums",
        type=_ints,
        default=None,
        help="scales, e.g. 1,2,3,4,5,6,8,10,13,16 (default: from the VAR shapes, else the 256px schedule)",
    )
    c.add_argument("--num-heads", type=int, default=None, help="heads, when the checkpoint does not reveal them")
    c.add_argument("--out", required=True, help="output model directory")
    c.set_defaults(fn=cmd_convert)

    s = sub.add_parser("sample", help="class-conditional sampling to a PNG grid")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--labels", type=_ints, required=True, help="class ids, e.g. 3,7,980")
    _sampling_flags(s)
    s.add_argument("--more-smooth", action="store_true")
    s.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16 or float16")
    s.add_argument("--attention", default=None, help="attention kernel (VARConfig.attention); default: the model's")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nrow", type=int, default=None)
    s.add_argument("--out", required=True, help="PNG grid")
    s.add_argument("--save-npz", default=None, help="also write images (B,H,W,3) in [0,1] and tokens (B,L)")
    s.add_argument("--flow-steps", type=int, default=0, help="E-CAR: flow steps per stage (0: the model's default)")
    s.add_argument("--solver", default="", help="E-CAR: euler or heun (default: the model's)")
    s.set_defaults(fn=cmd_sample)

    for name, fn, hlp in (
        ("tokenize", cmd_tokenize, "images -> token ids (npz)"),
        ("reconstruct", cmd_reconstruct, "images -> tokenizer reconstructions"),
    ):
        t = sub.add_parser(name, help=hlp)
        t.add_argument("--ckpt", required=True)
        t.add_argument("--images", required=True, help="folder of images, or .npy/.npz (B,H,W,3)")
        t.add_argument("--out", required=True)
        t.add_argument("--batch-size", type=at_least(1, int), default=16)
        t.set_defaults(fn=fn)

    e = sub.add_parser("edit", help="zero-shot in-painting / out-painting / class-conditional editing")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--image", required=True)
    e.add_argument("--mask", required=True, help="PNG; white marks the region to generate")
    e.add_argument("--label", type=int, required=True, help="class id; num_classes means unconditional")
    _sampling_flags(e)
    e.add_argument("--more-smooth", action="store_true")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True)
    e.set_defaults(fn=cmd_edit)

    x = sub.add_parser("export", help="model directory or training workdir -> official PyTorch .pth files")
    x.add_argument("--ckpt", required=True, help="model directory (varjax convert) or `varjax train` workdir")
    x.add_argument("--out", required=True, help="output directory for vae.pth and var.pth")
    x.set_defaults(fn=cmd_export)

    for name in TRAINING_COMMANDS:
        sub.add_parser(name, help=f"see `varjax {name} --help`", add_help=False)
    return p


def _run(argv: list[str]) -> None:
    if argv and argv[0] in TRAINING_COMMANDS:
        import importlib

        from varjax.config_files import resolve_config_flags

        module = importlib.import_module(TRAINING_COMMANDS[argv[0]])
        module.run_cli([f"varjax {argv[0]}"] + resolve_config_flags(argv[1:]))
        return
    args = build_parser().parse_args(argv)
    args.fn(args)


def main(argv: list[str] | None = None) -> None:
    """``varjax [--debug] COMMAND ...``: bad input ends in one ``error: ...`` paragraph and exit code 2."""
    from varjax.user_errors import report_user_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"
    with report_user_errors(debug):
        _run(argv[1:] if debug else argv)
