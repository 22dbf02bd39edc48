"""Model directories: tokenizer and transformer parameters plus the configs that rebuild them.

Layout of a model directory (written by ``varjax convert`` and by the trainers)::

    DIR/varjax_model.json   {"format": "varjax-model", "vae": {...config...}, "var": {...} | null, ...}
    DIR/vae/                Orbax checkpoint of the tokenizer params
    DIR/var/                Orbax checkpoint of the transformer params (absent for a tokenizer-only dir)

A training workdir is also accepted wherever a model directory is: its ``varjax_model.json`` points at the
latest Orbax training checkpoint in ``WORKDIR/checkpoints`` and names the parameter subtree to use
(``{"checkpoint": "checkpoints", "subtree": ["ema_params"]}``), and the VAR trainer's file points at the
tokenizer directory it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from varjax.models.var import VARConfig
from varjax.models.vqvae import VQVAEConfig
from varjax.train.checkpointing import load_params_dir, save_params_dir

MODEL_JSON = "varjax_model.json"
FORMAT = "varjax-model"


@dataclasses.dataclass
class ModelBundle:
    vae_cfg: VQVAEConfig
    vae_params: dict
    var_cfg: VARConfig | None = None
    var_params: dict | None = None
    family: str = "var"  # "var" (VQ tokenizer + VAR), "kl" (continuous tokenizer only) or "ecar"
    ecar_cfg: object | None = None
    ecar_params: dict | None = None


def _abs(path) -> str:
    return os.path.abspath(os.fspath(path))


def save_model_dir(
    path, vae_cfg: VQVAEConfig, vae_params, var_cfg: VARConfig | None = None, var_params=None, extra: dict | None = None
) -> None:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_params_dir(out / "vae", vae_params, overwrite=True)
    if var_params is not None:
        save_params_dir(out / "var", var_params, overwrite=True)
    meta = {
        "format": FORMAT,
        "version": 1,
        "vae": {"config": vae_cfg.to_dict(), "params": {"dir": "vae"}},
        "var": None if var_cfg is None else {"config": var_cfg.to_dict(), "params": {"dir": "var"}},
        **(extra or {}),
    }
    write_model_json(out, meta)


def write_model_json(path, meta: dict) -> None:
    tmp = Path(path) / (MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, Path(path) / MODEL_JSON)  # atomic: readers never see a half-written file


def read_model_json(path) -> dict:
    f = Path(path) / MODEL_JSON
    if not f.is_file():
        raise ValueError(
            f"{path}: not a varjax model directory or training workdir (no {MODEL_JSON}). Create one with "
            "`varjax convert --vae VAE.pth [--var VAR.pth] --out DIR`, `varjax train-tokenizer` or `varjax train`."
        )
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}.")
    return meta


def _latest_checkpoint_step(ckpt_dir: Path) -> int | None:
    with ocp.CheckpointManager(_abs(ckpt_dir)) as mgr:
        return mgr.latest_step()


def _load_entry(base: Path, entry: dict, what: str) -> dict:
    src = entry["params"]
    if "dir" in src:
        return load_params_dir(base / src["dir"])
    if "model_dir" in src:  # another model directory (e.g. the tokenizer a VAR run was trained with)
        other = Path(src["model_dir"])
        other = other if other.is_absolute() else base / other
        return load_model_dir(other).__getattribute__(f"{what}_params")
    if "checkpoint" in src:
        ckpt_dir = base / src["checkpoint"]
        step = _latest_checkpoint_step(ckpt_dir)
        if step is None:
            raise ValueError(f"{ckpt_dir}: no finished checkpoint yet; train longer or wait for the first save.")
        with ocp.CheckpointManager(_abs(ckpt_dir)) as mgr:
            restored = mgr.restore(
                step, args=ocp.args.Composite(**{src.get("item", "state"): ocp.args.StandardRestore()})
            )
        tree = restored[src.get("item", "state")]
        for k in src.get("subtree", []):
            tree = tree[k]
        return jax.tree.map(np.asarray, tree)
    raise ValueError(f"{base / MODEL_JSON}: entry '{what}' has no parameter source (dir, model_dir or checkpoint).")


def load_model_dir(path, need_var: bool = False) -> ModelBundle:
    """Loads configs and parameters from a model directory or training workdir."""
    base = Path(path)
    meta = read_model_json(base)
    if meta.get("vae") is None:
        raise ValueError(f"{base / MODEL_JSON}: has no tokenizer ('vae') entry.")
    if meta["vae"].get("family") == "kl" or meta.get("family") == "ecar":
        return _load_continuous(base, meta)
    vae_cfg = VQVAEConfig.from_dict(meta["vae"]["config"])
    vae_params = _load_entry(base, meta["vae"], "vae")
    var_cfg = var_params = None
    if meta.get("var") is not None:
        var_cfg = VARConfig.from_dict(meta["var"]["config"])
        var_params = _load_entry(base, meta["var"], "var")
    elif need_var:
        raise ValueError(
            f"{base}: holds only a tokenizer; sampling needs a VAR transformer too (convert with --var, or "
            "point --ckpt at a `varjax train` workdir)."
        )
    return ModelBundle(vae_cfg, vae_params, var_cfg, var_params)


def _load_continuous(base: Path, meta: dict) -> ModelBundle:
    """A continuous (KL) tokenizer directory, or an E-CAR one (tokenizer + ``ecar`` entry)."""
    from varjax.models.ecar import ECARConfig
    from varjax.models.kl_ae import KLAEConfig

    bundle = ModelBundle(KLAEConfig.from_dict(meta["vae"]["config"]), _load_entry(base, meta["vae"], "vae"),
                         family="kl")
    if meta.get("ecar") is not None:
        bundle.family = "ecar"
        bundle.ecar_cfg = ECARConfig.from_dict(meta["ecar"]["config"])
        bundle.ecar_params = _load_entry(base, meta["ecar"], "ecar")
    return bundle
