"""Domain adaptation on real shifts of the embedded digits: source-only, AdaBN, Tent, Deep CORAL
and DANN, each scored on the shifted target's test split; and on the embedded VADER words with
typos (``--data vader``).

    python benchmarks/domain_adaptation.py [--shifts invert,rotate,noise] [--epochs 4]
                                           [--seeds 0] [--json /tmp/da.json]
    python benchmarks/domain_adaptation.py --data vader [--epochs 1] [--json /tmp/da_text.json]

Text: the VADER lexicon's words (the demo's split) for the embedded MiniLM, and as the target
the same words with one typing slip in each (``jaxtl.data.shifts.shift_texts``: a swap of
neighbouring letters, a letter dropped, doubled or replaced by a keyboard neighbour). The trained
arms use AdamW 5e-5 with linear decay, batch 32 per domain, clipping 1.0, weight decay 0.01.
AdaBN and Tent do not apply: MiniLM has no BatchNorm.

Source: scikit-learn's digits (the preset's 60/20/20 split, all 1,078 training images) for
EfficientNet-Lite0 (ImageNet weights, one-channel stem, 32x32, the `--preset digits` model).
Targets, built from the same splits (so the target test images are the source test images,
shifted): ``invert`` (255 - x), ``rotate`` (every image turned 30 degrees), ``noise``
(Gaussian noise of std 64 on 0..255, clipped). The target train split's images are the
unlabeled adaptation data; its labels are never read.

Every trained arm is ``jaxtl.domain.adapt(model, "full", source, target, method=...)`` with the
same config (AdamW 1e-3 with cosine decay, batch 32 per domain, ``--epochs`` passes over the
source, clipping 1.0, weight decay 0.01): ``source_only`` (the same loop and batches without the
adaptation term), ``coral`` (weight 1) and ``dann`` (weight 1). AdaBN (target statistics) and
Tent (one epoch of entropy minimization on the BatchNorm affine params, Adam 1e-3, batch 64)
start from the source-only model. Prints the source and target test accuracy of each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax

import jaxtl
from jaxtl import domain, presets
from jaxtl.data import digits, shifts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", choices=["digits", "vader"], default="digits")
    p.add_argument("--shifts", help="default: invert,rotate,noise (digits), typos (vader)")
    p.add_argument("--epochs", type=int, help="default: 4 (digits), 1 (vader)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--json", help="also write every number here")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    text = a.data == "vader"
    a.shifts = a.shifts or ("typos" if text else "invert,rotate,noise")
    a.epochs = a.epochs or (1 if text else 4)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}, jax {jax.__version__}; {a.epochs} epochs, seeds {seeds}",
        flush=True,
    )
    source = jaxtl.data.vader() if text else digits(None, seed=0)
    rows = []
    t0 = time.perf_counter()
    for shift in a.shifts.split(","):
        target = shifts.shifted(source, shift)
        for seed in seeds:
            if text:
                config = jaxtl.TrainConfig(epochs=a.epochs, batch_size=32, learning_rate=5e-5,
                                           weight_decay=0.01, clip_norm=1.0, seed=seed,
                                           log_every=50)  # fmt: skip
                model = jaxtl.load(jaxtl.default_model_dir(), num_labels=2, seed=seed)
            else:
                config = jaxtl.TrainConfig(epochs=a.epochs, batch_size=32, learning_rate=1e-3,
                                           schedule="cosine", weight_decay=0.01, clip_norm=1.0,
                                           seed=seed, log_every=50)  # fmt: skip
                model = presets.load_digits_model(True, 32, seed)
            found = {}
            for method in ("source_only", "coral", "dann"):
                done = domain.adapt(model, "full", source, target, method=method, config=config,
                                    verbose=False)  # fmt: skip
                found[method] = (done.params, done.batch_stats)
                if method == "source_only" and not text:  # MiniLM has no BatchNorm
                    params, stats = found[method]
                    x = domain.unlabeled(model, target)["pixel_values"]
                    found["adabn"] = (params, jaxtl.adapt_batch_norm(
                        model, x, params=params, batch_stats=stats))  # fmt: skip
                    found["tent"] = domain.tent(model, target, params=params, batch_stats=stats,
                                                seed=seed)  # fmt: skip
            for method, (params, stats) in found.items():
                row = {
                    "shift": shift,
                    "seed": seed,
                    "method": method,
                    "source": 100 * domain.accuracy(model, params, stats, source),
                    "target": 100 * domain.accuracy(model, params, stats, target),
                }
                rows.append(row)
                print(f"{shift} seed {seed} {method}: source test {row['source']:.2f}%, "
                      f"target test {row['target']:.2f}%", flush=True)  # fmt: skip
    methods = ["source_only", "coral", "dann"] if text else ["source_only", "adabn", "tent",
                                                            "coral", "dann"]  # fmt: skip
    print("\n| shift | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    for shift in a.shifts.split(","):
        cells = []
        for m in methods:
            t = [r["target"] for r in rows if r["shift"] == shift and r["method"] == m]
            s = [r["source"] for r in rows if r["shift"] == shift and r["method"] == m]
            cells.append(f"{statistics.mean(t):.2f} (src {statistics.mean(s):.2f})")
        print(f"| {shift} | " + " | ".join(cells) + " |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; target test accuracy % (source test in "
          "parentheses), mean over seeds")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
