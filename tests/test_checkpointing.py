"""Orbax checkpoints: round trip, retention, re-sharding on restore, partial saves, preemption flag."""

import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from varjax.core import checkpoint as checkpointing
from varjax.core import mesh as sharding


def _state(mesh=None):
    """Small train-state-like tree; sharded over `mesh` when given."""
    state = {
        "params": {"w": jnp.arange(32, dtype=jnp.float32).reshape(8, 4) / 7,
                   "b": jnp.arange(4, dtype=jnp.bfloat16)},
        "step": jnp.asarray(5, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(3)),
    }
    if mesh is not None:
        specs = {"params": {"w": P("data", "tensor"), "b": P()}, "step": P(), "rng": P()}
        state = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state, specs)
    return state


def _abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def test_round_trip_with_json(tmp_path):
    state = _state()
    extra = {"data": {"epoch": 2, "position": 17}, "seed": 0, "note": "hi"}
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(10, state, extra)
        ckpt.wait()
        assert ckpt.latest_step() == 10
        replicated = NamedSharding(sharding.create_mesh([("data", 1)], jax.devices()[:1]), P())
        restored, meta = ckpt.restore(None, _abstract(state, jax.tree.map(lambda _: replicated, state)))
    assert meta == extra
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    assert restored["params"]["b"].dtype == jnp.bfloat16 and restored["step"].dtype == jnp.int32


def test_keeps_last_k_and_save_interval(tmp_path):
    state = _state()
    with checkpointing.Checkpointer(str(tmp_path), save_interval_steps=2, max_to_keep=2) as ckpt:
        saved = [ckpt.save(s, state, {"s": s}) for s in range(1, 9)]
        assert saved == [False, True] * 4
        assert ckpt.save(9, state, {}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [8, 9]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["8", "9"]


def test_restore_onto_a_different_mesh(tmp_path):
    mesh_222 = sharding.create_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    state = _state(mesh_222)
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(3, state, {})
    mesh_42 = sharding.create_mesh([("data", 4), ("tensor", 2)])
    target = {"params": {"w": NamedSharding(mesh_42, P("tensor", "data")), "b": NamedSharding(mesh_42, P())},
              "step": NamedSharding(mesh_42, P()), "rng": NamedSharding(mesh_42, P())}
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        restored, _ = ckpt.restore(3, _abstract(state, target))
    assert restored["params"]["w"].sharding == target["params"]["w"]
    assert restored["params"]["w"].addressable_shards[0].data.shape == (4, 1)
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))

    one = NamedSharding(sharding.create_mesh([("data", 1)], jax.devices()[:1]), P())
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        restored, _ = ckpt.restore(3, _abstract(state, jax.tree.map(lambda _: one, state)))
    assert restored["params"]["w"].sharding.device_set == {jax.devices()[0]}
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))


def test_unfinished_checkpoint_is_not_latest(tmp_path):
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(4, _state(), {"ok": True})
    # What a run killed mid-save leaves behind: a temporary step directory that was never renamed.
    partial = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_text("partial")
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 4
        assert ckpt.all_steps() == [4]
        _, meta = ckpt.restore(None, jax.eval_shape(_state))
    assert meta == {"ok": True}


def test_async_save_is_complete_after_wait(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=True)
    state = {"big": jnp.ones((256, 256), jnp.float32)}
    assert ckpt.save(1, state, {"k": 1})
    ckpt.wait()
    assert os.path.isdir(tmp_path / "checkpoints" / "1" / "state")
    # A fresh manager (as after a restart) sees the finished step.
    other = checkpointing.Checkpointer(str(tmp_path))
    assert other.latest_step() == 1
    restored, _ = other.restore(1, jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(np.asarray(restored["big"]), 1.0)
    other.close()
    ckpt.close()


def test_params_dir_round_trip(tmp_path):
    params = {"blocks": {"0": {"kernel": np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)}},
              "emb": np.arange(6, dtype=np.int32).reshape(2, 3)}
    path = str(tmp_path / "params")
    checkpointing.save_params_dir(path, params)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpointing.save_params_dir(path, params)
    host = checkpointing.load_params_dir(path)
    assert isinstance(host["blocks"]["0"]["kernel"], np.ndarray)
    assert host["emb"].dtype == np.int32
    chex.assert_trees_all_equal(host, params)

    mesh = sharding.create_mesh([("data", 2)], jax.devices()[:2])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), params)
    on_device = checkpointing.load_params_dir(path, abstract)
    assert on_device["emb"].sharding == NamedSharding(mesh, P())
    chex.assert_trees_all_equal(jax.device_get(on_device), params)
    with pytest.raises(FileNotFoundError):
        checkpointing.load_params_dir(str(tmp_path / "missing"))


def test_sigterm_sets_preemption_flag(tmp_path):
    old = signal.getsignal(signal.SIGTERM)
    try:
        checkpointing.reset_preemption_flag()
        is_preempted = checkpointing.install_preemption_handler()
        with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
            # one process: no multi-host sync point, the loop reads the flag
            assert not is_preempted() and not ckpt.reached_preemption(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert is_preempted()
    finally:
        signal.signal(signal.SIGTERM, old)
        checkpointing.reset_preemption_flag()
    assert not is_preempted()
