"""The VAR transformer: next-scale prediction with AdaLN blocks (Flax linen).

Letters in names: B batch, L tokens of all scales, l tokens of one scale, C width (embed_dim), D condition
width (= C), H heads, c head dim, V codebook size, Cv latent channels of the tokenizer (Cvae).

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``vocab``, ...) that the trainer maps onto
the device mesh; ``varjax.core.mesh`` holds the rules. Module names mirror the PyTorch state-dict keys
(``blocks_3/attn/mat_qkv`` for ``blocks.3.attn.mat_qkv``) so that conversion is a renaming.

Parameter layout (``PARAM_LAYOUT`` 2): the fused QKV kernel is (C, 3, H, c) and the AdaLN kernels are (C, 6, C)
(bias (6, C)), so that tensor parallelism splits them at head / chunk boundaries; torch stores them flat as
(3C, C) and (6C, C) (``varjax.interop.convert`` reshapes). With ``scan_layers`` the blocks are one ``nn.scan`` over
``depth`` and their parameters live under ``blocks`` with a leading (depth,) axis (logical axis ``layers``)
instead of ``blocks_0`` ... ``blocks_{depth-1}``; ``varjax.models.var_params`` converts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from varjax.models.attention import IMPLEMENTATIONS, block_causal_attention
from varjax.models.dict_config import DictConfig
from varjax.models.vqvae import PATCH_NUMS_256

Dtype = jnp.dtype

PARAM_LAYOUT = 2  # 1: flat (C, 3C) QKV and (C, 6C) AdaLN kernels; 2: (C, 3, H, c) and (C, 6, C)

# What a rematerialised block keeps from the forward pass (the rest is recomputed in the backward pass).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls kept, attention redone
}


class ScaleSchedule:
    """Mixin of configs with a ``patch_nums`` schedule: ``L``, the tokens of all scales, and ``first_l``, those of the
    first (they come from the class embedding, not from ``word_embed``)."""

    @property
    def L(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2


@dataclasses.dataclass(frozen=True)
class VARConfig(DictConfig, ScaleSchedule):
    """Hyper-parameters of the transformer (defaults: the released d16 at 256px)."""

    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    num_classes: int = 1000
    vocab_size: int = 4096
    Cvae: int = 32
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    drop_path_rate: float = 0.0
    # initialisation (the reference's init_weights); init_std < 0 means sqrt(1 / C / 3)
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0
    # execution (no effect on the parameters' values): one nn.scan over the blocks (stacked parameters),
    # rematerialisation policy of each block, and the attention kernel
    scan_layers: bool = False
    remat: str = "none"  # none | full | dots (see REMAT_POLICIES)
    attention: str = "auto"  # auto | xla | cudnn | splash (varjax.models.attention)

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"config.model.remat is {self.remat!r}; expected one of {sorted(REMAT_POLICIES)} (none: keep every "
                "activation, full: recompute each block in the backward pass, dots: keep only weight matmuls)."
            )
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"config.model.attention is {self.attention!r}; expected one of {IMPLEMENTATIONS}.")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def std(self) -> float:
        return self.init_std if self.init_std >= 0 else math.sqrt(1 / self.embed_dim / 3)

    @classmethod
    def official(cls, depth: int, **kw) -> VARConfig:
        """The release's recipe: width 64*depth, heads = depth, drop path 0.1*depth/24."""
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24, **kw)


def level_ids(patch_nums: Sequence[int]) -> np.ndarray:
    """(L,) scale index of every token."""
    return np.concatenate([np.full(pn * pn, i, dtype=np.int32) for i, pn in enumerate(patch_nums)])


def block_causal_mask(patch_nums: Sequence[int], length: int | None = None) -> np.ndarray:
    """(L, L) bool: query i may attend to key j iff scale(j) <= scale(i)."""
    lvl = level_ids(patch_nums)[:length]
    return lvl[:, None] >= lvl[None, :]


def _trunc_normal(std: float):
    # torch.nn.init.trunc_normal_ truncates at +-2 absolute (not +-2 std); with std << 1 that is no truncation.
    return nn.initializers.truncated_normal(stddev=std, lower=-2.0 / max(std, 1e-12), upper=2.0 / max(std, 1e-12))


