"""Batch loaders: the :class:`Loader` protocol the Trainer reads, and evaluation batches.

:func:`evaluation_loader` gives every example of a split exactly once, in order
(:class:`ArrayLoader`); :func:`jaxtl.data.pipeline.training_loader` gives shuffled, optionally
augmented and mixed training batches through grain.

Training shuffles with ``default_rng([seed, epoch])`` and drops the last partial batch, so every
step has one shape and a resumed run can skip straight to step ``k`` of its epoch. Evaluation
keeps order and pads the last batch with ``weight == 0`` rows, so every example counts exactly
once whatever the batch and device counts; it never computes more rows than the split needs
(see :func:`evaluation_batch_sizes`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from jaxtl.data.config import DataConfig

__all__ = [
    "ArrayLoader",
    "Loader",
    "check_same_data",
    "evaluation_batch_sizes",
    "evaluation_loader",
]


class Loader(Protocol):
    """What :class:`jaxtl.train.Trainer` reads batches from.

    Attributes:
      num_examples: examples in the split.
      batch_size: global batch size (the largest, for an evaluation loader).
      steps_per_epoch: batches per epoch.
      process_local: True when each batch holds only this process's rows of the global batch
        (each process reads its own share, as :class:`~jaxtl.data.pipeline.GrainLoader` does);
        False when every process holds the whole global batch.
    """

    num_examples: int
    batch_size: int
    process_local: bool

    @property
    def steps_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The batches of ``epoch`` from batch index ``start`` on (for a mid-epoch resume)."""
        ...

    def examples(self, n: int) -> dict[str, np.ndarray]:
        """The first ``n`` examples in source order, unaugmented (exact BatchNorm statistics)."""
        ...

    def state(self) -> dict[str, Any]:
        """What determines every batch besides the step; saved with each checkpoint."""
        ...

    def check_state(self, saved: Mapping[str, Any] | None) -> None:
        """Refuses to resume when the batches would differ from the checkpointed run's."""
        ...

    def padding_waste(self, epoch: int = 0) -> float | None:
        """Fraction of the token slots of ``epoch`` that are padding; None without text."""
        ...


def check_same_data(saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> None:
    """Raises when a checkpoint's data state differs from the loader's (see ``Loader.state``)."""
    if not saved:
        return
    diff = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
    if diff:
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"The training data changed since the checkpoint ({changes}); a resumed run "
            "would not see the batches the interrupted one would have. Resume with the "
            "same data, batch size, seed and augmentation, or start a new run directory."
        )


