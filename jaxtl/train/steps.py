"""Pure train/eval steps, and the two ways to compile them: jit on a mesh, or legacy pmap.

``train_step(state, batch) -> (state, metrics)`` is compiled once with the state donated and
explicit shardings (batch split over the ``data`` axis, state replicated). XLA removes the
gradient work of frozen leaves that only feed ``optax.set_to_zero`` (see DESIGN.md), so a
frozen backbone costs only its forward pass.

What a step scores (the loss of each task and the metric sums) is :mod:`jaxtl.train.losses`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from jaxtl import parallel
from jaxtl.train.losses import mean_loss, metric_sums, train_metrics
from jaxtl.train.state import TrainState

PMAP_AXIS = "batch"


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


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch (mean loss over its rows)."""
    loss, grads, outputs, batch_stats = _loss_and_grads(state, batch)
    return _apply_grads(state, grads, batch_stats), train_metrics(loss, outputs, batch, state.task)


def eval_step(state: TrainState, batch: dict) -> dict:
    """Weighted metric sums of one batch; padding rows have ``weight == 0``."""
    return _scores(state.params, state.batch_stats, batch, apply_fn=state.apply_fn, task=state.task)


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
    # Evaluation reads params and BatchNorm statistics only: handing it the optimizer state too
    # cost ~4 ms of dispatch per call (2x params' leaves), more than a 4-example forward pass.
    scored = jax.jit(
        functools.partial(_scores, apply_fn=state.apply_fn, task=state.task),
        in_shardings=(state_sh.params, state_sh.batch_stats, batch_sh),
        out_shardings=rep,
    )

    def evaluate(state: TrainState, batch: dict) -> dict:
        return scored(state.params, state.batch_stats, batch)

    return train, evaluate


def _scores(params, batch_stats, batch, *, apply_fn, task) -> dict:
    """:func:`eval_step` on the parts of the state it reads."""
    outputs, _ = apply_fn(params, batch_stats, batch, train=False)
    return metric_sums(outputs, batch, task)


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
    metrics = jax.lax.pmean(train_metrics(loss, outputs, batch, state.task), PMAP_AXIS)
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
