"""A model directory or ``varjax train`` workdir -> the release's ``.pth`` files.

Writes ``OUT/vae.pth`` and ``OUT/var.pth`` (the latter when the directory holds a VAR) as ``torch.save`` zip
archives with the official key names, shapes and dtypes, buffers included, so that the official PyTorch models
load them with ``load_state_dict(..., strict=True)``. ``varjax convert`` followed by ``export`` gives back the
input files' tensors exactly. Only VAR's family has a released format: a KL tokenizer or E-CAR has none.
"""

from __future__ import annotations

from etils import epath

from varjax.core import paths
from varjax.core.model_dir import load_model_dir
from varjax.interop import convert
from varjax.interop.torch_io import save_state_dict_pth

EXPORTABLE = ("vq", "var")


def export_model(ckpt, out, ema: bool = True) -> dict[str, epath.Path]:
    """Writes the .pth files of the model in ``ckpt`` into the directory ``out``; returns {"vae"|"var": path}."""
    bundle = load_model_dir(ckpt, ema=ema)
    if bundle.family not in EXPORTABLE:
        raise ValueError(f"--ckpt {ckpt}: holds a {bundle.family!r} model; only VAR's VQ tokenizer and transformer "
                         "have a released PyTorch format to export to.")
    out = paths.resolve(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"vae": out / "vae.pth"}
    save_state_dict_pth(written["vae"], convert.vqvae_state_dict(bundle.tok_cfg, bundle.tok_params))
    if bundle.is_generator:
        written["var"] = out / "var.pth"
        save_state_dict_pth(written["var"], convert.var_state_dict(bundle.gen_cfg, bundle.gen_params))
    return written
