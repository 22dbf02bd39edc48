"""Optimiser recipe: schedules against a plain-Python statement of the reference formulas, and AdamW
against the torch AdamW update written out in numpy."""

import json
import math
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from varjax.configs import common

from varjax import config
from varjax.core import optim


def expected_lr_ratio(sche, it, wp_it, max_it, wp0, wpe):
    """The reference schedule (VAR utils/lr_control.py), restated in scalar Python."""
    wp_it = round(wp_it)
    if it < wp_it:
        return wp0 + (1 - wp0) * it / wp_it
    pasd = (it - wp_it) / (max_it - 1 - wp_it)
    rest = 1 - pasd
    if sche == "cos":
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * pasd))
    if sche in ("lin", "lin0"):
        flat = 0.15 if sche == "lin" else 0.05
        return 1.0 if pasd < flat else wpe + (1 - wpe) * rest / (1 - flat)
    if sche == "lin00":
        return wpe + (1 - wpe) * rest
    if sche == "exp":
        return 1.0 if pasd < 0.15 else math.exp((pasd - 0.15) / 0.85 * math.log(wpe))
    knee = float(sche[3:])
    mid = (1 + wpe + (1 - wpe) * (1 - knee)) / 2
    if pasd < knee:
        return 1 + (mid - 1) * pasd / knee
    return wpe + (mid - wpe) * rest / (1 - knee)


@pytest.mark.parametrize("sche", ["cos", "lin", "lin0", "lin00", "lin0.5", "lin0.25", "exp"])
def test_lr_factor_matches_reference_formula(sche):
    max_it, wp_it, wp0, wpe = 200, 10.4, 0.005, 0.01
    steps = np.arange(max_it)
    got = jax.jit(lambda s: optim.lr_factor(s, sche=sche, wp_it=wp_it, max_it=max_it, wp0=wp0, wpe=wpe))(steps)
    want = [expected_lr_ratio(sche, int(s), wp_it, max_it, wp0, wpe) for s in steps]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert got.dtype == jnp.float32


def test_lr_factor_end_points():
    kw = dict(wp_it=5, max_it=101, wp0=0.1, wpe=0.02)
    assert float(optim.lr_factor(0, sche="cos", **kw)) == pytest.approx(0.1)
    assert float(optim.lr_factor(5, sche="cos", **kw)) == pytest.approx(1.0)
    assert float(optim.lr_factor(100, sche="cos", **kw)) == pytest.approx(0.02, rel=1e-5)
    assert float(optim.lr_factor(100, sche="lin0", **kw)) == pytest.approx(0.02, rel=1e-5)
    # 'lin0' stays flat for the first 5% of the decay phase.
    assert float(optim.lr_factor(9, sche="lin0", **kw)) == 1.0


def test_lr_factor_unknown_schedule():
    with pytest.raises(ValueError, match="sche='poly'"):
        optim.lr_factor(0, sche="poly", wp_it=1, max_it=10, wp0=0.0, wpe=0.0)


def test_lr_factor_degenerate_runs_are_finite():
    for max_it, wp_it in [(1, 0), (2, 1), (1, 3)]:
        vals = optim.lr_factor(jnp.arange(3), sche="lin0", wp_it=wp_it, max_it=max_it, wp0=0.1, wpe=0.1)
        assert np.all(np.isfinite(np.asarray(vals)))


def test_wd_value():
    assert float(optim.wd_value(0, twd=0.05, twde=0.5, max_it=11)) == pytest.approx(0.05)
    assert float(optim.wd_value(5, twd=0.05, twde=0.5, max_it=11)) == pytest.approx(0.275)
    assert float(optim.wd_value(10, twd=0.05, twde=0.5, max_it=11)) == pytest.approx(0.5)
    for twde in (0, 0.0, None):  # falls back to a constant twd
        assert float(optim.wd_value(7, twd=0.05, twde=twde, max_it=11)) == pytest.approx(0.05)


def test_peak_lr():
    assert optim.peak_lr(1e-4, 768) == pytest.approx(3e-4)
    assert optim.peak_lr(1e-4, 256, ac=4) == pytest.approx(4e-4)


def _params():
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                  "bias": rng.normal(size=(4,)).astype(np.float32)},
        "norm": {"scale": rng.normal(size=(4,)).astype(np.float32)},
        "pos_1LC": rng.normal(size=(1, 2, 4)).astype(np.float32),
        "head": {"kernel": rng.normal(size=(4, 2)).astype(np.float32)},
    }


WANT_MASK = {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}, "pos_1LC": False,
             "head": {"kernel": True}}


