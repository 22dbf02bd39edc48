"""Mesh construction, logical sharding of state, and sharded training equal to one device.

Needs 8 host devices (tests/conftest.py sets XLA_FLAGS before JAX starts).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from varjax.core import mesh as sharding

MESH_222 = [("data", 2), ("fsdp", 2), ("tensor", 2)]


@pytest.fixture(autouse=True)
def _eight_devices():
    assert jax.device_count() >= 8, (
        "these tests need 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    )


def test_mesh_shape_fills_minus_one():
    assert sharding.mesh_shape([("data", -1), ("fsdp", 1), ("tensor", 1)], 8) == {"data": 8, "fsdp": 1,
                                                                                  "tensor": 1}
    assert sharding.mesh_shape([("data", 2), ("fsdp", -1), ("tensor", 2)], 8)["fsdp"] == 2
    mesh = sharding.create_mesh([("data", -1), ("fsdp", 2), ("tensor", 1)])
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert mesh.devices.size == 8


def test_mesh_errors():
    with pytest.raises(ValueError, match="needs 4 devices but 8 are available"):
        sharding.create_mesh([("data", 2), ("fsdp", 2), ("tensor", 1)])
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.mesh_shape([("data", -1), ("fsdp", -1)], 8)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.mesh_shape([("data", -1), ("tensor", 3)], 8)
    with pytest.raises(ValueError, match="list of \\(axis_name, size\\) pairs"):
        sharding.mesh_shape(["data"], 8)


def test_create_mesh_on_a_device_subset():
    mesh = sharding.create_mesh([("data", -1), ("fsdp", 1)], devices=jax.devices()[:2])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1}


class MLP(nn.Module):
    hidden: int = 8
    out: int = 4

    @nn.compact
    def __call__(self, x_BC):
        dense = nn.with_logical_partitioning(nn.initializers.normal(0.5), ("embed", "mlp"))
        h = nn.Dense(self.hidden, kernel_init=dense,
                     bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.1), ("mlp",)))(x_BC)
        h = nn.with_logical_constraint(jnp.tanh(h), ("batch", "mlp"))
        kernel = nn.with_logical_partitioning(nn.initializers.normal(0.5), ("mlp", "embed"))
        return nn.Dense(self.out, kernel_init=kernel)(h)


def _init_fn(model, tx):
    def init(rng):
        params = model.init(rng, jnp.zeros((2, 4)))["params"]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    return init


def test_sharded_init_specs_and_values():
    mesh = sharding.create_mesh(MESH_222)
    model, tx = MLP(), optax.adam(1e-2)
    state, shardings = sharding.create_sharded_state(_init_fn(model, tx), mesh, None, jax.random.key(0))

    params = state["params"]
    assert not any(isinstance(x, nn.Partitioned) for x in
                   jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
    assert params["Dense_0"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert params["Dense_0"]["bias"].sharding.spec == P("tensor")
    assert params["Dense_1"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert params["Dense_1"]["bias"].sharding.spec == P()  # no logical names: replicated
    assert state["opt_state"][0].mu["Dense_0"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert shardings["params"]["Dense_0"]["kernel"].spec == P("fsdp", "tensor")
    # Each device holds a quarter of the kernel (split over fsdp and tensor).
    assert params["Dense_0"]["kernel"].addressable_shards[0].data.shape == (2, 4)

    plain = nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, 4)))["params"])
    chex.assert_trees_all_close(jax.device_get(params), jax.device_get(plain), atol=1e-6)


def test_abstract_sharded_state_matches_created_state():
    mesh = sharding.create_mesh(MESH_222)
    init = _init_fn(MLP(), optax.adam(1e-2))
    abstract = sharding.abstract_sharded_state(init, mesh, None, jax.random.key(0))
    state, _ = sharding.create_sharded_state(init, mesh, None, jax.random.key(0))
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)


def test_rules_from_config_lists():
    rules = sharding.normalize_rules([["batch", ["data", "fsdp"]], ["mlp", None]])
    assert rules == (("batch", ("data", "fsdp")), ("mlp", None))
    mesh = sharding.create_mesh(MESH_222)
    state, _ = sharding.create_sharded_state(_init_fn(MLP(), optax.sgd(0.1)), mesh, rules, jax.random.key(0))
    assert state["params"]["Dense_0"]["kernel"].sharding.spec == P(None, None)
    with pytest.raises(ValueError, match=r"`rules` entries must be \(logical_axis, mesh_axis\) pairs"):
        sharding.normalize_rules(["batch"])


def _train(mesh, steps=3):
    """Linear regression + MLP with Adam on `mesh`; returns (losses, params on host)."""
    model, tx = MLP(), optax.adam(5e-2)
    rules = sharding.RULES
    state, state_sh = sharding.create_sharded_state(_init_fn(model, tx), mesh, rules, jax.random.key(1))
    batch_sh = {"x": sharding.batch_sharding(mesh, 2), "y": sharding.batch_sharding(mesh, 2)}

    def train_step(state, batch):
        def loss_fn(params):
            pred = model.apply({"params": params}, batch["x"])
            return jnp.mean((pred - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

    step_fn = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                      out_shardings=(state_sh, sharding.replicated_sharding(mesh)), donate_argnums=0)
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(4, 4)).astype(np.float32)
    losses = []
    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
        for _ in range(steps):
            x = rng.normal(size=(8, 4)).astype(np.float32)
            batch = sharding.make_global_batch({"x": x, "y": x @ w_true}, mesh)
            state, loss = step_fn(state, batch)
            losses.append(float(loss))
    assert int(state["step"]) == steps
    return losses, jax.device_get(state["params"])


def test_sharded_training_matches_one_device():
    losses_8, params_8 = _train(sharding.create_mesh(MESH_222))
    losses_1, params_1 = _train(sharding.create_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)],
                                                     devices=jax.devices()[:1]))
    np.testing.assert_allclose(losses_8, losses_1, atol=1e-5)
    assert losses_8[-1] < losses_8[0]
    chex.assert_trees_all_close(params_8, params_1, atol=1e-5)


def test_check_batch_divisible():
    mesh = sharding.create_mesh(MESH_222)
    assert sharding.batch_parallelism(mesh) == 4
    assert sharding.check_batch_divisible(12, mesh) == 12
    with pytest.raises(ValueError, match=r"`config.batch_size`=6 .*'data': 2, 'fsdp': 2.*multiple of 4"):
        sharding.check_batch_divisible(6, mesh)
    with pytest.raises(ValueError, match="`config.tok_batch`=2"):
        sharding.check_batch_divisible(2, mesh, field="config.tok_batch")


def test_make_global_batch_shape_and_sharding():
    mesh = sharding.create_mesh(MESH_222)
    local = {"image": np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2), "label": np.arange(8)}
    batch = sharding.make_global_batch(local, mesh)
    assert batch["image"].shape == (8, 3, 2) and batch["label"].shape == (8,)
    assert batch["image"].sharding.spec == P(("data", "fsdp"), None, None)
    assert batch["label"].sharding.spec == P(("data", "fsdp"))
    # Batch shards differ across the 4 batch groups and repeat over the 'tensor' axis.
    assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 3, 2)}
    np.testing.assert_array_equal(np.asarray(batch["label"]), local["label"])


def test_param_count_handles_boxed_and_abstract_trees():
    abstract = jax.eval_shape(MLP().init, jax.random.key(0), jnp.zeros((2, 4)))
    assert sharding.param_count(abstract["params"]) == 4 * 8 + 8 + 8 * 4 + 4


def test_init_distributed_single_process_is_a_noop(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    import ml_collections

    from varjax.core import distributed

    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: called.append(kw))
    distributed.init_distributed(None)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    distributed.init_distributed(None)
    assert called == []
    monkeypatch.setenv("SLURM_NTASKS", "4")
    distributed.init_distributed(None)
    distributed.init_distributed(ml_collections.ConfigDict(
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}))
    assert called == [{}, {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}]
