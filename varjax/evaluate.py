"""``varjax eval --ckpt DIR``: class consistency of samples and tokenizer PSNR on the embedded dataset.

Class consistency is the fraction of generated images whose class, as read by the exact analytic detector
of ``varjax_shapes`` (``varjax.data.shapes.classify_shapes``), equals the conditioning class. PSNR is the
tokenizer's full reconstruction of held-out (test split) images, in dB on [0, 1] images; the detector's
accuracy on those reconstructions (``tokenizer_class_consistency``) bounds what samples on these tokens can
score.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from varjax import paths
from varjax.ckpt import ModelBundle, load_model_dir
from varjax.codec import batched, psnr, tokenizer_fns
from varjax.data.shapes import NUM_CLASSES, classify_shapes, draw_example
from varjax.sample import SampleOptions, make_sampler


def held_out_images(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n test-split images of ``varjax_shapes`` at ``size`` px, (n, size, size, 3) in [0, 1], and
    their labels (n,)."""
    drawn = [draw_example(i, "test", size) for i in range(n)]
    images = np.stack([im for im, _ in drawn]).astype(np.float32) / 255.0
    return images, np.asarray([lab for _, lab in drawn], np.int32)


def reconstruct(b: ModelBundle, images01: np.ndarray, batch: int = 64) -> np.ndarray:
    """The tokenizer's reconstructions (n, H, W, 3) in [0, 1] (clipped)."""
    _, recon = tokenizer_fns(b.vae_cfg)
    out = batched(lambda x: (recon(b.vae_params, x * 2 - 1) + 1) / 2, images01, batch)
    return np.clip(np.asarray(out, np.float32), 0.0, 1.0)


def tokenizer_numbers(b: ModelBundle, num_heldout: int) -> dict:
    """Tokenizer PSNR and the detector's accuracy (overall and per class) on held-out reconstructions."""
    images, labels = held_out_images(num_heldout, b.vae_cfg.image_size)
    rec = reconstruct(b, images)
    acc, pred = class_consistency(rec, labels)
    classes = range(min(NUM_CLASSES, int(labels.max()) + 1))
    return {
        "tokenizer_psnr_db": float(psnr(rec, images).mean()),
        "tokenizer_class_consistency": acc,
        "tokenizer_per_class_consistency": [float((pred[labels == c] == c).mean()) for c in classes],
        "num_heldout": num_heldout,
    }


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
    res.update(tokenizer_numbers(b, num_heldout))
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
    from varjax.user_errors import at_least, in_range

    p = argparse.ArgumentParser(prog=argv[0], description=__doc__)
    p.add_argument("--ckpt", required=True, help="model directory or training workdir (VAR or tokenizer)")
    p.add_argument("--per-class", type=at_least(1, int), default=16, help="samples per class")
    p.add_argument("--heldout", type=at_least(1, int), default=256, help="held-out images for the tokenizer PSNR")
    p.add_argument("--cfg", type=at_least(0.0), default=1.5, help="guidance scale >= 0")
    p.add_argument("--top-k", type=at_least(0, int), default=0, help="keep the k most likely codes (0: all)")
    p.add_argument("--top-p", type=in_range(0.0, 1.0), default=0.0, help="nucleus mass in [0, 1] (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="optional PNG grid of the samples (one row per class)")
    p.add_argument("--out", default=None, help="JSON file (default: CKPT/eval.json)")
    p.add_argument("--inception", default=None, help="Inception weights (pt_inception-2015-12-05-*.pth) for FID")
    p.add_argument("--fid-ref", default=None, help="reference statistics .npz for FID (see `varjax fid`)")
    a = p.parse_args(argv[1:])
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
    out = a.out or paths.resolve(a.ckpt) / "eval.json"
    paths.write_text(out, json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(f"[eval] wrote {out}")
