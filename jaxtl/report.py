"""Results a person can look at: comparison tables, training curves, and a split's confusion
matrix and reliability diagram."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line a failed write (a full disk) cut short
                continue
    return out


def plot_curves(run_dirs: Sequence[str], out_path: str, labels: Sequence[str] | None = None) -> str:
    """Train loss and validation accuracy (or loss) against epoch, one line per run."""
    plt = _pyplot()

    labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir, label in zip(run_dirs, labels, strict=True):
        recs = read_metrics(run_dir)
        train = [r for r in recs if r["split"] == "train"]
        val = [r for r in recs if r["split"] == "val"]
        if train:
            ax_loss.plot([r["epoch"] for r in train], [r["loss"] for r in train], label=label)
        key = "val_accuracy" if val and "val_accuracy" in val[0] else "val_loss"
        if val:
            ax_val.plot([r["epoch"] for r in val], [r[key] for r in val], marker="o", label=label)
            ax_val.set_ylabel(key.replace("_", " "))
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    ax_val.set(xlabel="epoch", title="Validation")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, out_path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_path: str) -> str:
    """Lays ``fig`` out, writes it as a PNG at ``out_path`` and frees it; returns the path."""
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    _pyplot().close(fig)
    return out_path


# Beyond this many classes the printed per-class table stops (results.json has them all).
_PRINTED_CLASSES = 50
# Beyond this many classes a confusion matrix is drawn without per-cell counts.
_ANNOTATED_CLASSES = 20


def plot_confusion(matrix: Sequence[Sequence[int]], names: Sequence[str], out_path: str) -> str:
    """The confusion matrix (rows: true class, columns: predicted), each row's share shaded,
    its counts written in the cells for up to 20 classes."""
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(matrix)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(names)
    side = min(4 + 0.45 * n, 16)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true")
    ax.set_xticklabels(names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticklabels(names)
    if n <= _ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                color = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color)
    ax.set_title(f"Confusion matrix ({int(counts.sum())} examples)")
    return save_figure(fig, out_path)


def plot_reliability(calibration: dict, out_path: str) -> str:
    """A reliability diagram: each confidence bin's accuracy against its mean confidence (the
    diagonal is perfect calibration), the bins' example counts below, the ECE in the title."""
    plt = _pyplot()
    bins = calibration["bins"]
    fig, (ax, ax_n) = plt.subplots(
        2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    lows = [b["low"] for b in bins]
    widths = [max(b["high"] - b["low"], 0.01) for b in bins]  # the [1, 1] bin: a sliver
    ax.bar(lows, [b["accuracy"] for b in bins], width=widths, align="edge", edgecolor="black",
           alpha=0.8, label="accuracy in the bin")  # fmt: skip
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C3",
            label="(mean confidence, accuracy)")  # fmt: skip
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"Reliability diagram (ECE {calibration['ece']:.4f})")
    ax.legend(loc="upper left")
    ax_n.bar(lows, [b["count"] for b in bins], width=widths, align="edge", edgecolor="black")
    ax_n.set(xlabel="confidence of the predicted class", ylabel="examples")
    return save_figure(fig, out_path)


def detail_plots(metrics: dict, run_dir: str, label_names: Sequence[str] | None) -> list[str]:
    """``confusion.png`` and ``reliability.png`` in ``run_dir`` from a split's detailed
    metrics (classification; nothing for other tasks); the paths written."""
    written = []
    if "confusion_matrix" in metrics:
        matrix = metrics["confusion_matrix"]
        named = label_names is not None and len(label_names) == len(matrix)
        names = [str(n) for n in label_names] if named else [str(i) for i in range(len(matrix))]
        written.append(plot_confusion(matrix, names, os.path.join(run_dir, "confusion.png")))
    if "calibration" in metrics:
        path = os.path.join(run_dir, "reliability.png")
        written.append(plot_reliability(metrics["calibration"], path))
    return written


