"""FID, Inception Score and precision/recall against reference formulas on fixed feature sets."""

import numpy as np
import pytest
from scipy import linalg

from varjax.eval.fid import feature_stats, frechet_distance, inception_score, manifold_radii, precision_recall


def pytorch_fid_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (scipy sqrtm with the eps offset fallback)."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def adm_inception_score(logits, split_size):
    """The ADM evaluator's compute_inception_score on softmax(logits)."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def adm_precision_recall(ref, smp, k=3):
    """The ADM evaluator's ManifoldEstimator in one block, float64."""

    def dist(u, v):
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None], 0)

    def radii(x):
        return np.partition(dist(x, x), np.arange(k + 1), axis=1)[:, k]

    r_ref, r_smp = radii(ref), radii(smp)
    d = dist(ref, smp)  # (N_ref, N_smp)
    precision = np.any(d <= r_ref[:, None], axis=0).mean()
    recall = np.any(d <= r_smp[None, :], axis=1).mean()
    return precision, recall


@pytest.fixture(scope="module")
def feats():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 24)) @ rng.standard_normal((24, 24)) * 0.5
    b = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24)) * 0.6 + 0.3
    return a, b


def test_fid_matches_scipy_sqrtm_on_well_conditioned_data(feats):
    (mu1, s1), (mu2, s2) = feature_stats(feats[0]), feature_stats(feats[1])
    ref = pytorch_fid_frechet(mu1, s1, mu2, s2)
    assert ref > 1
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-8)


def test_fid_on_rank_deficient_covariances():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 512)).astype(np.float32)  # fewer samples than dimensions
    mu, s = feature_stats(x)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)
    shift = np.full(512, 0.1)
    np.testing.assert_allclose(frechet_distance(mu + shift, s, mu, s), shift @ shift, rtol=1e-6)
    d = frechet_distance(*feature_stats(x[:32]), *feature_stats(x[32:]))
    assert np.isfinite(d) and d > 0


def test_inception_score_matches_adm(feats):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((1000, 50)) * 3
    np.testing.assert_allclose(inception_score(logits, splits=10), adm_inception_score(logits, 100), rtol=1e-10)
    assert inception_score(np.zeros((40, 10))) == pytest.approx(1.0)


def test_radii_exclude_self():
    x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]], np.float32)
    # squared distances to the 3rd nearest other point
    np.testing.assert_array_equal(manifold_radii(x, k=3), [36.0, 25.0, 9.0, 25.0, 81.0])


@pytest.mark.parametrize("block", [64, 1024])
def test_precision_recall_match_adm(feats, block):
    a, b = feats
    p, r = precision_recall(a, b, k=3, block=block)
    p_ref, r_ref = adm_precision_recall(a, b, k=3)
    assert 0.05 < p_ref < 0.95 and 0.05 < r_ref < 0.95
    assert (p, r) == (pytest.approx(p_ref, abs=1e-12), pytest.approx(r_ref, abs=1e-12))
