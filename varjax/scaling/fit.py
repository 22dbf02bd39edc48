"""Power-law fits and Pareto frontiers for scaling sweeps (VAR paper, Sec. 5).

A sweep is a list of run records, one dict per run, e.g.
  {"name": "d16", "N": 3.1e8, "C": 1.2e3, "L_mean": 2.9, "L_tail": 2.6, "err_mean": 0.95, "err_tail": 0.93}
with N in parameters, C in training compute (any fixed unit; the callers use PFLOPs), L_* the test
cross-entropy (nats per token, mean over all scales or over the last scale) and err_* the token error rate.

The model is the paper's power law y = (beta * x)**alpha, fitted by least squares on
log y = alpha * log x + alpha * log beta (natural logs). Compute fits use only the runs on the Pareto frontier
of (compute, y): runs beaten by one that spent no more compute are not compute-efficient, so they say nothing
about the best achievable loss at that compute.

The math (`fit_power_law`, `pareto_frontier`, `fit_report`) is pure; `write_fit_outputs` does the file I/O.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

X_KEYS = ("N", "C")
Y_KEYS = ("L_mean", "L_tail", "err_mean", "err_tail")


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """Least-squares fit of y = (beta * x)**alpha in log-log space.

    alpha: the exponent (negative when y falls with x).
    log_beta: the natural log of the scale; what the law is rebuilt from (y = exp(alpha * (log_beta + log x))).
    beta: exp(log_beta), in inverse units of x; it underflows to 0 (or overflows) for a nearly flat law, which
      log_beta does not.
    pearson_r: Pearson correlation of (log x, log y); near -1 for a clean decreasing power law.
    residuals: log y - fitted log y per point (natural log; 0.01 means the point is ~1% above the line).
    r2: coefficient of determination of the log-space fit.
    n: number of points fitted.
    """

    alpha: float
    log_beta: float
    pearson_r: float
    residuals: tuple[float, ...]
    r2: float
    n: int

    @property
    def beta(self) -> float:
        with np.errstate(over="ignore", under="ignore"):
            return float(np.exp(self.log_beta))

    def predict(self, x: Any) -> np.ndarray:
        """Fitted y at x (array-like, same units as the fitted x)."""
        return np.exp(self.alpha * (self.log_beta + np.log(np.asarray(x, dtype=np.float64))))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fit (plain floats and lists)."""
        return {
            "alpha": float(self.alpha),
            "beta": self.beta,
            "log_beta": float(self.log_beta),
            "pearson_r": float(self.pearson_r),
            "r2": float(self.r2),
            "n": int(self.n),
            "residuals": [float(r) for r in self.residuals],
        }


