"""Loads the files of ``varjax export`` into the official PyTorch models with ``strict=True`` (not run by pytest).

    varjax convert --vae tests/data/golden/vqvae_public.pth --var tests/data/golden/var_public.pth \
        --patch-nums 1,2,3,4,6,8 --out runs/golden_model
    varjax export --ckpt runs/golden_model --out runs/golden_export
    TORCH_PYTHON tests/data/check_export_strict.py runs/golden_export path/to/FoundationVision/VAR

TORCH_PYTHON is the python of a separate environment with torch (torch is never a varjax dependency); the last
argument is a checkout of the official code. The models are built with the hyper-parameters of
tests/data/golden/case_public.json.
"""

import json
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(export_dir: str, ref_repo: str) -> None:
    sys.path.insert(0, ref_repo)
    try:
        import huggingface_hub  # noqa: F401  (models/var.py only uses its mixin for Hub uploads)
    except ImportError:
        sys.modules["huggingface_hub"] = types.SimpleNamespace(PyTorchModelHubMixin=type("Mixin", (), {}))
    from models.var import VAR
    from models.vqvae import VQVAE

    case = json.loads((HERE / "golden" / "case_public.json").read_text())
    q, v = case["vqvae"], case["var"]
    pn = tuple(q["v_patch_nums"])
    vae = VQVAE(vocab_size=q["vocab_size"], z_channels=q["z_channels"], ch=q["ch"], test_mode=True,
                share_quant_resi=q["share_quant_resi"], v_patch_nums=pn)
    var = VAR(vae_local=vae, num_classes=v["num_classes"], depth=v["depth"], embed_dim=v["embed_dim"],
              num_heads=v["num_heads"], shared_aln=v["shared_aln"], attn_l2_norm=v["attn_l2_norm"],
              cond_drop_rate=0.0, drop_path_rate=0.0, patch_nums=pn, flash_if_available=False,
              fused_if_available=False)
    for name, model in (("vae.pth", vae), ("var.pth", var)):
        sd = torch.load(Path(export_dir) / name, weights_only=True)
        result = model.load_state_dict(sd, strict=True)
        want = model.state_dict()
        same = all(sd[k].dtype == t.dtype and sd[k].shape == t.shape for k, t in want.items())
        print(f"{name}: strict load ok ({result}), {len(sd)} tensors, dtypes and shapes match: {same}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
