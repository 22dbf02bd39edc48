"""E-CAR: multistage flow math, training signal, sampler program and FLOPs, trainer resume and sharding."""

import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from tests import _tiny
from varjax import cli, config, train
from varjax.models import multistage_flow as msf
from varjax.models.ecar import ECAR, ECARConfig
from varjax.sampling.ecar import FlowSampleOptions, generate_latent, make_sampler, sampling_flops

ROOT = Path(__file__).resolve().parents[1]
PNS = (1, 2, 4, 8)


def tiny_cfg(**kw):
    base = dict(depth=2, embed_dim=64, num_heads=2, num_classes=6, Cvae=4, patch_nums=PNS, head_width=64,
                head_depth=2, time_dim=64)
    return ECARConfig(**{**base, **kw})


def _init(cfg, B=2):
    ex = msf.training_example(jnp.zeros((B, PNS[-1], PNS[-1], cfg.Cvae)), cfg.patch_nums, cfg.windows,
                              jax.random.PRNGKey(0))
    return ECAR(cfg).init(jax.random.PRNGKey(0), jnp.zeros((B,), jnp.int32), ex["x_in"], ex["x_t"], ex["t"])["params"]


def init_params(cfg, B=2):
    # one compiled program: run op by op, the init dispatches (and compiles) hundreds of small ones
    return meta.unbox(jax.jit(_init, static_argnums=(0, 1))(cfg, B))


# ---------------------------------------------------------------- multistage flow


def test_windows_follow_the_renoising_rule():
    wins = msf.windows(PNS)
    assert [w[0] for w in wins] == [0.0, 0.25, 0.5, 0.75] and wins[-1][1] == 1.0
    for (_, b), (a_next, _) in zip(wins, wins[1:], strict=False):
        assert b == pytest.approx(2 * a_next / (1 + a_next))  # pyramidal flow's rule for a 2x jump
        assert b > a_next  # re-noising goes back in time
    with pytest.raises(ValueError, match="integer multiple"):
        msf.windows((1, 2, 3))


def test_renoising_gives_the_intended_noise_level():
    """Stage end -> next start on Gaussian data: mean a U(D(x1)), noise N(0, (1 - a)^2 I), no correlation."""
    wins = msf.windows(PNS)
    s, f = 2, 2  # 4x4 -> 8x8
    a_next = wins[s + 1][0]
    N, C = 4096, 2
    x1 = jax.random.normal(jax.random.PRNGKey(1), (N, 8, 8, C))
    d = msf.pyramid(x1, PNS)
    b = wins[s][1]
    end = b * d[s] + (1 - b) * jax.random.normal(jax.random.PRNGKey(2), d[s].shape)
    start = msf.renoise(end, a_next, f, jax.random.PRNGKey(3))
    resid = np.asarray(start - a_next * msf.upsample(d[s], f))
    sd = 1 - a_next
    assert abs(resid.mean()) < 0.01
    assert resid.var() == pytest.approx(sd**2, rel=0.03)
    # inside a 2x2 block the upsampled noise is shared; the corrective noise must cancel that correlation
    corr = np.corrcoef(resid[:, 0::2, 0::2].ravel(), resid[:, 0::2, 1::2].ravel())[0, 1]
    assert abs(corr) < 0.03, corr
    # without the corrective noise the correlation is 1: the test can tell
    naive = np.asarray(msf.upsample(end, f) - b * msf.upsample(d[s], f))
    assert np.corrcoef(naive[:, 0::2, 0::2].ravel(), naive[:, 0::2, 1::2].ravel())[0, 1] > 0.99


def test_teacher_chain_marginals_and_clean_end():
    wins = msf.windows(PNS)
    x1 = jax.random.normal(jax.random.PRNGKey(0), (2048, 8, 8, 1))
    starts, ends = msf.teacher_chain(x1, PNS, wins, jax.random.PRNGKey(5))
    d = msf.pyramid(x1, PNS)
    np.testing.assert_allclose(np.asarray(ends[-1]), np.asarray(x1), atol=1e-5)  # only the last stage is clean
    for s in range(1, len(PNS)):
        a = wins[s][0]
        n = np.asarray(starts[s] - a * msf.upsample(d[s - 1], 2)) / (1 - a)
        assert n.std() == pytest.approx(1.0, rel=0.03), s  # the start the stage is trained on is N(0, I) noise


