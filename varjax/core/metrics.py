"""Training metrics: JSON lines + TensorBoard on the primary process, and a one-line progress report."""

from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
import os
import socket
import struct
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


class EventFile:
    """A TensorBoard event file written in the calling thread: a failed write raises at once.

    tensorboardX's ``SummaryWriter`` writes from a thread of its own; when that thread dies (a full disk) the
    training loop blocks for good on its queue. Here each record is framed (TFRecord: length, masked CRC-32C,
    data, masked CRC-32C) and written and flushed before :meth:`add` returns. On a URL, where objects cannot be
    appended to, the file is kept in memory and rewritten whole at each :meth:`flush` (as tensorboardX does).
    """

    def __init__(self, logdir):
        from tensorboardX.proto import event_pb2

        self._event_pb2 = event_pb2
        folder = paths.resolve(logdir)
        self.path = folder / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self._remote = paths.is_url(self.path)
        self._buffer = bytearray()
        self._fh = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not self._remote:
                self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open for the run, closed by close()
        except OSError as e:
            raise paths.write_failed(self.path, e) from None
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        record = header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))
        if self._remote:
            self._buffer += record
            return
        try:
            self._fh.write(record)
            self._fh.flush()
        except OSError as e:
            raise paths.write_failed(self.path, e) from None

    def add(self, step: int, summary) -> None:
        """Writes one ``Summary`` proto (scalars, images) at ``step``."""
        self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        if self._remote and self._buffer:
            paths.write_bytes(self.path, bytes(self._buffer))

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            with contextlib.suppress(OSError):  # a failed write was reported when it happened
                self._fh.close()
            self._fh = None


def _masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _scalars_summary(values: Mapping[str, float]):
    from tensorboardX.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])


def _image_summary(tag: str, grid_HWC: np.ndarray):
    from PIL import Image
    from tensorboardX.proto.summary_pb2 import Summary

    buf = io.BytesIO()
    Image.fromarray(grid_HWC.squeeze(-1) if grid_HWC.shape[-1] == 1 else grid_HWC).save(buf, format="PNG")
    h, w, c = grid_HWC.shape
    img = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buf.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=img)])


def _grid(batch_NHWC: np.ndarray) -> np.ndarray:
    """A batch of uint8 images as one row-major grid, about square."""
    n, h, w, c = batch_NHWC.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, im in enumerate(batch_NHWC):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = im
    return grid


class MetricsWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard events, on the primary process only.

    ``metrics.jsonl`` holds one JSON object per :meth:`write`, e.g. ``{"step": 10, "loss": 5.1}``; it is
    appended to, so a resumed run continues it (call :meth:`truncate_after` with the restored step first
    to drop lines of steps that are being redone). ``workdir`` may be a URL: object stores cannot append,
    so there both files are rewritten whole at each write. TensorBoard events go to ``workdir/tb``
    (:class:`EventFile`, written in this thread).

    Every write happens before :meth:`write` returns; one that fails (a full disk) raises
    :class:`~varjax.core.errors.StorageError` naming the file, so a run ends within its step instead of hanging.
    """

    def __init__(self, workdir: str, is_primary: bool = True, *, tensorboard: bool = True):
        self.workdir = str(paths.resolve(workdir))
        self.is_primary = is_primary
        self.jsonl_path = str(paths.resolve(workdir) / "metrics.jsonl")
        self._remote = paths.is_url(self.workdir)
        self._tb = None
        if not is_primary:
            return
        try:
            paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise paths.write_failed(self.workdir, e) from None
        if tensorboard:
            self._tb = EventFile(f"{self.workdir}/tb")

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
            try:
                with open(self.jsonl_path, "a") as fh:
                    fh.write(line)
            except OSError as e:
                raise paths.write_failed(self.jsonl_path, e) from None
        if self._tb is not None:
            scalars = {k: v for k, v in record.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._tb.add(step, _scalars_summary(scalars))
            self._tb.flush()

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Logs each ``name -> uint8 [N, H, W, C]`` batch as one TensorBoard image grid (C = 1 or 3)."""
        if not self.is_primary or self._tb is None:
            return
        for name, batch in images.items():
            arr = np.asarray(batch)
            if arr.ndim != 4 or arr.dtype != np.uint8 or arr.shape[-1] not in (1, 3):
                raise ValueError(
                    f"write_images('{name}') expects a uint8 array of shape [N, H, W, C]; got "
                    f"{arr.dtype} {arr.shape}."
                )
            self._tb.add(step, _image_summary(name, _grid(arr)))
        self._tb.flush()

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
        if len(kept) != len(lines):
            paths.write_text(f, "".join(kept))
        return len(lines) - len(kept)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            tb, self._tb = self._tb, None
            tb.close()


def read_jsonl(path: str) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (local path or URL)."""
    return [json.loads(line) for line in paths.resolve(path).read_text().splitlines() if line.strip()]


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


def format_value(value: Any) -> str:
    value = to_python_scalar(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_progress(step: int, total_steps: int, metrics: Mapping[str, Any], img_per_s: float | None,
                    eta_s: float, unit: str = "step") -> str:
    """'step 120/1000 | loss 5.123 | 812 img/s | ETA 3m12s'; a rate or ETA not yet measured is left out."""
    parts = [f"{unit} {step}/{total_steps}"]
    parts += [f"{key} {format_value(value)}" for key, value in metrics.items()]
    if img_per_s:
        parts.append(f"{img_per_s:.3g} img/s" if img_per_s < 100 else f"{img_per_s:.0f} img/s")
    if math.isfinite(eta_s) and eta_s >= 0:
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
                 clock: Callable[[], float] = time.perf_counter, unit: str = "step"):
        self.total_steps = total_steps
        self.unit = unit  # what is counted: 'step', or 'image' when each unit is one image
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
        return format_progress(step, self.total_steps, metrics or {}, img_s, eta, self.unit)

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
