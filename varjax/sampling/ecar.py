"""E-CAR's sampler: stages coarse to fine, each a KV-cached transformer step then flow steps, in one program.

For stage s the transformer emits the condition tokens of all r_s^2 positions at once (conditional and
unconditional halves for classifier-free guidance); the flow head then integrates the stage's own time
window [a_s, b_s] with ``steps`` Euler or Heun steps (or ``stage_steps[s]``), the guided velocity being
``v_u + cfg_s * (v_c - v_u)`` (``cfg_s``: one guidance scale, or one per stage). With the "dit" flow net the
velocity of a position depends on the whole map of the stage (``varjax.models.flow_dit``). The stage's end
is re-noised to the next stage's start (see ``varjax.models.multistage_flow``) and, upsampled, becomes the
transformer's input for the next stage ("noisy" stage input), or the flow net is evaluated once more at the
stage end and its clean estimate x_hat, upsampled, is that input ("clean"; conditional and unconditional
halves each from their own velocity). Only the last stage reaches t = 1; its latent is decoded by the KL
autoencoder.

Stages and steps are unrolled inside one ``jax.jit`` (static shapes per stage), so the whole generation is a
single compiled program and XLA's cost analysis counts every step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from varjax.models import multistage_flow as msf
from varjax.models.ecar import ECAR, ECARConfig
from varjax.models.flow_dit import flops_per_call
from varjax.models.kl_ae import KLAE, KLAEConfig


@dataclasses.dataclass(frozen=True)
class FlowSampleOptions:
    cfg: float = 3.0  # classifier-free guidance scale (1 = no guidance)
    steps: int = 8  # flow steps per stage
    stage_cfg: tuple[float, ...] = ()  # one guidance scale per stage (overrides cfg when given)
    stage_steps: tuple[int, ...] = ()  # flow steps of each stage (overrides steps when given)
    solver: str = "euler"  # "euler" or "heun"
    temperature: float = 1.0  # scales the initial and the re-noising noise (< 1: less diverse, as MAR's)

    def __post_init__(self):
        if self.solver not in ("euler", "heun"):
            raise ValueError(f"solver={self.solver!r}: expected 'euler' or 'heun'.")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: expected at least 1 flow step per stage.")
        if any(n < 1 for n in self.stage_steps):
            raise ValueError(f"stage_steps={tuple(self.stage_steps)} (--stage-steps): expected at least 1 flow step "
                             "per stage.")
        object.__setattr__(self, "stage_cfg", tuple(float(g) for g in self.stage_cfg))
        object.__setattr__(self, "stage_steps", tuple(int(n) for n in self.stage_steps))

    def guidance(self, stage: int) -> float:
        return self.stage_cfg[stage] if self.stage_cfg else self.cfg

    def steps_of(self, stage: int) -> int:
        return self.stage_steps[stage] if self.stage_steps else self.steps

    @property
    def guided(self) -> bool:
        return any(g != 1.0 for g in self.stage_cfg) if self.stage_cfg else self.cfg != 1.0


def generate_latent(cfg: ECARConfig, opts: FlowSampleOptions, params, label_B, rng):
    """Normalised clean latents (B, r, r, Cv) of the finest stage."""
    model = ECAR(cfg)
    p = {"params": params}
    pns, wins = cfg.patch_nums, cfg.windows
    B, Cv = label_B.shape[0], cfg.Cvae
    if opts.stage_cfg and len(opts.stage_cfg) != len(pns):
        raise ValueError(f"stage_cfg={opts.stage_cfg} (--stage-cfg, or the model directory's sample.stage_cfg): "
                         f"expected one guidance scale per stage ({len(pns)}, patch_nums {tuple(pns)}).")
    if opts.stage_steps and len(opts.stage_steps) != len(pns):
        raise ValueError(f"stage_steps={opts.stage_steps} (--stage-steps, or the model directory's "
                         f"sample.stage_steps): expected one step count per stage ({len(pns)}, patch_nums "
                         f"{tuple(pns)}).")
    guided = opts.guided
    labels = jnp.concatenate([label_B, jnp.full_like(label_B, cfg.num_classes)]) if guided else label_B
    cond = model.apply(p, labels, method=ECAR.embed_class)
    x_tok = model.apply(p, cond, method=ECAR.first_tokens)
    caches, cur, end = None, 0, None
    keys = jax.random.split(rng, len(pns))
    for s, r in enumerate(pns):
        z, caches = model.apply(p, x_tok, cond, caches, method=ECAR.step)
        if s == 0:
            x = opts.temperature * jax.random.normal(keys[0], (B, r, r, Cv), jnp.float32)
        else:
            x = msf.renoise(end, wins[s][0], r // pns[s - 1], keys[s], opts.temperature)
        a, b = wins[s]
        g = opts.guidance(s)

        def raw_vel(xx_NrrC, tau, z=z, a=a, b=b, r=r, s=s):
            """Velocities of both guidance halves (or the one unguided batch): (N, r, r, Cv)."""
            xx = xx_NrrC.reshape(xx_NrrC.shape[0], r * r, Cv)
            t = jnp.full(xx.shape[:1], a + tau * (b - a), jnp.float32)
            v = model.apply(p, z, xx, t, labels, s, method=ECAR.stage_velocity)
            return v.reshape(xx_NrrC.shape)

        def vel(x_BrrC, tau, g=g, raw_vel=raw_vel):
            if not guided:
                return raw_vel(x_BrrC, tau)
            v = raw_vel(jnp.concatenate([x_BrrC, x_BrrC]), tau)
            return v[B:] + g * (v[:B] - v[B:])

        n_steps = opts.steps_of(s)
        dt = 1.0 / n_steps
        for k in range(n_steps):
            tau = k * dt
            v = vel(x, tau)
            if opts.solver == "heun" and k < n_steps - 1:
                x_pred = x + dt * v
                x = x + 0.5 * dt * (v + vel(x_pred, tau + dt))
            else:
                x = x + dt * v
        end = x
        cur += r * r
        if s != len(pns) - 1:
            f = pns[s + 1] // r
            if cfg.stage_input == "clean":
                both = jnp.concatenate([end, end]) if guided else end
                x_hat = msf.clean_estimate(both, raw_vel(both, 1.0), a, b, r // pns[s - 1] if s else 1)
                nxt = msf.upsample(x_hat, f).reshape(both.shape[0], -1, Cv)
                x_tok = model.apply(p, nxt, cur, method=ECAR.embed_next)
            else:
                nxt = msf.upsample(end, f).reshape(B, -1, Cv)
                x_tok = model.apply(p, nxt, cur, method=ECAR.embed_next)
                if guided:
                    x_tok = jnp.concatenate([x_tok, x_tok])
    return end


def generate(ae_cfg: KLAEConfig, cfg: ECARConfig, opts: FlowSampleOptions, ae_params, params, label_B, rng):
    lat = generate_latent(cfg, opts, params, label_B, rng)
    z = lat * cfg.latent_scale + cfg.latent_shift
    img = KLAE(ae_cfg).apply({"params": ae_params}, z, method=KLAE.decode)
    return (jnp.clip(img, -1, 1) + 1) * 0.5, lat


@functools.lru_cache(maxsize=16)
def make_sampler(ae_cfg: KLAEConfig, cfg: ECARConfig, opts: FlowSampleOptions):
    """Compiled ``sample(ae_params, params, label_B, rng) -> (images (B,H,W,3) in [0,1], latents)``."""
    return jax.jit(functools.partial(generate, ae_cfg, cfg, opts))


def transformer_flops(cfg: ECARConfig, batch: int) -> float:
    """Matmul FLOPs of the cached transformer passes of one generation of ``batch`` sequences."""
    C, Cv, depth = cfg.embed_dim, cfg.Cvae, cfg.depth
    hidden = round(C * cfg.mlp_ratio)
    total, prefix = 0.0, 0
    for s, r in enumerate(cfg.patch_nums):
        l = r * r
        prefix += l
        per_block = 2 * l * C * 3 * C + 2 * 2 * l * prefix * C + 2 * l * C * C + 2 * 2 * l * C * hidden
        per_block += 2 * C * 6 * C  # AdaLN modulation from the class embedding
        total += depth * per_block + 2 * C * 2 * C  # blocks + output AdaLN
        if s:
            total += 2 * l * Cv * C  # input embedding
    return total * batch


def head_flops_per_token(cfg: ECARConfig) -> float:
    """Matmul FLOPs of one flow-head evaluation on one token."""
    W, C, Cv = cfg.head_width, cfg.embed_dim, cfg.Cvae
    f = 2 * cfg.time_dim * W + 2 * W * W + 2 * C * W + 2 * Cv * W  # time MLP, condition, input
    f += cfg.head_depth * (2 * W * 3 * W + 2 * 2 * W * W)  # AdaLN + MLP of each residual block
    return f + 2 * W * 2 * W + 2 * W * Cv  # final AdaLN and output


def head_evals_per_stage(opts: FlowSampleOptions, stage: int) -> int:
    n = opts.steps_of(stage)
    return n if opts.solver == "euler" else 2 * n - 1


def flow_net_flops(cfg: ECARConfig, l: int) -> float:
    """Matmul FLOPs of one flow-net evaluation on one example's stage map of ``l`` positions."""
    if cfg.flow_net == "dit":
        return flops_per_call(cfg.head_width, cfg.flow_depth, cfg.flow_mlp_ratio, cfg.embed_dim, cfg.Cvae, l,
                              cfg.time_dim)
    return l * head_flops_per_token(cfg)