# ---------------------------------------------------------------- training signal


def test_flow_loss_falls_on_a_fixed_batch():
    cfg = tiny_cfg(cond_drop_rate=0.0)
    B = 8
    x1 = jax.random.normal(jax.random.PRNGKey(3), (B, 8, 8, cfg.Cvae))
    ex = jax.jit(lambda x, r: msf.training_example(x, PNS, cfg.windows, r))(x1, jax.random.PRNGKey(4))
    lab = jnp.arange(B) % 6
    params = init_params(cfg)
    tx = optax.adam(2e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss_fn(p):
            v = ECAR(cfg).apply({"params": p}, lab, ex["x_in"], ex["x_t"], ex["t"])
            return msf.flow_loss(v, ex["v"], ex["stage"], PNS, all_stages=True)

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(params, u), opt, loss

    losses = []
    for _ in range(60):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert min(losses[-5:]) < 0.5 * losses[0], (losses[0], losses[-5:])


def test_flow_loss_weights_the_drawn_stage():
    v = jnp.zeros((2, sum(r * r for r in PNS), 1))
    target = jnp.concatenate([jnp.full((2, r * r, 1), float(s + 1)) for s, r in enumerate(PNS)], axis=1)
    got = msf.flow_loss(v, target, jnp.asarray([0, 3]), PNS)
    assert float(got) == pytest.approx((1.0 + 16.0) / 2)  # per-example mean squared error of its stage
    assert float(msf.flow_loss(v, target, jnp.asarray([0, 3]), PNS, all_stages=True)) == pytest.approx(30 / 4)


# ---------------------------------------------------------------- sampler


@pytest.fixture(scope="module")
def tiny_model(kl_dir):
    from varjax.core.model_dir import load_params

    cfg = tiny_cfg()
    return _tiny.kl_cfg(), load_params(kl_dir, "vae"), cfg, init_params(cfg)


def test_sampler_is_one_compiled_program(tiny_model):
    ae_cfg, ae_params, cfg, params = tiny_model
    opts = FlowSampleOptions(cfg=2.0, steps=3)
    fn = make_sampler(ae_cfg, cfg, opts)
    lab = jnp.arange(4, dtype=jnp.int32)
    lowered = fn.lower(ae_params, params, lab, jax.random.PRNGKey(0))
    text = lowered.as_text()
    assert text.count("func.func public @main") == 1  # one module, one entry point
    assert "callback" not in text  # nothing runs on the host between stages or steps
    img1, lat1 = fn(ae_params, params, lab, jax.random.PRNGKey(0))
    img2, _ = fn(ae_params, params, lab, jax.random.PRNGKey(1))
    assert fn._cache_size() == 1  # a new seed reuses the program
    assert img1.shape == (4, 32, 32, 3) and lat1.shape == (4, 8, 8, 4)
    assert np.all(np.isfinite(np.asarray(img1))) and not np.allclose(img1, img2)


def _xla_flops(fn, *args) -> float:
    """XLA's FLOP count of ``fn(*args)`` as lowered, without compiling it: the matmuls as in the compiled program,
    plus a few per cent of element-wise work that optimisation removes."""
    cost = fn.lower(*args).cost_analysis()
    return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_flops_formula_matches_xla(tiny_model, guidance):
    _, _, cfg, params = tiny_model
    opts = FlowSampleOptions(cfg=guidance, steps=4)
    B = 4
    cost = _xla_flops(jax.jit(lambda p, lab, r: generate_latent(cfg, opts, p, lab, r)), params,
                      jnp.zeros((B,), jnp.int32), jax.random.PRNGKey(0))
    formula = sampling_flops(cfg, opts, B)
    # XLA also counts the element-wise work (norms, AdaLN, softmax, noise) the matmul formula leaves out
    assert formula["total"] <= cost <= 1.06 * formula["total"], (cost, formula)
    # the stage schedule: one full-resolution stage with the same evaluations costs S * 64 / 85 times more head
    single = sampling_flops(tiny_cfg(patch_nums=(8,)), FlowSampleOptions(guidance, steps=4 * len(PNS)), B)
    assert single["flow_head"] / formula["flow_head"] == pytest.approx(len(PNS) * 64 / 85, rel=1e-6)


def test_stage_steps_schedule(tiny_model):
    """Per-stage step counts: equal counts are ``steps`` to the bit; a schedule's FLOPs follow the formula."""
    _, _, cfg, params = tiny_model
    params = _perturbed(params)
    lab, rng = jnp.arange(4, dtype=jnp.int32), jax.random.PRNGKey(0)
    run = lambda opts: generate_latent(cfg, opts, params, lab, rng)  # noqa: E731
    uniform = run(FlowSampleOptions(cfg=2.0, steps=3))
    np.testing.assert_array_equal(uniform, run(FlowSampleOptions(cfg=2.0, steps=5, stage_steps=(3, 3, 3, 3))))
    opts = FlowSampleOptions(cfg=2.0, steps=3, stage_steps=(3, 3, 2, 1))
    assert not np.allclose(uniform, run(opts))
    cost = _xla_flops(jax.jit(lambda p, lab, r: generate_latent(cfg, opts, p, lab, r)), params, lab, rng)
    formula = sampling_flops(cfg, opts, 4)
    assert formula["total"] <= cost <= 1.06 * formula["total"], (cost, formula)
    assert formula["flow_head"] < sampling_flops(cfg, FlowSampleOptions(cfg=2.0, steps=3), 4)["flow_head"]
    with pytest.raises(ValueError, match="one step count per stage"):
        run(FlowSampleOptions(stage_steps=(3, 3)))
    with pytest.raises(ValueError, match="at least 1 flow step"):
        FlowSampleOptions(stage_steps=(3, 0, 3, 3))


def test_sampling_flags_over_the_directory_defaults():
    from varjax.sampling.ecar import options

    d = {"cfg": 2.0, "steps": 8, "stage_steps": (8, 8, 8, 4), "stage_cfg": (3.0, 2.0, 2.0, 2.0)}
    assert options(d).stage_steps == (8, 8, 8, 4) and options(d).guidance(0) == 3.0
    # a count or a scale given alone replaces the per-stage ones; per-stage flags replace them
    assert options(d, flow_steps=4).stage_steps == () and options(d, flow_steps=4).steps_of(3) == 4
    assert options(d, stage_steps=(2, 2, 2, 1)).steps_of(3) == 1
    assert options(d, cfg=1.5).stage_cfg == () and options(d, cfg=1.5).guidance(0) == 1.5


# ---------------------------------------------------------------- trainer


N_STEPS, CKPT_EVERY = 8, 2
# The kill and mesh tests train two stages (4x4, 8x8) instead of four: the same modules, sharding and stage
# hand-over with half the unrolled copies of the flow network to trace and compile.
TWO_STAGES = (4, 8)
CONST = _tiny.flags({**_tiny.ONE_SCHEDULE, "model.patch_nums": TWO_STAGES})  # one program for the runs of the kill test


def ecar_cfg(tok, latents=None, **over):
    return _tiny.set_fields(_tiny.ecar_config(tok, latents), **_tiny.ONE_SCHEDULE, **over)


@pytest.fixture(scope="module")
def reference_losses(kl_dir, latents_cache, tmp_path_factory):
    """An uninterrupted run on a latent cache (its statistics measured at the start, then part of the state)."""
    wd = tmp_path_factory.mktemp("ref")
    cfg = ecar_cfg(kl_dir, latents_cache, stop_at_step=N_STEPS, ckpt_every=CKPT_EVERY,
                   model__patch_nums=TWO_STAGES)
    train.train(config.resolve(cfg), str(wd))
    return _tiny.read_losses(wd)


def _cli(tok, latents, wd, *extra):
    return [sys.executable, "-m", "varjax", "train", "--config", str(ROOT / "configs" / "ecar_shapes.py") + ":runlocal",
            "--workdir", str(wd), f"--config.tokenizer_dir={tok}", f"--config.latents_cache={latents}",
            "--config.log_every=1", "--config.async_ckpt=False", "--config.progress_every_s=1000000.0",
            f"--config.ckpt_every={CKPT_EVERY}", *CONST, *extra]


def test_sigkill_then_resume_gives_identical_losses(kl_dir, latents_cache, tmp_path, reference_losses, capsys):
    from varjax.core.checkpoint import Checkpointer

    wd = tmp_path / "killed"
    env = _tiny.subprocess_env()
    proc = subprocess.Popen(_cli(kl_dir, latents_cache, wd), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    try:
        while not (wd / "checkpoints" / str(CKPT_EVERY) / "state").is_dir():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() - t0 < 600, "timed out waiting for the first checkpoint"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    latest = Checkpointer(str(wd)).latest_step()
    assert latest is not None and CKPT_EVERY <= latest < N_STEPS, latest
    # the rerun, as `varjax train` in this process (its step program comes from the compilation cache)
    capsys.readouterr()
    cli.main(_cli(kl_dir, latents_cache, wd, f"--config.stop_at_step={N_STEPS}")[3:])
    assert f"resumed from step {latest}" in capsys.readouterr().out
    got = _tiny.read_losses(wd)
    assert sorted(got) == sorted(reference_losses) == list(range(1, N_STEPS + 1))
    for s in got:
        assert got[s] == pytest.approx(reference_losses[s], abs=1e-6), s
    meta_json = json.loads((wd / "varjax_model.json").read_text())
    # the workdir is a model directory of the family (`varjax sample` of a resumed E-CAR workdir:
    # tests/test_remote_paths.py)
    assert meta_json["family"] == "ecar" and meta_json["ecar"]["config"]["latent_scale"] > 0


def test_mesh_222_step_equals_one_device(kl_dir):
    from varjax import tasks
    from varjax.core import mesh as sharding

    rng = np.random.default_rng(0)
    local = {"latents": rng.normal(size=(8, 8, 8, 4)).astype(np.float32), "label": np.arange(8, dtype=np.int32) % 6}
    out = {}
    for name, mesh, devices in (("one", [("data", 1), ("fsdp", 1), ("tensor", 1)], jax.devices()[:1]),
                                ("222", [("data", 2), ("fsdp", 2), ("tensor", 2)], jax.devices())):
        # fixed latent statistics: nothing to measure, no data opened. The flow DiT's zero-initialised output makes
        # some first gradients ~1e-9; AdamW with eps 1e-8 would blow their rounding noise up to lr-sized steps of
        # either sign, so eps 1e-3 keeps the comparison on what the sharding computes.
        cfg = ecar_cfg(kl_dir, mesh=mesh, model__latent_scale=1.5, model__latent_shift=0.1, opt__eps=1e-3,
                       model__patch_nums=TWO_STAGES)
        plan = _tiny.plan_without_data(cfg, num_devices=len(devices))
        mesh = sharding.create_mesh(plan.mesh, devices=devices)
        task = tasks.ecar.build(plan, mesh)
        state, shardings = sharding.create_sharded_state(task.init_fn, mesh, plan.rules, jax.random.PRNGKey(0))
        step = train.jit_train_step(task.step_fn, shardings, mesh)
        batch = sharding.make_global_batch(local, mesh)
        with sharding.mesh_rules(mesh, plan.rules):
            for _ in range(2):
                state, m = step(state, batch, task.frozen)
        out[name] = (jax.device_get(state["params"]), float(m["loss"]))
    assert out["one"][1] == pytest.approx(out["222"][1], rel=1e-5)
    chex.assert_trees_all_close(out["one"][0], out["222"][0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_imagenet_configs_build_var_sized_models(depth):
    from varjax import tasks

    ae_cfg = tasks.tokenizer.model_config(config.load("ecar_tokenizer_imagenet"))
    assert (ae_cfg.image_size, ae_cfg.latent_size, ae_cfg.z_channels) == (256, 16, 16)
    c = config.load(f"ecar_d{depth}")
    assert c.task == "ecar" and c.data.name == "imagenet2012" and c.total_epochs > 0
    mcfg = tasks.ecar.model_config(c, 1000, ae_cfg)
    assert mcfg.patch_nums == (1, 2, 4, 8, 16) and mcfg.windows[-1][1] == 1.0
    assert (mcfg.embed_dim, mcfg.num_heads, mcfg.head_width) == (64 * depth, depth, 64 * depth)
    local = config.load(f"ecar_d{depth}:runlocal")
    assert local.total_steps == 2 and local.batch_size == 8


# ---------------------------------------------------------------- coherent flow net ("dit") and stage inputs


@functools.partial(jax.jit, static_argnames=("seed", "scale"))
def _perturbed(params, seed=11, scale=0.05):
    """Parameters moved off their initialisation (zero-initialised outputs would hide every difference)."""
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tdef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys,
                                                                                               strict=True)])


def test_mlp_option_is_unchanged():
    """The per-token head gives the numbers it gave before the flow net became selectable (same init, same
    perturbation, same training forward and sampler), and an old config without the new fields loads as it."""
    old = {k: v for k, v in tiny_cfg().to_dict().items()
           if k not in ("flow_net", "flow_depth", "flow_heads", "flow_mlp_ratio", "stage_input")}
    cfg = ECARConfig.from_dict(old)
    assert cfg.flow_net == "mlp" and cfg.stage_input == "noisy"
    params = _perturbed(init_params(cfg))
    assert "head" in params and "flow" not in params

    @jax.jit  # one program each: op by op, the forward and the sampler compile hundreds of small ones
    def forward(params):
        x1 = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, cfg.Cvae))
        ex = msf.training_example(x1, PNS, cfg.windows, jax.random.PRNGKey(4))
        return ECAR(cfg).apply({"params": params}, jnp.arange(4), ex["x_in"], ex["x_t"], ex["t"], train=True,
                               rngs={"dropout": jax.random.PRNGKey(5)})

    v = forward(params)
    assert float(v.sum()) == pytest.approx(-29.342463, rel=1e-4, abs=1e-3)
    assert float(jnp.abs(v).sum()) == pytest.approx(410.17337, rel=1e-4)
    sample = jax.jit(lambda p, lab, r: generate_latent(cfg, FlowSampleOptions(cfg=2.0, steps=3), p, lab, r))
    lat = sample(params, jnp.arange(4), jax.random.PRNGKey(7))
    assert float(jnp.abs(lat).sum()) == pytest.approx(851.77997, rel=1e-4)
    assert float(lat[1, 3, 5, 2]) == pytest.approx(-2.1797547, rel=1e-4)


