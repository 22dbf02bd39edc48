"""The decoder's upsampling convolution at the source resolution equals conv3x3(nearest_upsample_2x(x))."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from varjax.models.vqvae import UpsampleConv, upsample_conv
from varjax.resize import upsample_nearest_2x


def test_upsample_conv_matches_upsample_then_conv():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 6))
    conv = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)))
    params = conv.init(jax.random.PRNGKey(1), upsample_nearest_2x(x))["params"]
    params = {"kernel": params["kernel"], "bias": jax.random.normal(jax.random.PRNGKey(2), (4,))}
    want = conv.apply({"params": params}, upsample_nearest_2x(x))
    got = upsample_conv(x, params["kernel"], params["bias"])
    assert got.shape == (2, 10, 14, 4)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # same parameter names and shapes as the nn.Conv it replaces (the converted checkpoints keep working)
    mine = UpsampleConv(4).init(jax.random.PRNGKey(1), x)["params"]
    assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, dict(params))
    np.testing.assert_allclose(UpsampleConv(4).apply({"params": params}, x), want, atol=1e-5)
