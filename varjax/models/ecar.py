"""E-CAR (arXiv 2412.14170): a stage-wise continuous-token transformer plus a flow network.

The transformer is VAR's (AdaLN blocks, class condition, block-causal mask across stages, KV cache when
sampling): for stage s it reads every coarser stage's state and emits one condition token per position of
stage s, all in one parallel step. The flow network predicts the velocity of the multistage flow
(``varjax.models.multistage_flow``) from the condition tokens; ``ECARConfig.flow_net`` picks it:

* ``"mlp"``: MAR's ``SimpleMLPAdaLN`` on one latent token at a time, AdaLN-modulated by (transformer token
  + time embedding). Every token of a stage is integrated on its own.
* ``"dit"``: ``varjax.models.flow_dit.FlowDiT``, a small DiT over the stage's whole noisy map (condition
  tokens added per position, AdaLN from time, class and stage, full attention over the stage's positions):
  the tokens of a stage are denoised jointly.

What the transformer reads for stage s >= 1 (``ECARConfig.stage_input``):

* ``"noisy"``: U(end_{s-1}), the state the sampler holds when stage s begins (noise level 1 - b_{s-1}).
* ``"clean"``: U(x_hat_{s-1}), the flow network's clean estimate of D_{s-1}(x1) at the end of stage s-1
  (``multistage_flow.clean_estimate``). Sampling evaluates the flow network once more at each stage end for
  it. Training reproduces it without running the stages in sequence: a first pass (no gradient) reads the
  true coarser maps U(D_{s-1}(x1)), evaluates the flow network at every teacher-forced stage end and turns
  its velocities into x_hat; the second pass, the one trained, reads U(x_hat).

The default is ``"noisy"``, chosen by measurement: on the embedded data's recipe ``"clean"`` read 72% class
consistency and a shape distance of 1.35 against 93% and 0.99 for ``"noisy"`` (docs/ecar.md).

``depth = 0`` removes the stage-wise transformer (the condition tokens are the class and position
embeddings alone): with one stage over [0, 1] and ``flow_net="dit"`` that is a plain DiT-style flow model.

Letters: B batch, L all tokens of all stages, l one stage's tokens, C transformer width, Cv latent channels,
W head width.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from varjax.models import multistage_flow as msf
from varjax.models.flow_dit import FlowDiT
from varjax.models.var import AdaLNSelfAttn, VARConfig, level_ids


@dataclasses.dataclass(frozen=True)
class ECARConfig:
    """Hyper-parameters of the transformer, the flow head and the stage schedule."""

    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    num_classes: int = 1000
    Cvae: int = 16  # latent channels of the continuous tokenizer
    patch_nums: tuple[int, ...] = (1, 2, 4, 8, 16)  # stage resolutions, each a multiple of the previous
    stage_starts: tuple[float, ...] = ()  # a_s; empty: s / S
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    drop_path_rate: float = 0.0
    head_width: int = 1024
    head_depth: int = 6
    time_dim: int = 256  # sinusoidal frequencies of the head's time embedding
    latent_shift: float = 0.0  # the flow works on (z - shift) / scale
    latent_scale: float = 1.0
    flow_net: str = "mlp"  # "mlp": MAR's per-token head; "dit": FlowDiT over the stage's map (width head_width)
    flow_depth: int = 2  # FlowDiT blocks
    flow_heads: int = 2  # FlowDiT attention heads
    flow_mlp_ratio: float = 4.0
    stage_input: str = "noisy"  # what the transformer reads for stage s >= 1: "noisy" end or "clean" estimate

    def __post_init__(self):
        if self.flow_net not in ("mlp", "dit"):
            raise ValueError(f"config.model.flow_net={self.flow_net!r}: expected 'mlp' or 'dit'.")
        if self.stage_input not in ("noisy", "clean"):
            raise ValueError(f"config.model.stage_input={self.stage_input!r}: expected 'noisy' or 'clean'.")
        if self.depth == 0 and len(self.patch_nums) > 1:
            raise ValueError("config.model.depth=0 (no stage-wise transformer) needs a single stage.")

    @property
    def L(self) -> int:
        return sum(r * r for r in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def windows(self) -> tuple[tuple[float, float], ...]:
        return msf.windows(self.patch_nums, self.stage_starts or None)

    def var_config(self) -> VARConfig:
        """The VAR block configuration (its vocabulary is unused)."""
        return VARConfig(
            depth=self.depth,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            num_classes=self.num_classes,
            vocab_size=1,
            Cvae=self.Cvae,
            patch_nums=self.patch_nums,
            mlp_ratio=self.mlp_ratio,
            norm_eps=self.norm_eps,
            attn_l2_norm=self.attn_l2_norm,
            cond_drop_rate=self.cond_drop_rate,
            drop_path_rate=self.drop_path_rate,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ECARConfig:
        d = dict(d)
        for k in ("patch_nums", "stage_starts"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def timestep_embedding(t_N: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as MAR/DiT embed their step index): (N, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t_N[..., None].astype(jnp.float32) * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _dense(features, name, init=None):
    return nn.Dense(features, name=name, kernel_init=init or nn.initializers.xavier_uniform())


def _ln(x):
    """LayerNorm without affine parameters (AdaLN supplies scale and shift)."""
    x = x.astype(jnp.float32)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(jnp.square(x - mu).mean(-1, keepdims=True) + 1e-6)


class FlowHead(nn.Module):
    """MAR's SimpleMLPAdaLN: velocity (N, Cv) of tokens x (N, Cv) at times t (N,) given conditions c (N, C)."""

    width: int
    depth: int
    out_channels: int
    time_dim: int = 256

    @nn.compact
    def __call__(self, x_NCv, t_N, c_NC):
        W = self.width
        zero = nn.initializers.zeros
        te = timestep_embedding(t_N, self.time_dim)
        te = _dense(W, "time_fc2", nn.initializers.normal(0.02))(
            nn.silu(_dense(W, "time_fc1", nn.initializers.normal(0.02))(te))
        )
        y = te + _dense(W, "cond_embed")(c_NC)
        h = _dense(W, "input_proj")(x_NCv)
        for i in range(self.depth):
            mods = _dense(3 * W, f"res_{i}_ada", zero)(nn.silu(y))
            shift, scale, gate = jnp.split(mods, 3, axis=-1)
            u = _ln(h) * (1 + scale) + shift
            u = _dense(W, f"res_{i}_fc2")(nn.silu(_dense(W, f"res_{i}_fc1")(u)))
            h = h + gate * u
        shift, scale = jnp.split(_dense(2 * W, "final_ada", zero)(nn.silu(y)), 2, axis=-1)
        h = _ln(h) * (1 + scale) + shift
        return _dense(self.out_channels, "final_out", zero)(h)


