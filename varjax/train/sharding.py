"""Device mesh, logical-axis rules, sharded state creation and global batches.

Mesh axes (sizes come from the config, e.g. ``[("data", -1), ("fsdp", 1), ("tensor", 1)]``):

* ``data``: pure data parallelism; parameters are replicated along it.
* ``fsdp``: data parallelism whose parameters and optimizer state are also split along it.
* ``tensor``: tensor (model) parallelism inside a layer: attention heads and MLP hidden units.

Model code names array dimensions with logical axes (``nn.with_logical_partitioning`` for parameters,
``nn.with_logical_constraint`` for activations); :data:`DEFAULT_RULES` maps them to mesh axes. A logical
axis without a rule is replicated.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshSpec = Sequence[tuple[str, int]]
Rules = Sequence[tuple[str, Any]]

DEFAULT_MESH = (("data", -1), ("fsdp", 1), ("tensor", 1))

# Logical axis -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),  # examples in a batch
    ("embed", "fsdp"),  # model width C of weights; FSDP splits parameters along it
    ("mlp", "tensor"),  # hidden units of the MLP
    ("heads", "tensor"),  # attention heads
    ("joined_kv", "tensor"),  # heads * head_dim, flattened
    ("ada", "tensor"),  # width C of the AdaLN modulations (kernel (C, 6, C))
    ("chunks", None),  # the q/k/v (3) and AdaLN (6) chunks of a fused kernel: never split inside a chunk
    ("kv", None),  # head_dim
    ("layers", None),  # the stacked block axis of scan_layers
    ("vocab", "tensor"),  # codebook / logits entries
    ("cond", None),  # conditioning vector (class embedding) width
    ("seq", None),  # token positions L
    ("conv_in", None),  # input channels of a convolution kernel
    ("conv_out", "tensor"),  # output channels of a convolution kernel
)

BATCH_AXES = ("data", "fsdp")


def _as_spec(mesh_spec) -> list[tuple[str, int]]:
    try:
        spec = [(str(name), int(size)) for name, size in mesh_spec]
    except (TypeError, ValueError):
        raise ValueError(
            f"Mesh config `mesh` must be a list of (axis_name, size) pairs such as "
            f"[('data', -1), ('fsdp', 1), ('tensor', 1)]; got {mesh_spec!r}."
        ) from None
    return spec


def mesh_shape(mesh_spec: MeshSpec, num_devices: int) -> dict[str, int]:
    """Axis sizes of ``mesh_spec`` with its (at most one) -1 filled so the product is ``num_devices``.

    Raises:
      ValueError: with several -1, a size < 1, or a product different from ``num_devices``.
    """
    spec = _as_spec(mesh_spec)
    names = [n for n, _ in spec]
    if len(set(names)) != len(names):
        raise ValueError(f"Mesh config `mesh` repeats an axis name: {names}.")
    free = [n for n, s in spec if s == -1]
    if len(free) > 1 or any(s < 1 and s != -1 for _, s in spec):
        raise ValueError(
            f"Mesh config `mesh`={spec}: sizes must be >= 1, with at most one -1 (filled from the device "
            f"count {num_devices})."
        )
    fixed = math.prod(s for _, s in spec if s != -1)
    sizes = dict(spec)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"Mesh config `mesh`={spec}: the fixed axes use {fixed} devices, which does not divide the "
                f"{num_devices} available devices, so '{free[0]}' (-1) cannot be filled. Run on a multiple of "
                f"{fixed} devices, or lower the fixed sizes of `config.mesh`, e.g. --config.mesh=\"(('data', -1), "
                f"('fsdp', {math.gcd(fixed, num_devices)}), ('tensor', 1))\"."
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"Mesh config `mesh`={spec} needs {fixed} devices but {num_devices} are available; make the "
            f"product of the axis sizes equal the device count, or set one size to -1."
        )
    return sizes


def create_mesh(mesh_spec: MeshSpec = DEFAULT_MESH, devices: Sequence[Any] | None = None) -> Mesh:
    """``jax.sharding.Mesh`` with the named axes of ``mesh_spec`` over ``devices`` (default: all).

    Uses ``mesh_utils.create_device_mesh`` for a topology-aware device order and falls back to a plain
    reshape when it cannot place the shape (e.g. odd shapes on some TPU slices).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_spec, len(devices))
    shape = tuple(sizes.values())
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, tuple(sizes))


