"""Checkpoint I/O with Orbax: training checkpoints, plain parameter directories, preemption signals.

Layout of a training run's checkpoints::

    workdir/checkpoints/<step>/state/   arrays of the train state (params, opt state, step, rng, ...)
    workdir/checkpoints/<step>/meta/    JSON: data-iterator position, seeds, anything JSON-serialisable

Orbax writes each step into a temporary directory and renames it when complete, so a step directory
that exists is a finished checkpoint; :meth:`Checkpointer.latest_step` only sees those, and a write that fails
(no space, no permission) leaves the newest finished one as it was. Failures of Orbax and TensorStore become
:class:`~varjax.core.errors.StorageError` naming the directory, the step and what to do.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from varjax.core import paths
from varjax.core.errors import StorageError

_STATE = "state"
_META = "meta"


# ------------------------------------------------------------------------------ library messages said once


class _SaidByVarjax(logging.Filter):
    """Drops what Orbax and TensorStore print about a failure that :class:`Checkpointer` re-raises (and the command
    reports in one paragraph): the background threads' ERROR records, asyncio's "never retrieved" record of the
    failed write tasks, the note that an item read as a plain directory has no metadata file of its own, and the
    notice that varjax's array handler (below) replaces Orbax's default one."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "asyncio":  # "Task exception ..." or "_GatheringFuture exception was never retrieved"
            never_retrieved = message.partition("\n")[0].endswith("exception was never retrieved")
            text = (message + _traceback_text(record)).lower()
            return not (never_retrieved and any(k in text for k in ("orbax", "tensorstore", "ocdbt")))
        if message.startswith(("Metadata file does not exist", "Type handler registry type",
                               "Failed to get item metadata")):
            return False
        return not (record.levelno >= logging.ERROR and "/orbax/" in (record.pathname or ""))


def _traceback_text(record: logging.LogRecord) -> str:
    exc = record.exc_info
    return "".join(traceback.format_exception(*exc)) if exc and exc[0] else ""


def _unraisable(unraisable, default=sys.unraisablehook) -> None:
    # TensorStore completes writes that failed after Orbax closed their event loop: each completion reports
    # "Event loop is closed" from a C++ thread. The failure itself is raised (and reported) once.
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return
    default(unraisable)


for _name in ("absl", "asyncio"):
    logging.getLogger(_name).addFilter(_SaidByVarjax())
sys.unraisablehook = _unraisable

# Replica-parallel saving splits each replicated array into one slice per replica, written side by side. For a
# small array the split costs more than it saves: a write per replica instead of one, and in every process a
# slicing program compiled for each distinct shape (hundreds for a model's biases and norms). Arrays whose slice
# would be under REPLICA_PARALLEL_MIN_BYTES are written whole by their first replica; large weights still split.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20
ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES),
    override=True,
)


def _reason(e: BaseException) -> str:
    """What went wrong, in a few words: the operating system's reason and the file for a failed TensorStore write
    (its messages run over many lines of context), else the error's first line."""
    text = str(e).strip()
    os_reason = re.search(r"([A-Z][A-Za-z ]+?) \[os_error_code", text)
    if os_reason:
        places = (re.search(p + r' "([^"]+)"', text) for p in ("Failed writing", "local file", "Error writing"))
        where = [m.group(1) for m in places if m]
        return os_reason.group(1) + (f", writing {where[0]}" if where else "")
    status = re.match(r"([A-Z_]{5,}): ", text)  # a TensorStore status such as OUT_OF_RANGE or DATA_LOSS
    files = re.findall(r'(?:local file|file) "([^"]+)"', text)
    if status and files:
        return f"{status.group(1)} reading {files[-1]}: the file is shorter than its index says or corrupt"
    first = (text.splitlines() or [type(e).__name__])[0]
    return first if len(first) <= 300 else first[:300] + "..."


_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/_sharding", "meta/metadata")


def unparsable_json(folder, names: tuple[str, ...] = _JSON_FILES) -> str | None:
    """The first of Orbax's JSON metadata files ``names`` under ``folder`` (a checkpoint step by default) that exists
    and does not parse, relative to ``folder``; None when they all parse."""
    import json

    for name in names:
        f = folder / name
        try:
            if f.is_file():
                json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            return name
        except OSError:
            continue
    return None


