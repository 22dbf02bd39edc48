"""Scaling sweeps: ``varjax sweep launch`` trains every member of a sweep, ``varjax sweep fit`` fits the laws.

A sweep file is a config file (``configs/sweep_*.py``) with two functions:

  * ``get_config(arg)``: the VAR run config; with ``arg`` containing ``member=<name>`` it returns that member's
    config (the base config with the member's overrides applied; see :func:`member_config`), so each member
    can also be trained on its own with ``varjax train --config SWEEP.py:member=<name> --workdir ...``.
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
import importlib.util
import inspect
import json
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from etils.epath import Path

from varjax import paths

SWEEP_JSON = "sweep.json"
DONE_JSON = "done.json"
ACCOUNTING_JSON = "accounting.json"


# ----------------------------------------------------------------------------------------------------------
# Sweep definitions.


def _dotted(key: str) -> str:
    return key.replace("__", ".")


def collect_members(sweep_fn: Callable, arg: Any = None) -> list[dict]:
    """Runs ``sweep_fn(add, arg)``; returns ``[{'name': ..., 'overrides': {dotted: value}}]`` in order."""
    members: list[dict] = []

    def add(name: str, **overrides) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"sweep member name {name!r} must be a plain, non-empty directory name.")
        if any(m["name"] == name for m in members):
            raise ValueError(f"sweep member name {name!r} is used twice.")
        members.append({"name": name, "overrides": {_dotted(k): v for k, v in overrides.items()}})

    if len(inspect.signature(sweep_fn).parameters) >= 2:
        sweep_fn(add, arg)
    else:
        sweep_fn(add)
    if not members:
        raise ValueError("the sweep defines no members (sweep(add) never called add).")
    return members


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted fields of ``cfg`` (each must exist) and returns it."""
    for key, value in overrides.items():
        parent, path = cfg, key.split(".")
        for i, p in enumerate(path):
            if p not in parent:
                raise ValueError(f"sweep override '{key}': the config has no field '{p}'.")
            if i < len(path) - 1:
                parent = parent[p]
        parent[path[-1]] = value
    return cfg


def member_config(cfg: ml_collections.ConfigDict, sweep_fn: Callable, member: str, arg: Any = None):
    """``cfg`` with the overrides of sweep member ``member`` applied (``cfg`` itself when ``member`` is empty)."""
    if not member:
        return cfg
    members = {m["name"]: m for m in collect_members(sweep_fn, arg)}
    if member not in members:
        raise ValueError(f"unknown sweep member {member!r}; the sweep has {sorted(members)}.")
    return apply_overrides(cfg, members[member]["overrides"])


