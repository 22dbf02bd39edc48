"""The one training loop: ``train(plan, workdir)`` runs (or resumes) any task of ``varjax.tasks``.

What the loop does the same way for every task: the mesh; the state created already sharded (or restored onto
the current mesh from the newest finished Orbax checkpoint, data-iterator position and RNG included, after
checking that its shapes fit this config); ``config.init_from`` weights; the EMA of ``state["params"]``
(``config.ema_decay``); one compiled step with explicit shardings, the state donated and the task's frozen
arrays (a tokenizer) passed in replicated; evaluation; ``metrics.jsonl`` and TensorBoard on process 0 with
throughput (``img_per_s``, ``tokens_per_s``, ``tflops_per_device``, ``mfu``); a progress line; a
``jax.profiler`` trace of ``config.profile_steps``; saves on SIGTERM / preemption; a non-finite loss or a
failed checkpoint write ends the run in one paragraph with the last good checkpoint intact.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from varjax import config, losses, tasks
from varjax.core import checkpoint, compile_cache, devices, distributed, metrics, model_dir, paths
from varjax.core import mesh as mesh_lib
from varjax.core.errors import NonFiniteLossError, StorageError
from varjax.core.xla_flags import conv_compiler_options
from varjax.data import sources
from varjax.models import families

# Fields a run may change and still resume: they change how long it runs and what it reports, not its state.
SAFE_TO_CHANGE = (
    "total_steps", "total_epochs", "total_examples", "stop_at_step", "log_every", "ckpt_every", "keep_ckpts",
    "async_ckpt", "eval_every", "progress_every_s", "image_every", "image_count", "profile_steps",
    "profile_all_processes", "peak_tflops", "compile_cache", "tokenizer_dir", "data.tokens_cache", "latents_cache",
    "data.data_dir", "data.manual_dir", "data.folder", "init_from", "distributed.coordinator_address",
    "distributed.num_processes", "distributed.process_id",
)


# Fields a run may not change on resume although the state's shapes stay: the compute dtype changes every step's
# numbers, so the resumed run would not be the one it continues.
REFUSED_CHANGES = ("model.dtype",)


def with_ema(init_fn: Callable, step_fn: Callable, decay: float) -> tuple[Callable, Callable]:
    """The task's init and step with ``state["ema_params"]``, an EMA of ``state["params"]`` (unchanged for 0)."""
    if decay <= 0:
        return init_fn, step_fn

    def init(rng):
        state = init_fn(rng)
        return {**state, "ema_params": jax.tree.map(jnp.copy, state["params"])}  # keeps the logical-axis boxes

    def step(state, batch, frozen):
        new, m = step_fn(state, batch, frozen)
        return {**new, "ema_params": losses.ema_update(state["ema_params"], new["params"], decay)}, m

    return init, step


def jit_train_step(step_fn: Callable, state_shardings: Any, mesh, conv_bound: bool = False):
    """``step_fn(state, batch, frozen)`` jitted as training runs it and ``varjax compile`` compiles it: the state
    with its shardings (donated), the batch split over the batch axes, the frozen arrays and metrics replicated."""
    replicated = mesh_lib.replicated_sharding(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
        compiler_options=conv_compiler_options() if conv_bound else None,
    )


def check_resume(ckpt: checkpoint.Checkpointer, step: int, abstract: Any, workdir: str, cfg) -> None:
    """Stops before restoring when the checkpoint's arrays do not have the shapes and dtypes this config gives, or
    the compute dtype changed, naming the config fields that changed; notes the changes a run can resume with.

    Raises:
      ValueError: the state or the compute dtype differs (nothing has been read or written).
    """
    saved = config.load_saved(workdir)
    diffs = config.differences(saved, cfg) if saved else []
    for field, old, new in diffs:
        if field in REFUSED_CHANGES:
            raise ValueError(
                f"{workdir} holds a run (step {step}) trained with config.{field}={old!r}; this config gives {new!r}. "
                f"A resumed run computes in the dtype it was trained in, or it is not the run it continues: pass "
                f"--config.{field}={old} to resume, or start a new --workdir from these weights with "
                f"--config.init_from={workdir}. Nothing was restored and its checkpoints are unchanged."
            )
    have, want = ckpt.saved_shapes(step), checkpoint.tree_shapes(abstract)
    if have == want:
        have, want = ckpt.saved_dtypes(step), checkpoint.tree_dtypes(abstract)
    if have != want:
        changed = [d for d in diffs if d[0] not in SAFE_TO_CHANGE] or diffs
        fields = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed) or "no config field differs"
        arrays = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        example = ", ".join(f"{k} {have.get(k)} -> {want.get(k)}" for k in arrays[:3])
        raise ValueError(
            f"{workdir} holds a run (step {step}) whose state has other shapes or dtypes than this config gives: "
            f"{fields} (arrays such as {example}). Nothing was restored and its checkpoints are unchanged. Either "
            f"train in a new --workdir, or start a new workdir from those weights with --config.init_from={workdir}."
        )
    if diffs:
        notes = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diffs)
        print(f"[train] resuming with changed settings: {notes}", flush=True)


