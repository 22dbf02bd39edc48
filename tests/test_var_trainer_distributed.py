"""VAR trainer across devices and processes: a sharded step equals the unsharded one, batch checks, and a
two-process CPU run reproduces the single-process losses."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from varjax.models.vqvae import VQVAE, VQVAEConfig
from varjax.train import loop, sharding, var_trainer
from varjax.train.config_base import var_run

ROOT = Path(__file__).resolve().parents[1]
VAE_CFG = VQVAEConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, using_sa=False,
                      using_mid_sa=False, patch_nums=(1, 2, 4, 8), num_groups=8)


@pytest.fixture(scope="module")
def vae_params():
    return VQVAE(VAE_CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), method=VQVAE.init_all)["params"]


def tiny_cfg(batch_size=8) -> ml_collections.ConfigDict:
    c = var_run(2)
    c.model.embed_dim, c.model.num_heads, c.model.dtype = 32, 2, "float32"
    c.model.drop_path_rate, c.model.cond_drop_rate = 0.0, 0.0
    c.batch_size = batch_size
    c.total_steps = 10
    c.tblr = 1e-3
    return c


def one_step(cfg, mesh, vae_params, batch):
    setup = loop.Setup(cfg, "/nonexistent", mesh, sharding.normalize_rules(cfg.rules), None, 10, 10, True)
    mcfg = var_trainer.var_config_from(cfg, VAE_CFG, 10)
    task = var_trainer.build_task(setup, VAE_CFG, vae_params, mcfg, jnp.float32)
    state, shardings = sharding.create_sharded_state(task.init_fn, mesh, setup.rules, jax.random.PRNGKey(0))
    step = jax.jit(task.step_fn, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated_sharding(mesh)))
    state, m = step(state, sharding.make_global_batch(batch, mesh))
    return jax.device_get(state["params"]), {k: float(v) for k, v in jax.device_get(m).items()}


def test_sharded_step_matches_single_device(vae_params):
    jax.config.update("jax_threefry_partitionable", True)
    assert jax.device_count() >= 8, "tests/conftest.py provides 8 virtual CPU devices"
    rng = np.random.default_rng(0)
    L = sum(p * p for p in VAE_CFG.patch_nums)
    batch = {"tokens": rng.integers(0, VAE_CFG.vocab_size, (8, L)).astype(np.int32),
             "label": rng.integers(0, 10, (8,)).astype(np.int32)}
    cfg = tiny_cfg()
    one = sharding.create_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=jax.devices()[:1])
    big = sharding.create_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)], devices=jax.devices()[:8])
    p1, m1 = one_step(cfg, one, vae_params, batch)
    p8, m8 = one_step(cfg, big, vae_params, batch)
    assert np.isfinite(m1["loss"])
    for k in ("loss", "grad_norm", "param_norm", "train_acc_mean"):
        assert m8[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-5), k
    chex.assert_trees_all_close(p8, p1, atol=1e-5, rtol=1e-5)


def test_indivisible_batch_raises(tmp_path):
    cfg = tiny_cfg(batch_size=6)
    cfg.mesh = [("data", 2), ("fsdp", 2), ("tensor", 2)]
    with pytest.raises(ValueError, match=r"config\.batch_size"):
        loop.prepare(cfg, str(tmp_path / "w"), 32)


# ---------------------------------------------------------------- two processes


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_two_processes_match_single_process(tmp_path):
    from varjax.ckpt import save_model_dir

    tok = tmp_path / "tok"
    params = VQVAE(VAE_CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), method=VQVAE.init_all)["params"]
    save_model_dir(str(tok), VAE_CFG, params)
    steps = 3
    common = ["--config", str(ROOT / "configs" / "var_shapes.py") + ":runlocal", f"--config.tokenizer_dir={tok}",
              f"--config.total_steps={steps}", "--config.log_every=1", f"--config.ckpt_every={steps}",
              "--config.async_ckpt=False", "--config.model.cond_drop_rate=0.0",
              # two data shards in both runs, so the global batches do not depend on the process count
              "--config.data.num_shards=2"]
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "tfds"), "JAX_PLATFORMS": "cpu"}
    worker = str(ROOT / "tests" / "_two_process_worker.py")

    # the reference: one process with two devices (same global mesh shape: data=2)
    single = tmp_path / "single"
    res = subprocess.run([sys.executable, worker, *common, "--workdir", str(single)], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    port = _free_port()
    multi = tmp_path / "multi"
    env1 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [
        subprocess.Popen([sys.executable, worker, *common, "--workdir", str(multi),
                          f"--config.distributed.coordinator_address=localhost:{port}",
                          "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
                         cwd=ROOT, env=env1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    a, b = _losses(single), _losses(multi)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))  # one metrics line per step: only process 0 writes
    assert all(np.isfinite(v) for v in b.values())
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
