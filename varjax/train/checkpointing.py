"""Checkpoint I/O with Orbax: training checkpoints, plain parameter directories, preemption signals.

Layout of a training run's checkpoints::

    workdir/checkpoints/<step>/state/   arrays of the train state (params, opt state, step, rng, ...)
    workdir/checkpoints/<step>/meta/    JSON: data-iterator position, seeds, anything JSON-serialisable

Orbax writes each step into a temporary directory and renames it when complete, so a step directory
that exists is a finished checkpoint; :meth:`Checkpointer.latest_step` only sees those.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from varjax import paths

_STATE = "state"
_META = "meta"


class Checkpointer:
    """Saves and restores (state pytree, JSON dict) pairs under ``workdir/checkpoints``.

    Saving is asynchronous: :meth:`save` returns once the arrays are copied off the devices (so the
    caller may donate or overwrite them) and the files are written in the background. Call :meth:`wait`
    before reading the files and :meth:`close` before exiting.
    """

    def __init__(self, workdir: str, *, save_interval_steps: int = 1, max_to_keep: int | None = 3,
                 async_save: bool = True):
        """
        Args:
          workdir: run directory; checkpoints go to ``workdir/checkpoints``.
          save_interval_steps: :meth:`save` without ``force`` only writes steps that are multiples of it.
          max_to_keep: number of most recent checkpoints kept (None keeps all).
          async_save: write in a background thread.
        """
        self.directory = paths.resolve(workdir) / "checkpoints"
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Multiples of the interval, plus the multi-host preemption sync step; unlike Orbax's default,
            # the first step of a fresh run is not saved unless forced.
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_interval_steps),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Removes temporary directories left by a run killed mid-save.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()},
        )

    def save(self, step: int, state: Any, extra_json: dict | None = None, force: bool = False) -> bool:
        """Starts saving ``state`` (pytree of arrays) and ``extra_json`` at ``step``.

        Returns whether a save was started: False when ``step`` is not on the save interval (and not
        forced, nor a preemption sync point) or already saved.
        """
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(dict(extra_json or {}))}
        )
        return bool(self._manager.save(int(step), args=args, force=force))

    def latest_step(self) -> int | None:
        """Newest finished checkpoint step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all finished checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """Loads checkpoint ``step`` (None: latest) directly onto the shardings in ``abstract_state``.

        Args:
          step: step to load, or None for :meth:`latest_step`.
          abstract_state: pytree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` with the same
            structure as the saved state, e.g. ``jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape,
            x.dtype, sharding=s), jax.eval_shape(init), shardings)``. The shardings may use a different
            mesh from the one that saved; each process reads only its shards.

        Returns:
          (state, extra_json).
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No finished checkpoint in {self.directory} to restore.")
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()}
            ),
        )
        return restored[_STATE], dict(restored[_META] or {})

    def reached_preemption(self, step: int) -> bool:
        """True when all processes agreed to save at ``step`` because of a preemption notice (multi-host)."""
        return self._manager.reached_preemption(int(step))

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_params_dir(path: str, params: Any, *, overwrite: bool = False) -> None:
    """Writes a parameter pytree (numpy or jax arrays) as an Orbax directory at ``path`` and waits for it.

    Raises:
      FileExistsError: when ``path`` exists and ``overwrite`` is False.
    """
    path = paths.resolve(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"Parameter directory {path} exists; pass overwrite=True to replace it.")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=overwrite)
        ckptr.wait_until_finished()


def load_params_dir(path: str, abstract: Any = None) -> Any:
    """Reads a directory written by :func:`save_params_dir`.

    Args:
      path: the directory.
      abstract: pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) to restore onto devices with
        those shardings, or None to get host ``numpy`` arrays with the saved shapes and dtypes.
    """
    path = paths.resolve(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Parameter directory {path} does not exist.")
    if abstract is not None:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path, abstract)
    with ocp.PyTreeCheckpointer() as ckptr:
        tree_meta = ckptr.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_meta)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


_PREEMPTED = threading.Event()


def _on_signal(signum, frame) -> None:
    del frame
    # Only set a flag: the training loop saves and exits at the next step boundary.
    _PREEMPTED.set()


def install_preemption_handler(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Callable[[], bool]:
    """Makes ``signals`` (default SIGTERM, add ``signal.SIGINT`` for Ctrl-C) set a preemption flag.

    Returns ``is_preempted()``. With several processes the handler is not installed: JAX's distributed
    runtime listens to SIGTERM itself and :func:`reached_preemption_sync_point` asks it, so that all
    processes save at the same step. Call from the main thread.
    """
    if jax.process_count() == 1:
        for sig in signals:
            signal.signal(sig, _on_signal)
    return _PREEMPTED.is_set


def reset_preemption_flag() -> None:
    """Clears the flag set by the handler (for a loop that continues after saving)."""
    _PREEMPTED.clear()


def reached_preemption_sync_point(step: int) -> bool:
    """Whether the loop should save and stop at ``step`` because the job is being preempted.

    Multi-process: JAX's preemption sync point, on which all processes agree (it must be called at every
    step by every process). Single process: the flag set by :func:`install_preemption_handler`.
    """
    if jax.process_count() > 1:
        try:
            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        except RuntimeError:  # preemption service disabled
            return False
    return _PREEMPTED.is_set()
