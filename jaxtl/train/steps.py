"""Pure train/eval steps, and the two ways to compile them: jit on a mesh, or legacy pmap.

``train_step(state, batch) -> (state, metrics)`` is compiled once with the state donated and
explicit shardings: the batch split over ``data`` x ``fsdp``, params and optimizer state placed
by :mod:`jaxtl.sharding` (replicated on the default all-``data`` mesh). XLA removes the
gradient work of frozen leaves that only feed ``optax.set_to_zero`` (see DESIGN.md), so a
frozen backbone costs only its forward pass.

Gradient accumulation (``grad_accum=K``) is inside the one step: the global batch is cut into K
strided microbatches (rows ``i, i + K, i + 2K, ...``, so each device's rows stay on it), a
``lax.scan`` sums their loss sums and gradients, and one optimizer update divides by the whole
batch's count: the step of the K-times larger batch, not K steps. Dropout masks are drawn per
microbatch (``fold_in(step key, i)``). BatchNorm normalizes each microbatch with its own
statistics (as a K-times smaller batch would) and the running averages take one update from
the mean of the microbatches' statistics.

What a step scores (the loss of each task and the metric sums) is :mod:`jaxtl.train.losses`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtl import parallel, sharding
from jaxtl.train import heap
from jaxtl.train.losses import mean_loss, metric_sums, prediction_rows, train_metrics
from jaxtl.train.state import TrainState

PMAP_AXIS = "batch"


def _loss_and_grads(state: TrainState, batch: dict) -> tuple[jax.Array, Any, Any, Any]:
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        outputs, batch_stats = state.apply_fn(
            params, state.batch_stats, batch, train=True, rng=rng, bn_train=state.bn_train
        )
        loss = mean_loss(outputs, batch, state.task, state.loss)
        return loss, (outputs, batch_stats)

    (loss, (outputs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, grads, outputs, batch_stats


def _apply_grads(
    state: TrainState, grads: Any, batch_stats: Any, loss: jax.Array
) -> tuple[TrainState, jax.Array]:
    """The optimizer update, or none when the step is not finite: ``(state, skipped)``.

    A NaN/inf loss or trainable gradient leaves params, optimizer state and BatchNorm
    statistics as they were, bit for bit; the step counter still advances (the batch was
    used), and ``skipped`` (1, else 0) tells the loop, which stops the run after
    ``max_bad_steps`` in a row (:class:`jaxtl.train.faults.BadSteps`).
    """
    ok = _finite(loss, grads, state.trainable)

    def update(state: TrainState) -> TrainState:
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        return state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            batch_stats=batch_stats,
        )

    # lax.cond rather than a select per leaf: the update runs in place as before, where
    # selecting between old and new moments doubled the step's temporaries (MiniLM full:
    # 181 -> 361 MB in XLA's memory analysis) and took ~2x as long on an update-bound batch.
    state = jax.lax.cond(ok, update, lambda s: s.replace(step=s.step + 1), state)
    return state, 1 - ok.astype(jnp.int32)


def _finite(loss: jax.Array, grads: Any, trainable: tuple[bool, ...] | None) -> jax.Array:
    """Whether the loss and the trainable gradients are all finite. Only trainable leaves are
    read: a frozen leaf's gradient is never computed (XLA drops it), and reading it here would
    bring the backward pass through the frozen backbone back."""
    leaves = jax.tree.leaves(grads)
    if trainable is not None:
        leaves = [g for g, t in zip(leaves, trainable, strict=True) if t]
    return jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(leaves))


def train_step(
    state: TrainState,
    batch: dict,
    grad_accum: int = 1,
    micro_sharding: Any = None,
    param_shardings: Any = None,
) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch (mean loss over its rows), its gradient summed over
    ``grad_accum`` microbatches (see the module docstring).

    ``micro_sharding``: where the ``[grad_accum, B / grad_accum, ...]`` microbatch stack lives
    (batch axes on dim 1). ``param_shardings``: where the params live; the gradients are
    placed the same way, so under FSDP each device reduces and keeps only its shard of every
    gradient and updates only its shard of the params and moments (left to itself, XLA may
    all-reduce whole gradients and run the optimizer on whole params: 3x the temporaries).
    """
    if grad_accum > 1:
        return _accumulated_step(state, batch, grad_accum, micro_sharding, param_shardings)
    loss, grads, outputs, batch_stats = _loss_and_grads(state, batch)
    grads = _placed(grads, param_shardings)
    state, skipped = _apply_grads(state, grads, batch_stats, loss)
    return state, {**train_metrics(loss, outputs, batch, state.task), "skipped": skipped}


