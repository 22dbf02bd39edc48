"""Device mesh, the logical-axis rules, sharded state creation and global batches.

Mesh axes (sizes come from the config, e.g. ``[("data", -1), ("fsdp", 1), ("tensor", 1)]``):

* ``data``: pure data parallelism; parameters are replicated along it.
* ``fsdp``: data parallelism whose parameters and optimizer state are also split along it.
* ``tensor``: tensor (model) parallelism inside a layer: attention heads and MLP hidden units.

Model code names array dimensions with logical axes (``nn.with_logical_partitioning`` for parameters,
``nn.with_logical_constraint`` for activations); :data:`RULES`, the one list for both, maps them to mesh axes
(``config.rules`` may replace it). A logical axis without a rule is replicated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
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

# Logical axis -> mesh axis (or tuple of axes, or None = replicated), for parameters and activations alike.
RULES = (
    # parameters
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
    # activations: batch over every data-parallel axis (the rule above), features replicated or over `tensor`
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("classes", None),
    ("cvae", None),
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
    """Rules as a tuple of (logical, mesh) pairs, lists from configs turned into tuples; None -> :data:`RULES`."""
    if rules is None:
        return RULES
    out = []
    for rule in rules:
        try:
            logical, target = rule
        except (TypeError, ValueError):
            raise ValueError(
                f"Config `rules` entries must be (logical_axis, mesh_axis) pairs, got {rule!r}."
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


def param_count(params: Any) -> int:
    """Total number of scalars in a (possibly boxed or abstract) parameter tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(meta.unbox(params)))
