"""Directories given as ``gs://`` URLs: convert, train, resume, sample and a sweep (launch + fit) write
nothing under the working directory and read back what they wrote.

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
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from tests import _fake_gcs
from varjax import cli, paths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    _fake_gcs.install(monkeypatch, str(store))
    return store, cwd


def _tiny_tokenizer(url):
    from varjax.ckpt import save_model_dir
    from varjax.models.vqvae import VQVAE, VQVAEConfig

    cfg = VQVAEConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, using_sa=False,
                      using_mid_sa=False, patch_nums=(1, 2, 4, 8), num_groups=8)
    params = VQVAE(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), method=VQVAE.init_all)["params"]
    params = meta.unbox(params)  # the init carries logical-axis boxes
    save_model_dir(url, cfg, params)
    return params


def test_convert_train_resume_sample_sweep_on_gs(gcs, capsys):
    store, cwd = gcs
    from varjax.ckpt import load_model_dir, load_params

    # convert: the released layouts (reference vectors) to a gs:// model directory, read back
    golden = ROOT / "tests" / "data" / "golden"
    cli.main(["convert", "--vae", str(golden / "vqvae_public.pth"), "--var", str(golden / "var_public.pth"),
              "--patch-nums", "1,2,3,4,6,8", "--out", "gs://bkt/converted"])
    assert (store / "bkt" / "converted" / "varjax_model.json").is_file()
    conv = load_model_dir("gs://bkt/converted", need_var=True)
    assert conv.var_cfg is not None and jax.tree.leaves(conv.var_params)
    assert os.listdir(cwd) == []

    # train to step 2, then resume to step 4
    vae_params = _tiny_tokenizer("gs://bkt/tok")
    train = ["train", "--config", str(ROOT / "configs" / "var_shapes.py") + ":runlocal", "--workdir", "gs://bkt/run",
             "--config.tokenizer_dir=gs://bkt/tok", "--config.log_every=1", "--config.ckpt_every=2",
             "--config.async_ckpt=False"]
    cli.main([*train, "--config.total_steps=2"])
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
    jax.tree.map(np.testing.assert_array_equal, tok, jax.tree.map(np.asarray, vae_params))
    assert set(load_params("gs://bkt/run", "var")) >= {"head"}
    assert os.listdir(cwd) == []

    # sample from the training workdir
    cli.main(["sample", "--ckpt", "gs://bkt/run", "--labels", "0,1", "--cfg", "1", "--top-k", "5",
              "--out", "gs://bkt/samples.png", "--save-npz", "gs://bkt/samples.npz"])
    with np.load(store / "bkt" / "samples.npz") as z:
        assert z["images"].shape == (2, 32, 32, 3) and z["tokens"].shape == (2, 1 + 4 + 16 + 64)
    assert (store / "bkt" / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(cwd) == []

    # a sweep of two members, then the fit
    cli.main(["sweep", "launch", "--config", str(ROOT / "configs" / "sweep_shapes.py") + ":runlocal,depths=2+3",
              "--root", "gs://bkt/sweep", "--config.tokenizer_dir=gs://bkt/tok", "--config.async_ckpt=False"])
    sweep = store / "bkt" / "sweep"
    assert {"d2", "d3"} <= set(os.listdir(sweep)) and (sweep / "d2" / "done.json").is_file()
    cli.main(["sweep", "fit", "--root", "gs://bkt/sweep"])
    fits = json.loads((sweep / "fit" / "fits.json").read_text())
    assert len(fits["runs"]) == 2 and (sweep / "fit" / "scaling_N.png").is_file()
    assert paths.read_json("gs://bkt/sweep/fit/fits.json") == fits
    assert os.listdir(cwd) == []