def _scaled(init, factor: float):
    return lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) * factor


def _dense(features, names, std, name, use_bias=True, scale=1.0, dtype=None):
    """Linear C -> ``features`` with the parameters of ``nn.Dense`` (kernel (C, F), bias (F,))."""
    return SplitDense((features,), names, _scaled(_trunc_normal(std), scale), use_bias, dtype, name=name)


class SplitDense(nn.Module):
    """Linear C -> ``features`` (a tuple, e.g. (3, H, c)): kernel (C, *features) with one logical name per axis,
    initialised as the flat (C, prod(features)) kernel of the reference (same values for the same key)."""

    features: tuple[int, ...]
    names: tuple[str | None, ...]  # logical axes of the kernel; the bias takes names[1:]
    kernel_init: object
    use_bias: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x):
        C = x.shape[-1]
        shape = (C, *self.features)

        def init(key, shape, dtype=jnp.float32):
            return self.kernel_init(key, (shape[0], math.prod(shape[1:])), dtype).reshape(shape)

        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names), shape)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.names[1:]),
                              self.features)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        # One (N, C) row per token: with the leading axes merged, the kernel gradient is a plain (C, N) x (N, F)
        # product. XLA:CPU otherwise copies the activations and gradients into a transposed layout for it.
        y = jax.lax.dot_general(x.reshape(-1, C), kernel, (((1,), (0,)), ((), ())))
        y = y.reshape(*x.shape[:-1], *self.features)
        return y if bias is None else y + bias


def _layer_norm(eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, use_fast_variance=False)


def _constrain(x, names):
    return nn.with_logical_constraint(x, names)


def drop_path(x: jax.Array, rate, rng: jax.Array | None) -> jax.Array:
    """Stochastic depth per sample (timm's ``drop_path`` with ``scale_by_keep``); ``rate`` may be traced."""
    if rng is None or (isinstance(rate, (int, float)) and rate <= 0.0):
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class SelfAttention(nn.Module):
    cfg: VARConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BlC, kv_cache=None):
        """Returns ``(out_BlC, (k, v))``; with ``kv_cache=(k_prev, v_prev)`` the new keys/values are appended.

        k, v: (B, L_total, H, c). The l tokens of ``x_BlC`` are the ones right after the cached ones, so the
        scale of every query and key (hence the block-causal mask) follows from the lengths alone.
        """
        c = self.cfg
        B, l, C = x_BlC.shape
        H, hd = c.num_heads, c.head_dim
        qkv = SplitDense(
            (3, H, hd), ("embed", "chunks", "heads", "kv"), _trunc_normal(c.std), False, self.dtype, name="mat_qkv"
        )(x_BlC)  # (B, l, 3, H, c)
        q_bias = self.param("q_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("joined_kv",)), (C,))
        v_bias = self.param("v_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("joined_kv",)), (C,))
        bias = jnp.stack([q_bias, jnp.zeros_like(q_bias), v_bias]).reshape(3, H, hd).astype(qkv.dtype)
        qkv = qkv + bias
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # BlHc
        if c.attn_l2_norm:
            scale_mul = self.param(
                "scale_mul_1H11",
                nn.with_logical_partitioning(nn.initializers.constant(math.log(4.0)), (None, "heads", None, None)),
                (1, H, 1, 1),
            )
            scale_mul = jnp.exp(jnp.minimum(scale_mul, math.log(100.0))).reshape(H, 1)
            q = (_l2_normalize(q) * scale_mul).astype(q.dtype)
            k = _l2_normalize(k).astype(k.dtype)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(hd)
        if kv_cache is not None:
            k = jnp.concatenate([kv_cache[0], k], axis=1)
            v = jnp.concatenate([kv_cache[1], v], axis=1)
        start = k.shape[1] - l
        lvl = level_ids(c.patch_nums)
        out = block_causal_attention(
            q, k, v, lvl[start : start + l], lvl[: start + l], scale=scale, implementation=c.attention
        )
        out = _constrain(out, ("batch", "seq", "act_heads", None)).reshape(B, l, C)
        out = _dense(C, ("joined_kv", "embed"), c.std, "proj", scale=1 / math.sqrt(2 * c.depth), dtype=self.dtype)(out)
        return out, (k, v)


def _l2_normalize(x):
    x32 = x.astype(jnp.float32)
    return x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), 1e-12)


