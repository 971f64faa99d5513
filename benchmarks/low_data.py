"""Transfer with little data: pretrained full fine-tuning, LoRA and the linear probe against the
same network trained from scratch, at 50, 200 and 1,000 training examples, on the demo task
(MiniLM on VADER) or the digits preset (EfficientNet-Lite0 on scikit-learn's digits).

    python benchmarks/low_data.py [--data vader|digits] [--sizes 50,200,1000] [--seeds 0,1,2]
                                  [--steps 150] [--json /tmp/low_data.json]

Each size is a class-stratified random subset of the training split (drawn once per size with
seed 0, the same for every arm and seed). Validation and test stay the whole splits. Every run
takes the same number of optimizer steps (``--steps``, batch 16, whatever the subset's size)
with jaxtl's defaults otherwise (AdamW, linear decay with warm-up, clipping at 1.0) and the
best validation checkpoint, evaluated four times over the run. Learning rates per arm are in
``ARMS``: for VADER jaxtl's defaults per recipe (scratch uses full's, as ``jaxtl finetune``
does); for digits the preset's (``jaxtl.presets.DIGITS_ARMS``), and LoRA's 3e-3 (not tuned).
Digits runs evaluate with exact BatchNorm statistics (``precise_bn=1024``), as the preset does.
On EfficientNet LoRA adapts the pointwise convolutions (``expand_conv``, ``project_conv``) and
the stem and head convolutions: its depthwise convolutions are grouped (one filter per
channel), and a low-rank update ``B A`` of one is a dense convolution that cannot be merged
into the grouped kernel (``jaxtl.transfer.lora`` refuses it with that reason, as PEFT does).
It prints one line per run and a table of mean +- std test accuracy per size and arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

import jaxtl

# Per dataset: (name, recipe, pretrained, learning rate)
ARMS = {
    "vader": (
        ("pretrained full", "full", True, 5e-5),
        (
            "pretrained LoRA r=8 (all block linears)",
            "lora(8, alpha=16, targets=['.*/(query|key|value|dense)'])",
            True,
            1e-3,
        ),
        ("pretrained linear probe", "linear_probe", True, 1e-3),
        ("scratch full", "full", False, 5e-5),
    ),
    "digits": (
        ("pretrained full", "full", True, 1e-3),
        (
            "pretrained LoRA r=8 (pointwise, stem and head convs)",
            "lora(8, alpha=16, targets=['(conv_stem|conv_head|.*/(expand_conv|project_conv))'])",
            True,
            3e-3,
        ),
        ("pretrained linear probe", "linear_probe", True, 1e-2),
        ("scratch full", "full", False, 3e-3),
    ),
}


def subset(data, n: int, seed: int = 0):
    """``data`` with a class-stratified random ``n`` of its training examples."""
    texts, labels = data.train
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    picked = []
    for i, c in enumerate(classes):
        rows = rng.permutation(np.flatnonzero(labels == c))
        share = round(n * len(rows) / len(labels)) if i < len(classes) - 1 else n - len(picked)
        picked.extend(rows[:share].tolist())
    picked = np.sort(np.asarray(picked))
    return dataclasses.replace(
        data, train=([texts[i] for i in picked], labels[picked]), name=f"{data.name}-{n}"
    )


def load(dataset: str, pretrained: bool, seed: int):
    if dataset == "digits":
        from jaxtl.presets import load_digits_model

        return load_digits_model(pretrained, image_size=32, seed=seed)
    return jaxtl.load(jaxtl.default_model_dir(), num_labels=2, pretrained=pretrained, seed=seed)


def measure(recipe: str, pretrained: bool, lr: float, seed: int, steps: int, data, dataset: str):
    model = load(dataset, pretrained, seed)
    config = jaxtl.TrainConfig(
        max_steps=steps,
        batch_size=16,
        learning_rate=lr,
        seed=seed,
        progress=False,
        eval_every=steps // 4,
        # As the digits preset does (jaxtl.presets): EfficientNet's BatchNorm momentum (0.01)
        # leaves its running statistics near ImageNet's after 150 steps, so every evaluation
        # uses exact statistics of the current weights on (up to) 1,024 training images.
        precise_bn=1024 if dataset == "digits" else 0,
    )
    result = jaxtl.finetune(model, recipe, data, config, verbose=False)
    return 100 * result.test["accuracy"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", choices=sorted(ARMS), default="vader")
    p.add_argument("--sizes", default="50,200,1000")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--json", help="also write every run and the table here")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    data = jaxtl.data.vader() if a.data == "vader" else jaxtl.data.digits()
    arms = ARMS[a.data]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}, jax {jax.__version__}; {a.data}, {a.steps} steps at "
        f"batch 16, "
        f"seeds {seeds}",
        flush=True,
    )
    t0 = time.perf_counter()
    runs = []
    for n in sizes:
        small = subset(data, n)
        for name, recipe, pretrained, lr in arms:
            for seed in seeds:
                acc = measure(recipe, pretrained, lr, seed, a.steps, small, a.data)
                runs.append({"size": n, "arm": name, "seed": seed, "lr": lr, "test": acc})
                print(f"n={n} {name} seed {seed}: test {acc:.2f}%", flush=True)
    print("\n| training examples | " + " | ".join(name for name, *_ in arms) + " |")
    print("|---" * (len(arms) + 1) + "|")
    table = []
    for n in sizes:
        cells = []
        for name, *_ in arms:
            accs = [r["test"] for r in runs if r["size"] == n and r["arm"] == name]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.2f} +- {std:.2f}%")
            table.append({"size": n, "arm": name, "mean": statistics.mean(accs), "std": std})
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": runs, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
