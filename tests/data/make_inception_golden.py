"""Writes tests/data/inception_golden.npz: pytorch-fid's FID Inception-v3 on random weights and small images.

Run with the python of a separate environment holding torch, torchvision and pytorch-fid (never varjax
dependencies), from the repository root:

    TORCH_PYTHON tests/data/make_inception_golden.py

The weights are not stored (the network has 24M parameters): :func:`random_state_dict` draws them from the
parameter names alone, with numpy, so the test rebuilds the same state dict torch-free and writes it as a
.pth. Only the inputs and outputs are saved: ``images`` (B, H, W, 3) float32 in [0, 1], ``pool3`` (B, 2048),
``logits`` (B, 1008) (``fc`` of pool3), ``spatial`` (B, 2023) (Mixed_6d.branch1x1, i.e. the TF graph's
``mixed_6/conv``, first 7 channels, flattened as (H, W, C)).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

SEED = 2015


def random_value(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One float32 tensor, determined by its name and shape; scaled so activations stay O(1) over 94 layers."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    n = rng.standard_normal(shape)
    if name.endswith("conv.weight"):
        v = n * np.sqrt(2.0 / np.prod(shape[1:]))  # He init: ReLU nets keep their scale
    elif name.endswith("bn.weight"):
        v = 1 + 0.1 * n
    elif name.endswith("bn.running_var"):
        v = rng.uniform(0.5, 1.5, shape)
    elif name == "fc.weight":
        v = n / np.sqrt(shape[1])
    else:  # bn.bias, bn.running_mean, fc.bias
        v = 0.1 * n
    return v.astype(np.float32)


def random_state_dict(layout: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {name: random_value(name, tuple(shape)) for name, shape in layout.items()}


def test_images() -> np.ndarray:
    """(3, 40, 48, 3) float32 in [0, 1]: smooth patterns plus noise, non-square so both axes resize differently."""
    rng = np.random.default_rng(SEED)
    yy, xx = np.meshgrid(np.linspace(0, 1, 40), np.linspace(0, 1, 48), indexing="ij")
    base = np.stack([np.sin(6 * xx + 2 * yy), np.cos(5 * yy), xx * yy], axis=-1) * 0.5 + 0.5
    imgs = [np.clip(base * s + rng.uniform(0, 0.3, base.shape), 0, 1) for s in (0.6, 0.8, 1.0)]
    return np.stack(imgs).astype(np.float32)


def main() -> None:
    import torch
    from pytorch_fid import inception as pf

    # pytorch-fid's builder downloads the released weights; hand it the random ones instead
    probe = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    blocks = {"Mixed_5b": pf.FIDInceptionA(192, 32), "Mixed_5c": pf.FIDInceptionA(256, 64),
              "Mixed_5d": pf.FIDInceptionA(288, 64), "Mixed_6b": pf.FIDInceptionC(768, 128),
              "Mixed_6c": pf.FIDInceptionC(768, 160), "Mixed_6d": pf.FIDInceptionC(768, 160),
              "Mixed_6e": pf.FIDInceptionC(768, 192), "Mixed_7b": pf.FIDInceptionE_1(1280),
              "Mixed_7c": pf.FIDInceptionE_2(2048)}
    for name, block in blocks.items():
        setattr(probe, name, block)
    layout = {k: tuple(v.shape) for k, v in probe.state_dict().items() if "num_batches" not in k}
    sd = {k: torch.from_numpy(v) for k, v in random_state_dict(layout).items()}
    pf.load_state_dict_from_url = lambda *args, **kwargs: sd
    model = pf.fid_inception_v3().eval()
    features = pf.InceptionV3([3]).eval()  # pytorch-fid's feature extractor over the same weights
    images = test_images()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    spatial = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial.setdefault("x", o))
    with torch.no_grad():
        pool3 = features(x)[0].flatten(1)
        logits = model.fc(pool3)
        model(torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1)
    sp = spatial["x"].permute(0, 2, 3, 1)[..., :7].reshape(len(images), -1)
    out = Path(__file__).resolve().parent / "inception_golden.npz"
    np.savez_compressed(out, images=images, pool3=pool3.numpy(), logits=logits.numpy(), spatial=sp.numpy())
    print(f"wrote {out}: pool3 mean {pool3.mean():.3f} std {pool3.std():.3f}, logits std {logits.std():.3f}, "
          f"spatial mean {sp.mean():.3f}")


if __name__ == "__main__":
    main()
