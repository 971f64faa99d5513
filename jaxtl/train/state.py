"""The train state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Params, BatchNorm statistics, optimizer state, step counter and the run's base RNG key.

    ``apply_fn``, ``tx``, ``task`` and ``bn_train`` are static (not leaves): they define the
    computation, so a change recompiles, and they are not written into checkpoints.
    ``apply_fn`` is the model's ``forward(params, batch_stats, batch, *, train, rng, bn_train)``;
    ``bn_train`` lists the BatchNorm layers that normalize with batch statistics in training
    (the others, e.g. a frozen backbone's, stay in inference mode).

    Per-step randomness is ``fold_in(rng, step)``: a resumed run draws the same dropout masks
    as an uninterrupted one without carrying a mutable key.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    task: str = struct.field(pytree_node=False, default="classification")
    batch_stats: Any = struct.field(default_factory=dict)
    bn_train: tuple[str, ...] = struct.field(pytree_node=False, default=())
    # A custom ``loss(outputs, batch) -> [B]`` per-example loss; None: the task's own.
    loss: Callable[..., Any] | None = struct.field(pytree_node=False, default=None)
    # Which params train, in ``jax.tree.leaves(params)`` order: the step checks only their
    # gradients for NaN/inf. None: every param's.
    trainable: tuple[bool, ...] | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any],
        params: Any,
        tx: optax.GradientTransformation,
        seed: int = 0,
        task: str = "classification",
        batch_stats: Any = None,
        bn_train: tuple[str, ...] = (),
        loss: Callable[..., Any] | None = None,
        trainable: Any = None,
    ) -> TrainState:
        """A fresh state. ``trainable``: a tree of bools like ``params`` (a plan's
        ``trainable_mask``), or None."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(seed),
            apply_fn=apply_fn,
            tx=tx,
            task=task,
            batch_stats=batch_stats if batch_stats is not None else {},
            bn_train=tuple(bn_train),
            loss=loss,
            trainable=None if trainable is None else tuple(map(bool, jax.tree.leaves(trainable))),
        )

    def checkpoint_tree(self) -> dict[str, Any]:
        """The leaves that a checkpoint stores and a resume restores."""
        return {
            "step": self.step,
            "params": self.params,
            "batch_stats": self.batch_stats,
            "opt_state": self.opt_state,
            "rng": self.rng,
        }

    def with_checkpoint_tree(self, tree: dict[str, Any]) -> TrainState:
        return self.replace(**tree)
