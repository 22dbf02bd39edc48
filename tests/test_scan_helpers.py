"""The hand-written gradients that keep a scanned block stack fast: they must equal plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varjax.models.attention import key_prefixes
from varjax.models.var import block_modulations


def _vjp(f, *args):
    out, pull = jax.vjp(f, *args)
    cot = jax.tree.map(lambda o: jax.random.normal(jax.random.PRNGKey(7), o.shape, o.dtype), out)
    return out, pull(cot)


def test_key_prefixes_gradient_equals_slicing():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 30, 4))
    ends = (1, 5, 14, 30, 14)  # unsorted, repeated, the full length included

    def plain(x):
        return tuple(x[:, :, :e] for e in ends)

    out, (grad,) = _vjp(lambda x: key_prefixes(x, ends), x)
    ref_out, (ref_grad,) = _vjp(plain, x)
    for a, b in zip(out, ref_out, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-6)


def test_key_prefixes_gradient_pads_when_no_prefix_is_full():
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 2, 9, 3))
    _, (grad,) = _vjp(lambda x: key_prefixes(x, (2, 6)), x)
    _, (ref_grad,) = _vjp(lambda x: (x[:, :, :2], x[:, :, :6]), x)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-6)
    assert not np.any(np.asarray(grad[:, :, 6:]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_block_modulations_equal_per_block_products(dtype):
    N, B, D, C = 3, 2, 8, 5
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    params = {"kernel": jax.random.normal(ks[0], (N, D, 6, C)), "bias": jax.random.normal(ks[1], (N, 6, C))}
    cond = jax.random.normal(ks[2], (B, D))

    def plain(params, cond):  # each block's SplitDense: silu(cond) @ kernel[n] + bias[n], in `dtype`
        x = jax.nn.silu(cond).astype(dtype)
        k, b = params["kernel"].astype(dtype), params["bias"].astype(dtype)
        return jnp.stack([jnp.einsum("bd,dkc->bkc", x, k[n]) + b[n] for n in range(N)])[:, :, None]

    out, grads = _vjp(lambda p, c: block_modulations(p, c, dtype), params, cond)
    ref_out, ref_grads = _vjp(plain, params, cond)
    assert out.shape == (N, B, 1, 6, C) and out.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), rtol=tol, atol=tol)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                                                atol=tol),
        grads, ref_grads,
    )
