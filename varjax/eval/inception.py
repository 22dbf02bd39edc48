"""FID, sFID, IS, precision and recall of image sets (``varjax fid --samples S --ref R --inception W.pth``).

S and R are each one of

- a folder of images (sorted by name; all of one size),
- an ADM-format ``.npz`` of images: ``arr_0`` uint8 (N, H, W, 3), read in batches as the ADM evaluator does,
- a TFDS split ``tfds:NAME/SPLIT`` (images centre-cropped to ``--image-size`` as ADM's reference batches),
- a statistics ``.npz``: ``mu``, ``sigma`` and optionally ``mu_s``, ``sigma_s`` (sFID) and the features
  ``pool3`` (precision / recall) and ``logits_unbiased`` (IS). An ADM reference batch holds both ``arr_0``
  and ``mu``/``sigma``; as in the ADM evaluator its stored statistics are used and its images only give the
  features for precision / recall.

Features come from the FID Inception-v3 (``varjax.models.inception``), the batch sharded over all local
devices. The statistics of whatever was computed are saved next to the JSON (``<out>.samples_stats.npz``,
``<out>.ref_stats.npz``) and are themselves valid inputs, so a reference set is encoded once.
"""

from __future__ import annotations

import contextlib
import functools
import io
import zipfile
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from varjax.core import paths
from varjax.data.images import IMAGE_EXTS
from varjax.eval.fid import feature_stats, frechet_distance, inception_score, precision_recall
from varjax.models.inception import InceptionV3, convert_inception

FEATURES = ("pool3", "spatial", "logits_unbiased")
STATS = ("mu", "sigma", "mu_s", "sigma_s")


# ----------------------------------------------------------------------------------------------------
# Features, sharded over the local devices.


# pytorch-fid's port of the TF Inception graph of the FID paper; torch.hub names a file by the first digits of its
# SHA-256, so the file's SHA-256 starts with 6726825d.
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_WHERE = (f"download it once from {INCEPTION_URL} (its SHA-256 starts with 6726825d, check with "
                   "`sha256sum`); nothing is downloaded at run time")


def load_inception(path) -> dict:
    """Flax params from a pytorch-fid ``pt_inception-2015-12-05-*.pth`` (read torch-free; a local path or URL)."""
    from varjax.interop.torch_io import load_state_dict

    if not path:
        raise ValueError(f"--inception: FID needs the Inception-v3 weights of pytorch-fid "
                         f"(pt_inception-2015-12-05-6726825d.pth): {INCEPTION_WHERE}. Pass the file with --inception.")
    if not paths.resolve(path).is_file():
        raise ValueError(f"--inception {path}: no such file. It is pytorch-fid's Inception-v3 weights: "
                         f"{INCEPTION_WHERE}.")
    return convert_inception(load_state_dict(path), source=str(path))


