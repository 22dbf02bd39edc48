"""Which data a training run reads, how large it is, and its iterator: one entry point for every source.

A run reads one of three sources, chosen once by ``varjax.config.resolve`` before any step count is computed:

* ``images``: a TFDS dataset or an image folder (``varjax.data.pipeline``, the only place TensorFlow is used);
* ``tokens``: a token cache (``config.data.tokens_cache``, VAR);
* ``latents``: a latent cache (``config.latents_cache``, E-CAR).

Planning needs no TensorFlow for the caches, for the embedded dataset or for a known class count; it reads
TFDS metadata only for a TFDS dataset that the run then reads anyway.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from varjax.core import paths
from varjax.data import caches

SOURCES = ("images", "tokens", "latents")

# Class counts of datasets known without opening them (TFDS names, before any '/config').
KNOWN_NUM_CLASSES = {"varjax_shapes": 6, "imagenet2012": 1000, "imagenet_resized": 1000}


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """The training data of a run, resolved once."""

    source: str  # "images" | "tokens" | "latents"
    cache: str | None  # the cache directory (tokens / latents)
    num_shards: int  # data shards of the training split (a multiple of the process count)
    steps_per_epoch: int  # global batches per pass over the source
    num_classes: int
    image_size: int
    config: Any  # config.data (read-only): names, splits, augmentation


def choose_source(data_cfg, latents_cache: str | None, allowed: tuple[str, ...], task: str) -> tuple[str, str | None]:
    """(source, cache) of a run: a cache when one is configured, else images; checked against the task."""
    chosen = [(k, p) for k, p in (("tokens", data_cfg.tokens_cache), ("latents", latents_cache)) if p]
    if len(chosen) > 1:
        raise ValueError("config.data.tokens_cache and config.latents_cache are both set; a run reads one source.")
    source, cache = chosen[0] if chosen else ("images", None)
    if source not in allowed:
        field = "config.data.tokens_cache" if source == "tokens" else "config.latents_cache"
        raise ValueError(f"{field} is set, but task {task!r} reads {' or '.join(allowed)}; unset it.")
    return source, cache


def num_classes(data_cfg) -> int:
    """Class count of a dataset: known names without opening anything, class folders, else TFDS metadata."""
    name = str(data_cfg.name)
    if name == "folder":
        if not data_cfg.folder:
            raise ValueError("config.data.folder is empty: with config.data.name='folder' it names the root holding "
                             f"{data_cfg.train_split}/<class>/<image> (a local path or a URL).")
        root = paths.resolve(data_cfg.folder) / data_cfg.train_split
        if not root.is_dir():
            raise ValueError(f"config.data.folder={data_cfg.folder!r}: {root} does not exist; expected "
                             f"{root}/<class>/<image>, one folder of images per class.")
        return len([d for d in root.iterdir() if d.is_dir()])
    base = name.split("/")[0].split(":")[0]
    if base in KNOWN_NUM_CLASSES:
        return KNOWN_NUM_CLASSES[base]
    from varjax.data import pipeline

    return pipeline.num_classes(data_cfg)


def steps_per_epoch(source: str, cache: str | None, data_cfg, global_batch_size: int, num_shards: int) -> int:
    if source == "images":
        from varjax.data import pipeline

        return pipeline.steps_per_epoch(data_cfg, global_batch_size, num_shards)
    return caches.steps_per_epoch(cache, source, global_batch_size, num_shards)


def plan(data_cfg, *, latents_cache: str | None, allowed: tuple[str, ...], task: str, image_size: int,
         global_batch_size: int, process_count: int, num_classes_override: int | None = None) -> DataPlan:
    source, cache = choose_source(data_cfg, latents_cache, allowed, task)
    shards = int(data_cfg.num_shards) or process_count
    if shards % process_count:
        raise ValueError(f"config.data.num_shards={shards} must be a multiple of the number of processes "
                         f"({process_count}).")
    if global_batch_size % shards:
        raise ValueError(f"config.batch_size={global_batch_size} must be divisible by the number of data shards "
                         f"({shards}): each shard feeds an equal slice of every global batch.")
    return DataPlan(
        source=source,
        cache=cache,
        num_shards=shards,
        steps_per_epoch=steps_per_epoch(source, cache, data_cfg, global_batch_size, shards),
        num_classes=int(num_classes_override or num_classes(data_cfg)),
        image_size=image_size,
        config=data_cfg,
    )


def train_iterator(dp: DataPlan, *, global_batch_size: int, process_index: int, process_count: int, seed: int):
    """This process's endless, resumable training batches of the planned source."""
    if dp.source == "images":
        from varjax.data import pipeline

        return pipeline.build_train_iter(dp.config, image_size=dp.image_size, global_batch_size=global_batch_size,
                                         process_index=process_index, process_count=process_count, seed=seed)
    return caches.train_iterator(dp.cache, dp.source, global_batch_size=global_batch_size,
                                 process_index=process_index, process_count=process_count, seed=seed,
                                 num_shards=dp.num_shards)


def eval_batches(data_cfg, *, image_size: int, global_batch_size: int, process_index: int, process_count: int,
                 split: str | None = None):
    """One pass over the evaluation split (or ``split``), centre-cropped images (see ``pipeline.build_eval_iter``)."""
    from varjax.data import pipeline

    if split is not None:
        frozen = hasattr(data_cfg, "as_configdict")
        data_cfg = data_cfg.as_configdict() if frozen else data_cfg.copy_and_resolve_references()
        with data_cfg.unlocked():
            data_cfg.eval_split = split
    return pipeline.build_eval_iter(data_cfg, image_size=image_size, global_batch_size=global_batch_size,
                                    process_index=process_index, process_count=process_count)
