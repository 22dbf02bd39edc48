"""Image I/O at the edges: folders / arrays in, PNG grids out. Arrays are (B, H, W, 3) float32 in [0, 1]."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
from PIL import Image

from varjax.core import paths

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def to_unit_float(arr: np.ndarray, source: str) -> np.ndarray:
    """uint8 0..255 or float in [0, 1] -> float32 [0, 1], NHWC with 3 channels."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{source}: expected an array of shape (B, H, W, 3), got {arr.shape}.")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"{source}: float images must lie in [0, 1] (found values in [{lo:.3g}, {hi:.3g}]); "
                "pass uint8 0..255 or rescale."
            )
        return np.clip(arr, 0, 1).astype(np.float32)
    raise ValueError(f"{source}: unsupported dtype {arr.dtype}; expected uint8 or float.")


def _open_image(path: str | os.PathLike, mode: str) -> Image.Image:
    """The decoded image in ``mode`` (a local path or a URL); an unreadable or corrupt file is a ValueError naming
    it."""
    p = paths.resolve(path)
    if not p.is_file():
        raise FileNotFoundError(2, "no such image file", str(path))
    try:
        with Image.open(io.BytesIO(p.read_bytes())) as img:
            return img.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(
            f"{path}: not a readable image ({type(e).__name__}: {e}); expected a PNG/JPEG/BMP/WebP/TIFF file."
        ) from None


def load_image_file(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """One image as (H, W, 3) float32 in [0, 1]; with ``size``, resized (short side) and centre-cropped."""
    img = _open_image(path, "RGB")
    if size is not None:
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.LANCZOS)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.float32) / 255.0


def load_images(src: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """A folder of image files or a ``.npy``/``.npz`` array (local or a URL) -> (B, H, W, 3) float32 in [0, 1].

    ``.npz`` files use the key ``images`` (or their only array). Folders are read in sorted order.
    """
    p = paths.resolve(src)
    if not p.exists():
        raise FileNotFoundError(2, "no such folder or file (expected a folder of images or a .npy/.npz array)",
                                str(p))
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"{p}: the folder holds no image files ({', '.join(IMAGE_EXTS)}).")
        return np.stack([load_image_file(f, size) for f in files])
    if p.suffix in (".npy", ".npz"):
        arr = _load_array(p)
    elif p.suffix.lower() in IMAGE_EXTS and p.is_file():
        return load_image_file(p, size)[None]
    else:
        raise ValueError(f"{p}: expected a folder of images, an image file, or a .npy/.npz array.")
    if size is not None and arr.shape[1:3] != (size, size):
        raise ValueError(f"{p}: images are {arr.shape[1]}x{arr.shape[2]}, the model needs {size}x{size}.")
    return arr


def _load_array(p) -> np.ndarray:
    """(B, H, W, 3) float32 in [0, 1] from a ``.npy`` or ``.npz`` file (key ``images`` or its only array)."""
    try:
        data = io.BytesIO(p.read_bytes())
        if p.suffix == ".npy":
            return to_unit_float(np.load(data, allow_pickle=False), str(p))
        with np.load(data, allow_pickle=False) as z:
            keys = list(z.keys())
            key = "images" if "images" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"{p}: expected a key 'images' (or a single array); found {keys}.")
            return to_unit_float(z[key], f"{p}[{key}]")
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{p}: not a readable {p.suffix} array ({type(e).__name__}: {e}).") from None
    except ValueError as e:
        if str(e).startswith(str(p)):
            raise
        raise ValueError(f"{p}: not a readable {p.suffix} array of images ({e}).") from None


def make_grid(images: np.ndarray, nrow: int, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """(B, H, W, 3) -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, 3) image, row-major."""
    B, H, W, C = images.shape
    rows = -(-B // nrow)
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), pad_value, dtype=np.float32)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = images[i]
    return grid


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(images, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def save_png(path: str | os.PathLike, image_HW3: np.ndarray) -> None:
    """Writes a PNG (local path or URL, parent directories created)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image_HW3)).save(buf, format="PNG")
    paths.write_bytes(path, buf.getvalue())


def save_grid(path: str | os.PathLike, images: np.ndarray, nrow: int) -> None:
    save_png(path, make_grid(np.asarray(images), nrow))


def load_mask(path: str | os.PathLike, size: int) -> np.ndarray:
    """A mask image -> (size, size) float in {0, 1}; white (> 127) marks the region to generate."""
    m = _open_image(path, "L").resize((size, size), Image.Resampling.NEAREST)
    return (np.asarray(m) > 127).astype(np.float32)
