"""Command-line overrides: one parser for ``train``/``train-tokenizer``, ``sweep`` and ``main``; list/tuple fields
in Python syntax (the README's mesh override), type checks against the field, unknown fields named with the
closest valid one."""

from pathlib import Path

import pytest

from varjax import cli, config, train

ROOT = Path(__file__).resolve().parents[1]
MESH = "[('data',-1),('fsdp',8),('tensor',1)]"


@pytest.fixture
def captured(monkeypatch):
    got = {}

    def fake_train(plan, workdir):
        got["workdir"] = workdir

    def fake_resolve(cfg, **kw):
        got["cfg"] = cfg
        return cfg

    monkeypatch.setattr(config, "resolve", fake_resolve)
    monkeypatch.setattr(train, "train", fake_train)
    return got


def test_readme_mesh_override_through_the_cli(captured):
    cli.main(["train", "--config", str(ROOT / "configs/var_d16.py"), "--workdir", "gs://bucket/runs/d16",
              f"--config.mesh={MESH}", "--config.tokenizer_dir=gs://bucket/ckpt/vae256", "--config.pg=0.5",
              "--config.data.num_shards", "4", "--config.async_ckpt=false"])
    cfg = captured["cfg"]
    assert [tuple(x) for x in cfg.mesh] == [("data", -1), ("fsdp", 8), ("tensor", 1)]
    assert cfg.tokenizer_dir == "gs://bucket/ckpt/vae256" and captured["workdir"] == "gs://bucket/runs/d16"
    assert cfg.pg == 0.5 and cfg.data.num_shards == 4 and cfg.async_ckpt is False
    assert cfg.distributed.num_processes is None  # unset stays unset


def test_tuple_field_and_tokenizer_command(captured):
    cli.main(["train-tokenizer", "--config", str(ROOT / "configs/tokenizer_shapes.py") + ":runlocal", "--workdir",
              "w", "--config.vae.patch_nums=(1, 2, 3, 4, 6, 8)", "--config.distributed.num_processes=2"])
    assert tuple(captured["cfg"].vae.patch_nums) == (1, 2, 3, 4, 6, 8)
    assert captured["cfg"].distributed.num_processes == 2


def test_unknown_field_names_the_closest(captured, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", str(ROOT / "configs/var_shapes.py"), "--workdir", "w", f"--config.mesj={MESH}"])
    assert e.value.code == 2  # user errors: one paragraph on stderr, exit code 2
    msg = capsys.readouterr().err
    assert "config.mesj" in msg and "Did you mean --config.mesh?" in msg and "Traceback" not in msg
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", str(ROOT / "configs/var_shapes.py"), "--workdir", "w",
                  "--config.model.dept=4"])
    assert "Did you mean --config.model.depth?" in capsys.readouterr().err


@pytest.mark.parametrize("flag,needle", [("--config.mesh=data", "tuple"), ("--config.batch_size=abc", "int"),
                                         ("--config.mesh=[1, 2]", "elements like"),
                                         ("--config.async_ckpt=maybe", "True/False")])
def test_wrong_types_are_reported(captured, flag, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", str(ROOT / "configs/var_shapes.py"), "--workdir", "w", flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and flag.split("=")[0] in err and "Traceback" not in err


def test_main_and_sweep_use_the_same_parser():
    from varjax.scaling.sweep import build_member_config

    cfg = config.load("var_shapes", [("mesh", MESH), ("total_steps", "7")], prefix="var")
    assert [tuple(x) for x in cfg.mesh] == [("data", -1), ("fsdp", 8), ("tensor", 1)] and cfg.total_steps == 7
    rest, overrides = config.split_overrides(["--var.total_step=7", "--other"], "var")
    assert rest == ["--other"]
    with pytest.raises(ValueError, match="Did you mean --var.total_steps"):
        config.load("var_shapes", overrides, prefix="var")
    rest, overrides = config.split_overrides(["--root", "r", "--config.mesh", MESH])
    assert rest == ["--root", "r"] and overrides == [("mesh", MESH)]
    member = build_member_config(str(ROOT / "configs/sweep_shapes.py"), "d2", [f"--config.mesh={MESH}"])
    assert [tuple(x) for x in member.mesh] == [("data", -1), ("fsdp", 8), ("tensor", 1)]


def test_main_overrides_reach_both_configs(monkeypatch):
    """``varjax main --tok.x=... --ecar.y=...``: each prefix sets its own config."""
    from varjax import demo

    got = []
    monkeypatch.setattr(demo, "run",
                        lambda model, workdir, tok, gen, per_class, dec: got.append((model, tok, gen, dec)))
    cli.main(["main", "--model", "ecar", "--tok.total_steps=3", "--ecar.total_steps", "5", "--dec.lr=1e-4",
              "--per-class", "2"])
    assert got == [("ecar", [("total_steps", "3")], [("total_steps", "5")], [("lr", "1e-4")])]
    with pytest.raises(SystemExit) as e:
        cli.main(["main", "--dec.lr=1e-4"])  # VAR's main job has no decoder fine-tune
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["main", "--model", "ecar", "--var.total_steps=3"])  # the other family's prefix
    assert e.value.code == 2


def test_parse_value_units():
    assert config.parse_value("None", 3, int) is None
    assert config.parse_value("123", "x", str) == "123"
    assert config.parse_value("1e-3", 0.1, float) == pytest.approx(1e-3)
    assert config.parse_value("[('data', 2)]", [("data", -1)], list) == [("data", 2)]
    with pytest.raises(ValueError):
        config.parse_value("2.5", 1, int)
