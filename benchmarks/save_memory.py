"""The resident memory one checkpoint save adds on CPU: orbax's default (zstd-compressed
arrays) against what jaxtl's Trainer writes there (``Checkpointer(compress=False)``).

Each side runs in its own process: it places a MiniLM-sized state (``--mib`` of float32 arrays,
the largest 47 MB like MiniLM's word embedding) on the CPU device, trims the heap, then saves
it ``--saves`` times through :class:`jaxtl.checkpoint.Checkpointer` as a training run with a
validation split does (each save improves the metric, so it goes to the ``latest`` and the
``best`` managers at once), waiting for each save (as the CPU train loop does) and sampling
its own resident set every 10 ms. It prints, per save, the resident set before and the most it
reached during the save, the bytes one step takes on disk, and the ratio of the medians of the
two sides' growth. The state is random numbers by default; ``--params`` saves MiniLM's real
weights and two AdamW-moment-sized trees made from them; ``--state-from DIR`` a trained state
read from a checkpoint (a run's ``checkpoints/latest/<step>/state``), whose compressibility is
a real run's (AdamW's moments for the words a task never sees are zeros).

Run from the repository root (results: benchmarks/README.md)::

    python benchmarks/save_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
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


def child(compress: bool, mib: int, saves: int, params: bool, state_from: str | None) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtl.checkpoint import Checkpointer
    from jaxtl.train import heap

    most = [0]

    def sampler() -> None:
        while True:
            most[0] = max(most[0], resident_mib())
            time.sleep(0.01)

    threading.Thread(target=sampler, daemon=True).start()
    heap.limit_arenas()  # as the jaxtl command does
    if state_from:
        import orbax.checkpoint as ocp

        state = jax.tree.map(jnp.asarray, ocp.StandardCheckpointer().restore(state_from))
    elif params:
        import jaxtl

        weights = jaxtl.load(jaxtl.default_model_dir(), num_labels=2).params
        # AdamW's moments after some training are not zeros: the weights' own bits stand in.
        state = {"params": weights, "mu": jax.tree.map(jnp.copy, weights)}
        state["nu"] = jax.tree.map(jnp.square, weights)
    else:
        rng = np.random.default_rng(0)
        state = {"embedding": jnp.asarray(rng.random((30522, 384), np.float32))}  # 47 MB
        rest = mib * 2**20 - state["embedding"].nbytes
        for i in range(max(0, rest // (4 * 2**20))):  # 4 MiB arrays up to --mib
            state[f"w{i}"] = jnp.asarray(rng.random(2**20, np.float32))
    jax.block_until_ready(state)
    heap.trim()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        ckpt = Checkpointer(out, max_to_keep=2, best_metric="score", compress=compress)
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
                disk = sum(
                    os.path.getsize(os.path.join(d, f))
                    for d, _, files in os.walk(os.path.join(out, "latest", str(step)))
                    for f in files
                )
                rows.append({"before": before, "max": most[0], "seconds": seconds, "disk": disk})
                heap.trim()
        finally:
            ckpt.close()
    print(json.dumps(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=263, help="the state's size (MiniLM + AdamW: 263)")
    p.add_argument("--saves", type=int, default=5, help="saves per side")
    p.add_argument(
        "--params",
        action="store_true",
        help="save MiniLM's weights, a copy and their squares (--mib is then ignored)",
    )
    p.add_argument(
        "--state-from",
        metavar="DIR",
        help="save the state of this checkpoint, e.g. RUN/checkpoints/latest/510/state",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mib < 48 or args.saves < 1:
        p.error("--mib must be >= 48 (the state holds a 47 MB embedding) and --saves >= 1")
    if args.params and args.state_from:
        p.error("give --params or --state-from, not both")
    if args.state_from and not os.path.isfile(os.path.join(args.state_from, "_METADATA")):
        p.error(
            f"--state-from {args.state_from}: not a checkpoint's state directory (give one like "
            "RUN/checkpoints/latest/510/state)"
        )
    if args.state_from:
        args.state_from = os.path.abspath(args.state_from)
    if args.child is not None:
        child(args.child == "compressed", args.mib, args.saves, args.params, args.state_from)
        return 0
    growth = {}
    for side in ("compressed", "raw"):
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
                *(["--params"] if args.params else []),
                *(["--state-from", args.state_from] if args.state_from else []),
            ],  # fmt: skip
            capture_output=True,
            text=True,
            check=True,
        )
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        name = "compressed (orbax's default)" if side == "compressed" else "raw (the Trainer's)"
        for i, r in enumerate(rows, 1):
            print(f"{name}: save {i}: resident {r['before']:,} MiB before, {r['max']:,} MiB at "
                  f"most (+{r['max'] - r['before']}), {r['seconds']:.2f} s, "
                  f"{r['disk'] / 2**20:.1f} MiB on disk")  # fmt: skip
        growth[side] = (
            statistics.median(r["max"] - r["before"] for r in rows),
            statistics.median(r["seconds"] for r in rows),
            rows[-1]["disk"] / 2**20,
        )
    (c, cs, cd), (r, rs, rd) = growth["compressed"], growth["raw"]
    print(
        f"median growth during a save (latest + best): {c:.0f} MiB, {cs:.2f} s, {cd:.1f} MiB on"
        f" disk (compressed) vs {r:.0f} MiB, {rs:.2f} s, {rd:.1f} MiB on disk (raw, the"
        f" Trainer's on CPU); growth ratio {r / max(c, 1):.2f}, disk ratio {rd / cd:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
