"""Metrics writer (JSON lines, TensorBoard) and progress formatting."""

import io
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from varjax.core import metrics


def test_jsonl_records_convert_scalars(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), is_primary=True)
    writer.write(1, {"loss": jnp.float32(2.5), "acc": np.float64(0.25), "n": np.int32(3), "lr": 1e-4,
                     "bad": float("nan"), "name": "x"})
    writer.write(2, {"loss": jnp.asarray([1.5])})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "acc": 0.25, "n": 3, "lr": 1e-4, "bad": "nan", "name": "x"},
        {"step": 2, "loss": 1.5},
    ]
    assert type(metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))[0]["n"]) is int
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_append_and_truncate_on_resume(tmp_path):
    first = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    for step in (10, 20, 30, 40):
        first.write(step, {"loss": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 45, "lo')  # a record cut short by a crash
    # Resume from the checkpoint at step 20: later records are redone, so drop them, then append.
    resumed = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    assert resumed.truncate_after(20) == 3
    resumed.write(30, {"loss": 3.0})
    steps = [(r["step"], r["loss"]) for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))]
    assert steps == [(10, 10.0), (20, 20.0), (30, 3.0)]


def test_non_primary_writes_nothing(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path / "w"), is_primary=False)
    writer.write(1, {"loss": 1.0})
    writer.write_images(1, {"samples": np.zeros((2, 4, 4, 3), np.uint8)})
    assert writer.truncate_after(0) == 0
    assert not (tmp_path / "w").exists()


def test_write_images(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path))
    writer.write_images(3, {"samples": np.zeros((4, 8, 8, 3), np.uint8)})
    with pytest.raises(ValueError, match=r"uint8 array of shape \[N, H, W, C\]"):
        writer.write_images(3, {"samples": np.zeros((8, 8, 3), np.float32)})
    writer.close()


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (45.4, "45s"), (59.6, "1m00s"), (192, "3m12s"), (3600, "1h00m"), (7500, "2h05m"),
    (3 * 86400 + 4 * 3600 + 59, "3d04h"), (math.inf, "?"), (float("nan"), "?"), (-1, "?"),
])
def test_format_eta(seconds, text):
    assert metrics.format_eta(seconds) == text


def test_rates():
    assert metrics.images_per_second(10, 64, 2.0) == 320.0
    assert metrics.images_per_second(10, 64, 0.0) == 0.0
    assert metrics.eta_seconds(10, 5.0, 100) == 50.0
    assert metrics.eta_seconds(0, 5.0, 100) == math.inf


def test_format_progress():
    line = metrics.format_progress(120, 1000, {"loss": 5.12345, "acc": jnp.float32(0.5)}, 812.4, 192)
    assert line == "step 120/1000 | loss 5.123 | acc 0.5 | 812 img/s | ETA 3m12s"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_prints_on_interval_with_measured_rate():
    clock, out = FakeClock(), io.StringIO()
    prog = metrics.Progress(total_steps=100, start_step=0, every_s=10, batch_size=32, stream=out, clock=clock)
    assert prog.update(0, {"loss": 1.0})  # first call prints and starts the clock
    clock.t = 5.0
    assert not prog.update(5)  # within the interval
    clock.t = 10.0
    assert prog.update(10, {"loss": 0.5})
    # 10 steps of 32 images in 10 s; 90 steps left at 1 step/s.
    assert out.getvalue().splitlines()[-1] == "step 10/100 | loss 0.5 | 32 img/s | ETA 1m30s"
    clock.t = 11.0
    assert prog.update(100)  # the last step always prints
    assert "\r" not in out.getvalue()


def test_progress_rewrites_line_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    clock, out = FakeClock(), Tty()
    prog = metrics.Progress(total_steps=4, every_s=60, stream=out, clock=clock)
    for step in range(1, 5):
        clock.t = step
        prog.update(step)
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n")
    assert "step 4/4" in text and "img/s" not in text
