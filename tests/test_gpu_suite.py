"""bench/gpu_suite.sh end to end in its CPU smoke mode: every varjax part runs with TensorFlow made unimportable and
writes its JSON, and the report's tables come out.

The official code's parts need a torch environment and the official checkout; without --torch-python they are
skipped, which is what runs here. The run takes about a minute of CPU; the time boxes are widened (--budget) so
that a loaded machine does not turn a slow part into a failure (bench/README.md gives the smoke run's time).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARJAX_PARTS = ("env", "attention", "golden", "remat", "train", "sample")


def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "suite"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VARJAX_COMPILE_CACHE")}  # one CPU device
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), str(out), "--cpu-smoke", "--budget", "1200", "--python",
         sys.executable, "--block-tf"],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["correct"] and summary["smoke"]
    parts = summary["parts"]
    for name in VARJAX_PARTS:
        assert parts[name]["status"] == "ok", (name, parts[name])
    assert parts["official_train_b4"]["status"] == "skipped" and "torch" in parts["official_train_b4"]["why"]
    assert summary["tf_modules"] == []  # and TensorFlow could not have been imported: --block-tf

    # correctness: the CPU runs xla against the reference (cudnn is skipped without a GPU), and the golden sample
    rows = summary["attention"]["rows"]
    assert {r["dtype"] for r in rows if r["status"] == "pass"} == {"float32", "bfloat16"}
    assert all(r["status"] in ("pass", "skipped") for r in rows)
    assert all(r["why"] == "cudnn needs an NVIDIA GPU" for r in rows if r["impl"] == "cudnn")
    checks = summary["golden"]["checks"]
    assert any(c["name"].startswith("greedy") and c["tokens_equal"] == "260/260" for c in checks)

    # training: the remat trial's choice is the one trained with; the numbers are there and finite
    remat = summary["remat"]
    assert remat["chosen"] in [c["remat"] for c in remat["candidates"]]
    (train,) = summary["train"]
    vj = train["varjax"]
    assert vj["remat"] == remat["chosen"] and vj["scan_layers"] and vj["dtype"] == "bfloat16"
    assert vj["step_time_s"] > 0 and vj["tokens_per_s"] > 0 and vj["loss"] == vj["loss"]
    assert vj["program_memory"]["total"] > 0 and vj["memory"]["peak_rss_bytes"] > 0
    assert train["official"] is None
    (sample,) = summary["sample"]
    assert sample["varjax"]["batch_size"] == 1 and sample["varjax"]["sample_time_s"] > 0

    md = (out / "summary.md").read_text()
    for heading in ("## Correctness", "## Training step", "## Sampling", "| golden model: greedy cfg sample"):
        assert heading in md
    assert (out / "logs" / "train.log").exists()
