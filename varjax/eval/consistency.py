"""What ``varjax eval`` and ``varjax main`` report for a model on the embedded dataset (``varjax_shapes``).

* Class consistency: the fraction of generated images whose class, as read by the dataset's exact analytic
  detector (``varjax.data.shapes.classify_shapes``), equals the conditioning class; per class too.
* The distribution of the samples against held-out real images (``varjax.eval.shape_metrics``): ``shape_fd``,
  ``shape_precision``, ``shape_recall``, with the floors ``shape_fd_floor`` (the tokenizer's reconstructions) and
  ``shape_fd_real`` (a second real set). A sampler that draws one image per class reads well on consistency and
  badly here.
* The tokenizer: PSNR of its reconstructions of held-out (test split) images, in dB on [0, 1] images, and the
  detector's accuracy on those reconstructions (``tokenizer_class_consistency``), which bounds what samples on
  these tokens can score.
* The sampler's cost: GFLOPs per image (XLA's cost analysis of the compiled program, decoder included), the
  tokenizer decoder's share of it (``decoder_gflops_per_image``, the same for every generator on that tokenizer)
  and seconds per image (compiled, this machine).

Every generator family samples through ``varjax.sampling``; a tokenizer-only directory gets the tokenizer numbers.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from varjax import losses, sampling
from varjax.core.metrics import compiled_flops
from varjax.core.model_dir import ModelBundle, load_model_dir
from varjax.data.shapes import NUM_CLASSES, classify_shapes, draw_example
from varjax.eval import shape_metrics
from varjax.sampling.codec import decoder_gflops_per_image, reconstruct

SAMPLE_BATCH = 64  # images per sampler call: memory stays flat for many samples
PER_CLASS = 64  # samples per class scored: at 16, one image moves a class's score by 6 points
GRID_PER_CLASS = 16  # samples per class shown in a grid (the first ones drawn)


def held_out_images(n: int, size: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Test-split images ``start .. start + n - 1`` of ``varjax_shapes`` at ``size`` px, (n, size, size, 3) in
    [0, 1], and their labels (n,)."""
    drawn = [draw_example(i, "test", size) for i in range(start, start + n)]
    images = np.stack([im for im, _ in drawn]).astype(np.float32) / 255.0
    return images, np.asarray([lab for _, lab in drawn], np.int32)


def real_per_class(per_class_n: int, size: int, classes: int = NUM_CLASSES) -> np.ndarray:
    """Held-out test images arranged as the samples are, class by class: (classes * per_class_n, size, size, 3)
    in [0, 1] (test image ``i`` has class ``i % NUM_CLASSES``)."""
    images, _ = held_out_images(per_class_n * NUM_CLASSES, size)
    return np.concatenate([images[c::NUM_CLASSES] for c in range(classes)])