class InceptionFeatures:
    """``features(batches of uint8 (B, H, W, 3)) -> {pool3, spatial, logits_unbiased}`` as float32 numpy."""

    def __init__(self, params, dtype=jnp.float32, devices=None, preprocess: str = "torch"):
        self.mesh = Mesh(np.asarray(devices or jax.local_devices()), ("data",))
        self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
        self._batch = NamedSharding(self.mesh, PartitionSpec("data"))
        model = InceptionV3(dtype=dtype, preprocess=preprocess)

        @jax.jit
        def apply(params, images_u8):
            out = model.apply({"params": params}, images_u8.astype(jnp.float32) / 255.0)
            return {k: out[k] for k in FEATURES}

        self._apply = apply

    def __call__(self, batches) -> dict[str, np.ndarray]:
        n_dev, out = self.mesh.size, {k: [] for k in FEATURES}
        for b in batches:
            n = len(b)
            pad = -n % n_dev  # every device gets an equal slice; the padding rows are dropped again
            if pad:
                b = np.concatenate([b, np.zeros((pad, *b.shape[1:]), b.dtype)])
            res = self._apply(self.params, jax.device_put(b, self._batch))
            for k in FEATURES:
                out[k].append(np.asarray(res[k])[:n])
        return {k: np.concatenate(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------
# Image sources: (count, iterator of uint8 batches).


@contextlib.contextmanager
def _npz_member(path: epath.Path, key: str):
    with path.open("rb") as fh, zipfile.ZipFile(fh) as z:
        if f"{key}.npy" not in z.namelist():
            raise ValueError(f"{path}: no array '{key}' (found {[n[:-4] for n in z.namelist()]}).")
        with z.open(f"{key}.npy") as f:
            yield f


def _npy_header(f) -> tuple:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def npz_image_shape(path: epath.Path) -> tuple[int, ...]:
    with _npz_member(path, "arr_0") as f:
        shape, _, dtype = _npy_header(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"{path}: 'arr_0' must be uint8 images (N, H, W, 3) in 0..255 (ADM format); got {dtype} {shape}."
        )
    return shape


def npz_image_batches(path: epath.Path, batch: int) -> Iterator[np.ndarray]:
    """``arr_0`` in batches without loading it whole (50,000 256px images are 9.8 GB)."""
    with _npz_member(path, "arr_0") as f:
        shape, fortran, _ = _npy_header(f)
        if fortran:
            raise ValueError(f"{path}: 'arr_0' is stored in Fortran order; save it with np.savez from a C array.")
        row = int(np.prod(shape[1:]))
        for i in range(0, shape[0], batch):
            n = min(batch, shape[0] - i)
            yield np.frombuffer(f.read(n * row), np.uint8).reshape(n, *shape[1:])


def _read_u8(path: epath.Path) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            return np.asarray(img.convert("RGB"), np.uint8)
    except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e}).") from None


def folder_image_batches(files: list[epath.Path], batch: int) -> Iterator[np.ndarray]:
    for i in range(0, len(files), batch):
        imgs = [_read_u8(f) for f in files[i : i + batch]]
        if len({im.shape for im in imgs}) > 1:
            raise ValueError(f"{files[i].parent}: images of different sizes; FID needs one size (e.g. 256x256).")
        yield np.stack(imgs)


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's ``center_crop_arr``: box-halve while the short side >= 2 size, bicubic to size, centre crop."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def tfds_image_batches(spec: str, batch: int, size: int) -> tuple[int, Iterator[np.ndarray]]:
    from varjax.data import pipeline  # also registers varjax_shapes with TFDS
    from varjax.data.tf_import import tfds

    name, _, split = spec[len("tfds:") :].rpartition("/")  # a name may carry its config: varjax_shapes/32/test
    if not name or not split:
        raise ValueError(f"{spec}: expected tfds:NAME/SPLIT, e.g. tfds:imagenet2012/validation.")

    ds, info = tfds.load(name, split=split, with_info=True, shuffle_files=False)
    ds = ds.with_options(pipeline.dataset_options())
    count = info.splits[split].num_examples

    def gen():
        buf = []
        for ex in tfds.as_numpy(ds):
            buf.append(center_crop(Image.fromarray(ex["image"]), size))
            if len(buf) == batch:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)

    return count, gen()


def read_set(spec: str, features: InceptionFeatures | None, batch: int, image_size: int = 256) -> tuple[dict, bool]:
    """Statistics (and features where available) of one input; returns (stats, computed_anything)."""
    if spec.startswith("tfds:"):
        count, batches = tfds_image_batches(spec, batch, image_size)
        return _from_images(features, batches, count, spec), True
    p = paths.resolve(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"{p}: the folder holds no image files ({', '.join(IMAGE_EXTS)}).")
        return _from_images(features, folder_image_batches(files, batch), len(files), spec), True
    if p.suffix != ".npz" or not p.is_file():
        raise ValueError(f"{spec}: expected a folder of images, an .npz (ADM images 'arr_0' or statistics "
                         "'mu'/'sigma') or tfds:NAME/SPLIT.")
    with p.open("rb") as fh, np.load(fh, allow_pickle=False) as z:  # lazily: arr_0 is not read here
        keys = set(z.keys())
        stats = {k: z[k] for k in (*STATS, *FEATURES) if k in keys and k != "spatial"}
    if "arr_0" not in keys:
        if "mu" not in keys:
            raise ValueError(f"{p}: holds neither images 'arr_0' nor statistics 'mu'/'sigma' (found {sorted(keys)}).")
        return stats, False
    if "mu" in keys and "pool3" in keys:
        return stats, False
    computed = _from_images(features, npz_image_batches(p, batch), npz_image_shape(p)[0], spec)
    computed.update(stats)  # stored statistics win, as in the ADM evaluator
    return computed, True