def _positive_finite_1d(values: Any, name: str) -> np.ndarray:
    """Returns `values` as a float64 vector, or raises if it is not 1-D, finite and > 0."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        raise ValueError(
            f"varjax/scaling/fit.py: fit_power_law needs {name} to be a 1-D sequence of finite positive "
            f"numbers (a power law is fitted on their logarithms); got {values!r}."
        )
    return arr


def fit_power_law(x: Any, y: Any) -> PowerLawFit:
    """Fits y = (beta * x)**alpha by ordinary least squares on (log x, log y).

    Args:
      x: (n,) positive values, e.g. parameters or PFLOPs.
      y: (n,) positive values, e.g. losses or error rates.
    Returns:
      PowerLawFit; `residuals` are in the input order.
    Raises:
      ValueError: on non-positive or non-finite values, mismatched lengths, fewer than 2 points, all x equal,
        or a flat fit (alpha == 0, where beta is undefined).
    """
    x_arr = _positive_finite_1d(x, "x")
    y_arr = _positive_finite_1d(y, "y")
    if x_arr.shape != y_arr.shape or x_arr.size < 2:
        raise ValueError(
            "varjax/scaling/fit.py: fit_power_law needs x and y of the same length with at least 2 points; "
            f"got {x_arr.size} x values and {y_arr.size} y values."
        )
    lx, ly = np.log(x_arr), np.log(y_arr)
    dx, dy = lx - lx.mean(), ly - ly.mean()
    sxx = float(dx @ dx)
    # Relative threshold: x values that agree to ~1e-12 carry no slope information.
    if sxx <= 1e-24 * max(1.0, float(lx @ lx)):
        raise ValueError(
            f"varjax/scaling/fit.py: fit_power_law needs at least two distinct x values; got x={x!r}."
        )
    alpha = float(dx @ dy) / sxx
    if alpha == 0.0:
        raise ValueError(
            "varjax/scaling/fit.py: the fitted exponent is exactly 0 (y does not vary with x), so beta in "
            f"y = (beta * x)**alpha is undefined; got y={y!r}."
        )
    intercept = float(ly.mean()) - alpha * float(lx.mean())
    residuals = ly - (alpha * lx + intercept)
    syy = float(dy @ dy)
    r2 = 1.0 - float(residuals @ residuals) / syy if syy > 0 else float("nan")
    pearson = float(dx @ dy) / math.sqrt(sxx * syy) if syy > 0 else float("nan")
    return PowerLawFit(
        alpha=alpha,
        log_beta=intercept / alpha,
        pearson_r=pearson,
        residuals=tuple(float(r) for r in residuals),
        r2=r2,
        n=int(x_arr.size),
    )


def pareto_frontier(compute: Any, loss: Any) -> np.ndarray:
    """Indices of the compute-efficient runs, sorted by compute (ties: by loss, then index).

    A run is on the frontier when no other run has compute <= its compute and loss <= its loss with at least
    one of the two strictly lower. Of several identical (compute, loss) runs only the first is kept, so a
    duplicated run does not count twice in a fit.

    Args:
      compute: (n,) finite values.
      loss: (n,) finite values (lower is better).
    Returns:
      int array of indices into the inputs.
    """
    c = np.asarray(compute, dtype=np.float64)
    l_ = np.asarray(loss, dtype=np.float64)
    if c.ndim != 1 or c.shape != l_.shape or not (np.all(np.isfinite(c)) and np.all(np.isfinite(l_))):
        raise ValueError(
            "varjax/scaling/fit.py: pareto_frontier needs compute and loss as 1-D sequences of finite "
            f"numbers with equal lengths; got compute={compute!r}, loss={loss!r}."
        )
    # Sweep in order of increasing compute; at equal compute the lower loss comes first, so a run is kept
    # exactly when it beats every run that spent no more compute.
    order = np.lexsort((np.arange(c.size), l_, c))
    kept, best = [], math.inf
    for i in order:
        if l_[i] < best:
            kept.append(int(i))
            best = float(l_[i])
    return np.asarray(kept, dtype=np.int64)


def _record_values(records: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """Column `key` of the run records as float64, or a clear error naming the run that lacks it."""
    values = []
    for i, rec in enumerate(records):
        value = rec.get(key)
        if value is None:
            raise ValueError(
                f"varjax/scaling/fit.py: run record {i} ('{rec.get('name', i)}') has no value for '{key}'; "
                f"every record needs the fitted keys (x in {X_KEYS}, y in {Y_KEYS})."
            )
        values.append(float(value))
    return np.asarray(values, dtype=np.float64)


def run_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The runs' 'name' fields, falling back to the record index."""
    return [str(rec.get("name", i)) for i, rec in enumerate(records)]


def fit_report(
    records: Sequence[Mapping[str, Any]],
    x_key: str,
    y_keys: Sequence[str] = Y_KEYS,
    frontier: bool = False,
) -> dict[str, Any]:
    """Fits every y in `y_keys` against `x_key` over the runs.

    With `frontier=True` (meant for compute) each y is fitted only on the Pareto frontier of (x, y),
    computed separately per y. A fit that cannot be made (e.g. a single frontier point) is reported with an
    'error' message and None values instead of stopping the whole report.

    Returns a JSON-able dict:
      {"x": x_key, "frontier": bool,
       "fits": {y: {"alpha", "beta", "pearson_r", "r2", "n", "indices", "names", "residuals", ["error"]}}}
    where indices/names are the runs used and residuals (log space) align with them.
    """
    if not records:
        raise ValueError("varjax/scaling/fit.py: fit_report got no run records; it needs at least 2 runs.")
    names = run_names(records)
    x = _record_values(records, x_key)
    fits = {}
    for y_key in y_keys:
        y = _record_values(records, y_key)
        used = pareto_frontier(x, y) if frontier else np.arange(len(records))
        entry: dict[str, Any] = {"indices": [int(i) for i in used], "names": [names[i] for i in used]}
        try:
            entry.update(fit_power_law(x[used], y[used]).to_dict())
        except ValueError as err:
            entry.update({"alpha": None, "beta": None, "log_beta": None, "pearson_r": None, "r2": None,
                          "n": len(used)})
            entry.update({"residuals": [None] * len(used), "error": str(err)})
        fits[y_key] = entry
    return {"x": x_key, "frontier": bool(frontier), "fits": fits}