class Checkpointer:
    """Saves and restores (state pytree, JSON dict) pairs under ``workdir/checkpoints``.

    Saving is asynchronous: :meth:`save` returns once the arrays are copied off the devices (so the
    caller may donate or overwrite them) and the files are written in the background. Call :meth:`wait`
    before reading the files and :meth:`close` before exiting (also on the way out of an error).
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
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()},
            )
        except Exception as e:  # noqa: BLE001 - any file-system failure of the checkpoint directory
            raise StorageError(
                f"{self.directory}: cannot open the checkpoint directory ({_reason(e)}). Check that it can be "
                "written (space, permissions, credentials for a URL)."
            ) from None
        self._pending: int | None = None  # step of a save started and not yet known to be on disk

    def _write_failed(self, e: BaseException, step: int | None) -> StorageError:
        last = self.latest_step()
        kept = (f"The latest finished checkpoint (step {last}) is intact and is what a re-run resumes from"
                if last is not None else "No finished checkpoint exists yet; a re-run starts from scratch")
        what = f"step {step}" if step is not None else "a checkpoint"
        return StorageError(
            f"{self.directory}: could not write {what} ({_reason(e)}). {kept}. Free space or fix the "
            "permissions of the directory, then re-run the same command."
        )

    def save(self, step: int, state: Any, extra_json: dict | None = None, force: bool = False) -> bool:
        """Starts saving ``state`` (pytree of arrays) and ``extra_json`` at ``step``.

        Returns whether a save was started: False when ``step`` is not on the save interval (and not
        forced, nor a preemption sync point) or already saved.

        Raises:
          StorageError: this save, or the previous asynchronous one, could not be written.
        """
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(dict(extra_json or {}))}
        )
        try:
            started = bool(self._manager.save(int(step), args=args, force=force))
        except Exception as e:  # noqa: BLE001 - Orbax re-raises the background thread's failure here
            raise self._write_failed(e, self._pending if self._pending is not None else step) from None
        if started:
            self._pending = int(step)
        return started

    def latest_step(self) -> int | None:
        """Newest finished checkpoint step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all finished checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """``{'params/blocks_0/...': shape}`` of the state saved at ``step``, from its metadata alone (no array
        is read), for checking that a run can resume before restoring anything."""
        return tree_shapes(self._state_metadata(step))

    def saved_dtypes(self, step: int) -> dict[str, str]:
        """``{'params/blocks_0/...': dtype name}`` of the state saved at ``step``, from its metadata alone."""
        return tree_dtypes(self._state_metadata(step))

    def _state_metadata(self, step: int):
        try:
            meta = self._manager.item_metadata(int(step))[_STATE]
        except Exception as e:  # noqa: BLE001 - damaged metadata surfaces as JSON, TensorStore or Orbax errors
            raise self._unreadable(step, e) from None
        if meta is None:
            raise self._unreadable(step, ValueError("no metadata of the train state"))
        return meta

    def _unreadable(self, step: int, e: BaseException) -> StorageError:
        step_dir = self.directory / str(step)
        bad = unparsable_json(step_dir)
        reason = f"{bad} is not valid JSON" if bad else _reason(e)
        return StorageError(
            f"{step_dir}: the checkpoint of step {step} cannot be read ({reason}). Its files are damaged or "
            "incomplete: delete that step's directory to resume from the one before it, or start a new --workdir."
        )

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """Loads checkpoint ``step`` (None: latest) directly onto the shardings in ``abstract_state``.

        Args:
          step: step to load, or None for :meth:`latest_step`.
          abstract_state: pytree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` with the same
            structure as the saved state. The shardings may use a different mesh from the one that saved;
            each process reads only its shards.

        Returns:
          (state, extra_json).

        Raises:
          StorageError: the checkpoint's files cannot be read (damaged or missing).
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No finished checkpoint in {self.directory} to restore.")
        try:
            restored = self._manager.restore(
                int(step),
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()}
                ),
            )
        except Exception as e:  # noqa: BLE001 - TensorStore reports damaged files as ValueError and others
            raise self._unreadable(step, e) from None
        return restored[_STATE], dict(restored[_META] or {})

    def reached_preemption(self, step: int) -> bool:
        """True when all processes agreed to save at ``step`` because of a preemption notice (multi-host)."""
        return self._manager.reached_preemption(int(step))

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk.

        Raises:
          StorageError: a pending save could not be written.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_failed(e, self._pending) from None
        self._pending = None

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources (its threads), also after a failure."""
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - a save that failed has been reported by wait()
                pass

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{'a/b/c': shape}`` of every array leaf of a pytree (arrays, ShapeDtypeStructs or Orbax metadata)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
            out[key] = tuple(int(d) for d in shape)
    return out


