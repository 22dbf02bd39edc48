"""VAR trainer across devices: a sharded step equals the unsharded one, and batch checks. (Two processes started
as a launcher starts them reproduce the single-process losses: tests/test_distributed_launch.py.)"""

from pathlib import Path

import chex
import jax
import ml_collections
import numpy as np
import pytest
from varjax.configs import common

from tests import _tiny
from varjax import config, tasks, train
from varjax.core import mesh as sharding

ROOT = Path(__file__).resolve().parents[1]
VAE_CFG = _tiny.vq_cfg()


def tiny_cfg(tok, batch_size=8) -> ml_collections.ConfigDict:
    c = common.var(2)
    c.tokenizer_dir = tok
    c.model.embed_dim, c.model.num_heads, c.model.dtype = 32, 2, "float32"
    c.model.drop_path_rate, c.model.cond_drop_rate = 0.0, 0.0
    c.batch_size = batch_size
    c.total_steps = 10
    c.tblr = 1e-3
    return c


def one_step(cfg, devices, batch):
    plan = _tiny.plan_without_data(cfg, num_devices=len(devices))
    mesh = sharding.create_mesh(plan.mesh, devices=devices)
    task = tasks.var.build(plan, mesh)
    state, shardings = sharding.create_sharded_state(task.init_fn, mesh, plan.rules, jax.random.PRNGKey(0))
    step = train.jit_train_step(task.step_fn, shardings, mesh)
    with sharding.mesh_rules(mesh, plan.rules):
        state, m = step(state, sharding.make_global_batch(batch, mesh), task.frozen)
    return jax.device_get(state["params"]), {k: float(v) for k, v in jax.device_get(m).items()}


def test_sharded_step_matches_single_device(vq_dir):
    jax.config.update("jax_threefry_partitionable", True)
    assert jax.device_count() >= 8, "tests/conftest.py provides 8 virtual CPU devices"
    rng = np.random.default_rng(0)
    L = sum(p * p for p in VAE_CFG.patch_nums)
    batch = {"tokens": rng.integers(0, VAE_CFG.vocab_size, (8, L)).astype(np.int32),
             "label": rng.integers(0, _tiny.NUM_CLASSES, (8,)).astype(np.int32)}
    one = tiny_cfg(vq_dir)
    one.mesh = [("data", 1), ("fsdp", 1), ("tensor", 1)]
    big = tiny_cfg(vq_dir)
    big.mesh = [("data", 2), ("fsdp", 2), ("tensor", 2)]
    p1, m1 = one_step(one, jax.devices()[:1], batch)
    p8, m8 = one_step(big, jax.devices()[:8], batch)
    assert np.isfinite(m1["loss"])
    for k in ("loss", "grad_norm", "param_norm", "train_acc_mean"):
        assert m8[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-5), k
    chex.assert_trees_all_close(p8, p1, atol=1e-5, rtol=1e-5)


def test_indivisible_batch_raises(vq_dir, tokens_cache):
    cfg = tiny_cfg(vq_dir, batch_size=6)
    cfg.data.tokens_cache = tokens_cache
    cfg.mesh = [("data", 2), ("fsdp", 2), ("tensor", 2)]
    with pytest.raises(ValueError, match=r"config\.batch_size"):
        config.resolve(cfg)
