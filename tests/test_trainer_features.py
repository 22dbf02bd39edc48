"""What a pod user expects of the trainer: EMA weights (exact on resume, used for sampling unless ``--no-ema``),
throughput in ``metrics.jsonl``, a profiler trace of chosen steps, and a persistent compilation cache.

A tiny VAR trains on the legacy fixtures' tokenizer and token cache (no TensorFlow), on the 8 test devices.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import _tiny
from varjax import cli, config
from varjax import train as train_lib
from varjax.core import checkpoint, model_dir

LEGACY = Path(__file__).resolve().parent / "data" / "legacy"


def plan(**overrides):
    base = {"tokenizer_dir": str(LEGACY / "var_main" / "tokenizer"),
            "data.tokens_cache": str(LEGACY / "var_main" / "tokens_train"), "ema_decay": "0.9"}
    base.update(overrides)
    return config.resolve(config.load("var_shapes:runlocal", list(base.items())))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    checkpoint.reset_preemption_flag()  # a signal an earlier test sent this process must not stop this run
    train_lib.train(plan(total_steps="4", profile_steps="(2, 3)", peak_tflops="1.0"), str(run))
    return run


def test_profile_steps_write_a_trace(uninterrupted):
    traces = list((uninterrupted / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0


def test_metrics_carry_tokens_per_second_and_mfu(uninterrupted):
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    L = 1 + 4 + 16 + 64  # the fixture tokenizer's scales 1-2-4-8
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(r["img_per_s"] * L)
        assert r["tflops_per_device"] > 0
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 1.0)  # the peak given by config.peak_tflops


def test_resumed_ema_equals_uninterrupted_ema(uninterrupted, tmp_path):
    checkpoint._PREEMPTED.set()  # as SIGTERM does: the run saves after its first step and stops
    try:
        train_lib.train(plan(total_steps="4"), str(tmp_path))
    finally:
        checkpoint.reset_preemption_flag()
    assert model_dir.read_manifest(tmp_path) and (tmp_path / "checkpoints" / "1").is_dir()
    train_lib.train(plan(total_steps="4"), str(tmp_path))
    for ema in (True, False):
        resumed = jax.tree.leaves(model_dir.load_params(tmp_path, "var", ema=ema))
        whole = jax.tree.leaves(model_dir.load_params(uninterrupted, "var", ema=ema))
        for a, b in zip(resumed, whole, strict=True):
            np.testing.assert_array_equal(a, b)


def test_sampling_uses_the_ema_weights_unless_no_ema(uninterrupted, tmp_path):
    assert model_dir.read_manifest(uninterrupted)["var"]["params"]["subtree"] == ["ema_params"]
    out = {}
    for flag in ([], ["--no-ema"]):
        npz = tmp_path / f"s{len(flag)}.npz"
        cli.main(["sample", "--ckpt", str(uninterrupted), "--labels", "0,1,2,3", "--top-k", "1", "--top-p", "0",
                  "--out", str(tmp_path / "s.png"), "--save-npz", str(npz), *flag])
        out[len(flag)] = np.load(npz)["tokens"]
    assert (out[0] != out[1]).any()  # greedy draws: the two weight sets give different tokens


def test_second_sample_start_loads_its_program_from_the_compilation_cache(tmp_path):
    env = {**os.environ, "VARJAX_COMPILE_CACHE": str(tmp_path / "cache"), "XLA_FLAGS": _tiny.xla_flags(1),
           "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}
    argv = [sys.executable, "-m", "varjax", "sample", "--ckpt", str(LEGACY / "model_dir"), "--labels", "0,1",
            "--out", str(tmp_path / "s.png")]
    first, second = (subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, (first.stderr[-2000:], second.stderr[-2000:])
    assert "Persistent compilation cache hit for 'jit_generate'" not in first.stderr
    assert "Persistent compilation cache hit for 'jit_generate'" in second.stderr
    assert list((tmp_path / "cache").glob("jit_generate-*"))
