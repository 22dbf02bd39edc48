"""The persistent compilation cache: a second start of the same program loads its executables from disk.

On by default, in ``$XDG_CACHE_HOME/varjax/jax`` (``~/.cache/varjax/jax``). The environment variable
``VARJAX_COMPILE_CACHE`` names another directory (a local path or a URL such as ``gs://...``) or turns the cache
off (``off``, ``0`` or empty); a training config's ``compile_cache`` field does the same for one run. Programs
that compile in under half a second are not stored (they cost more to look up than to build).
"""

from __future__ import annotations

import os

ENV = "VARJAX_COMPILE_CACHE"
OFF = ("", "0", "off", "none", "false")
MIN_COMPILE_SECONDS = 0.5


def default_directory() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "varjax", "jax")


def directory(setting: str | None = None) -> str | None:
    """The cache directory for ``setting`` (a config value; None: the environment, else the default), or None
    when the cache is off."""
    if setting is None:
        setting = os.environ.get(ENV, default_directory())
    return None if setting.strip().lower() in OFF else setting


def enable(setting: str | None = None) -> str | None:
    """Points JAX's persistent cache at :func:`directory` (or switches it off); returns the directory used."""
    import jax

    path = directory(setting)
    jax.config.update("jax_compilation_cache_dir", path)
    if path is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
