"""Device mesh, shardings and global batches: the one place that knows about devices.

The jit path shards the batch over a ``data`` mesh axis and replicates params (FSDP comes later:
it only changes :func:`state_shardings`). The same code runs on one CPU, 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) or every host of a pod, because batches
are built with ``jax.make_array_from_process_local_data`` from each process's own rows.

A ``pmap`` helper pair (:func:`replicate` / :func:`unreplicate`) serves users whose code is still
pmap-based; ``jax.device_put_replicated`` is gone from jax, so replication is done here.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``data`` mesh over ``devices`` (default: every device of every process).

    Axis type is Auto, not jax's newer Explicit default: the models are written without
    sharding-in-types annotations, and Auto lets XLA propagate the batch sharding through them.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),),
        (DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=devices,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """Shardings for a train state: replicated for now (data parallelism)."""
    return jax.tree.map(lambda _: replicated(mesh), state)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size (--batch-size)") -> None:
    """Raise before compiling when a global batch does not split evenly over the mesh."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"{what} = {batch_size} must be divisible by the number of devices ({n}) so each "
            f"device gets the same share. Use a multiple of {n}, e.g. "
            f"{max(n, batch_size // n * n)}."
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
    mesh = make_mesh(devices)
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