# The summary numbers of the detailed metrics, in the order the detail table prints them.
DETAIL_KEYS = (
    "macro_f1",
    "mse",
    "mae",
    "r2",
    "pearson",
    "spearman",
    "entity_f1",
    "entity_precision",
    "entity_recall",
    "word_accuracy",
    "exact_match",
    "f1",
    "span_accuracy",
    "mean_iou",
    "pixel_accuracy",
)
# A task's own test score, beside the headline metric in the comparison table.
TASK_METRICS = ("entity_f1", "f1", "mean_iou")


def detail_table(metrics: dict) -> str:
    """The detailed metrics of a split as text: the summary numbers, then per class."""
    lines = [f"{k}: {metrics[k]:.4f}" for k in DETAIL_KEYS if metrics.get(k) is not None]
    if "calibration" in metrics:
        lines.append(f"ece: {metrics['calibration']['ece']:.4f}")
    if "per_class_iou" in metrics:
        ious = list(metrics["per_class_iou"].items())[:_PRINTED_CLASSES]
        rows = [[name, "" if iou is None else f"{iou:.4f}"] for name, iou in ious]
        lines.append(format_table(["class", "IoU"], rows))
    for shown in metrics.get("examples_shown", []):
        lines.append(
            f"context {shown['context']!r}: answer {shown['answer']!r}, predicted "
            f"{shown['predicted']!r}"
        )
    table = "per_class" if "per_class" in metrics else "per_entity"
    if table in metrics:
        classes = list(metrics[table].items())
        rows = [[name, *(f"{m[k]:.4f}" for k in ("precision", "recall", "f1")), m["support"]]
                for name, m in classes[:_PRINTED_CLASSES]]  # fmt: skip
        first = "class" if table == "per_class" else "entity"
        lines.append(format_table([first, "precision", "recall", "f1", "support"], rows))
        if len(classes) > _PRINTED_CLASSES:
            lines.append(f"... and {len(classes) - _PRINTED_CLASSES} more classes in results.json")
    return "\n".join(lines)


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain monospace table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.4f}" if abs(c) < 1 else f"{c:.1f}"
    return "" if c is None else str(c)


def headline_metric(*metrics: dict) -> str:
    """The metric a table leads with: perplexity (causal LM), accuracy (classification), else
    loss (regression)."""
    return next((m for m in ("perplexity", "accuracy") if any(m in d for d in metrics)), "loss")


def comparison_rows(results: Sequence[dict], reference: dict | None = None) -> tuple[list, list]:
    """Headers and rows comparing finished arms (``results.json`` dicts)."""
    metric = headline_metric(*(r["test"] for r in results))
    headers = ["run", f"test {metric}", f"best val {metric}", "train time (s)", "steps"]
    extra = [m for m in TASK_METRICS if any(m in r["test"] for r in results)]
    headers[2:2] = [f"test {m}" for m in extra]
    if reference:
        headers.append(f"reference test {metric}")
    rows = []
    for r in results:
        best = r.get("best") or {}
        row = [
            r["name"],
            f"{100 * r['test'][metric]:.1f}%" if metric == "accuracy" else r["test"][metric],
            *(r["test"].get(m) for m in extra),
            f"{100 * best[f'val_{metric}']:.1f}%"
            if metric == "accuracy" and best
            else best.get(f"val_{metric}"),
            f"{r['train_seconds']:.0f}",
            r["steps"],
        ]
        if reference:
            ref = reference.get(r["name"])
            row.append("" if ref is None else f"{ref}")
        rows.append(row)
    return headers, rows


def seed_statistics(results: Sequence[dict]) -> dict:
    """``summary.json``'s ``seeds``: the headline metric, each arm's statistics over its seeds
    (:func:`jaxtl.seeds.aggregate`), the baseline arm (scratch when there is one, else the
    first) and every other arm's difference from it, with its seed noise."""
    from jaxtl import seeds

    metric = headline_metric(*(r["test"] for r in results))
    arms = seeds.aggregate(results, metric)
    base = next((n for n in arms if n.startswith("scratch")), next(iter(arms)))
    return {
        "metric": metric,
        "arms": arms,
        "baseline": base,
        "differences": {
            name: seeds.difference(arm, arms[base]) for name, arm in arms.items() if name != base
        },
    }


