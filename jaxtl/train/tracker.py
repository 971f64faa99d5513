"""Which evaluation is the best, and when to stop: one improvement rule per run.

:class:`Tracker` keeps the validation history of a fit, the best record by the run's metric
(:meth:`jaxtl.train.CheckpointConfig.monitor`: ``val_accuracy`` for classification, ``val_loss``
for regression and causal LM, unless the user names one) and early stopping's count of
evaluations without improvement. The best checkpoint, restore-best and early stopping all ask
it, so they never disagree about what "better" means. Its state travels in every checkpoint's
metadata, so a resumed run keeps its best record and its patience.
"""

from __future__ import annotations

from typing import Any

from jaxtl.train.config import EarlyStopping

__all__ = ["Tracker"]


class Tracker:
    """The history of evaluations, the best of them, and early stopping's patience.

    Args:
      metric: the validation metric that ranks evaluations, e.g. ``"val_accuracy"``.
      mode: ``"max"`` or ``"min"``.
      early_stopping: stop after ``patience`` evaluations without an improvement of more than
        ``min_delta``; ``None``: never stop early.

    Example:
      >>> t = Tracker("val_loss", "min", EarlyStopping(patience=2))
      >>> [t.record({"step": s, "val_loss": v}) for s, v in [(1, 0.9), (2, 0.7), (3, 0.8)]]
      [True, True, False]
      >>> t.best["step"], t.stopped, t.record({"step": 4, "val_loss": 0.7}), t.stopped
      (2, False, False, True)
    """

    def __init__(self, metric: str, mode: str, early_stopping: EarlyStopping | None = None):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.metric, self.mode, self.early_stopping = metric, mode, early_stopping
        self.history: list[dict] = []
        self.best: dict | None = None
        self.bad_evals = 0
        self.stopped = False

    def better(self, value: float, than: float | None, min_delta: float = 0.0) -> bool:
        """Whether ``value`` improves on ``than`` (None: nothing to beat) by more than
        ``min_delta``. Strict: among equal scores the earliest stays best."""
        if than is None:
            return True
        if self.mode == "max":
            return value > than + min_delta
        return value < than - min_delta

    def record(self, rec: dict[str, Any]) -> bool:
        """Adds an evaluation record (``{"step": ..., metric: ...}``); returns whether it is the
        new best."""
        value = rec[self.metric]
        best = None if self.best is None else self.best[self.metric]
        self.history.append(rec)
        es = self.early_stopping
        if es is not None:
            self.bad_evals = 0 if self.better(value, best, es.min_delta) else self.bad_evals + 1
            self.stopped = self.bad_evals >= es.patience
        improved = self.better(value, best)
        if improved:
            self.best = rec
        return improved

    def state(self) -> dict[str, Any]:
        """What a checkpoint's metadata records, so that a resumed run carries on."""
        return {"history": self.history, "best": self.best, "bad_evals": self.bad_evals}

    def restore(self, meta: dict[str, Any]) -> None:
        """The inverse of :meth:`state`."""
        self.history, self.best = list(meta["history"]), meta["best"]
        self.bad_evals = meta["bad_evals"]
        es = self.early_stopping
        self.stopped = es is not None and self.bad_evals >= es.patience
