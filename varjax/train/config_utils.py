"""Helpers for ml_collections configs: durations, config-file arguments, saving and printing.

Config files define ``get_config(arg)``; ``arg`` is the text after ':' in
``--config=configs/var.py:depth=16``.
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

_REQUIRED = object()
_DURATION_UNITS = ("steps", "epochs", "examples", "fraction")


def steps_from(cfg, name: str, *, steps_per_epoch: int | None = None, examples_per_step: int | None = None,
               total_steps: int | None = None, default: Any = _REQUIRED) -> int:
    """Turns one of ``cfg.{name}_steps|_epochs|_examples|_fraction`` into a number of steps.

    Exactly one of the four fields may be set (not None). Epochs and examples are rounded to the nearest
    step (the reference rounds its warm-up iterations the same way); a fraction is of ``total_steps``.

    Args:
      cfg: ConfigDict (or mapping) holding the fields.
      name: field prefix, e.g. 'warmup' or 'total'.
      steps_per_epoch: steps per pass over the data, needed for ``{name}_epochs``.
      examples_per_step: examples per step (global batch), needed for ``{name}_examples``.
      total_steps: steps of the whole run, needed for ``{name}_fraction``.
      default: returned when none of the fields is set; without it, that is an error.

    Returns:
      Number of steps (int >= 0).

    Raises:
      ValueError: when several or none (without default) are set, or a needed size is missing.
    """
    fields = [f"{name}_{unit}" for unit in _DURATION_UNITS]
    given = {f: cfg.get(f) for f in fields if f in cfg and cfg.get(f) is not None}
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
    needed = {
        "epochs": ("steps_per_epoch", steps_per_epoch),
        "examples": ("examples_per_step", examples_per_step),
        "fraction": ("total_steps", total_steps),
    }
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


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def python_literal(text: str) -> Any:
    """Python literal if ``text`` is one ('3', '1e-4', 'None', '(1,2)'), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _convert(key: str, text: str, typ: type | None) -> Any:
    if typ is None:
        return python_literal(text)
    try:
        if typ is bool:
            return _parse_bool(text)
        if typ in (tuple, list):
            # Sequences are written with '+' inside the comma-separated argument: 'pn=1+2+3'.
            return typ(python_literal(t) for t in text.split("+") if t)
        return typ(text)
    except ValueError as e:
        raise ValueError(
            f"Config argument `{key}={text}` could not be read as {typ.__name__} ({e}); "
            f"write e.g. `{key}=...` with a {typ.__name__} value."
        ) from None


def parse_arg(arg: str | None, *, lazy: bool = False, **defaults) -> ml_collections.ConfigDict:
    """Parses a config-file argument like 'depth=16,runlocal' into a typed ConfigDict.

    Each keyword gives a default value, or a ``(default, type)`` pair when the default is None or its
    type is not the wanted one. Values are converted to the default's type (bool accepts True/False/1/0/
    yes/no; tuples are written 'a+b+c'). A bare word is ``word=True`` if it is a known key, otherwise the
    value of the first key (so 'configs/var.py:16' can mean depth=16).

    Args:
      arg: the text after ':' in the --config flag; None or '' gives all defaults.
      lazy: accept keys that have no default (their values are parsed as Python literals or strings).
      **defaults: key -> default or (default, type).

    Raises:
      ValueError: for an unknown key (unless lazy), a malformed pair or a value of the wrong type.
    """
    spec = {}
    for key, value in defaults.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], type):
            spec[key] = value
        else:
            spec[key] = (value, None if value is None else type(value))
    result = ml_collections.ConfigDict({k: v for k, (v, _) in spec.items()}, type_safe=False)
    arg = (arg or "").strip()
    if arg and "," not in arg and "=" not in arg:
        if arg in spec or not spec:
            arg = f"{arg}=True"
        else:
            arg = f"{next(iter(spec))}={arg}"
    for item in filter(None, (s.strip() for s in arg.split(","))):
        if "=" not in item:
            key, text = item, "True"
        else:
            key, text = (s.strip() for s in item.split("=", 1))
        if key not in spec and not lazy:
            raise ValueError(
                f"Unknown config argument `{key}` in '{arg}'; this config file accepts {sorted(spec)} "
                f"(write them as 'key=value,key2=value2')."
            )
        result[key] = _convert(key, text, spec.get(key, (None, None))[1])
    return result


def _flatten(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """('a.b.c', value) pairs of a nested ConfigDict/dict, in insertion order."""
    items = []
    mapping = cfg.items() if hasattr(cfg, "items") else []
    for key, value in mapping:
        path = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)) and len(value):
            items.extend(_flatten(value, path + "."))
        else:
            items.append((path, value))
    return items


def format_config(cfg) -> str:
    """One 'a.b.c = value' line per leaf field, for logs and ``config.txt``."""
    return "\n".join(f"{path} = {value!r}" for path, value in _flatten(cfg))


def print_config(cfg) -> None:
    """Prints :func:`format_config` under a header."""
    print("Config:\n" + format_config(cfg), flush=True)


def save_config(cfg, workdir: str, *, is_primary: bool = True) -> None:
    """Writes ``workdir/config.json`` (machine-readable) and ``workdir/config.txt`` (one field per line).

    Only the primary process writes (pass ``is_primary=jax.process_index() == 0``). Values JSON cannot
    hold are written as their repr.
    """
    from varjax import paths

    if not is_primary:
        return
    cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    paths.write_json(paths.resolve(workdir) / "config.json", cfg_dict)
    paths.write_text(paths.resolve(workdir) / "config.txt", format_config(cfg) + "\n")


def load_config_json(workdir: str) -> ml_collections.ConfigDict:
    """Reads back ``workdir/config.json`` as a ConfigDict (lists stay lists)."""
    from varjax import paths

    return ml_collections.ConfigDict(paths.read_json(paths.resolve(workdir) / "config.json"))
