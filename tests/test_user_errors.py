"""Failures a user meets on a pod and from the docs: each ends in one ``error:`` paragraph naming the file, field or
flag (and the step for a checkpoint) and what to do, a non-zero exit code and no traceback.

Config files whose ``get_config`` raises, damaged checkpoints and JSON on resume, a dataset that is not there,
an Inception file that is missing, a sweep that cannot start, a release file of the other kind; ``--debug``
anywhere on the command line shows the traceback instead.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import _tiny
from tests.test_cli_errors import check_error, run_main
from tests.test_failures import one_paragraph, train_argv, varjax

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "data" / "legacy"
GOLDEN = ROOT / "tests" / "data" / "golden"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import os

    cache = tmp_path_factory.mktemp("compile_cache")
    return {**os.environ, "VARJAX_COMPILE_CACHE": str(cache), "XLA_FLAGS": _tiny.xla_flags(1), "JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize("body, kind", [
    ("def get_config(arg=None):\n    c = common.var(3)\n    c.model.depth = depht\n    return c\n", "NameError"),
    ("def get_config(arg=None):\n    c = common.var(3)\n    return {'a': c}['b']\n", "KeyError"),
])
def test_a_config_whose_get_config_raises(tmp_path, capsys, body, kind):
    cfg = tmp_path / "mine.py"
    cfg.write_text("from varjax.configs import common\n\n\n" + body)
    code, err = run_main(["train", "--config", str(cfg), "--workdir", str(tmp_path / "run")], capsys)
    check_error(code, err, str(cfg), "line 6", kind, "get_config()")
    assert err.count("error:") == 1 and not (tmp_path / "run").exists()


def test_debug_anywhere_shows_the_traceback(tmp_path):
    cfg = tmp_path / "mine.py"
    cfg.write_text("def get_config(arg=None):\n    return undefined\n")
    from varjax import cli

    for argv in (["--debug", "train"], ["train", "--debug"]):
        with pytest.raises(ValueError, match="NameError"):
            cli.main([*argv, "--config", str(cfg), "--workdir", str(tmp_path / "run")])
    with pytest.raises(ValueError):
        cli.main(["train", "--config", str(cfg), "--workdir", str(tmp_path / "run"), "--debug"])


def _run_to_step_4(tmp_path, env):
    run = tmp_path / "run"
    r = varjax(train_argv(run, "--config.total_steps=6", "--config.stop_at_step=4"), env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.mark.parametrize("damage, names", [
    ("truncate arrays", ["checkpoints/4", "step 4", "OUT_OF_RANGE", "delete that step's directory"]),
    ("garbage metadata", ["checkpoints/4", "step 4", "state/_METADATA is not valid JSON"]),
    ("garbage config.json", ["config.json", "not valid JSON", "Delete it"]),
])
def test_a_damaged_workdir_on_resume(tmp_path, env, damage, names):
    run = _run_to_step_4(tmp_path, env)
    state = run / "checkpoints" / "4" / "state"
    if damage == "truncate arrays":
        for f in [*state.glob("d/*"), *state.glob("ocdbt.process_*/d/*")]:
            f.write_bytes(f.read_bytes()[:50])
    elif damage == "garbage metadata":
        (state / "_METADATA").write_text("garbage{")
    else:
        (run / "config.json").write_text("garbage{")
    r = varjax(train_argv(run, "--config.total_steps=6"), env, tmp_path)
    paragraph = one_paragraph(r, 1 if "config.json" not in damage else 2, *names)
    assert str(run) in paragraph


def test_a_model_directory_with_garbage_metadata(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(LEGACY / "model_dir", model)
    (model / "var" / "_METADATA").write_text("x{")
    code, err = run_main(["sample", "--ckpt", str(model), "--labels", "0", "--out", str(tmp_path / "s.png")], capsys)
    check_error(code, err, str(model / "var"), "_METADATA is not valid JSON")
    (model / "varjax_model.json").write_text("x{")
    code, err = run_main(["sample", "--ckpt", str(model), "--labels", "0", "--out", str(tmp_path / "s.png")], capsys)
    check_error(code, err, str(model / "varjax_model.json"), "not valid JSON")


def test_imagenet_without_its_files_names_the_data_fields(tmp_path, capsys):
    code, err = run_main(["train", "--config", "tokenizer_shapes:runlocal", "--workdir", str(tmp_path / "run"),
                          "--config.data.name=imagenet2012", f"--config.data.data_dir={tmp_path / 'tfds'}"], capsys)
    check_error(code, err, "config.data.name='imagenet2012'", "config.data.manual_dir", "config.data.data_dir",
                "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
    assert err.count("\n") <= 1  # one paragraph


def test_an_image_folder_without_images_names_the_folder(tmp_path, capsys):
    for c in ("a", "b"):
        (tmp_path / "imgs" / "train" / c).mkdir(parents=True)
    code, err = run_main(["train", "--config", "tokenizer_shapes:runlocal", "--workdir", str(tmp_path / "run"),
                          "--config.data.name=folder", f"--config.data.folder={tmp_path / 'imgs'}"], capsys)
    check_error(code, err, "config.data.folder", str(tmp_path / "imgs" / "train"), "holds no images")


def test_missing_inception_weights_say_where_they_come_from(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    for extra in ([], ["--inception", str(tmp_path / "nowhere.pth")]):
        code, err = run_main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), *extra],
                             capsys)
        check_error(code, err, "--inception", "pytorch-fid/releases/download/fid_weights/"
                    "pt_inception-2015-12-05-6726825d.pth", "SHA-256 starts with 6726825d")


def test_a_sweep_that_cannot_start_leaves_nothing(tmp_path, capsys):
    root = tmp_path / "sweep"
    code, err = run_main(["sweep", "launch", "--config", "sweep_shapes", "--root", str(root),
                          "--config.tokenizer_dir=" + str(tmp_path / "no_tokenizer")], capsys)
    check_error(code, err, "no_tokenizer")
    assert not root.exists()


def test_convert_names_a_release_file_of_the_other_kind(tmp_path, capsys):
    code, err = run_main(["convert", "--var", str(GOLDEN / "vqvae_public.pth"), "--out", str(tmp_path / "m")],
                         capsys)
    check_error(code, err, "--var", "vqvae_public.pth", "holds a tokenizer", "Pass it as --vae")
    code, err = run_main(["convert", "--vae", str(GOLDEN / "var_public.pth"), "--out", str(tmp_path / "m")], capsys)
    check_error(code, err, "--vae", "var_public.pth", "holds a VAR transformer", "Pass it as --var")
    assert not (tmp_path / "m").exists()


def test_the_finetune_recipe_takes_its_shape_from_init_from(tmp_path, shapes_data, capsys):
    """``tokenizer_finetune:runlocal`` asks for no config.vae field and runs on the embedded data."""
    from varjax import cli

    tok = tmp_path / "tok"
    _tiny.save_vq(tok)
    cli.main(["train-tokenizer", "--config", "tokenizer_finetune:runlocal", "--workdir", str(tmp_path / "ft"),
              f"--config.init_from={tok}", "--config.disc_start=100"])
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    manifest = json.loads((tmp_path / "ft" / "varjax_model.json").read_text())
    assert manifest["vae"]["config"]["vocab_size"] == json.loads((tok / "varjax_model.json").read_text())[
        "vae"]["config"]["vocab_size"]
    code, err = run_main(["train-tokenizer", "--config", "tokenizer_finetune:runlocal", "--workdir",
                          str(tmp_path / "ft2"), f"--config.init_from={tok}", "--config.vae.ch=160"], capsys)
    check_error(code, err, "config.vae.ch=160", str(tok))
