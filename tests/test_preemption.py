"""A preemption signal (SIGTERM) that arrives exactly on a checkpoint step: the loop saves that step once,
stops cleanly, and a re-run resumes from it. The signal is sent by the process to itself from the logging
hook of that step, i.e. after the step ran and before its checkpoint is written, so the timing is exact."""

import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from varjax.configs import common

from varjax import config, tasks, train
from varjax.core import checkpoint as checkpointing
from varjax.core import mesh as sharding
from varjax.core import metrics, model_dir
from varjax.data import sources
from varjax.tasks.base import Task


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

    def step_fn(state, batch, frozen):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": p}, batch["x"]) - batch["y"]) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(state["params"])
        upd, opt = tx.update(g, state["opt_state"])
        return {"params": optax.apply_updates(state["params"], upd), "opt_state": opt,
                "step": state["step"] + 1}, {"loss": loss}

    manifest = {"format": model_dir.FORMAT, "version": model_dir.VERSION, "family": "toy"}
    return Task(init_fn=init_fn, step_fn=step_fn, manifest=manifest, on_log=on_log)


def _plan(total):
    """The plan of a toy task: ``train.train`` runs it like any other (data iterator and task stubbed in)."""
    cfg = common.base("toy")
    cfg.batch_size, cfg.total_steps, cfg.log_every, cfg.ckpt_every, cfg.async_ckpt = 8, total, 1, 2, False
    cfg.progress_every_s = 1e9
    return config.Plan(config=ml_collections.FrozenConfigDict(cfg), task="toy", data=None, model=None,
                       tokenizer_dir=None, tokenizer=None, dtype="float32", seed=0, batch_size=8, steps_per_epoch=100,
                       total_steps=total, stop_step=total, warmup_steps=0, peak_lr=0.1, lr_schedule="lin0",
                       mesh=tuple(sharding.mesh_shape(cfg.mesh, jax.device_count()).items()),
                       rules=sharding.normalize_rules(cfg.rules), ema_decay=0.0, process_count=1)


def _run(workdir, total, task, monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "toy", type("Toy", (), {"build": staticmethod(lambda plan, mesh: task)}))
    monkeypatch.setattr(sources, "train_iterator", lambda *a, **k: _Iter())
    return train.train(_plan(total), str(workdir))


@pytest.fixture
def restore_sigterm():
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)
    checkpointing.reset_preemption_flag()


def test_sigterm_on_a_checkpoint_step_saves_it_once(tmp_path, restore_sigterm, monkeypatch, capsys):
    def send_sigterm(step, state, writer):
        if step == 4:  # a checkpoint step (ckpt_every=2)
            os.kill(os.getpid(), signal.SIGTERM)

    _run(tmp_path, 10, _task(send_sigterm), monkeypatch)  # returns normally: exit status 0
    assert "preemption signal: saving step 4 and exiting" in capsys.readouterr().out
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4]

    checkpointing.reset_preemption_flag()
    _run(tmp_path, 6, _task(), monkeypatch)
    assert "resumed from step 4" in capsys.readouterr().out
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 6
    ckpt.close()
