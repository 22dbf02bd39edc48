"""Flag parsing for the training commands: ml_collections config files with ``--config.a.b=value`` overrides."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

from varjax.train.config_utils import print_config


def run_with_config(argv: list[str], fn: Callable, what: str, *, needs_workdir: bool = True) -> None:
    """Parses ``--config FILE[:args] --workdir DIR [--config.x=y ...]`` and calls ``fn(config, workdir)``."""
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
    if fv.config is None:
        raise SystemExit(f"error: {argv[0]} needs --config configs/<file>.py[:args]")
    if needs_workdir and not fv.workdir:
        raise SystemExit(f"error: {argv[0]} needs --workdir DIR")
    print_config(fv.config)
    sys.stdout.flush()
    fn(fv.config, fv.workdir)
