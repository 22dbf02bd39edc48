"""Scaling sweeps: ``varjax sweep launch`` trains every member of a sweep, ``varjax sweep fit`` fits the laws.

A sweep file is a config file (``configs/sweep_*.py``) with two functions:

  * ``get_config(arg)``: the VAR run config; ``SWEEP.py:member=<name>`` loads that member's config (the base
    config with the member's overrides applied, by ``varjax.config``), so each member can also be trained on its
    own with ``varjax train --config SWEEP.py:member=<name> --workdir ...``.
  * ``sweep(add, arg=None)``: calls ``add(name=..., **overrides)`` once per member, overrides being dotted
    config fields written with '__' or '.' (``add(name='d2', **{'model.depth': 2})``).

Commands:

    varjax sweep launch --config SWEEP.py[:args] --root DIR [--print-commands] [--config.field=value ...]
    varjax sweep fit --root DIR [--out DIR/fit]

``launch`` trains the members one after another in this process (a member with ``DIR/<name>/done.json`` is
skipped; an interrupted one resumes from its checkpoints) and writes ``DIR/<name>/accounting.json`` with the
exact parameter count N, the training compute C and the tokens seen. ``--print-commands`` only prints one
``varjax train`` command per member (for a cluster scheduler) and writes the accounting files.

``fit`` reads each finished member's final evaluation (``metrics.jsonl``; a member without one is evaluated
from its checkpoint), fits test loss and token error rate (mean over scales and last scale) against N and,
on the Pareto frontier, against C (PFLOPs), and writes ``fits.json``, ``fits.csv``, ``points.csv`` and
``scaling_N.png`` / ``scaling_C.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from etils.epath import Path

from varjax import config, train
from varjax.core import checkpoint, paths

SWEEP_JSON = "sweep.json"
DONE_JSON = "done.json"
ACCOUNTING_JSON = "accounting.json"


# ----------------------------------------------------------------------------------------------------------
# Sweep definitions (the members are collected by varjax.config).


def _member_arg(arg: str, name: str) -> str:
    return f"{arg},member={name}" if arg else f"member={name}"


def build_member_config(config_spec: str, name: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """Exactly what ``varjax train --config CONFIG:member=NAME OVERRIDES...`` would build."""
    path, _, arg = config_spec.partition(":")
    rest, parsed = config.split_overrides(list(overrides))
    if rest:
        raise ValueError(f"sweep overrides must be written --config.field=value; got {rest}.")
    return config.load(f"{path}:{_member_arg(arg, name)}", parsed)


# ----------------------------------------------------------------------------------------------------------
# Accounting: N, C, tokens.


def exact_param_count(model_cfg) -> int:
    """Parameters of the real model, from ``jax.eval_shape`` of its initialisation (nothing is allocated)."""
    import jax
    import jax.numpy as jnp

    from varjax.core.mesh import param_count
    from varjax.models.var import VAR

    def init(rng):
        lab = jnp.zeros((1,), jnp.int32)
        x = jnp.zeros((1, model_cfg.L - model_cfg.first_l, model_cfg.Cvae), jnp.float32)
        return VAR(model_cfg).init(rng, lab, x, method=VAR.init_all)["params"]

    return int(param_count(jax.eval_shape(init, jax.random.PRNGKey(0))))


def accounting(cfg: ml_collections.ConfigDict) -> dict:
    """N (exact and by formula), training compute C (FLOPs and PFLOPs), sequences and tokens seen."""
    from varjax.models import flops

    plan = config.resolve(cfg)
    if plan.task != "var":
        raise ValueError(f"a scaling sweep trains VAR members; this config's task is {plan.task!r}.")
    model_cfg, steps = plan.model, plan.total_steps
    sequences = steps * int(cfg.batch_size)
    n_exact = exact_param_count(model_cfg)
    n_formula = int(flops.param_count_formula(model_cfg))
    if n_exact != n_formula:
        raise RuntimeError(f"parameter count of the model ({n_exact}) differs from the formula ({n_formula})")
    c = flops.train_compute(model_cfg, num_sequences=sequences)
    return {
        "N": n_exact,
        "N_formula": n_formula,
        "C_flops": float(c),
        "C_pflops": flops.to_pflops(c),
        "C_flops_dense_attention": float(flops.train_compute(model_cfg, sequences, attention="dense")),
        "total_steps": steps,
        "batch_size": int(cfg.batch_size),
        "sequences": sequences,
        "tokens": sequences * model_cfg.L,
        "tokens_per_sequence": model_cfg.L,
        "depth": model_cfg.depth,
        "embed_dim": model_cfg.embed_dim,
        "num_heads": model_cfg.num_heads,
        "model": model_cfg.to_dict(),
    }


def _write_json(path: Path, obj: Any) -> None:
    paths.write_json(path, obj)


def _read_json(path: Path) -> Any:
    return paths.read_json(path)


# ----------------------------------------------------------------------------------------------------------
# launch


def launch(
    config_spec: str,
    root: str,
    overrides: list[str] = (),
    print_commands: bool = False,
    only: list[str] | None = None,
    train_fn: Callable | None = None,
) -> list[dict]:
    """Trains (or prints the commands for) every member; returns ``[{'name', 'workdir', 'status'}]``."""
    path, _, arg = config.resolve_config(config_spec).partition(":")
    module = config.load_module(path)
    if not hasattr(module, "sweep"):
        raise ValueError(f"--config {config_spec}: {path} defines no sweep(add); it is not a sweep config.")
    members = config.collect_members(module.sweep, arg or None)
    if only:
        unknown = set(only) - {m["name"] for m in members}
        if unknown:
            raise ValueError(f"--only names unknown members {sorted(unknown)}; the sweep has "
                             f"{[m['name'] for m in members]}.")
        members = [m for m in members if m["name"] in only]
    rootp = paths.resolve(root)
    names = [m["name"] for m in members]
    if print_commands:
        rootp.mkdir(parents=True, exist_ok=True)
        _write_json(rootp / SWEEP_JSON, {"config": config_spec, "overrides": list(overrides), "members": names})
        return [_print_member(config_spec, path, arg, m["name"], rootp / m["name"], overrides) for m in members]
    # Every member's config and accounting first: a sweep that cannot start (a bad field, a missing tokenizer)
    # fails before anything is written.
    todo = {}
    for m in members:
        if not (rootp / m["name"] / DONE_JSON).is_file():
            cfg = build_member_config(config_spec, m["name"], list(overrides))
            todo[m["name"]] = (cfg, accounting(cfg))
    rootp.mkdir(parents=True, exist_ok=True)
    _write_json(rootp / SWEEP_JSON, {"config": config_spec, "overrides": list(overrides), "members": names})
    results = []
    for name in names:
        workdir = rootp / name
        done = workdir / DONE_JSON
        if name not in todo:
            print(f"[sweep] {name}: done ({done}), skipping", flush=True)
            results.append({"name": name, "workdir": str(workdir), "status": "skipped"})
            continue
        cfg, acc = todo[name]
        _write_json(workdir / ACCOUNTING_JSON, acc)
        print(
            f"[sweep] {name}: N={acc['N']:,} params, C={acc['C_pflops']:.4g} PFLOPs, "
            f"{acc['total_steps']} steps, {acc['tokens']:,} tokens -> {workdir}",
            flush=True,
        )
        last = (train_fn or _train)(cfg, str(workdir))
        final = final_eval_metrics(workdir, acc["total_steps"])
        if final is None:  # stopped early (preemption): not done; a re-run resumes it
            print(f"[sweep] {name}: training did not reach step {acc['total_steps']}; re-run to resume", flush=True)
            results.append({"name": name, "workdir": str(workdir), "status": "incomplete"})
            if checkpoint.preempted():
                break  # the job is being stopped: the other members wait for the re-run
            continue
        _write_json(done, {"name": name, "N": acc["N"], "C_flops": acc["C_flops"], "C_pflops": acc["C_pflops"],
                           "tokens": acc["tokens"], "final": final, "last_logged": last})
        results.append({"name": name, "workdir": str(workdir), "status": "trained"})
    counts = {s: sum(r["status"] == s for r in results) for s in ("trained", "skipped", "incomplete")}
    print(f"[sweep] {len(results)} members under {rootp}: {counts['trained']} trained now, {counts['skipped']} done "
          f"before, {counts['incomplete']} incomplete. Next: "
          + ("re-run the same command to finish them" if counts["incomplete"] else f"varjax sweep fit --root {root}"),
          flush=True)
    return results


def _print_member(config_spec: str, path: str, arg: str, name: str, workdir, overrides) -> dict:
    """Prints a member's `varjax train` command and writes its accounting where it can."""
    cmd = ["varjax", "train", f"--config={path}:{_member_arg(arg, name)}", f"--workdir={workdir}", *overrides]
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    try:  # best effort: `fit` needs it, but the tokenizer or data may only be reachable from the cluster
        acc = accounting(build_member_config(config_spec, name, list(overrides)))
        _write_json(workdir / ACCOUNTING_JSON, acc)
    except (ValueError, OSError) as e:
        print(
            f"# [sweep] {name}: accounting.json not written here ({e}); `varjax sweep launch` without "
            "--print-commands writes it (and skips finished members)",
            file=sys.stderr,
            flush=True,
        )
    return {"name": name, "workdir": str(workdir), "status": "printed"}


