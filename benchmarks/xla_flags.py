"""Which XLA CPU flags and environment settings make the MiniLM train step faster? Measured.

Each setting runs in a fresh process (``reference_step.py --side ...``: compile, warm-up, then
``--steps`` back-to-back steps of jaxtl's ``full`` step, or of the hand-written reference step
with ``--side reference``), with the setting in ``XLA_FLAGS`` or in the environment. The table
gives each setting's median step time, its ratio to the default (measured first and again last,
so that drift in the machine's load shows), and the mean training loss, which must stay close to
the default's for a setting to be usable (dropout masks differ under another PRNG).

Run from the repository root (results: benchmarks/README.md)::

    timeout 30m python benchmarks/xla_flags.py --json /tmp/xla_flags.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# (label, XLA_FLAGS added, other environment variables)
SETTINGS = [
    ("default", "", {}),
    ("oneDNN thunks", "--xla_cpu_use_onednn=true", {}),
    ("oneDNN fusions: dot", "--xla_cpu_experimental_onednn_fusion_type=dot", {}),
    (
        "oneDNN fusions: dot,eltwise,reduce",
        "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
        {},
    ),
    ("XNNPACK fusions: dot", "--xla_cpu_experimental_xnn_fusion_type=dot", {}),
    (
        "XNNPACK fusions: dot,eltwise,reduce",
        "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
        {},
    ),
    (
        "XNNPACK graph fusion: greedy",
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
        {},
    ),
    ("XNNPACK off", "--xla_cpu_use_xnnpack=false", {}),
    ("fast math", "--xla_cpu_enable_fast_math=true", {}),
    ("PRNG rbg", "", {"JAX_DEFAULT_PRNG_IMPL": "rbg"}),
    ("PRNG unsafe_rbg", "", {"JAX_DEFAULT_PRNG_IMPL": "unsafe_rbg"}),
    (
        "glibc malloc: no trim, mmap above 32 MiB",
        "",
        {"MALLOC_TRIM_THRESHOLD_": str(1 << 36), "MALLOC_MMAP_THRESHOLD_": str(1 << 25)},
    ),
    ("default (again)", "", {}),
]


def run(label: str, flags: str, env: dict, args: argparse.Namespace) -> dict:
    full_env = dict(os.environ, **env)
    full_env["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), flags) if f)
    cmd = [sys.executable, os.path.join(HERE, "reference_step.py"), "--side", args.side]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=full_env, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["?"]
        print(f"{label}: failed ({tail[0][:200]})", flush=True)
        return {"label": label, "flags": flags, "env": env, "error": tail[0]}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    row = {
        "label": label,
        "flags": flags,
        "env": env,
        "median_s": statistics.median(out["times"]),
        "min_s": min(out["times"]),
        "compile_s": out["compile_s"],
        "mean_loss": statistics.mean(out["losses"]),
        "times": out["times"],
        "process_s": wall,
    }
    print(
        f"{label}: median {row['median_s']:.3f} s (min {row['min_s']:.3f}), compile "
        f"{row['compile_s']:.1f} s, mean loss {row['mean_loss']:.4f}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=("jaxtl", "reference"), default="jaxtl")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", default=None, help="comma-separated labels to run (default: all)")
    p.add_argument("--json", metavar="PATH", default=None)
    args = p.parse_args(argv)
    settings = SETTINGS
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")}
        settings = [s for s in SETTINGS if s[0] in wanted]
        if not settings:
            p.error(f"--only matched none of: {', '.join(s[0] for s in SETTINGS)}")
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows = [run(label, flags, env, args) for label, flags, env in settings]
    base = [r["median_s"] for r in rows if r["label"].startswith("default") and "median_s" in r]
    ref = statistics.mean(base) if base else None
    print(f"\nload average at end: {os.getloadavg()}\n")
    print("| setting | median s | default / setting | compile s | mean loss |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if "median_s" not in r:
            print(f"| {r['label']} | failed | | | |")
            continue
        ratio = f"{ref / r['median_s']:.2f}" if ref else "-"
        print(
            f"| {r['label']} | {r['median_s']:.3f} | {ratio} | {r['compile_s']:.1f} | "
            f"{r['mean_loss']:.4f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"side": args.side, "rows": rows, "loadavg_end": os.getloadavg()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