def normalize_rules(rules: Rules | None) -> tuple[tuple[str, Any], ...]:
    """Rules as a tuple of (logical, mesh) pairs, lists from configs turned into tuples; None -> defaults."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        try:
            logical, target = rule
        except (TypeError, ValueError):
            raise ValueError(
                f"Config `logical_axis_rules` entries must be (logical_axis, mesh_axis) pairs, got {rule!r}."
            ) from None
        if isinstance(target, list):
            target = tuple(target)
        out.append((str(logical), target))
    return tuple(out)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules: Rules | None = None):
    """Context in which jitted code is traced so that ``nn.with_logical_constraint`` on activations acts
    (outside of it, with no rules, the constraints are no-ops)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(normalize_rules(rules)):
        yield


def logical_to_mesh_shardings(abstract_boxed_tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """``NamedSharding`` tree for a tree whose leaves may be logically boxed (``nn.Partitioned``).

    Unboxed leaves (step counters, rng keys) are replicated. The result has the structure of the
    unboxed tree (``meta.unbox``).
    """
    specs = nn.get_partition_spec(abstract_boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, normalize_rules(rules))


def create_sharded_state(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules | None, *args
                         ) -> tuple[Any, Any]:
    """Runs ``init_fn(*args)`` so that every output is created directly with its final sharding.

    ``init_fn`` returns a pytree (e.g. params and optimizer state) whose parameters carry logical axis
    names; ``jax.eval_shape`` reads them without computing anything, then the jitted init writes each
    array straight into its shards (no host- or device-0 copy of the full state).

    Returns:
      (state, shardings): the state with boxes removed, and the matching tree of ``NamedSharding``.
    """
    rules = normalize_rules(rules)
    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = logical_to_mesh_shardings(abstract, mesh, rules)
        state = jax.jit(lambda *a: meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return state, shardings


def abstract_sharded_state(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules | None, *args) -> Any:
    """Unboxed tree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` for ``init_fn(*args)``.

    Computes nothing: this is the restore target for a checkpoint (see ``Checkpointer.restore``) when the
    state does not need to be initialised first.
    """
    rules = normalize_rules(rules)
    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
        abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_to_mesh_shardings(abstract, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), meta.unbox(abstract),
                        shardings)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch-major array of rank ``ndim`` >= 1: dim 0 split over the ('data', 'fsdp') axes."""
    if ndim < 1:
        raise ValueError(f"batch_sharding needs an array of rank >= 1 (a batch dimension), got ndim={ndim}.")
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes or None, *([None] * (ndim - 1))))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (scalars, metrics, rng keys)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_parallelism(mesh: Mesh) -> int:
    """Number of batch shards: product of the ('data', 'fsdp') axis sizes."""
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def check_batch_divisible(global_batch: int, mesh: Mesh, field: str = "config.batch_size") -> int:
    """Checks the global batch splits evenly over the batch axes and processes; returns the per-process batch.

    Raises:
      ValueError: naming ``field`` and the mesh axis sizes when it does not.
    """
    shards = batch_parallelism(mesh)
    procs = jax.process_count()
    if global_batch <= 0 or global_batch % shards or global_batch % procs:
        axes = {a: mesh.shape.get(a, 1) for a in BATCH_AXES}
        raise ValueError(
            f"`{field}`={global_batch} cannot be split over the batch mesh axes {axes} ({shards} shards) "
            f"and {procs} process(es); choose a positive multiple of {math.lcm(shards, procs)}, or change "
            f"the mesh sizes in `config.mesh`."
        )
    return global_batch // procs


def make_global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Global ``jax.Array`` per leaf from this process's part of the batch (leading dim = local batch).

    Each process passes only the examples it loaded; the global leading dim is the sum over processes.
    """
    def to_global(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(to_global, local_batch)


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


def param_count(params: Any) -> int:
    """Total number of scalars in a (possibly boxed or abstract) parameter tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(meta.unbox(params)))
