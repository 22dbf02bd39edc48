"""Config helpers: durations, config-file arguments, saving (``varjax.config``, ``configs/common.py``)."""

import json

import ml_collections
import pytest
from varjax.configs import common

from varjax import config


def _cfg(**fields):
    return ml_collections.ConfigDict(fields)


def test_steps_from_each_unit():
    kw = dict(steps_per_epoch=100, examples_per_step=64, total_steps=1000)
    assert config.steps_from(_cfg(total_steps=7, total_epochs=None), "total", **kw) == 7
    assert config.steps_from(_cfg(total_epochs=2.5), "total", **kw) == 250
    assert config.steps_from(_cfg(warmup_examples=640), "warmup", **kw) == 10
    assert config.steps_from(_cfg(warmup_fraction=0.02), "warmup", **kw) == 20
    # Rounded to the nearest step, as the reference rounds its warm-up iterations.
    assert config.steps_from(_cfg(warmup_epochs=0.026), "warmup", steps_per_epoch=100) == 3


def test_steps_from_errors_and_default():
    with pytest.raises(ValueError, match=r"several of \['total_epochs', 'total_steps'\]"):
        config.steps_from(_cfg(total_steps=1, total_epochs=2), "total", steps_per_epoch=10)
    with pytest.raises(ValueError, match="no 'total' duration; set exactly one of"):
        config.steps_from(_cfg(total_steps=None), "total")
    assert config.steps_from(_cfg(), "eval_every", default=0) == 0
    with pytest.raises(ValueError, match="`total_epochs`=3 needs steps_per_epoch"):
        config.steps_from(_cfg(total_epochs=3), "total")
    with pytest.raises(ValueError, match=">= 0"):
        config.steps_from(_cfg(total_steps=-1), "total")


def test_parse_arg_types_and_shortcuts():
    spec = dict(depth=16, runlocal=False, lr=1e-4, name="var", pn=((1, 2, 3), tuple), ckpt=(None, str))
    arg = common.parse_arg("depth=20,runlocal,lr=3e-4,pn=1+2+4,ckpt=runs/x", **spec)
    assert arg.to_dict() == dict(depth=20, runlocal=True, lr=3e-4, name="var", pn=(1, 2, 4), ckpt="runs/x", member="")
    assert type(arg.depth) is int and type(arg.lr) is float
    assert common.parse_arg(None, **spec).to_dict() == dict(depth=16, runlocal=False, lr=1e-4, name="var",
                                                            pn=(1, 2, 3), ckpt=None, member="")
    assert common.parse_arg("runlocal", **spec).runlocal is True
    assert common.parse_arg("24", **spec).depth == 24  # a bare value sets the first key
    assert common.parse_arg("runlocal=no", **spec).runlocal is False


def test_parse_arg_errors_and_member():
    with pytest.raises(ValueError, match=r"Unknown config argument `width`.*\['depth'\]"):
        common.parse_arg("width=3", depth=16)
    with pytest.raises(ValueError, match="`depth=abc` could not be read as int"):
        common.parse_arg("depth=abc", depth=16)
    with pytest.raises(ValueError, match="`runlocal=maybe` could not be read as bool"):
        common.parse_arg("runlocal=maybe", runlocal=False)
    # a sweep member is always accepted (the loader applies it)
    assert common.parse_arg("depth=3,member=d2", depth=16).member == "d2"


def test_save_and_print_config(tmp_path):
    cfg = ml_collections.ConfigDict(dict(model=dict(depth=16, pn=(1, 2)), lr=1e-4, mesh=[("data", -1)]))
    config.save(cfg, str(tmp_path / "run"))
    data = json.loads((tmp_path / "run" / "config.json").read_text())
    assert data == {"model": {"depth": 16, "pn": [1, 2]}, "lr": 1e-4, "mesh": [["data", -1]]}
    assert config.load_saved(str(tmp_path / "run"))["model"]["depth"] == 16
    assert config.load_saved(str(tmp_path / "nothing")) is None
    txt = (tmp_path / "run" / "config.txt").read_text().splitlines()
    assert "model.depth = 16" in txt and "lr = 0.0001" in txt
    assert "model.pn = (1, 2)" in config.format_config(cfg).splitlines()
    # what changed since a saved config: fields both have, tuples and lists alike
    new = ml_collections.ConfigDict(dict(model=dict(depth=20, pn=[1, 2]), lr=1e-4, mesh=[("data", -1)], new=1))
    assert config.differences(data, new) == [("model.depth", 16, 20)]