@pytest.fixture(scope="module")
def dit_model():
    cfg = tiny_cfg(flow_net="dit", flow_depth=2, flow_heads=2, head_width=32)
    return cfg, _perturbed(init_params(cfg))


def test_flow_dit_shapes_and_reads_every_position(dit_model):
    cfg, params = dit_model
    B, r, s = 2, 4, 2  # the 4x4 stage
    z = jax.random.normal(jax.random.PRNGKey(0), (B, r * r, cfg.embed_dim))
    x = jax.random.normal(jax.random.PRNGKey(1), (B, r * r, cfg.Cvae))
    t = jnp.full((B,), 0.6)
    lab = jnp.asarray([1, cfg.num_classes])  # a class and the null class

    @functools.partial(jax.jit, static_argnums=1)  # the config picks the flow network
    def vel(p, c, x, lab):
        return ECAR(c).apply({"params": p}, z, x, t, lab, s, method=ECAR.stage_velocity)

    v = vel(params, cfg, x, lab)
    assert v.shape == (B, r * r, cfg.Cvae) and np.all(np.isfinite(np.asarray(v)))
    x2 = x.at[:, 5].add(1.0)  # change one position of the noisy map
    dv = np.abs(np.asarray(vel(params, cfg, x2, lab) - v)).max(axis=-1)  # (B, l)
    others = np.delete(dv, 5, axis=1)
    assert np.all(others > 1e-6), others  # every other position's velocity moves: the map is read jointly
    # the per-token head, same inputs: only the changed position moves
    mcfg = tiny_cfg()
    mp = _perturbed(init_params(mcfg))
    dm = np.abs(np.asarray(vel(mp, mcfg, x2, lab) - vel(mp, mcfg, x, lab))).max(axis=-1)
    assert np.all(np.delete(dm, 5, axis=1) == 0.0) and np.all(dm[:, 5] > 1e-6)
    # the class reaches the velocity through the AdaLN vector too (guidance has something to contrast)
    v_null = vel(params, cfg, x, jnp.full((B,), cfg.num_classes))
    assert not np.allclose(np.asarray(v_null[0]), np.asarray(v[0]))


