"""Input pipeline: per-process, deterministic, resumable batches of images (or pre-computed tokens).

Sources, chosen by `cfg.name`:
  * a TFDS name such as 'varjax_shapes', 'varjax_shapes/64' or 'imagenet2012' (read from `cfg.data_dir`,
    prepared on first use; ImageNet needs its archives in `cfg.manual_dir`);
  * 'folder': an ImageNet-style tree `cfg.folder/<split>/<class>/<image>` (class ids follow the sorted
    class folder names, like torchvision's DatasetFolder);
  * for training only, `cfg.tokens_cache`: a directory written by `write_token_cache`.

Each process reads its own shard (`tfds.even_splits(split, n=process_count)[process_index]`, or every
`process_count`-th file of a folder) and yields `global_batch_size // process_count` examples per batch,
as numpy arrays: `{'image': (b, H, W, 3) float32 in [-1, 1], 'label': (b,) int32}` (NHWC).

Augmentation follows the reference: the short side is resized to `round(mid_reso * image_size)` (Lanczos,
antialiased), then a random `image_size` square is cropped (centre crop for eval), then an optional
horizontal flip.

Determinism and resumption: epoch `e` of process `p` is a fixed function of `(seed, p, e)`: its order
comes from a seeded shuffle of the shard and the augmentation of the example at position `i` from
stateless random ops keyed on `(seed, p, e, i)`. Every process runs the same number of steps per epoch
(the smallest shard decides), so `DataIterator.state()` is the same on all processes and restoring it
replays the stream exactly. Training repeats forever; eval makes one finite pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from varjax.data import shapes  # noqa: F401  (registers the `varjax_shapes` builder with TFDS)

Batch = dict[str, np.ndarray]

# Extensions decoded by `tf.io.decode_image` (the only decoder used for folders).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_TOKENS_FILE, _LABELS_FILE = "tokens.npy", "labels.npy"


def default_config() -> ml_collections.ConfigDict:
    """All fields the pipeline reads, with their defaults (the embedded 32x32 shapes dataset)."""
    return ml_collections.ConfigDict({
        "name": "varjax_shapes/32",  # TFDS name, or 'folder'
        "data_dir": None,  # TFDS data dir (None: TFDS default, ~/tensorflow_datasets)
        "manual_dir": None,  # where the imagenet2012 archives were downloaded by hand
        "folder": None,  # root with train/ and val/ class folders, for name='folder'
        "train_split": "train",
        "eval_split": "test",
        "hflip": False,
        "mid_reso": 1.125,  # resize the short side to round(mid_reso * image_size) before cropping
        "shuffle_buffer": 10_000,  # examples; a buffer >= the shard size gives a uniform shuffle
        "cache": False,  # keep the encoded TFDS records in memory (small datasets)
        "tokens_cache": None,  # directory written by write_token_cache; training then yields tokens
        "num_shards": 0,  # data shards of the training split (0: one per process); see build_train_iter
    })


# ----------------------------------------------------------------------------------------------------------
# Seeds and small helpers.


def _derive_seed(*parts: int) -> int:
    """A non-negative 63-bit integer mixing `parts` (a stable hash, the same on every machine)."""
    digest = hashlib.sha256(json.dumps([int(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _field(cfg: ml_collections.ConfigDict, key: str) -> Any:
    """`cfg[key]`, or its default when the config does not define it."""
    return cfg.get(key, default_config()[key])


def _per_process_batch(global_batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"data pipeline: process_index={process_index} must lie in [0, process_count={process_count})."
        )
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"data pipeline: global_batch_size={global_batch_size} must be a positive multiple of the "
            f"number of processes ({process_count}), since every process loads the same share of each batch."
        )
    return global_batch_size // process_count


def _shard_sizes(total: int, count: int) -> list[int]:
    """Sizes of `count` near-equal contiguous shards of `total` examples (larger shards first)."""
    return [len(part) for part in np.array_split(np.arange(total), count)]


def _hide_accelerators_from_tf() -> None:
    """TF only feeds data here; keep it off the GPUs and TPUs that JAX uses."""
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # already initialised, or no such device kind
            pass


# ----------------------------------------------------------------------------------------------------------
# Sources: a fixed-order dataset of encoded examples for one process.


@dataclasses.dataclass(frozen=True)
class _Source:
    """One process's shard of a split, in a fixed order.

    Attributes:
      dataset: elements {'image': encoded image (tf.string: bytes or a file path), 'label': int}.
      decode: maps an element's 'image' to a (H, W, 3) uint8 tensor.
      shard_sizes: number of examples in the shard of every process (this one and the others).
    """

    dataset: tf.data.Dataset
    decode: Callable[[tf.Tensor], tf.Tensor]
    shard_sizes: tuple[int, ...]


def _is_folder(cfg: ml_collections.ConfigDict) -> bool:
    return _field(cfg, "name") == "folder"


def _tfds_lookup(cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder named by `cfg.name`, not prepared: its `info` (features, splits' names) is readable."""
    name, data_dir = _field(cfg, "name"), _field(cfg, "data_dir")
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"data config: name={name!r} is neither a TFDS dataset nor 'folder' (data_dir={data_dir!r}). "
            "Expected e.g. 'varjax_shapes/32', 'varjax_shapes/64', 'imagenet2012' or 'folder'."
        ) from e


