"""The model commands: ``sample``, ``tokenize``, ``reconstruct``, ``edit``; each a parser and a function.

``sample`` works on every generator family (``varjax.sampling``); ``tokenize`` and ``edit`` on VQ tokenizers and
VAR; ``reconstruct`` on either tokenizer. Images on the command line are in [0, 1] (files, or arrays).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from varjax import sampling
from varjax.core import paths
from varjax.core.errors import at_least, floats, in_range, ints


def sampling_flags(p: argparse.ArgumentParser, top_k: int | None = None, top_p: float | None = None) -> None:
    """Flags of every sampler (None / 0 / '': the model directory's default, else the release's: VAR guidance 1.5,
    top-k 900, top-p 0.96); ``top_k`` / ``top_p`` give a command's own VAR defaults."""
    p.add_argument("--cfg", type=at_least(0.0), default=None,
                   help="guidance scale >= 0 (VAR: at the last scale; default 1.5; E-CAR: the model's)")
    p.add_argument("--top-k", type=at_least(0, int), default=top_k,
                   help=f"VAR: keep the k most likely codes (0: all; default {900 if top_k is None else top_k})")
    p.add_argument("--top-p", type=in_range(0.0, 1.0), default=top_p,
                   help=f"VAR: nucleus mass in [0, 1] (0: off; default {0.96 if top_p is None else top_p})")
    p.add_argument("--more-smooth", action="store_true", help="VAR: Gumbel-smoothed codes (visualisation)")
    p.add_argument("--flow-steps", type=at_least(0, int), default=0, help="E-CAR: flow steps per stage (0: the "
                   "model's)")
    p.add_argument("--solver", default="", help="E-CAR: euler or heun (default: the model's)")
    p.add_argument("--temperature", type=at_least(0.0), default=None, help="E-CAR: noise scale (default: the "
                   "model's)")
    p.add_argument("--stage-cfg", type=floats, default=None, help="E-CAR: one guidance scale per stage, e.g. "
                   "1,2,3,3 (default: the model's; overrides --cfg)")
    p.add_argument("--stage-steps", type=ints, default=None, help="E-CAR: flow steps of each stage, e.g. 8,8,8,4 "
                   "(default: the model's; overrides --flow-steps)")
    p.add_argument("--no-ema", action="store_true", help="the raw trained weights instead of their EMA")


def sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="model directory or training workdir of a generator")
    p.add_argument("--labels", type=ints, required=True, help="class ids, e.g. 3,7,980")
    sampling_flags(p)
    p.add_argument("--dtype", default="float32", help="VAR compute dtype: float32, bfloat16 or float16")
    p.add_argument("--attention", default=None, help="VAR attention kernel (VARConfig.attention); default: the "
                   "model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nrow", type=int, default=None, help="images per row of the grid (default: up to 8)")
    p.add_argument("--out", required=True, help="PNG grid")
    p.add_argument("--save-npz", default=None, help="also write images (B,H,W,3) in [0,1], labels, and the "
                   "generator's extra: tokens (B,L) for VAR, latents for E-CAR")


def check_labels(labels, num_classes: int, flag: str = "--labels", allow_null: bool = False) -> np.ndarray:
    labels = np.asarray(labels, np.int32)
    hi = num_classes if allow_null else num_classes - 1
    bad = [int(x) for x in labels if not 0 <= x <= hi]
    if bad:
        null = f" ({num_classes} = unconditional)" if allow_null else ""
        raise ValueError(f"{flag} {bad} out of range; the model has classes 0..{hi}{null}.")
    return labels


def sample(a) -> None:
    import jax
    import jax.numpy as jnp

    from varjax.core.model_dir import load_model_dir
    from varjax.data.images import save_grid

    b = load_model_dir(a.ckpt, need_generator=True, ema=not a.no_ema)
    sampler_mod = sampling.get(b.family)
    labels = check_labels(a.labels, b.gen_cfg.num_classes)
    opts = sampler_mod.options(sampling.defaults(b), **vars(a))
    sampler = sampler_mod.make_sampler(b.tok_cfg, b.gen_cfg, opts)
    t0 = time.time()
    imgs, extra = sampler(b.tok_params, b.gen_params, jnp.asarray(labels), jax.random.PRNGKey(a.seed))
    imgs, extra = np.asarray(imgs, np.float32), np.asarray(extra)
    print(f"[sample] {len(labels)} images of {imgs.shape[1]}px in {time.time() - t0:.1f}s (compile included)")
    save_grid(a.out, imgs, nrow=min(len(labels), a.nrow or 8))
    print(f"[sample] wrote {a.out}")
    if a.save_npz:
        paths.write_npz(a.save_npz, images=imgs, labels=labels, **{sampler_mod.EXTRA: extra})
        print(f"[sample] wrote {a.save_npz}")


