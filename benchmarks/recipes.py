"""Recipe quality on the demo task: test accuracy over seeds, trainable params, optimizer bytes
and time per epoch, each recipe against jaxtl's own full fine-tune on the same split.

    python benchmarks/recipes.py [--arms 'full@5e-5,lora(8)@1e-3,lp_ft(1)@5e-5@4'] [--seeds 0,1,2]
                                 [--epochs 3]
                                 [--json /tmp/recipes.json]

Every arm fine-tunes the embedded MiniLM-L6 (pretrained) on the embedded VADER split with
jaxtl's defaults (AdamW, batch 32, linear decay with warm-up, clipping at 1.0, the best
validation checkpoint restored for the test score), one run per seed; an arm is
``RECIPE@LEARNING_RATE`` or ``RECIPE@LEARNING_RATE@EPOCHS``, its recipe optionally followed by
``+l2_sp(ALPHA,BETA)`` (L2-SP toward the pretrained weights, ``TrainConfig(l2_sp=...)``,
``--l2-sp``), e.g. ``full+l2_sp(0.01,0.01)@5e-5``. It prints one line per run and a
table: mean +- std of the test accuracy, and for each recipe its trainable params and
optimizer-state bytes as a share of full fine-tuning's, and its train seconds per epoch against
full's (same process, runs in turn). The transformers + PyTorch reference for full fine-tuning
is 95.6%, for the linear probe 88.6% (README).
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
from jaxtl.experiment import default_learning_rate
from jaxtl.transfer.recipes import split_recipes


def parse_arms(text: str) -> list[tuple[str, float, int | None]]:
    """``RECIPE[+l2_sp(A,B)][@LR[@EPOCHS]]`` items: the learning rate defaults to the recipe's,
    the epochs to ``--epochs``."""
    arms = []
    for item in split_recipes(text):
        recipe, *rest = item.split("@")
        lr = float(rest[0]) if rest and rest[0] else default_learning_rate(_split_l2_sp(recipe)[0])
        epochs = int(rest[1]) if len(rest) > 1 else None
        arms.append((recipe, lr, epochs))
    return arms


def _split_l2_sp(arm: str) -> tuple[str, tuple[float, float] | None]:
    """``"full+l2_sp(0.01,0.1)"`` -> ``("full", (0.01, 0.1))``; no suffix -> ``(arm, None)``."""
    recipe, plus, penalty = arm.partition("+l2_sp(")
    if not plus:
        return arm, None
    alpha, beta = (float(v) for v in penalty.rstrip(")").split(","))
    return recipe, (alpha, beta)


def measure(arm: str, lr: float, seed: int, epochs: int, data) -> dict:
    recipe, l2_sp = _split_l2_sp(arm)
    model = jaxtl.load(jaxtl.default_model_dir(), num_labels=2)
    plan = jaxtl.make_plan(recipe, model.structure)
    config = jaxtl.TrainConfig(
        epochs=epochs, learning_rate=lr, seed=seed, progress=False, l2_sp=l2_sp
    )
    result = jaxtl.finetune(model, plan, data, config, verbose=False)
    rows = plan.summary(result.model.params)
    return {
        "recipe": arm,
        "lr": lr,
        "seed": seed,
        "test_accuracy": result.test["accuracy"],
        # The restored (best) checkpoint's validation accuracy: choose arms by this, not by test.
        "validation_accuracy": (result.best or {}).get("val_accuracy"),
        "train_seconds": result.train_seconds,
        "seconds_per_epoch": result.train_seconds / epochs,
        "trainable_params": sum(r.num_params for r in rows if r.trainable),
        "opt_state_bytes": sum(r.opt_state_bytes or 0 for r in rows),
        "steps": result.steps,
        "epochs": epochs,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--arms", default="full@5e-5,lora(8)@1e-3", help="RECIPE@LR[@EPOCHS], comma-separated"
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--json", help="also write every run and the table here")
    a = p.parse_args(argv)
    arms = parse_arms(a.arms)
    if arms[0][0] != "full":
        arms.insert(0, ("full", default_learning_rate("full"), None))  # every row cites it
    seeds = [int(s) for s in a.seeds.split(",")]
    data = jaxtl.data.vader()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}, jax {jax.__version__}; {a.epochs} epochs, "
        f"seeds {seeds}",
        flush=True,
    )
    runs = []
    t0 = time.perf_counter()
    for recipe, lr, epochs in arms:
        for seed in seeds:
            r = measure(recipe, lr, seed, epochs or a.epochs, data)
            runs.append(r)
            val = r["validation_accuracy"]
            print(
                f"{recipe} lr {lr:g} seed {seed}: test {100 * r['test_accuracy']:.2f}%, "
                f"validation {100 * val if val is not None else float('nan'):.2f}%, "
                f"{r['seconds_per_epoch']:.1f} s/epoch",
                flush=True,
            )
    by = {}
    for r in runs:
        by.setdefault((r["recipe"], r["lr"], r["epochs"]), []).append(r)
    full = by[(arms[0][0], arms[0][1], arms[0][2] or a.epochs)]
    full_params, full_bytes = full[0]["trainable_params"], full[0]["opt_state_bytes"]
    full_epoch = statistics.mean(r["seconds_per_epoch"] for r in full)
    table = []
    print(
        "\n| recipe | lr | epochs | validation accuracy (mean) | test accuracy (mean +- std) "
        "| trainable vs full | optimizer bytes vs full | s/epoch (vs full) |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    for (recipe, lr, epochs), rs in by.items():
        accs = [100 * r["test_accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        epoch = statistics.mean(r["seconds_per_epoch"] for r in rs)
        vals = [100 * r["validation_accuracy"] for r in rs if r["validation_accuracy"] is not None]
        row = {
            "validation_mean": statistics.mean(vals) if vals else None,
            "recipe": recipe,
            "lr": lr,
            "epochs": epochs,
            "mean": statistics.mean(accs),
            "std": std,
            "trainable_share": rs[0]["trainable_params"] / full_params,
            "opt_share": rs[0]["opt_state_bytes"] / full_bytes,
            "seconds_per_epoch": epoch,
            "epoch_vs_full": epoch / full_epoch,
        }
        table.append(row)
        print(
            f"| {recipe} | {lr:g} | {epochs} | "
            f"{'-' if not vals else format(row['validation_mean'], '.2f') + '%'} | "
            f"{row['mean']:.2f} +- {std:.2f}% | "
            f"{100 * row['trainable_share']:.2f}% ({rs[0]['trainable_params']:,}) | "
            f"{100 * row['opt_share']:.2f}% | {epoch:.1f} ({row['epoch_vs_full']:.2f}) |"
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": runs, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
