"""Weight-space ensembles on the demo task: WiSE-FT of each full fine-tune, and the uniform and
greedy soups of the seeds' runs, against the runs themselves.

    python benchmarks/ensembles.py [--seeds 0,1,2] [--epochs 3] [--out /tmp/ens]
                                   [--recipe full] [--lr 5e-5] [--json /tmp/ensembles.json]

Each seed is one ``jaxtl finetune --recipe RECIPE --no-scratch`` in its own process (the
embedded MiniLM-L6 on the embedded VADER split, jaxtl's defaults, the best validation
checkpoint). Then, in this process, ``jaxtl.wise_ft`` scores alpha in 0, 0.1, ..., 1 on each run
and keeps the best by validation, and ``jaxtl.soup`` mixes all the runs (uniform, and greedy by
validation). It prints the test accuracy of each, and mean +- std over seeds where there is one
per seed. Every choice (alpha, which soup) is made on validation; the test split only scores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax

import jaxtl
from jaxtl.experiment import Arm


def _finetune(recipe: str, lr: float, seed: int, epochs: int, out: str) -> str:
    run = os.path.join(out, f"seed{seed}")
    # The CLI names the arm's directory as Arm.dirname does ("llrd(0.9)" -> "pretrained-llrd0.9").
    arm = Arm(f"pretrained {recipe}", recipe, pretrained=True)
    done = os.path.join(run, arm.dirname, "results.json")
    if not os.path.exists(done):
        cmd = [sys.executable, "-m", "jaxtl.cli", "finetune", "--recipe", recipe,
               "--no-scratch", "--epochs", str(epochs), "--lr", str(lr), "--seed", str(seed),
               "--out", run]  # fmt: skip
        if os.path.isdir(run):  # runs of other recipes there are kept, not written over
            cmd.append("--resume")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return os.path.dirname(done)


def _accuracy(scores: dict) -> float:
    return 100 * scores["test"]["accuracy"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--recipe", default="full")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--out", default="/tmp/jaxtl-ensembles", help="run directories (reused)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}, jax {jax.__version__}; {a.recipe} at {a.lr:g}, "
        f"{a.epochs} epochs, seeds {seeds}",
        flush=True,
    )
    t0 = time.perf_counter()
    runs = [_finetune(a.recipe, a.lr, s, a.epochs, a.out) for s in seeds]
    plain, wise = [], []
    for seed, run in zip(seeds, runs, strict=True):
        with open(os.path.join(run, "results.json")) as f:
            plain.append(100 * json.load(f)["test"]["accuracy"])
        out = os.path.join(a.out, f"wise-ft-seed{seed}")
        saved = os.path.join(out, "wise_ft.json")
        if os.path.exists(saved):  # a rerun reuses what an earlier one wrote
            with open(saved) as f:
                result = json.load(f)
        else:
            result = jaxtl.wise_ft(run, out=out, verbose=False)
        row = next(r for r in result["rows"] if r["alpha"] == result["alpha"])
        wise.append((result["alpha"], 100 * row["test"]["accuracy"]))
        print(
            f"seed {seed}: {a.recipe} {plain[-1]:.2f}%, WiSE-FT alpha {result['alpha']:g} "
            f"{wise[-1][1]:.2f}%",
            flush=True,
        )
    soup = jaxtl.soup(runs, out=os.path.join(a.out, f"soup-{time.time_ns()}"), verbose=False)

    def stat(xs):
        return f"{statistics.mean(xs):.2f} +- {statistics.stdev(xs) if len(xs) > 1 else 0:.2f}%"

    print("\n| model | test accuracy |\n|---|---|")
    print(f"| {a.recipe} (each seed) | {stat(plain)} |")
    print(f"| WiSE-FT of each (alpha by validation) | {stat([w for _, w in wise])} |")
    print(f"| uniform soup of the {len(runs)} runs | {_accuracy(soup['uniform']):.2f}% |")
    print(f"| greedy soup (by validation) | {_accuracy(soup['greedy']):.2f}% |")
    print(
        f"(the soup kept by validation: {soup['chosen']})\ntotal {time.perf_counter() - t0:.0f} s"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "plain": plain,
                    "wise_ft": wise,
                    "uniform_soup": _accuracy(soup["uniform"]),
                    "greedy_soup": _accuracy(soup["greedy"]),
                    "chosen": soup["chosen"],
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
