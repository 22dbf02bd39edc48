"""Flag parsing for the training commands: ml_collections config files with ``--config.a.b=value`` overrides."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

from varjax.train.config_utils import print_config


def run_with_config(argv: list[str], fn: Callable, what: str, *, needs_workdir: bool = True) -> None:
    """Parses ``--config FILE[:args] --workdir DIR [--config.x=y ...]`` and calls ``fn(config, workdir)``."""
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(f"usage: {argv[0]} --config NAME|FILE.py[:args] --workdir DIR [--config.field=value ...]\n\n"
              f"Trains the {what}. --config is a config file or the name of a shipped one (e.g. var_d16, "
              "tokenizer_shapes); every config field can be overridden with --config.field=value.")
        return
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        f"{what} config file (e.g. configs/<file>.py[:args])",
        flag_values=fv,
        lock_config=True,
        sys_argv=argv,
    )
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl, TensorBoard)", flag_values=fv)
    try:
        fv(argv)
    except flags.Error as e:
        raise SystemExit(
            f"error: {e}\nusage: {argv[0]} --config configs/<file>.py[:args] --workdir DIR [--config.field=value ...]"
        ) from None
    except (KeyError, AttributeError, TypeError) as e:  # ml_collections: unknown field or value of the wrong type
        raise ValueError(_override_error(argv, e)) from None
    if fv.config is None:
        raise SystemExit(f"error: {argv[0]} needs --config configs/<file>.py[:args]")
    if needs_workdir and not fv.workdir:
        raise SystemExit(f"error: {argv[0]} needs --workdir DIR")
    print_config(fv.config)
    sys.stdout.flush()
    fn(fv.config, fv.workdir)


def _override_error(argv: list[str], e: Exception) -> str:
    """One line naming the ``--config.x=y`` flag that ml_collections refused, with its suggestion if any."""
    text = " ".join(str(e).replace("\\n", " ").replace("\\", "").replace("'", "").split())
    overrides = [a for a in argv if a.startswith("--config.")]
    first = text.split()[0] if text else ""
    named = [a for a in overrides if first and first in a.partition("=")[0]] or overrides
    what = "a value of the wrong type" if isinstance(e, TypeError) else "a field the config does not have"
    return f"{' '.join(named)}: {what} ({text})."
