"""TensorFlow and TFDS, imported quietly: the one place varjax imports them.

TensorFlow only feeds data here. Its C++ start-up notes (oneDNN's numerical-round-off note and absl's "log
messages before InitializeLog", twice each) are printed while it is imported, before ``TF_CPP_MIN_LOG_LEVEL`` is
read, so the process's standard error is pointed at the null device for the import alone. A failed import still
raises (and is reported) as usual.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # later C++ logs below errors; a value the user set wins
with _stderr_silenced():
    import tensorflow as tf  # noqa: E402
    import tensorflow_datasets as tfds  # noqa: E402

__all__ = ["tf", "tfds"]
