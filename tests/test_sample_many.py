"""varjax sample-many: ADM npz layout, greedy parity with the reference, resume, device and process counts."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from tests import _tiny
from tests._sample_many_worker import CLASSES, OPTS, tiny_bundle
from varjax.cli import main
from varjax.core.model_dir import save_model_dir
from varjax.data.images import to_uint8
from varjax.eval.sample_many import parse_classes, read_extra, sample_many

PN = "1,2,3,4,6,8"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "model"
    main(["convert", "--vae", str(golden_dir / "vqvae_public.pth"), "--var", str(golden_dir / "var_public.pth"),
          "--patch-nums", PN, "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def full_run(bundle, tmp_path_factory):
    """10 samples (classes 3 and 7, 5 each) on 8 devices, global batch 8: two chunks, the last padded."""
    out = tmp_path_factory.mktemp("full")
    res = sample_many(bundle, out, classes=CLASSES, per_class=5, opts=OPTS, seed=0, batch_size=8)
    return out, res


def test_greedy_matches_reference_and_npz_layout(model_dir, golden_dir, tmp_path):
    g = np.load(golden_dir / "io_public.npz")
    main(["sample-many", "--ckpt", str(model_dir), "--out", str(tmp_path), "--classes", "3,7", "--per-class", "1",
          "--cfg", "1.5", "--top-k", "1", "--top-p", "0"])
    with np.load(tmp_path / "samples.npz") as z:
        assert sorted(z.keys()) == ["arr_0", "arr_1"]
        imgs, labels = z["arr_0"], z["arr_1"]
    assert imgs.dtype == np.uint8 and imgs.shape == (2, 128, 128, 3)
    assert np.issubdtype(labels.dtype, np.integer) and labels.tolist() == [3, 7]
    ref = to_uint8(g["sample_img"].transpose(0, 2, 3, 1))
    assert np.abs(imgs.astype(int) - ref.astype(int)).max() <= 1  # the reference images agree to 1e-3
    for i, c in enumerate((3, 7)):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "images" / f"c{c:04d}_i0000.png")), imgs[i])


def test_npz_is_in_class_order_with_one_png_per_sample(full_run):
    out, res = full_run
    with np.load(res.npz) as z:
        assert z["arr_0"].shape == (10, 32, 32, 3) and z["arr_1"].tolist() == [3] * 5 + [7] * 5
        imgs = z["arr_0"]
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"c{c:04d}_i{i:04d}.png" for c in (3, 7) for i in range(5)]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / "c0007_i0002.png")), imgs[7])


def test_one_device_equals_eight(bundle, full_run, tmp_path):
    res = sample_many(bundle, tmp_path, classes=CLASSES, per_class=5, opts=OPTS, seed=0, batch_size=8,
                      devices=jax.devices()[:1])
    tokens, ref_tokens = read_extra(tmp_path), read_extra(full_run[0])
    assert tokens.shape == (10, 30) and len({t.tobytes() for t in ref_tokens}) == 10  # every sample has its own key
    np.testing.assert_array_equal(tokens, ref_tokens)
    # the decoder's float rounding may differ with the per-device batch; never by more than one level
    a, b = np.load(res.npz)["arr_0"].astype(int), np.load(full_run[1].npz)["arr_0"].astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


def test_samples_depend_only_on_class_and_index(bundle, full_run, tmp_path):
    res = sample_many(bundle, tmp_path, classes=np.asarray([7], np.int32), per_class=3, opts=OPTS, seed=0,
                      batch_size=8)
    np.testing.assert_array_equal(read_extra(tmp_path), read_extra(full_run[0])[5:8])
    np.testing.assert_array_equal(np.load(res.npz)["arr_0"], np.load(full_run[1].npz)["arr_0"][5:8])


def test_interrupted_run_resumes_without_regenerating(bundle, full_run, tmp_path):
    first = sample_many(bundle, tmp_path, classes=CLASSES, per_class=5, opts=OPTS, seed=0, batch_size=8,
                        max_chunks=1)
    assert first.npz is None and first.generated_chunks == 1 and not (tmp_path / "samples.npz").exists()
    chunk0 = tmp_path / "chunks" / "c000000.p000.npz"
    stamp = chunk0.stat().st_mtime_ns
    second = sample_many(bundle, tmp_path, classes=CLASSES, per_class=5, opts=OPTS, seed=0, batch_size=8)
    assert second.generated_chunks == 1 and chunk0.stat().st_mtime_ns == stamp
    again = sample_many(bundle, tmp_path, classes=CLASSES, per_class=5, opts=OPTS, seed=0, batch_size=8)
    assert again.generated_chunks == 0
    with np.load(second.npz) as z, np.load(full_run[1].npz) as ref:
        np.testing.assert_array_equal(z["arr_0"], ref["arr_0"])
        np.testing.assert_array_equal(z["arr_1"], ref["arr_1"])
    assert len(list((tmp_path / "images").iterdir())) == 10


def test_resume_with_other_settings_is_refused(bundle, full_run):
    with pytest.raises(ValueError, match="other settings"):
        sample_many(bundle, full_run[0], classes=CLASSES, per_class=5, opts=OPTS, seed=1, batch_size=8)
    assert json.loads((full_run[0] / "settings.json").read_text())["seed"] == 0


def test_parse_classes():
    assert parse_classes("all", 4).tolist() == [0, 1, 2, 3]
    assert parse_classes("1-2", 4).tolist() == [1, 2]
    assert parse_classes("3,0", 4).tolist() == [0, 3]
    with pytest.raises(ValueError, match="--classes"):
        parse_classes("5", 4)


def test_two_processes_equal_one(bundle, full_run, tmp_path):
    """2 processes x 4 devices: each hands in its share of every batch and writes its rows."""
    model = tmp_path / "model"  # the processes load the module's model (float32 parameters: saved exactly)
    save_model_dir(model, "var", bundle.tok_cfg, bundle.tok_params, bundle.gen_cfg, bundle.gen_params)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = _tiny.subprocess_env(JAX_PLATFORMS="cpu", XLA_FLAGS=_tiny.xla_flags(4))
    worker = str(ROOT / "tests" / "_sample_many_worker.py")
    argv = [sys.executable, worker, str(model), str(tmp_path / "run"), f"localhost:{port}", "2"]
    procs = [subprocess.Popen([*argv, str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=480)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    run = tmp_path / "run"
    assert sorted(f.name for f in (run / "chunks").iterdir()) == [
        f"c{c:06d}.p{p:03d}.npz" for c in range(2) for p in range(2)]
    np.testing.assert_array_equal(read_extra(run), read_extra(full_run[0]))
    a, b = np.load(run / "samples.npz")["arr_0"].astype(int), np.load(full_run[1].npz)["arr_0"].astype(int)
    assert np.abs(a - b).max() <= 1
    np.testing.assert_array_equal(np.load(run / "samples.npz")["arr_1"], [3] * 5 + [7] * 5)


def test_ecar_samples_carry_their_latents(tmp_path):
    """sample-many dispatches on the family: an E-CAR directory (the previous release's workdir) gives images and
    latents, each sample depending only on its class and index."""
    from varjax import sampling
    from varjax.core.model_dir import load_model_dir

    b = load_model_dir(ROOT / "tests" / "data" / "legacy" / "ecar_main" / "ecar", need_generator=True)
    opts = sampling.get("ecar").options(sampling.defaults(b))
    assert (opts.cfg, opts.steps, opts.temperature) == (4.0, 2, 0.3)  # the directory's defaults
    res = sample_many(b, tmp_path / "a", classes=np.asarray([0, 5], np.int32), per_class=2, opts=opts, seed=0,
                      batch_size=4, devices=jax.devices()[:1])
    with np.load(res.npz) as z:
        assert z["arr_0"].shape == (4, 32, 32, 3) and z["arr_1"].tolist() == [0, 0, 5, 5]
    lat = read_extra(tmp_path / "a", "latents")
    assert lat.shape == (4, 8, 8, 4) and len({x.tobytes() for x in lat}) == 4
    sample_many(b, tmp_path / "b", classes=np.asarray([5], np.int32), per_class=2, opts=opts, seed=0, batch_size=4,
                devices=jax.devices()[:1])
    np.testing.assert_allclose(read_extra(tmp_path / "b", "latents"), lat[2:], atol=1e-6)
