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