def test_flow_dit_parameters_carry_logical_axes(dit_model):
    cfg, _ = dit_model
    boxed = jax.eval_shape(lambda: _init(cfg, 1))["flow"]  # shapes and names only: nothing runs
    names = {k: v.names for k, v in jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, meta.Partitioned))[0] if isinstance(v, meta.Partitioned)
        for k in [jax.tree_util.keystr(k)]}
    assert any("mat_qkv" in k and v == ("embed", "chunks", "heads", "kv") for k, v in names.items())
    assert any("fc1" in k and v == ("embed", "mlp") for k, v in names.items())
    n_all = len(jax.tree.leaves(meta.unbox(boxed)))
    assert len(names) == n_all, (len(names), n_all)  # every flow-net parameter is named


@pytest.mark.parametrize("stage_input", ["noisy", "clean"])
def test_coherent_flow_sampler_is_one_compiled_program(tiny_model, stage_input):
    ae_cfg, ae_params, _, _ = tiny_model
    cfg = tiny_cfg(flow_net="dit", head_width=32, stage_input=stage_input)
    params = _perturbed(init_params(cfg))
    opts = FlowSampleOptions(cfg=2.0, steps=3, stage_cfg=(3.0, 2.0, 1.5, 1.0))
    fn = make_sampler(ae_cfg, cfg, opts)
    lab = jnp.arange(4, dtype=jnp.int32)
    text = fn.lower(ae_params, params, lab, jax.random.PRNGKey(0)).as_text()
    assert text.count("func.func public @main") == 1 and "callback" not in text
    img1, lat1 = fn(ae_params, params, lab, jax.random.PRNGKey(0))
    img2, _ = fn(ae_params, params, lab, jax.random.PRNGKey(1))
    assert fn._cache_size() == 1
    assert img1.shape == (4, 32, 32, 3) and lat1.shape == (4, 8, 8, 4)
    assert np.all(np.isfinite(np.asarray(lat1))) and not np.allclose(img1, img2)
    # XLA's count of the sampler agrees with the analytic formula (clean: one more eval per stage end)
    cost = _xla_flops(jax.jit(lambda p, lab, r: generate_latent(cfg, opts, p, lab, r)), params, lab,
                      jax.random.PRNGKey(0))
    formula = sampling_flops(cfg, opts, 4)
    assert formula["total"] <= cost <= 1.08 * formula["total"], (cost, formula)


