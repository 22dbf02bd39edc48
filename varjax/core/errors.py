"""How every command ends when something fails: one paragraph on stderr, exit code != 0, nothing after it.

Library code raises; only :func:`boundary` (around each command, in ``varjax.cli``) prints. Two kinds of
failure end a command this way:

* bad input: ``ValueError`` or an ``OSError`` such as ``FileNotFoundError`` naming the file, flag or config
  field, what was expected and what to do (and ``SystemExit("error: ...")``). Exit code 2.
* a run that cannot go on: :class:`RunError` (a non-finite loss, a checkpoint that cannot be written, damaged
  files): what failed (the file or step), why, the last good checkpoint and what to do. Exit code 1.

Errors of the libraries underneath (Orbax, TensorStore, file systems) are translated into these where they
happen (``varjax.core.checkpoint``, ``varjax.core.model_dir``), because only there is it known which file or
run they concern. Anything else is a bug and keeps its traceback. ``varjax --debug ...`` shows the traceback of
every failure.

Argument types for argparse (:func:`at_least`, :func:`in_range`, :func:`ints`) reject bad values while parsing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

USER_EXIT_CODE = 2
RUN_EXIT_CODE = 1


class RunError(RuntimeError):
    """A run that cannot go on; the message says what failed, what is intact and what to do."""


class NonFiniteLossError(RunError):
    """The loss became NaN or infinite."""


class StorageError(RunError):
    """A checkpoint or output file could not be written or read back."""


def message(e: BaseException) -> str:
    """``error: ...``: the exception's message as one paragraph, without a repeated prefix or blank lines."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e.code if isinstance(e, SystemExit) else e)
    msg = msg.strip()
    if msg.startswith("error:"):
        msg = msg[len("error:"):].strip()
    lines = [line.rstrip() for line in msg.splitlines() if line.strip()]
    return "error: " + "\n".join(lines)


def _report(e: BaseException, code: int) -> None:
    print(message(e), file=sys.stderr, flush=True)
    sys.stdout.flush()
    # The reported failure's siblings (the other reads or writes of one Orbax/TensorStore operation) can fail too;
    # their tasks are collected at exit with the exception never retrieved, and asyncio would log each one, with a
    # traceback, after the paragraph. The paragraph already says what happened.
    logging.getLogger("asyncio").disabled = True
    raise SystemExit(code) from None


@contextlib.contextmanager
def boundary(debug: bool = False) -> Iterator[None]:
    """Turns failures raised in the block into one paragraph on stderr and ``SystemExit`` (2 or 1)."""
    try:
        yield
    except RunError as e:
        if debug:
            raise
        _report(e, RUN_EXIT_CODE)
    except (ValueError, OSError) as e:
        if debug:
            raise
        _report(e, USER_EXIT_CODE)
    except SystemExit as e:
        if debug or not isinstance(e.code, str):  # argparse and --help exit with numbers and print themselves
            raise
        _report(e, USER_EXIT_CODE)


def _number(kind: type, text: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def at_least(lo: float, kind: type = float) -> Callable[[str], int | float]:
    """argparse type: a ``kind`` number >= ``lo``."""

    def parse(text: str):
        v = _number(kind, text)
        if not v >= lo:
            raise argparse.ArgumentTypeError(f"expected a value >= {lo}, got {text}")
        return v

    return parse


def in_range(lo: float, hi: float, kind: type = float) -> Callable[[str], int | float]:
    """argparse type: a ``kind`` number in [lo, hi]."""

    def parse(text: str):
        v = _number(kind, text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected a value in [{lo}, {hi}], got {text}")
        return v

    return parse


def floats(s: str) -> tuple[float, ...]:
    """argparse type: comma-separated numbers (``1,2,3,3``)."""
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def ints(s: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers (``3,7,980``)."""
    try:
        return tuple(int(x) for x in s.replace("_", ",").split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
