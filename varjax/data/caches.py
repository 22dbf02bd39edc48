"""Pre-computed training inputs: token caches (VAR) and latent caches (E-CAR), written once, read resumably.

A cache is a directory (local or a URL) with two arrays, one row per example, typically the tokenizer's output
for the centre crop (no augmentation is applied when reading):

* ``tokens.npy`` (N, L) int16 (int32 when an id does not fit) or ``latents.npy`` (N, h, w, C) float32,
* ``labels.npy`` (N,) int32.

Local caches are read through a memory map; URLs are read into memory. Training from a cache shards,
shuffles and resumes like the image pipeline (``varjax.data.iterator``): shard p owns the p-th of
``num_shards`` contiguous blocks, and epoch e is a permutation of that block drawn from (seed, p, e).
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np

from varjax.core import paths
from varjax.data import iterator

KINDS = ("tokens", "latents")
LABELS_FILE = "labels.npy"


def _file(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"cache kind {kind!r}: expected one of {KINDS}.")
    return f"{kind}.npy"


def _field(kind: str) -> str:
    return "data.tokens_cache" if kind == "tokens" else "latents_cache"


def write_cache(path, kind: str, values: np.ndarray, labels_B: np.ndarray) -> None:
    """Writes a cache directory ``path`` (created if needed; existing files are replaced atomically).

    Args:
      kind: 'tokens' ((B, L) integer ids; kept as int16 when every id fits) or 'latents' ((B, h, w, C)).
      labels_B: (B,) integer class labels.
    """
    values, labels = np.asarray(values), np.asarray(labels_B)
    if kind == "tokens":
        if values.ndim != 2 or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"a token cache holds a (B, L) integer array, got {values.dtype} {values.shape}.")
        info16 = np.iinfo(np.int16)
        fits16 = values.size == 0 or (values.min() >= info16.min and values.max() <= info16.max)
        values = values.astype(np.int16 if fits16 else np.int32)
    else:
        if values.ndim != 4:
            raise ValueError(f"a latent cache holds a (B, h, w, C) array, got {values.shape}.")
        values = values.astype(np.float32)
    if labels.shape != (values.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"cache labels must be a ({values.shape[0]},) integer array, got {labels.dtype} "
                         f"{labels.shape}.")
    for name, array in ((_file(kind), values), (LABELS_FILE, labels.astype(np.int32))):
        paths.write_bytes(paths.resolve(path) / name, paths.save_npy_bytes(array))


def write_token_cache(path, tokens_BL: np.ndarray, labels_B: np.ndarray) -> None:
    write_cache(path, "tokens", tokens_BL, labels_B)


def exists(path, kind: str) -> bool:
    return all((paths.resolve(path) / f).is_file() for f in (_file(kind), LABELS_FILE))


def _files(path, kind: str):
    files = [paths.resolve(path) / name for name in (_file(kind), LABELS_FILE)]
    if not all(f.is_file() for f in files):
        raise ValueError(
            f"config {_field(kind)}={str(path)!r} is not a {kind[:-1]} cache; expected "
            f"{' and '.join(map(str, files))}."
        )
    return files


def cache_size(path, kind: str) -> int:
    """Number of examples, from the array header alone."""
    with _files(path, kind)[1].open("rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)
    return int(shape[0])


def read_cache(path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(values (N, ...) memory-mapped when local, labels (N,) int32)."""
    files = _files(path, kind)
    if paths.is_url(files[0]):  # memory maps need a local file
        values, labels = (np.load(io.BytesIO(f.read_bytes())) for f in files)
    else:
        values, labels = np.load(files[0], mmap_mode="r"), np.load(files[1])
    if labels.shape != (values.shape[0],):
        raise ValueError(f"config {_field(kind)}={str(path)!r} holds {kind} {values.shape} and labels "
                         f"{labels.shape}; expected the same number of rows.")
    return values, labels


def read_token_cache(path) -> tuple[np.ndarray, np.ndarray]:
    return read_cache(path, "tokens")


def steps_per_epoch(path, kind: str, global_batch_size: int, num_shards: int) -> int:
    """Batches per epoch of a cache split into ``num_shards`` shards (what :func:`train_iterator` yields)."""
    batch = global_batch_size // num_shards
    return iterator.steps_per_epoch(tuple(iterator.shard_sizes(cache_size(path, kind), num_shards)), batch,
                                    f"{_field(kind)} {str(path)!r}")


def _shard_iterator(values, labels, kind: str, what: str, shard: int, num_shards: int, global_batch_size: int,
                    seed: int) -> iterator.DataIterator:
    batch = iterator.per_process_batch(global_batch_size, shard, num_shards)
    sizes = tuple(iterator.shard_sizes(len(labels), num_shards))
    steps = iterator.steps_per_epoch(sizes, batch, what)
    first = sum(sizes[:shard])
    rows = np.arange(first, first + sizes[shard])
    dtype = np.int32 if kind == "tokens" else np.float32

    def make_epoch(epoch: int, start: int) -> Iterator[iterator.Batch]:
        order = np.random.default_rng(iterator.derive_seed(seed, shard, epoch)).permutation(rows)
        for step in range(start, steps):
            # Sorted reads are kinder to the memory map; the order inside a batch does not matter.
            idx = np.sort(order[step * batch:(step + 1) * batch])
            yield {kind: np.asarray(values[idx], dtype=dtype), "label": labels[idx].astype(np.int32)}

    return iterator.DataIterator(make_epoch, steps_per_epoch=steps, global_batch_size=global_batch_size, seed=seed)


def train_iterator(path, kind: str, *, global_batch_size: int, process_index: int, process_count: int, seed: int,
                   num_shards: int = 0):
    """Endless shuffled batches ``{kind: (b, ...), 'label': (b,)}`` of this process's shards of a cache."""
    values, labels = read_cache(path, kind)
    what = f"{_field(kind)} {str(path)!r}"
    return iterator.sharded(
        lambda shard, n: _shard_iterator(values, labels, kind, what, shard, n, global_batch_size, seed),
        num_shards, process_index, process_count)
