"""Multi-process start-up: when ``init_distributed`` calls ``jax.distributed.initialize`` (environment detection
with the call recorded, not made), and two processes launched the way ``launch/slurm_gpu.sbatch``'s ``srun``
starts them (SLURM_* and JAX_* variables, no ``--config.distributed``) forming one job that reproduces the
single-process losses, for the VAR trainer and the tokenizer trainer."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from tests import _tiny
from varjax import cli
from varjax.core import distributed as sharding

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS", "SLURM_TASKS_PER_NODE",
               "SLURM_STEP_TASKS_PER_NODE",
               "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
               "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.fixture
def calls(monkeypatch):
    """Clean launch environment; records ``jax.distributed.initialize`` calls instead of making them."""
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    made = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: made.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(sharding, "_tpu_vm_process_count", lambda: 1)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # the gloo switch, irrelevant here
    return made


def _dist(**kw):
    c = ml_collections.ConfigDict()
    c.coordinator_address = ml_collections.FieldReference(None, field_type=str)
    c.num_processes = ml_collections.FieldReference(None, field_type=int)
    c.process_id = ml_collections.FieldReference(None, field_type=int)
    c.update(kw)
    return c


def test_nothing_set_no_call(calls):
    sharding.init_distributed(_dist())
    sharding.init_distributed(None)
    assert calls == []


def test_default_config_is_unset(calls):
    from varjax.configs import common

    sharding.init_distributed(common.base("var").distributed)
    assert calls == []


def test_slurm_one_task_no_call(calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    sharding.init_distributed(_dist())
    assert calls == []


def test_slurm_two_tasks_call(calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    sharding.init_distributed(_dist())
    assert calls == [{}]  # JAX's own SLURM detection supplies the address, count and id


def test_slurm_one_task_per_node_keeps_all_gpus(calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "1(x4)")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "node0:12345")
    sharding.init_distributed(_dist())
    # JAX's SLURM detection would pin one GPU per process (SLURM_LOCALID); it is switched off here
    assert calls == [{"num_processes": 4, "process_id": 3, "cluster_detection_method": "deactivate"}]


def test_jax_env_call(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    sharding.init_distributed(_dist())
    assert calls == [{"num_processes": 2, "process_id": 1}]  # JAX reads JAX_COORDINATOR_ADDRESS itself


def test_jax_env_one_process_no_call(calls, monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    sharding.init_distributed(_dist())
    assert calls == []


@pytest.mark.parametrize("var,value,expect", [("OMPI_COMM_WORLD_SIZE", "4", True), ("OMPI_COMM_WORLD_SIZE", "1", False),
                                              ("TPU_WORKER_HOSTNAMES", "h0,h1", True),
                                              ("TPU_WORKER_HOSTNAMES", "h0", False)])
def test_other_launchers(calls, monkeypatch, var, value, expect):
    monkeypatch.setenv(var, value)
    sharding.init_distributed(_dist())
    assert calls == ([{}] if expect else [])


def test_explicit_config_wins(calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    sharding.init_distributed(_dist(coordinator_address="host:99", num_processes=2, process_id=1))
    assert calls == [{"coordinator_address": "host:99", "num_processes": 2, "process_id": 1}]


def test_explicit_single_process_no_call(calls):
    sharding.init_distributed(_dist(num_processes=1))
    assert calls == []


# ---------------------------------------------------------------- two processes, as srun starts them


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(workdir):
    return _tiny.read_losses(workdir)  # fails when a step is logged twice: more than one process wrote it


def _run_single_and_pair(tmp_path, monkeypatch, capsys, command, args, devices=4):
    """Runs ``varjax COMMAND ARGS`` once in this process (its 2*devices CPU devices) and as two srun-like processes
    of ``devices`` each; returns (single workdir, multi workdir)."""
    assert jax.device_count() == 2 * devices, "tests/conftest.py provides 8 virtual CPU devices"
    for k in LAUNCH_VARS:  # a test run inside a launcher's job is still one process here
        monkeypatch.delenv(k, raising=False)
    single = tmp_path / "single"
    cli.main([command, *args, "--workdir", str(single)])
    assert f"process 0/1, {2 * devices} local devices, {2 * devices} global devices" in capsys.readouterr().out

    env = _tiny.subprocess_env(JAX_PLATFORMS="cpu")
    for k in LAUNCH_VARS:
        env.pop(k, None)
    cmd = [sys.executable, "-m", "varjax", command, *args]
    port, multi = _free_port(), tmp_path / "multi"
    procs = []
    for i in range(2):
        srun = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_PROCID": str(i),
                "SLURM_LOCALID": "0", "SLURM_NODEID": str(i), "SLURM_TASKS_PER_NODE": "1(x2)",
                "SLURM_STEP_NODELIST": "localhost",
                "SLURM_JOB_NODELIST": "localhost", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
                "XLA_FLAGS": _tiny.xla_flags(devices)}
        procs.append(subprocess.Popen([*cmd, "--workdir", str(multi)], cwd=tmp_path, env={**env, **srun},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, out[-4000:]
        assert f"process {i}/2, {devices} local devices, {2 * devices} global devices" in out, out[-2000:]
    return single, multi


def _compare(single, multi, steps):
    a, b = _losses(single), _losses(multi)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert all(np.isfinite(v) for v in b.values())
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step


def test_var_trainer_two_processes_from_srun_environment(vq_dir, shapes_data, tmp_path, monkeypatch, capsys):
    steps = 3
    args = ["--config", str(ROOT / "configs" / "var_shapes.py") + ":runlocal", f"--config.tokenizer_dir={vq_dir}",
            f"--config.total_steps={steps}", "--config.log_every=1", f"--config.ckpt_every={steps}",
            "--config.async_ckpt=False", "--config.model.cond_drop_rate=0.0", "--config.data.num_shards=2"]
    single, multi = _run_single_and_pair(tmp_path, monkeypatch, capsys, "train", args)
    _compare(single, multi, steps)


def test_tokenizer_trainer_two_processes_from_srun_environment(shapes_data, tmp_path, monkeypatch, capsys):
    # the run of tests/test_tok_trainer.py's end-to-end test (its programs come from the compilation cache)
    steps = 2
    args = ["--config", str(ROOT / "configs" / "tokenizer_shapes.py") + ":runlocal", f"--config.total_steps={steps}",
            f"--config.ckpt_every={steps}", "--config.async_ckpt=False", "--config.data.num_shards=2",
            f"--config.eval_every={steps}", f"--config.image_every={steps}"]
    single, multi = _run_single_and_pair(tmp_path, monkeypatch, capsys, "train-tokenizer", args)
    _compare(single, multi, steps)
    a = {r["step"]: r for r in map(json.loads, open(single / "metrics.jsonl"))}
    b = {r["step"]: r for r in map(json.loads, open(multi / "metrics.jsonl"))}
    assert b[steps]["val_psnr"] == pytest.approx(a[steps]["val_psnr"], abs=1e-4)  # eval on global batches