def evaluation_batch_sizes(num_examples: int, batch_size: int, devices: int = 1) -> tuple[int, int]:
    """``(full, last)``: the size of an evaluation batch and of the padded last one.

    A batch never holds more rows than the split needs: ``full`` is ``min(batch_size,
    num_examples)`` rounded up to a multiple of ``devices``. The last partial batch is padded
    only to the smallest of ``devices * 2**k`` (or ``full``) that holds it, so a split compiles
    at most two shapes and pads less than a factor of two.

    Example:
      >>> evaluation_batch_sizes(4, 256), evaluation_batch_sizes(13, 256, devices=8)
      ((4, 4), (16, 16))
      >>> evaluation_batch_sizes(1000, 256)  # 3 batches of 256, then 232 rows padded to 256
      (256, 256)
      >>> evaluation_batch_sizes(1100, 256)  # 76 rows padded to 128
      (256, 128)
    """
    if num_examples < 1:
        raise ValueError("The dataset is empty: there is nothing to evaluate.")
    full = -(-min(batch_size, num_examples) // devices) * devices
    rest = num_examples % full
    if rest == 0:
        return full, full
    last = devices
    while last < rest:
        last *= 2
    return full, min(last, full)


class ArrayLoader:
    """Global batches of a dict of equal-length arrays.

    Every process holds the whole global batch (``process_local`` is False).

    Args:
      arrays: name -> array with the examples on axis 0 (model inputs and ``label``).
      batch_size: global batch size.
      shuffle: reshuffle each epoch from ``(seed, epoch)``.
      seed: the data seed.
      drop_last: drop the last partial batch (training) or pad it with weight-0 rows (eval).
      length_buckets: cut each text batch to the smallest of these lengths that holds it.
      last_batch_size: with ``drop_last=False``, the padded size of the last partial batch
        (default: ``batch_size``); see :func:`evaluation_batch_sizes`.
    """

    process_local = False

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool,
        length_buckets: tuple[int, ...] | None = None,
        last_batch_size: int | None = None,
    ):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"All arrays need the same number of examples; got {lengths}.")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.num_examples = next(iter(lengths.values()))
        if self.num_examples == 0:
            raise ValueError("The dataset is empty: there is nothing to batch.")
        if batch_size < 1:
            raise ValueError(f"batch_size (--batch-size) must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.length_buckets = length_buckets
        self.last_batch_size = batch_size if last_batch_size is None else last_batch_size
        if drop_last and self.num_examples < batch_size:
            raise ValueError(
                f"The training split has {self.num_examples} examples, fewer than one batch of "
                f"{batch_size}; lower batch_size (--batch-size)."
            )
        rest = self.num_examples % batch_size
        if not drop_last and rest and not rest <= self.last_batch_size <= batch_size:
            raise ValueError(
                f"last_batch_size={self.last_batch_size} cannot hold the last {rest} examples "
                f"within batch_size={batch_size}."
            )

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches of ``epoch`` from batch index ``start`` on (for mid-epoch resume)."""
        order = self.order(epoch)
        bs = self.batch_size
        for i in range(start, self.steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            batch = {k: v[idx] for k, v in self.arrays.items()}
            real = len(idx)
            size = bs if real == bs else self.last_batch_size
            if real < size:  # eval only: pad with copies of row 0, weighted out
                pad = size - real
                batch = {
                    k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()
                }
            if not self.drop_last:
                weight = np.zeros(size, np.float32)
                weight[:real] = 1.0
                batch["weight"] = weight
            if self.length_buckets and "attention_mask" in batch:
                batch = _cut_to_bucket(batch, self.length_buckets)
            yield batch

    def examples(self, n: int) -> dict[str, np.ndarray]:
        return {k: v[:n] for k, v in self.arrays.items()}

    def state(self) -> dict[str, Any]:
        return {
            "kind": "array",
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "length_buckets": list(self.length_buckets) if self.length_buckets else None,
        }

    def check_state(self, saved: Mapping[str, Any] | None) -> None:
        check_same_data(saved, self.state())

    def padding_waste(self, epoch: int = 0) -> float | None:
        if "attention_mask" not in self.arrays:
            return None
        fed = real = 0
        for batch in self.epoch(epoch):  # padding rows of a last eval batch are waste too
            mask = batch["attention_mask"]
            rows = batch["weight"] > 0 if "weight" in batch else slice(None)
            fed, real = fed + mask.size, real + int(mask[rows].sum())
        return 1.0 - real / fed if fed else 0.0


def _cut_to_bucket(batch: dict[str, np.ndarray], buckets: tuple[int, ...]) -> dict:
    """Cut the token arrays of ``batch`` to the smallest bucket that holds its longest row."""
    from jaxtl.data.text import bucket_for, token_arrays

    width = bucket_for(int(batch["attention_mask"].sum(axis=1).max()), buckets)
    tokens = token_arrays(batch)
    return {k: v[:, :width] if k in tokens else v for k, v in batch.items()}


def buckets_for(arrays: Mapping[str, np.ndarray], bucket_by_length: bool) -> tuple[int, ...] | None:
    if not bucket_by_length or "attention_mask" not in arrays:
        return None
    from jaxtl.data.text import bucket_lengths

    return bucket_lengths(arrays["attention_mask"].shape[1])


def evaluation_loader(
    arrays: Mapping[str, np.ndarray], config: DataConfig, *, devices: int = 1
) -> ArrayLoader:
    """Every example of ``arrays`` exactly once, in order, in batches of at most
    ``config.eval_batch_size`` rows that split over ``devices`` (see
    :func:`evaluation_batch_sizes`); text batches cut to length buckets with
    ``config.bucket_by_length``.

    Args:
      arrays: one split's model inputs (and labels), examples on axis 0.
      config: a :class:`jaxtl.DataConfig`, e.g. ``TrainConfig.data``.
      devices: devices each batch is split over (``Trainer.devices``).
    """
    n = len(next(iter(arrays.values())))
    full, last = evaluation_batch_sizes(n, config.eval_batch_size, devices)
    return ArrayLoader(
        arrays,
        full,
        shuffle=False,
        drop_last=False,
        length_buckets=buckets_for(arrays, config.bucket_by_length),
        last_batch_size=last,
    )
