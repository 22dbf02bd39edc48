"""``varjax compile``: the ahead-of-time compiled step is the trainer's step, with memory and FLOP figures."""

import json

import jax
import ml_collections
import numpy as np
import pytest
from varjax.configs import common

from tests import _tiny
from varjax import tasks
from varjax.aot import compile_step, tpu_topology
from varjax.cli import main
from varjax.core import mesh as sharding


def tiny_cfg(tok_dir) -> ml_collections.ConfigDict:
    c = common.var(2)
    c.tokenizer_dir = tok_dir
    c.model.embed_dim, c.model.num_heads, c.model.num_classes, c.model.dtype = 32, 2, 10, "float32"
    c.batch_size = 8
    c.total_steps = 100
    c.mesh = (("data", 4), ("fsdp", 2), ("tensor", 1))
    return c


def test_topology_names():
    assert tpu_topology("v5p-64").name == "v5:2x4x4" and tpu_topology("v5p-64").chip_config == "megacore"
    assert tpu_topology("v4-128").wrap == (True, True, True)
    assert tpu_topology("v5e-256").name == "v5e:16x16" and tpu_topology("v5e-256").wrap == (True, True, False)
    assert tpu_topology("v5:2x2x1").chip_config == "megacore"
    with pytest.raises(ValueError, match="--topology 'v9-3'"):
        tpu_topology("v9-3")


@pytest.fixture(scope="module")
def compiled_tiny(vq_dir):
    cfg = tiny_cfg(vq_dir)
    return cfg, *compile_step(cfg, jax.devices())


def test_compiled_step_is_the_trainers_step(compiled_tiny):
    cfg, compiled, info = compiled_tiny
    assert info["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1} and info["devices"] == 8
    assert (
        info["total_bytes"] == info["argument_bytes"] + info["output_bytes"] - info["alias_bytes"] + info["temp_bytes"]
    )
    assert info["argument_bytes"] > 4 * info["params"] // 8  # at least this device's share of the weights
    assert info["flops_per_device"] > 0

    # The same step as the training loop runs it, on real arrays.
    plan = _tiny.plan_without_data(cfg, num_devices=8)
    assert plan.model.num_classes == 10 and info["model"] == plan.model.to_dict()
    mesh = sharding.create_mesh(plan.mesh)
    task = tasks.var.build(plan, mesh)
    state, _ = sharding.create_sharded_state(task.init_fn, mesh, plan.rules, jax.random.PRNGKey(cfg.seed))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, (8,)).astype(np.int32),
    }
    batch = sharding.make_global_batch(batch, mesh)
    with sharding.mesh_rules(mesh, plan.rules):
        _, want = jax.jit(task.step_fn)(state, batch, task.frozen)
    _, got = compiled(state, batch, task.frozen)  # donates `state`: compute the reference first
    for k in ("loss", "grad_norm", "param_norm"):
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-5, err_msg=k)


def test_cli_prints_memory_and_flops(compiled_tiny, tmp_path, capsys, monkeypatch):
    import varjax.aot

    seen = {}

    def fake_compile(cfg, devices, resolution):  # the compile itself is the fixture's
        seen.update(batch_size=cfg.batch_size, devices=len(devices), resolution=resolution)
        return compiled_tiny[1], dict(compiled_tiny[2])

    monkeypatch.setattr(varjax.aot, "compile_step", fake_compile)
    out = tmp_path / "c.json"
    cfg_file = tmp_path / "tiny.py"
    cfg_file.write_text(
        "from varjax.configs import common\n"
        "def get_config():\n"
        "    c = common.var(2)\n"
        "    c.batch_size = 8\n"
        "    return c\n"
    )
    main(["compile", "--config", str(cfg_file), "--topology", "local", "--json", str(out), "--config.batch_size=16"])
    assert seen == {"batch_size": 16, "devices": 8, "resolution": 256}
    text = capsys.readouterr().out
    assert "[compile] per device: total" in text and "FLOPs per step (XLA)" in text and "fits: unknown" in text
    assert "model FLOPs per step" in text
    info = json.loads(out.read_text())
    assert info["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1} and info["topology"] == "local"
    with pytest.raises(SystemExit) as e:
        main(["compile", "--config", str(cfg_file)])
    assert e.value.code == 2 and "--topology" in capsys.readouterr().err
