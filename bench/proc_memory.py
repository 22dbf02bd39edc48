"""Resident memory of the calling process, for the benchmark scripts of both sides (varjax's and the official
code's environments): the standard library only, so it imports in either."""

from __future__ import annotations

import resource


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
