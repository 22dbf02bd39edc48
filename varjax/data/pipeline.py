"""Image input pipeline (TensorFlow): per-process, deterministic, resumable batches of a TFDS dataset or folder.

Sources, chosen by ``cfg.name`` (``config.data``; defaults in ``configs/common.py``):
  * a TFDS name such as 'varjax_shapes', 'varjax_shapes/64' or 'imagenet2012' (read from ``cfg.data_dir``,
    prepared on first use; ImageNet needs its archives in ``cfg.manual_dir``);
  * 'folder': an ImageNet-style tree ``cfg.folder/<split>/<class>/<image>`` (class ids follow the sorted
    class folder names, like torchvision's DatasetFolder).
Pre-computed tokens and latents are read by ``varjax.data.caches`` instead, without TensorFlow.

Each shard (``tfds.even_splits(split, n=num_shards)[shard]``, or every ``num_shards``-th file of a folder)
yields ``global_batch_size // num_shards`` examples per batch, as numpy arrays:
``{'image': (b, H, W, 3) float32 in [-1, 1], 'label': (b,) int32}`` (NHWC); ``varjax.data.iterator`` splits
the shards over processes and makes the stream resumable.

Augmentation follows the reference: the short side is resized to ``round(mid_reso * image_size)`` (Lanczos,
antialiased), then a random ``image_size`` square is cropped (centre crop for eval), then an optional
horizontal flip. Epoch ``e`` of shard ``p`` is a fixed function of ``(seed, p, e)``: its order comes from a
seeded shuffle of the shard and the augmentation of the example at position ``i`` from stateless random ops
keyed on ``(seed, p, e, i)``. Training repeats forever; eval makes one finite pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
from etils import epath

from varjax.core import paths
from varjax.data import iterator, shapes_tfds  # noqa: F401  (shapes_tfds registers `varjax_shapes` with TFDS)
from varjax.data.iterator import Batch, DataIterator
from varjax.data.tf_import import tf, tfds

# Extensions decoded by `tf.io.decode_image` (the only decoder used for folders).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


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
    return cfg.name == "folder"


def _tfds_lookup(cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder named by `cfg.name`, not prepared: its `info` (features, splits' names) is readable."""
    name, data_dir = cfg.name, cfg.data_dir
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
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=cfg.manual_dir))
        except Exception as e:  # noqa: BLE001 - TFDS reports missing files and failed downloads in many types
            raise ValueError(_not_prepared(cfg, builder, e)) from None
    return builder