def scaling_report(records: Sequence[Mapping[str, Any]], y_keys: Sequence[str] = Y_KEYS) -> dict[str, Any]:
    """The paper's two families of fits: y vs N over all runs, and y vs C over each y's Pareto frontier."""
    return {
        "N": fit_report(records, "N", y_keys, frontier=False),
        "C": fit_report(records, "C", y_keys, frontier=True),
    }


def report_list(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Accepts one `fit_report` result or a dict of them (as from `scaling_report`); returns a list."""
    if "fits" in report and "x" in report:
        return [report]
    return list(report.values())


FITS_CSV_COLUMNS = ("x", "y", "alpha", "beta", "pearson_r", "r2", "n", "frontier", "log_beta")


def _csv_value(value: Any) -> Any:
    """None becomes an empty cell; floats keep full precision."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return value


def write_fit_outputs(
    report: Mapping[str, Any], records: Sequence[Mapping[str, Any]], out_dir: str
) -> dict[str, str]:
    """Writes fits.json, fits.csv and points.csv to `out_dir` (created if needed).

    fits.json: {"reports": the report(s), "runs": records}.
    fits.csv: one row per (x, y) fit with columns FITS_CSV_COLUMNS.
    points.csv: one row per run with name, the x and y values, and a `res_<y>_vs_<x>` column per fit holding
      the run's log-space residual (empty where the run was not part of that fit).
    Returns a dict of the three paths.
    """
    from varjax.core import paths as vpaths

    reports = report_list(report)
    out = vpaths.resolve(out_dir)
    paths = {name: str(out / name) for name in ("fits.json", "fits.csv", "points.csv")}
    vpaths.write_text(paths["fits.json"], json.dumps({"reports": reports, "runs": [dict(r) for r in records]},
                                                     indent=2, default=float))

    with _csv_file(paths["fits.csv"]) as f:
        writer = csv.writer(f)
        writer.writerow(FITS_CSV_COLUMNS)
        for rep in reports:
            for y_key, fit in rep["fits"].items():
                row = {"x": rep["x"], "y": y_key, "frontier": rep["frontier"], **fit}
                writer.writerow([_csv_value(row[col]) for col in FITS_CSV_COLUMNS])

    value_keys = list(dict.fromkeys([r["x"] for r in reports] + [y for r in reports for y in r["fits"]]))
    residual_cols = {}
    for rep in reports:
        for y_key, fit in rep["fits"].items():
            by_run = dict(zip(fit["indices"], fit["residuals"], strict=True))
            residual_cols[f"res_{y_key}_vs_{rep['x']}"] = by_run
    names = run_names(records)
    with _csv_file(paths["points.csv"]) as f:
        writer = csv.writer(f)
        writer.writerow(["name", *value_keys, *residual_cols])
        for i, rec in enumerate(records):
            values = [_csv_value(rec.get(k)) for k in value_keys]
            residuals = [_csv_value(col.get(i)) for col in residual_cols.values()]
            writer.writerow([names[i], *values, *residuals])
    return paths


@contextlib.contextmanager
def _csv_file(path: str):
    """A text buffer written to ``path`` (local or URL) when the block ends."""
    from varjax.core import paths as vpaths

    buf = io.StringIO(newline="")
    yield buf
    vpaths.write_text(path, buf.getvalue())