def class_consistency(images01: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """(fraction of images the detector reads as their label, the detector's predictions (n,))."""
    pred = np.asarray(classify_shapes((np.asarray(images01) * 255).round().astype(np.uint8)))
    return float((pred == labels).mean()), pred


def per_class(pred: np.ndarray, labels: np.ndarray, classes: int) -> list[float]:
    return [float((pred[labels == c] == c).mean()) for c in range(classes)]


def tokenizer_numbers(b: ModelBundle, num_heldout: int) -> dict:
    """Tokenizer PSNR and the detector's accuracy (overall and per class) on held-out reconstructions."""
    images, labels = held_out_images(num_heldout, b.tok_cfg.image_size)
    rec = reconstruct(b.tok_cfg, b.tok_params, images)
    acc, pred = class_consistency(rec, labels)
    return {
        "tokenizer_psnr_db": float(np.mean(np.asarray(losses.psnr(rec, images)))),
        "tokenizer_class_consistency": acc,
        "tokenizer_per_class_consistency": per_class(pred, labels, min(NUM_CLASSES, int(labels.max()) + 1)),
        "num_heldout": num_heldout,
    }


def sample_per_class(b: ModelBundle, per_class_n: int, opts, seed: int, classes: int,
                     batch: int = SAMPLE_BATCH) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images (classes * per_class, H, W, 3) in [0, 1], labels, cost) generated class by class, row-major.

    The images at ``i .. i + batch - 1`` are one sampler call with key ``PRNGKey(seed + i)``. ``cost`` holds
    ``gflops_per_image`` (XLA's count for the compiled program) and ``seconds_per_image`` (compiled programs, this
    machine).
    """
    sampler = sampling.get(b.family).make_sampler(b.tok_cfg, b.gen_cfg, opts)
    labels = np.repeat(np.arange(classes, dtype=np.int32), per_class_n)
    chunks = [labels[i : i + batch] for i in range(0, len(labels), batch)]
    programs = {}
    for n in sorted({len(c) for c in chunks}, reverse=True):  # compiled before the clock starts
        programs[n] = sampler.lower(b.tok_params, b.gen_params, jnp.zeros((n,), jnp.int32),
                                    jax.random.PRNGKey(0)).compile()
    first = max(programs)
    imgs, t0 = [], time.perf_counter()
    for i, chunk in zip(range(0, len(labels), batch), chunks, strict=True):
        out, _ = programs[len(chunk)](b.tok_params, b.gen_params, jnp.asarray(chunk), jax.random.PRNGKey(seed + i))
        imgs.append(np.asarray(out))
    seconds = time.perf_counter() - t0
    return np.concatenate(imgs), labels, {
        "gflops_per_image": compiled_flops(programs[first]) / first / 1e9,
        "seconds_per_image": seconds / len(labels),
    }


def grid_rows(images: np.ndarray, per_class_n: int, shown: int = GRID_PER_CLASS) -> np.ndarray:
    """The first ``shown`` images of each class of a class-by-class batch (classes * per_class_n, H, W, 3)."""
    n = min(shown, per_class_n)
    return images.reshape(-1, per_class_n, *images.shape[1:])[:, :n].reshape(-1, *images.shape[1:])


def evaluate(ckpt: str, *, per_class_n: int = PER_CLASS, num_heldout: int = 256, flags: dict | None = None,
             seed: int = 0, grid: str | None = None, inception: str | None = None, fid_ref: str | None = None,
             ema: bool = True, shape_ref: int = 600) -> dict:
    """All numbers of ``varjax eval`` as a dict (and an optional PNG grid, one row per class of at most
    ``GRID_PER_CLASS`` samples).

    ``flags`` are sampling values as the command line gives them (see ``varjax.sampling``; missing ones take the
    model directory's defaults). ``shape_ref`` test images are the reference of the distribution metric (0: off).
    With ``inception`` (pytorch-fid's Inception weights) and ``fid_ref`` (a
    statistics .npz, see ``varjax fid``) it adds FID, sFID, IS, precision and recall of the same samples.
    """
    from varjax.data.images import save_grid

    t0 = time.time()
    b = load_model_dir(ckpt, ema=ema)
    res: dict = {"ckpt": str(ckpt), "family": b.family, "image_size": b.tok_cfg.image_size}
    res.update(tokenizer_numbers(b, num_heldout))
    if b.is_generator:
        sampler_mod = sampling.get(b.family)
        opts = sampler_mod.options(sampling.defaults(b), **(flags or {}))
        classes = min(b.gen_cfg.num_classes, NUM_CLASSES)
        imgs, labels, cost = sample_per_class(b, per_class_n, opts, seed, classes)
        acc, pred = class_consistency(imgs, labels)
        res["class_consistency"] = acc
        res["per_class_consistency"] = per_class(pred, labels, classes)
        res["num_samples"] = int(len(labels))
        res["sampling"] = {**sampler_mod.describe(opts), "seed": seed, "ema": ema}
        res.update(cost)
        # compiled here, where it is reported, not in sample_per_class (FID sampling has no use for it)
        res["decoder_gflops_per_image"] = decoder_gflops_per_image(b.tok_cfg, b.tok_params)
        if shape_ref:
            recon = lambda x: reconstruct(b.tok_cfg, b.tok_params, x)  # noqa: E731
            res.update(shape_metrics.shape_metrics(imgs, recon, n_ref=shape_ref, labels=labels))
        if inception or fid_ref:
            from varjax.eval.inception import fid_of_images

            res.update(fid_of_images(imgs, inception, fid_ref))
        if grid:
            save_grid(grid, grid_rows(imgs, per_class_n, GRID_PER_CLASS), nrow=min(per_class_n, GRID_PER_CLASS))
            res["grid"] = str(grid)
    res["seconds"] = time.time() - t0
    return res
