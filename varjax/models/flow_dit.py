"""A spatially coherent flow network for E-CAR: a small DiT over one stage's whole noisy map.

MAR's per-token MLP head (``varjax.models.ecar.FlowHead``) integrates every latent token of a stage on its own:
nothing lets neighbouring tokens agree while they are denoised, so at sampling temperature 1 the tokens of one
shape pick different colours. ``FlowDiT`` replaces it. At every flow step it reads the stage's noisy map x_t
(B, l = r_s^2, Cv) *jointly*:

    h_0 = in_proj(x_t) + cond_proj(z) + pos_s          (z: the stage-wise transformer's condition tokens,
                                                         one per position, added per position)
    y   = time_mlp(emb(t)) + class_emb(label) + stage_emb(s)          (B, W): one vector per example
    h_k = DiT block k (AdaLN from y: shift/scale/gate of attention and MLP; attention over all l positions)
    v   = out(LN(h) * (1 + scale(y)) + shift(y))                        (B, l, Cv), zero-initialised

so one position's velocity depends on every position of the map (and, through z, on every coarser stage).
The blocks are VAR's ``AdaLNSelfAttn`` (gated residuals whose gates start near zero, the role DiT's adaLN-Zero
plays) with a single level, so their attention is full (non-causal) over the stage's positions; parameters
carry VAR's logical axis names (``embed``, ``heads``, ``mlp``, ...) and shard with the same rules.

The class enters twice: through z and through the AdaLN vector y. Classifier-free guidance drops both
together (the null class), so the unconditional velocity sees neither.

With ``ECARConfig.depth = 0`` (no stage-wise transformer) and a single stage covering t in [0, 1], the same
network is a plain DiT-style flow model over the full-resolution latent: the baseline of ``bench/bench_ecar.py``.

Letters: B batch, l positions of one stage, C condition width (the transformer's), Cv latent channels,
W flow-net width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from varjax.models.var import AdaLNSelfAttn, SplitDense, VARConfig, _trunc_normal


def timestep_embedding(t_B: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as DiT embeds its step index): (B, dim)."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t_B[..., None].astype(jnp.float32) * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _ln(x):
    """LayerNorm without affine parameters (AdaLN supplies scale and shift), in float32."""
    x = x.astype(jnp.float32)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(jnp.square(x - mu).mean(-1, keepdims=True) + 1e-6)


def block_config(width: int, depth: int, heads: int, mlp_ratio: float, max_side: int) -> VARConfig:
    """The VAR block configuration of the flow net: one level of ``max_side**2`` positions (full attention)."""
    return VARConfig(depth=depth, embed_dim=width, num_heads=heads, num_classes=1, vocab_size=1, Cvae=1,
                     patch_nums=(max_side,), mlp_ratio=mlp_ratio, attn_l2_norm=True, cond_drop_rate=0.0,
                     drop_path_rate=0.0)


class FlowDiT(nn.Module):
    """Velocity (B, l, Cv) of a stage's noisy map given its condition tokens (see module docstring)."""

    width: int
    depth: int
    num_heads: int
    out_channels: int
    num_classes: int  # real classes; index num_classes is the null class of guidance
    num_stages: int
    total_positions: int  # sum of r_s^2 over stages: one learned position embedding per stage position
    max_side: int  # the largest stage side
    mlp_ratio: float = 4.0
    time_dim: int = 256
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        W = self.width
        vc = block_config(W, self.depth, self.num_heads, self.mlp_ratio, self.max_side)
        std = vc.std
        init = nn.with_logical_partitioning(_trunc_normal(std), ("embed", "mlp"))
        bias = nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",))
        # the noisy map enters at the scale of the condition and position terms (xavier, as DiT's patch embedding)
        self.in_proj = SplitDense((W,), (None, "embed"), nn.initializers.xavier_uniform(), True, self.dtype,
                                  name="in_proj")
        self.cond_proj = SplitDense((W,), ("cond", "embed"), _trunc_normal(std), True, self.dtype, name="cond_proj")
        self.pos = self.param("pos", nn.with_logical_partitioning(_trunc_normal(std), ("seq", "embed")),
                              (self.total_positions, W))
        self.time_fc1 = nn.Dense(W, name="time_fc1", kernel_init=init, bias_init=bias)
        self.time_fc2 = nn.Dense(W, name="time_fc2", kernel_init=init, bias_init=bias)
        self.class_emb = nn.Embed(self.num_classes + 1, W, name="class_emb",
                                  embedding_init=nn.with_logical_partitioning(_trunc_normal(std), (None, "embed")))
        self.stage_emb = nn.Embed(self.num_stages, W, name="stage_emb",
                                  embedding_init=nn.with_logical_partitioning(_trunc_normal(std), (None, "embed")))
        self.blocks = [AdaLNSelfAttn(vc, 0.0, self.dtype, name=f"blocks_{i}") for i in range(self.depth)]
        zero = nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp"))
        self.final_ada = nn.Dense(2 * W, name="final_ada", kernel_init=zero, bias_init=bias)
        self.final_out = SplitDense((self.out_channels,), ("embed", None), nn.initializers.zeros, True, self.dtype,
                                    name="final_out")

    def condition(self, t_B, label_B, stage: int):
        """(B, W) AdaLN vector of the blocks: time + class + stage."""
        te = self.time_fc2(nn.silu(self.time_fc1(timestep_embedding(t_B, self.time_dim))))
        return te + self.class_emb(label_B) + self.stage_emb(jnp.full(label_B.shape, stage, jnp.int32))

    def __call__(self, x_BlCv, t_B, z_BlC, label_B, stage: int, offset: int):
        """x (B, l, Cv) noisy map of stage ``stage`` (row-major), t (B,) its time, z (B, l, C) condition tokens
        (or None), label (B,) class (num_classes: null); ``offset``: first position of the stage in ``pos``."""
        l = x_BlCv.shape[1]
        h = self.in_proj(x_BlCv.astype(jnp.float32)) + self.pos[offset:offset + l][None]
        if z_BlC is not None:
            h = h + self.cond_proj(z_BlC.astype(jnp.float32))
        y = self.condition(t_B, label_B, stage)
        for blk in self.blocks:
            h, _ = blk(h, y, None, deterministic=True)
        scale, shift = jnp.split(self.final_ada(nn.silu(y))[:, None], 2, axis=-1)
        h = _ln(h) * (1 + scale) + shift
        return self.final_out(h)


def flops_per_call(width: int, depth: int, mlp_ratio: float, cond_width: int, Cv: int, l: int,
                   time_dim: int) -> float:
    """Matmul FLOPs of one ``FlowDiT`` call on one example of ``l`` positions (with condition tokens)."""
    W = width
    hidden = round(W * mlp_ratio)
    per_block = 2 * l * W * 3 * W + 2 * 2 * l * l * W + 2 * l * W * W + 2 * 2 * l * W * hidden
    per_block += 2 * W * 6 * W  # AdaLN modulation (once per example)
    f = depth * per_block
    f += 2 * l * Cv * W + (2 * l * cond_width * W if cond_width else 0)  # input projections
    f += 2 * time_dim * W + 2 * W * W  # time MLP
    f += 2 * W * 2 * W + 2 * l * W * Cv  # final AdaLN and output
    return float(f)
