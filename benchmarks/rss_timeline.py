"""The resident memory of one command over time: where in a run its peak comes from.

Runs the command given after ``--`` (e.g. a ``jaxtl finetune``), samples its resident set from
``/proc/PID/status`` every ``--interval`` seconds (``VmRSS``, and its anonymous and file-backed
parts), and prints the peak, when it came, and a coarse timeline; ``--out`` keeps every sample
(seconds, RSS MiB, anonymous MiB, file-backed MiB per line). Linux only. Sampling misses
spikes shorter than the interval: the kernel's own peak (``/usr/bin/time -v``, or
``time_to_accuracy.py``'s column) is the authority on the maximum, this is for its shape.

Run from the repository root (results: benchmarks/README.md)::

    python benchmarks/rss_timeline.py --out /tmp/rss.txt -- \\
        jaxtl finetune --no-scratch --recipe full --bucket-by-length --epochs 1 --out /tmp/run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def sample(pid: int) -> tuple[int, int, int] | None:
    """(RSS, anonymous, file-backed) MiB of ``pid``, or None once it is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0]) // 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    if len(fields) < 3:  # a zombie has no memory lines
        return None
    return fields["VmRSS"], fields["RssAnon"], fields["RssFile"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--points", type=int, default=20, help="timeline entries printed")
    p.add_argument("--out", default=None, help="write every sample to this file")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to measure after --, e.g. -- jaxtl finetune --epochs 1")
    if args.interval <= 0 or args.points < 1:
        p.error("--interval must be > 0 and --points >= 1")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, samples = time.perf_counter(), []
    while proc.poll() is None:
        got = sample(proc.pid)
        if got is not None:
            samples.append((time.perf_counter() - t0, *got))
        time.sleep(args.interval)
    if proc.returncode != 0:
        print(f"the command exited with status {proc.returncode}", file=sys.stderr)
    if not samples:
        print("no sample: the command ended before the first one", file=sys.stderr)
        return 1
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(f"{t:.1f} {r} {a} {fb}\n" for t, r, a, fb in samples)
    peak = max(samples, key=lambda s: s[1])
    print(f"peak {peak[1]:,} MiB at {peak[0]:.1f} s (anonymous {peak[2]:,}, files {peak[3]:,})")
    step = max(1, len(samples) // args.points)
    print("timeline (s: MiB): " + ", ".join(f"{t:.0f}: {r:,}" for t, r, *_ in samples[::step]))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
