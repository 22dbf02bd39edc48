"""A distribution metric for ``varjax_shapes``: Fréchet distance, precision and recall on the detector's features.

Class consistency alone rewards a model that draws one good image per class. These numbers compare the whole
distribution of generated images with held-out real ones, on per-image measurements made by the dataset's
analytic detector (``varjax.data.shapes``), so they need no trained network and no download:

- ``shape_fd``: Fréchet distance (``varjax.eval.fid.frechet_distance``) between the features of the generated set
  and of a reference set R1 of real test images;
- ``shape_precision`` / ``shape_recall``: k-NN manifold precision and recall, k = 3 (``varjax.eval.fid``'s, as in
  the FID precision/recall): precision is the fraction of generated images that look like some real one,
  recall the fraction of real images that some generated one looks like. A model that collapses onto a few
  colours or sizes keeps its precision and loses recall;
- the floors, on a second real set R2 (disjoint from R1, as large as the generated set, so the finite-sample
  bias of the Fréchet distance is the same): ``shape_fd_real`` (R2 against R1: what an ideal sampler scores)
  and ``shape_fd_floor`` (the tokenizer's reconstructions of R2 against R1: what a sampler that draws exactly
  the tokenizer's reconstructions of real images scores).

Features (``image_features``, D = 18; see its docstring) are scaled by fixed constants taken from the
dataset's generator, never fitted to the sets compared, so numbers are comparable across runs.

Letters in array names: B batch, H/W image height/width, D feature dimensions, N/M set sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from varjax.data import shapes as _shapes
from varjax.eval.fid import feature_stats, frechet_distance, precision_recall

# Fixed feature scales, from the generator's ranges (varjax/data/shapes.py), so that each feature spans about
# one unit over the data and none dominates the distance:
# - size: the side is drawn uniformly in [_MIN_SIZE, _MAX_SIZE] (0.35-0.70 of the image side): / 0.35;
# - centre: the centre lies within [_MARGIN + _MIN_SIZE / 2, 1 - _MARGIN - _MIN_SIZE / 2] (a 0.49-wide
#   range, narrower for larger shapes): / 0.49;
# - template misfit: the mean per-cell L1 distance of the shape's coverage grid to the nearest class
#   template is 0 for a clean shape; the closest two templates (plus and diamond) are 0.157 apart: / 0.157,
#   so a shape halfway between two classes sits ~0.5 from a clean one;
# - matte residual: RMS (over pixels and channels, [0, 1] units) of what the model "planar background + one
#   foreground colour + alpha" leaves unexplained; 0 for a clean drawing. A residual of 0.1 (blotches of a
#   second colour, a textured background) counts as one unit: / 0.1;
# - colours ([0, 1] RGB) and the class one-hot are used as they are.
SIZE_SCALE = _shapes._MAX_SIZE - _shapes._MIN_SIZE
CENTRE_SCALE = 1.0 - 2 * _shapes._MARGIN - _shapes._MIN_SIZE
MISFIT_SCALE = 0.157
RESIDUAL_SCALE = 0.1
PR_K = 3  # k of the k-NN manifolds, as the FID precision/recall
NUM_TEST = 1200  # images in the test split of varjax_shapes/32 and /64

FEATURE_NAMES = (
    *(f"class_{n}" for n in _shapes.CLASS_NAMES),
    "fg_r", "fg_g", "fg_b", "bg_r", "bg_g", "bg_b",
    "height", "width", "centre_y", "centre_x", "misfit", "residual",
)


def _as_uint8(images_BHW3: np.ndarray) -> np.ndarray:
    """uint8 images as they are; float images taken as [0, 1] (clipped) and rounded to 8 bits, as a PNG of
    them would hold (and as ``varjax.eval.consistency.class_consistency`` reads them)."""
    x = np.asarray(images_BHW3)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images of shape (B, H, W, 3), got {x.shape}.")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"integer images must be uint8, got {x.dtype}.")
    return np.round(np.clip(x.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def _one_image(image_HW3: np.ndarray) -> np.ndarray:
    """The D raw (unscaled) features of one uint8 image; see ``image_features``."""
    x = image_HW3.astype(np.float64)  # in [0, 255], exactly what `classify_shapes` segments
    h, w = x.shape[:2]
    alpha, fg, bg_HW3 = _shapes.matte(x)
    x, fg, bg_HW3 = x / 255.0, fg / 255.0, bg_HW3 / 255.0
    mask = _shapes._largest_component(alpha > 0.5)
    rows, cols = np.nonzero(mask)
    out = np.zeros(len(FEATURE_NAMES))
    out[6:9] = fg
    out[9:12] = bg_HW3.mean(axis=(0, 1))
    resid = x - (bg_HW3 * (1.0 - alpha[..., None]) + fg * alpha[..., None])
    out[17] = np.sqrt(np.mean(resid**2))
    if rows.size < 4:  # nothing readable: no class, no size, centred, misfit of a wrong class
        out[14:16] = 0.5
        out[16] = 1.0
        return out
    # The class as `classify_shapes` reads it (same grid, same templates).
    cut = np.where(_shapes.ndimage.binary_dilation(mask, iterations=1), alpha, 0.0)
    top, left = rows.min(), cols.min()
    hh, ww = rows.max() + 1 - top, cols.max() + 1 - left
    grid = _shapes._resample(cut, top, left, hh, ww, _shapes._TEMPLATE_SIDE)
    dist = np.abs(_shapes._TEMPLATES_CKK - grid[None]).mean(axis=(1, 2))
    out[int(np.argmin(dist))] = 1.0
    out[12:14] = hh / h, ww / w
    out[14:16] = (top + hh / 2) / h, (left + ww / 2) / w
    out[16] = dist.min()
    return out


_SCALES_D = np.array(
    [1.0] * 12 + [1 / SIZE_SCALE] * 2 + [1 / CENTRE_SCALE] * 2 + [1 / MISFIT_SCALE, 1 / RESIDUAL_SCALE]
)


def image_features(images_BHW3: np.ndarray) -> np.ndarray:
    """(B, D=18) float64 per-image measurements by the dataset's analytic detector, scaled by fixed constants.

    Images: uint8 in [0, 255], or floats in [0, 1] (clipped and rounded to 8 bits first, so an image and its
    uint8 copy have identical features). The matte (``varjax.data.shapes.matte``) splits each image into a
    planar background, one foreground colour and a coverage alpha; the shape is the largest component of
    alpha > 0.5, as ``classify_shapes`` segments it. Dimensions (``FEATURE_NAMES``):

    - 0-5, class: one-hot of the detector's class (all zero where no shape is found), so an unreadable or
      wrong shape moves the point by ~1.4; unscaled (a one-hot block spans one unit);
    - 6-8, foreground colour (RGB in [0, 1]; the data's hues cover the whole circle); unscaled;
    - 9-11, background colour: mean of the fitted background plane (RGB in [0, 1]; dark or light); unscaled;
    - 12-13, bounding-box height and width in units of the image side, / ``SIZE_SCALE`` (0.35, the range of
      the drawn sizes), so the data's range spans one unit;
    - 14-15, bounding-box centre (row, column) in units of the image side, / ``CENTRE_SCALE`` (0.49, the
      range of the drawn centres); 0.5 / 0.49 where no shape is found;
    - 16, template misfit: mean per-cell L1 distance of the shape's coverage grid to the nearest class
      template, / ``MISFIT_SCALE`` (0.157, the distance between the two closest templates); 1 / 0.157 where
      no shape is found. About 0 for a clean shape; grows as the shape is malformed;
    - 17, matte residual: RMS of the image minus its matte model (background plane, one foreground colour,
      alpha), / ``RESIDUAL_SCALE`` (0.1). About 0 for a clean drawing; grows with blotchy or multicoloured
      shapes and textured backgrounds.

    The constants come from the generator's ranges, not from the sets compared, so distances are comparable
    across runs and models.
    """
    x = _as_uint8(images_BHW3)
    if len(x) == 0:
        return np.zeros((0, len(FEATURE_NAMES)))
    return np.stack([_one_image(im) for im in x]) * _SCALES_D


def shape_fd(feats_a_ND: np.ndarray, feats_b_MD: np.ndarray) -> float:
    """Fréchet distance between two sets of ``image_features`` (Gaussian fits, float64)."""
    return frechet_distance(*feature_stats(feats_a_ND), *feature_stats(feats_b_MD))


def shape_precision_recall(gen_MD: np.ndarray, ref_ND: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """(precision, recall) of generated features against reference features, k-NN manifolds."""
    return precision_recall(ref_ND, gen_MD, k=k)


def held_out_sets(n_ref: int, n_second: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sets of real test-split images at ``size`` px, uint8 (N, size, size, 3): R1 = test images
    0..n_ref-1 (the reference), R2 = the next n_second (the second real set). Drawn with ``draw_example``, no
    dataset build. Test images cycle through the classes, so both sets are class-balanced when their sizes
    are multiples of 6."""
    if n_ref < 1 or n_second < 0 or n_ref + n_second > NUM_TEST:
        raise ValueError(f"held_out_sets: need 1 <= n_ref and n_ref + n_second <= {NUM_TEST} test images, "
                         f"got {n_ref} + {n_second}.")
    draw = lambda lo, hi: np.stack([_shapes.draw_example(i, "test", size)[0] for i in range(lo, hi)])  # noqa: E731
    r2 = draw(n_ref, n_ref + n_second) if n_second else np.zeros((0, size, size, 3), np.uint8)
    return draw(0, n_ref), r2


@functools.lru_cache(maxsize=4)
def _held_out_features(n_ref: int, n_second: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r1, r2 = held_out_sets(n_ref, n_second, size)
    f1, f2 = image_features(r1), image_features(r2)
    for a in (f1, f2, r2):
        a.setflags(write=False)
    return f1, f2, r2


def _from_features(gen_MD: np.ndarray, ref_ND: np.ndarray) -> dict:
    """The three numbers; None where the generated set is too small (FD: < 2, k-NN manifolds: <= k)."""
    p, r = shape_precision_recall(gen_MD, ref_ND) if len(gen_MD) > PR_K else (None, None)
    fd = shape_fd(gen_MD, ref_ND) if len(gen_MD) >= 2 else None
    return {"shape_fd": fd, "shape_precision": p, "shape_recall": r}


def distribution_metrics(gen01: np.ndarray, ref01: np.ndarray) -> dict:
    """{"shape_fd", "shape_precision", "shape_recall"} of generated images against reference images (each
    uint8 or [0, 1] floats, (N, H, W, 3))."""
    return _from_features(image_features(gen01), image_features(ref01))


def shape_metrics(gen01: np.ndarray, reconstruct: Callable[[np.ndarray], np.ndarray] | None = None,
                  n_ref: int = 600, labels: np.ndarray | None = None) -> dict:
    """The five numbers of ``eval.json`` for generated images (M, H, W, 3) in [0, 1] (or uint8).

    R1 is the first ``n_ref`` test images, R2 the next M (as many as generated). ``reconstruct`` maps [0, 1]
    float images (N, H, W, 3) to the tokenizer's reconstructions in [0, 1]; without it ``shape_fd_floor`` is
    left out. Also returns ``shape_n_ref`` and ``shape_n_second`` (the set sizes). When the test split is too
    small for R2 (M > 1200 - n_ref), the metric uses the first samples of each class (``labels`` (M,), given
    as a class-balanced set), as many per class as fit.
    """
    gen01 = np.asarray(gen01)
    if len(gen01) > NUM_TEST - n_ref:
        if labels is None:
            raise ValueError(f"{len(gen01)} samples and {n_ref} reference images exceed the {NUM_TEST} test "
                             "images; pass the labels to use a class-balanced subset.")
        labels = np.asarray(labels)
        classes = np.unique(labels)
        per = (NUM_TEST - n_ref) // len(classes)
        gen01 = gen01[np.concatenate([np.nonzero(labels == c)[0][:per] for c in classes])]
    m, size = len(gen01), int(gen01.shape[1])
    f1, f2, r2 = _held_out_features(n_ref, m, size)
    res = _from_features(image_features(gen01), f1)
    res["shape_fd_real"] = shape_fd(f2, f1) if m >= 2 else None
    if reconstruct is not None:
        rec = np.asarray(reconstruct(r2.astype(np.float32) / 255.0))
        res["shape_fd_floor"] = shape_fd(image_features(rec), f1) if m >= 2 else None
    res["shape_n_ref"], res["shape_n_second"] = n_ref, m
    return res
