"""The detailed metrics of a scored split, from its per-example predictions.

The training loop ranks checkpoints by what :func:`jaxtl.train.losses.summarize` reports
(loss, accuracy, perplexity), summed on the device. A finished run's test split, and ``jaxtl
evaluate``, add what a reader of the results wants, computed on the host from one row per
example (:func:`jaxtl.train.losses.prediction_rows`):

- classification: macro-F1, per-class precision / recall / F1 / support, the confusion matrix
  (scikit-learn), and calibration: the expected calibration error of the top-label confidence
  over equal-width bins, with the bins a reliability diagram draws;
- regression: MSE, MAE, R² (scikit-learn), Pearson and Spearman correlations (SciPy).

A causal LM's perplexity and token accuracy come from the sums already.

Example:
  >>> import numpy as np
  >>> rows = {"pred": np.array([0, 1, 1, 0]), "label": np.array([0, 1, 0, 0]),
  ...         "confidence": np.array([0.9, 0.8, 0.6, 0.7])}
  >>> m = classification(rows, num_labels=2)
  >>> round(m["macro_f1"], 4), m["confusion_matrix"]
  (0.7333, [[2, 1], [0, 1]])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "CALIBRATION_BINS",
    "MAX_CONFUSION_CLASSES",
    "calibration",
    "classification",
    "detailed",
    "regression",
]

# Equal-width confidence bins of the ECE: 15, as in Guo et al. (2017) and torchmetrics.
CALIBRATION_BINS = 15
# A confusion matrix is kept (results.json, confusion.png) for at most this many classes.
MAX_CONFUSION_CLASSES = 100


def detailed(
    task: str, rows: dict, num_labels: int, label_names: Sequence[str] | None = None
) -> dict:
    """The detailed metrics of ``task`` from ``rows`` (padding rows already dropped); ``{}``
    for a causal LM, and for classification rows without class-id labels (a custom loss on
    other targets: its own numbers say more than these would)."""
    if task == "classification":
        labels = np.asarray(rows.get("label", []))
        if num_labels < 2 or not np.issubdtype(labels.dtype, np.integer):
            return {}
        return classification(rows, num_labels, label_names)
    if task == "regression":
        return regression(rows)
    return {}


def classification(rows: dict, num_labels: int, label_names: Sequence[str] | None = None) -> dict:
    """Macro-F1, per-class precision/recall/F1/support, the confusion matrix and calibration.

    ``rows``: ``pred`` (argmax class), ``label`` and ``confidence`` (the predicted class's
    probability), one per example. Macro-F1 averages over the classes present in the labels
    or the predictions (scikit-learn's default); the per-class table lists every class.
    """
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    pred, label = np.asarray(rows["pred"]), np.asarray(rows["label"])
    named = label_names is not None and len(label_names) == num_labels
    names = [str(n) for n in label_names] if named else [str(i) for i in range(num_labels)]
    classes = list(range(num_labels))
    precision, recall, f1, support = precision_recall_fscore_support(
        label, pred, labels=classes, zero_division=0.0
    )
    out = {
        "macro_f1": float(f1_score(label, pred, average="macro", zero_division=0.0)),
        "per_class": {
            names[c]: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c in classes
        },
        "calibration": calibration(rows["confidence"], pred == label),
    }
    if num_labels <= MAX_CONFUSION_CLASSES:  # rows: true class, columns: predicted class
        out["confusion_matrix"] = confusion_matrix(label, pred, labels=classes).tolist()
    return out


def calibration(confidence, correct, bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error of top-label confidences, and its reliability bins.

    ECE = sum over bins of (examples in the bin / all) x |accuracy - mean confidence|, with
    ``bins`` equal-width bins ``[low, high)`` over [0, 1] and one more for a confidence of
    exactly 1 (a float32 softmax rounds to 1 once the top logit leads by ~17), as torchmetrics'
    ``MulticlassCalibrationError`` bins them. No library here has it (scikit-learn's
    ``calibration_curve`` is for one class's probability); the test checks it against
    torchmetrics.
    """
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins)
    edges = np.append(edges, 1.0)  # the last bin: [1, 1]
    table, ece = [], 0.0
    for b in range(bins + 1):
        inside = which == b
        n = int(inside.sum())
        if n == 0:
            continue
        conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
        ece += n / len(confidence) * abs(acc - conf)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                      "confidence": conf, "accuracy": acc})  # fmt: skip
    return {"ece": float(ece), "bins": table}


def regression(rows: dict) -> dict:
    """MSE, MAE and R² (scikit-learn), Pearson and Spearman correlations (SciPy; ``None``
    when the predictions or the targets are constant, where they are undefined)."""
    from scipy import stats
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    pred = np.asarray(rows["pred"], np.float64)
    target = np.asarray(rows["target"], np.float64)
    out = {
        "mse": float(mean_squared_error(target, pred)),
        "mae": float(mean_absolute_error(target, pred)),
        "r2": float(r2_score(target, pred)) if len(target) > 1 else None,
    }
    defined = len(target) > 1 and np.ptp(pred) > 0 and np.ptp(target) > 0
    out["pearson"] = float(stats.pearsonr(pred, target)[0]) if defined else None
    out["spearman"] = float(stats.spearmanr(pred, target)[0]) if defined else None
    return out