def load_sweep_module(path: str):
    """Imports a sweep config file (path without any ':args')."""
    spec = importlib.util.spec_from_file_location(f"_varjax_sweep_{abs(hash(path))}", path)
    if spec is None or not os.path.isfile(path):
        raise SystemExit(f"error: sweep config {path!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for fn in ("get_config", "sweep"):
        if not hasattr(module, fn):
            raise SystemExit(f"error: {path} must define get_config(arg) and sweep(add, arg=None); it lacks {fn}.")
    return module


def _split_config_arg(config: str) -> tuple[str, str]:
    path, _, arg = config.partition(":")
    return path, arg


def _member_arg(arg: str, name: str) -> str:
    return f"{arg},member={name}" if arg else f"member={name}"


def build_member_config(config: str, name: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """Exactly what ``varjax train --config CONFIG:member=NAME OVERRIDES...`` would build."""
    from varjax.train.cli_flags import config_from_args, split_overrides

    path, arg = _split_config_arg(config)
    rest, parsed = split_overrides(list(overrides))
    if rest:
        raise ValueError(f"sweep overrides must be written --config.field=value; got {rest}.")
    return config_from_args(f"{path}:{_member_arg(arg, name)}", parsed)


# ----------------------------------------------------------------------------------------------------------
# Accounting: N, C, tokens.


def model_config_for(cfg: ml_collections.ConfigDict):
    """The VARConfig a run config trains (tokenizer sizes read from ``cfg.tokenizer_dir``)."""
    from varjax.ckpt import read_model_json
    from varjax.data import pipeline
    from varjax.models.vqvae import VQVAEConfig
    from varjax.train.var_trainer import var_config_from

    if not cfg.get("tokenizer_dir"):
        raise ValueError("config.tokenizer_dir is empty; set it to a tokenizer model directory.")
    vae_cfg = VQVAEConfig.from_dict(read_model_json(cfg.tokenizer_dir)["vae"]["config"])
    ncls = cfg.model.get("num_classes") or pipeline.num_classes(cfg.data)
    return var_config_from(cfg, vae_cfg, ncls), vae_cfg


def exact_param_count(model_cfg) -> int:
    """Parameters of the real model, from ``jax.eval_shape`` of its initialisation (nothing is allocated)."""
    import jax
    import jax.numpy as jnp

    from varjax.models.var import VAR
    from varjax.train.sharding import param_count

    def init(rng):
        lab = jnp.zeros((1,), jnp.int32)
        x = jnp.zeros((1, model_cfg.L - model_cfg.first_l, model_cfg.Cvae), jnp.float32)
        return VAR(model_cfg).init(rng, lab, x, method=VAR.init_all)["params"]

    return int(param_count(jax.eval_shape(init, jax.random.PRNGKey(0))))


def total_steps_of(cfg: ml_collections.ConfigDict, image_size: int) -> int:
    """Training steps of a run; epochs are converted with the dataset size when needed."""
    from varjax.train.config_utils import steps_from

    try:
        return int(steps_from(cfg, "total", examples_per_step=cfg.batch_size))
    except ValueError:
        from varjax.data import pipeline

        it = pipeline.build_train_iter(
            cfg.data, image_size=image_size, global_batch_size=cfg.batch_size, process_index=0, process_count=1, seed=0
        )
        return int(steps_from(cfg, "total", steps_per_epoch=it.steps_per_epoch, examples_per_step=cfg.batch_size))


def accounting(cfg: ml_collections.ConfigDict) -> dict:
    """N (exact and by formula), training compute C (FLOPs and PFLOPs), sequences and tokens seen."""
    from varjax.scaling import flops

    model_cfg, vae_cfg = model_config_for(cfg)
    steps = total_steps_of(cfg, vae_cfg.image_size)
    sequences = steps * int(cfg.batch_size)
    n_exact = exact_param_count(model_cfg)
    n_formula = int(flops.param_count_formula(model_cfg))
    if n_exact != n_formula:
        raise RuntimeError(f"parameter count of the model ({n_exact}) differs from the formula ({n_formula}).")
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


def _parse_launch(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog=argv[0], description="train every member of a sweep (idempotent)")
    p.add_argument("--config", required=True, help="sweep config file, e.g. configs/sweep_shapes.py[:args]")
    p.add_argument("--root", required=True, help="sweep directory; member <name> trains in ROOT/<name>")
    p.add_argument("--print-commands", action="store_true", help="print one `varjax train` line per member")
    p.add_argument("--only", default=None, help="comma-separated member names (default: all)")
    from varjax.train.cli_flags import split_overrides

    rest, parsed = split_overrides(argv[1:])
    a, bad = p.parse_known_args(rest)
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are written --config.field=value)")
    # normalised to '--config.x=value', so the overrides can be forwarded verbatim to `varjax train`
    return a, [f"--config.{key}={text}" for key, text in parsed]


def launch(
    config: str,
    root: str,
    overrides: list[str] = (),
    print_commands: bool = False,
    only: list[str] | None = None,
    train_fn: Callable | None = None,
) -> list[dict]:
    """Trains (or prints the commands for) every member; returns ``[{'name', 'workdir', 'status'}]``."""
    path, arg = _split_config_arg(config)
    module = load_sweep_module(path)
    members = collect_members(module.sweep, arg or None)
    if only:
        unknown = set(only) - {m["name"] for m in members}
        if unknown:
            raise SystemExit(f"error: --only names unknown members {sorted(unknown)}")
        members = [m for m in members if m["name"] in only]
    rootp = paths.resolve(root)
    rootp.mkdir(parents=True, exist_ok=True)
    _write_json(
        rootp / SWEEP_JSON, {"config": config, "overrides": list(overrides), "members": [m["name"] for m in members]}
    )
    results = []
    for m in members:
        name = m["name"]
        workdir = rootp / name
        done = workdir / DONE_JSON
        if print_commands:
            cmd = ["varjax", "train", f"--config={path}:{_member_arg(arg, name)}", f"--workdir={workdir}", *overrides]
            print(" ".join(shlex.quote(c) for c in cmd), flush=True)
            try:  # best effort: `fit` needs it, but the tokenizer or data may only be reachable from the cluster
                acc = accounting(build_member_config(config, name, list(overrides)))
                workdir.mkdir(parents=True, exist_ok=True)
                _write_json(workdir / ACCOUNTING_JSON, acc)
            except (ValueError, OSError) as e:
                print(
                    f"# [sweep] {name}: accounting.json not written here ({e}); `varjax sweep launch` without "
                    "--print-commands writes it (and skips finished members)",
                    file=sys.stderr,
                    flush=True,
                )
            results.append({"name": name, "workdir": str(workdir), "status": "printed"})
            continue
        if done.is_file():
            print(f"[sweep] {name}: done ({done}), skipping", flush=True)
            results.append({"name": name, "workdir": str(workdir), "status": "skipped"})
            continue
        cfg = build_member_config(config, name, list(overrides))
        workdir.mkdir(parents=True, exist_ok=True)
        acc = accounting(cfg)
        _write_json(workdir / ACCOUNTING_JSON, acc)
        print(
            f"[sweep] {name}: N={acc['N']:,} params, C={acc['C_pflops']:.4g} PFLOPs, "
            f"{acc['total_steps']} steps, {acc['tokens']:,} tokens -> {workdir}",
            flush=True,
        )
        if train_fn is None:
            from varjax.train.var_trainer import train as train_fn
        last = train_fn(cfg, str(workdir))
        final = final_eval_metrics(workdir, acc["total_steps"])
        if final is None:  # stopped early (preemption): not done; a re-run resumes it
            print(f"[sweep] {name}: training did not reach step {acc['total_steps']}; re-run to resume", flush=True)
            results.append({"name": name, "workdir": str(workdir), "status": "incomplete"})
            continue
        _write_json(
            done,
            {
                "name": name,
                "N": acc["N"],
                "C_flops": acc["C_flops"],
                "C_pflops": acc["C_pflops"],
                "tokens": acc["tokens"],
                "final": final,
                "last_logged": last,
            },
        )
        results.append({"name": name, "workdir": str(workdir), "status": "trained"})
    return results


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
    from varjax.ckpt import load_model_dir
    from varjax.data import pipeline
    from varjax.train.var_trainer import make_eval_fn

    b = load_model_dir(workdir, need_var=True)
    evaluate = make_eval_fn(b.vae_cfg, b.vae_params, b.var_cfg)
    it = pipeline.build_eval_iter(
        cfg.data, image_size=b.vae_cfg.image_size, global_batch_size=cfg.batch_size, process_index=0, process_count=1
    )
    return evaluate(b.var_params, it)


def member_record(workdir: Path, evaluate: bool = True) -> dict | None:
    """The fit record of a finished member, or None when it is not finished."""
    from varjax.train.config_utils import load_config_json

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
        final = {**final, **evaluate_workdir(workdir, load_config_json(str(workdir)))}
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
        raise SystemExit(f"error: sweep root {root} does not exist")
    out = out or str(rootp / "fit")
    records, skipped = [], []
    for d in _member_dirs(rootp):
        rec = member_record(d, evaluate=evaluate)
        (records if rec is not None else skipped).append(rec if rec is not None else d.name)
    if skipped:
        print(f"[sweep] not finished (left out): {', '.join(skipped)}", flush=True)
    if len(records) < 2:
        raise SystemExit(f"error: {len(records)} finished member(s) under {root}; a fit needs at least 2.")
    records.sort(key=lambda r: r["N"])
    if inception or fid_ref:
        from varjax.evaluate import model_fid

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

USAGE = """usage:
  varjax sweep launch --config SWEEP.py[:args] --root DIR [--print-commands] [--only a,b] [--config.field=value ...]
  varjax sweep fit --root DIR [--out DIR/fit] [--inception W.pth --fid-ref STATS.npz]"""


def run_cli(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__ + "\n" + USAGE)
        if len(argv) < 2:
            raise SystemExit(2)
        return
    sub, rest = argv[1], argv[2:]
    prog = f"{argv[0]} {sub}"
    if sub == "launch":
        a, overrides = _parse_launch([prog, *rest])
        launch(a.config, a.root, overrides, print_commands=a.print_commands, only=a.only.split(",") if a.only else None)
    elif sub == "fit":
        p = argparse.ArgumentParser(prog=prog, description="fit scaling laws to a finished sweep")
        p.add_argument("--root", required=True)
        p.add_argument("--out", default=None, help="output folder (default ROOT/fit)")
        p.add_argument("--no-eval", action="store_true", help="leave out members without a logged final eval")
        p.add_argument("--inception", default=None, help="Inception weights: also fit each member's FID")
        p.add_argument("--fid-ref", default=None, help="reference statistics .npz for FID (see `varjax fid`)")
        p.add_argument("--fid-per-class", type=int, default=16, help="samples per class for FID")
        a = p.parse_args(rest)
        fit(a.root, a.out, evaluate=not a.no_eval, inception=a.inception, fid_ref=a.fid_ref,
            fid_per_class=a.fid_per_class)
    else:
        print(USAGE, file=sys.stderr)
        raise SystemExit(f"error: unknown sweep command {sub!r}; expected 'launch' or 'fit'.")