class FFN(nn.Module):
    cfg: VARConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLC):
        c = self.cfg
        hidden = round(c.embed_dim * c.mlp_ratio)
        h = _dense(hidden, ("embed", "mlp"), c.std, "fc1", dtype=self.dtype)(x_BLC)
        h = _constrain(nn.gelu(h, approximate=True), ("batch", "seq", "act_mlp"))
        return _dense(c.embed_dim, ("mlp", "embed"), c.std, "fc2", scale=1 / math.sqrt(2 * c.depth), dtype=self.dtype)(
            h
        )


class AdaLNSelfAttn(nn.Module):
    """One transformer block: AdaLN-modulated self-attention and MLP, each with a gated residual."""

    cfg: VARConfig
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLC, cond, kv_cache=None, deterministic=True, dpr=None, mods=None):
        """-> (x_BLC float32, (k, v)). ``cond`` is (B, D) for per-block AdaLN, or the shared (B, 1, 6, C)
        modulation with ``shared_aln``; ``dpr`` (a scalar, may be traced) overrides ``drop_path_rate``;
        ``mods`` (B, 1, 6, C), when given, is this block's AdaLN modulation computed by the caller from its
        own ``ada_lin`` parameters (see ``block_modulations``)."""
        c = self.cfg
        C = c.embed_dim
        rate = self.drop_path_rate if dpr is None else dpr
        if mods is None:
            if c.shared_aln:
                ada_gss = self.param(
                    "ada_gss",
                    nn.with_logical_partitioning(_ada_gss_init(c), (None, None, "chunks", "embed")),
                    (1, 1, 6, C),
                )
                mods = ada_gss + cond
            else:
                mods = _ada_lin6(c, "ada_lin", self.dtype)(nn.silu(cond))[:, None]  # (B, 1, 6, C)
        mods = mods.astype(jnp.float32)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (mods[:, :, i] for i in range(6))
        ln = _layer_norm(c.norm_eps)
        rng1 = rng2 = None
        if not deterministic and (dpr is not None or rate > 0) and c.drop_path_rate > 0:
            rng1, rng2 = jax.random.split(self.make_rng("dropout"))
        h = (ln(x_BLC.astype(jnp.float32)) * (scale1 + 1) + shift1).astype(self.dtype)
        a, kv = SelfAttention(c, self.dtype, name="attn")(h, kv_cache)
        x_BLC = x_BLC + drop_path(a * gamma1, rate, rng1)
        h = (ln(x_BLC.astype(jnp.float32)) * (scale2 + 1) + shift2).astype(self.dtype)
        x_BLC = x_BLC + drop_path(FFN(c, self.dtype, name="ffn")(h) * gamma2, rate, rng2)
        return _constrain(x_BLC.astype(jnp.float32), ("batch", "seq", "act_embed")), kv


def block_class(cfg: VARConfig):
    """``AdaLNSelfAttn``, wrapped in ``nn.remat`` with ``cfg.remat``'s policy (``deterministic`` is static)."""
    if cfg.remat == "none":
        return AdaLNSelfAttn
    # static_argnums counts self: (self, x, cond, kv_cache, deterministic, dpr, mods)
    return nn.remat(AdaLNSelfAttn, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                    static_argnums=(4,))


def scanned_blocks(cfg: VARConfig, dtype, name: str = "blocks") -> nn.Module:
    """All ``depth`` blocks as one ``nn.scan``: params stacked on a leading (depth,) axis (logical ``layers``).

    Call as ``(x_BLC, cond, caches, deterministic, dpr_depth, mods) -> (x_BLC, (k, v))``: the carry is x,
    ``cond`` and ``deterministic`` are shared, ``caches`` (stacked (depth, B, L, H, c) keys and values, or
    None), the per-block drop-path rates ``dpr_depth`` and the modulations ``mods`` ((depth, B, 1, 6, C) from
    ``block_modulations``, or None) are scanned, and the new keys/values come out stacked.
    """
    scan = nn.scan(
        block_class(cfg),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, 0, nn.broadcast, 0, 0),
        length=cfg.depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scan(cfg, 0.0, dtype, name=name)


