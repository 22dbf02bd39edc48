"""The training skeleton shared by the VAR trainer and the tokenizer trainer.

A trainer supplies a :class:`Task` (how to build the sharded state, the jitted-able step, evaluation and
export); this module does everything else the same way for both: mesh, data, resume from the latest Orbax
checkpoint (state, data-iterator position and RNG live in the checkpoint), preemption saves, non-finite loss
stops, metrics (``metrics.jsonl`` + TensorBoard) and a progress line.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from varjax import paths
from varjax.data import pipeline
from varjax.train import checkpointing, config_utils, metrics, sharding
from varjax.xla_flags import conv_compiler_options


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class Task:
    """What differs between trainers.

    init_fn(rng) -> boxed state pytree (parameters carry logical axis names), used under ``jax.eval_shape``
    and ``jax.jit``. step_fn(state, batch) -> (state, metrics dict of scalars); it is jitted here with explicit
    shardings and donation. ``step_for(step)`` may return a different step function per training step (e.g.
    progressive training stages); by default ``step_fn`` is used. eval_fn(state) -> dict of floats.
    """

    init_fn: Callable[[jax.Array], Any]
    step_fn: Callable[[Any, dict], tuple[Any, dict]]
    eval_fn: Callable[[Any], dict] | None = None
    step_variant: Callable[[int], Any] | None = None  # hashable key per step; step_fn_for(key) builds the fn
    step_fn_for: Callable[[Any], Callable] | None = None
    on_log: Callable[[int, Any, metrics.MetricsWriter], None] | None = None
    model_json: dict | None = None  # varjax_model.json written into the workdir
    conv_bound: bool = False  # the step's time is convolutions: compiled with varjax.xla_flags' CPU kernels


@dataclasses.dataclass
class Setup:
    """Everything a trainer needs to build its task."""

    cfg: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    rules: Any
    train_iter: pipeline.DataIterator
    total_steps: int
    steps_per_epoch: int
    is_primary: bool


def prepare(cfg: ml_collections.ConfigDict, workdir: str, image_size: int, name: str = "train") -> Setup:
    """Distributed init, mesh, config dump and the training data iterator.

    Prints ``[name] process I/N, X local devices, Y global devices`` first. ``workdir`` may be a URL
    (``gs://...``); ``Setup.workdir`` is it as given for URLs, else absolute.
    """
    jax.config.update("jax_threefry_partitionable", True)  # random numbers independent of the mesh
    sharding.init_distributed(cfg.get("distributed"))
    print(f"[{name}] {sharding.describe_processes()}", flush=True)
    config_utils.print_config(cfg)
    workdir = str(paths.resolve(workdir))
    mesh = sharding.create_mesh(cfg.mesh)
    rules = sharding.normalize_rules(cfg.get("rules"))
    sharding.check_batch_divisible(cfg.batch_size, mesh, field="config.batch_size")
    if cfg.batch_size % jax.process_count():
        raise ValueError(
            f"config.batch_size={cfg.batch_size} must be divisible by the number of processes "
            f"({jax.process_count()}): each process feeds an equal slice of every global batch."
        )
    is_primary = jax.process_index() == 0
    if is_primary:
        paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
    config_utils.save_config(cfg, workdir, is_primary=is_primary)
    train_iter = pipeline.build_train_iter(
        cfg.data,
        image_size=image_size,
        global_batch_size=cfg.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=cfg.seed,
    )
    spe = train_iter.steps_per_epoch
    total = config_utils.steps_from(cfg, "total", steps_per_epoch=spe, examples_per_step=cfg.batch_size)
    return Setup(cfg, workdir, mesh, rules, train_iter, int(total), spe, is_primary)


def _abstract_with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def train_and_evaluate(setup: Setup, task: Task) -> dict:
    """Runs (or resumes) training to ``setup.total_steps``; returns the last logged metrics."""
    cfg, mesh = setup.cfg, setup.mesh
    rng = jax.random.PRNGKey(cfg.seed)
    abstract = sharding.abstract_sharded_state(task.init_fn, mesh, setup.rules, rng)
    state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    ckpt = checkpointing.Checkpointer(
        setup.workdir,
        save_interval_steps=cfg.ckpt_every,
        max_to_keep=cfg.get("keep_ckpts", 3),
        async_save=cfg.get("async_ckpt", True),
    )
    writer = metrics.MetricsWriter(setup.workdir, is_primary=setup.is_primary)
    start = ckpt.latest_step()
    if start is not None:
        state, extra = ckpt.restore(start, abstract)
        setup.train_iter.restore(extra["data"])
        writer.truncate_after(start)
        print(f"[train] resumed from step {start} in {setup.workdir}", flush=True)
    else:
        state, _ = sharding.create_sharded_state(task.init_fn, mesh, setup.rules, rng)
        start = 0
        n = sharding.param_count(state["params"])
        print(f"[train] fresh run: {n:,} trainable params, {setup.total_steps} steps", flush=True)
    if setup.is_primary and task.model_json is not None:
        from varjax.ckpt import write_model_json

        write_model_json(setup.workdir, task.model_json)

    batch_shard = sharding.batch_sharding(mesh)
    replicated = sharding.replicated_sharding(mesh)
    compiled: dict[Any, Callable] = {}

    def step_fn(step: int) -> Callable:
        key = task.step_variant(step) if task.step_variant else None
        if key not in compiled:
            fn = task.step_fn_for(key) if task.step_variant else task.step_fn
            compiled[key] = jax.jit(
                fn,
                in_shardings=(state_shardings, batch_shard),
                out_shardings=(state_shardings, replicated),
                donate_argnums=0,
                compiler_options=conv_compiler_options() if task.conv_bound else None,
            )
        return compiled[key]

    is_preempted = checkpointing.install_preemption_handler()
    progress = metrics.Progress(
        setup.total_steps, start, every_s=cfg.get("progress_every_s", 10.0), batch_size=cfg.batch_size
    )
    last: dict = {}
    t_log, n_log = time.time(), 0

    saved_step = start  # the step of the newest checkpoint started here (or restored)

    def save(step: int, force: bool) -> None:
        nonlocal saved_step
        if step == saved_step:  # e.g. a preemption notice on a checkpoint step: that step is already saved
            return
        if ckpt.save(step, state, {"data": setup.train_iter.state(), "step": step}, force=force):
            saved_step = step

    step = start
    while step < setup.total_steps:
        local = next(setup.train_iter)
        batch = sharding.make_global_batch(local, mesh)
        with sharding.mesh_rules(mesh, setup.rules):  # traced here: activation constraints need the rules
            state, m = step_fn(step)(state, batch)
        step += 1
        n_log += 1
        on_ckpt = step % cfg.ckpt_every == 0 or step == setup.total_steps
        if step % cfg.log_every == 0 or on_ckpt or step == start + 1:
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not math.isfinite(m["loss"]):
                ckpt.wait()
                raise NonFiniteLossError(
                    f"non-finite loss ({m['loss']}) at step {step}; stopping without saving. The last good "
                    f"checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is intact; lower "
                    "the learning rate (config.opt / config.tblr) or check the data, then re-run to resume."
                )
            dt = time.time() - t_log
            m["img_per_s"] = n_log * cfg.batch_size / max(dt, 1e-9)
            m["step_time_s"] = dt / max(n_log, 1)
            if cfg.get("eval_every") and task.eval_fn and (step % cfg.eval_every == 0 or step == setup.total_steps):
                with sharding.mesh_rules(mesh, setup.rules):
                    m.update(task.eval_fn(state))
            writer.write(step, m)
            if task.on_log is not None:
                task.on_log(step, state, writer)
            last = m
            t_log, n_log = time.time(), 0
        progress.update(step, last)
        if on_ckpt:
            save(step, force=step == setup.total_steps)
        if is_preempted() or ckpt.reached_preemption(step):
            print(f"[train] preemption signal: saving step {step} and exiting", flush=True)
            save(step, force=True)
            break
    ckpt.close()
    writer.close()
    return last


def host_metrics(m: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in m.items()}
