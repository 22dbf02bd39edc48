"""Config files by name or by path: ``var_d16``, ``configs/var_d16.py`` or any ``.py`` file (each ``[:args]``).

The config files of the repository's ``configs/`` folder are installed as the package ``varjax.configs``
(``setup.py`` maps the folder into the package), so an installed varjax finds them by name from any working
directory; in a source checkout run without installing, ``configs/`` next to the package is used.
"""

from __future__ import annotations

import difflib
import importlib.resources
from pathlib import Path

_CHECKOUT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_dir() -> Path:
    """The folder holding the shipped config files (installed package data, else the checkout's ``configs/``)."""
    try:
        return Path(str(importlib.resources.files("varjax.configs")))
    except ModuleNotFoundError:
        return _CHECKOUT_CONFIGS


def available() -> list[str]:
    """Names of the shipped config files (``var_d16``, ``tokenizer_shapes``, ...), sorted."""
    return sorted(p.stem for p in config_dir().glob("*.py") if not p.name.startswith("_"))


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


def resolve_config_flags(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--config NAME`` / ``--config=NAME`` resolved (``--config.x=y`` untouched)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            out += [a, resolve_config(argv[i + 1])]
            i += 2
            continue
        if a.startswith("--config="):
            a = "--config=" + resolve_config(a[len("--config="):])
        out.append(a)
        i += 1
    return out
