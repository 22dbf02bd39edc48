"""Many class-conditional samples for FID (``varjax sample-many``), over all devices and hosts, resumable.

The official protocol: 50 samples for each of the 1000 classes, cfg 1.5, top-k 900, top-p 0.96, no
``more_smooth``; the images go into one ADM-format ``samples.npz`` scored by ``varjax fid`` (or the ADM
evaluator itself).

Order and randomness. Samples are listed class by class (class c, index i = 0..per_class-1) and cut into
chunks of one global batch. Every sample draws from its own key ``fold_in(fold_in(key(seed), c), i)``, so an
image depends only on (seed, c, i): not on the device or host count, the batch size, or which other
classes are generated.

Devices and hosts. The labels of a chunk are sharded over a 1-D mesh of all devices; each process hands in
its share (``jax.make_array_from_process_local_data``) and writes the images of its own devices. All
processes must see the same output directory, a local path or a URL (``gs://bucket/run``): every file goes
through ``varjax.core.paths``.

Output directory::

    OUT/settings.json                  the sampling settings (a re-run with other settings is refused)
    OUT/images/c0207_i0003.png         one PNG per sample
    OUT/chunks/c000012.p000.npz        finished chunk 12, process 0's rows: images, labels, positions (in the
                                       sample list) and the generator's extra (VAR tokens (B, L), E-CAR
                                       latents); written atomically (tmp + rename)
    OUT/samples.npz                    arr_0 uint8 (N, H, W, 3), arr_1 int64 labels, in class order

A re-run skips the chunks whose files all exist, so an interrupted run completes without regenerating or
duplicating anything; ``samples.npz`` is assembled at the end, streamed chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from varjax import sampling
from varjax.core import paths


def parse_classes(spec: str, num_classes: int) -> np.ndarray:
    """``all`` | ``A-B`` (inclusive) | ``3,7,...`` -> sorted unique class ids, checked against the model."""
    try:
        if spec == "all":
            ids = list(range(num_classes))
        elif "-" in spec:
            lo, hi = (int(x) for x in spec.split("-"))
            ids = list(range(lo, hi + 1))
        else:
            ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--classes {spec!r}: expected 'all', a range such as 0-99, or a list such as 3,7.") from None
    bad = [c for c in ids if not 0 <= c < num_classes]
    if not ids or bad:
        raise ValueError(f"--classes {spec!r}: classes must lie in 0..{num_classes - 1} (bad: {bad[:5]}).")
    return np.asarray(sorted(set(ids)), np.int32)


def sample_list(classes: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), index within class (N,)), class by class."""
    return np.repeat(classes, per_class).astype(np.int32), np.tile(np.arange(per_class, dtype=np.int32), len(classes))


@functools.lru_cache(maxsize=8)
def make_indexed_sampler(family: str, tok_cfg, gen_cfg, opts):
    """Jitted ``sample(tok_params, gen_params, label_B, index_B, seed) -> (uint8 images (B, H, W, 3), extra (B, ...))``.

    Each row runs the family's sampler as a batch of one with its own key, vectorised with ``vmap``.
    """
    generate = sampling.get(family).generate

    def one(tok_params, gen_params, label, index, seed):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), label), index)
        img, extra = generate(tok_cfg, gen_cfg, opts, tok_params, gen_params, label[None], key)
        return jnp.clip(img[0] * 255 + 0.5, 0, 255).astype(jnp.uint8), extra[0]  # as varjax.data.images.to_uint8

    return jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0, None)))


def _chunk_file(out: epath.Path, chunk: int, proc: int) -> epath.Path:
    return out / "chunks" / f"c{chunk:06d}.p{proc:03d}.npz"


def _png_bytes(image_HW3: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_HW3).save(buf, format="PNG")
    return buf.getvalue()


def _local_rows(sharding: NamedSharding, batch: int) -> np.ndarray:
    """Global rows of one batch that this process's devices hold, in the order it hands them in."""
    idx = sharding.addressable_devices_indices_map((batch,))
    rows = sorted({r for sl in idx.values() for r in range(*sl[0].indices(batch))})
    return np.asarray(rows, np.int64)


def _gather_rows(x_B: jax.Array, rows: np.ndarray) -> np.ndarray:
    """The given global rows of a batch-sharded (or replicated) array, from this process's shards."""
    full = np.zeros(x_B.shape, x_B.dtype)
    for s in x_B.addressable_shards:
        full[s.index[0]] = np.asarray(s.data)
    return full[rows]


def _done_chunks(out: epath.Path, n_chunks: int) -> np.ndarray:
    """(n_chunks,) bool: every process's file of the chunk exists; decided by process 0 for all (one listing of
    the chunk folder, not a request per file: on an object store 50,000 samples are thousands of files)."""
    n_proc = jax.process_count()
    folder = out / "chunks"
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    done = np.asarray([all(_chunk_file(out, c, p).name in names for p in range(n_proc)) for c in range(n_chunks)])
    return np.asarray(multihost_utils.broadcast_one_to_all(done)) if n_proc > 1 else done


def _check_settings(out: epath.Path, settings: dict) -> None:
    f = out / "settings.json"
    if f.is_file():
        old = paths.read_json(f, "the settings of the samples in this folder", "Delete the folder's files and sample "
                              "again, or choose a new --out.")
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(
                f"{out} holds samples made with other settings {diff} (old, new); pass the same flags to resume, "
                "or choose a new --out."
            )
    elif jax.process_index() == 0:
        paths.write_json(f, settings)


