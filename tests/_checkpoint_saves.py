"""One process of a 2-process run that saves latest + best checkpoints back to back.

Usage: python _checkpoint_saves.py OUT_DIR PROCESS_ID PORT SAVES

Each step saves a state sharded over both processes' devices to :class:`jaxtl.checkpoint.
Checkpointer`'s two managers, with nothing in between: the cadence of a run that evaluates
every step and improves every time, and the case in which orbax's background threads of the
two managers meet at their barriers. Then both checkpoints are restored and compared with
what was saved; the last stdout line is a JSON summary.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def main() -> None:
    out, pid, port, saves = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    os.environ.update(
        JAXTL_COORDINATOR=f"127.0.0.1:{port}", JAXTL_NUM_PROCESSES="2", JAXTL_PROCESS_ID=str(pid)
    )
    from jaxtl import distributed

    distributed.initialize(timeout_s=60)
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxtl.checkpoint import Checkpointer

    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
    sharding = NamedSharding(mesh, P("fsdp"))
    rows = jax.local_device_count()

    def state(step: int) -> dict:
        local = np.full((rows, 4), 100 * step + pid, np.float32)  # this process's rows
        return {"w": jax.make_array_from_process_local_data(sharding, local)}

    ckpt = Checkpointer(out, max_to_keep=2, best_metric="score")
    try:
        for step in range(1, saves + 1):
            ckpt.save(step, state(step), {"step": step}, metrics={"score": float(step)})
        ckpt.wait()
        like = state(0)
        latest, latest_meta = ckpt.restore_latest(like)
        best, best_meta = ckpt.restore_best(like)
    finally:
        ckpt.close()
    expected = np.asarray(multihost_utils.process_allgather(state(saves)["w"], tiled=True))
    got = [
        np.asarray(multihost_utils.process_allgather(t["w"], tiled=True)) for t in (latest, best)
    ]
    summary = {
        "latest_step": latest_meta["step"],
        "best_step": best_meta["step"],
        "latest_equal": bool(np.array_equal(got[0], expected)),
        "best_equal": bool(np.array_equal(got[1], expected)),
    }
    print(json.dumps(summary), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
