"""Resident memory of processes and of the machine, for the benchmark scripts of both sides (varjax's and the official
code's environments): the standard library only, so it imports in either."""

from __future__ import annotations

import resource


def proc_bytes(path: str, key: str) -> int | None:
    """The ``key:`` line of a /proc file that counts in kB (``/proc/self/status``'s ``VmRSS``, ``/proc/meminfo``'s
    ``MemAvailable``) in bytes, or None where the file or the line is missing (not Linux, a process gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (Linux /proc), or None elsewhere."""
    return proc_bytes("/proc/self/status", "VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