def _init_from(state: dict, src: str, key: str, family: str, model_cfg, shardings: dict) -> dict:
    """``state`` with ``params`` (and ``ema_params``) replaced by the weights of model directory ``src``."""
    loaded = model_dir.load_params(src, key)
    loaded = families.get(family).fit_params(loaded, model_cfg) if key != model_dir.TOKENIZER_KEY else loaded
    have, want = checkpoint.tree_shapes(loaded), checkpoint.tree_shapes(state["params"])
    if have != want:
        bad = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))[:5]
        raise ValueError(
            f"config.init_from={src!r}: its '{key}' weights do not fit the model this config builds (arrays "
            f"{', '.join(f'{k} {have.get(k)} -> {want.get(k)}' for k in bad)}). Use weights of the same architecture."
        )
    params = jax.device_put(loaded, shardings["params"])
    print(f"[train] weights from {src} ('{key}')", flush=True)
    out = {**state, "params": params}
    if "ema_params" in state:
        out["ema_params"] = jax.device_put(loaded, shardings["ema_params"])
    return out


def _throughput(n_steps: int, seconds: float, batch: int, task, flops_per_step: float | None, peak: float | None,
                num_devices: int) -> dict:
    out = {"img_per_s": n_steps * batch / max(seconds, 1e-9), "step_time_s": seconds / max(n_steps, 1)}
    if task.tokens_per_example:
        out["tokens_per_s"] = out["img_per_s"] * task.tokens_per_example
    if flops_per_step:
        per_device = flops_per_step / out["step_time_s"] / num_devices
        out["tflops_per_device"] = per_device / 1e12
        if peak:
            out["mfu"] = per_device / peak
    return out


class _Profiler:
    """A ``jax.profiler`` trace of steps [first, last] (numbered as in metrics.jsonl) under WORKDIR/profile."""

    def __init__(self, steps: tuple, workdir: str, active: bool):
        self.first, self.last = (tuple(steps) or (None, None))
        self.dir = str(paths.resolve(workdir) / "profile")
        self.active = active and self.first is not None
        self.on = False

    def before(self, step: int) -> None:  # ``step`` is about to run
        if self.active and not self.on and self.first <= step <= self.last:
            jax.profiler.start_trace(self.dir)
            self.on = True

    def after(self, step: int, state) -> None:  # ``step`` has run
        if self.on and step >= self.last:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.on, self.active = False, False
            print(f"[train] profile of steps {self.first}-{self.last} written to {self.dir}", flush=True)

    def close(self) -> None:
        if self.on:
            jax.profiler.stop_trace()
            self.on = False