def _placed(tree: Any, shardings: Any) -> Any:
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def _microbatches(batch: dict, k: int, placed: Any) -> dict:
    """``[B, ...]`` -> ``[k, B / k, ...]``, microbatch ``i`` holding rows ``i, i + k, ...``."""

    def cut(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return x if placed is None else jax.lax.with_sharding_constraint(x, placed)

    return jax.tree.map(cut, batch)


def _accumulated_step(state: TrainState, batch: dict, k: int, placed: Any, param_shardings: Any):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_sum(params, micro, i):
        outputs, stats = state.apply_fn(
            params,
            state.batch_stats,
            micro,
            train=True,
            rng=jax.random.fold_in(rng, i),
            bn_train=state.bn_train,
        )
        sums = metric_sums(outputs, micro, state.task, state.loss)
        return sums["loss_sum"], (sums, stats)

    def body(carry, xs):
        grads, stats, totals = carry
        i, micro = xs
        (_, (sums, new_stats)), g = jax.value_and_grad(loss_sum, has_aux=True)(
            state.params, micro, i
        )
        add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
        # Changes, not values: a layer that does not train (change 0) keeps its statistics
        # bit for bit.
        change = jax.tree.map(jnp.subtract, new_stats, state.batch_stats)
        grads = _placed(add(grads, _placed(g, param_shardings)), param_shardings)
        return (grads, add(stats, change), add(totals, sums)), None

    micro = _microbatches(batch, k, placed)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(loss_sum, state.params, first, 0)[1]
    zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)  # noqa: E731
    init = (_placed(zeros(state.params), param_shardings), zeros(shapes[1]), zeros(shapes[0]))
    (grads, stats, totals), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
    count = jnp.maximum(totals["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    batch_stats = jax.tree.map(lambda old, d: old + d / k, state.batch_stats, stats)
    metrics = {"loss": totals["loss_sum"] / count}
    if "aux_sum" in totals:
        metrics["aux_loss"] = totals["aux_sum"] / count
    if "correct" in totals:
        metrics["accuracy"] = totals["correct"] / count
    state, metrics["skipped"] = _apply_grads(state, grads, batch_stats, metrics["loss"])
    return state, metrics


def eval_step(state: TrainState, batch: dict) -> dict:
    """Weighted metric sums of one batch; padding rows have ``weight == 0``."""
    return _scores(
        state.params,
        state.batch_stats,
        batch,
        apply_fn=state.apply_fn,
        task=state.task,
        loss=state.loss,
    )


def state_shardings(state: TrainState, mesh: Mesh, specs: Any = None) -> TrainState:
    """Where each leaf of ``state`` lives: ``specs`` (from
    :func:`jaxtl.sharding.train_state_specs`) on ``mesh``; default the default rules."""
    if specs is None:
        specs = sharding.train_state_specs(state, mesh)
    return parallel.shardings(specs, mesh)


def compile_steps(state: TrainState, mesh: Mesh, specs: Any = None, *, grad_accum: int = 1):
    """``(train_step, eval_step)`` jitted over ``mesh``, the state donated to the train step.

    Args:
      state: a state placed with :func:`place_state` (same ``specs``).
      mesh: the device mesh.
      specs: the state's ``PartitionSpec`` tree (:func:`jaxtl.sharding.train_state_specs`);
        default: the default rules.
      grad_accum: microbatches per step.

    Returns functions that take a state already placed with :func:`place_state` and a batch of
    global arrays from :func:`jaxtl.parallel.global_batch`.
    """
    heap.install()  # the compiler's freed memory goes back to the OS before the step runs
    state_sh = state_shardings(state, mesh, specs)
    batch_sh = parallel.batch_sharding(mesh)
    rep = parallel.replicated(mesh)
    micro_sh = NamedSharding(mesh, PartitionSpec(None, *batch_sh.spec))
    step = functools.partial(
        train_step, grad_accum=grad_accum, micro_sharding=micro_sh, param_shardings=state_sh.params
    )
    train = jax.jit(
        _under(mesh, step),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )
    # Evaluation reads params and BatchNorm statistics only: handing it the optimizer state too
    # cost ~4 ms of dispatch per call (2x params' leaves), more than a 4-example forward pass.
    scored = jax.jit(
        _under(
            mesh,
            functools.partial(
                _scores, apply_fn=state.apply_fn, task=state.task, loss=state.loss, rows=True
            ),
        ),
        in_shardings=(state_sh.params, state_sh.batch_stats, batch_sh),
        out_shardings=rep,
    )

    def evaluate(state: TrainState, batch: dict, rows: bool = False):
        """The batch's metric sums; with ``rows``, ``(sums, per-example rows)``
        (:func:`jaxtl.train.losses.prediction_rows`): one compiled program either way."""
        sums, per_example = scored(state.params, state.batch_stats, batch)
        return (sums, per_example) if rows else sums

    return train, evaluate


def _under(mesh: Mesh, fn):
    """``fn`` traced with ``mesh`` as the context mesh, so that the models' activation
    constraints (:func:`jaxtl.models.layers.shard_batch`) know the batch axes."""

    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def _scores(params, batch_stats, batch, *, apply_fn, task, loss=None, rows=False):
    """:func:`eval_step` on the parts of the state it reads; with ``rows``, also the
    per-example rows of the detailed metrics."""
    outputs, _ = apply_fn(params, batch_stats, batch, train=False)
    sums = metric_sums(outputs, batch, task, loss)
    return (sums, prediction_rows(outputs, batch, task)) if rows else sums


def place_state(state: TrainState, mesh: Mesh, specs: Any = None) -> TrainState:
    """Put every leaf of ``state`` where :func:`compile_steps` expects it (same ``specs``).

    Always copies (:func:`jaxtl.parallel.copy_to`): the train step donates the state, and a
    leaf that aliased the caller's arrays (e.g. ``model.params``) would be deleted under the
    caller.
    """
    return parallel.copy_to(state, state_shardings(state, mesh, specs))


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
    # The mean loss over devices: non-finite on one device, non-finite on all, so every
    # replica skips (or applies) the same update.
    state, metrics["skipped"] = _apply_grads(state, grads, batch_stats, metrics["loss"])
    return state, metrics


def _pmap_eval_step(state: TrainState, batch: dict) -> dict:
    return jax.lax.psum(eval_step(state, batch), PMAP_AXIS)


@functools.cache
def pmap_steps():
    """``(train_step, eval_step)`` for pmap-based code: replicated state, ``[devices, B/devices]``
    batches (see :func:`jaxtl.parallel.replicate` and :func:`jaxtl.parallel.split_for_pmap`)."""
    heap.install()
    return (
        jax.pmap(_pmap_train_step, axis_name=PMAP_AXIS, donate_argnums=(0,)),
        jax.pmap(_pmap_eval_step, axis_name=PMAP_AXIS),
    )