def _train(cfg, workdir: str) -> dict:
    return train.train(config.resolve(cfg), workdir)


# ----------------------------------------------------------------------------------------------------------
# fit


def read_metrics(workdir: Path) -> list[dict]:
    f = paths.resolve(workdir) / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def final_eval_metrics(workdir: Path, total_steps: int | None = None) -> dict | None:
    """The last logged line of a run that reached ``total_steps`` (None when it did not)."""
    rows = read_metrics(workdir)
    if not rows:
        return None
    last = rows[-1]
    if total_steps is not None and int(last.get("step", -1)) < total_steps:
        return None
    evals = [r for r in rows if "L_mean" in r and "L_tail" in r]
    if evals and evals[-1]["step"] == last["step"]:
        return {**last, **evals[-1]}
    return last


def evaluate_workdir(workdir: Path, cfg: ml_collections.ConfigDict) -> dict:
    """L_mean, L_tail, acc_mean, acc_tail of the latest checkpoint in ``workdir`` on the eval split."""
    from varjax.core.model_dir import load_model_dir
    from varjax.data import sources
    from varjax.tasks.var import make_eval_fn

    b = load_model_dir(workdir, need_generator=True)
    evaluate = make_eval_fn(b.tok_cfg, b.gen_cfg)
    it = sources.eval_batches(cfg.data, image_size=b.tok_cfg.image_size, global_batch_size=cfg.batch_size,
                              process_index=0, process_count=1)
    return evaluate(b.gen_params, b.tok_params, it)


