"""Training configuration: the knobs of :class:`jaxtl.train.Trainer`, as plain dataclasses."""

from __future__ import annotations

import dataclasses

import optax


@dataclasses.dataclass
class EarlyStopping:
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` evaluations.

    ``restore_best`` puts the best evaluation's params back at the end of training.
    """

    metric: str = "val_accuracy"
    mode: str = "max"
    patience: int = 3
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"EarlyStopping.mode must be 'max' or 'min', got {self.mode!r}.")
        if self.patience < 1:
            raise ValueError(f"EarlyStopping.patience must be >= 1, got {self.patience}.")

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.mode == "max":
            return value > best + self.min_delta
        return value < best - self.min_delta


@dataclasses.dataclass
class TrainConfig:
    """How long, how fast and how safely to train.

    Attributes:
      epochs: passes over the training split (ignored when ``max_steps`` is set).
      max_steps: total optimizer steps; the LR schedule spans exactly these.
      batch_size: global batch size (split over devices; must divide by the device count).
      eval_batch_size: global evaluation batch size (rounded up to a multiple of the devices).
      learning_rate: peak learning rate (recipes scale it per group with ``lr_mult``).
      schedule: ``"constant"``, ``"linear"`` (decay to 0, BERT's) or ``"cosine"``.
      warmup_steps: linear warmup from 0; ``warmup_ratio`` of the total when 0.
      weight_decay: AdamW decoupled weight decay on trainable matrices.
      clip_norm: clip the global norm of the trainable gradients; ``None`` disables.
      eval_every: evaluate every N steps; ``None`` evaluates at the end of every epoch.
      checkpoint_every: save every N steps besides each evaluation; ``None``: at evaluations.
      max_to_keep: recent checkpoints kept for resume.
      best_metric / best_mode: what the "best" checkpoint and restore-best rank by; ``None``:
        ``val_accuracy`` (max) for classification, ``val_loss`` (min) for regression.
      restore_best: end training with the best-evaluated params (needs a validation split).
      early_stopping: stop early on a stalled validation metric.
      seed: seeds params of new heads, dropout (``fold_in(seed key, step)``) and data order.
      log_every: steps between metric records in ``metrics.jsonl``.
      progress: show a progress bar; ``None``: only when stdout is a terminal.
      train_bn: every BatchNorm layer normalizes with batch statistics and updates its running
        averages, frozen or not. Off (the default), a BatchNorm layer trains only when the plan
        trains its scale/bias; frozen ones run in inference mode with their running statistics.
      precise_bn: before every evaluation, replace the training BatchNorm layers' running
        averages by their exact statistics over the first ``precise_bn`` examples of the training
        split under the current weights ("precise BN", Wu & Johnson 2021). Running averages lag
        weights that move fast; with a small momentum (EfficientNet's 0.01) and a short
        fine-tuning budget they stay near the pretrained values and evaluation suffers. 0: off.
      augment: per-example image augmentation of the training inputs, e.g.
        ``"random_resized_crop(0.35),hflip"`` or ``"rand_augment(2, 9),hflip"`` (see
        :mod:`jaxtl.data.augment`); ``None``: off.
      mixup: image classification: blend each training image with another,
        ``lam ~ Beta(mixup, mixup)``, and their targets alike (0.2 is common); 0: off.
      cutmix: image classification: paste a box of another training image, ``lam ~
        Beta(cutmix, cutmix)`` (1.0 is common); 0: off. With ``mixup`` also on, each batch
        uses one of the two, at even odds (timm's convention). See :mod:`jaxtl.data.mixing`.
      label_smoothing: classification: train on targets ``(1 - e) * one_hot + e / classes``; in
        ``[0, 1)``, 0: off. Training loss only: evaluation (``val_loss``) stays plain
        cross-entropy on the true labels, so it compares across runs with and without it.
      data_workers: grain worker processes that read and augment training batches (0: the
        training process itself). Batches do not depend on it.
      prefetch: batches (training and evaluation) placed on the devices ahead of the step
        that reads them, so the host's copy overlaps the running step
        (:func:`jaxtl.parallel.prefetch_to_device`); 0: each batch is placed when its step
        starts. Results do not depend on it.
      feature_cache: for a recipe with a frozen prefix (linear_probe, last_n(k)): compute the
        prefix's output once (the head's or the first trained block's input) and train from
        it (see :mod:`jaxtl.feature_cache`); ``"memory"`` or a directory for ``.npy`` files.
        ``None``: off.
      bucket_by_length: text: batch texts of similar length together and pad each batch to
        the smallest of a few lengths (8, 16, 32, ... up to the padded length) that holds it,
        so short texts do not pay for long padding and jit compiles only those shapes.
    """

    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 256
    learning_rate: float = 5e-5
    schedule: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    clip_norm: float | None = 1.0
    eval_every: int | None = None
    checkpoint_every: int | None = None
    max_to_keep: int = 2
    best_metric: str | None = None
    best_mode: str = "max"
    restore_best: bool = True
    early_stopping: EarlyStopping | None = None
    seed: int = 0
    log_every: int = 20
    progress: bool | None = None
    train_bn: bool = False
    precise_bn: int = 0
    augment: str | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    data_workers: int = 0
    prefetch: int = 2
    bucket_by_length: bool = False
    feature_cache: str | None = None

    def __post_init__(self):
        if isinstance(self.early_stopping, dict):
            self.early_stopping = EarlyStopping(**self.early_stopping)
        if self.data_workers < 0:
            raise ValueError(f"data_workers must be >= 0, got {self.data_workers}.")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 batches, got {self.prefetch}.")
        from jaxtl.data import augment, mixing

        augment.parse(self.augment)  # a bad spec fails here, before anything compiles
        mixing.check_options(self.mixup, self.cutmix, self.label_smoothing)
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(
                f"schedule must be 'constant', 'linear' or 'cosine', got {self.schedule!r}."
            )
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")

    def best(self, task: str) -> tuple[str, str]:
        """``(metric, mode)`` that ranks evaluations for this task."""
        if self.best_metric is not None:
            return self.best_metric, self.best_mode
        if task in ("regression", "causal_lm"):
            return "val_loss", "min"
        return "val_accuracy", "max"

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * steps_per_epoch

    def lr_schedule(self, total_steps: int) -> optax.Schedule:
        """Warmup (linear from 0) then constant, linear decay to 0, or cosine decay to 0."""
        warmup = self.warmup_steps or int(self.warmup_ratio * total_steps)
        warmup = min(warmup, total_steps)
        peak = self.learning_rate
        if self.schedule == "cosine":
            return optax.warmup_cosine_decay_schedule(
                0.0, peak, warmup, max(total_steps, warmup + 1)
            )
        rest = max(total_steps - warmup, 1)
        after = (
            optax.constant_schedule(peak)
            if self.schedule == "constant"
            else optax.linear_schedule(peak, 0.0, rest)
        )
        if warmup == 0:
            return after
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