def tree_dtypes(tree: Any) -> dict[str, str]:
    """``{'a/b/c': dtype name}`` of every array leaf of a pytree (arrays, ShapeDtypeStructs or Orbax metadata)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None:
            key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
            out[key] = str(np.dtype(dtype))
    return out


def save_params_dir(path: str, params: Any, *, overwrite: bool = False) -> None:
    """Writes a parameter pytree (numpy or jax arrays) as an Orbax directory at ``path`` and waits for it.

    Raises:
      FileExistsError: when ``path`` exists and ``overwrite`` is False.
      StorageError: the files could not be written.
    """
    path = paths.resolve(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"Parameter directory {path} exists; pass overwrite=True to replace it.")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, params, force=overwrite)
            ckptr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"{path}: could not write the parameters ({_reason(e)}). Free space or fix the "
                           "permissions of the directory, then run the command again.") from None


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
# After SIGTERM the loop saves and exits at its next step boundary. A run that does not reach one within this many
# seconds (inside a long compile, an evaluation, a blocked write) is ended by the watchdog instead, so that SIGTERM
# ends a run in every state; its last finished checkpoint is what a re-run resumes from.
SIGTERM_GRACE_S = float(os.environ.get("VARJAX_SIGTERM_GRACE_S", "30"))
_WATCHDOG: dict = {"timer": None, "directory": None}


def _exit_unacknowledged() -> None:
    where = _WATCHDOG["directory"]
    kept = f" The last finished checkpoint in {where} is intact" if where else " Finished checkpoints are intact"
    sys.stdout.flush()
    print(f"error: stopped by a termination signal (SIGTERM) before the run reached a step boundary within "
          f"{SIGTERM_GRACE_S:.0f} s, so nothing more was saved.{kept}: re-run the same command to resume from it.",
          file=sys.stderr, flush=True)
    os._exit(1)


def _on_signal(signum, frame) -> None:
    del frame
    if _PREEMPTED.is_set():  # a second signal: stop now
        _exit_unacknowledged()
    # Only set a flag: the training loop saves and exits at the next step boundary (acknowledge_preemption);
    # the watchdog ends the process if it does not get there.
    _PREEMPTED.set()
    if signum == signal.SIGTERM and _WATCHDOG["timer"] is None:
        timer = threading.Timer(SIGTERM_GRACE_S, _exit_unacknowledged)
        timer.daemon = True
        _WATCHDOG["timer"] = timer
        timer.start()


def acknowledge_preemption() -> None:
    """Called by the loop when it acts on the flag (saves and exits): the watchdog stands down."""
    timer, _WATCHDOG["timer"] = _WATCHDOG["timer"], None
    if timer is not None:
        timer.cancel()


def install_preemption_handler(signals: tuple[int, ...] = (signal.SIGTERM,), directory=None) -> Callable[[], bool]:
    """Makes ``signals`` (default SIGTERM, add ``signal.SIGINT`` for Ctrl-C) set a preemption flag.

    Returns ``is_preempted()``. The loop that polls it calls :func:`acknowledge_preemption` when it acts; a
    process that does not within :data:`SIGTERM_GRACE_S` seconds of SIGTERM (or gets a second signal) exits with
    one paragraph naming ``directory``, the checkpoints it leaves. With several processes the handler is not
    installed: JAX's distributed runtime listens to SIGTERM itself and Orbax's
    :meth:`Checkpointer.reached_preemption` asks it, so that all processes save at the same step. Call from the
    main thread.
    """
    if jax.process_count() == 1:
        _WATCHDOG["directory"] = directory
        for sig in signals:
            signal.signal(sig, _on_signal)
    return _PREEMPTED.is_set


def preempted() -> bool:
    """Whether this process was told to stop (SIGTERM): a command that runs several trainings stops after the one
    that saved on the signal."""
    return _PREEMPTED.is_set()


def reset_preemption_flag() -> None:
    """Clears the flag set by the handler (for a loop that continues after saving)."""
    acknowledge_preemption()
    _PREEMPTED.clear()