def sampling_flops(cfg: ECARConfig, opts: FlowSampleOptions, batch: int = 1) -> dict:
    """Analytic matmul FLOPs of ``generate_latent`` for ``batch`` images (decoder excluded), by part.

    Guidance doubles both the transformer and the flow-net batch. The flow net's share is
    ``sum_s evals_s * flow_net_flops(r_s^2)`` (``evals_s``: the solver's evaluations, plus one at the stage end
    for the "clean" stage input). For the per-token head, the saving of the stage schedule over one
    full-resolution stage with the same total evaluations is ``S * r_{S-1}^2 / sum_s r_s^2``.
    """
    mult = 2 if opts.guided else 1
    S = len(cfg.patch_nums)
    tr = transformer_flops(cfg, batch * mult)
    head = 0.0
    for s, r in enumerate(cfg.patch_nums):
        evals = head_evals_per_stage(opts, s) + (1 if cfg.stage_input == "clean" and s < S - 1 else 0)
        head += evals * flow_net_flops(cfg, r * r)
    head *= batch * mult
    return {"transformer": tr, "flow_head": head, "total": tr + head}


EXTRA = "latents"  # what a sample carries besides its image: the normalised clean latent (r, r, Cv)


def options(defaults: dict, *, cfg: float | None = None, flow_steps: int = 0, solver: str = "",
            temperature: float | None = None, stage_cfg: tuple[float, ...] | None = None,
            stage_steps: tuple[int, ...] | None = None, **unused) -> FlowSampleOptions:
    """Sampling options from command-line values (None / 0 / "": the model directory's ``sample`` defaults)."""
    del unused
    base = FlowSampleOptions(**{k: v for k, v in defaults.items() if k in FlowSampleOptions.__dataclass_fields__})
    return dataclasses.replace(
        base,
        cfg=base.cfg if cfg is None else cfg,
        steps=flow_steps or base.steps,
        solver=solver or base.solver,
        temperature=base.temperature if temperature is None else temperature,
        # a guidance scale given alone replaces the directory's per-stage scales
        stage_cfg=base.stage_cfg if stage_cfg is None and cfg is None else (stage_cfg or ()),
        # likewise a step count given alone replaces the directory's per-stage counts
        stage_steps=base.stage_steps if stage_steps is None and not flow_steps else (stage_steps or ()),
    )


def describe(opts: FlowSampleOptions) -> dict:
    return {"cfg": opts.cfg, "stage_cfg": list(opts.stage_cfg), "steps": opts.steps,
            "stage_steps": list(opts.stage_steps), "solver": opts.solver, "temperature": opts.temperature}
