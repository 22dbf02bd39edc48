"""Model directories and workdirs written by the previous release (``tests/data/legacy``, see its README) load,
sample as that release sampled them, and resume; a resume with another model width is refused untouched."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import _tiny
from varjax import cli, config, train
from varjax.core import model_dir

LEGACY = Path(__file__).resolve().parent / "data" / "legacy"


@pytest.fixture(scope="module")
def expected():
    with np.load(LEGACY / "expected.npz") as z:
        return dict(z)


@pytest.mark.parametrize("path, family, generator", [
    ("model_dir", "var", True), ("var_main/var", "var", True), ("var_main/tokenizer", "vq", False),
    ("ecar_main/ecar", "ecar", True), ("ecar_main/tokenizer", "kl", False),
])
def test_every_directory_loads(path, family, generator):
    b = model_dir.load_model_dir(LEGACY / path)
    assert (b.family, b.is_generator) == (family, generator)
    assert b.tok_cfg.image_size == 32


def test_the_model_directory_and_the_workdir_sample_as_before(expected, tmp_path):
    for i, ckpt in enumerate((LEGACY / "model_dir", LEGACY / "var_main" / "var")):
        cli.main(["sample", "--ckpt", str(ckpt), "--labels", "0,3,5", "--cfg", "1.5", "--top-k", "1", "--top-p", "0",
                  "--out", str(tmp_path / f"{i}.png"), "--save-npz", str(tmp_path / f"{i}.npz")])
        with np.load(tmp_path / f"{i}.npz") as z:
            np.testing.assert_array_equal(z["tokens"], expected["var_tokens"])
            np.testing.assert_allclose(z["images"], expected["var_images"], atol=1e-4)


def test_the_ecar_workdir_samples_as_before(expected, tmp_path):
    cli.main(["sample", "--ckpt", str(LEGACY / "ecar_main" / "ecar"), "--labels", "0,5", "--out",
              str(tmp_path / "e.png"), "--save-npz", str(tmp_path / "e.npz")])  # the directory's sampling defaults
    with np.load(tmp_path / "e.npz") as z:
        np.testing.assert_allclose(z["latents"], expected["ecar_latents"], atol=1e-4)
        np.testing.assert_allclose(z["images"], expected["ecar_images"], atol=1e-4)


def test_the_tokenizer_workdir_tokenizes_and_reconstructs_as_before(expected, tmp_path):
    np.save(tmp_path / "imgs.npy", expected["images_test"])
    ckpt = str(LEGACY / "var_main" / "tokenizer")
    cli.main(["tokenize", "--ckpt", ckpt, "--images", str(tmp_path / "imgs.npy"), "--out", str(tmp_path / "t.npz")])
    cli.main(["reconstruct", "--ckpt", ckpt, "--images", str(tmp_path / "imgs.npy"), "--out", str(tmp_path / "r.npz")])
    np.testing.assert_array_equal(np.load(tmp_path / "t.npz")["tokens"], expected["vq_tokens"])
    np.testing.assert_allclose(np.load(tmp_path / "r.npz")["images"], expected["vq_recon"], atol=1e-4)
    # the KL tokenizer workdir reconstructs too (through its posterior mean)
    cli.main(["reconstruct", "--ckpt", str(LEGACY / "ecar_main" / "tokenizer"), "--images",
              str(tmp_path / "imgs.npy"), "--out", str(tmp_path / "k.npz")])
    assert np.load(tmp_path / "k.npz")["images"].shape == (4, 32, 32, 3)


def _resume_config(run: Path, spec: str, **over):
    """The config a user resumes with: the shipped file, the run's saved values, the caches' real places."""
    cfg = config.load(spec)
    saved = dict(config.flatten(json.loads((run / "config.json").read_text())))
    names = dict(config.flatten(cfg.to_dict()))
    for key, value in saved.items():
        if key in names and key not in ("tokenizer_dir", "data.tokens_cache", "latents_cache"):
            config.set_field(cfg, key, tuple(map(tuple, value)) if key in ("mesh", "rules") else
                             tuple(value) if isinstance(value, list) else value)
    cfg.tokenizer_dir = str(run.parent / "tokenizer")
    return _tiny.set_fields(cfg, async_ckpt=False, progress_every_s=1e9, **over)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def var_run(tmp_path):
    shutil.copytree(LEGACY / "var_main", tmp_path / "var_main")
    return tmp_path / "var_main" / "var"


def test_the_var_workdir_resumes_on_its_token_cache(var_run, capsys):
    cfg = _resume_config(var_run, "var_shapes:runlocal", total_steps=6,
                         data__tokens_cache=str(var_run.parent / "tokens_train"))
    before = _tiny.read_losses(var_run)
    train.train(config.resolve(cfg), str(var_run))
    out = capsys.readouterr().out
    assert f"resumed from step 4 in {var_run}" in out
    assert "resuming with changed settings" in out and "total_steps: 4 -> 6" in out
    after = _tiny.read_losses(var_run)
    assert list(after) == [1, 2, 3, 4, 5, 6]
    assert all(after[s] == before[s] for s in before)  # the old lines kept
    assert abs(after[5] - before[4]) < 0.1  # continues the run (a fresh model would start near ln(64) = 4.16)
    assert sorted(p.name for p in (var_run / "checkpoints").iterdir()) == ["6"]  # the run keeps one (keep_ckpts)
    b = model_dir.load_model_dir(var_run)  # the workdir, now in today's format, still samples
    assert b.family == "var" and json.loads((var_run / "varjax_model.json").read_text())["family"] == "var"


def test_a_changed_width_is_refused_and_nothing_is_touched(var_run):
    cfg = _resume_config(var_run, "var_shapes:runlocal", total_steps=6, model__embed_dim=64,
                         data__tokens_cache=str(var_run.parent / "tokens_train"))
    before = _digest(var_run)
    with pytest.raises(ValueError, match=r"model\.embed_dim: 32 -> 64") as e:
        train.train(config.resolve(cfg), str(var_run))
    assert "checkpoints are unchanged" in str(e.value) and "--config.init_from" in str(e.value)
    assert _digest(var_run) == before


def test_the_ecar_workdir_resumes_on_its_latent_cache(tmp_path, capsys):
    shutil.copytree(LEGACY / "ecar_main", tmp_path / "ecar_main")
    run = tmp_path / "ecar_main" / "ecar"
    # the run predates the coherent flow network: its recipe is now the file's "mlp" variant
    cfg = _resume_config(run, "ecar_shapes:runlocal,mlp", total_steps=5,
                         latents_cache=str(run.parent / "latents_train"))
    train.train(config.resolve(cfg), str(run))
    assert "resumed from step 4" in capsys.readouterr().out
    assert list(_tiny.read_losses(run)) == [1, 2, 3, 4, 5]
    man = json.loads((run / "varjax_model.json").read_text())
    assert man["ecar"]["config"]["latent_scale"] == pytest.approx(0.5682738570832189)  # kept, not re-measured
