"""Directories given as ``gs://`` URLs: convert, train, resume, sample and a sweep (launch + fit) of VAR, and
E-CAR's ``main``, train (on a latent cache), resume and sample, write nothing under the working directory and
read back what they wrote.

The file system is ``tests/_fake_gcs.py``: ``gs://`` mapped onto a temporary directory for both layers
Orbax uses (``etils.epath``'s backend and TensorStore's kvstore spec). An in-memory file system does not
work here: TensorStore writes the arrays itself and knows only its own drivers (``file``, ``gcs``,
``memory`` within one process, with no way to list it through epath), so the mapping keeps the URLs
intact for varjax while TensorStore writes ordinary files. The commands run in this process, with the
working directory an empty temporary directory that must stay empty.
"""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import _fake_gcs, _tiny
from varjax import cli
from varjax.core import paths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gcs(tmp_path, monkeypatch, shapes_data):
    store = tmp_path / "store"
    store.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    _fake_gcs.install(monkeypatch, str(store))
    return store, cwd


def test_convert_train_resume_sample_sweep_on_gs(gcs, capsys):
    store, cwd = gcs
    from varjax.core.model_dir import load_model_dir, load_params

    # convert: the released layouts (reference vectors) to a gs:// model directory, read back
    golden = ROOT / "tests" / "data" / "golden"
    cli.main(["convert", "--vae", str(golden / "vqvae_public.pth"), "--var", str(golden / "var_public.pth"),
              "--patch-nums", "1,2,3,4,6,8", "--out", "gs://bkt/converted"])
    assert (store / "bkt" / "converted" / "varjax_model.json").is_file()
    conv = load_model_dir("gs://bkt/converted", need_generator=True)
    assert conv.family == "var" and jax.tree.leaves(conv.gen_params)
    assert os.listdir(cwd) == []

    # train to step 2, then resume to step 4 (one schedule of 4 steps: the two runs share their compiled step)
    vae_params = _tiny.save_vq("gs://bkt/tok")
    train = ["train", "--config", str(ROOT / "configs" / "var_shapes.py") + ":runlocal", "--workdir", "gs://bkt/run",
             "--config.tokenizer_dir=gs://bkt/tok", "--config.log_every=1", "--config.ckpt_every=2",
             "--config.async_ckpt=False"]
    cli.main([*train, "--config.total_steps=4", "--config.stop_at_step=2"])
    cli.main([*train, "--config.total_steps=4"])
    out = capsys.readouterr().out
    assert "resumed from step 2 in gs://bkt/run" in out
    run = store / "bkt" / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
    assert json.loads((run / "config.json").read_text())["total_steps"] == 4
    meta = json.loads((run / "varjax_model.json").read_text())
    assert meta["vae"]["params"]["model_dir"] == "gs://bkt/tok"
    # params only, from the workdir, equal to the tokenizer it was trained with
    tok = load_params("gs://bkt/run", "vae")
    jax.tree.map(np.testing.assert_array_equal, tok, vae_params)
    assert set(load_params("gs://bkt/run", "var")) >= {"head"}
    assert os.listdir(cwd) == []

    # sample from the training workdir
    cli.main(["sample", "--ckpt", "gs://bkt/run", "--labels", "0,1", "--cfg", "1", "--top-k", "5",
              "--out", "gs://bkt/samples.png", "--save-npz", "gs://bkt/samples.npz"])
    with np.load(store / "bkt" / "samples.npz") as z:
        assert z["images"].shape == (2, 32, 32, 3) and z["tokens"].shape == (2, 1 + 4 + 16 + 64)
    assert (store / "bkt" / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(cwd) == []

    # a sweep of two members (tests/test_sweep.py's programs), then the fit
    _tiny.save_vq("gs://bkt/sweep_tok", _tiny.vq_cfg(**_tiny.SWEEP_VQ))
    cli.main(["sweep", "launch", "--config", str(ROOT / _tiny.SWEEP_CONFIG) + ",depths=2+3", "--root", "gs://bkt/sweep",
              "--config.tokenizer_dir=gs://bkt/sweep_tok", "--config.async_ckpt=False"])
    sweep = store / "bkt" / "sweep"
    assert {"d2", "d3"} <= set(os.listdir(sweep)) and (sweep / "d2" / "done.json").is_file()
    cli.main(["sweep", "fit", "--root", "gs://bkt/sweep"])
    fits = json.loads((sweep / "fit" / "fits.json").read_text())
    assert len(fits["runs"]) == 2 and (sweep / "fit" / "scaling_N.png").is_file()
    assert paths.read_json("gs://bkt/sweep/fit/fits.json") == fits
    assert os.listdir(cwd) == []


# The smallest E-CAR `main`: the tokenizer and the generator of the runlocal configs, a few steps each.
TOK = ["--tok.total_steps=2", "--tok.data.name=varjax_shapes/tiny", "--tok.batch_size=8", "--tok.vae.ch=8",
       "--tok.vae.ch_mult=(1, 2, 2)", "--tok.async_ckpt=False", "--tok.ckpt_every=2"]
DEC = ["--dec.total_steps=2", "--dec.batch_size=8", "--dec.async_ckpt=False", "--dec.ckpt_every=2"]  # its fine-tune
ECAR = ["data.name=varjax_shapes/tiny", "batch_size=8", "model.depth=2", "model.embed_dim=32", "model.num_heads=2",
        "model.head_width=32", "model.head_depth=2", "stats_examples=64", "async_ckpt=False", "ckpt_every=2",
        "log_every=1", "sample.steps=2"]


def test_ecar_main_train_resume_sample_on_gs(gcs, capsys):
    store, cwd = gcs
    from varjax.core.model_dir import load_model_dir

    # main: tokenizer -> latent cache -> E-CAR -> samples and eval.json, every path a gs:// URL
    cli.main(["main", "--model", "ecar", "--workdir", "gs://bkt/main", "--per-class", "1", *TOK, *DEC,
              "--ecar.total_steps=4", "--ecar.stop_at_step=2", *(f"--ecar.{a}" for a in ECAR)])
    main = store / "bkt" / "main"
    assert {"tokenizer", "decoder", "latents_train", "ecar", "samples.png", "eval.json"} <= set(os.listdir(main))
    res = json.loads((main / "eval.json").read_text())
    assert res["family"] == "ecar" and res["num_samples"] == 6 and res["sampling"]["steps"] == 2
    assert 0 < res["decoder_gflops_per_image"] < res["gflops_per_image"]  # the decoder is part of the sampler
    man = json.loads((main / "ecar" / "varjax_model.json").read_text())
    assert man["vae"]["params"]["model_dir"] == "gs://bkt/main/decoder"  # a URL, never a local path
    saved = json.loads((main / "ecar" / "config.json").read_text())
    assert saved["latents_cache"] == "gs://bkt/main/latents_train" and saved["tokenizer_dir"] == "gs://bkt/main/decoder"
    assert os.listdir(cwd) == []

    # train: the same run resumed by `varjax train` (the tokenizer and the latent cache read from gs://)
    capsys.readouterr()
    cli.main(["train", "--config", "ecar_shapes", "--workdir", "gs://bkt/main/ecar", "--config.total_steps=4",
              "--config.tokenizer_dir=gs://bkt/main/decoder", "--config.latents_cache=gs://bkt/main/latents_train",
              *(f"--config.{a}" for a in ECAR)])
    assert "resumed from step 2 in gs://bkt/main/ecar" in capsys.readouterr().out
    assert list(_tiny.read_losses(main / "ecar")) == [1, 2, 3, 4]
    assert sorted(os.listdir(main / "ecar" / "checkpoints")) == ["2", "4"]
    b = load_model_dir("gs://bkt/main/ecar", need_generator=True)
    assert b.family == "ecar" and b.gen_cfg.latent_scale > 0
    assert os.listdir(cwd) == []

    # sample from the resumed workdir
    cli.main(["sample", "--ckpt", "gs://bkt/main/ecar", "--labels", "0,1,2,3,4,5", "--out", "gs://bkt/e.png",
              "--save-npz", "gs://bkt/e.npz"])
    with np.load(store / "bkt" / "e.npz") as z:
        assert z["images"].shape == (6, 32, 32, 3) and z["latents"].shape == (6, 8, 8, 4)
    assert (store / "bkt" / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(cwd) == []


def test_sample_many_writes_stops_and_resumes_under_a_url(gcs):
    """Every file of sample-many under gs://: images, chunks, settings, samples.npz; a run stopped after one chunk
    (a time-limited job) resumes without regenerating it and ends equal to an uninterrupted run."""
    from tests._sample_many_worker import CLASSES, OPTS, tiny_bundle
    from varjax.eval.sample_many import read_extra, sample_many

    store, cwd = gcs
    bundle = tiny_bundle()
    first = sample_many(bundle, "gs://bkt/many", classes=CLASSES, per_class=5, opts=OPTS, batch_size=8, max_chunks=1)
    assert first.npz is None and first.generated_chunks == 1
    chunk0 = store / "bkt" / "many" / "chunks" / "c000000.p000.npz"
    stamp = chunk0.stat().st_mtime_ns
    second = sample_many(bundle, "gs://bkt/many", classes=CLASSES, per_class=5, opts=OPTS, batch_size=8)
    assert second.generated_chunks == 1 and chunk0.stat().st_mtime_ns == stamp
    assert str(second.npz) == "gs://bkt/many/samples.npz"
    whole = sample_many(bundle, "gs://bkt/whole", classes=CLASSES, per_class=5, opts=OPTS, batch_size=8)
    with np.load(store / "bkt" / "many" / "samples.npz") as a, np.load(store / "bkt" / "whole" / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        assert a["arr_1"].tolist() == [3] * 5 + [7] * 5
    np.testing.assert_array_equal(read_extra("gs://bkt/many"), read_extra(whole.npz.parent))
    assert len(os.listdir(store / "bkt" / "many" / "images")) == 10
    assert json.loads((store / "bkt" / "many" / "settings.json").read_text())["per_class"] == 5
    assert os.listdir(cwd) == []


def test_fid_reads_and_writes_urls(gcs):
    store, cwd = gcs
    rng = np.random.default_rng(0)
    feats = {k: rng.normal(size=(20, 8)) for k in ("samples", "ref")}
    (store / "bkt").mkdir(exist_ok=True)
    for k, f in feats.items():  # ADM-style files: images plus the statistics and features already computed
        np.savez(store / "bkt" / f"{k}.npz", arr_0=np.zeros((20, 4, 4, 3), np.uint8), mu=f.mean(0),
                 sigma=np.cov(f, rowvar=False), pool3=f.astype(np.float32))
    cli.main(["fid", "--samples", "gs://bkt/samples.npz", "--ref", "gs://bkt/ref.npz", "--out", "gs://bkt/fid.json"])
    res = json.loads((store / "bkt" / "fid.json").read_text())
    assert res["fid"] > 0 and res["samples"] == "gs://bkt/samples.npz" and 0 <= res["recall"] <= 1
    assert os.listdir(cwd) == []


def test_convert_from_and_export_to_urls(gcs):
    from varjax.interop.torch_io import load_state_dict

    store, cwd = gcs
    golden = ROOT / "tests" / "data" / "golden"
    (store / "bkt" / "release").mkdir(parents=True)
    for name in ("vqvae_public.pth", "var_public.pth"):
        (store / "bkt" / "release" / name).write_bytes((golden / name).read_bytes())
    cli.main(["convert", "--vae", "gs://bkt/release/vqvae_public.pth", "--var", "gs://bkt/release/var_public.pth",
              "--patch-nums", "1,2,3,4,6,8", "--out", "gs://bkt/model"])
    cli.main(["export", "--ckpt", "gs://bkt/model", "--out", "gs://bkt/exported"])
    for ours, theirs in (("vae.pth", "vqvae_public.pth"), ("var.pth", "var_public.pth")):
        got, want = load_state_dict(f"gs://bkt/exported/{ours}"), load_state_dict(golden / theirs)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert not [p for p in (store / "bkt" / "exported").iterdir() if "partial" in p.name]
    assert os.listdir(cwd) == []


def test_a_folder_dataset_under_a_url_trains(gcs, capsys):
    from PIL import Image

    store, cwd = gcs
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = store / "bkt" / "images" / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (40, 36, 3), np.uint8)).save(d / f"{i}.png")
    cli.main(["train", "--config", "tokenizer_shapes:runlocal", "--workdir", "gs://bkt/tok",
              "--config.data.name=folder", "--config.data.folder=gs://bkt/images", "--config.total_steps=1",
              "--config.eval_every=0", "--config.image_every=0", "--config.async_ckpt=False"])
    rows = [json.loads(line) for line in (store / "bkt" / "tok" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
    assert "finished all 1 steps" in capsys.readouterr().out
    assert os.listdir(cwd) == []