def test_wd_mask_plain_and_boxed():
    params = _params()
    assert optim.wd_mask(params, optim.REFERENCE_NOWD_KEYS) == WANT_MASK
    # Without the name keys, only the 1-D rule and 'bias' apply.
    assert optim.wd_mask(params)["pos_1LC"] is True
    boxed = jax.tree.map(lambda x: nn.Partitioned(x, names=(None,) * x.ndim), params)
    assert optim.wd_mask(boxed, optim.REFERENCE_NOWD_KEYS) == WANT_MASK


def _cfg(**overrides):
    cfg = common.optimizer()
    cfg.update(dict(sche="cos", wp0=0.5, wpe=0.1, warmup_steps=2, warmup_fraction=None, twd=0.3, twde=0.6,
                    tclip=0.05, b1=0.9, b2=0.95, eps=1e-8))
    cfg.update(overrides)
    return cfg


def _optimizer(cfg, *, peak_lr, total_steps):
    """The optimizer a run builds: warm-up steps resolved from the config as ``varjax.config.resolve`` does."""
    warmup = config.steps_from(cfg, "warmup", total_steps=total_steps)
    return optim.make_optimizer(cfg, peak_lr=peak_lr, total_steps=total_steps, warmup_steps=warmup)


def torch_adamw_reference(params, grads_seq, lrs, wds, mask, *, b1, b2, eps, clip):
    """torch.optim.AdamW + clip_grad_norm_, step by step, in float64 numpy."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr, wd) in enumerate(zip(grads_seq, lrs, wds, strict=True), start=1):
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
        coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        for k in p:
            g = grads[k].astype(np.float64) * coef
            if mask[k]:
                p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            denom = np.sqrt(v[k]) / math.sqrt(1 - b2**t) + eps
            p[k] = p[k] - lr / (1 - b1**t) * m[k] / denom
    return p


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_adamw_matches_torch_formula_with_clipping_and_mask():
    total, peak = 10, 0.1
    cfg = _cfg()
    tx = _optimizer(cfg, peak_lr=peak, total_steps=total)
    params = _params()
    rng = np.random.default_rng(1)
    grads_seq = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(3)]

    state = tx.init(params)
    step = jax.jit(tx.update)
    p = params
    for grads in grads_seq:
        updates, state = step(grads, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)

    lrs = [peak * float(optim.lr_factor(i, sche="cos", wp_it=2, max_it=total, wp0=0.5, wpe=0.1)) for i in range(3)]
    wds = [float(optim.wd_value(i, twd=0.3, twde=0.6, max_it=total)) for i in range(3)]
    assert lrs[0] == pytest.approx(0.05) and lrs[2] == pytest.approx(0.1)
    mask = _flat(WANT_MASK)
    want = torch_adamw_reference(_flat(params), [_flat(g) for g in grads_seq], lrs, wds, mask,
                                 b1=0.9, b2=0.95, eps=1e-8, clip=0.05)
    chex.assert_trees_all_close(_flat(p), want, atol=1e-6, rtol=1e-5)
    # Logged hyper-parameters are those of the last update.
    hp = optim.current_hparams(state)
    assert float(hp["lr"]) == pytest.approx(lrs[-1]) and float(hp["wd"]) == pytest.approx(wds[-1])
    assert float(optim.current_lr(state)) == pytest.approx(lrs[-1])


def test_clipping_disabled_and_no_weight_decay_on_masked_params():
    cfg = _cfg(tclip=0.0, twd=0.0, twde=0.0)
    tx = _optimizer(cfg, peak_lr=0.1, total_steps=10)
    params = _params()
    big = jax.tree.map(lambda x: np.full_like(x, 100.0), params)
    updates, _ = tx.update(big, tx.init(params), params)
    # First Adam step is lr * sign(g) when unclipped and undecayed.
    lr0 = 0.1 * 0.5
    chex.assert_trees_all_close(updates, jax.tree.map(lambda x: np.full_like(x, -lr0), params), rtol=1e-5)


def test_gradient_accumulation_averages_and_uses_the_completing_iteration():
    total, peak, ac = 12, 0.1, 2
    cfg = _cfg(ac=ac)
    tx = _optimizer(cfg, peak_lr=peak, total_steps=total)
    params = _params()
    rng = np.random.default_rng(2)
    g1, g2 = (jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(2))
    state = tx.init(params)
    u1, state = tx.update(g1, state, params)
    chex.assert_trees_all_close(u1, jax.tree.map(np.zeros_like, params))  # no update mid-accumulation
    u2, state = tx.update(g2, state, params)
    p = jax.tree.map(lambda a, u: a + u, params, u2)

    lr = peak * float(optim.lr_factor(1, sche="cos", wp_it=2, max_it=total, wp0=0.5, wpe=0.1))
    wd = float(optim.wd_value(1, twd=0.3, twde=0.6, max_it=total))
    mean_g = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    want = torch_adamw_reference(_flat(params), [_flat(mean_g)], [lr], [wd],
                                 _flat(WANT_MASK), b1=0.9, b2=0.95, eps=1e-8,
                                 clip=0.05)
    chex.assert_trees_all_close(_flat(p), want, atol=1e-6, rtol=1e-5)
    assert float(optim.current_lr(state)) == pytest.approx(lr)


def test_warmup_from_epochs_and_bad_schedule_error():
    cfg = _cfg(warmup_steps=None, warmup_epochs=0.5)
    warmup = config.steps_from(cfg, "warmup", steps_per_epoch=8)
    assert warmup == 4
    sched = optim.make_schedules(cfg, peak_lr=1.0, total_steps=100, warmup_steps=warmup)
    assert float(sched.lr(0)) == pytest.approx(0.5)
    assert float(sched.lr(2)) == pytest.approx(0.75)
    assert float(sched.lr(4)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sche='bogus'"):
        _optimizer(_cfg(sche="bogus"), peak_lr=1.0, total_steps=10)


def test_optimizer_state_on_boxed_params_keeps_logical_axes():
    tx = _optimizer(_cfg(ac=2), peak_lr=0.1, total_steps=10)
    boxed = {"w": nn.Partitioned(jnp.ones((2, 3)), names=("embed", "mlp"))}
    state = jax.eval_shape(tx.init, boxed)
    specs = [s for s in jax.tree.leaves(nn.get_partition_spec(state)) if s != jax.sharding.PartitionSpec()]
    # mu, nu and the accumulated gradients all carry the parameter's logical axes.
    assert specs == [jax.sharding.PartitionSpec("embed", "mlp")] * 3


def test_default_config_is_a_configdict():
    cfg = common.optimizer()
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert (cfg.b1, cfg.b2, cfg.tclip, cfg.sche) == (0.9, 0.95, 2.0, None)
    assert optim.schedule_name(cfg.sche) == "lin0" and optim.schedule_name(cfg.sche, pg=0.5) == "lin0.5"


def _d16_pg_plan(vq_dir, **extra):
    """The plan of ``var_d16`` shortened to 300 iterations (the data's size given, not read: ImageNet's)."""
    from varjax.data.sources import DataPlan

    overrides = {"pg": "0.5", "total_epochs": "None", "total_steps": "300", "tokenizer_dir": vq_dir, **extra}
    data = DataPlan(source="images", cache=None, num_shards=1, steps_per_epoch=1668, num_classes=1000,
                    image_size=32, config=None)
    return config.resolve(config.load("var_d16", list(overrides.items())), data=data)


def test_progressive_training_follows_the_official_schedule_at_every_iteration(vq_dir):
    """VAR-d16's recipe with --config.pg=0.5, shortened to 300 iterations: lr and weight decay of every update
    against the official trainer's values (tests/data/lr_schedule_d16_pg05.json says where they come from)."""
    ref = json.loads((Path(__file__).parent / "data" / "lr_schedule_d16_pg05.json").read_text())
    plan = _d16_pg_plan(vq_dir)
    assert plan.lr_schedule == "lin0.5" and plan.total_steps == ref["args"]["max_it"]
    assert plan.peak_lr == pytest.approx(ref["args"]["tlr"])
    tx = optim.for_plan(plan)
    params = {"w": jnp.ones((2, 2))}

    def update(opt_state, _):
        _, opt_state = tx.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)
        hp = optim.current_hparams(opt_state)
        return opt_state, (hp["lr"], hp["wd"])

    _, (lr, wd) = jax.jit(lambda s: jax.lax.scan(update, s, None, length=plan.total_steps))(tx.init(params))
    np.testing.assert_allclose(np.asarray(lr), ref["lr"], rtol=2e-6)
    np.testing.assert_allclose(np.asarray(wd), ref["wd"], rtol=2e-6)


def test_an_explicit_schedule_wins_over_the_progressive_rule(vq_dir):
    assert _d16_pg_plan(vq_dir, **{"opt.sche": "cos"}).lr_schedule == "cos"
    assert _d16_pg_plan(vq_dir, pg="0.0").lr_schedule == "lin0"