def block_modulations(ada_lin: dict, cond_BD: jax.Array, dtype) -> jax.Array:
    """(depth, B, 1, 6, C) AdaLN modulations of every scanned block from their stacked ``ada_lin`` parameters
    (kernel (depth, D, 6, C), bias (depth, 6, C)): one product for all blocks, in ``dtype`` as each block's
    ``SplitDense`` computes it.

    Why outside the loop: inside it, each block's (D, 6C) kernel gradient is a product over only B rows,
    written into the stacked gradient at every iteration, and its kernel is transposed for the input
    gradient; on a CPU that took about 3% of a d8 training step.
    """
    x, kernel, bias = nn.dtypes.promote_dtype(nn.silu(cond_BD), ada_lin["kernel"], ada_lin["bias"], dtype=dtype)
    return _modulate(x, kernel, bias)[:, :, None]


@jax.custom_vjp
def _modulate(x_BD, kernel_NDKC, bias_NKC):
    """(N, B, K, C) = x @ kernel[n] + bias[n] for each of the N blocks.

    Every product here is batched over the blocks and contracts a dimension of the small operand (x or the
    output gradient, B rows) in whatever order XLA needs: the large kernel is read in its own layout, never
    transposed (a transposed copy of the d8 kernels costs more than all three products).
    """
    N, D = kernel_NDKC.shape[:2]
    x_NBD = jnp.broadcast_to(x_BD[None], (N, *x_BD.shape))
    out = jax.lax.dot_general(x_NBD, kernel_NDKC.reshape(N, D, -1), (((2,), (1,)), ((0,), (0,))))
    return out.reshape(N, x_BD.shape[0], *kernel_NDKC.shape[2:]) + bias_NKC[:, None]


def _modulate_fwd(x_BD, kernel_NDKC, bias_NKC):
    return _modulate(x_BD, kernel_NDKC, bias_NKC), (x_BD, kernel_NDKC)


def _modulate_bwd(res, g_NBKC):
    x_BD, kernel_NDKC = res
    N, D = kernel_NDKC.shape[:2]
    B = x_BD.shape[0]
    g_NBk = g_NBKC.reshape(N, B, -1)
    kernel_NDk = kernel_NDKC.reshape(N, D, -1)
    x_NBD = jnp.broadcast_to(x_BD[None], (N, B, D))
    dkernel_NDk = jax.lax.dot_general(x_NBD, g_NBk, (((1,), (1,)), ((0,), (0,))))
    dx_NDB = jax.lax.dot_general(kernel_NDk, g_NBk, (((2,), (2,)), ((0,), (0,))))
    dx_BD = dx_NDB.sum(axis=0).T.astype(x_BD.dtype)
    dkernel_NDKC = dkernel_NDk.reshape(kernel_NDKC.shape).astype(kernel_NDKC.dtype)
    return dx_BD, dkernel_NDKC, g_NBKC.sum(axis=1)


_modulate.defvjp(_modulate_fwd, _modulate_bwd)


def drop_path_rates(cfg: VARConfig) -> np.ndarray:
    """(depth,) stochastic-depth rate of each block: linear from 0 to ``drop_path_rate``."""
    return np.linspace(0, cfg.drop_path_rate, cfg.depth)


def _ada_gss_init(c: VARConfig):
    def init(key, shape, dtype=jnp.float32):
        x = jax.random.normal(key, shape, dtype) / math.sqrt(c.embed_dim)
        factors = jnp.array([c.init_adaln_gamma] * 2 + [c.init_adaln] * 4, dtype)[None, None, :, None]
        return x * factors

    return init


