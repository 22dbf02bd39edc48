"""Model directories: tokenizer and transformer parameters plus the configs that rebuild them.

Layout of a model directory (written by ``varjax convert`` and by the trainers)::

    DIR/varjax_model.json   {"format": "varjax-model", "vae": {...config...}, "var": {...} | null, ...}
    DIR/vae/                Orbax checkpoint of the tokenizer params
    DIR/var/                Orbax checkpoint of the transformer params (absent for a tokenizer-only dir)

The ``var`` entry records ``param_layout`` (``varjax.models.var.PARAM_LAYOUT``); directories written before it
existed hold layout 1 and are reshaped on load (``varjax.convert.fit_var_params``), which also stacks or
unstacks the blocks to match the config's ``scan_layers``.

A training workdir is also accepted wherever a model directory is: its ``varjax_model.json`` points at the
latest Orbax training checkpoint in ``WORKDIR/checkpoints`` and names the parameter subtree to use
(``{"checkpoint": "checkpoints", "subtree": ["ema_params"]}``), and the VAR trainer's file points at the
tokenizer directory it was trained with.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.core import meta as flax_meta

from varjax import paths
from varjax.convert import fit_var_params
from varjax.models.var import PARAM_LAYOUT, VARConfig
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


def save_model_dir(
    path, vae_cfg: VQVAEConfig, vae_params, var_cfg: VARConfig | None = None, var_params=None, extra: dict | None = None
) -> None:
    out = paths.resolve(path)
    out.mkdir(parents=True, exist_ok=True)
    save_params_dir(out / "vae", flax_meta.unbox(vae_params), overwrite=True)  # fresh inits carry logical-axis boxes
    if var_params is not None:
        save_params_dir(out / "var", flax_meta.unbox(var_params), overwrite=True)
    meta = {
        "format": FORMAT,
        "version": 1,
        "vae": {"config": vae_cfg.to_dict(), "params": {"dir": "vae"}},
        "var": None
        if var_cfg is None
        else {"config": var_cfg.to_dict(), "params": {"dir": "var"}, "param_layout": PARAM_LAYOUT},
        **(extra or {}),
    }
    write_model_json(out, meta)


def write_model_json(path, meta: dict) -> None:
    paths.write_text(paths.resolve(path) / MODEL_JSON, json.dumps(meta, indent=2))


def read_model_json(path) -> dict:
    f = paths.resolve(path) / MODEL_JSON
    if not f.is_file():
        raise ValueError(
            f"{path}: not a varjax model directory or training workdir (no {MODEL_JSON}). Create one with "
            "`varjax convert --vae VAE.pth [--var VAR.pth] --out DIR`, `varjax train-tokenizer` or `varjax train`."
        )
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}.")
    return meta


def _restore_args(meta_tree, sharding):
    """Per-leaf restore arguments: host numpy (``sharding`` None), one sharding for all, or a tree of them."""
    if sharding is None:
        return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta_tree)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), meta_tree)
    return jax.tree.map(lambda _, s: ocp.ArrayRestoreArgs(sharding=s), meta_tree, sharding)


def _restore_subtree(item_dir, subtree: list[str], sharding) -> dict:
    """Only ``subtree`` of the Orbax pytree in ``item_dir`` (a partial restore: nothing else is read)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(item_dir).item_metadata.tree
        part = meta
        for k in subtree:
            part = part[k]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), part)
        args = _restore_args(part, sharding)
        for k in reversed(subtree):
            target, args = {k: target}, {k: args}
        tree = ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=args,
                                                                    partial_restore=True))
    for k in subtree:
        tree = tree[k]
    return tree


def load_params(path, which: str = "var", *, sharding=None) -> dict:
    """Parameters of the tokenizer (``which='vae'``) or transformer (``'var'``) of a model directory or workdir.

    A training workdir's checkpoint holds the whole train state; only the parameter subtree named in its
    ``varjax_model.json`` is read (no optimizer moments, discriminator or EMA beside it), so memory is that of
    the parameters alone and the saving device layout does not matter.

    Args:
      path: model directory (``varjax convert``) or training workdir, local or a URL.
      which: 'vae' or 'var'.
      sharding: None for host numpy arrays; a ``jax.sharding.Sharding`` to place every leaf with it (e.g.
        ``SingleDeviceSharding(jax.devices()[0])`` or a replicated ``NamedSharding`` of the current mesh); or a
        pytree of shardings matching the parameters.

    Raises:
      ValueError: when the directory has no entry for ``which`` or no finished checkpoint yet.
    """
    base = paths.resolve(path)
    meta = read_model_json(base)
    entry = meta.get(which)
    if entry is None:
        raise ValueError(f"{base / MODEL_JSON}: has no '{which}' entry.")
    src = entry["params"]
    if "dir" in src:
        if sharding is None:
            return load_params_dir(base / src["dir"])
        return _restore_subtree(base / src["dir"], [], sharding)
    if "model_dir" in src:  # another model directory (e.g. the tokenizer a VAR run was trained with)
        other = paths.resolve(src["model_dir"]) if paths.is_url(src["model_dir"]) else base / src["model_dir"]
        return load_params(other, which, sharding=sharding)
    if "checkpoint" in src:
        ckpt_dir = base / src["checkpoint"]
        with ocp.CheckpointManager(ckpt_dir) as mgr:
            step = mgr.latest_step()
        if step is None:
            raise ValueError(f"{ckpt_dir}: no finished checkpoint yet; train longer or wait for the first save.")
        return _restore_subtree(ckpt_dir / str(step) / src.get("item", "state"), list(src.get("subtree", [])),
                                sharding)
    raise ValueError(f"{base / MODEL_JSON}: entry '{which}' has no parameter source (dir, model_dir or checkpoint).")


def load_model_dir(path, need_var: bool = False) -> ModelBundle:
    """Loads configs and parameters from a model directory or training workdir."""
    base = paths.resolve(path)
    meta = read_model_json(base)
    if meta.get("vae") is None:
        raise ValueError(f"{base / MODEL_JSON}: has no tokenizer ('vae') entry.")
    if meta["vae"].get("family") == "kl" or meta.get("family") == "ecar":
        return _load_continuous(base, meta)
    vae_cfg = VQVAEConfig.from_dict(meta["vae"]["config"])
    vae_params = load_params(base, "vae")
    var_cfg = var_params = None
    if meta.get("var") is not None:
        var_cfg = VARConfig.from_dict(meta["var"]["config"])
        var_params = fit_var_params(load_params(base, "var"), var_cfg)
    elif need_var:
        raise ValueError(
            f"{base}: holds only a tokenizer; sampling needs a VAR transformer too (convert with --var, or "
            "point --ckpt at a `varjax train` workdir)."
        )
    return ModelBundle(vae_cfg, vae_params, var_cfg, var_params)


def _load_continuous(base, meta: dict) -> ModelBundle:
    """A continuous (KL) tokenizer directory, or an E-CAR one (tokenizer + ``ecar`` entry)."""
    from varjax.models.ecar import ECARConfig
    from varjax.models.kl_ae import KLAEConfig

    bundle = ModelBundle(KLAEConfig.from_dict(meta["vae"]["config"]), load_params(base, "vae"),
                         family="kl")
    if meta.get("ecar") is not None:
        bundle.family = "ecar"
        bundle.ecar_cfg = ECARConfig.from_dict(meta["ecar"]["config"])
        bundle.ecar_params = load_params(base, "ecar")
    return bundle
