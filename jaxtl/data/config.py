"""What each training step sees and how it is read: the data section of
:class:`jaxtl.TrainConfig` (``config.data``), owned by the data layer that reads it."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from jaxtl.data import augment, mixing

__all__ = ["DataConfig", "check_types"]

# The simple annotations check_types reads, and what each accepts.
_KINDS = {
    "bool": ((bool, np.bool_), "True or False"),
    "int": ((int, np.integer), "a whole number"),
    "float": ((int, float, np.integer, np.floating), "a finite number"),
    "str": ((str, os.PathLike), "a string"),
}


def check_types(obj: Any, names: dict[str, str], flags: dict[str, str | None]) -> None:
    """Each option of ``obj`` whose annotation in ``names`` is built of ``bool``, ``int``,
    ``float``, ``str`` and ``None`` holds a value of that type; others are checked where
    they are used. ``True`` is no number here, ``1.5`` no whole number, ``"3"`` neither, and a
    float is finite: each would otherwise fail deep inside a step, or (``train_bn="false"``)
    do the opposite of what it says. A path-like value of a ``str`` option becomes its
    string. ``flags`` gives an option's ``jaxtl finetune`` flag where it has one.

    Raises:
      ValueError: naming the argument, its flag, and what it takes.
    """
    for name, annotation in names.items():
        kinds = [k.strip() for k in str(annotation).split("|")]
        if not set(kinds) <= {*_KINDS, "None"}:
            continue
        value = getattr(obj, name)
        if value is None and "None" in kinds:
            continue
        allowed = [k for k in kinds if k != "None"]
        ok = any(
            isinstance(value, _KINDS[k][0])
            and not (k in ("int", "float") and isinstance(value, bool | np.bool_))
            and not (k == "float" and not math.isfinite(value))
            for k in allowed
        )
        if not ok:
            said = [_KINDS[k][1] for k in allowed] + ["None"] * ("None" in kinds)
            what = " or ".join([", ".join(said[:-1]), said[-1]] if len(said) > 2 else said)
            what = what.replace("True or False or None", "True, False or None")
            flag = flags.get(name, "--" + name.replace("_", "-"))
            named = f"{name} ({flag})" if flag else name
            raise ValueError(f"{named} must be {what}, got {value!r}.")
        if isinstance(value, os.PathLike) and "str" in allowed:
            setattr(obj, name, os.fspath(value))


# The options that only Python sets (the others are `jaxtl finetune --<name with dashes>`).
FLAGS: dict[str, str | None] = {"eval_batch_size": None, "prefetch": None}


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
        check_types(self, self.__annotations__, FLAGS)
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
