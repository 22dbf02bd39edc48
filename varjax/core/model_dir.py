"""Model directories: the one reader and writer of ``varjax_model.json`` and the parameters it points at.

Layout of a model directory (written by ``varjax convert`` and by :func:`save_model_dir`)::

    DIR/varjax_model.json   {"format": "varjax-model", "version": 1, "family": "var", "vae": {...}, "var": {...}}
    DIR/vae/                Orbax directory of the tokenizer's parameters
    DIR/<key>/              Orbax directory of the generator's parameters (``var`` or ``ecar``), if any

The manifest holds the tokenizer under ``vae`` and the generator under its family's key
(``varjax.models.families``); each entry has the model's ``config`` and where its ``params`` are:

* ``{"dir": "vae"}``: an Orbax directory inside DIR;
* ``{"model_dir": PATH}``: the same part of another model directory (the tokenizer a run was trained with;
  a relative PATH is taken from DIR);
* ``{"checkpoint": "checkpoints", "item": "state", "subtree": ["ema_params"], "raw_subtree": ["params"]}``:
  a subtree of the newest finished training checkpoint. That is how a training workdir is a model directory
  too: ``varjax sample --ckpt WORKDIR`` reads only the parameters, not the optimizer state beside them.
  ``subtree`` is what is used by default (the EMA weights when the run keeps them); ``raw_subtree`` the
  weights without EMA (``--no-ema``).

Manifests written before ``family`` was recorded are read by what they hold (a ``var`` entry: VAR; a ``kl``
tokenizer: a KL autoencoder; otherwise a VQ tokenizer), and VAR parameters of every stored layout are
fitted to the config (``varjax.models.var_params``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.core import meta as flax_meta

from varjax.core import paths
from varjax.core.checkpoint import load_params_dir, save_params_dir, unparsable_json
from varjax.core.errors import StorageError
from varjax.models import families
from varjax.models.var import PARAM_LAYOUT

MODEL_JSON = "varjax_model.json"
FORMAT = "varjax-model"
VERSION = 1
TOKENIZER_KEY = "vae"


@dataclasses.dataclass
class ModelBundle:
    """What a model directory holds: a tokenizer, and for a generator family the generator beside it."""

    family: str  # "vq" | "kl" | "var" | "ecar"
    tok_cfg: Any
    tok_params: Any
    gen_cfg: Any = None
    gen_params: Any = None
    manifest: dict = dataclasses.field(default_factory=dict)

    @property
    def is_generator(self) -> bool:
        return self.gen_cfg is not None


def family_of(manifest: dict) -> str:
    """The family a manifest holds (read from what it holds when it predates the ``family`` field)."""
    if manifest.get("family"):
        return manifest["family"]
    if manifest.get("ecar") is not None:
        return "ecar"
    if manifest.get("var") is not None:
        return "var"
    return (manifest.get(TOKENIZER_KEY) or {}).get("family") or "vq"


def tokenizer_family(manifest: dict) -> str:
    return families.get(family_of(manifest)).tokenizer


def read_manifest(path) -> dict:
    """The parsed ``varjax_model.json`` of a model directory or training workdir (local or a URL)."""
    f = paths.resolve(path) / MODEL_JSON
    if not f.is_file():
        raise ValueError(
            f"{path}: not a varjax model directory or training workdir (no {MODEL_JSON}). Create one with "
            "`varjax convert --vae VAE.pth [--var VAR.pth] --out DIR`, `varjax train-tokenizer` or `varjax train`."
        )
    try:
        manifest = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e}); the file is damaged. Re-create the model directory.") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{f}: 'format' is {manifest.get('format')!r}, expected {FORMAT!r}.")
    return manifest


def write_manifest(path, manifest: dict) -> None:
    paths.write_text(paths.resolve(path) / MODEL_JSON, json.dumps(manifest, indent=2))


def checkpoint_source(ema: bool) -> dict:
    """Where a training workdir's parameters are: the newest checkpoint's ``params`` (or its EMA, by default)."""
    src = {"checkpoint": "checkpoints", "item": "state", "subtree": ["ema_params" if ema else "params"]}
    if ema:
        src["raw_subtree"] = ["params"]
    return src


def manifest(family: str, tok_cfg, tok_source: dict, gen_cfg=None, gen_source: dict | None = None,
             gen_extra: dict | None = None, **extra) -> dict:
    """A complete manifest. ``gen_extra`` adds fields to the generator's entry (e.g. sampling defaults)."""
    fam = families.get(family)
    out = {
        "format": FORMAT,
        "version": VERSION,
        "family": family,
        TOKENIZER_KEY: {"family": fam.tokenizer, "config": tok_cfg.to_dict(), "params": tok_source},
    }
    if fam.key is not None:
        if gen_cfg is None or gen_source is None:
            raise ValueError(f"a {family!r} model directory needs its generator's config and parameters.")
        out[fam.key] = {"config": gen_cfg.to_dict(), "params": gen_source, **(gen_extra or {})}
        if family == "var":  # the split QKV / AdaLN layout (older directories are fitted on load)
            out[fam.key]["param_layout"] = PARAM_LAYOUT
    out.update(extra)
    return out


