"""Does transferability ranking predict fine-tuning? Kendall's tau between each `jaxtl rank`
score and the test accuracy the candidates actually reach, and the time ranking takes against
the time of fine-tuning them all.

    python benchmarks/ranking.py [--shots 100] [--steps 100] [--seeds 0]
                                 [--models minilm,minilm@drop=2,...] [--json /tmp/ranking.json]

Task: the embedded VADER sentiment words with ``--shots`` training examples per class (drawn with
seed 0; the same subset for ranking and for every fine-tune), validation and test whole.
Candidates (``--models``, the ``jaxtl rank`` syntax): MiniLM-L6 pretrained, the same with its top
2, 4 and 5 blocks removed, and the same architecture with random weights. Each is ranked by
``jaxtl.ranking.rank`` (features once, then LogME, kNN and the linear probe; LEEP is skipped:
MiniLM has no source classifier), then fully fine-tuned with jaxtl's defaults (``full``, AdamW at
5e-5 with linear decay and clipping, ``--steps`` steps at batch 16, the best of four validation
checkpoints) once per seed. Tau compares each score with the mean test accuracy over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
from scipy.stats import kendalltau

import jaxtl
from jaxtl import ranking
from jaxtl.data.spec import resolve

MODELS = "minilm,minilm@drop=2,minilm@drop=4,minilm@drop=5,minilm@random"


def finetune(candidate: ranking.Candidate, data, steps: int, seed: int) -> float:
    """Test accuracy (%) of ``candidate`` fully fine-tuned on ``data``."""
    options = {"drop_blocks": candidate.drop_blocks} if candidate.drop_blocks else {}
    model = jaxtl.load(
        ranking.candidate_path(candidate.path),
        num_labels=2,
        pretrained=candidate.pretrained,
        seed=seed,
        **options,
    )
    config = jaxtl.TrainConfig(
        max_steps=steps,
        batch_size=16,
        learning_rate=5e-5,
        seed=seed,
        progress=False,
        eval_every=steps // 4,
    )
    return 100 * jaxtl.finetune(model, "full", data, config, verbose=False).test["accuracy"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", default=MODELS)
    p.add_argument("--shots", type=int, default=100)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", default="0")
    p.add_argument("--json", help="also write every number here")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    candidates = [ranking.parse_candidate(m) for m in a.models.split(",")]
    spec = {"kind": "vader", "shots": a.shots, "shots_seed": 0}
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}, jax {jax.__version__}; VADER {a.shots} shots/class, "
        f"fine-tune {a.steps} steps at batch 16, seeds {seeds}",
        flush=True,
    )
    t0 = time.perf_counter()
    ranked = ranking.rank(candidates, spec, scores=("logme", "knn", "linear"))
    rank_seconds = time.perf_counter() - t0
    print(f"\n{ranked.table()}\nranking took {rank_seconds:.0f} s\n", flush=True)

    data = resolve(spec, num_labels=2, task="classification")
    t0 = time.perf_counter()
    accuracy = {}
    for c in candidates:
        runs = [finetune(c, data, a.steps, seed) for seed in seeds]
        accuracy[c.name] = statistics.mean(runs)
        print(f"fine-tuned {c.name}: test {', '.join(f'{x:.2f}' for x in runs)}%", flush=True)
    tune_seconds = time.perf_counter() - t0

    print("\n| score | " + " | ".join(c.name for c in candidates) + " | Kendall tau | p |")
    print("|---" * (len(candidates) + 3) + "|")
    taus = {}
    names = [c.name for c in candidates]
    print("| test accuracy % | " + " | ".join(f"{accuracy[n]:.2f}" for n in names) + " | | |")
    for s in ranked.scores:
        values = {r["name"]: r["scores"][s] for r in ranked.rows}
        tau, pvalue = kendalltau([values[n] for n in names], [accuracy[n] for n in names])
        taus[s] = {"tau": float(tau), "p": float(pvalue)}
        cells = " | ".join(f"{values[n]:.4f}" for n in names)
        print(f"| {ranking.SCORE_TITLES[s]} | {cells} | {tau:.2f} | {pvalue:.3f} |")
    print(
        f"\nranking {rank_seconds:.0f} s vs fine-tuning all {len(candidates)} candidates "
        f"x {len(seeds)} seed(s) {tune_seconds:.0f} s ({tune_seconds / rank_seconds:.1f}x)"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "ranking": ranked.to_dict(),
                    "accuracy": accuracy,
                    "tau": taus,
                    "seconds": {"rank": rank_seconds, "finetune": tune_seconds},
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
