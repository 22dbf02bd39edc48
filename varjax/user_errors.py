"""How the command line meets bad input: one ``error: ...`` paragraph on stderr, exit code 2, no traceback.

Library code raises ``ValueError`` (bad value, naming the flag, file or config field and what was expected)
or an ``OSError`` such as ``FileNotFoundError`` (naming the file); ``report_user_errors`` turns those, and
``SystemExit("error: ...")`` messages, into the printed paragraph. Anything else is a bug and keeps its
traceback. ``varjax --debug ...`` shows the traceback of user errors too.

Argument types for argparse (``at_least``, ``in_range``) reject out-of-range numbers while parsing.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator

USER_ERRORS = (ValueError, OSError)
EXIT_CODE = 2


def user_message(e: BaseException) -> str:
    """``error: ...``: the exception's message, without a repeated prefix or blank lines."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e.code if isinstance(e, SystemExit) else e)
    msg = msg.strip()
    if msg.startswith("error:"):
        msg = msg[len("error:"):].strip()
    lines = [line.rstrip() for line in msg.splitlines() if line.strip()]
    return "error: " + "\n".join(lines)


@contextlib.contextmanager
def report_user_errors(debug: bool = False) -> Iterator[None]:
    """Turns user errors raised in the block into ``error: ...`` on stderr and ``SystemExit(2)``."""
    try:
        yield
    except USER_ERRORS as e:
        if debug:
            raise
        print(user_message(e), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODE) from None
    except SystemExit as e:
        if debug or not isinstance(e.code, str):  # argparse and --help exit with numbers and print themselves
            raise
        print(user_message(e), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODE) from None


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