def save_model_dir(path, family: str, tok_cfg, tok_params, gen_cfg=None, gen_params=None, **extra) -> None:
    """Writes a self-contained model directory (parameters as Orbax directories inside it)."""
    out = paths.resolve(path)
    out.mkdir(parents=True, exist_ok=True)
    fam = families.get(family)
    save_params_dir(out / TOKENIZER_KEY, flax_meta.unbox(tok_params), overwrite=True)  # inits carry boxes
    gen_source = None
    if fam.key is not None:
        save_params_dir(out / fam.key, flax_meta.unbox(gen_params), overwrite=True)
        gen_source = {"dir": fam.key}
    write_manifest(out, manifest(family, tok_cfg, {"dir": TOKENIZER_KEY}, gen_cfg, gen_source, **extra))


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
        tree_meta = ckptr.metadata(item_dir).item_metadata.tree
        part = tree_meta
        for k in subtree:
            if k not in part:
                raise ValueError(f"{item_dir}: the checkpoint holds no '{'/'.join(subtree)}' (it has "
                                 f"{sorted(part)}).")
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


def _subtree(src: dict, ema: bool) -> list[str]:
    subtree = list(src.get("subtree", []))
    if ema:
        return subtree
    if "raw_subtree" in src:
        return list(src["raw_subtree"])
    return ["params"] if subtree == ["ema_params"] else subtree  # manifests written before raw_subtree


def _damaged(where, e: BaseException) -> StorageError:
    bad = unparsable_json(where, ("_METADATA", "_sharding", "_CHECKPOINT_METADATA"))
    reason = f"{bad} is not valid JSON" if bad else (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    return StorageError(
        f"{where}: the parameter files cannot be read ({reason}). They are damaged or incomplete: re-create the "
        "model directory (`varjax convert`, or let the training run write a new checkpoint), or restore it from a "
        "copy."
    )


def load_params(path, which: str = TOKENIZER_KEY, *, sharding=None, ema: bool = True):
    """Parameters of the tokenizer (``which='vae'``) or the generator (its family's key) of a model directory.

    Args:
      path: model directory or training workdir, local or a URL.
      which: 'vae' or the generator's key ('var', 'ecar').
      sharding: None for host numpy arrays; a ``jax.sharding.Sharding`` to place every leaf with it; or a
        pytree of shardings matching the parameters.
      ema: the default weights (EMA when the run kept them); False for the raw ones.

    Raises:
      ValueError: the directory has no such entry or no finished checkpoint yet.
      StorageError: the parameter files are damaged.
    """
    base = paths.resolve(path)
    entry = read_manifest(base).get(which)
    if entry is None:
        raise ValueError(f"{base / MODEL_JSON}: has no '{which}' entry.")
    src = entry["params"]
    if "model_dir" in src:  # another model directory (e.g. the tokenizer a run was trained with)
        other = src["model_dir"]
        other = paths.resolve(other) if paths.is_url(other) else base / other
        return load_params(other, which, sharding=sharding)
    if "dir" in src:
        item, subtree = base / src["dir"], []
    elif "checkpoint" in src:
        ckpt_dir = base / src["checkpoint"]
        with ocp.CheckpointManager(ckpt_dir) as mgr:
            step = mgr.latest_step()
        if step is None:
            raise ValueError(f"{ckpt_dir}: no finished checkpoint yet; train longer or wait for the first save.")
        item, subtree = ckpt_dir / str(step) / src.get("item", "state"), _subtree(src, ema)
    else:
        raise ValueError(f"{base / MODEL_JSON}: entry '{which}' has no parameter source (dir, model_dir or "
                         "checkpoint).")
    if not item.is_dir():
        raise FileNotFoundError(f"{item}: the parameter directory named by {base / MODEL_JSON} does not exist.")
    try:
        if not subtree and sharding is None:
            return load_params_dir(item)
        return _restore_subtree(item, subtree, sharding)
    except ValueError as e:
        if str(e).startswith(str(item)):  # our own message (a missing subtree)
            raise
        raise _damaged(item, e) from None
    except Exception as e:  # noqa: BLE001 - TensorStore and Orbax report damaged files in many types
        raise _damaged(item, e) from None


def load_model_dir(path, need_generator: bool = False, ema: bool = True) -> ModelBundle:
    """Configs and parameters of a model directory or training workdir.

    ``ema`` applies to the model the directory trains or holds: the generator of a generator family, the
    tokenizer of a tokenizer-only directory (a generator's tokenizer is read as its own directory says).
    """
    base = paths.resolve(path)
    man = read_manifest(base)
    family = family_of(man)
    fam = families.get(family)
    tok = families.get(fam.tokenizer)
    if man.get(TOKENIZER_KEY) is None:
        raise ValueError(f"{base / MODEL_JSON}: has no tokenizer ('{TOKENIZER_KEY}') entry.")
    tok_cfg = tok.config.from_dict(man[TOKENIZER_KEY]["config"])
    tok_params = load_params(base, TOKENIZER_KEY, ema=ema if fam.key is None else True)
    bundle = ModelBundle(family, tok_cfg, tok_params, manifest=man)
    if fam.key is None:
        if need_generator:
            raise ValueError(
                f"{base}: holds only a tokenizer; sampling needs a generator too (convert with --var, or point "
                "--ckpt at a `varjax train` workdir)."
            )
        return bundle
    bundle.gen_cfg = fam.config.from_dict(man[fam.key]["config"])
    bundle.gen_params = fam.fit_params(load_params(base, fam.key, ema=ema), bundle.gen_cfg)
    return bundle
