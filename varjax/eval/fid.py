"""Sample-quality metrics on Inception features: FID, sFID, Inception Score, precision and recall.

Pure math on feature arrays (N rows of D features); the features come from ``varjax.models.inception``.
Conventions follow the ADM (guided-diffusion) evaluator, ``evaluations/evaluator.py``:

- statistics: mean and ``np.cov(rowvar=False)`` (unbiased) in float64;
- FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2); sFID is the same on the spatial features;
- Inception Score: softmax of the unbiased logits (pool3 @ W, the graph's ``softmax/logits/MatMul``), split
  into 10 equal parts (the ADM evaluator's 5,000-sample splits for 50,000 samples), mean of exp(E[KL]);
- precision / recall (Kynkaenniemi et al. 2019, k = 3): each set's manifold is the union of balls around its
  points with the squared distance to the k-th nearest other point as radius (index k of the sorted row,
  index 0 being the point itself); precision = fraction of samples inside the reference manifold, recall =
  fraction of reference points inside the sample manifold. Distances are squared Euclidean in float32 (the
  ADM evaluator first tries float16; on borderline points the two can differ).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def feature_stats(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) in float64, as the ADM evaluator's ``compute_statistics``."""
    x = np.asarray(features_ND, np.float64)
    if len(x) < 2:
        raise ValueError(f"statistics need at least 2 feature vectors, got {len(x)}.")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _clip_rounding(w_D: np.ndarray) -> np.ndarray:
    """Eigenvalues at rounding level (below D * eps * max, numpy's matrix-rank tolerance) or negative -> 0.

    A rank-deficient covariance has hundreds of zero eigenvalues that come out as +-1e-14; their square
    roots (1e-7 each) would otherwise add up to a visible bias.
    """
    tol = len(w_D) * np.finfo(np.float64).eps * max(float(np.abs(w_D).max()), 0.0)
    return np.where(w_D > tol, w_D, 0.0)


def _psd_factor(sym_DD: np.ndarray) -> np.ndarray:
    """B (D, K) with B B^T = sym_DD (symmetric PSD), over its K eigenvalues above rounding level."""
    w, v = np.linalg.eigh((sym_DD + sym_DD.T) / 2)
    keep = _clip_rounding(w) > 0
    return v[:, keep] * np.sqrt(w[keep])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), stable for singular covariances.

    tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), and the inner matrix is symmetric PSD, so two symmetric
    eigen-decompositions in float64 replace ``scipy.linalg.sqrtm`` of a non-symmetric product: no complex
    parts and no eps offset, even with fewer samples than dimensions (rank-deficient covariances);
    eigenvalues at rounding level count as 0. With S1 = V diag(w) V^T over its K nonzero eigenvalues and
    B = V diag(w)^1/2, S1^1/2 S2 S1^1/2 = V (B^T S2 B) V^T has the nonzero eigenvalues of the (K, K) matrix
    B^T S2 B: K is the sample count less one when there are fewer samples than dimensions.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics differ in size: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    b1 = _psd_factor(s1)
    inner = b1.T @ s2 @ b1
    tr_covmean = np.sqrt(_clip_rounding(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_score(logits_unbiased_NK: np.ndarray, splits: int = 10) -> float:
    """Mean over ``splits`` equal parts of exp(E_x KL(p(y|x) || p(y))), p from the unbiased logits."""
    x = np.asarray(logits_unbiased_NK, np.float64)
    x = x - x.max(axis=1, keepdims=True)
    p = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        if len(part) == 0:
            continue
        kl = part * (np.log(np.maximum(part, 1e-300)) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _sq_dists(u_AD, v_BD):
    nu = jnp.sum(u_AD * u_AD, axis=1)[:, None]
    nv = jnp.sum(v_BD * v_BD, axis=1)[None, :]
    return jnp.maximum(nu - 2 * jnp.matmul(u_AD, v_BD.T, precision=jax.lax.Precision.HIGHEST) + nv, 0.0)


@functools.partial(jax.jit, static_argnums=2)
def _kth_nearest(rows_AD, all_ND, k):
    return -jax.lax.top_k(-_sq_dists(rows_AD, all_ND), k + 1)[0][:, k]


@jax.jit
def _inside(rows_AD, centres_ND, radii_N):
    return jnp.any(_sq_dists(rows_AD, centres_ND) <= radii_N[None, :], axis=1)


def _row_blocks(fn, rows_AD: np.ndarray, block: int, *args) -> np.ndarray:
    """``fn(rows, *args)`` over fixed-size row blocks (the last padded, so one compiled shape)."""
    out = []
    for i in range(0, len(rows_AD), block):
        r = rows_AD[i : i + block]
        n = len(r)
        if n < block and len(rows_AD) > block:
            r = np.concatenate([r, np.zeros((block - n, r.shape[1]), r.dtype)])
        out.append(np.asarray(fn(jnp.asarray(r), *args))[:n])
    return np.concatenate(out)


def manifold_radii(features_ND: np.ndarray, k: int = 3, block: int = 1024) -> np.ndarray:
    """(N,) squared distance of each point to its k-th nearest neighbour, itself excluded."""
    f = np.asarray(features_ND, np.float32)
    if len(f) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors, got {len(f)}.")
    all_ = jnp.asarray(f)
    return _row_blocks(lambda r: _kth_nearest(r, all_, k), f, block)


def precision_recall(ref_ND: np.ndarray, samples_MD: np.ndarray, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """(precision, recall) of ``samples`` against ``ref`` with k-NN manifolds (the ADM evaluator's)."""
    ref, smp = np.asarray(ref_ND, np.float32), np.asarray(samples_MD, np.float32)
    r_ref, r_smp = jnp.asarray(manifold_radii(ref, k, block)), jnp.asarray(manifold_radii(smp, k, block))
    ref_j, smp_j = jnp.asarray(ref), jnp.asarray(smp)
    precision = _row_blocks(lambda r: _inside(r, ref_j, r_ref), smp, block).mean()
    recall = _row_blocks(lambda r: _inside(r, smp_j, r_smp), ref, block).mean()
    return float(precision), float(recall)
