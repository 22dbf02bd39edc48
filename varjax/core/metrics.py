"""Training metrics: JSON lines + TensorBoard on the primary process, and a one-line progress report."""

from __future__ import annotations

import importlib
import json
import math
import numbers
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import numpy as np

from varjax.core import paths


def to_python_scalar(value: Any) -> Any:
    """Float/int/bool from a Python, numpy or jax scalar (0-d or size-1 array); other values unchanged."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        arr = np.asarray(value)
        if arr.size == 1:
            return arr.reshape(()).item()
        return arr.tolist()
    if isinstance(value, numbers.Number):
        return value.item() if hasattr(value, "item") else float(value)
    return value


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard events, on the primary process only.

    ``metrics.jsonl`` holds one JSON object per :meth:`write`, e.g. ``{"step": 10, "loss": 5.1}``; it is
    appended to, so a resumed run continues it (call :meth:`truncate_after` with the restored step first
    to drop lines of steps that are being redone). ``workdir`` may be a URL: object stores cannot append,
    so there the file is rewritten whole at each write. TensorBoard events go to ``workdir/tb`` on local
    disk, and on ``gs://`` / ``s3://`` when tensorboardX's client library for it is installed
    (google-cloud-storage / boto3); otherwise they are skipped with a note.
    """

    def __init__(self, workdir: str, is_primary: bool = True, *, tensorboard: bool = True):
        self.workdir = str(paths.resolve(workdir))
        self.is_primary = is_primary
        self.jsonl_path = str(paths.resolve(workdir) / "metrics.jsonl")
        self._remote = paths.is_url(self.workdir)
        self._tb = None
        if not is_primary:
            return
        paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
        if tensorboard and _tensorboard_supported(self.workdir):
            from tensorboardX import SummaryWriter  # imported lazily: heavy and only needed on host 0

            self._tb = SummaryWriter(logdir=f"{self.workdir}/tb")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends ``{"step": step, **metrics}`` (scalars converted to Python numbers) and logs them to TB."""
        if not self.is_primary:
            return
        record = {"step": int(step)}
        record.update({k: to_python_scalar(v) for k, v in metrics.items()})
        line = json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n"
        if self._remote:
            f = paths.resolve(self.jsonl_path)
            paths.write_text(f, (f.read_text() if f.exists() else "") + line)
        else:
            with open(self.jsonl_path, "a") as fh:
                fh.write(line)
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=int(step))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Logs each ``name -> uint8 [N, H, W, C]`` batch as one TensorBoard image grid (C = 1 or 3)."""
        if not self.is_primary or self._tb is None:
            return
        for name, batch in images.items():
            arr = np.asarray(batch)
            if arr.ndim != 4 or arr.dtype != np.uint8:
                raise ValueError(
                    f"write_images('{name}') expects a uint8 array of shape [N, H, W, C]; got "
                    f"{arr.dtype} {arr.shape}."
                )
            self._tb.add_images(name, arr, global_step=int(step), dataformats="NHWC")

    def truncate_after(self, step: int) -> int:
        """Drops lines of ``metrics.jsonl`` whose step is > ``step``; returns how many were dropped."""
        f = paths.resolve(self.jsonl_path)
        if not self.is_primary or not f.exists():
            return 0
        lines = f.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                keep = json.loads(line).get("step", -1) <= step
            except json.JSONDecodeError:
                keep = False  # a line cut short by a crash mid-write
            if keep:
                kept.append(line)
        paths.write_text(f, "".join(kept))
        return len(lines) - len(kept)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (local path or URL)."""
    return [json.loads(line) for line in paths.resolve(path).read_text().splitlines() if line.strip()]


def _tensorboard_supported(workdir: str) -> bool:
    """Whether tensorboardX can write events under ``workdir`` (prints why not when it cannot)."""
    if not paths.is_url(workdir):
        return True
    scheme = workdir.split("://", 1)[0]
    module = {"gs": "google.cloud.storage", "s3": "boto3"}.get(scheme)
    if module is not None:
        try:
            importlib.import_module(module)
            return True
        except ImportError:
            pass
    print(f"[metrics] TensorBoard events are not written for {workdir} (tensorboardX writes gs:// with "
          "google-cloud-storage and s3:// with boto3 installed); metrics.jsonl has every logged value.", flush=True)
    return False


def format_eta(seconds: float) -> str:
    """Compact duration: '45s', '3m12s', '2h05m', '3d04h'; '?' for an unknown (nan/inf/negative) time."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def compiled_flops(compiled) -> float:
    """XLA's FLOP count of a compiled program (``jax.stages.Compiled``), 0.0 where the backend gives none. Some
    jax versions return one dict per program in a list."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
    return float((cost or {}).get("flops", 0.0))


def images_per_second(steps: int, batch_size: int, seconds: float) -> float:
    """Throughput of ``steps`` steps of ``batch_size`` images in ``seconds`` (0 when no time passed)."""
    return steps * batch_size / seconds if seconds > 0 else 0.0


def eta_seconds(steps_done: int, seconds: float, steps_left: int) -> float:
    """Remaining time at the measured rate; inf before any step was measured."""
    return steps_left * seconds / steps_done if steps_done > 0 else math.inf


def format_progress(step: int, total_steps: int, metrics: Mapping[str, Any], img_per_s: float | None,
                    eta_s: float) -> str:
    """'step 120/1000 | loss 5.123 | 812 img/s | ETA 3m12s'."""
    parts = [f"step {step}/{total_steps}"]
    for key, value in metrics.items():
        value = to_python_scalar(value)
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    if img_per_s is not None:
        parts.append(f"{img_per_s:.0f} img/s")
    parts.append(f"ETA {format_eta(eta_s)}")
    return " | ".join(parts)


class Progress:
    """Prints a one-line progress report with throughput and ETA.

    On a terminal the line is rewritten in place ('\\r') at most every ``tty_every_s``; otherwise (log
    files) a new line is printed every ``every_s`` seconds. Rates are measured from the first
    :meth:`update`, so compilation time of the first step does not skew them.
    """

    def __init__(self, total_steps: int, start_step: int = 0, every_s: float = 60.0, *,
                 batch_size: int | None = None, stream: TextIO | None = None, tty_every_s: float = 0.5,
                 clock: Callable[[], float] = time.perf_counter):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stdout
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._interval = tty_every_s if self.is_tty else every_s
        self._clock = clock
        self._first_step = start_step
        self._first_time = None
        self._last_print = -math.inf

    def line(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
        """The progress text for ``step``, with rates measured since the first call."""
        now = self._clock()
        if self._first_time is None:
            self._first_time, self._first_step = now, step
        done, elapsed = step - self._first_step, now - self._first_time
        img_s = images_per_second(done, self.batch_size, elapsed) if self.batch_size else None
        eta = eta_seconds(done, elapsed, self.total_steps - step)
        return format_progress(step, self.total_steps, metrics or {}, img_s, eta)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Reports ``step`` (finished steps) when the print interval has passed; returns whether it printed.

        ``metrics`` are only read (a device sync for jax arrays) when a line is printed.
        """
        now = self._clock()
        if self._first_time is None:
            self._first_time, self._first_step = now, step
        due = force or step >= self.total_steps or now - self._last_print >= self._interval
        if not due:
            return False
        self._last_print = now
        text = self.line(step, metrics)
        if self.is_tty:
            self.stream.write("\r" + text + "\033[K")
            if step >= self.total_steps:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        return True