def _ada_init(c: VARConfig, n: int):
    """The reference's AdaLN init of a flat (D, n*C) kernel: gamma columns scaled by init_adaln_gamma, the others
    by init_adaln (n == 6: gamma1, gamma2, scale1, scale2, shift1, shift2; n == 2: scale, shift)."""
    C = c.embed_dim

    def kernel_init(key, shape, dtype=jnp.float32):
        w = _trunc_normal(c.std)(key, shape, dtype)
        if n == 6:
            factors = jnp.concatenate([jnp.full((2 * C,), c.init_adaln_gamma), jnp.full((4 * C,), c.init_adaln)])
        else:
            factors = jnp.full((n * C,), c.init_adaln)
        return w * factors.astype(dtype)[None, :]

    return kernel_init


def _ada_lin6(c: VARConfig, name: str, dtype, kernel_init=None) -> SplitDense:
    """Linear(D -> (6, C)): kernel (D, 6, C), the chunk axis replicated and C split over ``ada``."""
    return SplitDense((6, c.embed_dim), ("embed", "chunks", "ada"), kernel_init or _ada_init(c, 6), True, dtype,
                      name=name)


def _ada_lin2(c: VARConfig, name: str) -> nn.Dense:
    return nn.Dense(
        2 * c.embed_dim,
        name=name,
        kernel_init=nn.with_logical_partitioning(_ada_init(c, 2), ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
    )


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer."""

    cfg: VARConfig
    dtype: Dtype = jnp.float32  # compute dtype of the blocks; parameters stay float32

    def setup(self):
        c = self.cfg
        C = c.embed_dim
        std = c.std
        emb_init = nn.with_logical_partitioning(_trunc_normal(std), ("classes", "embed"))
        self.word_embed = _dense(C, ("cvae", "embed"), std, "word_embed")
        self.class_emb = nn.Embed(c.num_classes + 1, C, embedding_init=emb_init, name="class_emb")
        self.pos_start = self.param(
            "pos_start", nn.with_logical_partitioning(_trunc_normal(std), (None, "seq", "embed")), (1, c.first_l, C)
        )
        self.pos_1LC = self.param(
            "pos_1LC", nn.with_logical_partitioning(_trunc_normal(std), (None, "seq", "embed")), (1, c.L, C)
        )
        self.lvl_embed = nn.Embed(len(c.patch_nums), C, embedding_init=emb_init, name="lvl_embed")
        if c.shared_aln:  # the 512px model's shared AdaLN, initialised like any Linear
            self.shared_ada_lin = _ada_lin6(c, "shared_ada_lin", None, kernel_init=_trunc_normal(std))
        if c.scan_layers:
            self.blocks = scanned_blocks(c, self.dtype)
        else:
            dpr, cls = drop_path_rates(c), block_class(c)
            self.blocks = [cls(c, float(dpr[i]), self.dtype, name=f"blocks_{i}") for i in range(c.depth)]
        self.head_nm = HeadNorm(c, name="head_nm")
        # init_head < 0 keeps the plain init, as in the reference
        head_scale = c.init_head if c.init_head >= 0 else 1.0
        self.head = _dense(c.vocab_size, ("embed", "vocab"), std, "head", scale=head_scale)

    def _block_cond(self, cond_BD):
        if self.cfg.shared_aln:
            return self.shared_ada_lin(nn.silu(cond_BD))[:, None]  # (B, 1, 6, C)
        return cond_BD

    def run_blocks(self, x_BLC, cond, caches=None, deterministic=True):
        """Every block in order -> (x_BLC, new caches).

        Caches are opaque to callers: a list of one ``(k, v)`` per block, or with ``scan_layers`` one ``(k, v)``
        pair stacked over blocks; ``None`` means no earlier tokens.
        """
        if self.cfg.scan_layers:
            dpr = jnp.asarray(drop_path_rates(self.cfg), jnp.float32)
            mods = None
            if not self.cfg.shared_aln and not self.is_initializing():  # the blocks create ada_lin at init
                ada_lin = nn.meta.unbox(self.blocks.variables["params"]["ada_lin"])
                mods = block_modulations(ada_lin, cond, self.dtype)
            return self.blocks(x_BLC, cond, caches, deterministic, dpr, mods)
        new = []
        for i, blk in enumerate(self.blocks):
            x_BLC, kv = blk(x_BLC, cond, None if caches is None else caches[i], deterministic)
            new.append(kv)
        return x_BLC, new

    def lvl_pos(self) -> jax.Array:
        """(1, L, C) level embedding plus absolute position embedding."""
        lvl = jnp.asarray(level_ids(self.cfg.patch_nums))
        return self.lvl_embed(lvl)[None] + self.pos_1LC

    def get_logits(self, x_BLC, cond_BD):
        h = self.head_nm(x_BLC.astype(jnp.float32), cond_BD)
        return _constrain(self.head(h).astype(jnp.float32), ("batch", "seq", "act_vocab"))

    def __call__(self, label_B, x_BLCv_wo_first_l, train: bool = False, prog_si: int = -1):
        """Teacher-forcing forward: logits (B, L, V) float32 (or the first ``prog_si + 1`` scales only).

        label_B: (B,) int; x_BLCv_wo_first_l: (B, L - first_l, Cv) from ``VQVAE.idx_to_var_input``.
        In training, labels are replaced by the null class with probability ``cond_drop_rate`` (for CFG).
        """
        c = self.cfg
        B = label_B.shape[0]
        ed = c.L if prog_si < 0 else sum(pn * pn for pn in c.patch_nums[: prog_si + 1])
        if train and c.cond_drop_rate > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), (B,)) < c.cond_drop_rate
            label_B = jnp.where(drop, c.num_classes, label_B)
        cond_BD = self.class_emb(label_B)
        sos = jnp.broadcast_to(cond_BD[:, None], (B, c.first_l, c.embed_dim)) + self.pos_start
        if ed > c.first_l:
            words = self.word_embed(x_BLCv_wo_first_l[:, : ed - c.first_l].astype(jnp.float32))
            x = jnp.concatenate([sos, words], axis=1)
        else:
            x = sos
        x = _constrain(x + self.lvl_pos()[:, :ed], ("batch", "seq", "act_embed"))
        x, _ = self.run_blocks(x, self._block_cond(cond_BD), None, deterministic=not train)
        return self.get_logits(x, cond_BD)

    def first_tokens(self, cond_BD):
        """(B, first_l, C) input of the first scale when sampling."""
        c = self.cfg
        B = cond_BD.shape[0]
        sos = jnp.broadcast_to(cond_BD[:, None], (B, c.first_l, c.embed_dim)) + self.pos_start
        return sos + self.lvl_pos()[:, : c.first_l]

    def embed_class(self, label_B):
        return self.class_emb(label_B)

    def embed_next(self, x_BlCv, start: int):
        """Word embedding of one scale's input plus its level/position embedding (tokens start..start+l)."""
        l = x_BlCv.shape[1]
        return self.word_embed(x_BlCv.astype(jnp.float32)) + self.lvl_pos()[:, start : start + l]

    def step(self, x_BlC, cond_BD, caches):
        """One cached scale: runs every block on the scale's tokens; returns (logits (B, l, V), new caches).

        ``caches`` is what the previous call returned (keys and values (B, L_seen, H, c) of every block), or
        ``None`` for the first scale.
        """
        x_BlC, new = self.run_blocks(x_BlC, self._block_cond(cond_BD), caches, deterministic=True)
        return self.get_logits(x_BlC, cond_BD), new

    def init_all(self, label_B, x_BLCv_wo_first_l):
        return self(label_B, x_BLCv_wo_first_l, train=False)


class HeadNorm(nn.Module):
    """AdaLN before the head: ``LN(x) * (1 + scale) + shift`` with (scale, shift) from the condition."""

    cfg: VARConfig

    @nn.compact
    def __call__(self, x_BLC, cond_BD):
        c = self.cfg
        mods = _ada_lin2(c, "ada_lin")(nn.silu(cond_BD)).reshape(-1, 1, 2, c.embed_dim)
        return _layer_norm(c.norm_eps)(x_BLC) * (mods[:, :, 0] + 1) + mods[:, :, 1]
