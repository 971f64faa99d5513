"""Mixup and CutMix with label smoothing: batch-level augmentation that produces soft labels.

Mixup (Zhang et al. 2018) blends two images, ``lam * a + (1 - lam) * b``; CutMix (Yun et al.
2019) pastes a box of ``b`` into ``a``, with ``lam`` the area of ``a`` that remains. Either way
the target is ``lam * y_a + (1 - lam) * y_b`` over label-smoothed one-hot vectors, so a batch's
``label`` becomes ``[B, num_classes]`` probabilities (:mod:`jaxtl.train.steps` trains on them
with soft cross-entropy). Only training batches are mixed: evaluation keeps integer labels and
plain cross-entropy, so validation numbers stay comparable across runs with and without it.

Randomness and pairing, chosen so that a batch is a pure function of ``(seed, epoch, batch
index)`` whatever the number of workers *and processes*:

* Each global batch draws its mode (mixup or cutmix, each with probability 1/2 when both are
  on, as timm's ``switch_prob``), its ``lam`` (Beta(alpha, alpha)) and its cutmix box from
  ``default_rng([seed, epoch, batch, MIX_STREAM])``. Every process draws the same values: one
  ``lam`` and one box per batch (timm's default "batch" mode).
* Row ``2k`` of the global batch is mixed with row ``2k + 1`` and vice versa. With an even
  number of rows per process, a pair never straddles two processes, so each process mixes its
  own rows, exchanging nothing, and gets the rows a single process would. The epoch's order is a
  random permutation, so the pairs are a fresh random matching every epoch (timm mixes row ``i``
  with row ``B - 1 - i`` of a shuffled batch: the same kind of matching).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# The last word of a batch generator's seed, distinct from the other streams' (see
# jaxtl.data.pipeline) and non-zero, since SeedSequence ignores trailing zero words ("mix").
MIX_STREAM = 0x6D6978


@dataclasses.dataclass(frozen=True)
class MixBatch:
    """Mixup / CutMix / label smoothing of a batch's rows, a ``(batch, rng) -> batch``
    transform for :class:`~jaxtl.data.pipeline.GrainLoader`'s ``batch_transform``.

    Attributes:
      num_classes: width of the soft labels (the classifier's outputs).
      mixup: Beta(alpha, alpha) of mixup's ``lam``; 0: off.
      cutmix: Beta(alpha, alpha) of cutmix's ``lam``; 0: off. With both on, each batch uses one.
      label_smoothing: the target puts ``1 - label_smoothing + label_smoothing / num_classes`` on
        the label and ``label_smoothing / num_classes`` on every other class.

    Example:
      >>> mix = MixBatch(num_classes=3, label_smoothing=0.3)
      >>> batch = {"pixel_values": np.zeros((2, 4, 4, 1), np.float32), "label": np.array([0, 2])}
      >>> mix(batch, np.random.default_rng(0))["label"]
      array([[0.8, 0.1, 0.1],
             [0.1, 0.1, 0.8]], dtype=float32)
    """

    num_classes: int
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"Soft labels need >= 2 classes, got num_classes={self.num_classes}.")
        check_options(self.mixup, self.cutmix, self.label_smoothing)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def __repr__(self) -> str:  # recorded in checkpoints: what made the training targets
        return (
            f"MixBatch(num_classes={self.num_classes}, mixup={self.mixup:g}, "
            f"cutmix={self.cutmix:g}, label_smoothing={self.label_smoothing:g})"
        )

    def draw(self, rng: np.random.Generator, height: int, width: int):
        """``(mode, lam, box)`` of one batch: ``"mixup"``/``"cutmix"``/None, the weight of each
        row's own image, and cutmix's ``(top, bottom, left, right)`` box (else None). For
        cutmix, ``lam`` is the exact fraction of the image outside the box."""
        if not self.mixes:
            return None, 1.0, None
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or rng.random() < 0.5)
        if not use_cutmix:
            return "mixup", float(rng.beta(self.mixup, self.mixup)), None
        lam = float(rng.beta(self.cutmix, self.cutmix))
        # A box of area (1 - lam) centred anywhere in the image, clipped at its edges (Yun et
        # al.); the clipping shrinks it, so lam is recomputed from the box actually pasted.
        cut = math.sqrt(1.0 - lam)
        box_h, box_w = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
        left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        return "cutmix", lam, (top, bottom, left, right)

    def check(self, rows: int, example: dict) -> None:
        """Raises if a batch of ``rows`` rows like ``example`` cannot be mixed."""
        if self.mixes and rows % 2:
            raise ValueError(
                f"mixup/cutmix mix rows in pairs (2k, 2k+1) within each process's {rows} rows "
                "of a batch; use a batch size that gives every process an even number of rows."
            )
        if self.mixes and "pixel_values" not in example:
            raise ValueError(
                f"mixup/cutmix mix images, but the examples hold {sorted(example)}; "
                "drop mixup/cutmix (label smoothing alone works for any classifier)."
            )
        label = np.asarray(example.get("label"))
        if label.ndim != 0 or not np.issubdtype(label.dtype, np.integer):
            raise ValueError(
                f"mixup/cutmix/label smoothing need one integer class label per example; got "
                f"label of dtype {label.dtype} and shape {label.shape}."
            )

    def __call__(self, batch: dict, rng: np.random.Generator) -> dict:
        labels = np.asarray(batch["label"])
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(
                f"Labels must be in [0, {self.num_classes}) for {self.num_classes} classes; "
                f"found {int(labels.min())}..{int(labels.max())}."
            )
        eps = self.label_smoothing
        targets = np.full((len(labels), self.num_classes), eps / self.num_classes, np.float64)
        targets[np.arange(len(labels)), labels] += 1.0 - eps
        out = dict(batch)
        if self.mixes:
            pixels = np.asarray(batch["pixel_values"])
            mode, lam, box = self.draw(rng, pixels.shape[1], pixels.shape[2])
            partner = np.arange(len(labels)) ^ 1  # rows 2k <-> 2k + 1
            if mode == "mixup":
                pixels = np.float32(lam) * pixels + np.float32(1.0 - lam) * pixels[partner]
            else:
                top, bottom, left, right = box
                pixels = pixels.copy()
                pixels[:, top:bottom, left:right] = pixels[partner, top:bottom, left:right]
            out["pixel_values"] = pixels.astype(np.float32)
            targets = lam * targets + (1.0 - lam) * targets[partner]
        out["label"] = targets.astype(np.float32)
        return out


def check_options(mixup: float, cutmix: float, label_smoothing: float) -> None:
    """Range checks shared by :class:`MixBatch` and :class:`~jaxtl.train.TrainConfig`."""
    for name, value in (("mixup", mixup), ("cutmix", cutmix)):
        if not value >= 0:
            raise ValueError(
                f"{name} (--{name}) is the Beta(alpha, alpha) of lam: >= 0 (0: off), got {value}."
            )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(
            "label_smoothing (--label-smoothing) must be in [0, 1) (0: off; 0.1 is the usual), "
            f"got {label_smoothing}."
        )


def for_training(
    mixup: float,
    cutmix: float,
    label_smoothing: float,
    *,
    task: str,
    num_classes: int,
    inputs,
) -> MixBatch | None:
    """The training batches' :class:`MixBatch` (None when all three are off), or a refusal.

    Args:
      mixup / cutmix / label_smoothing: as :class:`~jaxtl.train.TrainConfig`'s.
      task: the model's task; soft labels exist for classification only.
      num_classes: the classifier's outputs (``model.num_labels``).
      inputs: the training arrays (or their keys): mixup and cutmix need ``pixel_values``.

    Raises:
      ValueError: mixing or smoothing a regression or causal-LM target, or mixing text.
    """
    if not (mixup or cutmix or label_smoothing):
        return None
    asked = ", ".join(
        f"{n}={v:g}"
        for n, v in (("mixup", mixup), ("cutmix", cutmix), ("label_smoothing", label_smoothing))
        if v
    )
    if task != "classification":
        raise ValueError(
            f"{asked}: mixup, cutmix and label smoothing mix class labels, but this model's task "
            f"is {task!r}; they apply to classification only. Drop them."
        )
    if (mixup or cutmix) and "pixel_values" not in inputs:
        raise ValueError(
            f"{asked}: mixup and cutmix mix images, but this model reads "
            f"{sorted(k for k in inputs if k != 'label')} (blending token ids means nothing); "
            "drop mixup/cutmix. Label smoothing alone works for text classifiers."
        )
    return MixBatch(num_classes, mixup, cutmix, label_smoothing)
