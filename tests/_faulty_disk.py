"""``varjax`` in this process with a disk that fills: ``python tests/_faulty_disk.py MODE PATTERN WRITES -- ARGS``.

The files opened for writing whose path contains PATTERN (``metrics.jsonl``, ``tfevents``) take WRITES writes
(a record each: one ``metrics.jsonl`` line, one event); the next one fails as a full disk fails
(``MODE=enospc``: ``OSError(ENOSPC)``) or never returns (``MODE=hang``: a write stuck in a dead file system).
Nothing else is touched, so the run goes as far as a real one would until it logs past the limit.
"""

import builtins
import errno
import io
import os
import sys
import time

MODE, PATTERN, LIMIT = sys.argv[1], sys.argv[2], int(sys.argv[3])
ARGV = sys.argv[sys.argv.index("--") + 1:]
_open = builtins.open
_written = {"writes": 0}


class _FillingFile(io.RawIOBase):
    def __init__(self, f, name):
        self._f, self.name = f, name

    def write(self, data):
        if _written["writes"] >= LIMIT:
            if MODE == "hang":
                while True:
                    time.sleep(3600)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        _written["writes"] += 1
        return self._f.write(data)

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _faulty_open(file, mode="r", *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    if isinstance(file, (str, os.PathLike)) and PATTERN in os.fspath(file) and any(m in mode for m in "wa"):
        return _FillingFile(f, os.fspath(file))
    return f


builtins.open = _faulty_open

if __name__ == "__main__":
    from varjax import cli

    cli.main(ARGV)
