"""A preemption signal (SIGTERM) that arrives exactly on a checkpoint step: the loop saves that step once,
stops cleanly, and a re-run resumes from it. The signal is sent by the process to itself from the logging
hook of that step, i.e. after the step ran and before its checkpoint is written, so the timing is exact."""

import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from varjax.train import checkpointing, config_base, loop, metrics, sharding


class _Iter:
    """Deterministic batches of a toy regression, with a resumable position."""

    steps_per_epoch = 100

    def __init__(self):
        self.i = 0

    def __next__(self):
        rng = np.random.default_rng(self.i)
        self.i += 1
        x = rng.normal(size=(8, 4)).astype(np.float32)
        return {"x": x, "y": x.sum(-1, keepdims=True)}

    def state(self):
        return {"i": self.i}

    def restore(self, s):
        self.i = int(s["i"])


def _task(on_log=None):
    model = nn.Dense(1)
    tx = optax.sgd(0.1)

    def init_fn(rng):
        params = model.init(rng, jnp.zeros((1, 4)))["params"]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    def step_fn(state, batch):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": p}, batch["x"]) - batch["y"]) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(state["params"])
        upd, opt = tx.update(g, state["opt_state"])
        return {"params": optax.apply_updates(state["params"], upd), "opt_state": opt,
                "step": state["step"] + 1}, {"loss": loss}

    return loop.Task(init_fn=init_fn, step_fn=step_fn, on_log=on_log)


def _setup(workdir, total):
    cfg = config_base.base_run()
    cfg.batch_size, cfg.total_steps, cfg.log_every, cfg.ckpt_every, cfg.async_ckpt = 8, total, 1, 2, False
    mesh = sharding.create_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=jax.devices()[:1])
    return loop.Setup(cfg, str(workdir), mesh, sharding.normalize_rules(cfg.rules), _Iter(), total, 100, True)


@pytest.fixture
def restore_sigterm():
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)
    checkpointing.reset_preemption_flag()


def test_sigterm_on_a_checkpoint_step_saves_it_once(tmp_path, restore_sigterm):
    def send_sigterm(step, state, writer):
        if step == 4:  # a checkpoint step (ckpt_every=2)
            os.kill(os.getpid(), signal.SIGTERM)

    loop.train_and_evaluate(_setup(tmp_path, 10), _task(send_sigterm))  # returns normally: exit status 0
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4]

    checkpointing.reset_preemption_flag()
    loop.train_and_evaluate(_setup(tmp_path, 6), _task())
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 6
    ckpt.close()
