"""End-to-end scaling sweep on the tiny embedded dataset: launch (3 depths), idempotent re-launch, fit."""

import csv
import json
import os

import pytest

from tests import _tiny
from varjax import cli, config, train
from varjax.models import flops
from varjax.scaling import sweep

CONFIG = _tiny.SWEEP_CONFIG
ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory, shapes_data):
    tmp = tmp_path_factory.mktemp("sweep")
    vae_cfg = _tiny.vq_cfg(**_tiny.SWEEP_VQ)
    assert vae_cfg.image_size == 32  # the tiny shapes images
    _tiny.save_vq(tmp / "tok", vae_cfg)
    overrides = [f"--config.tokenizer_dir={tmp / 'tok'}"]
    cwd = os.getcwd()
    os.chdir(ROOT_DIR)
    try:
        yield tmp, overrides
    finally:
        os.chdir(cwd)


def test_member_configs_follow_the_shape_rules():
    module = config.load_module(config.resolve_config("configs/sweep_shapes.py").partition(":")[0])
    members = config.collect_members(module.sweep, "width=8")
    assert [m["name"] for m in members] == ["d2", "d3", "d4"]
    c = config.load("configs/sweep_shapes.py:width=8,member=d3")
    assert (c.model.depth, c.model.embed_dim, c.model.num_heads) == (3, 24, 3)
    assert c.model.drop_path_rate == pytest.approx(0.1 * 3 / 24)
    assert c.eval_every == c.total_steps
    with pytest.raises(ValueError, match="unknown sweep member"):
        config.load("configs/sweep_shapes.py:member=d9")
    d30 = config.load("sweep_imagenet:member=d30")
    assert (d30.model.embed_dim, d30.model.num_heads, d30.batch_size, d30.tblr) == (1920, 30, 1024, 8e-5)
    assert config.load("sweep_imagenet:member=d16").tblr == 1e-4
    # a member built by the sweep is the config `varjax train --config SWEEP:member=NAME` loads
    member = sweep.build_member_config("configs/sweep_shapes.py:width=8", "d3", ["--config.total_steps=7"])
    assert member.to_dict() == config.load("configs/sweep_shapes.py:width=8,member=d3",
                                           [("total_steps", "7")]).to_dict()


def test_print_commands(sweep_env, capsys):
    tmp, overrides = sweep_env
    cli.main(["sweep", "launch", "--config", CONFIG, "--root", str(tmp / "printed"), "--print-commands", *overrides])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("varjax train")]
    assert len(lines) == 3
    for name, line in zip(("d2", "d3", "d4"), lines, strict=True):
        assert f":runlocal,width=8,steps=2,member={name}" in line
        assert f"--workdir={tmp / 'printed' / name}" in line
        assert overrides[0] in line
    assert not (tmp / "printed" / "d2" / "done.json").exists()
    acc = json.loads((tmp / "printed" / "d4" / "accounting.json").read_text())
    assert acc["N"] == flops.param_count_formula(acc["model"]) and acc["model"]["embed_dim"] == 32


def test_launch_fit_and_relaunch(sweep_env, capsys):
    tmp, overrides = sweep_env
    root = tmp / "run"
    calls = []

    def counting_train(cfg, workdir):
        calls.append(workdir)
        return train.train(config.resolve(cfg), workdir)

    res = sweep.launch(CONFIG, str(root), overrides, train_fn=counting_train)
    assert [r["status"] for r in res] == ["trained"] * 3
    Ns = []
    for depth in (2, 3, 4):
        d = root / f"d{depth}"
        acc = json.loads((d / "accounting.json").read_text())
        assert acc["N"] == flops.param_count_formula(acc["model"])
        assert acc["model"]["embed_dim"] == 8 * depth and acc["model"]["num_heads"] == depth
        assert acc["sequences"] == 2 * 8 and acc["tokens"] == 2 * 8 * 30
        assert acc["C_flops"] == pytest.approx(flops.train_compute(acc["model"], 16))
        done = json.loads((d / "done.json").read_text())
        assert {"L_mean", "L_tail", "acc_mean", "acc_tail"} <= set(done["final"]) and done["final"]["step"] == 2
        Ns.append(acc["N"])
    assert Ns == sorted(Ns) and len(set(Ns)) == 3

    # a second launch trains nothing
    res = sweep.launch(CONFIG, str(root), overrides, train_fn=counting_train)
    assert [r["status"] for r in res] == ["skipped"] * 3 and len(calls) == 3

    # a finished member whose log lacks the final evaluation is evaluated from its checkpoint
    m = root / "d2" / "metrics.jsonl"
    rows = [json.loads(x) for x in m.read_text().splitlines()]
    logged = {k: rows[-1][k] for k in ("L_mean", "L_tail", "acc_mean", "acc_tail")}
    rows[-1] = {k: v for k, v in rows[-1].items() if k not in logged}
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))

    capsys.readouterr()
    cli.main(["sweep", "fit", "--root", str(root)])
    out = capsys.readouterr().out
    assert "evaluating the last checkpoint" in out and "L_mean = (" in out
    fit_dir = root / "fit"
    for f in ("fits.json", "fits.csv", "points.csv", "scaling_N.png", "scaling_C.png"):
        assert (fit_dir / f).stat().st_size > 0, f
    assert (fit_dir / "scaling_N.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((fit_dir / "fits.json").read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert set(runs) == {"d2", "d3", "d4"}
    for k, v in logged.items():  # re-evaluation reproduces the trainer's own final eval
        assert runs["d2"][k] == pytest.approx(v, rel=1e-4, abs=1e-4)
    for r in runs.values():
        assert r["err_mean"] == pytest.approx(1 - r["acc_mean"] / 100)
        assert 0 <= r["err_tail"] <= 1 and r["C"] == pytest.approx(r["C_flops"] / 1e15)
    n_fits = data["reports"][0]["fits"]
    assert data["reports"][0]["x"] == "N" and n_fits["L_mean"]["n"] == 3
    with open(fit_dir / "fits.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["x"], r["y"]) for r in rows} == {(x, y) for x in ("N", "C")
                                                 for y in ("L_mean", "L_tail", "err_mean", "err_tail")}
