"""Results a person can look at: comparison tables and training-curve plots."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(run_dirs: Sequence[str], out_path: str, labels: Sequence[str] | None = None) -> str:
    """Train loss and validation accuracy (or loss) against epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


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
    if reference:
        headers.append(f"reference test {metric}")
    rows = []
    for r in results:
        best = r.get("best") or {}
        row = [
            r["name"],
            f"{100 * r['test'][metric]:.1f}%" if metric == "accuracy" else r["test"][metric],
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
