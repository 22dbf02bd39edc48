"""``varjax eval --ckpt DIR``: class consistency of samples and tokenizer PSNR on the embedded dataset.

Class consistency is the fraction of generated images whose class, as read by the exact analytic detector
of ``varjax_shapes`` (``varjax.data.shapes.classify_shapes``), equals the conditioning class. PSNR is the
tokenizer's full reconstruction of held-out (test split) images, in dB on [0, 1] images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from varjax.ckpt import ModelBundle, load_model_dir
from varjax.codec import batched, psnr, tokenizer_fns
from varjax.data.shapes import NUM_CLASSES, classify_shapes, draw_example
from varjax.sample import SampleOptions, make_sampler


def held_out_images(n: int, size: int) -> np.ndarray:
    """The first n test-split images of ``varjax_shapes`` at ``size`` px, (n, size, size, 3) in [0, 1]."""
    return np.stack([draw_example(i, "test", size)[0] for i in range(n)]).astype(np.float32) / 255.0


def tokenizer_psnr(b: ModelBundle, images01: np.ndarray, batch: int = 64) -> float:
    _, recon = tokenizer_fns(b.vae_cfg)
    out = batched(lambda x: (recon(b.vae_params, x * 2 - 1) + 1) / 2, images01, batch)
    return float(psnr(out, images01).mean())


def sample_per_class(b: ModelBundle, per_class: int, opts: SampleOptions, seed: int, classes: int) -> tuple:
    """(images (classes*per_class, H, W, 3) in [0, 1], labels) generated class by class, row-major."""
    sampler = make_sampler(b.vae_cfg, b.var_cfg, opts)
    labels = np.repeat(np.arange(classes, dtype=np.int32), per_class)
    imgs = []
    for i in range(0, len(labels), 64):  # bounded batches keep memory flat for many samples
        out, _ = sampler(b.vae_params, b.var_params, jnp.asarray(labels[i : i + 64]), jax.random.PRNGKey(seed + i))
        imgs.append(np.asarray(out))
    return np.concatenate(imgs), labels


def class_consistency(images01: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    pred = np.asarray(classify_shapes((images01 * 255).round().astype(np.uint8)))
    return float((pred == labels).mean()), pred


def evaluate(
    ckpt: str,
    *,
    per_class: int = 16,
    num_heldout: int = 256,
    opts: SampleOptions | None = None,
    seed: int = 0,
    grid: str | None = None,
    inception: str | None = None,
    fid_ref: str | None = None,
) -> dict:
    """All numbers of ``varjax eval`` as a dict (and an optional PNG grid, one row per class).

    With ``inception`` (pytorch-fid's Inception weights) and ``fid_ref`` (a statistics .npz, see
    ``varjax fid``) it adds FID, sFID, IS, precision and recall of the same samples.
    """
    from varjax.images import save_grid

    t0 = time.time()
    b = load_model_dir(ckpt)
    res: dict = {"ckpt": str(ckpt), "image_size": b.vae_cfg.image_size}
    res["tokenizer_psnr_db"] = tokenizer_psnr(b, held_out_images(num_heldout, b.vae_cfg.image_size))
    res["num_heldout"] = num_heldout
    if b.var_cfg is not None:
        opts = opts or SampleOptions(cfg=1.5, top_k=0, top_p=0.0)
        classes = min(b.var_cfg.num_classes, NUM_CLASSES)
        imgs, labels = sample_per_class(b, per_class, opts, seed, classes)
        acc, pred = class_consistency(imgs, labels)
        res["class_consistency"] = acc
        res["per_class_consistency"] = [float((pred[labels == c] == c).mean()) for c in range(classes)]
        res["num_samples"] = int(len(labels))
        res["sampling"] = {"cfg": opts.cfg, "top_k": opts.top_k, "top_p": opts.top_p, "seed": seed}
        if inception or fid_ref:
            from varjax.fid_eval import fid_of_images

            res.update(fid_of_images(imgs, inception, fid_ref))
        if grid:
            save_grid(grid, imgs, nrow=per_class)
            res["grid"] = str(grid)
    res["seconds"] = time.time() - t0
    return res


def model_fid(ckpt, inception: str, fid_ref: str, per_class: int = 16, opts: SampleOptions | None = None,
              seed: int = 0) -> dict:
    """FID (and sFID, IS, precision, recall) of ``per_class`` samples of every class of a model."""
    from varjax.fid_eval import fid_of_images

    b = load_model_dir(ckpt, need_var=True)
    opts = opts or SampleOptions(cfg=1.5, top_k=0, top_p=0.0)
    imgs, _ = sample_per_class(b, per_class, opts, seed, b.var_cfg.num_classes)
    return fid_of_images(imgs, inception, fid_ref)


def run_cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog=argv[0], description=__doc__)
    p.add_argument("--ckpt", required=True, help="model directory or training workdir (VAR or tokenizer)")
    p.add_argument("--per-class", type=int, default=16, help="samples per class")
    p.add_argument("--heldout", type=int, default=256, help="held-out images for the tokenizer PSNR")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="optional PNG grid of the samples (one row per class)")
    p.add_argument("--out", default=None, help="JSON file (default: CKPT/eval.json)")
    p.add_argument("--inception", default=None, help="Inception weights (pt_inception-2015-12-05-*.pth) for FID")
    p.add_argument("--fid-ref", default=None, help="reference statistics .npz for FID (see `varjax fid`)")
    a = p.parse_args(argv[1:])
    try:
        res = evaluate(
            a.ckpt,
            per_class=a.per_class,
            num_heldout=a.heldout,
            opts=SampleOptions(a.cfg, a.top_k, a.top_p),
            seed=a.seed,
            grid=a.grid,
            inception=a.inception,
            fid_ref=a.fid_ref,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(a.out or Path(a.ckpt) / "eval.json")
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(f"[eval] wrote {out}")
