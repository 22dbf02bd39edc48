"""A disk that fills (or hangs) under a run's metrics: the run ends within seconds in one paragraph naming the file,
exit code 1, its last finished checkpoint intact, and a re-run after space is freed resumes from it; SIGTERM ends a
run whatever it is doing.

The faults are injected into the process as a user runs it (``tests/_faulty_disk.py`` wraps ``open`` for the files
whose path names the pattern: ``metrics.jsonl`` and the TensorBoard event file), so the writes fail exactly where a
full disk would fail them. A tiny VAR trains from the legacy fixtures' tokenizer and token cache (no TensorFlow).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import _tiny
from tests.test_failures import one_paragraph, train_argv, varjax

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "_faulty_disk.py"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("compile_cache")
    return {**os.environ, "VARJAX_COMPILE_CACHE": str(cache), "XLA_FLAGS": _tiny.xla_flags(1), "JAX_PLATFORMS": "cpu"}


def faulty(mode, pattern, limit, argv, env, cwd, timeout=240):
    return subprocess.run([sys.executable, str(HELPER), mode, pattern, str(limit), "--", *map(str, argv)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("pattern, name", [("metrics.jsonl", "metrics.jsonl"), ("tfevents", "events.out.tfevents")])
def test_a_full_disk_under_the_metrics_ends_the_run_and_the_rerun_resumes(tmp_path, env, pattern, name):
    run = tmp_path / "run"
    argv = train_argv(run, "--config.total_steps=6")
    # The first 2 steps' records fit (the event file starts with a version record); the 3rd step's does not. A hang
    # here would be a TimeoutExpired of the subprocess.
    r = faulty("enospc", pattern, 2 if pattern == "metrics.jsonl" else 3, argv, env, tmp_path)
    paragraph = one_paragraph(r, 1, name, "No space left on device", "re-run the same command")
    assert str(run) in paragraph
    assert (run / "checkpoints" / "2").is_dir(), r.stdout[-2000:]
    again = varjax(argv, env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 2" in again.stdout
    assert (run / "checkpoints" / "6").is_dir()
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(steps) == 6


def test_sigterm_ends_a_run_stuck_in_a_write(tmp_path, env):
    """A write that never returns (a dead file system): SIGTERM still ends the run, after the grace period, in one
    paragraph naming the checkpoints it leaves."""
    run = tmp_path / "run"
    argv = train_argv(run, "--config.total_steps=6")
    proc = subprocess.Popen([sys.executable, str(HELPER), "hang", "metrics.jsonl", "2", "--", *map(str, argv)],
                            env={**env, "VARJAX_SIGTERM_GRACE_S": "3"}, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run / "checkpoints" / "2").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(2)  # the 3rd step's record is the one that hangs
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    one_paragraph(r, 1, "SIGTERM", str(run / "checkpoints"), "re-run the same command")
