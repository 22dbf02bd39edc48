"""Commands that read no image dataset run where TensorFlow and TFDS cannot be imported: ``export``,
``convert``, ``sample`` (VAR and E-CAR), ``edit``, ``tokenize`` of a folder, ``sample-many``, ``fid`` on an
``.npz`` and on statistics, ``compile --topology local``, and ``bench/bench_train.py`` / ``bench/bench_sample.py``
on synthetic data.

All of them run in ONE subprocess (one JAX start) whose first lines make ``tensorflow*`` unimportable, as if not
installed: ``tensorflow`` and ``tensorflow_datasets`` are marked absent in ``sys.modules`` (``import`` raises
``ModuleNotFoundError``, ``importlib.util.find_spec`` gives None, as libraries probing for TensorFlow expect)
and a ``sys.meta_path`` finder refuses every other ``tensorflow*`` module; the process also checks at the end
that nothing of TensorFlow was imported.
Their outputs are checked here against references: the official code's greedy samples of the converted reference
checkpoints (``tests/data/golden``) and the previous release's outputs on its model directories
(``tests/data/legacy/expected.npz``).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import _tiny

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "data" / "legacy"

PROLOGUE = r'''
import importlib, importlib.abc, json, sys

BLOCKED = ("tensorflow", "tensorflow_datasets")


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("tensorflow"):
            raise ModuleNotFoundError(f"{name} cannot be imported in this test", name=name)
        return None


assert not [m for m in sys.modules if m.startswith("tensorflow")]
for name in BLOCKED:
    sys.modules[name] = None  # absent: `import` fails, importlib.util.find_spec() is None
sys.meta_path.insert(0, Refuse())
'''

RUN = r'''
bench, steps = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, bench)
from varjax import cli

for kind, argv in steps:
    print(f"[no-tf] {kind} {' '.join(argv[:1])}", flush=True)
    if kind == "varjax":
        cli.main(argv)
    else:  # a benchmark script's main(argv)
        importlib.import_module(kind).main(argv)
leaked = sorted(m for m, mod in sys.modules.items() if m.startswith("tensorflow") and mod is not None)
assert not leaked, leaked
print("[no-tf] done", flush=True)
'''


def _fid_inputs(work: Path) -> dict:
    """An ADM-style .npz holding images and their stored statistics, and a statistics .npz; the FID they give."""
    from varjax.eval.fid import feature_stats, frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 8)), rng.normal(0.5, 1.2, size=(30, 8))
    (mu_a, sigma_a), (mu_b, sigma_b) = feature_stats(a), feature_stats(b)
    np.savez(work / "adm.npz", arr_0=rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8), mu=mu_a, sigma=sigma_a,
             pool3=a)
    np.savez(work / "stats.npz", mu=mu_b, sigma=sigma_b, pool3=b)
    return {"fid": frechet_distance(mu_a, sigma_a, mu_b, sigma_b)}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, golden_dir):
    """Runs every command once, in one process that cannot import TensorFlow; returns its work folder."""
    work = tmp_path_factory.mktemp("no_tf")
    with np.load(LEGACY / "expected.npz") as z:
        images = z["images_test"]
    (work / "pngs").mkdir()
    for i, im in enumerate(images):
        Image.fromarray((im * 255).round().astype(np.uint8)).save(work / "pngs" / f"{i}.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(work / "mask.png")
    want_fid = _fid_inputs(work)
    conv, legacy = str(work / "converted"), str(LEGACY / "model_dir")
    greedy = ["--cfg", "1.5", "--top-k", "1", "--top-p", "0"]
    steps = [
        ("varjax", ["export", "--ckpt", legacy, "--out", str(work / "exported")]),
        ("varjax", ["convert", "--vae", str(golden_dir / "vqvae_public.pth"), "--var",
                    str(golden_dir / "var_public.pth"), "--patch-nums", "1,2,3,4,6,8", "--out", conv]),
        ("varjax", ["sample", "--ckpt", conv, "--labels", "3,7", *greedy, "--out", str(work / "golden.png"),
                    "--save-npz", str(work / "golden.npz")]),
        ("varjax", ["sample", "--ckpt", legacy, "--labels", "0,3,5", *greedy, "--out", str(work / "var.png"),
                    "--save-npz", str(work / "var.npz")]),
        ("varjax", ["sample", "--ckpt", str(LEGACY / "ecar_main" / "ecar"), "--labels", "0,5", "--out",
                    str(work / "ecar.png"), "--save-npz", str(work / "ecar.npz")]),
        ("varjax", ["edit", "--ckpt", legacy, "--image", str(work / "pngs" / "0.png"), "--mask",
                    str(work / "mask.png"), "--label", "2", "--out", str(work / "edit.png")]),
        ("varjax", ["tokenize", "--ckpt", legacy, "--images", str(work / "pngs"), "--out", str(work / "tokens.npz")]),
        ("varjax", ["sample-many", "--ckpt", legacy, "--out", str(work / "many"), "--classes", "0,3,5",
                    "--per-class", "1", "--batch-size", "4", *greedy]),
        ("varjax", ["fid", "--samples", str(work / "adm.npz"), "--ref", str(work / "stats.npz"), "--out",
                    str(work / "fid.json")]),
        ("varjax", ["fid", "--samples", str(work / "stats.npz"), "--ref", str(work / "adm.npz"), "--out",
                    str(work / "fid2.json")]),
        ("varjax", ["compile", "--config", "var_shapes:runlocal", "--topology", "local", "--json",
                    str(work / "compile.json"), f"--config.tokenizer_dir={legacy}"]),
        ("bench_train", ["--depth", "1", "--width", "32", "--heads", "2", "--patch-nums", "1,2,4", "--vocab", "64",
                         "--cvae", "8", "--num-classes", "6", "--batch-size", "2", "--steps", "1", "--dtype",
                         "float32", "--json", str(work / "bench_train.json")]),
        ("bench_sample", ["--ckpt", legacy, "--batch-size", "2", "--steps", "1", "--json",
                          str(work / "bench_sample.json")]),
    ]
    res = subprocess.run(
        [sys.executable, "-c", PROLOGUE + RUN, str(ROOT / "bench"), json.dumps(steps)], cwd=work,
        env=_tiny.subprocess_env(XLA_FLAGS=_tiny.xla_flags(1)), capture_output=True,
        text=True, timeout=900)
    assert res.returncode == 0 and "[no-tf] done" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]
    return work, want_fid


@pytest.mark.parametrize("statement, error", [
    ("import tensorflow_datasets", "ModuleNotFoundError"), ("import tensorflow.compat.v1", "ModuleNotFoundError"),
    ("import tensorflow_io", "cannot be imported in this test"),
    ("import importlib.util; assert importlib.util.find_spec('tensorflow') is None; import varjax.data.pipeline",
     "ModuleNotFoundError"),
])
def test_the_prologue_makes_tensorflow_unimportable(statement, error):
    res = subprocess.run([sys.executable, "-c", PROLOGUE + statement], capture_output=True, text=True, timeout=300,
                         env=_tiny.subprocess_env())
    assert res.returncode != 0 and error in res.stderr and "AssertionError" not in res.stderr, res.stderr


@pytest.fixture(scope="module")
def expected():
    with np.load(LEGACY / "expected.npz") as z:
        return dict(z)


def test_export_convert_sample_and_tokenize_as_before(outputs, expected, golden_dir):
    work, _ = outputs
    assert {"vae.pth", "var.pth"} <= {p.name for p in (work / "exported").iterdir()}
    g = np.load(golden_dir / "io_public.npz")
    with np.load(work / "golden.npz") as z:  # the converted reference checkpoints sample as the official code
        np.testing.assert_array_equal(z["tokens"], g["sample_idx_BL"])
    with np.load(work / "var.npz") as z:
        np.testing.assert_array_equal(z["tokens"], expected["var_tokens"])
        np.testing.assert_allclose(z["images"], expected["var_images"], atol=1e-4)
    with np.load(work / "ecar.npz") as z:
        np.testing.assert_allclose(z["latents"], expected["ecar_latents"], atol=1e-4)
    np.testing.assert_array_equal(np.load(work / "tokens.npz")["tokens"], expected["vq_tokens"])
    assert Image.open(work / "edit.png").size == (32, 32)


def test_sample_many_and_fid(outputs, expected):
    work, want = outputs
    with np.load(work / "many" / "samples.npz") as z:
        assert z["arr_0"].shape == (3, 32, 32, 3) and z["arr_1"].tolist() == [0, 3, 5]
        # greedy: the same images as `sample` (to a uint8 level)
        assert np.abs(z["arr_0"].astype(int) - np.round(expected["var_images"] * 255).astype(int)).max() <= 1
    fid, fid2 = (json.loads((work / f).read_text()) for f in ("fid.json", "fid2.json"))
    assert fid["fid"] == pytest.approx(want["fid"], rel=1e-6) and fid2["fid"] == pytest.approx(want["fid"], rel=1e-6)
    assert fid["precision"] is not None and fid["sfid"] is None  # features stored, no spatial statistics


def test_compile_and_benchmarks(outputs):
    work, _ = outputs
    info = json.loads((work / "compile.json").read_text())
    assert info["topology"] == "local" and info["devices"] == 1 and info["flops_per_device"] > 0
    train = json.loads((work / "bench_train.json").read_text())
    assert train["batch_size"] == 2 and np.isfinite(train["loss"]) and train["step_time_s"] > 0
    sample = json.loads((work / "bench_sample.json").read_text())
    assert sample["what"] == "sample" and sample["image_size"] == 32 and sample["sample_time_s"] > 0