def model_fid(workdir, inception: str, fid_ref: str, per_class: int = 16, seed: int = 0) -> dict:
    """FID (and sFID, IS, precision, recall) of ``per_class`` samples of every class of a member (guidance 1.5,
    no top-k or top-p)."""
    from varjax import sampling
    from varjax.core.model_dir import load_model_dir
    from varjax.eval.consistency import sample_per_class
    from varjax.eval.inception import fid_of_images

    b = load_model_dir(workdir, need_generator=True)
    opts = sampling.get(b.family).options({}, cfg=1.5, top_k=0, top_p=0.0)
    imgs, _, _ = sample_per_class(b, per_class, opts, seed, b.gen_cfg.num_classes)
    return fid_of_images(imgs, inception, fid_ref)


def member_record(workdir: Path, evaluate: bool = True) -> dict | None:
    """The fit record of a finished member, or None when it is not finished."""
    workdir = paths.resolve(workdir)
    acc_f = workdir / ACCOUNTING_JSON
    if not acc_f.is_file():
        return None
    acc = _read_json(acc_f)
    final = final_eval_metrics(workdir, acc["total_steps"])
    if final is None:
        return None
    if "L_mean" not in final:
        if not evaluate:
            return None
        print(f"[sweep] {workdir.name}: no final evaluation logged; evaluating the last checkpoint", flush=True)
        final = {**final, **evaluate_workdir(workdir, ml_collections.ConfigDict(config.load_saved(workdir)))}
    rec = {
        "name": workdir.name,
        "N": acc["N"],
        "C": acc["C_pflops"],
        "C_flops": acc["C_flops"],
        "tokens": acc["tokens"],
        "depth": acc.get("depth"),
        "L_mean": float(final["L_mean"]),
        "L_tail": float(final["L_tail"]),
        "acc_mean": float(final["acc_mean"]),
        "acc_tail": float(final["acc_tail"]),
        "err_mean": 1.0 - float(final["acc_mean"]) / 100.0,
        "err_tail": 1.0 - float(final["acc_tail"]) / 100.0,
    }
    return rec


def _member_dirs(root: Path) -> list[Path]:
    names = None
    if (root / SWEEP_JSON).is_file():
        names = _read_json(root / SWEEP_JSON).get("members")
    if names:
        return [root / n for n in names if (root / n).is_dir()]
    return sorted(p for p in root.iterdir() if (p / ACCOUNTING_JSON).is_file())


def format_law(fit: dict, x_key: str, y_key: str) -> str:
    if fit.get("alpha") is None:
        return f"{y_key} vs {x_key}: no fit ({fit.get('error', 'too few points')})"
    return (
        f"{y_key} = ({fit['beta']:.4g} * {x_key})^{fit['alpha']:.4f}   "
        f"[pearson r {fit['pearson_r']:.4f}, {fit['n']} runs: {', '.join(fit['names'])}]"
    )


