"""`varjax sweep fit --inception --fid-ref` scores each member and fits FID (model scoring stubbed out)."""

import json

import pytest

from varjax import cli
from varjax.scaling import sweep


def test_sweep_fit_adds_and_fits_fid(tmp_path, monkeypatch):
    Ns = {"d2": 1e5, "d3": 3e5, "d4": 1e6}
    for name, N in Ns.items():
        d = tmp_path / name
        d.mkdir()
        acc = {"N": N, "C_pflops": N * 1e-9, "C_flops": N * 1e6, "tokens": 1000, "total_steps": 2, "depth": 2}
        (d / "accounting.json").write_text(json.dumps(acc))
        row = {"step": 2, "L_mean": 5 * N**-0.1, "L_tail": 4 * N**-0.1, "acc_mean": 10.0, "acc_tail": 12.0}
        (d / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    calls = []

    def fake_model_fid(ckpt, inception, fid_ref, per_class=16, seed=0):
        calls.append((ckpt.name, inception, fid_ref, per_class))
        return {"fid": 300 * Ns[ckpt.name] ** -0.3}

    monkeypatch.setattr(sweep, "model_fid", fake_model_fid)
    cli.main(["sweep", "fit", "--root", str(tmp_path), "--inception", "w.pth", "--fid-ref", "r.npz",
              "--fid-per-class", "4"])
    assert sorted(calls) == [(n, "w.pth", "r.npz", 4) for n in sorted(Ns)]
    data = json.loads((tmp_path / "fit" / "fits.json").read_text())
    fid_fit = data["reports"][0]["fits"]["fid"]
    assert fid_fit["alpha"] == pytest.approx(-0.3, abs=1e-6)
    assert {r["name"]: r["fid"] for r in data["runs"]} == pytest.approx({n: 300 * N**-0.3 for n, N in Ns.items()})