def _tfds_builder(cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder named by `cfg.name`, prepared on first use (nothing to download for varjax_shapes).

    With several hosts sharing one `data_dir`, prepare it once beforehand (e.g. by calling this from a
    single process) so that they do not all write it at the same time.
    """
    builder = _tfds_lookup(cfg)
    if not builder.is_prepared():
        manual_dir = _field(cfg, "manual_dir")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def _split_dir(cfg: ml_collections.ConfigDict, split: str) -> str:
    """The folder of `split`; 'validation' and 'test' fall back to 'val' like the reference's layout."""
    root = _field(cfg, "folder")
    if not root:
        raise ValueError("data config: name='folder' needs `folder`, the root holding train/ and val/.")
    candidates = [split] + (["val"] if split in ("validation", "test") else [])
    for candidate in candidates:
        path = os.path.join(root, candidate)
        if os.path.isdir(path):
            return path
    tried = " or ".join(os.path.join(root, c) for c in candidates)
    raise ValueError(f"data config: folder split {split!r} not found; expected a directory {tried}.")


def _class_names(cfg: ml_collections.ConfigDict) -> list[str]:
    """Sorted class folder names of the train split (they define the class ids of every split)."""
    train = _split_dir(cfg, _field(cfg, "train_split"))
    names = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
    if not names:
        raise ValueError(f"data config: folder {train} has no class subfolders; expected {train}/<class>/.")
    return names


def _folder_files(cfg: ml_collections.ConfigDict, split: str) -> tuple[list[str], list[int]]:
    """All image paths of a folder split, sorted by (class, file name), and their class ids."""
    split_dir = _split_dir(cfg, split)
    paths, labels = [], []
    for label, name in enumerate(_class_names(cfg)):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            continue
        files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        paths += [os.path.join(class_dir, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise ValueError(
            f"data config: folder {split_dir} holds no images; expected {split_dir}/<class>/<image> with "
            f"one of the extensions {', '.join(IMAGE_EXTENSIONS)}."
        )
    return paths, labels


def _decode_file(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def _open_source(cfg: ml_collections.ConfigDict, split: str, process_index: int, process_count: int) -> _Source:
    if _is_folder(cfg):
        paths, labels = _folder_files(cfg, split)
        shard_sizes = tuple(len(paths[p::process_count]) for p in range(process_count))
        dataset = tf.data.Dataset.from_tensor_slices({
            "image": paths[process_index::process_count],
            "label": np.asarray(labels[process_index::process_count], dtype=np.int64),
        })
        return _Source(dataset, _decode_file, shard_sizes)

    builder = _tfds_builder(cfg)
    if split not in builder.info.splits:
        raise ValueError(
            f"data config: split {split!r} is not in {builder.info.full_name}; it has "
            f"{sorted(builder.info.splits)}."
        )
    shards = tfds.even_splits(split, n=process_count)
    shard_sizes = tuple(builder.info.splits[s].num_examples for s in shards)
    # Decode after shuffling and skipping, so that a restore skips cheap encoded records.
    dataset = builder.as_dataset(
        split=shards[process_index], shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    dataset = dataset.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
    return _Source(dataset, builder.info.features["image"].decode_example, shard_sizes)


def count_examples(cfg: ml_collections.ConfigDict, split: str) -> int:
    """Number of examples in `split` (all processes together)."""
    if _is_folder(cfg):
        return len(_folder_files(cfg, split)[0])
    builder = _tfds_builder(cfg)
    if split not in builder.info.splits:
        raise ValueError(f"data config: split {split!r} is not in {builder.info.full_name}.")
    return builder.info.splits[split].num_examples


def num_classes(cfg: ml_collections.ConfigDict) -> int:
    """Number of classes of the dataset (the label feature of a TFDS dataset, or the class folders)."""
    if _is_folder(cfg):
        return len(_class_names(cfg))
    label = _tfds_lookup(cfg).info.features["label"]  # the features are known before the data is prepared
    return int(label.num_classes)


# ----------------------------------------------------------------------------------------------------------
# Preprocessing (pure TF functions of one example).


def resize_short_side(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes (H, W, 3) uint8 so that its short side is `size`, like torchvision's Resize(int).

    The long side becomes floor(size * long / short). Lanczos with antialiasing (PIL's LANCZOS in the
    reference); the result is clipped to [0, 255] and rounded, as PIL stores it in uint8. Returns float32.
    """
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    short = tf.cast(tf.minimum(h, w), tf.int64)

    def scaled(n):
        return tf.cast(size * tf.cast(n, tf.int64) // short, tf.int32)

    new_h = tf.where(h <= w, size, scaled(h))
    new_w = tf.where(h <= w, scaled(w), size)
    pixels = tf.cast(image, tf.float32)

    def resize():
        out = tf.image.resize(pixels, tf.stack([new_h, new_w]), method="lanczos3", antialias=True)
        return tf.round(tf.clip_by_value(out, 0.0, 255.0))

    # Skip the (identity) resampling when the size already matches, so such images stay bit-exact.
    return tf.cond(tf.logical_and(new_h == h, new_w == w), lambda: pixels, resize)


def _to_pm1(image: tf.Tensor) -> tf.Tensor:
    """[0, 255] -> [-1, 1]."""
    return image / 127.5 - 1.0


def train_preprocess(
    image: tf.Tensor, key: tf.Tensor, *, image_size: int, mid_reso: float, hflip: bool
) -> tf.Tensor:
    """(H, W, 3) uint8 -> (image_size, image_size, 3) float32 in [-1, 1]: resize, random crop, flip.

    `key` is a (2,) int64 stateless seed; the result is a pure function of (image, key).
    """
    image = resize_short_side(image, round(mid_reso * image_size))
    crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=crop_key)
    if hflip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_key)
    return _to_pm1(image)


def eval_preprocess(image: tf.Tensor, *, image_size: int, mid_reso: float) -> tf.Tensor:
    """(H, W, 3) uint8 -> (image_size, image_size, 3) float32 in [-1, 1]: resize, centre crop."""
    image = resize_short_side(image, round(mid_reso * image_size))
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    # torchvision's CenterCrop rounds the offsets half to even, as tf.round does.
    top = tf.cast(tf.round(tf.cast(h - image_size, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(w - image_size, tf.float32) / 2), tf.int32)
    image = tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)
    return _to_pm1(image)


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


# ----------------------------------------------------------------------------------------------------------
# Resumable iterator.


class DataIterator:
    """Endless iterator of numpy batches, epoch by epoch, that can save and restore its position.

    `state()` is a json-serialisable dict; after `restore(state)` on a new iterator built with the same
    arguments, the next batches are exactly those the saved iterator would have produced.

    Attributes:
      steps_per_epoch: batches per epoch (the same on every process).
    """

    def __init__(
        self,
        make_epoch: Callable[[int, int], Iterator[Batch]],
        *,
        steps_per_epoch: int,
        global_batch_size: int,
        seed: int,
    ):
        """`make_epoch(epoch, start)` iterates over the batches of `epoch` from batch number `start` on."""
        self._make_epoch = make_epoch
        self.steps_per_epoch = steps_per_epoch
        self._global_batch_size = global_batch_size
        self._seed = seed
        self._epoch, self._position = 0, 0
        self._batches: Iterator[Batch] | None = None

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> Batch:
        if self._position >= self.steps_per_epoch:
            self._epoch, self._position, self._batches = self._epoch + 1, 0, None
        if self._batches is None:
            self._batches = self._make_epoch(self._epoch, self._position)
        batch = next(self._batches)  # an epoch holds exactly steps_per_epoch batches, so this never ends
        self._position += 1
        return batch

    def state(self) -> dict[str, int]:
        """{'epoch', 'position' (batches consumed in that epoch), 'global_batch_size', 'seed'}."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "global_batch_size": self._global_batch_size,
            "seed": self._seed,
        }

    def restore(self, state: dict[str, int]) -> None:
        """Continues from `state` (as returned by `state()` of an iterator with the same arguments)."""
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"DataIterator.restore: state {state} lacks the keys {sorted(missing)}.")
        for key, mine in (("global_batch_size", self._global_batch_size), ("seed", self._seed)):
            if key in state and int(state[key]) != mine:
                raise ValueError(
                    f"DataIterator.restore: the saved data state has {key}={state[key]} but this iterator "
                    f"was built with {key}={mine}; resuming would not replay the same batches."
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.steps_per_epoch:
            raise ValueError(
                f"DataIterator.restore: state {state} is out of range (position must lie in "
                f"[0, steps_per_epoch={self.steps_per_epoch}])."
            )
        self._epoch, self._position, self._batches = epoch, position, None


def _steps_per_epoch(shard_sizes: tuple[int, ...], batch_size: int, what: str) -> int:
    steps = min(shard_sizes) // batch_size
    if steps == 0:
        raise ValueError(
            f"data pipeline: {what} has only {min(shard_sizes)} examples in the smallest per-process shard, "
            f"fewer than the per-process batch size {batch_size}; lower global_batch_size."
        )
    return steps


def build_train_iter(
    cfg: ml_collections.ConfigDict,
    *,
    image_size: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
) -> DataIterator:
    """Training batches of this process; with ``cfg.num_shards`` = S (a multiple of the process count), the
    data is split into S shards and each process concatenates its S / process_count shards' batches in order.

    The global batch then depends only on S and the seed, not on how many processes load it: one process
    with S = 2 sees exactly the batches two processes with S = 2 feed together, and a run can resume on
    another number of hosts. The default S = process_count is the plain per-process split.
    """
    shards = int(_field(cfg, "num_shards") or 0) or process_count
    if shards % process_count:
        raise ValueError(
            f"data pipeline: config.data.num_shards={shards} must be a multiple of the number of processes "
            f"({process_count})."
        )
    k = shards // process_count
    parts = [
        _build_shard_iter(cfg, image_size=image_size, global_batch_size=global_batch_size,
                          process_index=process_index * k + j, process_count=shards, seed=seed)
        for j in range(k)
    ]
    return parts[0] if k == 1 else _ConcatIterator(parts)


class _ConcatIterator:
    """Several shard iterators advanced in lockstep; batches are concatenated along the batch axis."""

    def __init__(self, parts: list[DataIterator]):
        self._parts = parts
        self.steps_per_epoch = parts[0].steps_per_epoch

    def __iter__(self) -> _ConcatIterator:
        return self

    def __next__(self) -> Batch:
        batches = [next(p) for p in self._parts]
        return {key: np.concatenate([b[key] for b in batches], axis=0) for key in batches[0]}

    def state(self) -> dict[str, int]:
        return self._parts[0].state()  # every part is at the same epoch and position

    def restore(self, state: dict[str, int]) -> None:
        for p in self._parts:
            p.restore(state)


def _build_shard_iter(
    cfg: ml_collections.ConfigDict,
    *,
    image_size: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
) -> DataIterator:
    """Endless, shuffled, augmented training batches of this process's shard (see the module docstring).

    Yields {'image': (b, image_size, image_size, 3) float32 in [-1, 1], 'label': (b,) int32} with
    b = global_batch_size // process_count, or {'tokens': (b, L) int32, 'label': (b,) int32} when
    `cfg.tokens_cache` is set.
    """
    batch = _per_process_batch(global_batch_size, process_index, process_count)
    if _field(cfg, "tokens_cache"):
        return _token_cache_iter(
            _field(cfg, "tokens_cache"), batch, global_batch_size, process_index, process_count, seed
        )
    _hide_accelerators_from_tf()
    source = _open_source(cfg, _field(cfg, "train_split"), process_index, process_count)
    steps = _steps_per_epoch(source.shard_sizes, batch, f"split {_field(cfg, 'train_split')!r}")
    encoded = source.dataset.cache() if _field(cfg, "cache") else source.dataset
    shard_size = source.shard_sizes[process_index]
    buffer = max(1, min(int(_field(cfg, "shuffle_buffer")), shard_size))
    mid_reso, hflip = float(_field(cfg, "mid_reso")), bool(_field(cfg, "hflip"))

    def make_epoch(epoch: int, start: int) -> Iterator[Batch]:
        key = tf.constant([seed, _derive_seed(seed, process_index, epoch)], dtype=tf.int64)

        def load(position, example):
            image = source.decode(example["image"])
            image = train_preprocess(
                image, tf.random.experimental.stateless_fold_in(key, position),
                image_size=image_size, mid_reso=mid_reso, hflip=hflip,
            )
            return {"image": image, "label": tf.cast(example["label"], tf.int32)}

        ds = encoded.shuffle(buffer, seed=_derive_seed(seed, process_index, epoch, 1),
                             reshuffle_each_iteration=False)
        ds = ds.take(steps * batch).enumerate().skip(start * batch)
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        return ds.with_options(_options()).as_numpy_iterator()

    return DataIterator(make_epoch, steps_per_epoch=steps, global_batch_size=global_batch_size, seed=seed)


class EvalBatches:
    """One pass over this process's shard of the eval split, re-iterable.

    Every process yields `len(self)` batches (the largest shard decides), the last ones padded: batches are
    {'image': (b, H, W, 3) float32 in [-1, 1], 'label': (b,) int32, 'mask': (b,) float32}, where mask is 1
    for real examples and 0 for padding (image and label 0).
    """

    def __init__(self, dataset: tf.data.Dataset, num_batches: int, num_examples: int):
        self._dataset = dataset
        self.num_batches = num_batches
        self.num_examples = num_examples  # real examples of this process

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        return self._dataset.as_numpy_iterator()


def build_eval_iter(
    cfg: ml_collections.ConfigDict,
    *,
    image_size: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
) -> EvalBatches:
    """Centre-cropped batches of this process's shard of `cfg.eval_split`, in a fixed order (finite)."""
    batch = _per_process_batch(global_batch_size, process_index, process_count)
    _hide_accelerators_from_tf()
    source = _open_source(cfg, _field(cfg, "eval_split"), process_index, process_count)
    num_batches = math.ceil(max(source.shard_sizes) / batch)
    num_examples = source.shard_sizes[process_index]
    mid_reso = float(_field(cfg, "mid_reso"))

    def load(example):
        image = eval_preprocess(source.decode(example["image"]), image_size=image_size, mid_reso=mid_reso)
        return {"image": image, "label": tf.cast(example["label"], tf.int32), "mask": tf.constant(1.0)}

    padding = tf.data.Dataset.from_tensors({
        "image": tf.zeros([image_size, image_size, 3], tf.float32),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0),
    }).repeat(num_batches * batch - num_examples)
    ds = source.dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.concatenate(padding).batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return EvalBatches(ds.with_options(_options()), num_batches, num_examples)


# ----------------------------------------------------------------------------------------------------------
# Pre-tokenized cache.
#
# A directory with tokens.npy ((N, L) int16 or int32, read through a memory map) and labels.npy ((N,)
# int32): one row of tokens per example, typically the tokenizer's codes of the centre crop (no augmentation
# is applied when reading). Training from it shards, shuffles and resumes like the image pipeline: process
# p owns the p-th of `process_count` contiguous blocks, and epoch e is a permutation of that block drawn
# from (seed, p, e).


def write_token_cache(path: str, tokens_BL: np.ndarray, labels_B: np.ndarray) -> None:
    """Writes a token cache directory `path` (created if needed; existing files are replaced).

    Args:
      tokens_BL: (B, L) integer token ids; kept as int16 when every id fits, else stored as int32.
      labels_B: (B,) integer class labels.
    """
    tokens, labels = np.asarray(tokens_BL), np.asarray(labels_B)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"write_token_cache: tokens must be a (B, L) integer array, got {tokens.dtype} "
                         f"{tokens.shape}.")
    if labels.shape != (tokens.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"write_token_cache: labels must be a ({tokens.shape[0]},) integer array, got "
                         f"{labels.dtype} {labels.shape}.")
    info16 = np.iinfo(np.int16)
    fits16 = tokens.size == 0 or (tokens.min() >= info16.min and tokens.max() <= info16.max)
    from varjax import paths

    for name, array in ((_TOKENS_FILE, tokens.astype(np.int16 if fits16 else np.int32)),
                        (_LABELS_FILE, labels.astype(np.int32))):
        paths.write_bytes(paths.resolve(path) / name, paths.save_npy_bytes(array))


def read_token_cache(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N, L) memory-mapped, labels (N,) int32) of a cache written by `write_token_cache`."""
    from varjax import paths

    files = [paths.resolve(path) / name for name in (_TOKENS_FILE, _LABELS_FILE)]
    if not all(f.is_file() for f in files):
        raise ValueError(
            f"data config: tokens_cache={path!r} is not a token cache; expected {' and '.join(map(str, files))} "
            "(written by varjax.data.pipeline.write_token_cache)."
        )
    if paths.is_url(files[0]):  # remote: read into memory (memory maps need a local file)
        tokens, labels = (np.load(io.BytesIO(f.read_bytes())) for f in files)
    else:
        tokens, labels = np.load(files[0], mmap_mode="r"), np.load(files[1])
    if tokens.ndim != 2 or labels.shape != (tokens.shape[0],):
        raise ValueError(f"data config: tokens_cache={path!r} holds tokens {tokens.shape} and labels "
                         f"{labels.shape}; expected (N, L) and (N,).")
    return tokens, labels


def _token_cache_iter(
    path: str, batch: int, global_batch_size: int, process_index: int, process_count: int, seed: int
) -> DataIterator:
    tokens, labels = read_token_cache(path)
    shard_sizes = tuple(_shard_sizes(len(labels), process_count))
    steps = _steps_per_epoch(shard_sizes, batch, f"tokens_cache {path!r}")
    first = sum(shard_sizes[:process_index])
    shard = np.arange(first, first + shard_sizes[process_index])

    def make_epoch(epoch: int, start: int) -> Iterator[Batch]:
        order = np.random.default_rng(_derive_seed(seed, process_index, epoch)).permutation(shard)
        for step in range(start, steps):
            # Sorted reads are kinder to the memory map; the order inside a batch does not matter.
            idx = np.sort(order[step * batch:(step + 1) * batch])
            yield {"tokens": np.asarray(tokens[idx], dtype=np.int32), "label": labels[idx].astype(np.int32)}

    return DataIterator(make_epoch, steps_per_epoch=steps, global_batch_size=global_batch_size, seed=seed)
