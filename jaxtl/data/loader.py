"""Batches from in-memory arrays, reproducible from (seed, epoch) and resumable mid-epoch.

Training shuffles with ``default_rng([seed, epoch])`` and drops the last partial batch, so every
step has one shape and a resumed run can skip straight to step ``k`` of its epoch. Evaluation
keeps order and pads the last batch with ``weight == 0`` rows, so every example counts exactly
once whatever the batch and device counts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np


class ArrayLoader:
    """Global batches of a dict of equal-length arrays.

    Args:
      arrays: name -> array with the examples on axis 0 (model inputs and ``label``).
      batch_size: global batch size.
      shuffle: reshuffle each epoch from ``(seed, epoch)``.
      seed: the data seed.
      drop_last: drop the last partial batch (training) or pad it with weight-0 rows (eval).
      length_buckets: cut each text batch to the smallest of these lengths that holds it.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool,
        length_buckets: tuple[int, ...] | None = None,
    ):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"All arrays need the same number of examples; got {lengths}.")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.num_examples = next(iter(lengths.values()))
        if self.num_examples == 0:
            raise ValueError("The dataset is empty: there is nothing to batch.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.length_buckets = length_buckets
        if drop_last and self.num_examples < batch_size:
            raise ValueError(
                f"The training split has {self.num_examples} examples, fewer than one batch of "
                f"{batch_size}; lower --batch-size."
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
            if real < bs:  # eval only: pad with copies of row 0, weighted out
                pad = bs - real
                batch = {
                    k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()
                }
            weight = np.zeros(bs, np.float32)
            weight[:real] = 1.0
            if not self.drop_last:
                batch["weight"] = weight
            if self.length_buckets and "attention_mask" in batch:
                batch = _cut_to_bucket(batch, self.length_buckets)
            yield batch


def _cut_to_bucket(batch: dict[str, np.ndarray], buckets: tuple[int, ...]) -> dict:
    """Cut the token arrays of ``batch`` to the smallest bucket that holds its longest row."""
    from jaxtl.data.text import bucket_for, token_arrays

    width = bucket_for(int(batch["attention_mask"].sum(axis=1).max()), buckets)
    tokens = token_arrays(batch)
    return {k: v[:, :width] if k in tokens else v for k, v in batch.items()}
