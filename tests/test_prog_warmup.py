"""Progressive-training loss ramp: the O(log)-per-step bookkeeping gives the same weights as a rescan from step 0,
and the VAR task hands them to its step (``Task.batch_extras``) as a function of the step alone, so a resumed run
gets the weights of an uninterrupted one."""

import functools

import numpy as np
import pytest

from tests import _tiny
from varjax.tasks.var import prog_stage, prog_warmup, stage_start


def rescan_warmup(step, stage_fn, pgwp_it):
    """The weight computed by walking from step 0 to the first step of the current stage."""
    si = stage_fn(step)
    first = 0
    while first < step and stage_fn(first) != si:
        first += 1
    if stage_fn(0) == si:
        return 1.0
    return max(min((step - first + 1) / max(pgwp_it, 1e-9), 1.0), 0.01)


SCHEDULES = [
    dict(pg=0.5, pg0=1, wp_it=10, max_it=100, num_scales=6),
    dict(pg=0.8, pg0=4, wp_it=3.5, max_it=250, num_scales=10),
    dict(pg=0.3, pg0=0, wp_it=0, max_it=60, num_scales=4),
]


@pytest.mark.parametrize("kw", SCHEDULES)
@pytest.mark.parametrize("pgwp_it", [1.0, 4.0, 13.5])
def test_warmup_equals_rescan(kw, pgwp_it):
    stage = functools.partial(prog_stage, **kw)
    steps = range(kw["max_it"] + 5)
    want = [rescan_warmup(s, stage, pgwp_it) for s in steps]
    assert [prog_warmup(s, stage, pgwp_it) for s in steps] == want
    assert pgwp_it <= 1 or len(set(want)) > 2  # the schedule really ramps


@pytest.mark.parametrize("kw", SCHEDULES)
def test_stage_start(kw):
    stage = functools.partial(prog_stage, **kw)
    for s in range(kw["max_it"] + 5):
        first = stage_start(s, stage)
        assert stage(first) == stage(s) and (first == 0 or stage(first - 1) != stage(s))


@pytest.mark.parametrize("pgwp", [0.0, 0.5])
def test_var_task_hands_the_weights_to_its_step(vq_dir, tokens_cache, pgwp):
    """``batch_extras`` of the VAR task: the reference's stages over the run's own warm-up and length, the ramp
    ``pgwp`` epochs long (0: total_steps / 300), the same value for a step whatever came before."""
    cfg = _tiny.var_config(vq_dir, tokens_cache, pg=0.6, pg0=1, pgwp=pgwp, total_steps=600,
                           opt__warmup_fraction=0.05)
    plan, _, task = _tiny.build(cfg, _tiny_devices())
    assert plan.steps_per_epoch == 8 and plan.warmup_steps == 30  # 64 cached examples, batch 8
    stage = functools.partial(prog_stage, pg=0.6, pg0=1, wp_it=30, max_it=600, num_scales=4)
    pgwp_it = pgwp * 8 if pgwp else 600 / 300
    steps = list(range(600))
    batch = {"label": np.zeros((8,), np.int32), "tokens": np.zeros((8, 85), np.int32)}
    got = {s: task.batch_extras(s, batch) for s in reversed(steps)}  # any order: a resumed run starts anywhere
    assert all(g["tokens"] is batch["tokens"] and g["prog_wp"].shape == (8,) for g in got.values())
    want = [rescan_warmup(s, stage, pgwp_it) for s in steps]
    assert [float(got[s]["prog_wp"][0]) for s in steps] == pytest.approx(want)
    assert min(want) < 1.0  # a ramp happens
    # the compiled step follows the stage (one program per stage)
    assert [task.step_variant(s) for s in (0, 30, 599)] == [stage(0), stage(30), stage(599)] == [1, 1, -1]


def test_without_progressive_training_the_task_adds_nothing(vq_dir, tokens_cache):
    _, _, task = _tiny.build(_tiny.var_config(vq_dir, tokens_cache, pg=0.0), _tiny_devices())
    assert task.batch_extras is None and task.step_variant is None


def _tiny_devices():
    import jax

    return jax.devices()[:1]
