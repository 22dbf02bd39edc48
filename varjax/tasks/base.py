"""What a training task gives the loop, and the pieces every task builds the same way.

A task module (``varjax.tasks.tokenizer``, ``var``, ``ecar``) offers, at module level:

* ``SOURCES``: the data it can read (``"images"``, ``"tokens"``, ``"latents"``);
* ``tokenizer_of(cfg) -> (dir, config) | (None, None)``: the frozen tokenizer it trains on;
* ``derive(cfg, tokenizer) -> Derived`` and ``model_config(cfg, num_classes, tokenizer)``: what
  :func:`varjax.config.resolve` derives for it;
* ``defaults(cfg)``: the recipe defaults (``configs/common.py``) a run's printed config is compared with;
* ``build(plan, mesh) -> Task``: the state's init, the step, evaluation and the model-directory entry.

The loop (``varjax.train``) does everything else identically for every task: data, mesh, checkpoints and
resume, EMA of ``state["params"]``, ``init_from``, metrics, profiling, preemption.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax

from varjax.core import model_dir, paths


@dataclasses.dataclass
class Task:
    """What the loop runs for one task, built once per run.

    ``init_fn(rng)`` returns the state pytree ``{"params", "opt_state", "step", "rng", ...}`` whose parameters carry
    logical axis names; it runs under ``jax.eval_shape`` and ``jax.jit``. ``step_fn(state, batch, frozen)`` returns
    ``(state, metrics)`` (scalars); the loop jits it with explicit shardings and donates the state. ``frozen`` holds
    arrays every step reads and none changes (a generator's tokenizer), passed as a replicated argument rather
    than baked into the program. ``step_variant(step)`` may key a different step per training step (progressive
    training); ``step_fn_for(key)`` builds it. ``batch_extras(step, batch)`` adds per-step host values to a batch.
    """

    init_fn: Callable[[jax.Array], Any]
    step_fn: Callable[[Any, dict, Any], tuple[Any, dict]]
    manifest: dict
    frozen: Any = None
    eval_fn: Callable[[Any], dict] | None = None
    step_variant: Callable[[int], Hashable] | None = None
    step_fn_for: Callable[[Hashable], Callable] | None = None
    batch_extras: Callable[[int, dict], dict] | None = None
    on_log: Callable[[int, Any, Any], None] | None = None
    conv_bound: bool = False  # the step's time is convolutions: compiled with varjax.core.xla_flags' CPU kernels
    tokens_per_example: int = 0  # for the tokens_per_s metric
    flops_per_example: float | None = None  # training FLOPs per example, when counted analytically
    progress_keys: tuple[str, ...] = ()  # metrics the progress line shows after loss, lr and grad_norm
    next_step: str = ""  # the command a user runs next on the finished workdir ({workdir} is filled in)


def frozen_tokenizer(cfg, family: str, train_hint: str) -> tuple[str, Any]:
    """(resolved directory, config) of the tokenizer named by ``config.tokenizer_dir``, checked to be ``family``.

    Reads only the directory's manifest: the parameters are loaded when the task is built.
    """
    from varjax.models import families

    if not cfg.tokenizer_dir:
        raise ValueError(f"config.tokenizer_dir is empty: it names the frozen tokenizer to train on ({train_hint}).")
    man = model_dir.read_manifest(cfg.tokenizer_dir)
    have = model_dir.tokenizer_family(man)
    if have != family:
        raise ValueError(
            f"config.tokenizer_dir={cfg.tokenizer_dir!r} holds a {have!r} tokenizer; task {cfg.task!r} needs a "
            f"{family!r} one ({train_hint})."
        )
    return str(paths.resolve(cfg.tokenizer_dir)), families.get(family).config.from_dict(man["vae"]["config"])


def fill_model_fields(cls, fields: dict, derived: dict, section: str = "config.model") -> Any:
    """``cls(**fields, **derived)`` where ``fields`` are the config's model fields (None: not set, the
    dataclass default) and ``derived`` the values the run derives (classes, tokenizer sizes)."""
    known = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in fields.items() if k != "dtype"}
    unknown = set(given) - known
    if unknown:
        raise ValueError(f"{section} has unknown fields {sorted(unknown)}; known: {sorted(known)}.")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    values.update(derived)
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class Derived:
    """What ``varjax.config.resolve`` needs from a task besides its model config."""

    image_size: int
    num_classes: int | None  # None: the dataset's
    dtype: str
    peak_lr: float


def generator_derive(cfg, tok) -> Derived:
    """A generator's (var, ecar): its tokenizer's image size, ``config.model``'s classes and dtype, and the
    reference's linear learning-rate rule ``ac * tblr * batch_size / 256``."""
    from varjax.core import optim

    return Derived(image_size=tok.image_size, num_classes=cfg.model.num_classes, dtype=str(cfg.model.dtype),
                   peak_lr=optim.peak_lr(cfg.tblr, cfg.batch_size, cfg.opt.ac))
