"""Pure train/eval steps, and the two ways to compile them: jit on a mesh, or legacy pmap.

``train_step(state, batch) -> (state, metrics)`` is compiled once with the state donated and
explicit shardings (batch split over the ``data`` axis, state replicated). XLA removes the
gradient work of frozen leaves that only feed ``optax.set_to_zero`` (see DESIGN.md), so a
frozen backbone costs only its forward pass.

Batches are dicts: the model's inputs plus ``label`` and, for evaluation, ``weight`` (1 for a
real example, 0 for padding, so a padded last batch counts every example exactly once). A
classifier's ``label`` is a class id per row (``[B]`` integers) or a probability vector per row
(``[B, C]`` floats: mixup / cutmix / label-smoothed targets from :mod:`jaxtl.data.mixing`),
scored with the matching cross-entropy; accuracy then counts the argmax of the target.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxtl import parallel
from jaxtl.train.state import TrainState

PMAP_AXIS = "batch"


def _targets(outputs: jax.Array, batch: dict, task: str):
    """``(predictions, targets, weights)``: what each loss term compares, padding weighted 0.

    Classification and regression score one prediction per row (``weight`` is 0 for the padding
    rows of a last eval batch). A causal LM scores every next token: position ``t`` predicts
    token ``t + 1``, and targets that are padding (``attention_mask == 0``) are weighted out, as
    transformers does with ``labels == -100``.
    """
    weight = batch.get("weight")
    if weight is None:
        weight = jnp.ones(outputs.shape[0], jnp.float32)
    weight = weight.astype(jnp.float32)
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
    """Cross-entropy for classification (integer or soft labels) and causal LM (per token);
    squared error for regression (``num_labels == 1``)."""
    if task == "regression":
        return jnp.square(outputs[..., 0].astype(jnp.float32) - labels.astype(jnp.float32))
    logits = outputs.astype(jnp.float32)
    if _soft(outputs, labels, task):
        return optax.softmax_cross_entropy(logits, labels.astype(jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def metric_sums(outputs: jax.Array, batch: dict, task: str) -> dict:
    """Weighted sums (not means) so that batches, devices and hosts add up exactly.

    ``count`` is the number of scored predictions: examples, or target tokens for a causal LM
    (which also reports ``examples``, its real rows).
    """
    preds, targets, weight = _targets(outputs, batch, task)
    sums = {
        "loss_sum": jnp.sum(per_example_loss(preds, targets, task) * weight),
        "count": jnp.sum(weight),
    }
    if task != "regression":
        sums["correct"] = _correct(preds, targets, weight, task)
    if task == "causal_lm":
        sums["examples"] = jnp.sum(batch.get("weight", jnp.ones(preds.shape[0], jnp.float32)))
    return sums


def _correct(preds: jax.Array, targets: jax.Array, weight: jax.Array, task: str) -> jax.Array:
    if _soft(preds, targets, task):  # a mixed target's larger part counts as the answer
        targets = jnp.argmax(targets, axis=-1)
    return jnp.sum((jnp.argmax(preds, axis=-1) == targets).astype(jnp.float32) * weight)


def mean_loss(outputs: jax.Array, batch: dict, task: str) -> jax.Array:
    """The training objective: the weighted mean of :func:`per_example_loss` over the batch
    (over its non-padding target tokens for a causal LM)."""
    preds, targets, weight = _targets(outputs, batch, task)
    total = jnp.sum(per_example_loss(preds, targets, task) * weight)
    return total / jnp.maximum(jnp.sum(weight), 1.0)


def _loss_and_grads(state: TrainState, batch: dict) -> tuple[jax.Array, Any, Any, Any]:
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        outputs, batch_stats = state.apply_fn(
            params, state.batch_stats, batch, train=True, rng=rng, bn_train=state.bn_train
        )
        loss = mean_loss(outputs, batch, state.task)
        return loss, (outputs, batch_stats)

    (loss, (outputs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, grads, outputs, batch_stats


def _apply_grads(state: TrainState, grads: Any, batch_stats: Any) -> TrainState:
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        batch_stats=batch_stats,
    )


def _train_metrics(loss, outputs, batch, task) -> dict:
    metrics = {"loss": loss}
    if task != "regression":  # the loss is already computed: only count the right answers
        preds, targets, weight = _targets(outputs, batch, task)
        correct = _correct(preds, targets, weight, task)
        metrics["accuracy"] = correct / jnp.maximum(jnp.sum(weight), 1.0)
    return metrics


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch (mean loss over its rows)."""
    loss, grads, outputs, batch_stats = _loss_and_grads(state, batch)
    return _apply_grads(state, grads, batch_stats), _train_metrics(loss, outputs, batch, state.task)


def eval_step(state: TrainState, batch: dict) -> dict:
    """Weighted metric sums of one batch; padding rows have ``weight == 0``."""
    outputs, _ = state.apply_fn(state.params, state.batch_stats, batch, train=False)
    return metric_sums(outputs, batch, state.task)


def compile_steps(state: TrainState, mesh: Mesh):
    """``(train_step, eval_step)`` jitted over ``mesh``, the state donated to the train step.

    Returns functions that take a state already placed with :func:`place_state` and a batch of
    global arrays from :func:`jaxtl.parallel.global_batch`.
    """
    state_sh = parallel.state_shardings(state, mesh)
    batch_sh = parallel.batch_sharding(mesh)
    rep = parallel.replicated(mesh)
    train = jax.jit(
        train_step,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )
    evaluate = jax.jit(eval_step, in_shardings=(state_sh, batch_sh), out_shardings=rep)
    return train, evaluate


def place_state(state: TrainState, mesh: Mesh) -> TrainState:
    """Put every leaf of ``state`` where :func:`compile_steps` expects it.

    Always copies (``may_alias=False``): the train step donates the state, and a leaf that
    aliased the caller's arrays (e.g. ``model.params``) would be deleted under the caller.
    """
    return jax.device_put(state, parallel.state_shardings(state, mesh), may_alias=False)


# --- pmap (legacy) ------------------------------------------------------------------------------


def _pmap_train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    loss, grads, outputs, batch_stats = _loss_and_grads(state, batch)
    # Each device holds an equal share, so the mean of per-device mean grads is the global mean.
    grads = jax.lax.pmean(grads, PMAP_AXIS)
    # BatchNorm under pmap normalizes each device's share on its own (like DDP without
    # SyncBatchNorm); averaging the running statistics keeps the replicas identical. The jit path
    # normalizes over the global batch and is the one to use for exact sharding invariance.
    batch_stats = jax.lax.pmean(batch_stats, PMAP_AXIS)
    metrics = jax.lax.pmean(_train_metrics(loss, outputs, batch, state.task), PMAP_AXIS)
    return _apply_grads(state, grads, batch_stats), metrics


def _pmap_eval_step(state: TrainState, batch: dict) -> dict:
    return jax.lax.psum(eval_step(state, batch), PMAP_AXIS)


@functools.cache
def pmap_steps():
    """``(train_step, eval_step)`` for pmap-based code: replicated state, ``[devices, B/devices]``
    batches (see :func:`jaxtl.parallel.replicate` and :func:`jaxtl.parallel.split_for_pmap`)."""
    return (
        jax.pmap(_pmap_train_step, axis_name=PMAP_AXIS, donate_argnums=(0,)),
        jax.pmap(_pmap_eval_step, axis_name=PMAP_AXIS),
    )
