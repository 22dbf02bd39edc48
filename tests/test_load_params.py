"""``varjax.core.model_dir.load_params``: only the parameter subtree of a training checkpoint is read (not the optimizer
moments beside it), onto host memory, one device, or a mesh other than the one that saved it."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from varjax.core import checkpoint as checkpointing
from varjax.core import mesh as sharding
from varjax.core import model_dir as ckpt


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run")
    mesh = sharding.create_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])
    split = NamedSharding(mesh, PartitionSpec("fsdp", None))
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(8, 6)).astype(np.float32), "b": {"c": np.arange(4, dtype=np.float32)}}
    state = {"params": jax.tree.map(lambda x: jax.device_put(x, split if x.ndim == 2 else None), params),
             "opt_state": {"mu": jax.device_put(np.ones((8, 6), np.float32), split)},
             "step": np.int32(3)}
    with checkpointing.Checkpointer(str(wd), async_save=False) as c:
        c.save(3, state, {"data": {}}, force=True)
    ckpt.write_manifest(wd, {"format": ckpt.FORMAT, "version": 1, "vae": None,
                               "var": {"config": {}, "params": {"checkpoint": "checkpoints", "item": "state",
                                                                "subtree": ["params"]}}})
    return wd, params


def test_only_params_to_host(workdir, monkeypatch):
    wd, params = workdir
    got = ckpt.load_params(wd, "var")
    assert set(got) == {"w", "b"}  # nothing of opt_state / step
    jax.tree.map(np.testing.assert_array_equal, got, params)
    assert isinstance(got["w"], np.ndarray)


def test_onto_one_device_and_another_mesh(workdir):
    wd, params = workdir
    one = ckpt.load_params(wd, "var", sharding=SingleDeviceSharding(jax.devices()[0]))
    assert one["w"].sharding == SingleDeviceSharding(jax.devices()[0])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(one), params)
    mesh = sharding.create_mesh([("data", 1), ("fsdp", 1), ("tensor", 2)], devices=jax.devices()[:2])
    rep = ckpt.load_params(wd, "var", sharding=sharding.replicated_sharding(mesh))
    assert rep["w"].sharding.mesh.shape == mesh.shape
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(rep), params)


def test_missing_entry_is_reported(workdir):
    wd, _ = workdir
    with pytest.raises(ValueError, match="no 'vae' entry"):
        ckpt.load_params(wd, "vae")
