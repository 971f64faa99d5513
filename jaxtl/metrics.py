"""The detailed metrics of a scored split, from its per-example predictions.

The training loop ranks checkpoints by what :func:`jaxtl.train.losses.summarize` reports
(loss, accuracy, perplexity), summed on the device. A finished run's test split, and ``jaxtl
evaluate``, add what a reader of the results wants, computed on the host from one row per
example (:func:`jaxtl.train.losses.prediction_rows`):

- classification: macro-F1, per-class precision / recall / F1 / support, the confusion matrix
  (scikit-learn), and calibration: the expected calibration error of the top-label confidence
  over equal-width bins, with the bins a reliability diagram draws;
- regression: MSE, MAE, R² (scikit-learn), Pearson and Spearman correlations (SciPy);
- token classification: entity-level precision / recall / F1 per entity type and overall
  (``seqeval``, CoNLL's scoring) over one tag per word, and the per-word tag accuracy;
- question answering: SQuAD's exact match and token F1 of the predicted answer text;
- segmentation: per-class intersection over union and its mean (mIoU), pixel accuracy.

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
    "question_answering",
    "regression",
    "segmentation",
    "squad_f1",
    "token_classification",
]

# Equal-width confidence bins of the ECE: 15, as in Guo et al. (2017) and torchmetrics.
CALIBRATION_BINS = 15
# A confusion matrix is kept (results.json, confusion.png) for at most this many classes.
MAX_CONFUSION_CLASSES = 100


def detailed(
    task: str,
    rows: dict,
    num_labels: int,
    label_names: Sequence[str] | None = None,
    references: Sequence[tuple[str, str]] | None = None,
) -> dict:
    """The detailed metrics of ``task`` from ``rows`` (padding rows already dropped); ``{}``
    for a causal LM, and for classification rows without class-id labels (a custom loss on
    other targets: its own numbers say more than these would). ``references``: question
    answering's ``(context, answer text)`` per row (without them, only the token spans)."""
    if task == "token_classification":
        return token_classification(rows, num_labels, label_names)
    if task == "question_answering":
        return question_answering(rows, references)
    if task == "segmentation":
        return segmentation(rows, num_labels, label_names)
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
    names = _names(label_names, num_labels)
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


def token_classification(
    rows: dict, num_labels: int, label_names: Sequence[str] | None = None
) -> dict:
    """Entity-level scores of tag predictions (IOB2 tags named by ``label_names``): micro
    precision, recall and F1 over entities, and per entity type, as ``seqeval`` (CoNLL's
    ``conlleval`` rules) computes them; and ``word_accuracy``, the share of words tagged right.

    ``rows``: ``pred`` and ``label`` ``[N, T]`` per token; positions labelled -100 (later pieces
    of a word, special tokens, padding) are dropped, leaving one tag per word.
    """
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    names = _names(label_names, num_labels)
    pred, label = np.asarray(rows["pred"]), np.asarray(rows["label"])
    y_true, y_pred = [], []
    for p, t in zip(pred, label, strict=True):
        words = t != -100
        y_true.append([names[i] for i in t[words]])
        y_pred.append([names[i] for i in p[words]])
    if not any(y_true):
        return {}
    flat = label[label != -100]
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    kinds = sorted({n[2:] for n in names if n[:2] in ("B-", "I-")})
    return {
        "entity_f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "entity_precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "entity_recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "per_entity": {
            k: {
                "precision": float(report[k]["precision"]),
                "recall": float(report[k]["recall"]),
                "f1": float(report[k]["f1-score"]),
                "support": int(report[k]["support"]),
            }
            for k in kinds
            if k in report
        },
        "word_accuracy": float(np.mean(pred[label != -100] == flat)),
    }


def _normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles (a, an, the),
    single spaces."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, truth: str) -> float:
    """SQuAD's token F1 of one predicted answer against one true answer (normalized, bags of
    whitespace tokens)."""
    from collections import Counter

    pred, true = _normalize_answer(prediction).split(), _normalize_answer(truth).split()
    if not pred or not true:
        return float(pred == true)
    common = sum((Counter(pred) & Counter(true)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(true)
    return 2 * precision * recall / (precision + recall)


def question_answering(rows: dict, references: Sequence[tuple[str, str]] | None) -> dict:
    """SQuAD's exact match and F1 (as percentages, as the SQuAD script reports them) of each
    row's predicted answer text, ``context[char_start:char_end]``, against the true answer
    (``references``: ``(context, answer)`` per row), and ``span_accuracy``: the share of rows
    whose predicted first and last tokens are the labelled ones."""
    label = np.asarray(rows["label"])
    span = (np.asarray(rows["pred_start"]) == label[:, 0]) & (
        np.asarray(rows["pred_end"]) == label[:, 1]
    )
    out = {"span_accuracy": float(span.mean())}
    if references is None or "char_start" not in rows:
        return out
    if len(references) != len(label):
        raise ValueError(f"{len(references)} references for {len(label)} scored examples.")
    predictions = [
        context[int(a) : int(b)] if a >= 0 else ""
        for (context, _), a, b in zip(references, rows["char_start"], rows["char_end"], strict=True)
    ]
    exact = [
        _normalize_answer(p) == _normalize_answer(t)
        for p, (_, t) in zip(predictions, references, strict=True)
    ]
    f1 = [squad_f1(p, t) for p, (_, t) in zip(predictions, references, strict=True)]
    out.update(exact_match=100.0 * float(np.mean(exact)), f1=100.0 * float(np.mean(f1)))
    out["examples_shown"] = [
        {"context": c, "answer": t, "predicted": p}
        for (c, t), p in list(zip(references, predictions, strict=True))[:5]
    ]
    return out


def segmentation(rows: dict, num_labels: int, label_names: Sequence[str] | None = None) -> dict:
    """Intersection over union per class (``TP / (TP + FP + FN)`` over every labelled pixel of
    the split), their mean over the classes present in the labels or the predictions
    (``mean_iou``; an absent class is ``None``), and ``pixel_accuracy``. ``rows``: ``pred`` and
    ``label`` ``[N, H, W]``; pixels labelled -100 are not scored."""
    pred, label = np.asarray(rows["pred"]).ravel(), np.asarray(rows["label"]).ravel()
    scored = label != -100
    pred, label = pred[scored], label[scored]
    matrix = np.bincount(label * num_labels + pred, minlength=num_labels**2).reshape(
        num_labels, num_labels
    )
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    names = _names(label_names, num_labels)
    return {
        "mean_iou": float(np.nanmean(iou)) if np.any(union > 0) else 0.0,
        "per_class_iou": {
            names[c]: None if np.isnan(iou[c]) else float(iou[c]) for c in range(num_labels)
        },
        "pixel_accuracy": float(tp.sum() / max(len(label), 1)),
    }


def _names(label_names: Sequence[str] | None, num_labels: int) -> list[str]:
    named = label_names is not None and len(label_names) == num_labels
    return [str(n) for n in label_names] if named else [str(i) for i in range(num_labels)]
