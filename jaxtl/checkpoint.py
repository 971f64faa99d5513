"""Orbax checkpoints of a run: the train state plus JSON metadata (epoch, position, history).

Two managers in one run directory, because "the latest" and "the best" are different questions:
``checkpoints/latest`` keeps the last ``max_to_keep`` steps for ``resume``; ``checkpoints/best``
keeps the single best step by the validation metric, for early stopping's restore-best and for
``jaxtl evaluate``. Saves are asynchronous; :meth:`Checkpointer.close` waits for them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of ``tree``: the restore target, so leaves come back placed."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def _own_barriers(name: str) -> ocp.options.MultiprocessingOptions:
    """Barrier keys of their own for one of a run's two managers.

    In a multi-process run both managers save the same step and finish it in background
    threads, and orbax names its barriers by step (``async_write_complete.3``) and by purpose
    (``ThreadSaveMultiHostValueHolder:set_value_start``), not by manager. Two managers sharing
    names meet at the same barrier at once, which the coordination service rejects ("Barrier ...
    is already ongoing") and the run hangs or dies: seen in CI's 2-process FSDP test, and on
    every run of 40 back-to-back latest + best saves from 2 processes. A prefix per manager is
    the fix orbax documents (``MultiprocessingOptions.barrier_sync_key_prefix``).
    """
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


class Checkpointer:
    """Save and restore ``(state tree, metadata)`` pairs under ``directory``.

    Args:
      directory: e.g. ``RUN_DIR/checkpoints``.
      max_to_keep: how many recent steps ``latest`` keeps.
      best_metric: the metadata key that ranks ``best`` checkpoints (e.g. ``"val_accuracy"``);
        ``None`` disables the best manager.
      best_mode: ``"max"`` or ``"min"``.
    """

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "max",
    ):
        self.directory = os.path.abspath(directory)
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(
            os.path.join(self.directory, "latest"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                multiprocessing_options=_own_barriers("latest"),
            ),
        )
        self.best = None
        if best_metric is not None:
            if best_mode not in ("max", "min"):
                raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
            self.best = ocp.CheckpointManager(
                os.path.join(self.directory, "best"),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    best_fn=lambda m: m[best_metric],
                    best_mode=best_mode,
                    create=True,
                    multiprocessing_options=_own_barriers("best"),
                ),
            )

    @staticmethod
    def _args(tree: Any, meta: dict) -> ocp.args.Composite:
        return ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, tree: Any, meta: dict, metrics: dict | None = None) -> None:
        """Save to ``latest``; also to ``best`` when ``metrics`` holds the best metric."""
        self.latest.save(step, args=self._args(tree, meta), force=True)
        if self.best is not None and metrics and self.best_metric in metrics:
            self.best.save(step, args=self._args(tree, meta), metrics=metrics, force=True)

    def _restore(self, manager, step, like: Any) -> tuple[Any, dict]:
        return _restore(manager, step, like)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_latest(self, like: Any) -> tuple[Any, dict] | None:
        """The newest checkpoint as ``(tree shaped like ``like``, meta)``, or ``None``."""
        self.latest.wait_until_finished()
        step = self.latest.latest_step()
        return None if step is None else self._restore(self.latest, step, like)

    def best_step(self) -> int | None:
        return None if self.best is None else self.best.best_step()

    def restore_best(self, like: Any) -> tuple[Any, dict] | None:
        if self.best is None:
            return None
        self.best.wait_until_finished()
        step = self.best.best_step()
        return None if step is None else self._restore(self.best, step, like)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        if self.best is not None:
            self.best.close()


def restore_params(directory: str, like: Any, which: str = "best") -> tuple[Any, dict]:
    """Restore a state tree from a finished run's ``checkpoints/{best,latest}`` (for evaluation).
    ``like``: the tree to restore into, or a function from the checkpoint's metadata to it."""
    sub = os.path.join(os.path.abspath(directory), which)
    if not os.path.isdir(sub):
        raise FileNotFoundError(f"No {which!r} checkpoints under {directory!r}.")
    manager = ocp.CheckpointManager(sub)
    try:
        step = manager.best_step() if which == "best" else manager.latest_step()
        if step is None:
            step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"The checkpoint directory {sub!r} holds no checkpoint.")
        return _restore(manager, step, like)
    finally:
        manager.close()


def _restore(manager: ocp.CheckpointManager, step: int, like: Any) -> tuple[Any, dict]:
    """``(state tree, meta)`` of ``step``. ``like``: the tree to restore into, or a function
    from the checkpoint's metadata to it (a staged run's optimizer state depends on the stage
    the checkpoint was saved in)."""
    if callable(like):
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        like = like(meta["meta"])
    out = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(like)), meta=ocp.args.JsonRestore()
        ),
    )
    return out["state"], out["meta"]
