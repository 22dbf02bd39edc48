"""Codebook initialisation: uniform(-1/V, 1/V) as the reference's ``VectorQuantizer2.eini(-1)``."""

import jax
import jax.numpy as jnp
import numpy as np

from varjax.models.quant import VectorQuantizer, codebook_init


def _init_codebook(vocab_size: int, channels: int, seed: int) -> np.ndarray:
    vq = VectorQuantizer(vocab_size=vocab_size, channels=channels, patch_nums=(1, 2, 4))
    f = jnp.zeros((1, 4, 4, channels), jnp.float32)
    params = vq.init(jax.random.PRNGKey(seed), f, method=VectorQuantizer.quantize)["params"]
    return np.asarray(params["embedding"])


def test_codebook_is_symmetric_uniform_over_one_over_v():
    V, C = 512, 32
    e = _init_codebook(V, C, seed=0)
    assert e.shape == (V, C) and e.dtype == np.float32
    bound = 1.0 / V
    assert e.min() >= -bound and e.max() <= bound
    # Both halves of the interval are reached (a [0, 2/V) init would have no negative value) ...
    assert e.min() < -0.95 * bound and e.max() > 0.95 * bound
    # ... and the values are uniform on it: moments and a Kolmogorov-Smirnov distance against U(-1/V, 1/V).
    u = np.sort(e.ravel() / bound)  # U(-1, 1)
    assert abs(u.mean()) < 0.02
    np.testing.assert_allclose(u.var(), 1.0 / 3.0, rtol=0.03)
    cdf = (u + 1.0) / 2.0
    n = u.size
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.63 / np.sqrt(n)  # 1% critical value


def test_codebook_init_matches_the_function_and_depends_on_the_key():
    a = _init_codebook(64, 8, seed=1)
    b = _init_codebook(64, 8, seed=2)
    assert not np.allclose(a, b)
    direct = np.asarray(codebook_init(jax.random.PRNGKey(3), (64, 8)))
    assert np.abs(direct).max() <= 1.0 / 64 and (direct < 0).mean() > 0.3