def _not_prepared(cfg: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, e: BaseException) -> str:
    """One paragraph: the dataset is not prepared and why it could not be, naming the config fields to set."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0].partition(". Create it")[0]
    text = (f"config.data.name={cfg.name!r}: the TFDS dataset is not prepared in {builder.data_dir} "
            f"(config.data.data_dir={cfg.data_dir!r}) and preparing it failed ({reason[:300].rstrip('.')}).")
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if manual:
        where = repr(cfg.manual_dir) if cfg.manual_dir else "unset, so TFDS looks in DATA_DIR/downloads/manual"
        files = " ".join(line.strip() for line in manual.strip().splitlines() if line.strip())
        text += (f" It is prepared from files you download yourself into config.data.manual_dir (now {where}): "
                 f"{files}")
    return text + (" Set config.data.data_dir to a directory where the dataset is prepared, or provide its files "
                   "and re-run; config.data.name='folder' with config.data.folder reads a folder of images instead.")


def _split_dir(cfg: ml_collections.ConfigDict, split: str) -> epath.Path:
    """The folder of `split` (local or a URL); 'validation' and 'test' fall back to 'val' like the reference's
    layout."""
    root = cfg.folder
    if not root:
        raise ValueError("config.data.folder is empty: with config.data.name='folder' it names the root holding "
                         "train/ and val/ class folders (a local path or a URL).")
    candidates = [split] + (["val"] if split in ("validation", "test") else [])
    for candidate in candidates:
        path = paths.resolve(root) / candidate
        if path.is_dir():
            return path
    tried = " or ".join(str(paths.resolve(root) / c) for c in candidates)
    raise ValueError(f"config.data.folder={root!r}: split {split!r} not found; expected a directory {tried} holding "
                     "one folder of images per class.")


def _class_names(cfg: ml_collections.ConfigDict) -> list[str]:
    """Sorted class folder names of the train split (they define the class ids of every split)."""
    train = _split_dir(cfg, cfg.train_split)
    names = sorted(d.name for d in train.iterdir() if d.is_dir())
    if not names:
        raise ValueError(f"config.data.folder={cfg.folder!r}: {train} has no class subfolders; expected "
                         f"{train}/<class>/<image>.")
    return names


def _folder_files(cfg: ml_collections.ConfigDict, split: str) -> tuple[list[str], list[int]]:
    """All image paths of a folder split, sorted by (class, file name), and their class ids."""
    split_dir = _split_dir(cfg, split)
    files, labels = [], []
    for label, name in enumerate(_class_names(cfg)):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        found = sorted(f.name for f in class_dir.iterdir() if f.name.lower().endswith(IMAGE_EXTENSIONS))
        files += [str(class_dir / f) for f in found]
        labels += [label] * len(found)
    if not files:
        raise ValueError(
            f"config.data.folder={cfg.folder!r}: {split_dir} holds no images; expected {split_dir}/<class>/<image> "
            f"with one of the extensions {', '.join(IMAGE_EXTENSIONS)}."
        )
    return files, labels


def _decode_file(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def _read_url(path: bytes) -> bytes:
    return paths.resolve(path.decode()).read_bytes()


def _decode_url(path: tf.Tensor) -> tf.Tensor:
    """A file under a URL, read through the path layer (``tf.io`` knows only the file systems built into TF)."""
    data = tf.numpy_function(_read_url, [path], tf.string, stateful=False)
    image = tf.io.decode_image(tf.reshape(data, []), channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def _open_source(cfg: ml_collections.ConfigDict, split: str, process_index: int, process_count: int) -> _Source:
    if _is_folder(cfg):
        files, labels = _folder_files(cfg, split)
        shard_sizes = tuple(len(files[p::process_count]) for p in range(process_count))
        dataset = tf.data.Dataset.from_tensor_slices({
            "image": files[process_index::process_count],
            "label": np.asarray(labels[process_index::process_count], dtype=np.int64),
        })
        return _Source(dataset, _decode_url if paths.is_url(cfg.folder) else _decode_file, shard_sizes)

    builder = _tfds_builder(cfg)
    if split not in builder.info.splits:
        raise ValueError(
            f"data config: split {split!r} is not in {builder.info.full_name}; it has "
            f"{sorted(builder.info.splits)}."
        )
    shards = tfds.even_splits(split, n=process_count)
    shard_sizes = tuple(builder.info.splits[s].num_examples for s in shards)
    # Decode after shuffling and skipping, so that a restore skips cheap encoded records. No auto-cache (for
    # every split read here): a training epoch takes whole batches only and training may stop inside one, so the
    # source is often left partly read; TF then throws the cache away (no gain) and prints a warning each time.
    dataset = builder.as_dataset(
        split=shards[process_index], shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False),
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


def dataset_options() -> tf.data.Options:
    """Options of every dataset varjax iterates: deterministic order, no autotuning model."""
    options = tf.data.Options()
    options.deterministic = True
    # No autotuning model: an iterator's destructor waits for the model's thread to wake from its sleep between
    # optimisations, which grows with the iterator's age. Each epoch boundary and eval pass stalled training
    # (55 s at the main job's first epoch end; 16 s to drop an iterator 25 s old). Without it a parallel map keeps
    # TensorFlow's default parallelism, and the main job's tokenizer batches come no slower (7,000 img/s either
    # way on 2 cores).
    options.autotune.enabled = False
    return options


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation batches.


def build_train_iter(
    cfg: ml_collections.ConfigDict,
    *,
    image_size: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
):
    """Training batches of this process's shards (``cfg.num_shards``, 0: one per process; see
    ``varjax.data.iterator.sharded``)."""
    return iterator.sharded(lambda shard, n: _shard_iter(cfg, image_size, global_batch_size, shard, n, seed),
                            int(cfg.num_shards), process_index, process_count)


def steps_per_epoch(cfg: ml_collections.ConfigDict, global_batch_size: int, num_shards: int) -> int:
    """Batches per epoch of the training split in ``num_shards`` shards (what :func:`build_train_iter` yields)."""
    split = cfg.train_split
    if _is_folder(cfg):
        files = _folder_files(cfg, split)[0]
        sizes = tuple(len(files[p::num_shards]) for p in range(num_shards))
    else:
        builder = _tfds_lookup(cfg)
        if split not in builder.info.splits:
            builder = _tfds_builder(cfg)  # split sizes are known once the dataset is prepared
        sizes = tuple(builder.info.splits[s].num_examples for s in tfds.even_splits(split, n=num_shards))
    return iterator.steps_per_epoch(sizes, global_batch_size // num_shards, f"split {split!r}")


def _shard_iter(cfg: ml_collections.ConfigDict, image_size: int, global_batch_size: int, process_index: int,
                process_count: int, seed: int) -> DataIterator:
    """Endless, shuffled, augmented training batches of shard ``process_index`` of ``process_count`` (see the module
    docstring): {'image': (b, image_size, image_size, 3) float32 in [-1, 1], 'label': (b,) int32},
    b = global_batch_size // process_count."""
    batch = iterator.per_process_batch(global_batch_size, process_index, process_count)
    _hide_accelerators_from_tf()
    source = _open_source(cfg, cfg.train_split, process_index, process_count)
    steps = iterator.steps_per_epoch(source.shard_sizes, batch, f"split {cfg.train_split!r}")
    encoded = source.dataset.cache() if cfg.cache else source.dataset
    shard_size = source.shard_sizes[process_index]
    buffer = max(1, min(int(cfg.shuffle_buffer), shard_size))
    mid_reso, hflip = float(cfg.mid_reso), bool(cfg.hflip)

    def make_epoch(epoch: int, start: int) -> Iterator[Batch]:
        key = tf.constant([seed, iterator.derive_seed(seed, process_index, epoch)], dtype=tf.int64)

        def load(position, example):
            image = source.decode(example["image"])
            image = train_preprocess(
                image, tf.random.experimental.stateless_fold_in(key, position),
                image_size=image_size, mid_reso=mid_reso, hflip=hflip,
            )
            return {"image": image, "label": tf.cast(example["label"], tf.int32)}

        ds = encoded.shuffle(buffer, seed=iterator.derive_seed(seed, process_index, epoch, 1),
                             reshuffle_each_iteration=False)
        ds = ds.take(steps * batch).enumerate().skip(start * batch)
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        return ds.with_options(dataset_options()).as_numpy_iterator()

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
    batch = iterator.per_process_batch(global_batch_size, process_index, process_count)
    _hide_accelerators_from_tf()
    source = _open_source(cfg, cfg.eval_split, process_index, process_count)
    num_batches = math.ceil(max(source.shard_sizes) / batch)
    num_examples = source.shard_sizes[process_index]
    mid_reso = float(cfg.mid_reso)

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
    return EvalBatches(ds.with_options(dataset_options()), num_batches, num_examples)
