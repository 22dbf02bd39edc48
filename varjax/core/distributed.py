"""Multi-process start-up: which launcher started this process, and ``jax.distributed.initialize`` when needed.

Launchers recognised from the environment: ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``, SLURM with more than one task (one task per node keeps every GPU of the node), Open MPI with
more than one rank, TPU pod workers and multislice, and Cloud TPU VMs that reveal their slice only through the
metadata server. JAX's own cluster classes are private (``jax._src.clusters``): they are used in this file only,
for the two things no public API answers (a TPU VM's worker count, a SLURM job's first node).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

_DISTRIBUTED_FIELDS = ("coordinator_address", "num_processes", "process_id")


def _int_env(environ: Mapping[str, str], key: str) -> int | None:
    try:
        return int(environ[key])
    except (KeyError, ValueError):
        return None


def detect_multiprocess_launch(environ: Mapping[str, str]) -> str | None:
    """Which launcher started this process as one of several, read from ``environ``; None for a single process.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (a count of 1 means
    single-process), SLURM with more than one task, Open MPI with more than one rank, and TPU workers
    listed in ``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` (more than one) or a multislice
    ``MEGASCALE_COORDINATOR_ADDRESS``. Cloud TPU VMs that only reveal their pod through the metadata server
    are checked separately (:func:`_tpu_vm_process_count`).
    """
    jax_count = _int_env(environ, "JAX_NUM_PROCESSES")
    if jax_count is not None:
        return f"JAX_NUM_PROCESSES={jax_count}" if jax_count > 1 else None
    if environ.get("JAX_COORDINATOR_ADDRESS") or environ.get("JAX_PROCESS_ID"):
        return "JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID"
    slurm = _int_env(environ, "SLURM_STEP_NUM_TASKS") or _int_env(environ, "SLURM_NTASKS")
    if slurm is not None:
        return f"SLURM ({slurm} tasks)" if slurm > 1 else None
    ompi = _int_env(environ, "OMPI_COMM_WORLD_SIZE")
    if ompi is not None:
        return f"Open MPI ({ompi} ranks)" if ompi > 1 else None
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
    if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU multislice"
    if hosts and len([h for h in hosts.split(",") if h.strip()]) > 1:
        return f"TPU pod ({len(hosts.split(','))} workers)"
    return None


def _tpu_vm_process_count() -> int:
    """Worker count of a Cloud TPU VM slice from its metadata server (1 off TPU VMs or when unknown)."""
    try:
        from jax._src.clusters import cloud_tpu_cluster as tpu
    except ImportError:
        return 1
    if not getattr(tpu, "running_in_cloud_tpu_vm", False):
        return 1
    try:
        return tpu.GceTpuCluster.get_process_count() if tpu.GceTpuCluster.is_env_present() else 1
    except Exception:  # noqa: BLE001 - no metadata server: treat as one host
        return 1


def slurm_one_task_per_node(environ: Mapping[str, str]) -> bool:
    """True when SLURM runs one task on each node (``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``
    such as '1(x4)'), i.e. each process should drive every GPU of its node."""
    text = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not text:
        return False
    try:
        return max(int(part.split("(")[0]) for part in text.split(",")) == 1
    except ValueError:
        return False


def distributed_kwargs(cfg: Any, environ: Mapping[str, str]) -> dict | None:
    """Arguments for ``jax.distributed.initialize``, or None when this run is a single process.

    Fields of ``cfg`` (``config.distributed``) that are set (not None) win; ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` fill the others (JAX itself reads only ``JAX_COORDINATOR_ADDRESS``); JAX's cluster
    detection (SLURM, Open MPI, TPU) supplies whatever is still missing. One exception: JAX's SLURM
    detection gives each process one GPU (``SLURM_LOCALID``); with one task per node the count and id are
    taken from SLURM here and detection is switched off, so each process keeps all GPUs of its node.
    """
    get = cfg.get if cfg is not None and hasattr(cfg, "get") else (lambda k: None)
    explicit = {k: get(k) for k in _DISTRIBUTED_FIELDS if get(k) is not None}
    if not explicit and detect_multiprocess_launch(environ) is None and _tpu_vm_process_count() <= 1:
        return None
    kwargs = {}
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if _int_env(environ, env) is not None:
            kwargs[key] = _int_env(environ, env)
    kwargs.update(explicit)
    if kwargs.get("num_processes") == 1:
        return None
    if slurm_one_task_per_node(environ) and "SLURM_PROCID" in environ:
        tasks = _int_env(environ, "SLURM_STEP_NUM_TASKS") or _int_env(environ, "SLURM_NTASKS")
        kwargs.setdefault("num_processes", tasks)
        kwargs.setdefault("process_id", _int_env(environ, "SLURM_PROCID"))
        if "coordinator_address" not in kwargs and not environ.get("JAX_COORDINATOR_ADDRESS"):
            from jax._src.clusters.slurm_cluster import SlurmCluster

            kwargs["coordinator_address"] = SlurmCluster.get_coordinator_address(
                timeout_secs=None, override_coordinator_port=environ.get("JAX_COORDINATOR_PORT"))
        kwargs["cluster_detection_method"] = "deactivate"
    return kwargs


def init_distributed(cfg: Any = None, environ: Mapping[str, str] | None = None) -> None:
    """Starts ``jax.distributed`` when this process is one of several; a no-op for a single process.

    ``cfg`` is ``config.distributed`` (fields None = unset); see :func:`distributed_kwargs` for how the
    settings are chosen. CPU processes exchange collectives over gloo. Must run before any other JAX call
    touches the devices; a second call (e.g. the next stage of ``varjax main``) does nothing.
    """
    kwargs = distributed_kwargs(cfg, os.environ if environ is None else environ)
    if kwargs is None or jax.distributed.is_initialized():
        return
    # CPU backends need a collectives implementation to run computations across processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def describe_processes() -> str:
    """'process I/N, X local devices, Y global devices' for this process."""
    return (f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local devices, "
            f"{jax.device_count()} global devices")