def fit(root: str, out: str | None = None, evaluate: bool = True, inception: str | None = None,
        fid_ref: str | None = None, fid_per_class: int = 16) -> dict:
    """Fits the finished members under ``root``; returns ``{'records', 'report', 'paths'}``.

    With ``inception`` and ``fid_ref`` every member's samples are also scored (``fid``), and fitted.
    """
    from varjax.scaling.fit import Y_KEYS, scaling_report, write_fit_outputs
    from varjax.scaling.plot import plot_fits

    rootp = paths.resolve(root)
    if not rootp.is_dir():
        raise FileNotFoundError(2, "no such sweep root", str(root))
    out = out or str(rootp / "fit")
    records, skipped = [], []
    for d in _member_dirs(rootp):
        rec = member_record(d, evaluate=evaluate)
        (records if rec is not None else skipped).append(rec if rec is not None else d.name)
    if skipped:
        print(f"[sweep] not finished (left out): {', '.join(skipped)}", flush=True)
    if len(records) < 2:
        raise ValueError(f"{len(records)} finished member(s) under {root}; a fit needs at least 2.")
    records.sort(key=lambda r: r["N"])
    if inception or fid_ref:
        for r in records:
            r["fid"] = model_fid(rootp / r["name"], inception, fid_ref, per_class=fid_per_class)["fid"]
    report = scaling_report(records, Y_KEYS + (("fid",) if inception or fid_ref else ()))
    written = write_fit_outputs(report, records, out)
    pngs = plot_fits(records, report, out)
    print(f"[sweep] {len(records)} runs (C in PFLOPs):")
    for r in records:
        print(
            f"  {r['name']}: N={r['N']:,} C={r['C']:.4g} L_mean={r['L_mean']:.4f} L_tail={r['L_tail']:.4f} "
            f"err_mean={r['err_mean']:.4f} err_tail={r['err_tail']:.4f}"
        )
    for x_key, rep in report.items():
        print(f"[sweep] laws vs {x_key}{' (Pareto frontier)' if rep['frontier'] else ''}:")
        for y_key, f in rep["fits"].items():
            print("  " + format_law(f, x_key, y_key))
    print(f"[sweep] wrote {', '.join(sorted(written.values()))}, {', '.join(pngs)}", flush=True)
    return {"records": records, "report": report, "paths": {**written, "png": pngs}}


# ----------------------------------------------------------------------------------------------------------
# Command line.


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sweep_command", required=True)
    la = sub.add_parser("launch", help="train every member of a sweep (idempotent), or print their commands")
    la.add_argument("--config", required=True, help="sweep config file, e.g. configs/sweep_shapes.py[:args] "
                    "(fields: --config.field=value, applied to every member)")
    la.add_argument("--root", required=True, help="sweep directory; member <name> trains in ROOT/<name>")
    la.add_argument("--print-commands", action="store_true", help="print one `varjax train` line per member")
    la.add_argument("--only", default=None, help="comma-separated member names (default: all)")
    fi = sub.add_parser("fit", help="fit scaling laws to a finished sweep")
    fi.add_argument("--root", required=True)
    fi.add_argument("--out", default=None, help="output folder (default ROOT/fit)")
    fi.add_argument("--no-eval", action="store_true", help="leave out members without a logged final eval")
    fi.add_argument("--inception", default=None, help="Inception weights: also fit each member's FID")
    fi.add_argument("--fid-ref", default=None, help="reference statistics .npz for FID (see `varjax fid`)")
    fi.add_argument("--fid-per-class", type=int, default=16, help="samples per class for FID")


def command(a, rest: list[str]) -> None:
    """``varjax sweep launch|fit``: ``rest`` holds launch's ``--config.field=value`` overrides."""
    rest, parsed = config.split_overrides(rest)
    if rest or (parsed and a.sweep_command != "launch"):
        raise ValueError(f"unrecognized arguments {rest or parsed}; config overrides are written "
                         "--config.field=value and belong to `sweep launch`")
    if a.sweep_command == "launch":
        # normalised to '--config.x=value', so the overrides can be forwarded verbatim to `varjax train`
        overrides = [f"--config.{key}={text}" for key, text in parsed]
        launch(a.config, a.root, overrides, print_commands=a.print_commands,
               only=a.only.split(",") if a.only else None)
    else:
        fit(a.root, a.out, evaluate=not a.no_eval, inception=a.inception, fid_ref=a.fid_ref,
            fid_per_class=a.fid_per_class)
