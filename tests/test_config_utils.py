"""Config helpers: durations, config-file arguments, saving."""

import json

import ml_collections
import pytest

from varjax.train import config_utils


def _cfg(**fields):
    return ml_collections.ConfigDict(fields)


def test_steps_from_each_unit():
    kw = dict(steps_per_epoch=100, examples_per_step=64, total_steps=1000)
    assert config_utils.steps_from(_cfg(total_steps=7, total_epochs=None), "total", **kw) == 7
    assert config_utils.steps_from(_cfg(total_epochs=2.5), "total", **kw) == 250
    assert config_utils.steps_from(_cfg(warmup_examples=640), "warmup", **kw) == 10
    assert config_utils.steps_from(_cfg(warmup_fraction=0.02), "warmup", **kw) == 20
    # Rounded to the nearest step, as the reference rounds its warm-up iterations.
    assert config_utils.steps_from(_cfg(warmup_epochs=0.026), "warmup", steps_per_epoch=100) == 3


def test_steps_from_errors_and_default():
    with pytest.raises(ValueError, match=r"several of \['total_epochs', 'total_steps'\]"):
        config_utils.steps_from(_cfg(total_steps=1, total_epochs=2), "total", steps_per_epoch=10)
    with pytest.raises(ValueError, match="no 'total' duration; set exactly one of"):
        config_utils.steps_from(_cfg(total_steps=None), "total")
    assert config_utils.steps_from(_cfg(), "eval_every", default=0) == 0
    with pytest.raises(ValueError, match="`total_epochs`=3 needs steps_per_epoch"):
        config_utils.steps_from(_cfg(total_epochs=3), "total")
    with pytest.raises(ValueError, match=">= 0"):
        config_utils.steps_from(_cfg(total_steps=-1), "total")


def test_parse_arg_types_and_shortcuts():
    spec = dict(depth=16, runlocal=False, lr=1e-4, name="var", pn=((1, 2, 3), tuple), ckpt=(None, str))
    arg = config_utils.parse_arg("depth=20,runlocal,lr=3e-4,pn=1+2+4,ckpt=/tmp/x", **spec)
    assert arg.to_dict() == dict(depth=20, runlocal=True, lr=3e-4, name="var", pn=(1, 2, 4), ckpt="/tmp/x")
    assert type(arg.depth) is int and type(arg.lr) is float
    assert config_utils.parse_arg(None, **spec).to_dict() == dict(depth=16, runlocal=False, lr=1e-4,
                                                                  name="var", pn=(1, 2, 3), ckpt=None)
    assert config_utils.parse_arg("runlocal", **spec).runlocal is True
    assert config_utils.parse_arg("24", **spec).depth == 24  # a bare value sets the first key
    assert config_utils.parse_arg("runlocal=no", **spec).runlocal is False


def test_parse_arg_errors_and_lazy():
    with pytest.raises(ValueError, match=r"Unknown config argument `width`.*\['depth'\]"):
        config_utils.parse_arg("width=3", depth=16)
    with pytest.raises(ValueError, match="`depth=abc` could not be read as int"):
        config_utils.parse_arg("depth=abc", depth=16)
    with pytest.raises(ValueError, match="`runlocal=maybe` could not be read as bool"):
        config_utils.parse_arg("runlocal=maybe", runlocal=False)
    lazy = config_utils.parse_arg("width=3,tag=abc,on=True", lazy=True, depth=16)
    assert (lazy.width, lazy.tag, lazy.on, lazy.depth) == (3, "abc", True, 16)


def test_save_and_print_config(tmp_path, capsys):
    cfg = ml_collections.ConfigDict(dict(model=dict(depth=16, pn=(1, 2)), lr=1e-4, mesh=[("data", -1)]))
    config_utils.save_config(cfg, str(tmp_path / "run"))
    data = json.loads((tmp_path / "run" / "config.json").read_text())
    assert data == {"model": {"depth": 16, "pn": [1, 2]}, "lr": 1e-4, "mesh": [["data", -1]]}
    assert config_utils.load_config_json(str(tmp_path / "run")).model.depth == 16
    txt = (tmp_path / "run" / "config.txt").read_text().splitlines()
    assert "model.depth = 16" in txt and "lr = 0.0001" in txt
    config_utils.print_config(cfg)
    assert "model.pn = (1, 2)" in capsys.readouterr().out
    config_utils.save_config(cfg, str(tmp_path / "other"), is_primary=False)
    assert not (tmp_path / "other").exists()
