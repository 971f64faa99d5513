"""Fine-tune a BERT-family checkpoint on labeled text from Python, then compare recipes.

    python examples/finetune_text.py                     # embedded MiniLM-L6 + VADER
    python examples/finetune_text.py --model DIR --data my.csv --recipes "last_n(2),full"

Expected on 2 CPU cores with the defaults: each recipe prints its plan table, trains for one
epoch at its own default learning rate (1e-3 for a linear probe, 5e-5 otherwise), and the final
table shows test accuracy per recipe (linear probe ~0.85 and last_n(2) ~0.9 on VADER). The
loop is jaxtl.experiment's, the one `jaxtl finetune` runs.
"""

import argparse

import jaxtl
from jaxtl import experiment


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="HF model directory (default: embedded MiniLM-L6)")
    p.add_argument(
        "--data", default=None, help="CSV/JSONL with 'text' and 'label' columns (default: VADER)"
    )
    p.add_argument("--recipes", default="linear_probe,last_n(2)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument(
        "--out", default=None, help="experiment directory (default: runs/example-TIMESTAMP)"
    )
    args = p.parse_args()
    # A new directory, or one without an earlier run's results: those are never written over.
    out = experiment.experiment_dir(args.out, "example")

    data = jaxtl.data.vader() if args.data is None else jaxtl.data.from_table(args.data)
    path = args.model or jaxtl.default_model_dir()
    arms = experiment.arms(args.recipes.split(","), scratch=False)
    # A fresh model per arm: each recipe starts from the pretrained weights.
    load = lambda arm: jaxtl.load(path, num_labels=2)  # noqa: E731
    config = jaxtl.TrainConfig(epochs=args.epochs)
    results = experiment.run_arms(out, arms, load, data, config)
    table, plot = experiment.write_summary(out, results)
    print(f"{table}\nplot: {plot}")


if __name__ == "__main__":
    main()
