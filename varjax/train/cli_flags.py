"""Config files and ``--config.a.b=value`` overrides: the one parser of ``train``, ``train-tokenizer``,
``sweep`` and ``main`` (whose overrides are ``--tok.a.b=value`` / ``--var.a.b=value``).

A config file ``configs/<file>.py[:args]`` defines ``get_config(arg)``; ``arg`` is the text after ':'.
An override's value is read as a Python literal (``ast.literal_eval``) and checked against the field it
replaces: lists and tuples in Python syntax (``--config.mesh="[('data',-1),('fsdp',8),('tensor',1)]"``),
numbers, booleans (True/False/1/0/yes/no), None, and plain text for string fields. An unknown field is
reported with the closest valid name.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from varjax.train.config_utils import python_literal


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of ``path.py[:arg]`` (``get_config()`` without ':')."""
    path, sep, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} (from --config {spec}) does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"_varjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config(arg).")
    return module.get_config(arg) if sep else module.get_config()


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


def _leaf_names(cfg, prefix: str = "") -> list[str]:
    names = []
    for key in cfg.keys():
        value = cfg[key]
        names.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            names.extend(_leaf_names(value, prefix + key + "."))
    return names


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError("expected True/False (or 1/0, yes/no)")


def parse_value(text: str, current: Any, field_type: type | None) -> Any:
    """The value of ``text`` for a field holding ``current`` (of type ``field_type``, None when unknown).

    Raises:
      ValueError: saying what was expected when ``text`` does not fit the field.
    """
    if text.strip() == "None":
        return None
    typ = field_type or (type(current) if current is not None else None)
    if typ is None:
        return python_literal(text)
    if typ is bool:
        return _parse_bool(text)
    if typ is str:
        value = python_literal(text)
        return value if isinstance(value, str) else text
    if typ in (int, float):
        value = python_literal(text)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and isinstance(value, float)):
            raise ValueError(f"expected {typ.__name__}")
        return typ(value)
    if typ in (list, tuple):
        value = python_literal(text)
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
    return python_literal(text)


def _kind(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return f"seq{len(x)}"
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, (int, float)):
        return "number"
    return type(x).__name__


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
                known = _leaf_names(cfg)
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
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
            value = parse_value(text, parent[leaf], field_type)
            parent[leaf] = value
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"--{prefix}.{key}={text}: cannot set field '{prefix}.{key}' (currently {parent[leaf]!r}): {e}."
            ) from None
    return cfg


def config_from_args(spec: str, overrides: list[tuple[str, str]], prefix: str = "config"
                     ) -> ml_collections.ConfigDict:
    """Loads a config file and applies overrides; the result is locked (no new fields)."""
    cfg = load_config_file(spec)
    apply_overrides(cfg, overrides, prefix=prefix, source=spec.partition(":")[0])
    cfg.lock()
    return cfg


def run_with_config(argv: list[str], fn: Callable, what: str, *, needs_workdir: bool = True) -> None:
    """Parses ``--config FILE[:args] --workdir DIR [--config.x=y ...]`` and calls ``fn(config, workdir)``."""
    import argparse

    usage = f"{argv[0]} --config configs/<file>.py[:args] --workdir DIR [--config.field=value ...]"
    rest, overrides = split_overrides(argv[1:])
    p = argparse.ArgumentParser(prog=argv[0], usage=usage, description=f"{what} training")
    p.add_argument("--config", required=True, help=f"{what} config file (e.g. configs/<file>.py[:args])")
    p.add_argument("--workdir", required=needs_workdir, help="run directory (local path or URL such as gs://...)")
    a, unknown = p.parse_known_args(rest)
    if unknown:
        raise SystemExit(f"error: unrecognized arguments {unknown}\nusage: {usage}")
    fn(config_from_args(a.config, overrides), a.workdir)  # the trainer prints the resolved config
