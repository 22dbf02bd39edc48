"""The VAR training loss: label-smoothed cross-entropy with a hand-written backward, and the accuracies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varjax.losses import hit_rates, smoothed_cross_entropy, token_loss

B, L, V = 3, 14, 37


def _data(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(k1, (B, L, V)) * 3, jax.random.randint(k2, (B, L), 0, V)


def _log_softmax_loss(logits, gt, ls, weight):
    """The plain autodiff formula: torch's CrossEntropyLoss(label_smoothing=ls) from log_softmax."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, gt[..., None], axis=-1)[..., 0]
    loss = (1 - ls) * nll - ls * logp.mean(-1) if ls > 0 else nll
    return (loss * weight[None]).sum(-1).mean()


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_loss_and_grad_match_autodiff(ls):
    logits, gt = _data()
    weight = jnp.linspace(0.5, 1.5, L) / L
    got, g = jax.value_and_grad(token_loss)(logits, gt, ls, weight)
    want, gw = jax.value_and_grad(_log_softmax_loss)(logits, gt, ls, weight)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g, gw, rtol=1e-6, atol=1e-7)


def test_torch_definition():
    """Per-token values against the definition in numpy: (1 - ls) * nll + ls * mean_v(-log p_v)."""
    logits, gt = _data(1)
    x = np.float64(logits)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(gt)[..., None], -1)[..., 0]
    want = 0.9 * nll + 0.1 * -logp.mean(-1)
    np.testing.assert_allclose(smoothed_cross_entropy(logits, gt, 0.1), want, rtol=1e-5)


def test_bfloat16_logits_give_bfloat16_grads():
    logits, gt = _data(2)
    f = lambda x: smoothed_cross_entropy(x, gt, 0.1).mean()  # noqa: E731
    g16 = jax.grad(f)(logits.astype(jnp.bfloat16))
    g32 = jax.grad(f)(logits.astype(jnp.bfloat16).astype(jnp.float32))
    assert g16.dtype == jnp.bfloat16 and f(logits.astype(jnp.bfloat16)).dtype == jnp.float32
    np.testing.assert_allclose(np.float32(g16), g32, atol=2e-4, rtol=1e-2)


def test_hit_rates():
    logits, gt = _data(3)
    gt = gt.at[0, :5].set(jnp.argmax(logits[0, :5], -1))  # some hits for sure
    hit = np.asarray(jnp.argmax(logits, -1) == gt)
    r = hit_rates(logits, gt, 4)
    np.testing.assert_allclose(r["train_acc_mean"], hit.mean() * 100, rtol=1e-6)
    np.testing.assert_allclose(r["train_acc_tail"], hit[:, -4:].mean() * 100, rtol=1e-6)
    assert set(hit_rates(logits, gt, None)) == {"train_acc_mean"}
