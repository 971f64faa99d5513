"""Reopening a finished run for evaluation or export: the whole train state against the weights
alone (``jaxtl.run.restore_run(weights_only=True)``, what ``jaxtl evaluate``, ``export`` and
``generate`` read).

Each restore runs in its own process, the two kinds alternating, and the script prints each
one's time in ``restore_run``, the bytes of the arrays it allocated, and the process's peak RSS
(``ru_maxrss``: the import, the model built from its config, and the restore), then the medians
and their ratios (weights alone / whole state).

Usage:
  python benchmarks/restore_memory.py [--run RUN_DIR] [--repeats 3]

Without ``--run`` it first makes one in a temporary directory: ``jaxtl finetune --recipe full
--no-scratch --max-steps 4`` (the embedded MiniLM-L6 and the demo data; AdamW keeps two moments
per trained param).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _child(kind: str, run_dir: str) -> None:
    import jax

    from jaxtl import run

    t0 = time.perf_counter()
    restored = run.restore_run(run_dir, weights_only=kind == "weights")
    jax.block_until_ready([x for x in jax.tree.leaves(restored.state) if isinstance(x, jax.Array)])
    seconds = time.perf_counter() - t0
    allocated = sum(x.nbytes for x in jax.tree.leaves(restored.state) if isinstance(x, jax.Array))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"kind": kind, "seconds": seconds, "allocated_mib": allocated / 2**20,
                      "peak_rss_mib": peak}))  # fmt: skip


def _make_run(parent: str) -> str:
    out = os.path.join(parent, "run")
    argv = [sys.executable, "-m", "jaxtl.cli", "finetune", "--recipe", "full", "--no-scratch",
            "--max-steps", "4", "--out", out]  # fmt: skip
    print("making a run:", " ".join(argv[2:]), flush=True)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return os.path.join(out, "pretrained-full")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a finished run directory (default: make one)")
    parser.add_argument("--repeats", type=int, default=3, help="processes of each kind")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(*args.child)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or _make_run(tmp)
        if not os.path.isfile(os.path.join(run_dir, "run.json")):
            parser.error(f"--run {run_dir}: not a run directory (no run.json)")
        rows: dict[str, list[dict]] = {"whole": [], "weights": []}
        for i in range(args.repeats):
            order = ("whole", "weights") if i % 2 == 0 else ("weights", "whole")
            for kind in order:
                cmd = [sys.executable, __file__, "--child", kind, run_dir]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                row = json.loads(line.strip().splitlines()[-1])
                rows[kind].append(row)
                print(f"{kind:>7}: restore {row['seconds']:.2f} s, arrays "
                      f"{row['allocated_mib']:.1f} MiB, peak RSS {row['peak_rss_mib']:.0f} MiB",
                      flush=True)  # fmt: skip
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0] if m != "kind"}
           for k, v in rows.items()}  # fmt: skip
    print(f"\nload average: {os.getloadavg()[0]:.2f}; medians of {args.repeats} processes each")
    print("| | whole state | weights alone | weights / whole |\n|---|---|---|---|")
    for m, label in (("seconds", "restore (s)"), ("allocated_mib", "arrays (MiB)"),
                     ("peak_rss_mib", "peak RSS (MiB)")):  # fmt: skip
        a, b = med["whole"][m], med["weights"][m]
        print(f"| {label} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
