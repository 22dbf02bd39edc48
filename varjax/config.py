"""Configs: find and load a config file, apply overrides, refuse unknown fields, and resolve it once into a Plan.

A config file (``configs/<name>.py``, by name ``var_d16`` or any ``.py`` path, each ``[:arg]``) defines
``get_config(arg)``, building on ``configs/common.py`` where every field has its default; a sweep file also
defines ``sweep(add)``, and ``:member=NAME`` selects one member (its overrides applied to the base config).
The files of the repository's ``configs/`` folder are installed as the package ``varjax.configs``, so an
installed varjax finds them by name from any working directory.

``--config.a.b=value`` overrides are read as Python literals and checked against the field they replace;
an unknown field is reported with the closest valid name. The loaded config is locked.

:func:`resolve` is the one place where a config becomes the values a run uses: the data source (images,
token cache, latent cache) and its size, steps per epoch, total and warm-up steps, the peak learning rate, the
model's config (width, heads, tokenizer sizes, classes), the dtype, and the mesh with its rules. It validates
them and returns a frozen :class:`Plan`; nothing downstream reads a raw field with a fallback.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.resources
import importlib.util
import inspect
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from varjax import tasks
from varjax.core import mesh as mesh_lib
from varjax.core import optim, paths
from varjax.data import sources

_CHECKOUT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_DURATION_UNITS = ("steps", "epochs", "examples", "fraction")
_REQUIRED = object()

# ------------------------------------------------------------------------------------------- finding files


def config_dir() -> Path:
    """The folder holding the shipped config files (installed package data, else the checkout's ``configs/``)."""
    try:
        return Path(str(importlib.resources.files("varjax.configs")))
    except ModuleNotFoundError:
        return _CHECKOUT_CONFIGS


def available() -> list[str]:
    """Names of the shipped config files (``var_d16``, ``tokenizer_shapes``, ...), sorted."""
    return sorted(p.stem for p in config_dir().glob("*.py") if not p.name.startswith("_") and p.stem != "common")


def resolve_config(spec: str) -> str:
    """``NAME[:args]`` or ``PATH[:args]`` -> ``PATH[:args]`` of an existing file.

    An existing file is used as given. Otherwise a bare name (``var_d16``) or a path into a ``configs/``
    folder (``configs/var_d16.py``, the checkout's spelling) names a shipped config file. Remote paths
    (``gs://...``) are passed through.

    Raises:
      FileNotFoundError: nothing matches; the message lists the shipped names and the closest one.
    """
    if "://" in spec:
        return spec
    path, sep, args = spec.partition(":")
    if Path(path).expanduser().is_file():
        return spec
    p = Path(path)
    bare = p.suffix == "" and len(p.parts) == 1
    in_configs = p.suffix == ".py" and len(p.parts) == 2 and p.parts[0] == "configs"
    names = available()
    if bare or in_configs:
        shipped = config_dir() / f"{p.stem}.py"
        if shipped.is_file():
            return f"{shipped}{sep}{args}"
    close = difflib.get_close_matches(p.stem, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise FileNotFoundError(
        f"--config {spec}: no such config file, and {p.stem!r} is not a shipped config name.{hint} Give a path "
        f"to a .py config file or one of: {', '.join(names)} (optionally followed by ':args')."
    )


# ------------------------------------------------------------------------------------------------- loading


def load_module(path: str):
    """The config file at ``path`` (a local path or a URL) as a module; a file that does not run is a ValueError
    naming the line."""
    if paths.is_url(path):
        if not paths.resolve(path).is_file():
            raise ValueError(f"config file {path!r} does not exist.")
        with paths.local_copy(path) as local:
            return load_module(local)
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"_varjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(
            f"config file {path}, line {e.lineno}: {e.msg} ({(e.text or '').strip()!r}). Fix the file's Python "
            "syntax."
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure while running a user's config file is bad input
        raise ValueError(f"config file {path} failed while loading: {type(e).__name__}: {e}.") from None
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config(arg).")
    return module


def collect_members(sweep_fn: Callable, arg: Any = None) -> list[dict]:
    """Runs ``sweep_fn(add, arg)``; returns ``[{'name': ..., 'overrides': {dotted: value}}]`` in order.

    Overrides are dotted config fields written with '__' or '.' (``add(name='d2', **{'model.depth': 2})``).
    """
    members: list[dict] = []

    def add(name: str, **overrides) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"sweep member name {name!r} must be a plain, non-empty directory name.")
        if any(m["name"] == name for m in members):
            raise ValueError(f"sweep member name {name!r} is used twice.")
        members.append({"name": name, "overrides": {k.replace("__", "."): v for k, v in overrides.items()}})

    if len(inspect.signature(sweep_fn).parameters) >= 2:
        sweep_fn(add, arg)
    else:
        sweep_fn(add)
    if not members:
        raise ValueError("the sweep defines no members (sweep(add) never called add).")
    return members


def _member_of(arg: str) -> str:
    for item in (arg or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "member":
            return value.strip()
    return ""


def set_field(cfg: ml_collections.ConfigDict, dotted: str, value: Any, where: str = "override") -> None:
    """``cfg.a.b = value`` for ``dotted = 'a.b'``; the field must exist."""
    parent, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        if not isinstance(parent.get(part), ml_collections.ConfigDict):
            raise ValueError(f"{where} '{dotted}': the config has no group '{'.'.join(parts[: i + 1])}'.")
        parent = parent[part]
    if parts[-1] not in parent:
        raise ValueError(f"{where} '{dotted}': the config has no field '{dotted}'.")
    parent[parts[-1]] = value


def _call(path: str, what: str, fn: Callable, *args):
    """``fn(*args)``, a function of a user's config file: any failure is bad input naming the file and the line."""
    try:
        return fn(*args)
    except (ValueError, SystemExit):
        raise  # already a message for the user (e.g. common.parse_arg's)
    except Exception as e:  # noqa: BLE001 - any failure while running a user's config file is bad input
        tb = e.__traceback__
        line = None
        while tb is not None:  # the deepest frame of the config file itself
            if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
                line = tb.tb_lineno
            tb = tb.tb_next
        where = f", line {line}" if line else ""
        raise ValueError(f"config file {path}{where}: {what} raised {type(e).__name__}: {e}. Fix the file (or the "
                         "argument after ':').") from None


def load_file(spec: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of ``path.py[:arg]`` (``get_config()`` without ':'), with the sweep member of
    ``member=NAME`` applied."""
    path, sep, arg = spec.partition(":")
    module = load_module(path)
    cfg = _call(path, f"get_config({arg!r})" if sep else "get_config()", module.get_config, *((arg,) if sep else ()))
    member = _member_of(arg)
    if member:
        if not hasattr(module, "sweep"):
            raise ValueError(f"--config {spec}: member={member} names a sweep member, but {path} defines no sweep.")
        members = {m["name"]: m for m in _call(path, "sweep(add)", collect_members, module.sweep, arg)}
        if member not in members:
            raise ValueError(f"--config {spec}: unknown sweep member {member!r}; the sweep has {sorted(members)}.")
        for key, value in members[member]["overrides"].items():
            set_field(cfg, key, value, where=f"sweep member {member!r}")
    return cfg


def split_overrides(argv: list[str], prefix: str = "config") -> tuple[list[str], list[tuple[str, str]]]:
    """Separates ``--PREFIX.a.b=value`` (or ``--PREFIX.a.b value``) from the other arguments.

    Returns (other arguments, [(dotted field, value text)]).
    """
    rest, overrides, i = [], [], 0
    head = f"--{prefix}."
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(head):
            key, eq, text = arg[len(head):].partition("=")
            if not eq:
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    text = argv[i + 1]
                    i += 1
                else:
                    text = "True"  # a bare boolean flag
            overrides.append((key, text))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError("expected True/False (or 1/0, yes/no)")


def _kind(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return f"seq{len(x)}"
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, (int, float)):
        return "number"
    return type(x).__name__


def parse_value(text: str, current: Any, field_type: type | None) -> Any:
    """The value of ``text`` for a field holding ``current`` (of type ``field_type``, None when unknown).

    Raises:
      ValueError: saying what was expected when ``text`` does not fit the field.
    """
    if text.strip() == "None":
        return None
    typ = field_type or (type(current) if current is not None else None)
    if typ is None:
        return _literal(text)
    if typ is bool:
        return _parse_bool(text)
    if typ is str:
        value = _literal(text)
        return value if isinstance(value, str) else text
    if typ in (int, float):
        value = _literal(text)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and isinstance(value, float)):
            raise ValueError(f"expected {typ.__name__}")
        return typ(value)
    if typ in (list, tuple):
        value = _literal(text)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a {typ.__name__} in Python syntax, e.g. [('data', -1), ('fsdp', 8)]")
        if current:  # elements shaped like the current ones: pairs stay pairs, numbers stay numbers
            kinds = {_kind(x) for x in current}
            bad = [x for x in value if _kind(x) not in kinds]
            if len(kinds) == 1 and bad:
                raise ValueError(f"expected elements like {current[0]!r}; {bad[0]!r} is not")
        return typ(value)
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError("this is a group of fields; override its fields one by one (--config.group.field=value)")
    return _literal(text)


def leaf_names(cfg, prefix: str = "") -> list[str]:
    names = []
    for key in cfg.keys():
        names.append(prefix + key)
        if isinstance(cfg[key], ml_collections.ConfigDict):
            names.extend(leaf_names(cfg[key], prefix + key + "."))
    return names


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[tuple[str, str]], prefix: str = "config",
                    source: str = "the config") -> ml_collections.ConfigDict:
    """Sets each ``(dotted field, value text)`` of :func:`split_overrides` on ``cfg``; returns ``cfg``.

    Raises:
      ValueError: one paragraph naming the flag, and the closest valid field for an unknown one.
    """
    for key, text in overrides:
        parent, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(parent, ml_collections.ConfigDict) or part not in parent:
                close = difflib.get_close_matches(key, leaf_names(cfg), n=1, cutoff=0.5)
                hint = f" Did you mean --{prefix}.{close[0]}?" if close else ""
                raise ValueError(
                    f"--{prefix}.{key}={text}: {source} has no field '{prefix}.{'.'.join(parts[:i + 1])}'.{hint} "
                    f"Overrides must name existing fields (the resolved config is printed at start-up)."
                )
            if i < len(parts) - 1:
                parent = parent[part]
        leaf = parts[-1]
        try:
            field_type = parent.get_type(leaf)
        except (AttributeError, KeyError, TypeError):
            field_type = None
        if field_type is type(None):
            field_type = None
        try:
            parent[leaf] = parse_value(text, parent[leaf], field_type)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"--{prefix}.{key}={text}: cannot set field '{prefix}.{key}' (currently {parent[leaf]!r}): {e}."
            ) from None
    return cfg


def load(spec: str, overrides: list[tuple[str, str]] = (), prefix: str = "config") -> ml_collections.ConfigDict:
    """A config file (by name or path, see :func:`resolve_config`) with overrides applied; locked (no new fields)."""
    path_spec = resolve_config(spec)
    cfg = load_file(path_spec)
    apply_overrides(cfg, list(overrides), prefix=prefix, source=path_spec.partition(":")[0])
    cfg.lock()
    return cfg


# -------------------------------------------------------------------------------------- printing and saving


def flatten(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """('a.b.c', value) pairs of a nested ConfigDict/dict, in insertion order."""
    items = []
    mapping = cfg.items() if hasattr(cfg, "items") else []
    for key, value in mapping:
        path = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict, dict)) and len(value):
            items.extend(flatten(value, path + "."))
        else:
            items.append((path, value))
    return items


def format_config(cfg) -> str:
    """One 'a.b.c = value' line per leaf field, for logs and ``config.txt``."""
    return "\n".join(f"{path} = {value!r}" for path, value in flatten(cfg))


def changed_fields(cfg, defaults) -> list[tuple[str, Any]]:
    """``[(field, value)]`` of ``cfg`` whose value differs from ``defaults`` (or that ``defaults`` lacks)."""
    base = dict(flatten(to_dict(defaults)))
    return [(k, v) for k, v in flatten(to_dict(cfg)) if k not in base or _canonical(base[k]) != _canonical(v)]


def format_changes(cfg, defaults, workdir) -> str:
    """The config as a log shows it: the fields that differ from the recipe defaults, then where every field is."""
    changed = changed_fields(cfg, defaults)
    lines = [f"  {k} = {v!r}" for k, v in changed]
    head = (f"config: {len(changed)} fields differ from the {cfg.task} defaults (configs/common.py); every field is "
            f"in {paths.resolve(workdir) / 'config.txt'}")
    return "\n".join([head + (":" if lines else ""), *lines])


def to_dict(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def save(cfg, workdir) -> None:
    """Writes ``workdir/config.json`` (machine-readable) and ``workdir/config.txt`` (one field per line)."""
    paths.write_json(paths.resolve(workdir) / "config.json", to_dict(cfg))
    paths.write_text(paths.resolve(workdir) / "config.txt", format_config(cfg) + "\n")


def load_saved(workdir) -> dict | None:
    """``workdir/config.json`` as a dict, or None when the workdir has none."""
    f = paths.resolve(workdir) / "config.json"
    if not f.is_file():
        return None
    return paths.read_json(f, "the config of the run in this workdir", "Delete it (the next start writes it again "
                           "from the config given) or restore it from a copy.")


def _canonical(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    return value


def differences(old: dict, new) -> list[tuple[str, Any, Any]]:
    """``[(field, old value, new value)]`` of fields that differ; a field only one side has (added or removed by
    another varjax version) is not a difference."""
    a, b = dict(flatten(old)), dict(flatten(to_dict(new)))
    return [(k, a[k], b[k]) for k in b if k in a and _canonical(a[k]) != _canonical(b[k])]


# ------------------------------------------------------------------------------------------------- resolving


def steps_from(cfg, name: str, *, steps_per_epoch: int | None = None, examples_per_step: int | None = None,
               total_steps: int | None = None, default: Any = _REQUIRED) -> int:
    """Turns one of ``cfg.{name}_steps|_epochs|_examples|_fraction`` into a number of steps.

    Exactly one of the four fields may be set (not None). Epochs and examples are rounded to the nearest step (the
    reference rounds its warm-up iterations the same way); a fraction is of ``total_steps``.

    Raises:
      ValueError: when several or none (without default) are set, or a needed size is missing.
    """
    fields = [f"{name}_{unit}" for unit in _DURATION_UNITS]
    given = {f: cfg[f] for f in fields if f in cfg and cfg[f] is not None}
    if len(given) > 1:
        raise ValueError(
            f"Config sets several of {sorted(given)} ({given}); set exactly one of {fields} to give the "
            f"'{name}' duration and leave the others None."
        )
    if not given:
        if default is not _REQUIRED:
            return default
        raise ValueError(f"Config gives no '{name}' duration; set exactly one of {fields}.")
    (field, value), = given.items()
    unit = field[len(name) + 1:]
    needed = {"epochs": ("steps_per_epoch", steps_per_epoch), "examples": ("examples_per_step", examples_per_step),
              "fraction": ("total_steps", total_steps)}
    if unit in needed and needed[unit][1] is None:
        raise ValueError(
            f"Config field `{field}`={value} needs {needed[unit][0]} to be turned into steps, but it is "
            f"unknown here; give the duration as `{name}_steps` instead."
        )
    if value < 0:
        raise ValueError(f"Config field `{field}` must be >= 0, got {value}.")
    if unit == "steps":
        return int(value)
    if unit == "epochs":
        return int(round(value * steps_per_epoch))
    if unit == "examples":
        return int(round(value / examples_per_step))
    return int(round(value * total_steps))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run uses, derived once from its config. ``config`` keeps every field, read-only, for the
    task-specific ones (loss weights, sampling defaults); the rest is here, validated."""

    config: ml_collections.FrozenConfigDict
    task: str
    data: Any  # varjax.data.sources.DataPlan
    model: Any  # the task's model config (VARConfig, ECARConfig, VQVAEConfig, KLAEConfig)
    tokenizer_dir: str | None  # the frozen tokenizer a generator trains on
    tokenizer: Any  # its config (VQVAEConfig, KLAEConfig), or None
    dtype: str
    seed: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int  # the length of the schedule
    stop_step: int  # where this run ends: config.stop_at_step, else total_steps
    warmup_steps: int
    peak_lr: float
    lr_schedule: str  # config.opt.sche, or the official rule for it (varjax.core.optim.schedule_name)
    mesh: tuple[tuple[str, int], ...]  # axis sizes, -1 filled for the device count
    rules: tuple
    ema_decay: float
    process_count: int


def _check_range(name: str, value, lo, hi=None, *, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
        raise ValueError(f"config.{name}={value!r} must lie in {rng}.")


def _validate(cfg) -> None:
    _check_range("batch_size", cfg.batch_size, 1)
    for name in ("log_every", "ckpt_every"):
        _check_range(name, cfg[name], 1)
    _check_range("eval_every", cfg.eval_every, 0)
    _check_range("ema_decay", cfg.ema_decay, 0.0, 1.0, hi_open=True)
    prof = tuple(cfg.profile_steps or ())
    if prof and (len(prof) != 2 or not all(isinstance(s, int) for s in prof) or not 0 <= prof[0] <= prof[1]):
        raise ValueError(f"config.profile_steps={prof!r}: expected (first, last) steps with 0 <= first <= last, "
                         "e.g. --config.profile_steps='(10, 12)'.")


def resolve(cfg: ml_collections.ConfigDict, *, num_devices: int | None = None, process_count: int | None = None,
            tokenizer: tuple | None = None, data: Any = None) -> Plan:
    """The :class:`Plan` of a loaded config.

    Without ``num_devices`` / ``process_count`` this is a run on this machine: ``jax.distributed`` is started
    first when the launcher's environment shows several processes (it must precede any other JAX call), and the
    device and process counts are read from JAX. ``varjax compile``, which compiles for a slice it does not have,
    passes the target's counts and what would otherwise be read from disk: ``tokenizer`` (dir, config) and
    ``data`` (a ``DataPlan``).

    Raises:
      ValueError: a field is out of range or inconsistent (naming it and what to do).
    """
    task = tasks.get(cfg.task)
    _validate(cfg)
    if num_devices is None:
        import jax

        from varjax.core import distributed

        distributed.init_distributed(cfg.distributed)
        num_devices, process_count = jax.device_count(), jax.process_count()
    process_count = process_count or 1
    tok_dir, tok_cfg = tokenizer or task.tokenizer_of(cfg)
    derived = task.derive(cfg, tok_cfg)
    data = data or sources.plan(
        cfg.data, latents_cache=cfg.latents_cache, allowed=task.SOURCES, task=cfg.task,
        image_size=derived.image_size, global_batch_size=cfg.batch_size, process_count=process_count,
        num_classes_override=derived.num_classes,
    )
    total = steps_from(cfg, "total", steps_per_epoch=data.steps_per_epoch, examples_per_step=cfg.batch_size)
    if total < 1:
        raise ValueError(f"config gives {total} training steps; set total_steps / total_epochs / total_examples > 0.")
    stop = total if cfg.stop_at_step is None else int(cfg.stop_at_step)
    if not 1 <= stop <= total:
        raise ValueError(f"config.stop_at_step={cfg.stop_at_step} must lie in [1, {total}] (the run's {total} steps); "
                         "leave it unset to train to the end.")
    warmup = steps_from(cfg.opt, "warmup", steps_per_epoch=data.steps_per_epoch, examples_per_step=cfg.batch_size,
                        total_steps=total)
    sizes = mesh_lib.mesh_shape(cfg.mesh, num_devices)
    shards = math.prod(sizes.get(a, 1) for a in mesh_lib.BATCH_AXES)
    if cfg.batch_size % shards or cfg.batch_size % process_count:
        raise ValueError(
            f"`config.batch_size`={cfg.batch_size} cannot be split over the batch mesh axes "
            f"{ {a: sizes.get(a, 1) for a in mesh_lib.BATCH_AXES} } ({shards} shards) and {process_count} "
            f"process(es); choose a positive multiple of {math.lcm(shards, process_count)}, or change the mesh "
            "sizes in `config.mesh`."
        )
    return Plan(
        config=ml_collections.FrozenConfigDict(cfg),
        task=cfg.task,
        data=data,
        model=task.model_config(cfg, data.num_classes, tok_cfg),
        tokenizer_dir=tok_dir,
        tokenizer=tok_cfg,
        dtype=derived.dtype,
        seed=int(cfg.seed),
        batch_size=int(cfg.batch_size),
        steps_per_epoch=data.steps_per_epoch,
        total_steps=int(total),
        stop_step=stop,
        warmup_steps=int(warmup),
        peak_lr=float(derived.peak_lr),
        lr_schedule=optim.schedule_name(cfg.opt.sche, float(cfg.get("pg", 0.0))),
        mesh=tuple(sizes.items()),
        rules=mesh_lib.normalize_rules(cfg.rules),
        ema_decay=float(cfg.ema_decay),
        process_count=process_count,
    )
