"""Device mesh, shardings and global batches: the one place that knows about devices.

The mesh has three named axes (:data:`AXES`): ``data`` and ``fsdp`` split every batch, ``fsdp``
and ``tensor`` split params and optimizer state by the rules of :mod:`jaxtl.sharding`. The
default mesh puts every device on ``data``: params replicated, pure data parallelism. The same
code runs on one CPU, 8 fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``)
or every host of a pod, because batches are built with ``jax.make_array_from_process_local_data``
from each process's own rows.

A ``pmap`` helper pair (:func:`replicate` / :func:`unreplicate`) serves users whose code is still
pmap-based; ``jax.device_put_replicated`` is gone from jax, so replication is done here.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

MeshShape = str | Mapping[str, int] | None


def parse_mesh(shape: MeshShape, num_devices: int | None) -> dict[str, int]:
    """``"data=2,fsdp=4"`` (or ``{"data": 2, "fsdp": 4}``) -> sizes of all three axes.

    An axis left out has size 1, except ``data`` which takes the devices the others leave
    (``"fsdp=4"`` on 8 devices is ``data=2,fsdp=4,tensor=1``). ``None`` or ``""``: every device
    on ``data``. ``num_devices=None`` plans a mesh for devices that are not here: ``data``
    left out is 1 and nothing is checked against a device count.

    Raises:
      ValueError: an unknown axis, a size below 1, or sizes whose product is not
        ``num_devices``; the message says what would fit (``mesh=`` / ``--mesh``).

    Example:
      >>> parse_mesh("fsdp=4", 8), parse_mesh(None, 8)
      ({'data': 2, 'fsdp': 4, 'tensor': 1}, {'data': 8, 'fsdp': 1, 'tensor': 1})
    """
    given: dict[str, int] = {}
    if isinstance(shape, str):
        for part in filter(None, (p.strip() for p in shape.split(","))):
            m = re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", part)
            if not m:
                raise ValueError(
                    f"mesh (--mesh) {shape!r}: {part!r} is not AXIS=SIZE; write e.g. "
                    f"'data=2,fsdp=4' (axes {list(AXES)})."
                )
            given[m.group(1)] = int(m.group(2))
    elif shape is not None:
        given = {str(k): int(v) for k, v in dict(shape).items()}
    for axis, size in given.items():
        if axis not in AXES:
            raise ValueError(
                f"mesh (--mesh) names axis {axis!r}; the axes are {list(AXES)}, e.g. "
                f"'data=2,fsdp=4'."
            )
        if size < 1:
            raise ValueError(f"mesh (--mesh) axis {axis}={size}: sizes must be >= 1.")
    sizes = {a: given.get(a, 1) for a in AXES}
    if num_devices is None:
        return sizes
    if "data" not in given:
        rest = math.prod(sizes[a] for a in AXES if a != "data")
        if num_devices % rest:
            raise ValueError(
                f"mesh (--mesh) {_show(given)} needs a multiple of {rest} devices; there are "
                f"{num_devices}. Use axis sizes whose product divides {num_devices}."
            )
        sizes["data"] = num_devices // rest
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh (--mesh) {_show(sizes)} has {math.prod(sizes.values())} devices, but there "
            f"are {num_devices}: the axis sizes must multiply to the device count (leave data "
            f"out and it takes the devices the other axes leave)."
        )
    return sizes


def splits_params(shape: MeshShape) -> bool:
    """Whether the mesh ``shape`` on this process's view of all devices splits params
    (``fsdp`` or ``tensor`` above 1) rather than replicating them.

    Raises:
      ValueError: as :func:`parse_mesh`, for a mesh these devices cannot form.
    """
    sizes = parse_mesh(shape, jax.device_count())
    return sizes["fsdp"] > 1 or sizes["tensor"] > 1


def _show(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in sizes.items()) or "''"


def make_mesh(shape: MeshShape = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: every device of every process).

    Args:
      shape: axis sizes, see :func:`parse_mesh`; default every device on ``data``.
      devices: the devices, in order; a list of devices as the first argument is accepted too.

    Axis types are Auto, not jax's newer Explicit default: the models are written without
    sharding-in-types annotations, and Auto lets XLA propagate shardings through them.
    """
    if devices is None and isinstance(shape, Sequence) and not isinstance(shape, str):
        shape, devices = None, shape
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(shape, len(devices))
    return jax.make_mesh(
        tuple(sizes[a] for a in AXES),
        AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
        devices=devices,
    )


def check_mesh_axes(mesh: Mesh, what: str) -> None:
    """Raise unless ``mesh`` has jaxtl's axes ``(data, fsdp, tensor)``; ``what`` says what
    is laid out on them (for the message)."""
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(
            f"mesh= has axes {tuple(mesh.axis_names)}; {what} on {AXES}. Build it with "
            "jaxtl.parallel.make_mesh('data=...,fsdp=...') or pass its sizes instead "
            "(TrainConfig(mesh='fsdp=8'), --mesh)."
        )


