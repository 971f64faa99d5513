"""What a step scores: the loss of each task, its metric sums, and what evaluation reports.

One copy of each, shared by the train step, the eval step and the tests: cross-entropy for
classification (class ids, or per-class probabilities from mixup / cutmix / label smoothing),
squared error for regression, and next-token cross-entropy for a causal LM (position ``t``
predicts token ``t + 1``; padded targets are weighted out, as transformers does with
``labels == -100``). The dense tasks score one class per token (``token_classification``:
``label [B, T]``) or per pixel (``segmentation``: ``label [B, H, W]``), positions labelled
:data:`IGNORE` (-100, transformers' ``ignore_index``: padding, a word's later sub-tokens)
weighted out; the loss is the mean over the labelled positions, as transformers computes it.
``question_answering`` scores an answer span (``label [B, 2]``: its first and last token):
the mean of the start and end positions' cross-entropies over the sequence, as
``...ForQuestionAnswering`` computes it (its softmax spans padded positions too, as there, so
the loss of a row depends a little on how far it is padded).

Batches are dicts: the model's inputs plus ``label`` (not for a causal LM: its targets are its
inputs) and, for evaluation, ``weight`` (1 for a real example, 0 for padding, so a padded last
batch counts every example exactly once). A question-answering batch may carry ``offsets``
``[B, T, 2]``: each token's character span in the context (``-1`` outside it), which bounds the
predicted span to the context and gives its characters (:func:`prediction_rows`).

Example:
  >>> import math, jax.numpy as jnp
  >>> logits = jnp.zeros((1, 3, 4))  # uniform over 4 tokens
  >>> loss = mean_loss(logits, {"input_ids": jnp.array([[1, 2, 3]])}, "causal_lm")
  >>> round(float(loss), 4) == round(math.log(4), 4)
  True
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "DENSE",
    "IGNORE",
    "TASKS",
    "WithAux",
    "best_spans",
    "mean_loss",
    "metric_sums",
    "per_example_loss",
    "prediction_rows",
    "reported_metrics",
    "split_aux",
    "summarize",
    "train_metrics",
]

TASKS = (
    "classification",
    "regression",
    "causal_lm",
    "token_classification",
    "question_answering",
    "segmentation",
)
# Tasks with a class per position: their labels have the outputs' shape less the class axis.
DENSE = ("token_classification", "segmentation")
IGNORE = -100  # a position no loss or metric counts (transformers' ignore_index)
# The longest answer span (tokens) question answering predicts, as transformers' QA pipeline.
MAX_ANSWER_TOKENS = 30


class WithAux(NamedTuple):
    """A training forward's outputs with a scalar term added to the objective: the train step's
    loss is the task's loss plus ``aux_loss``, reported as the ``aux_loss`` metric (domain
    adaptation's CORAL or DANN term, :mod:`jaxtl.domain`). A batch without ``label`` is trained
    on ``aux_loss`` alone (Tent's entropy). Evaluation forwards return plain outputs."""

    outputs: Any
    aux_loss: jax.Array


def split_aux(outputs: Any) -> tuple[Any, jax.Array | None]:
    """``(outputs, aux_loss)`` of a :class:`WithAux`; ``(outputs, None)`` of plain outputs."""
    if isinstance(outputs, WithAux):
        return outputs.outputs, outputs.aux_loss.astype(jnp.float32)
    return outputs, None


def _unlabeled(aux: jax.Array | None, batch: dict, task: str) -> bool:
    # A causal LM's batches never hold labels (its targets are its inputs).
    return aux is not None and task != "causal_lm" and "label" not in batch


def _targets(outputs: jax.Array, batch: dict, task: str):
    """``(predictions, targets, weights)``: what each loss term compares, padding weighted 0.

    Classification and regression score one prediction per row (``weight`` is 0 for the padding
    rows of a last eval batch). A causal LM scores every next token: position ``t`` predicts
    token ``t + 1``, and targets that are padding (``attention_mask == 0``) are weighted out.
    """
    weight = batch.get("weight")
    if weight is None:
        weight = jnp.ones(outputs.shape[0], jnp.float32)
    weight = weight.astype(jnp.float32)
    if task in DENSE:
        labels = batch["label"]
        scored = (labels != IGNORE).astype(jnp.float32)
        weight = scored * weight.reshape(weight.shape + (1,) * (labels.ndim - 1))
        return outputs, jnp.where(labels == IGNORE, 0, labels), weight
    if task == "causal_lm":
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = jnp.ones_like(ids) if mask is None else mask
        return outputs[:, :-1], ids[:, 1:], mask[:, 1:].astype(jnp.float32) * weight[:, None]
    return outputs, batch["label"], weight


def _soft(outputs: jax.Array, labels: jax.Array, task: str) -> bool:
    """Whether ``labels`` are per-class probabilities (``[B, C]``) rather than class ids."""
    return task == "classification" and labels.ndim == outputs.ndim


def per_example_loss(outputs: jax.Array, labels: jax.Array, task: str) -> jax.Array:
    """Cross-entropy for classification (integer or soft labels), causal LM and the dense
    tasks (per token or pixel), the mean of the start and end cross-entropies for question
    answering; squared error for regression (``num_labels == 1``)."""
    if task == "regression":
        return jnp.square(outputs[..., 0].astype(jnp.float32) - labels.astype(jnp.float32))
    logits = outputs.astype(jnp.float32)
    if task == "question_answering":  # [B, T, 2] over positions, against [B, 2]
        ends = optax.softmax_cross_entropy_with_integer_labels(jnp.swapaxes(logits, 1, 2), labels)
        return ends.mean(axis=-1)
    if _soft(outputs, labels, task):
        return optax.softmax_cross_entropy(logits, labels.astype(jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _correct(preds: jax.Array, targets: jax.Array, weight: jax.Array, task: str) -> jax.Array:
    if _soft(preds, targets, task):  # a mixed target's larger part counts as the answer
        targets = jnp.argmax(targets, axis=-1)
    if task == "question_answering":  # the exact span: start and end both right
        hit = jnp.all(jnp.argmax(preds, axis=1) == targets, axis=-1)
        return jnp.sum(hit.astype(jnp.float32) * weight)
    return jnp.sum((jnp.argmax(preds, axis=-1) == targets).astype(jnp.float32) * weight)


def _losses(preds, targets, batch, task, loss):
    if loss is None:
        return per_example_loss(preds, targets, task)
    values = loss(preds, batch)
    if values.shape != preds.shape[:1]:
        raise ValueError(
            f"a custom loss must return one value per example, shape {preds.shape[:1]}; it "
            f"returned shape {values.shape}."
        )
    return values.astype(jnp.float32)


def metric_sums(outputs: jax.Array, batch: dict, task: str, loss: Any = None) -> dict:
    """Weighted sums (not means) so that batches, devices and hosts add up exactly.

    ``count`` is the number of scored predictions: examples, or target tokens for a causal LM
    (which also reports ``examples``, its real rows). ``loss``: a custom
    ``loss(outputs, batch) -> [B]`` per-example loss in place of the task's (``Trainer(loss=)``).
    """
    outputs, aux = split_aux(outputs)
    if _unlabeled(aux, batch, task):  # the auxiliary term is the whole objective, per row
        rows = jnp.float32(jax.tree.leaves(outputs)[0].shape[0])
        return {"loss_sum": aux * rows, "count": rows, "aux_sum": aux * rows}
    preds, targets, weight = _targets(outputs, batch, task)
    sums = {
        "loss_sum": jnp.sum(_losses(preds, targets, batch, task, loss) * weight),
        "count": jnp.sum(weight),
    }
    if aux is not None:
        sums["aux_sum"] = aux * sums["count"]
        sums["loss_sum"] = sums["loss_sum"] + sums["aux_sum"]
    if task != "regression":
        sums["correct"] = _correct(preds, targets, weight, task)
    if task == "causal_lm" or task in DENSE:  # count is positions: the rows apart
        sums["examples"] = jnp.sum(batch.get("weight", jnp.ones(preds.shape[0], jnp.float32)))
    return sums


def prediction_rows(outputs: jax.Array, batch: dict, task: str) -> dict:
    """One row per example for the detailed metrics (:mod:`jaxtl.metrics`), with ``weight``
    (0 for padding): classification ``pred`` (the argmax class), ``confidence`` (its softmax
    probability) and ``label``; regression ``pred`` and ``target``; the dense tasks ``pred``
    and ``label`` per position (``label`` as given, :data:`IGNORE` included); question
    answering the best span (:func:`best_spans`: ``pred_start``, ``pred_end`` tokens and, with
    ``offsets`` in the batch, ``char_start`` / ``char_end`` in the context) and ``label``.
    ``{}`` for a causal LM (its sums hold perplexity and token accuracy) and for outputs of
    another shape (a custom head's)."""
    weight = batch.get("weight", jnp.ones(outputs.shape[0], jnp.float32))
    if task in DENSE:
        return {"pred": jnp.argmax(outputs, axis=-1), "label": batch["label"], "weight": weight}
    if task == "question_answering":
        return {
            **best_spans(outputs, batch.get("offsets")),
            "label": batch["label"],
            "weight": weight,
        }
    if task == "causal_lm" or outputs.ndim != 2:
        return {}
    preds, targets, weight = _targets(outputs, batch, task)
    if task == "regression":
        return {"pred": preds[:, 0].astype(jnp.float32), "target": targets, "weight": weight}
    if _soft(preds, targets, task):
        targets = jnp.argmax(targets, axis=-1)
    probs = jax.nn.softmax(preds.astype(jnp.float32), axis=-1)
    return {
        "pred": jnp.argmax(preds, axis=-1),
        "confidence": jnp.max(probs, axis=-1),
        "label": targets,
        "weight": weight,
    }


def best_spans(outputs: jax.Array, offsets: jax.Array | None = None) -> dict:
    """The highest-scoring answer span of each row of question-answering logits ``[B, T, 2]``:
    the ``(start, end)`` maximising ``start_logit + end_logit`` with ``start <= end <
    start + MAX_ANSWER_TOKENS``, both inside the context when ``offsets [B, T, 2]`` (each
    token's character span, ``-1`` outside the context) are given; then also the span's
    characters ``char_start`` (inclusive) and ``char_end`` (exclusive). As transformers'
    question-answering pipeline picks a span, in one ``[B, T, T]`` masked argmax.

    Example:
      >>> logits = jnp.array([[[0.0, 0.0], [5.0, 1.0], [0.0, 2.0], [1.0, 9.0]]])
      >>> spans = best_spans(logits)
      >>> int(spans["pred_start"][0]), int(spans["pred_end"][0])
      (1, 3)
    """
    logits = outputs.astype(jnp.float32)
    b, t = logits.shape[:2]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    allowed = jnp.broadcast_to((j >= i) & (j < i + MAX_ANSWER_TOKENS), (b, t, t))
    if offsets is not None:
        inside = offsets[..., 0] >= 0
        allowed = allowed & inside[:, :, None] & inside[:, None, :]
    scores = logits[:, :, None, 0] + logits[:, None, :, 1]
    best = jnp.argmax(jnp.where(allowed, scores, -jnp.inf).reshape(b, t * t), axis=-1)
    start, end = best // t, best % t
    out = {"pred_start": start, "pred_end": end}
    if offsets is not None:
        rows = jnp.arange(b)
        out["char_start"] = offsets[rows, start, 0]
        out["char_end"] = offsets[rows, end, 1]
    return out


def mean_loss(outputs: jax.Array, batch: dict, task: str, loss: Any = None) -> jax.Array:
    """The training objective: the weighted mean of :func:`per_example_loss` (or of a custom
    ``loss(outputs, batch) -> [B]``) over the batch (over its non-padding target tokens for a
    causal LM), plus the auxiliary term of :class:`WithAux` outputs."""
    outputs, aux = split_aux(outputs)
    if _unlabeled(aux, batch, task):
        return aux
    preds, targets, weight = _targets(outputs, batch, task)
    total = jnp.sum(_losses(preds, targets, batch, task, loss) * weight)
    mean = total / jnp.maximum(jnp.sum(weight), 1.0)
    return mean if aux is None else mean + aux


def train_metrics(loss: jax.Array, outputs: jax.Array, batch: dict, task: str) -> dict:
    """A train step's metrics: its loss, (not for regression) its accuracy, and the auxiliary
    term of :class:`WithAux` outputs (``aux_loss``)."""
    outputs, aux = split_aux(outputs)
    metrics = {"loss": loss}
    if aux is not None:
        metrics["aux_loss"] = aux
    # The loss is already computed: only count the right answers.
    if task != "regression" and not _unlabeled(aux, batch, task):
        preds, targets, weight = _targets(outputs, batch, task)
        correct = _correct(preds, targets, weight, task)
        metrics["accuracy"] = correct / jnp.maximum(jnp.sum(weight), 1.0)
    return metrics


# What a dense task's ``count`` counts, as :func:`summarize` reports it.
_UNITS = {"causal_lm": "tokens", "token_classification": "tokens", "segmentation": "pixels"}


def summarize(sums: dict, task: str | None = None) -> dict:
    """Metric sums (from :func:`metric_sums`, added over batches) -> the reported means
    (:func:`reported_metrics` names them). Sums with ``examples`` and no ``task`` are a causal
    LM's."""
    count = float(sums["count"])
    loss = float(sums["loss_sum"]) / count
    out = {"loss": loss, "examples": int(round(float(sums.get("examples", count))))}
    if "correct" in sums:
        out["accuracy"] = float(sums["correct"]) / count
    if "examples" in sums:  # positions scored: tokens or pixels
        task = task or "causal_lm"
        out[_UNITS[task]] = int(round(count))
        if task == "causal_lm":
            out["perplexity"] = math.exp(min(loss, 700.0))
    return out


def reported_metrics(task: str) -> tuple[str, ...]:
    """The names :func:`summarize` reports for ``task``, as a validation record has them
    (``val_`` prefixed): what early stopping and the best checkpoint can rank by.

    Example:
      >>> reported_metrics("regression")
      ('val_loss', 'val_examples')
    """
    names = {
        "classification": ("loss", "accuracy", "examples"),
        "regression": ("loss", "examples"),
        "causal_lm": ("loss", "accuracy", "perplexity", "tokens", "examples"),
        "token_classification": ("loss", "accuracy", "tokens", "examples"),
        "question_answering": ("loss", "accuracy", "examples"),
        "segmentation": ("loss", "accuracy", "pixels", "examples"),
    }
    if task not in names:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    return tuple(f"val_{n}" for n in names[task])
