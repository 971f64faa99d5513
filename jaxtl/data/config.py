"""What each training step sees and how it is read: the data section of
:class:`jaxtl.TrainConfig` (``config.data``), owned by the data layer that reads it."""

from __future__ import annotations

import dataclasses

from jaxtl.data import augment, mixing

__all__ = ["DataConfig"]


@dataclasses.dataclass
class DataConfig:
    """What each step sees, and how it is read.

    Attributes:
      batch_size: global batch size (split over devices; must divide by the device count).
      eval_batch_size: the largest evaluation batch. A split smaller than it is evaluated in
        one batch of its own size (rounded up to the device count); the last partial batch is
        padded only to the next of a few sizes (see :func:`jaxtl.data.evaluation_loader`).
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
      bucket_by_length: text: batch texts of similar length together and pad each batch to
        the smallest of a few lengths (8, 16, 32, ... up to the padded length) that holds it,
        so short texts do not pay for long padding and jit compiles only those shapes.
      feature_cache: for a recipe with a frozen prefix (linear_probe, last_n(k)): compute the
        prefix's output once (the head's or the first trained block's input) and train from
        it (see :mod:`jaxtl.feature_cache`); ``"memory"`` or a directory for ``.npy`` files.
        ``None``: off.
    """

    batch_size: int = 32
    eval_batch_size: int = 256
    augment: str | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    data_workers: int = 0
    prefetch: int = 2
    bucket_by_length: bool = False
    feature_cache: str | None = None

    def __post_init__(self):
        if self.data_workers < 0:
            raise ValueError(
                f"data_workers (--data-workers) must be >= 0, got {self.data_workers}."
            )
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 batches, got {self.prefetch}.")
        augment.parse(self.augment)  # a bad spec fails here, before anything compiles
        mixing.check_options(self.mixup, self.cutmix, self.label_smoothing)
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                flag = name.replace("_", "-")
                raise ValueError(f"{name} (--{flag}) must be >= 1, got {getattr(self, name)}.")