def _from_images(features: InceptionFeatures | None, batches, count: int, spec: str) -> dict:
    if features is None:
        raise ValueError(
            f"{spec}: images need the Inception network; pass its weights with --inception "
            f"(pytorch-fid's pt_inception-2015-12-05-6726825d.pth: {INCEPTION_WHERE})."
        )
    from varjax.core.metrics import Progress

    prog, done, parts = Progress(count, every_s=30.0, batch_size=1, unit="images"), 0, []
    for b in batches:
        parts.append(features([b]))
        done += len(b)
        prog.update(done)
    f = {k: np.concatenate([x[k] for x in parts]) for k in FEATURES}
    mu, sigma = feature_stats(f["pool3"])
    mu_s, sigma_s = feature_stats(f["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s,
            "pool3": f["pool3"], "logits_unbiased": f["logits_unbiased"]}


# ----------------------------------------------------------------------------------------------------
# Metrics and the command.


def metrics(samples: dict, ref: dict) -> dict:
    """The JSON numbers; a metric whose inputs are missing (e.g. statistics without features) is None."""
    res = {"fid": frechet_distance(samples["mu"], samples["sigma"], ref["mu"], ref["sigma"])}
    res["sfid"] = (
        frechet_distance(samples["mu_s"], samples["sigma_s"], ref["mu_s"], ref["sigma_s"])
        if all(k in d for d in (samples, ref) for k in ("mu_s", "sigma_s")) else None
    )
    res["is"] = inception_score(samples["logits_unbiased"]) if "logits_unbiased" in samples else None
    if "pool3" in samples and "pool3" in ref:
        res["precision"], res["recall"] = precision_recall(ref["pool3"], samples["pool3"])
    else:
        res["precision"] = res["recall"] = None
    return res


@functools.lru_cache(maxsize=2)
def inception_features(path: str) -> InceptionFeatures:
    """The network of ``--inception`` loaded once per process (sweeps score many models)."""
    return InceptionFeatures(load_inception(path))


def fid_of_images(images01: np.ndarray, inception: str | None, ref: str, batch_size: int = 64) -> dict:
    """Metrics of generated images (N, H, W, 3) in [0, 1] against ``ref`` (best a statistics .npz)."""
    from varjax.data.images import to_uint8

    if not inception or not ref:
        raise ValueError("FID needs both --inception (the Inception weights) and --fid-ref (reference statistics).")
    features = inception_features(str(inception))
    u8 = to_uint8(images01)
    batches = (u8[i : i + batch_size] for i in range(0, len(u8), batch_size))
    ref_stats, _ = read_set(ref, features, batch_size)
    res = metrics(_from_images(features, batches, len(u8), "samples"), ref_stats)
    return {**res, "fid_ref": str(ref)}


def stats_path(out, which: str) -> epath.Path:
    out = paths.resolve(out)
    return out.with_name(out.name.removesuffix(".json") + f".{which}_stats.npz")


def evaluate_fid(samples: str, ref: str, inception: str | None, out, batch_size: int = 64,
                 dtype=jnp.float32, image_size: int = 256, preprocess: str = "torch") -> dict:
    features = None
    if inception:
        features = InceptionFeatures(load_inception(inception), dtype=dtype, preprocess=preprocess)
    sets = {}
    for which, spec in (("samples", samples), ("ref", ref)):
        stats, computed = read_set(spec, features, batch_size, image_size)
        if computed:
            paths.write_npz(stats_path(out, which), **stats)
            print(f"[fid] {spec}: statistics saved to {stats_path(out, which)}")
        sets[which] = stats
    res = metrics(sets["samples"], sets["ref"])
    res.update(samples=samples, ref=ref, preprocess=preprocess)
    res["num_samples"] = int(len(sets["samples"]["pool3"])) if "pool3" in sets["samples"] else None
    return res
