"""Training batches through grain: worker processes, per-example augmentation, exact resume.

:class:`GrainLoader` reads a random-access source (``len`` + ``[i] -> dict of arrays``) in an
order that is a pure function of ``(seed, epoch)``: the same permutation as
:class:`~jaxtl.data.loader.ArrayLoader`, so both give the same run. Each example's augmentation
draws from ``default_rng([seed, epoch, index])``, so the batches do not depend on the number of
workers, and a run resumed at step ``k`` sees exactly the batches an uninterrupted run would.

One grain iterator serves the whole run (worker processes start once, not every epoch). In a
multi-process run each process reads only its own rows of every global batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

Example = dict[str, np.ndarray]
Transform = Callable[[Example, np.random.Generator], Example]


class ArraySource:
    """Random access to a dict of equal-length arrays: ``source[i] -> {key: array[i]}``."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"All arrays need the same number of examples; got {lengths}.")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self._n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Example:
        return {k: v[i] for k, v in self.arrays.items()}


class _Positions:
    """Picklable map ``global position -> example`` for the grain workers.

    Position ``k`` of the run is row ``k % epoch_rows`` of epoch ``k // epoch_rows``; that row
    is example ``permutation(seed, epoch)[row]``, augmented with ``rng(seed, epoch, example)``.
    """

    def __init__(self, source, transform, seed, shuffle, epoch_rows, shard, shards, batch_size):
        self.source, self.transform = source, transform
        self.seed, self.shuffle, self.epoch_rows = seed, shuffle, epoch_rows
        self.shard, self.shards, self.batch_size = shard, shards, batch_size

    @functools.lru_cache(maxsize=2)  # noqa: B019 - the instance lives as long as its iterator
    def order(self, epoch: int) -> np.ndarray:
        n = len(self.source)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __call__(self, local_position: int) -> Example:
        # This process's rows of global batch b are [shard * local, (shard + 1) * local).
        local = self.batch_size // self.shards
        batch, row = divmod(int(local_position), local)
        k = batch * self.batch_size + self.shard * local + row
        epoch, pos = divmod(k, self.epoch_rows)
        index = int(self.order(epoch)[pos])
        example = self.source[index]
        if self.transform is not None:
            example = self.transform(
                dict(example), np.random.default_rng([self.seed, epoch, index])
            )
        return example


class GrainLoader:
    """Training batches of ``source`` through grain, for :class:`jaxtl.train.Trainer`.

    Args:
      source: random-access examples (e.g. :class:`ArraySource`).
      batch_size: global batch size; the last partial batch of each epoch is dropped.
      shuffle: reshuffle every epoch from ``(seed, epoch)``.
      seed: the data seed (order and augmentation).
      transform: ``(example, rng) -> example``, e.g. :func:`jaxtl.data.augment.parse`'s.
      workers: grain worker processes (0: in this process).
      process_index / process_count: this process's share of every global batch
        (default: ``jax.process_index()`` / ``jax.process_count()``).
    """

    def __init__(
        self,
        source,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        transform: Transform | None = None,
        workers: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        import jax

        self.source = source
        self.num_examples = len(source)
        if self.num_examples == 0:
            raise ValueError("The dataset is empty: there is nothing to batch.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if self.num_examples < batch_size:
            raise ValueError(
                f"The training split has {self.num_examples} examples, fewer than one batch of "
                f"{batch_size}; lower --batch-size."
            )
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}.")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.transform, self.workers = transform, workers
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size % self.process_count:
            raise ValueError(
                f"batch_size {batch_size} does not split over {self.process_count} processes."
            )
        self._iterator: Iterator[Example] | None = None
        self._position: int | None = None  # global step the iterator yields next

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The un-augmented arrays (for exact BatchNorm statistics); ArraySource only."""
        if not isinstance(self.source, ArraySource):
            raise AttributeError("arrays is only available for an ArraySource.")
        return self.source.arrays

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def state(self) -> dict[str, Any]:
        """What determines every batch, besides the step: saved with each checkpoint and
        compared on resume (see :meth:`check_state`)."""
        return {
            "kind": "grain",
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "transform": repr(self.transform),
        }

    def check_state(self, saved: Mapping[str, Any] | None) -> None:
        """Refuses to resume a run whose batches would differ from the checkpointed run's."""
        if not saved:
            return
        now = self.state()
        diff = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"The training data changed since the checkpoint ({changes}); a resumed run "
                "would not see the batches the interrupted one would have. Resume with the "
                "same data, batch size, seed and augmentation, or start a new run directory."
            )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Example]:
        """This process's rows of every batch of ``epoch`` from batch ``start`` on."""
        first = epoch * self.steps_per_epoch + start
        if self._iterator is None or self._position != first:
            self._iterator = self._open(first)
            self._position = first
        for _ in range(start, self.steps_per_epoch):
            batch = next(self._iterator)
            self._position += 1
            yield {k: np.array(v) for k, v in batch.items()}  # own memory, not grain's buffers

    def _open(self, first_step: int) -> Iterator[Example]:
        import grain

        _grain_flags()
        local = self.batch_size // self.process_count
        positions = _Positions(
            self.source,
            self.transform,
            self.seed,
            self.shuffle,
            self.steps_per_epoch * self.batch_size,
            self.process_index,
            self.process_count,
            self.batch_size,
        )
        # An unbounded run of positions: epochs follow one another until the trainer stops.
        ds = grain.MapDataset.range(first_step * local, 2**62).map(positions)
        ds = ds.batch(local, drop_remainder=True).to_iter_dataset()
        if self.workers:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        return iter(ds)


@functools.cache
def _grain_flags() -> None:
    """grain's workers read absl flags; a program that never parsed them (any non-absl
    program) would fail with UnparsedFlagAccessError."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