def batch_shards(mesh: Mesh | Mapping[str, int]) -> int:
    """How many pieces a batch is split into: ``data`` x ``fsdp`` (of a mesh, or of axis sizes
    from :func:`parse_mesh`)."""
    sizes = mesh if isinstance(mesh, Mapping) else mesh.shape
    return math.prod(sizes.get(a, 1) for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` x ``fsdp`` (the axes the mesh has)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def shardings(specs: Any, mesh: Mesh) -> Any:
    """A tree of ``PartitionSpec`` s -> the same tree of ``NamedSharding`` s on ``mesh``."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def check_batch_size(
    batch_size: int,
    mesh: Mesh | int,
    what: str = "batch_size (--batch-size)",
    grad_accum: int = 1,
) -> None:
    """Raise before compiling when a global batch does not split evenly over the mesh's batch
    axes (``data`` x ``fsdp``; or ``mesh`` is that number) and, with gradient accumulation,
    into its microbatches."""
    shards = mesh if isinstance(mesh, int) else batch_shards(mesh)
    n = shards * grad_accum
    if batch_size % n:
        parts = f"data x fsdp = {shards} batch shards"
        if grad_accum > 1:
            parts += f" x grad_accum (--grad-accum) = {grad_accum} microbatches"
        raise ValueError(
            f"{what} = {batch_size} must be divisible by {parts} = {n}, so each device gets "
            f"the same share. Use a multiple of {n}, e.g. {max(n, batch_size // n * n)}."
        )


def global_batch(
    local: Mapping[str, np.ndarray], mesh: Mesh, *, whole: bool = False
) -> dict[str, jax.Array]:
    """This process's rows -> one global ``jax.Array`` per key, batch-sharded over ``mesh``.

    In a single process ``local`` is the whole batch; in a multi-process run each process passes
    its own slice (``global rows = local rows * process_count``), as the training loader yields.

    ``whole=True``: every process passes the same whole global batch (an evaluation
    :class:`~jaxtl.data.loader.ArrayLoader` yields these) and each puts only its devices' rows
    on them. Without it, ``process_count`` copies of the batch would be stacked into one
    global batch and every example counted that many times.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v, v.shape if whole else None)
    return out


def prefetch_to_device(
    batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh, size: int = 2, *, whole: bool = False
) -> Iterator[dict[str, jax.Array]]:
    """:func:`global_batch` of each of ``batches``, placed ``size`` batches ahead.

    jax dispatches a step asynchronously, so while the step on batch ``k`` runs, the loop is
    already reading and transferring batches ``k + 1 .. k + size``: the devices never wait for
    the host's copy. ``size=0`` places each batch only when it is needed. The source is read
    up to ``size`` batches beyond what the consumer took; a loop that stops early leaves them
    unused (the trainer's loaders reopen at the right position).
    """
    if size < 0:
        raise ValueError(f"prefetch size must be >= 0, got {size}.")
    ahead: collections.deque = collections.deque()
    for batch in batches:
        ahead.append(global_batch(batch, mesh, whole=whole))
        if len(ahead) > size:
            yield ahead.popleft()
    while ahead:
        yield ahead.popleft()


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Place a host pytree on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def copy_to(tree: Any, shardings: Any) -> Any:
    """``tree`` placed on ``shardings`` (a matching tree) as arrays of its own: no leaf of the
    result shares a device buffer with ``tree``, so a step that donates the result leaves
    ``tree`` (e.g. a loaded model's params) alive.

    ``jax.device_put(..., may_alias=False)`` alone does not promise that: jax 0.10.2 puts an
    array held by one device onto a sharding that also covers other devices by reusing the
    array's buffer as that device's shard. So every leaf that changes sharding over a device
    it is already on is copied first, one leaf at a time (the copy becomes the result's
    shard, or is freed once the leaf is placed). ``shardings`` has ``tree``'s structure, not a
    prefix of it.
    """

    def own(leaf: Any, where: jax.sharding.Sharding) -> Any:
        if (
            isinstance(leaf, jax.Array)
            and not leaf.sharding.is_equivalent_to(where, leaf.ndim)
            and leaf.sharding.device_set & where.device_set
        ):
            leaf = leaf.copy()
        return jax.device_put(leaf, where, may_alias=False)

    return jax.tree.map(own, tree, shardings)


def put_from_host(value: Any, where: jax.sharding.Sharding) -> jax.Array:
    """A whole value from host memory, placed as ``where`` says: each of this process's
    devices receives only its own piece (``jax.make_array_from_callback``), so no device ever
    holds more of it than the sharding gives it. Works on a mesh that spans several processes
    (each passes the same value). A ``jax.Array`` is fetched to the host first."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, where, lambda index: host[index])


def to_host(tree: Any) -> Any:
    """``jax.device_get`` of a tree that may be sharded over several processes' devices: such
    leaves are gathered from every process (``process_allgather``; all processes must call
    this together), so each gets the whole value, which plain ``device_get`` refuses."""

    from jax.experimental import multihost_utils

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(whole, tree)


def put_like(tree: Any, like: Any) -> Any:
    """Place a host pytree where the same-shaped device tree ``like`` lives (its shardings)."""
    return jax.device_put(tree, jax.tree.map(lambda x: x.sharding, like))


# --- pmap compatibility -----------------------------------------------------------------------


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Stack a copy of every leaf per local device, as ``pmap`` expects (leading device axis)."""
    devices = list(jax.local_devices() if devices is None else devices)
    n = len(devices)

    def put(x):
        x = np.asarray(x)
        stacked = np.broadcast_to(x, (n, *x.shape))
        return _put_stacked(stacked, devices)

    return jax.tree.map(put, tree)


def _put_stacked(stacked: np.ndarray, devices: list[jax.Device]) -> jax.Array:
    mesh = make_mesh(devices=devices)
    return jax.device_put(stacked, batch_sharding(mesh))


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a pmap-replicated pytree."""
    return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(batch: Mapping[str, np.ndarray], n_devices: int) -> dict[str, np.ndarray]:
    """[B, ...] -> [n_devices, B / n_devices, ...] for a pmapped step."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape[0] % n_devices:
            raise ValueError(
                f"Batch key {k!r} has {v.shape[0]} rows, not divisible by {n_devices} devices."
            )
        out[k] = v.reshape(n_devices, v.shape[0] // n_devices, *v.shape[1:])
    return out
