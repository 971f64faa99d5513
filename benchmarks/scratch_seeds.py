"""Seed spread of the from-scratch baseline on the demo task (MiniLM-L6 architecture, VADER).

    python benchmarks/scratch_seeds.py --seeds 0,1,2 [--epochs 3]

Each seed initializes the random model and orders the data; the recipe is the reference's plain
loop (AdamW lr 5e-5, constant LR, no clipping, batch 32). Prints final-params test accuracy per
seed, the mean and the spread, next to the reference's single number (85.2%).
"""

import argparse

import numpy as np

import jaxtl
from jaxtl import default_model_dir


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args()
    data = jaxtl.data.vader()
    accs = {}
    for seed in (int(s) for s in a.seeds.split(",")):
        model = jaxtl.load(default_model_dir(), num_labels=2, pretrained=False, seed=seed)
        config = jaxtl.TrainConfig(
            epochs=a.epochs,
            learning_rate=5e-5,
            schedule="constant",
            clip_norm=None,
            seed=seed,
            restore_best=False,
        )
        res = jaxtl.finetune(model, "full", data, config, verbose=False)
        accs[seed] = res.test["accuracy"]
        print(
            f"seed {seed}: test accuracy {100 * accs[seed]:.1f}% ({res.train_seconds:.0f} s)",
            flush=True,
        )
    v = np.array(list(accs.values()))
    print(
        f"scratch, {a.epochs} epochs, {len(v)} seeds: mean {100 * v.mean():.1f}%, "
        f"min {100 * v.min():.1f}%, max {100 * v.max():.1f}% (reference, one run: 85.2%)"
    )


if __name__ == "__main__":
    main()