class ECAR(nn.Module):
    """Class-conditional stage-wise transformer with a flow head."""

    cfg: ECARConfig
    dtype: jnp.dtype = jnp.float32  # compute dtype of the blocks; parameters stay float32

    def setup(self):
        c = self.cfg
        vc = c.var_config()
        C = c.embed_dim
        std = math.sqrt(1 / C / 3)
        init = nn.initializers.truncated_normal(std)
        self.word_embed = nn.Dense(C, name="word_embed", kernel_init=init)
        self.class_emb = nn.Embed(c.num_classes + 1, C, embedding_init=init, name="class_emb")
        self.pos_start = self.param("pos_start", init, (1, c.first_l, C))
        self.pos_1LC = self.param("pos_1LC", init, (1, c.L, C))
        self.lvl_embed = nn.Embed(len(c.patch_nums), C, embedding_init=init, name="lvl_embed")
        dpr = np.linspace(0, c.drop_path_rate, c.depth)
        self.blocks = [AdaLNSelfAttn(vc, float(dpr[i]), self.dtype, name=f"blocks_{i}") for i in range(c.depth)]
        self.out_ada = nn.Dense(2 * C, name="out_ada", kernel_init=nn.initializers.zeros)
        if c.flow_net == "dit":
            self.head = FlowDiT(c.head_width, c.flow_depth, c.flow_heads, c.Cvae, c.num_classes, len(c.patch_nums),
                                c.L, c.patch_nums[-1], c.flow_mlp_ratio, c.time_dim, self.dtype, name="flow")
        else:
            self.head = FlowHead(c.head_width, c.head_depth, c.Cvae, c.time_dim, name="head")

    def _blocks(self, x_BlC, cond_BD, caches, deterministic: bool):
        """All blocks; returns (x, [(k, v)] per block). The one place the VAR block is called."""
        new = []
        for i, blk in enumerate(self.blocks):
            x_BlC, kv = blk(x_BlC, cond_BD, None if caches is None else caches[i], deterministic=deterministic)
            new.append(kv)
        return x_BlC, new

    def _out(self, x_BlC, cond_BD):
        scale, shift = jnp.split(self.out_ada(nn.silu(cond_BD))[:, None], 2, axis=-1)
        return _ln(x_BlC.astype(jnp.float32)) * (1 + scale) + shift

    def lvl_pos(self) -> jax.Array:
        lvl = jnp.asarray(level_ids(self.cfg.patch_nums))
        return self.lvl_embed(lvl)[None] + self.pos_1LC

    def embed_class(self, label_B):
        return self.class_emb(label_B)

    def first_tokens(self, cond_BD):
        """(B, first_l, C) input of the first stage."""
        c = self.cfg
        sos = jnp.broadcast_to(cond_BD[:, None], (cond_BD.shape[0], c.first_l, c.embed_dim)) + self.pos_start
        return sos + self.lvl_pos()[:, : c.first_l]

    def embed_next(self, x_BlCv, start: int):
        """Input of one stage (tokens start..start+l): U(end of the previous stage), embedded."""
        return self.word_embed(x_BlCv.astype(jnp.float32)) + self.lvl_pos()[:, start : start + x_BlCv.shape[1]]

    def drop_labels(self, label_B, train: bool):
        """Labels with the null class at rate ``cond_drop_rate`` when training (classifier-free guidance)."""
        c = self.cfg
        if train and c.cond_drop_rate > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), label_B.shape) < c.cond_drop_rate
            label_B = jnp.where(drop, c.num_classes, label_B)
        return label_B

    def conditions(self, label_B, x_in_BLCv, train: bool = False, drop: bool = True):
        """Teacher forcing: condition tokens (B, L, C) of every stage from the inputs (B, L - first_l, Cv);
        ``drop``: drop labels here (else ``label_B`` is already dropped)."""
        c = self.cfg
        if drop:
            label_B = self.drop_labels(label_B, train)
        cond_BD = self.class_emb(label_B)
        x = self.first_tokens(cond_BD)
        if c.L > c.first_l:
            x = jnp.concatenate([x, self.embed_next(x_in_BLCv, c.first_l)], axis=1)
        x, _ = self._blocks(x, cond_BD, None, deterministic=not train)
        return self._out(x, cond_BD)

    def step(self, x_BlC, cond_BD, caches):
        """One cached stage: condition tokens (B, l, C) and the caches extended by this stage's keys/values."""
        x, new = self._blocks(x_BlC, cond_BD, caches, deterministic=True)
        return self._out(x, cond_BD), new

    def stage_velocity(self, z_BlC, x_BlCv, t_B, label_B, stage: int):
        """Velocity (B, l, Cv) of stage ``stage``'s map x (B, l, Cv) at times t (B,) (label: null class for the
        unconditional half of guidance; read by the "dit" flow net only)."""
        B, l, Cv = x_BlCv.shape
        if self.cfg.flow_net == "dit":
            offset = sum(r * r for r in self.cfg.patch_nums[:stage])
            return self.head(x_BlCv, t_B, z_BlC, label_B, stage, offset)
        t_Bl = jnp.broadcast_to(t_B[:, None], (B, l))
        v = self.head(x_BlCv.reshape(B * l, Cv), t_Bl.reshape(B * l), z_BlC.reshape(B * l, -1))
        return v.reshape(B, l, Cv)

    def velocity(self, z_BLC, x_BLCv, t_BL, label_B=None):
        """Flow net on every stage of the teacher-forced sequence: (B, L, Cv). The time is read at each stage's
        first token (one time per example and stage)."""
        if self.cfg.flow_net == "mlp":  # per token: one call on all stages at once
            B, L, Cv = x_BLCv.shape
            v = self.head(x_BLCv.reshape(B * L, Cv), t_BL.reshape(B * L), z_BLC.reshape(B * L, -1))
            return v.reshape(B, L, Cv)
        out, start = [], 0
        for s, r in enumerate(self.cfg.patch_nums):
            sl = slice(start, start + r * r)
            out.append(self.stage_velocity(z_BLC[:, sl], x_BLCv[:, sl], t_BL[:, start], label_B, s))
            start += r * r
        return jnp.concatenate(out, axis=1)

    def clean_inputs(self, label_B, x_in_BLCv, x_end_BLCv):
        """Transformer inputs of the "clean" formulation, (B, L - first_l, Cv): U(x_hat_{s-1}) for s >= 1, where
        x_hat is the flow net's clean estimate at the teacher-forced end of every stage, its conditions read
        from the true coarser maps ``x_in`` (U(D_{s-1}(x1))). No gradient flows through it."""
        c = self.cfg
        pns, wins = c.patch_nums, c.windows
        z = self.conditions(label_B, x_in_BLCv, train=False, drop=False)
        t_end = jnp.concatenate([jnp.full((x_end_BLCv.shape[0], r * r), wins[s][1]) for s, r in enumerate(pns)],
                                axis=1)
        v = self.velocity(z, x_end_BLCv, t_end, label_B)
        ups, start = [], 0
        for s, r in enumerate(pns[:-1]):
            sl = slice(start, start + r * r)
            B = v.shape[0]
            x_end = x_end_BLCv[:, sl].reshape(B, r, r, -1)
            v_end = v[:, sl].reshape(B, r, r, -1)
            f_prev = r // pns[s - 1] if s else 1
            x_hat = msf.clean_estimate(x_end, v_end, wins[s][0], wins[s][1], f_prev)
            ups.append(msf.upsample(x_hat, pns[s + 1] // r))
            start += r * r
        return jax.lax.stop_gradient(msf.flatten(ups))

    def __call__(self, label_B, x_in_BLCv, x_t_BLCv, t_BL, train: bool = False, x_end_BLCv=None):
        """Training forward: predicted velocities (B, L, Cv) of the points x_t at times t.

        ``x_in``: the transformer's inputs (U(end_{s-1}) for "noisy"; U(D_{s-1}(x1)) for "clean", refined
        into U(x_hat_{s-1}) by ``clean_inputs`` when the stage ends ``x_end`` (B, L, Cv) are given)."""
        label_B = self.drop_labels(label_B, train)
        if self.cfg.stage_input == "clean" and x_end_BLCv is not None:
            x_in_BLCv = self.clean_inputs(label_B, x_in_BLCv, x_end_BLCv)
        z = self.conditions(label_B, x_in_BLCv, train, drop=False)
        return self.velocity(z, x_t_BLCv, t_BL, label_B)
