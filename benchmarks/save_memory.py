"""The resident memory one checkpoint save adds on CPU: orbax's default write window against
the window jaxtl's Trainer uses there (``jaxtl.checkpoint.write_window_gb``).

Each side runs in its own process: it places a MiniLM-sized state (``--mib`` of float32 arrays,
the largest 47 MB like MiniLM's word embedding) on the CPU device, trims the heap, then saves
it ``--saves`` times through :class:`jaxtl.checkpoint.Checkpointer` as a training run with a
validation split does (each save improves the metric, so it goes to the ``latest`` and the
``best`` managers at once), waiting for each save (as the CPU train loop does) and sampling
its own resident set every 10 ms. It prints, per save, the resident set before and the most it
reached during the save, and the ratio of the medians of the two sides' growth.

Run from the repository root (results: benchmarks/README.md)::

    python benchmarks/save_memory.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def resident_mib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no VmRSS line in /proc/self/status (Linux only)")


def child(trainers: bool, mib: int, saves: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtl.checkpoint import Checkpointer, write_window_gb
    from jaxtl.train import heap

    most = [0]

    def sampler() -> None:
        while True:
            most[0] = max(most[0], resident_mib())
            time.sleep(0.01)

    threading.Thread(target=sampler, daemon=True).start()
    rng = np.random.default_rng(0)
    state = {"embedding": jnp.asarray(rng.random((30522, 384), np.float32))}  # 47 MB
    rest = mib * 2**20 - state["embedding"].nbytes
    for i in range(max(0, rest // (4 * 2**20))):  # 4 MiB arrays up to --mib
        state[f"w{i}"] = jnp.asarray(rng.random(2**20, np.float32))
    jax.block_until_ready(state)
    heap.trim()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        window = write_window_gb(state) if trainers else None
        ckpt = Checkpointer(out, max_to_keep=2, best_metric="score", write_window_gb=window)
        try:
            for step in range(1, saves + 1):
                time.sleep(0.05)
                before = resident_mib()
                most[0] = before
                t = time.perf_counter()
                ckpt.save(step, state, {"step": step}, metrics={"score": float(step)})
                ckpt.wait()
                seconds = time.perf_counter() - t
                time.sleep(0.05)
                rows.append(
                    {"before": before, "max": most[0], "seconds": seconds, "window": window}
                )
                heap.trim()
        finally:
            ckpt.close()
    print(json.dumps(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=263, help="the state's size (MiniLM + AdamW: 263)")
    p.add_argument("--saves", type=int, default=5, help="saves per side")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mib < 48 or args.saves < 1:
        p.error("--mib must be >= 48 (the state holds a 47 MB embedding) and --saves >= 1")
    if args.child is not None:
        child(args.child == "trainer", args.mib, args.saves)
        return 0
    growth = {}
    for side in ("default", "trainer"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                side,
                "--mib",
                str(args.mib),
                "--saves",
                str(args.saves),
            ],  # fmt: skip
            capture_output=True,
            text=True,
            check=True,
        )
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        name = "orbax default (96 GB)" if side == "default" else f"{rows[0]['window']:.3f} GB"
        for i, r in enumerate(rows, 1):
            print(f"{name}: save {i}: resident {r['before']:,} MiB before, {r['max']:,} MiB at "
                  f"most (+{r['max'] - r['before']}), {r['seconds']:.2f} s")  # fmt: skip
        growth[side] = (
            statistics.median(r["max"] - r["before"] for r in rows),
            statistics.median(r["seconds"] for r in rows),
        )
    (d, ds), (t, ts) = growth["default"], growth["trainer"]
    print(
        f"median growth during a save (latest + best): {d:.0f} MiB, {ds:.2f} s (orbax default)"
        f" vs {t:.0f} MiB, {ts:.2f} s (the Trainer's CPU window); ratio {t / max(d, 1):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