def train(plan: config.Plan, workdir: str) -> dict:
    """Runs (or resumes) ``plan`` in ``workdir`` (a local path or a URL); returns the last logged metrics."""
    cfg = plan.config
    compile_cache.enable(cfg.compile_cache)
    jax.config.update("jax_threefry_partitionable", True)  # random numbers independent of the mesh
    name = "train-tokenizer" if plan.task == "tokenizer" else "train"
    t_start = time.time()
    workdir = str(paths.resolve(workdir))
    is_primary = jax.process_index() == 0
    print(f"[{name}] {distributed.describe_processes()}", flush=True)
    if is_primary:
        defaults = getattr(tasks.get(plan.task), "defaults", None)
        print(f"[{name}] " + config.format_changes(cfg, defaults(cfg) if defaults else {}, workdir), flush=True)
    mesh = mesh_lib.create_mesh(plan.mesh)
    task = tasks.get(plan.task).build(plan, mesh)
    init_fn, step_fn = with_ema(task.init_fn, task.step_fn, plan.ema_decay)
    rng = jax.random.PRNGKey(plan.seed)
    abstract = mesh_lib.abstract_sharded_state(init_fn, mesh, plan.rules, rng)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    ckpt = checkpoint.Checkpointer(workdir, save_interval_steps=cfg.ckpt_every, max_to_keep=cfg.keep_ckpts,
                                   async_save=cfg.async_ckpt)
    writer = None
    profiler = _Profiler(cfg.profile_steps, workdir, is_primary or cfg.profile_all_processes)
    try:
        train_iter = sources.train_iterator(plan.data, global_batch_size=plan.batch_size,
                                            process_index=jax.process_index(), process_count=jax.process_count(),
                                            seed=plan.seed)
        if train_iter.steps_per_epoch != plan.steps_per_epoch:
            raise RuntimeError(f"the data iterator has {train_iter.steps_per_epoch} steps per epoch, the plan "
                               f"{plan.steps_per_epoch}")
        start = ckpt.latest_step()
        if start is not None:
            check_resume(ckpt, start, abstract, workdir, cfg)
        if is_primary:
            paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
            config.save(cfg, workdir)
        writer = metrics.MetricsWriter(workdir, is_primary=is_primary)
        stop = f", stopping after step {plan.stop_step}" if plan.stop_step < plan.total_steps else ""
        resumed = start is not None
        idle = resumed and start >= plan.stop_step  # nothing to train: the state is not read back (no step needs it)
        if idle:
            state = None
        elif resumed:
            state, extra = ckpt.restore(start, abstract)
            train_iter.restore(extra["data"])
        else:
            state, _ = mesh_lib.create_sharded_state(init_fn, mesh, plan.rules, rng)
            if cfg.init_from:
                family = task.manifest["family"]
                key = families.get(family).key or model_dir.TOKENIZER_KEY
                state = _init_from(state, cfg.init_from, key, family, plan.model, shardings)
            start = 0
            print(f"[{name}] fresh run: {mesh_lib.param_count(state['params']):,} trainable params, "
                  f"{plan.total_steps} steps{stop}", flush=True)
        if resumed:
            writer.truncate_after(start)
            print(f"[{name}] resumed from step {start} in {workdir}{stop}", flush=True)
        if idle:
            print(f"[{name}] step {start} is at or past this run's last step ({plan.stop_step}): nothing to "
                  "train; raise config.stop_at_step or config.total_steps to continue", flush=True)
        if is_primary:
            model_dir.write_manifest(workdir, task.manifest)
        last = {} if idle else _run(plan, task, step_fn, state, shardings, mesh, train_iter, ckpt, writer,
                                             profiler, start, name)
        ckpt.close()
        if is_primary and not idle:
            print(summary(name, plan, task, workdir, start, ckpt.latest_step(), last, time.time() - t_start),
                  flush=True)
        return last
    finally:
        profiler.close()
        with contextlib.suppress(Exception):  # the failure being raised says what happened
            ckpt.close()
        if writer is not None:
            writer.close()


def _run(plan, task, step_fn, state, shardings, mesh, train_iter, ckpt, writer, profiler, start: int,
         name: str) -> dict:
    cfg = plan.config
    frozen = task.frozen
    compiled: dict[Any, Any] = {}
    example = {}

    def program(step: int, batch):
        key = task.step_variant(step) if task.step_variant else None
        if key not in compiled:
            fn = task.step_fn_for(key) if task.step_variant else step_fn
            if task.step_variant:
                fn = with_ema(task.init_fn, fn, plan.ema_decay)[1]
            t0 = time.time()
            with mesh_lib.mesh_rules(mesh, plan.rules):  # traced here: activation constraints need the rules
                lowered = jit_train_step(fn, shardings, mesh, task.conv_bound).lower(state, batch, frozen)
            compiled[key] = lowered.compile()
            _report_compile(compiled[key], time.time() - t0, name)
            if "flops" not in example:
                example["flops"] = _flops_per_step(task, compiled[key], plan.batch_size, mesh.size)
        return compiled[key]

    is_preempted = checkpoint.install_preemption_handler(directory=ckpt.directory)
    progress = metrics.Progress(plan.stop_step, start, every_s=cfg.progress_every_s, batch_size=plan.batch_size)
    peak = devices.peak_flops(jax.devices()[0], cfg.peak_tflops)
    last: dict = {}
    t_log, n_log = time.time(), 0
    saved_step = start  # the step of the newest checkpoint started here (or restored)

    def save(step: int, force: bool) -> None:
        nonlocal saved_step
        if step == saved_step:  # e.g. a preemption notice on a checkpoint step: that step is already saved
            return
        if ckpt.save(step, state, {"data": train_iter.state(), "step": step}, force=force):
            saved_step = step

    step = start
    while step < plan.stop_step:
        local = next(train_iter)
        if task.batch_extras is not None:
            local = task.batch_extras(step, local)
        batch = mesh_lib.make_global_batch(local, mesh)
        t_compile = time.time()
        fn = program(step, batch)
        t_log += time.time() - t_compile  # compiling is not training time
        profiler.before(step + 1)
        state, m = fn(state, batch, frozen)
        step += 1
        profiler.after(step, state)
        n_log += 1
        on_ckpt = step % cfg.ckpt_every == 0 or step == plan.stop_step
        if step % cfg.log_every == 0 or on_ckpt or step == start + 1:
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not math.isfinite(m["loss"]):
                ckpt.wait()
                good = ckpt.latest_step()
                raise NonFiniteLossError(
                    f"the loss is {m['loss']} at step {step}; the run stopped without saving. The last good "
                    f"checkpoint ({'step ' + str(good) if good is not None else 'none yet'}) in {ckpt.directory} is "
                    "intact: lower the learning rate (config.tblr / config.lr / config.opt) or check the data, then "
                    "re-run the same command to resume from it."
                )
            m.update(_throughput(n_log, time.time() - t_log, plan.batch_size, task, example.get("flops"), peak,
                                 mesh.size))
            if cfg.eval_every and task.eval_fn and (step % cfg.eval_every == 0 or step == plan.total_steps):
                with mesh_lib.mesh_rules(mesh, plan.rules):
                    m.update(task.eval_fn(state))
            try:
                writer.write(step, m)
                if task.on_log is not None:
                    task.on_log(step, state, writer)
            except StorageError as e:  # a full disk: say which checkpoint a re-run resumes from
                good = ckpt.latest_step()
                raise StorageError(f"{e} Here that is step {good} in {ckpt.directory}." if good is not None else
                                   f"{e} No checkpoint was finished yet: a re-run starts afresh.") from None
            last = m
            t_log, n_log = time.time(), 0
        progress.update(step, progress_metrics(last, task))
        if on_ckpt:
            save(step, force=step == plan.stop_step)
        if is_preempted() or ckpt.reached_preemption(step):
            checkpoint.acknowledge_preemption()
            print(f"[{name}] preemption signal: saving step {step} and exiting", flush=True)
            save(step, force=True)
            break
    return last