def write_adm_npz(path, chunks: list[list[epath.Path]], n: int, hw3: tuple[int, int, int]) -> None:
    """ADM-format npz (arr_0 uint8 (N, H, W, 3), arr_1 labels) streamed chunk by chunk, in sample order.

    ``chunks`` lists each chunk's files (one per process); rows are ordered by their sample positions. The file
    is written locally (a temporary file for a URL) and appears whole at ``path``.
    """
    labels, written = [], 0
    with paths.local_output(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, *hw3)})
            for files in chunks:
                parts = []
                for cf in files:
                    c = paths.load_npz(cf)
                    parts.append((c["positions"], c["images"], c["labels"]))
                pos = np.concatenate([p for p, _, _ in parts])
                order = np.argsort(pos, kind="stable")
                if not np.array_equal(pos[order], np.arange(written, written + len(pos))):
                    raise ValueError(f"{files[0].parent}: chunk files do not cover samples {written}.. in order; "
                                     "delete the output directory and sample again.")
                f.write(np.ascontiguousarray(np.concatenate([im for _, im, _ in parts])[order]).tobytes())
                labels.append(np.concatenate([lb for _, _, lb in parts])[order].astype(np.int64))
                written += len(pos)
        with z.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.concatenate(labels))


def read_extra(out, key: str = "tokens") -> np.ndarray:
    """What the samples of a finished run carry besides their images (VAR's (N, L) ``tokens``, E-CAR's
    ``latents``), in sample order (from the chunk files)."""
    parts = []
    for f in sorted((paths.resolve(out) / "chunks").glob("c*.p*.npz")):
        z = paths.load_npz(f)
        parts.append((z["positions"], z[key]))
    pos = np.concatenate([p for p, _ in parts])
    return np.concatenate([t for _, t in parts])[np.argsort(pos, kind="stable")]


@dataclasses.dataclass
class Result:
    num_samples: int
    generated_chunks: int  # chunks generated by this call (resumed runs skip finished ones)
    npz: epath.Path | None  # None when stopped early by max_chunks


def sample_many(
    bundle,
    out,
    *,
    classes: np.ndarray,
    per_class: int,
    opts,
    seed: int = 0,
    batch_size: int | None = None,
    devices=None,
    max_chunks: int | None = None,
    progress_every_s: float = 30.0,
) -> Result:
    """Generates the samples into ``out`` (see the module docstring); returns what it did.

    ``batch_size`` is the global batch (rounded up to a multiple of the device count); ``max_chunks`` stops
    after that many newly generated chunks (a time-limited job resumes later).
    """
    from varjax.core.metrics import Progress

    out = paths.resolve(out)
    devices = list(devices or jax.devices())
    mesh = Mesh(np.asarray(devices), ("data",))
    B = batch_size or 8 * len(devices)
    B = -(-B // len(devices)) * len(devices)
    labels, index = sample_list(classes, per_class)
    N = len(labels)
    n_chunks = -(-N // B)
    _check_settings(out, {"classes": classes.tolist(), "per_class": per_class, "seed": seed, "batch_size": B,
                          **dataclasses.asdict(opts)})
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    rows = _local_rows(sharding, B)
    sampler = make_indexed_sampler(bundle.family, bundle.tok_cfg, bundle.gen_cfg, opts)
    extra_key = sampling.get(bundle.family).EXTRA
    rep = NamedSharding(mesh, PartitionSpec())
    # host copies first: every process places the same values on the global mesh
    tok_p, gen_p = (jax.device_put(jax.tree.map(np.asarray, t), rep) for t in (bundle.tok_params, bundle.gen_params))
    done = _done_chunks(out, n_chunks)
    proc = jax.process_index()
    prog = Progress(N, start_step=min(int(done.sum()) * B, N), every_s=progress_every_s, batch_size=1, unit="images")
    generated = 0
    for c in range(n_chunks):
        if done[c]:
            continue
        if max_chunks is not None and generated >= max_chunks:
            return Result(N, generated, None)
        g = c * B + rows  # global sample positions of this process's rows; past N = padding
        valid = g < N
        g = np.where(valid, g, N - 1)
        lab = jax.make_array_from_process_local_data(sharding, labels[g], (B,))
        idx = jax.make_array_from_process_local_data(sharding, index[g], (B,))
        imgs, extra = sampler(tok_p, gen_p, lab, idx, seed)
        local, extra = _gather_rows(imgs, rows)[valid], _gather_rows(extra, rows)[valid]
        g = g[valid]
        for im, p in zip(local, g, strict=True):
            paths.write_bytes(out / "images" / f"c{labels[p]:04d}_i{index[p]:04d}.png", _png_bytes(im))
        # the chunk file last: it marks the chunk (and its images) as finished
        paths.write_npz(_chunk_file(out, c, proc), images=local, labels=labels[g], positions=g, **{extra_key: extra})
        generated += 1
        prog.update(min((c + 1) * B, N))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("varjax_sample_many_done")
    npz = out / "samples.npz"
    if proc == 0 and (generated or not npz.is_file()):  # samples.npz appears by atomic rename: complete if there
        files = [[_chunk_file(out, c, p) for p in range(jax.process_count())] for c in range(n_chunks)]
        size = bundle.tok_cfg.image_size
        write_adm_npz(npz, files, N, (size, size, 3))
    return Result(N, generated, npz)
