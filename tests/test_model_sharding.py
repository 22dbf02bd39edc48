"""The VAR trainer's state and step on a 2x2x2 CPU mesh: where the parameters live, that the activation
constraints reach the compiled step, and that the sharded step (scan_layers, remat) equals one device."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from varjax.configs import common

from tests import _tiny
from varjax import tasks, train
from varjax.core import mesh as sharding
from varjax.models.vqvae import VQVAE

VAE_CFG = _tiny.vq_cfg()
MESH_222 = [("data", 2), ("fsdp", 2), ("tensor", 2)]


def tiny_cfg(tok, scan_layers=True, remat="dots", mesh=MESH_222):
    c = common.var(2)
    c.tokenizer_dir = tok
    c.model.embed_dim, c.model.num_heads, c.model.dtype = 32, 2, "float32"
    c.model.drop_path_rate, c.model.cond_drop_rate = 0.0, 0.0
    c.model.scan_layers, c.model.remat = scan_layers, remat
    c.batch_size, c.total_steps, c.tblr = 8, 10, 1e-3
    c.mesh = mesh
    return c


def build(cfg, devices):
    """(plan, mesh, state, step, frozen): the state created sharded and the step jitted as the trainer does."""
    plan = _tiny.plan_without_data(cfg, num_devices=len(devices))
    mesh = sharding.create_mesh(plan.mesh, devices=devices)
    task = tasks.var.build(plan, mesh)
    state, shardings = sharding.create_sharded_state(task.init_fn, mesh, plan.rules, jax.random.PRNGKey(0))
    return plan, mesh, state, train.jit_train_step(task.step_fn, shardings, mesh), task.frozen


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    L = sum(p * p for p in VAE_CFG.patch_nums)
    return {"tokens": rng.integers(0, VAE_CFG.vocab_size, (8, L)).astype(np.int32),
            "label": rng.integers(0, _tiny.NUM_CLASSES, (8,)).astype(np.int32)}


@pytest.fixture(scope="module")
def sharded(vq_dir):
    jax.config.update("jax_threefry_partitionable", True)
    return build(tiny_cfg(vq_dir), jax.devices())


def test_params_split_over_fsdp_and_heads_over_tensor(sharded):
    _, _, state, _, _ = sharded
    blocks = state["params"]["blocks"]  # scan_layers: a leading (depth,) axis
    qkv = blocks["attn"]["mat_qkv"]["kernel"]
    assert qkv.shape == (2, 32, 3, 2, 16)
    assert qkv.sharding.spec == P(None, "fsdp", None, "tensor", None)
    # every device holds whole heads of all three of q, k and v
    assert {s.data.shape for s in qkv.addressable_shards} == {(2, 16, 3, 1, 16)}
    ada = blocks["ada_lin"]["kernel"]
    assert ada.shape == (2, 32, 6, 32) and ada.sharding.spec == P(None, "fsdp", None, "tensor")
    assert blocks["ffn"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert state["params"]["head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    mu = state["opt_state"]
    specs = {x.sharding.spec for x in jax.tree.leaves(mu) if getattr(x, "shape", ()) == qkv.shape}
    assert specs == {qkv.sharding.spec}  # Adam moments split like the parameters


def _constraints(text: str) -> list[str]:
    return re.findall(r"sdy\.sharding_constraint[^\n]*|custom_call @Sharding[^\n]*", text)


def test_activation_constraints_reach_the_compiled_step(sharded, batch):
    plan, mesh, state, step, frozen = sharded
    gb = sharding.make_global_batch(batch, mesh)
    outside = _constraints(step.lower(state, gb, frozen).as_text())
    with sharding.mesh_rules(mesh, plan.rules):
        inside = _constraints(step.lower(state, gb, frozen).as_text())
    assert not outside  # without the rules, with_logical_constraint does nothing
    assert len(inside) >= 4
    # the MLP hidden activations (batch, seq, act_mlp) are split over the batch axes and `tensor`
    assert any('{"data", "fsdp"}, {}, {"tensor"}' in c for c in inside), inside


def test_sharded_scan_remat_step_matches_one_device(sharded, vq_dir, batch):
    def run(plan, mesh, state, step, frozen):
        state = jax.tree.map(jnp.copy, state)  # the step donates its state; the fixture's stays usable
        with sharding.mesh_rules(mesh, plan.rules):
            state, m = step(state, sharding.make_global_batch(batch, mesh), frozen)
        return jax.device_get(state["params"]), {k: float(v) for k, v in jax.device_get(m).items()}

    p8, m8 = run(*sharded)
    one = [("data", 1), ("fsdp", 1), ("tensor", 1)]
    p1, m1 = run(*build(tiny_cfg(vq_dir, remat="none", mesh=one), jax.devices()[:1]))  # same (scanned) init
    assert np.isfinite(m1["loss"])
    for k in ("loss", "grad_norm", "param_norm"):
        assert m8[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-5), k
    chex.assert_trees_all_close(p8, p1, atol=1e-5, rtol=1e-5)


def test_tokenizer_and_discriminator_convs_carry_logical_axes():
    from varjax.models.discriminator import NLayerDiscriminator

    mesh = sharding.create_mesh(MESH_222)
    x = jnp.zeros((1, 32, 32, 3))
    vae = jax.eval_shape(lambda: VQVAE(VAE_CFG).init(jax.random.PRNGKey(0), x, method=VQVAE.init_all)["params"])
    sh = sharding.logical_to_mesh_shardings(vae, mesh)
    assert sh["encoder"]["down_0"]["block_0"]["conv1"]["kernel"].spec == P(None, None, None, "tensor")
    assert sh["encoder"]["down_0"]["block_0"]["conv1"]["bias"].spec == P("tensor")
    assert "tensor" not in sh["decoder"]["conv_out"]["kernel"].spec  # 3 RGB channels stay whole
    disc = jax.eval_shape(lambda: NLayerDiscriminator(ndf=8).init(jax.random.PRNGKey(0), x)["params"])
    sh = sharding.logical_to_mesh_shardings(disc, mesh)
    assert sh["conv1"]["kernel"].spec == P(None, None, None, "tensor")
    assert "tensor" not in sh["conv4"]["kernel"].spec  # the 1-channel logits


@pytest.mark.parametrize("name,remat", [("var_d30", "dots"), ("var_d36", "full")])
def test_large_recipes_use_fsdp_and_say_how_to_run_on_fewer_devices(name, remat):
    from varjax import config

    cfg = config.load(name)
    assert tuple(cfg.mesh) == (("data", -1), ("fsdp", 8), ("tensor", 1))
    assert cfg.model.scan_layers and cfg.model.remat == remat
    with pytest.raises(ValueError, match=r"8 devices.*4 available.*--config\.mesh=\"\(\('data', -1\), \('fsdp', 4\)"):
        sharding.create_mesh(cfg.mesh, jax.devices()[:4])
    local = config.load(f"{name}:runlocal")
    assert sharding.mesh_shape(local.mesh, 2) == {"data": 1, "fsdp": 2, "tensor": 1}  # any device count