def summary(name: str, plan, task, workdir: str, start: int, saved: int | None, last: dict, seconds: float) -> str:
    """The paragraph that ends a run: steps, time, final metrics, where things are and what to run next."""
    keys = [k for k in ("loss", *task.progress_keys) if k in last]
    final = ", ".join(f"{k} {metrics.format_value(last[k])}" for k in keys)
    done = saved is not None and saved >= plan.total_steps
    head = (f"[{name}] finished all {plan.total_steps} steps" if done else
            f"[{name}] stopped at step {saved} of {plan.total_steps}")
    text = (f"{head} ({'resumed at step ' + str(start) + ', ' if start else ''}{metrics.format_eta(seconds)} "
            f"in this run){'; last logged ' + final if final else ''}. Checkpoints: {workdir}/checkpoints (latest "
            f"step {saved}); metrics: {workdir}/metrics.jsonl and TensorBoard events in {workdir}/tb.")
    if not done:
        return text + " Re-run the same command to continue (raise config.stop_at_step if it was set)."
    nxt = task.next_step.format(workdir=workdir)
    return text + (f" Next: {nxt}" if nxt else "")


def progress_metrics(last: dict, task) -> dict:
    """What the progress line shows of the logged metrics: loss, lr and grad_norm, then the family's own; every
    logged value is in metrics.jsonl."""
    return {k: last[k] for k in ("loss", "lr", "grad_norm", *task.progress_keys) if k in last}


def _flops_per_step(task, compiled, batch: int, num_devices: int) -> float | None:
    """Training FLOPs of one global step: the task's analytic count (the one ``varjax compile`` reports), else
    XLA's cost analysis of the compiled step (which counts a scanned loop's body once)."""
    if task.flops_per_example:
        return task.flops_per_example * batch
    flops = metrics.compiled_flops(compiled)
    return flops * num_devices if flops > 0 else None


def _report_compile(compiled, seconds: float, name: str) -> None:
    mem = compiled.memory_analysis()
    if mem is None:
        print(f"[{name}] step compiled in {seconds:.1f}s", flush=True)
        return
    gib = 2**30
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes) / gib
    print(f"[{name}] step compiled in {seconds:.1f}s: {total:.2f} GiB per device (arguments "
          f"{mem.argument_size_in_bytes / gib:.2f}, temporaries {mem.temp_size_in_bytes / gib:.2f})", flush=True)


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="config file or shipped name, e.g. configs/var_shapes.py, "
                   "var_d16, tokenizer_shapes:runlocal; fields are overridden with --config.field=value")
    p.add_argument("--workdir", required=True, help="run directory (local path or URL such as gs://...); re-running "
                   "the same command resumes from it")


def command(a, rest: list[str]) -> None:
    """``varjax train`` / ``train-tokenizer``: ``rest`` holds the ``--config.field=value`` overrides."""
    rest, overrides = config.split_overrides(rest)
    if rest:
        raise ValueError(f"unrecognized arguments {rest}; config fields are set with --config.field=value")
    train(config.resolve(config.load(a.config, overrides)), a.workdir)
