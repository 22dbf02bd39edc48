"""Log-log plots of scaling sweeps in the style of the VAR paper (Fig. 5 and 6).

One PNG per x (model size N, training compute C) with a panel per y (L_mean, L_tail, err_mean, err_tail):
the runs as points, the fitted power law as a line, and the fit in the legend. In compute plots the runs on
the Pareto frontier (the ones fitted) are drawn solid and the rest faded.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on training hosts

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter

from varjax.scaling.fit import report_list

AXIS_LABELS = {
    "N": "N: model parameters",
    "C": "C: training compute (PFLOPs)",
    "L_mean": "test loss, mean over scales (nats)",
    "L_tail": "test loss, last scale (nats)",
    "err_mean": "token error rate, mean over scales",
    "err_tail": "token error rate, last scale",
}


def _symbol(y_key: str) -> str:
    """Short name of a y quantity for the legend formula ('L' for losses, 'Err' for error rates)."""
    return "Err" if y_key.startswith("err") else "L"


def fit_label(fit: Mapping[str, Any], x_key: str, y_key: str) -> str:
    """Legend text such as 'L = (2.0e+00 N)^-0.23, r=-0.998'."""
    if fit.get("alpha") is None:
        return f"no fit ({fit.get('n', 0)} points)"
    return f"{_symbol(y_key)} = ({fit['beta']:.1e} {x_key})^{fit['alpha']:.3g}, r={fit['pearson_r']:.3f}"


def _draw_panel(
    ax: Any, x: np.ndarray, y: np.ndarray, fit: Mapping[str, Any], x_key: str, y_key: str, frontier: bool
) -> None:
    """One log-log panel: all runs, the fitted runs highlighted when only a frontier was fitted, the line."""
    used = np.zeros(len(x), dtype=bool)
    used[fit["indices"]] = True
    if frontier:
        ax.scatter(x[~used], y[~used], s=18, color="tab:gray", alpha=0.35, label="other runs")
        ax.scatter(x[used], y[used], s=30, color="tab:blue", edgecolors="black", label="Pareto frontier")
    else:
        ax.scatter(x, y, s=30, color="tab:blue", edgecolors="black", label="runs")
    if fit.get("alpha") is not None:
        grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
        # Through the fitted points in log space: with a near-zero exponent, beta = exp(intercept / alpha)
        # overflows or underflows, and (beta * grid) ** alpha would draw infinities.
        alpha = fit["alpha"]
        intercept = np.log(y[used]).mean() - alpha * np.log(x[used]).mean()
        line = np.exp(intercept + alpha * np.log(grid))
        ax.plot(grid, line, "--", color="tab:red", label=fit_label(fit, x_key, y_key))
    else:
        ax.plot([], [], " ", label=fit_label(fit, x_key, y_key))
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Losses span well under a decade, so plain numbers read better than powers of ten on the y axis.
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(AXIS_LABELS.get(x_key, x_key))
    ax.set_ylabel(AXIS_LABELS.get(y_key, y_key))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_fits(records: Sequence[Mapping[str, Any]], report: Mapping[str, Any], out_dir: str) -> list[str]:
    """Writes `scaling_<x>.png` to `out_dir` for each report and returns the paths.

    Args:
      records: the run records the report was fitted on (same order; see varjax/scaling/fit.py).
      report: one `fit_report` result or a dict of them, as from `scaling_report`.
      out_dir: created if needed.
    """
    from varjax.core import paths as vpaths

    paths = []
    for rep in report_list(report):
        x_key, fits = rep["x"], rep["fits"]
        x = np.asarray([float(r[x_key]) for r in records])
        fig, axes = plt.subplots(1, len(fits), figsize=(4.5 * len(fits), 4.0), squeeze=False)
        for ax, (y_key, fit) in zip(axes[0], fits.items(), strict=True):
            y = np.asarray([float(r[y_key]) for r in records])
            _draw_panel(ax, x, y, fit, x_key, y_key, rep["frontier"])
        fig.tight_layout()
        path = str(vpaths.resolve(out_dir) / f"scaling_{x_key}.png")
        buf = io.BytesIO()
        fig.savefig(buf, dpi=120, format="png")
        vpaths.write_bytes(path, buf.getvalue())
        plt.close(fig)
        paths.append(path)
    return paths
