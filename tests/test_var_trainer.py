"""VAR trainer: official recipe configs, overfitting, exact resume after restarts, SIGKILL and SIGTERM."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import _tiny
from varjax import cli, config, tasks, train
from varjax.models.var import VAR
from varjax.models.vqvae import VQVAEConfig

ROOT = Path(__file__).resolve().parents[1]

OFFICIAL_COUNTS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356, 36: 2_353_893_904}
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def load_config(name, arg=None):
    return config.load(f"{name}:{arg}" if arg else name)


# ---------------------------------------------------------------- official recipes


RECIPES = {
    16: dict(batch_size=768, epochs=200, tblr=1e-4, alng=1e-3, wpe=0.1, twde=0.0),
    20: dict(batch_size=768, epochs=250, tblr=1e-4, alng=1e-3, wpe=0.1, twde=0.0),
    24: dict(batch_size=768, epochs=350, tblr=8e-5, alng=1e-4, wpe=0.01, twde=0.0),
    30: dict(batch_size=1024, epochs=350, tblr=8e-5, alng=1e-5, wpe=0.01, twde=0.08),
    36: dict(batch_size=768, epochs=350, tblr=8e-5, alng=5e-6, wpe=0.01, twde=0.08),
}


@pytest.mark.parametrize("depth", sorted(RECIPES))
def test_official_recipe_hparams(depth):
    r = RECIPES[depth]
    c = load_config(f"var_d{depth}")
    assert c.model.depth == depth
    assert c.batch_size == r["batch_size"]
    assert c.total_epochs == r["epochs"] and c.total_steps is None and c.total_examples is None
    assert c.tblr == pytest.approx(r["tblr"])
    assert c.model.init_adaln_gamma == pytest.approx(r["alng"])
    assert c.opt.wpe == pytest.approx(r["wpe"])
    assert c.opt.twde == pytest.approx(r["twde"])
    assert c.model.shared_aln == (depth == 36)
    assert c.model.dtype == "bfloat16" and c.opt.sche is None  # the official rule: 'lin0' without pg
    assert c.opt.twd == pytest.approx(0.05) and c.opt.tclip == pytest.approx(2.0)
    assert c.ls == 0.0 and c.model.cond_drop_rate == pytest.approx(0.1)
    assert c.data.name == "imagenet2012"
    assert c.tokenizer_dir and ("512" in c.tokenizer_dir) == (depth == 36)
    assert c.tokenizer_dir in (ROOT / "configs" / f"var_d{depth}.py").read_text()  # named in the docstring
    local = load_config(f"var_d{depth}", "runlocal")
    assert local.total_steps is not None and local.batch_size < c.batch_size


@pytest.mark.parametrize("depth", sorted(OFFICIAL_COUNTS))
def test_official_param_counts(depth):
    c = load_config(f"var_d{depth}")
    vae_cfg = VQVAEConfig(patch_nums=PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256)
    mcfg = tasks.var.model_config(c, 1000, vae_cfg)
    assert (mcfg.embed_dim, mcfg.num_heads) == (64 * depth, depth)
    lab = jnp.zeros((1,), jnp.int32)
    x = jnp.zeros((1, mcfg.L - mcfg.first_l, mcfg.Cvae), jnp.float32)
    shapes = jax.eval_shape(
        lambda: VAR(mcfg).init(jax.random.PRNGKey(0), lab, x, method=VAR.init_all)["params"]
    )
    from flax.core import meta

    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(meta.unbox(shapes)))
    assert n == OFFICIAL_COUNTS[depth]


# ---------------------------------------------------------------- overfit one batch


def test_overfits_one_batch(vq_dir, shapes_data):
    from varjax.core import mesh as mesh_lib
    from varjax.data import sources

    cfg = _tiny.var_config(vq_dir, total_steps=100, tblr=3e-3 * 256 / 8, opt__wpe=1.0)  # the lr stays high
    cfg.model.cond_drop_rate = 0.0
    plan, mesh, task = _tiny.build(cfg, jax.devices()[:1])
    it = sources.train_iterator(plan.data, global_batch_size=8, process_index=0, process_count=1, seed=0)
    local = next(it)
    assert local["image"].shape == (8, 32, 32, 3)  # images, encoded by the frozen tokenizer in the step
    batch = mesh_lib.make_global_batch({k: local[k] for k in ("image", "label")}, mesh)
    state, _ = mesh_lib.create_sharded_state(task.init_fn, mesh, plan.rules, jax.random.PRNGKey(0))
    step = jax.jit(task.step_fn, donate_argnums=0)
    losses = []
    for _ in range(100):
        state, m = step(state, batch, task.frozen)
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses))
    assert min(losses[-5:]) < 0.5 * losses[0], (losses[0], losses[-5:])


# ---------------------------------------------------------------- resume

N_STEPS, CKPT_EVERY = 8, 2
CONST = _tiny.ONE_SCHEDULE  # one program for every run of this file
CONST_FLAGS = _tiny.flags(CONST)


def shapes_cfg(tok, **over):
    return _tiny.set_fields(_tiny.var_config(tok, log_every=1, ckpt_every=CKPT_EVERY), **CONST, **over)


def run(cfg, workdir):
    return train.train(config.resolve(cfg), str(workdir))


@pytest.fixture(scope="module")
def reference_losses(vq_dir, shapes_data, tmp_path_factory):
    """Losses of an uninterrupted run of N_STEPS steps."""
    wd = tmp_path_factory.mktemp("reference")
    run(shapes_cfg(vq_dir, stop_at_step=N_STEPS), wd)
    return _tiny.read_losses(wd)


def test_resume_matches_uninterrupted(vq_dir, tmp_path, reference_losses, capsys):
    k = 4
    part = tmp_path / "part"
    run(shapes_cfg(vq_dir, stop_at_step=k), part)
    run(shapes_cfg(vq_dir, stop_at_step=N_STEPS), part)
    assert f"resumed from step {k} in {part}" in capsys.readouterr().out
    got = _tiny.read_losses(part)
    assert sorted(got) == sorted(reference_losses) == list(range(1, N_STEPS + 1))
    for s in range(1, N_STEPS + 1):
        assert got[s] == pytest.approx(reference_losses[s], abs=1e-6), s
    # a rerun whose stop lies behind the saved step says so and trains nothing
    run(shapes_cfg(vq_dir, stop_at_step=k), part)
    assert f"step {N_STEPS} is at or past this run's last step ({k}): nothing to train" in capsys.readouterr().out
    assert _tiny.read_losses(part) == got


def _cli(tok, workdir, *extra):
    return [sys.executable, "-m", "varjax", "train", "--config", str(ROOT / "configs" / "var_shapes.py") + ":runlocal",
            "--workdir", str(workdir), f"--config.tokenizer_dir={tok}", "--config.log_every=1",
            "--config.async_ckpt=False", "--config.progress_every_s=1000000.0", *extra]


def _wait_for(pred, proc, timeout=300.0):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"training exited early with {proc.returncode}:\n{out[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.05)


def _finalized(workdir, step):
    d = Path(workdir) / "checkpoints" / str(step)
    return d.is_dir() and (d / "state").is_dir() and (d / "meta").is_dir()


def test_sigkill_then_resume(vq_dir, tmp_path, reference_losses, capsys):
    from varjax.core.checkpoint import Checkpointer

    # The killed run has no stop step, so it is surely killed mid-run; its steps are the reference run's steps.
    n, k, const_flags = N_STEPS, CKPT_EVERY, CONST_FLAGS
    wd = tmp_path / "killed"
    proc = subprocess.Popen(_cli(vq_dir, wd, f"--config.ckpt_every={k}", *const_flags),
                            env=_tiny.subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for(lambda: _finalized(wd, k), proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    latest = Checkpointer(str(wd)).latest_step()
    assert latest is not None and k <= latest < n, latest

    # the rerun, as `varjax train` in this process (its step program comes from the compilation cache)
    capsys.readouterr()
    cli.main(_cli(vq_dir, wd, f"--config.stop_at_step={n}", f"--config.ckpt_every={k}", *const_flags)[3:])
    assert f"resumed from step {latest}" in capsys.readouterr().out
    a, b = reference_losses, _tiny.read_losses(wd)
    assert sorted(b) == list(range(1, n + 1))
    for s in range(1, n + 1):
        assert b[s] == pytest.approx(a[s], abs=1e-6), s


def test_sigterm_saves_and_exits_cleanly(vq_dir, shapes_data, tmp_path):
    from varjax.core.checkpoint import Checkpointer

    wd = tmp_path / "term"
    args = _cli(vq_dir, wd, "--config.ckpt_every=100000", *CONST_FLAGS)
    proc = subprocess.Popen(args, env=_tiny.subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = wd / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preemption signal" in out
    last_logged = max(_tiny.read_losses(wd))
    assert Checkpointer(str(wd)).latest_step() == last_logged
    assert last_logged < CONST["total_steps"]


def test_progressive_stages_follow_the_reference_schedule():
    from varjax.tasks.var import prog_stage, prog_warmup

    kw = dict(pg=0.5, pg0=1, wp_it=10, max_it=100, num_scales=6)
    stages = [prog_stage(s, **kw) for s in range(100)]
    assert stages[0] == stages[10] == 1  # warm-up keeps the first stage
    # between warm-up and pg * max_it the stage grows linearly (rounded) from pg0 to the last scale
    assert stages[30] == 1 + round((30 - 10) / (50 - 10) * 4)
    assert stages[40] == 4 and stages[49] == -1  # reaching the last scale means "all scales" (-1)
    assert stages[50] == -1 and stages[99] == -1
    assert all(a <= b or b == -1 for a, b in zip(stages, stages[1:], strict=False))
    assert prog_stage(7, pg=0.0, pg0=1, wp_it=10, max_it=100, num_scales=6) == -1

    def stage(s):
        return prog_stage(s, **kw)

    assert prog_warmup(5, stage, 4.0) == 1.0  # the first stage is not ramped
    first = stages.index(stages[30])
    assert prog_warmup(first, stage, 4.0) == 0.25 and prog_warmup(first + 3, stage, 4.0) == 1.0