def seed_rows(results: Sequence[dict]) -> tuple[list, list]:
    """Headers and rows of a comparison over seeds: per arm the mean ± std of the headline
    metric, its 95% interval, the seeds, and the difference from the baseline, marked
    "within seed noise" when it is smaller than the noise of that difference."""
    stats = seed_statistics(results)
    metric, base = stats["metric"], stats["baseline"]
    pct = metric == "accuracy"
    show = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: f"{v:.4f}")  # noqa: E731
    headers = ["run", f"test {metric} mean ± std", "95% interval", "seeds", f"vs {base}"]
    rows = []
    for name, arm in stats["arms"].items():
        spread = "" if arm["std"] is None else f" ± {show(arm['std'])}"
        ci = "" if arm["ci95"] is None else f"{show(arm['ci95'][0])} .. {show(arm['ci95'][1])}"
        versus = ""
        if name != base:
            d = stats["differences"][name]
            amount = f"{100 * d['difference']:+.2f} pts" if pct else f"{d['difference']:+.4f}"
            note = {True: " (within seed noise)", False: "", None: " (one seed: noise unknown)"}
            versus = amount + note[d["within_noise"]]
        seeds_run = ",".join(str(s) for s in arm["seeds"])
        rows.append([name, show(arm["mean"]) + spread, ci, seeds_run, versus])
    return headers, rows


def plot_seeds(stats: dict, out_path: str) -> str:
    """Each arm's mean test metric over its seeds with its 95% interval as an error bar, and
    every seed's own value as a dot (:func:`seed_statistics`)."""
    plt = _pyplot()
    arms = stats["arms"]
    names = list(arms)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names) + 2), 4.2))
    for i, name in enumerate(names):
        arm = arms[name]
        low, high = arm["ci95"] if arm["ci95"] else (arm["mean"], arm["mean"])
        ax.bar(i, arm["mean"], color=f"C{i}", alpha=0.6)
        bar = [[arm["mean"] - low], [high - arm["mean"]]]
        ax.errorbar(i, arm["mean"], yerr=bar, fmt="none", ecolor="black", capsize=8,
                    label="95% interval" if i == 0 else None)  # fmt: skip
        ax.plot([i] * arm["n"], arm["values"], "o", color="black", markersize=4,
                label="one seed" if i == 0 else None)  # fmt: skip
    values = [v for arm in arms.values() for v in arm["values"]]
    lows = [arm["ci95"][0] for arm in arms.values() if arm["ci95"]] + values
    highs = [arm["ci95"][1] for arm in arms.values() if arm["ci95"]] + values
    pad = 0.1 * (max(highs) - min(lows) or 1.0)
    ax.set_ylim(min(lows) - pad, max(highs) + pad)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15 if len(names) > 3 else 0)
    ax.set_ylabel(f"test {stats['metric']}")
    ax.set_title("Over seeds: mean, 95% interval and each seed")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return save_figure(fig, out_path)


def tree_summary(params, depth: int = 3) -> str:
    """Param counts and shapes aggregated by the first ``depth`` path components."""
    import numpy as np

    from jaxtl.transfer.trees import flatten

    groups: dict[str, list] = {}
    for path, leaf in flatten(params).items():
        key = "/".join(path.split("/")[:depth])
        groups.setdefault(key, []).append(leaf)
    rows = []
    for key, leaves in groups.items():
        n = sum(int(np.prod(x.shape)) for x in leaves)
        dtypes = sorted({str(x.dtype) for x in leaves})
        rows.append([key, len(leaves), f"{n:,}", ",".join(dtypes)])
    return format_table(["params under", "tensors", "values", "dtype"], rows)
