"""``varjax export --ckpt DIR --out OUT``: a model directory or ``varjax train`` workdir -> the release's files.

Writes ``OUT/vae.pth`` and ``OUT/var.pth`` (the latter when DIR holds a transformer) as ``torch.save`` zip
archives with the official key names, shapes and dtypes, buffers included, so that the official PyTorch models
load them with ``load_state_dict(..., strict=True)``. ``varjax convert`` followed by ``varjax export`` gives back
the input files' tensors exactly.
"""

from __future__ import annotations

from etils import epath

from varjax import convert, paths
from varjax.ckpt import load_model_dir
from varjax.torch_io import save_state_dict_pth


def export_model(ckpt, out) -> dict[str, epath.Path]:
    """Writes the .pth files of the model in ``ckpt`` into the directory ``out``; returns {"vae"|"var": path}."""
    bundle = load_model_dir(ckpt)
    out = paths.resolve(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"vae": out / "vae.pth"}
    save_state_dict_pth(written["vae"], convert.vqvae_state_dict(bundle.vae_cfg, bundle.vae_params))
    if bundle.var_cfg is not None:
        written["var"] = out / "var.pth"
        save_state_dict_pth(written["var"], convert.var_state_dict(bundle.var_cfg, bundle.var_params))
    return written


def cmd_export(a) -> None:
    written = export_model(a.ckpt, a.out)
    for what, path in written.items():
        print(f"[export] wrote {path} ({what})")
    if "var" not in written:
        print(f"[export] {a.ckpt} holds only a tokenizer: no var.pth written")

