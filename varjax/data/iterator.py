"""Resumable iteration over per-process data shards: the iterator every training source yields through.

Determinism and resumption: epoch ``e`` of shard ``p`` is a fixed function of ``(seed, p, e)`` (the sources
shuffle with :func:`derive_seed`), every shard runs the same number of steps per epoch (the smallest shard
decides), so :meth:`DataIterator.state` is the same on all processes and restoring it replays the stream
exactly.

Sharding: the training data is split into ``num_shards`` shards (default: one per process); each process
concatenates the batches of its ``num_shards / process_count`` shards in order, so the global batch depends only
on the shard count and the seed, not on how many processes load it, and a run can resume on another number of
hosts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator

import numpy as np

Batch = dict[str, np.ndarray]


def derive_seed(*parts: int) -> int:
    """A non-negative 63-bit integer mixing `parts` (a stable hash, the same on every machine)."""
    digest = hashlib.sha256(json.dumps([int(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def per_process_batch(global_batch_size: int, process_index: int, process_count: int) -> int:
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


def shard_sizes(total: int, count: int) -> list[int]:
    """Sizes of `count` near-equal contiguous shards of `total` examples (larger shards first)."""
    return [len(part) for part in np.array_split(np.arange(total), count)]


def steps_per_epoch(shard_sizes: tuple[int, ...], batch_size: int, what: str) -> int:
    steps = min(shard_sizes) // batch_size
    if steps == 0:
        raise ValueError(
            f"data pipeline: {what} has only {min(shard_sizes)} examples in the smallest per-process shard, "
            f"fewer than the per-process batch size {batch_size}; lower global_batch_size."
        )
    return steps


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


class ConcatIterator:
    """Several shard iterators advanced in lockstep; batches are concatenated along the batch axis."""

    def __init__(self, parts: list[DataIterator]):
        self._parts = parts
        self.steps_per_epoch = parts[0].steps_per_epoch

    def __iter__(self) -> ConcatIterator:
        return self

    def __next__(self) -> Batch:
        batches = [next(p) for p in self._parts]
        return {key: np.concatenate([b[key] for b in batches], axis=0) for key in batches[0]}

    def state(self) -> dict[str, int]:
        return self._parts[0].state()  # every part is at the same epoch and position

    def restore(self, state: dict[str, int]) -> None:
        for p in self._parts:
            p.restore(state)


def sharded(make_shard: Callable[[int, int], DataIterator], num_shards: int, process_index: int,
            process_count: int) -> DataIterator | ConcatIterator:
    """This process's iterator over ``num_shards`` shards (0: one per process): ``make_shard(shard, num_shards)``
    for each of its shards, concatenated along the batch axis when there are several."""
    shards = num_shards or process_count
    if shards % process_count:
        raise ValueError(
            f"data config: num_shards={shards} must be a multiple of the number of processes ({process_count})."
        )
    k = shards // process_count
    parts = [make_shard(process_index * k + j, shards) for j in range(k)]
    return parts[0] if k == 1 else ConcatIterator(parts)
