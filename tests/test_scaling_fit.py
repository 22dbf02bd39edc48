"""Power-law fits, Pareto frontiers, report files and plots (varjax/scaling/fit.py, plot.py)."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from varjax.scaling import fit, plot

ALPHA, BETA = -0.23, 2.0


def power_law(x, alpha=ALPHA, beta=BETA):
    return (beta * np.asarray(x, dtype=np.float64)) ** alpha


def test_recovers_noiseless_power_law_exactly():
    x = np.geomspace(1e6, 1e10, 7)
    result = fit.fit_power_law(x, power_law(x))
    assert result.alpha == pytest.approx(ALPHA, abs=1e-9)
    assert result.beta == pytest.approx(BETA, abs=1e-9)
    assert result.pearson_r == pytest.approx(-1.0, abs=1e-9)
    assert result.r2 == pytest.approx(1.0, abs=1e-9)
    assert result.n == 7
    assert np.max(np.abs(result.residuals)) < 1e-9
    np.testing.assert_allclose(result.predict(x), power_law(x), rtol=1e-9)


def test_recovers_power_law_under_lognormal_noise():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e-2, 1e3, 30)
    noise = rng.normal(0.0, 0.01, size=x.size)
    y = power_law(x) * np.exp(noise)
    result = fit.fit_power_law(x, y)
    assert result.alpha == pytest.approx(ALPHA, abs=0.01)
    assert result.beta == pytest.approx(BETA, rel=0.15)
    assert result.pearson_r < -0.99
    # Residuals are the noise minus what the line absorbed: small, centred, the right spread.
    residuals = np.asarray(result.residuals)
    assert abs(residuals.mean()) < 1e-12
    assert 0.005 < residuals.std() < 0.02
    assert np.corrcoef(residuals, noise)[0, 1] > 0.9


def test_increasing_power_law_and_two_points():
    result = fit.fit_power_law([1.0, 10.0], [3.0, 30.0])
    assert result.alpha == pytest.approx(1.0)
    assert result.beta == pytest.approx(3.0)
    assert result.pearson_r == pytest.approx(1.0)


@pytest.mark.parametrize(
    "x, y, match",
    [
        ([1.0, 2.0, 0.0], [1.0, 2.0, 3.0], "finite positive"),
        ([1.0, 2.0], [1.0, -2.0], "finite positive"),
        ([1.0, np.nan], [1.0, 2.0], "finite positive"),
        ([1.0], [1.0], "at least 2 points"),
        ([1.0, 2.0, 3.0], [1.0, 2.0], "same length"),
        ([2.0, 2.0], [1.0, 3.0], "two distinct x"),
        ([1.0, 2.0], [3.0, 3.0], "exponent is exactly 0"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
    ],
)
def test_fit_errors(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit.fit_power_law(x, y)


def test_pareto_frontier_hand_example():
    compute = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 5.0, 0.5, 6.0]
    loss = [5.0, 4.0, 4.5, 4.2, 3.0, 3.0, 2.0, 6.0, 2.0]
    # 0.5/6.0 (idx 7) and 1/5 (0) start the frontier; at compute 2 only the lower loss (1) counts;
    # 3/4.2 (3) is beaten by 2/4.0; 4/3.0 (4) is on it; 5/3.0 (5) ties 4's loss with more compute;
    # 5/2.0 (6) is on it; 6/2.0 (8) ties 6's loss with more compute.
    np.testing.assert_array_equal(fit.pareto_frontier(compute, loss), [7, 0, 1, 4, 6])


def test_pareto_frontier_duplicates_and_order():
    # Identical runs count once (the first); the result is sorted by compute, not by input order.
    np.testing.assert_array_equal(fit.pareto_frontier([3.0, 1.0, 3.0], [1.0, 2.0, 1.0]), [1, 0])
    np.testing.assert_array_equal(fit.pareto_frontier([1.0], [1.0]), [0])


def test_pareto_frontier_errors():
    with pytest.raises(ValueError, match="pareto_frontier"):
        fit.pareto_frontier([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="pareto_frontier"):
        fit.pareto_frontier([1.0, np.inf], [1.0, 2.0])


def make_records():
    """Six runs: N follows an exact power law; two runs are off the compute frontier."""
    n = np.array([1e8, 2e8, 4e8, 8e8, 1.6e9, 3.2e9])
    c = np.array([10.0, 25.0, 60.0, 150.0, 400.0, 900.0])
    records = []
    for i in range(n.size):
        records.append(
            {
                "name": f"d{8 + 4 * i}",
                "N": float(n[i]),
                "C": float(c[i]),
                "L_mean": float(power_law(n[i], -0.1, 1e-6)),
                "L_tail": float(power_law(n[i], -0.12, 1e-6)),
                "err_mean": float(power_law(n[i], -0.01, 1e-9)),
                "err_tail": float(power_law(n[i], -0.015, 1e-9)),
            }
        )
    # Run 3 trained too long: much more compute than run 4's frontier point for a worse loss.
    records[3]["C"] = 500.0
    # A duplicate-compute run that is worse than run 0.
    records.append({**records[0], "name": "d8-bad", "L_mean": records[0]["L_mean"] * 1.1})
    return records


def test_fit_report_on_model_size_uses_all_runs():
    records = make_records()[:6]
    report = fit.fit_report(records, "N", ["L_mean", "L_tail"])
    assert report["x"] == "N" and report["frontier"] is False
    fit_l = report["fits"]["L_mean"]
    assert fit_l["alpha"] == pytest.approx(-0.1, abs=1e-9)
    assert fit_l["beta"] == pytest.approx(1e-6, rel=1e-9)
    assert fit_l["n"] == 6 and fit_l["indices"] == list(range(6))
    assert fit_l["names"][0] == "d8"
    json.dumps(report)  # JSON-able


def test_fit_report_on_compute_uses_frontier_per_y():
    records = make_records()
    report = fit.fit_report(records, "C", fit.Y_KEYS, frontier=True)
    # Run 3 (C=500) is beaten by run 4 (C=400); the worse duplicate of run 0 loses to run 0 at equal compute.
    assert report["fits"]["L_mean"]["indices"] == [0, 1, 2, 4, 5]
    # For err_mean the duplicate is identical to run 0, so it is dropped as a duplicate.
    assert report["fits"]["err_mean"]["indices"] == [0, 1, 2, 4, 5]
    assert report["fits"]["L_mean"]["pearson_r"] < -0.9


def test_fit_report_records_failed_fit_instead_of_raising():
    records = [{"name": "a", "C": 1.0, "L_mean": 2.0}, {"name": "b", "C": 2.0, "L_mean": 3.0}]
    report = fit.fit_report(records, "C", ["L_mean"], frontier=True)
    entry = report["fits"]["L_mean"]
    assert entry["alpha"] is None and entry["indices"] == [0] and "at least 2 points" in entry["error"]


def test_fit_report_missing_key_error():
    with pytest.raises(ValueError, match="'b'.*'L_tail'"):
        fit.fit_report([{"name": "a", "N": 1.0, "L_tail": 1.0}, {"name": "b", "N": 2.0}], "N", ["L_tail"])


def test_write_fit_outputs(tmp_path):
    records = make_records()
    report = fit.scaling_report(records)
    paths = fit.write_fit_outputs(report, records, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths.values()) == ["fits.csv", "fits.json", "points.csv"]

    with open(paths["fits.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(fit.FITS_CSV_COLUMNS)
    assert [(r["x"], r["y"]) for r in rows] == [(x, y) for x in ("N", "C") for y in fit.Y_KEYS]
    assert float(rows[0]["alpha"]) == pytest.approx(report["N"]["fits"]["L_mean"]["alpha"])

    with open(paths["points.csv"]) as f:
        points = list(csv.DictReader(f))
    assert len(points) == len(records)
    assert list(points[0])[:7] == ["name", "N", "C", *fit.Y_KEYS]
    assert "res_L_mean_vs_C" in points[0] and "res_err_tail_vs_N" in points[0]
    assert points[3]["res_L_mean_vs_C"] == ""  # off the frontier: not fitted
    assert points[3]["res_L_mean_vs_N"] != ""

    with open(paths["fits.json"]) as f:
        saved = json.load(f)
    assert saved["reports"][1]["x"] == "C" and len(saved["runs"]) == len(records)


def test_plot_fits_writes_pngs(tmp_path):
    records = make_records()
    report = fit.scaling_report(records)
    paths = plot.plot_fits(records, report, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["scaling_N.png", "scaling_C.png"]
    for path in paths:
        assert os.path.getsize(path) > 20_000
        with Image.open(path) as image:
            assert image.mode == "RGBA"
            assert image.size[0] > 3 * image.size[1]  # four panels side by side


def test_fit_label():
    entry = {"alpha": -0.23, "beta": 2.0, "pearson_r": -0.998}
    assert plot.fit_label(entry, "N", "L_mean") == "L = (2.0e+00 N)^-0.23, r=-0.998"
    assert plot.fit_label({"alpha": None, "n": 1}, "C", "err_tail") == "no fit (1 points)"


def test_a_nearly_flat_law_is_kept_by_log_beta(tmp_path):
    """A flat sweep: beta = exp(log_beta) underflows to 0.0, but the law is rebuilt from log_beta (fits.json and
    fits.csv carry it)."""
    x = np.asarray([1e4, 3e4, 1e5, 3e5])
    y = 2.0 * x ** -1e-4 * np.asarray([1.0, 1.0 + 1e-7, 1.0, 1.0 - 1e-7])
    law = fit.fit_power_law(x, y)
    assert law.beta == 0.0 and np.isfinite(law.log_beta)
    np.testing.assert_allclose(law.predict(x), y, rtol=1e-6)
    records = [{"name": f"m{i}", "N": float(n), "C": float(n), "L_mean": float(v), "L_tail": float(v),
                "err_mean": 0.5, "err_tail": 0.5} for i, (n, v) in enumerate(zip(x, y, strict=True))]
    paths = fit.write_fit_outputs(fit.scaling_report(records), records, str(tmp_path))
    saved = json.loads(open(paths["fits.json"]).read())["reports"][0]["fits"]["L_mean"]
    rebuilt = np.exp(saved["alpha"] * (saved["log_beta"] + np.log(x)))
    np.testing.assert_allclose(rebuilt, y, rtol=1e-6)
    rows = list(csv.DictReader(open(paths["fits.csv"])))
    assert float(rows[0]["log_beta"]) == pytest.approx(saved["log_beta"])