def image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="model directory or training workdir holding a tokenizer")
    p.add_argument("--images", required=True, help="folder of images, or .npy/.npz (B,H,W,3)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=at_least(1, int), default=16)


def _vq_tokenizer(ckpt):
    from varjax.core.model_dir import load_model_dir

    b = load_model_dir(ckpt)
    if b.family not in ("vq", "var"):
        raise ValueError(f"--ckpt {ckpt}: holds a {b.family!r} model; tokens are made by a VQ tokenizer (family "
                         "'vq' or 'var').")
    return b


def tokenize(a) -> None:
    from varjax.data.images import load_images
    from varjax.sampling.codec import batched, tokenizer_fns

    b = _vq_tokenizer(a.ckpt)
    imgs = load_images(a.images, size=b.tok_cfg.image_size)
    tok_fn, _ = tokenizer_fns(b.tok_cfg)
    tokens = batched(lambda x: tok_fn(b.tok_params, x * 2 - 1), imgs, a.batch_size).astype(np.int32)
    paths.write_npz(a.out, tokens=tokens, patch_nums=np.asarray(b.tok_cfg.patch_nums, np.int32))
    print(f"[tokenize] {len(imgs)} images -> tokens {tokens.shape} written to {a.out}")


def reconstruct(a) -> None:
    from varjax import losses
    from varjax.core.model_dir import load_model_dir
    from varjax.data.images import load_images, save_png
    from varjax.sampling.codec import reconstruct as recon

    b = load_model_dir(a.ckpt)
    imgs = load_images(a.images, size=b.tok_cfg.image_size)
    rec = recon(b.tok_cfg, b.tok_params, imgs, a.batch_size)
    db = float(np.mean(np.asarray(losses.psnr(rec, imgs))))
    if str(a.out).endswith(".npz"):
        paths.write_npz(a.out, images=rec)
    else:
        for i, r in enumerate(rec):
            save_png(f"{str(a.out).rstrip('/')}/{i:05d}.png", r)
    print(f"[reconstruct] {len(imgs)} images, PSNR {db:.2f} dB, written to {a.out}")


def edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="model directory or training workdir of a VAR")
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=True, help="PNG; white marks the region to generate")
    p.add_argument("--label", type=int, required=True, help="class id; num_classes means unconditional")
    p.add_argument("--cfg", type=at_least(0.0), default=1.5, help="guidance scale >= 0 at the last scale")
    p.add_argument("--top-k", type=at_least(0, int), default=900, help="keep the k most likely codes (0: all)")
    p.add_argument("--top-p", type=in_range(0.0, 1.0), default=0.96, help="nucleus mass in [0, 1] (0: off)")
    p.add_argument("--more-smooth", action="store_true")
    p.add_argument("--no-ema", action="store_true", help="the raw trained weights instead of their EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)


def edit(a) -> None:
    import jax
    import jax.numpy as jnp

    from varjax.core.model_dir import load_model_dir
    from varjax.data.images import load_image_file, load_mask, save_png
    from varjax.sampling.codec import tokenizer_fns
    from varjax.sampling.var import SampleOptions, make_sampler, mask_to_keep

    b = load_model_dir(a.ckpt, need_generator=True, ema=not a.no_ema)
    if b.family != "var":
        raise ValueError(f"--ckpt {a.ckpt}: holds a {b.family!r} model; editing needs a VAR (family 'var').")
    size = b.tok_cfg.image_size
    check_labels([a.label], b.gen_cfg.num_classes, "--label", allow_null=True)
    img = load_image_file(a.image, size)[None]
    gen = load_mask(a.mask, size)
    tok_fn, _ = tokenizer_fns(b.tok_cfg)
    gt = tok_fn(b.tok_params, jnp.asarray(img) * 2 - 1)
    keep = jnp.asarray(mask_to_keep(gen, b.tok_cfg.patch_nums[-1]))[None]
    editor = make_sampler(b.tok_cfg, b.gen_cfg, SampleOptions(a.cfg, a.top_k, a.top_p, a.more_smooth))
    out, _ = editor(b.tok_params, b.gen_params, jnp.asarray([a.label], jnp.int32), jax.random.PRNGKey(a.seed), gt, keep)
    save_png(a.out, np.asarray(out[0]))
    print(f"[edit] wrote {a.out} (generated {gen.mean() * 100:.0f}% of the image, label {a.label})")
