"""Join a multi-process run (several hosts, or several processes on one) before any device is used.

:func:`initialize` finds the run's coordinator, process count and this process's id in the
environment, in this order:

1. jaxtl's own variables, for any launcher (``torchrun``-style scripts, ``ssh`` loops, tests):
   ``JAXTL_COORDINATOR`` (``host:port`` of process 0), ``JAXTL_NUM_PROCESSES``,
   ``JAXTL_PROCESS_ID``; or the keyword arguments of the same meaning;
2. SLURM (``srun``): ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``,
   ``SLURM_PROCID``, ``SLURM_LOCALID``; jax derives the coordinator (the first node) and its
   port from them;
3. a Cloud TPU VM (``TPU_WORKER_HOSTNAMES`` / ``TPU_ACCELERATOR_TYPE`` set, or a TPU device
   file): jax asks the VM's metadata for the slice's workers.

Anything else is an error that lists what was looked for: a pod job that silently ran as N
independent single-host jobs would waste the whole allocation. After it, ``jax.devices()`` is
every process's devices, :func:`jaxtl.parallel.make_mesh` spans them, and each training loader
reads its own rows of every global batch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["CLUSTER_VARIABLES", "find_cluster", "initialize", "is_primary"]

EXPLICIT = ("JAXTL_COORDINATOR", "JAXTL_NUM_PROCESSES", "JAXTL_PROCESS_ID")
SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
TPU = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE")
TPU_DEVICE_FILES = ("/dev/accel0",)
CLUSTER_VARIABLES = {"jaxtl": EXPLICIT, "slurm": SLURM, "tpu": TPU}


def find_cluster(
    environ: Mapping[str, str] | None = None,
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    tpu_files: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """What :func:`initialize` would join, without joining: ``{"source": "jaxtl" | "slurm" |
    "tpu", ...}`` with the explicit coordinator, count and id for ``"jaxtl"``.

    Raises:
      ValueError: no coordinator found (the message lists every variable looked for), or an
        explicit setting that is incomplete or malformed.

    Example:
      >>> find_cluster({"JAXTL_COORDINATOR": "10.0.0.1:1234", "JAXTL_NUM_PROCESSES": "4",
      ...               "JAXTL_PROCESS_ID": "2"})
      {'source': 'jaxtl', 'coordinator': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 2}
    """
    env = os.environ if environ is None else environ
    tpu_files = TPU_DEVICE_FILES if tpu_files is None else tpu_files
    given = {
        "JAXTL_COORDINATOR": coordinator if coordinator is not None else env.get(EXPLICIT[0]),
        "JAXTL_NUM_PROCESSES": num_processes if num_processes is not None else env.get(EXPLICIT[1]),
        "JAXTL_PROCESS_ID": process_id if process_id is not None else env.get(EXPLICIT[2]),
    }
    if any(v not in (None, "") for v in given.values()):
        missing = [k for k, v in given.items() if v in (None, "")]
        if missing:
            raise ValueError(
                f"distributed: {', '.join(missing)} not set; a jaxtl-launched run needs all of "
                f"{', '.join(EXPLICIT)} (coordinator host:port of process 0, the process count, "
                "this process's id from 0)."
            )
        address = str(given["JAXTL_COORDINATOR"])
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"distributed: JAXTL_COORDINATOR={address!r} is not host:port (e.g. "
                "'10.0.0.1:8476', process 0's address and a free port)."
            )
        try:
            count, index = int(given["JAXTL_NUM_PROCESSES"]), int(given["JAXTL_PROCESS_ID"])
        except ValueError:
            raise ValueError(
                "distributed: JAXTL_NUM_PROCESSES and JAXTL_PROCESS_ID must be integers, got "
                f"{given['JAXTL_NUM_PROCESSES']!r} and {given['JAXTL_PROCESS_ID']!r}."
            ) from None
        if not (count >= 1 and 0 <= index < count):
            raise ValueError(
                f"distributed: JAXTL_PROCESS_ID={index} must be in [0, JAXTL_NUM_PROCESSES="
                f"{count})."
            )
        return {
            "source": "jaxtl",
            "coordinator": address,
            "num_processes": count,
            "process_id": index,
        }
    if all(v in env for v in SLURM):
        return {"source": "slurm"}
    if any(env.get(v) for v in TPU) or any(os.path.exists(f) for f in tpu_files):
        return {"source": "tpu"}
    looked = "; ".join(f"{name}: {', '.join(names)}" for name, names in CLUSTER_VARIABLES.items())
    raise ValueError(
        "distributed (--distributed): no multi-process run found in the environment. Looked "
        f"for {looked}; and for TPU device files {', '.join(tpu_files)}. Launch under "
        "srun or on a TPU VM, or set the three JAXTL_* variables on every process (see "
        "docs/pods.md)."
    )


def initialize(
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
    heartbeat_s: int | None = None,
) -> dict[str, Any]:
    """Join the run :func:`find_cluster` finds (``jax.distributed.initialize``); call it before
    anything touches a device. Returns what was joined, with the process count and index.

    ``heartbeat_s`` (default ``JAXTL_HEARTBEAT_S``, else jax's 100): how long the coordination
    service waits for a silent process before it fails the run. A process that dies or stops
    (SIGSTOP, a hung host) stops its heartbeats, and every other process then exits with an
    error naming the lost task instead of waiting forever in the step's collectives. After a
    process was killed, the collectives' own transport (gloo on CPU) has also been seen to end
    the others first, with its own error instead.

    Raises:
      ValueError: nothing found to join (see :func:`find_cluster`).
      RuntimeError: a device was already used in this process (jax can no longer join).
    """
    import jax

    found = find_cluster(
        coordinator=coordinator, num_processes=num_processes, process_id=process_id
    )
    options: dict[str, Any] = {"initialization_timeout": timeout_s}
    heartbeat = heartbeat_s if heartbeat_s is not None else os.environ.get("JAXTL_HEARTBEAT_S")
    if heartbeat is not None:
        if not str(heartbeat).isdigit() or int(heartbeat) < 1:
            raise ValueError(
                f"heartbeat_s (JAXTL_HEARTBEAT_S) must be a whole number of seconds >= 1, got "
                f"{heartbeat!r}."
            )
        options["heartbeat_timeout_seconds"] = int(heartbeat)
    if found["source"] == "jaxtl":
        options.update(
            coordinator_address=found["coordinator"],
            num_processes=found["num_processes"],
            process_id=found["process_id"],
        )
    jax.distributed.initialize(**options)
    found.update(process_id=jax.process_index(), num_processes=jax.process_count())
    print(
        f"distributed ({found['source']}): process {found['process_id']} of "
        f"{found['num_processes']}, {jax.local_device_count()} local of {jax.device_count()} "
        "devices",
        file=sys.stderr,
    )
    return found


def is_primary() -> bool:
    """Whether this process writes the run's shared files (run.json, summaries, plots): process
    0. Every process writes its own errors and logs."""
    import jax

    return jax.process_index() == 0


def primarys(flag: bool) -> bool:
    """Process 0's ``flag``, in every process: one answer to a question about shared files
    that only process 0 may ask (another process could already see process 0's own writes).
    In one process, ``flag`` itself, with no collective."""
    import jax

    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))