def test_clean_estimate_is_exact_for_the_teacher_velocity():
    """x_hat = P y + (b - a) / (b (1 - a)) Q y recovers D_s(x1) from a stage's end and its true velocity."""
    wins = msf.windows(PNS)
    x1 = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 2))
    starts, ends = msf.teacher_chain(x1, PNS, wins, jax.random.PRNGKey(1))
    d = msf.pyramid(x1, PNS)
    for s in range(len(PNS)):
        a, b = wins[s]
        f = PNS[s] // PNS[s - 1] if s else 1
        got = msf.clean_estimate(ends[s], ends[s] - starts[s], a, b, f)
        np.testing.assert_allclose(np.asarray(got), np.asarray(d[s]), atol=2e-5)
        if s and b < 1:  # the plain x + (1 - t) dx/dt misses the detail part's path (equal at b = 1)
            naive = ends[s] + (1 - b) / (b - a) * (ends[s] - starts[s])
            assert np.abs(np.asarray(naive - d[s])).max() > 1e-2


def test_clean_stage_input_trains_on_its_own_estimates():
    """With stage_input="clean" the transformer reads the flow net's (stop-gradient) estimates, not the truth."""
    cfg = tiny_cfg(flow_net="dit", head_width=32, stage_input="clean")
    params = _perturbed(init_params(cfg))
    x1 = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, cfg.Cvae))
    ex = jax.jit(lambda x, r: msf.training_example(x, PNS, cfg.windows, r))(x1, jax.random.PRNGKey(4))
    m = ECAR(cfg)
    lab = jnp.arange(2)

    @jax.jit
    def both_ways(params):
        """The training forward, and the same velocity from the estimates computed separately."""
        est = m.apply({"params": params}, lab, ex["x_in_clean"], ex["x_end"], method=ECAR.clean_inputs)
        v = m.apply({"params": params}, lab, ex["x_in_clean"], ex["x_t"], ex["t"], x_end_BLCv=ex["x_end"])
        z = m.apply({"params": params}, lab, est, method=ECAR.conditions)
        return est, v, m.apply({"params": params}, z, ex["x_t"], ex["t"], lab, method=ECAR.velocity)

    est, v, ref = both_ways(params)
    assert est.shape == ex["x_in_clean"].shape and not np.allclose(est, ex["x_in_clean"], atol=1e-3)
    np.testing.assert_allclose(np.asarray(v), np.asarray(ref), atol=1e-5)
