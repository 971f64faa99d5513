"""Training batches through grain: worker processes, per-example augmentation, exact resume.

:class:`GrainLoader` reads a random-access source (``len`` + ``[i] -> dict of arrays``) in an
order that is a pure function of ``(seed, epoch)``: the same permutation as
:class:`~jaxtl.data.loader.ArrayLoader`, so both give the same run. Each example's augmentation
draws from ``default_rng([seed, epoch, index, EXAMPLE_STREAM])``, so the batches do not depend
on the number of workers, and a run resumed at step ``k`` sees exactly the batches an
uninterrupted run would. A batch-level transform (mixup / cutmix, :mod:`jaxtl.data.mixing`)
runs on each batch after batching, with ``default_rng([seed, epoch, batch index,
MIX_STREAM])``.

Every stream has its own seed words: the epoch's permutation ``[seed, epoch]``, the order of
length-bucketed batches ``[seed, epoch, 1]``, examples and batches with a non-zero tag as the
last word. numpy's SeedSequence ignores trailing zero words, so without the tags example 0's
stream would be the permutation's, and example 1's the bucket order's.

One grain iterator serves the whole run (worker processes start once, not every epoch). In a
multi-process run each process reads only its own rows of every global batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxtl.data import augment, mixing
from jaxtl.data.loader import buckets_for, check_same_data
from jaxtl.data.mixing import MIX_STREAM

if TYPE_CHECKING:
    from jaxtl.data.config import DataConfig
    from jaxtl.models.base import LoadedModel

EXAMPLE_STREAM = 0x6578  # "ex": the last seed word of an example's augmentation generator

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


class _EpochPlan:
    """Which example fills each row of each global batch of an epoch and, with length buckets,
    each batch's padded length. A pure function of ``(seed, epoch)``.

    Without buckets: ``permutation(seed, epoch)``, the last partial batch dropped (the order of
    :class:`~jaxtl.data.loader.ArrayLoader`). With buckets: the same permutation, less the
    dropped tail, is cut into chunks of :attr:`CHUNK` batches; each chunk is sorted by length
    and cut into batches, so that a batch holds texts of similar length, and the order of the
    batches is shuffled. Each batch is padded to the smallest bucket that holds its longest
    text, so jit sees at most ``len(buckets)`` shapes.
    """

    CHUNK = 32  # batches per length-sorted chunk

    def __init__(self, n, batch_size, seed, shuffle, lengths=None, buckets=None, token_keys=()):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.steps = n // batch_size
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.buckets = None if buckets is None else tuple(int(b) for b in buckets)
        self.token_keys = tuple(token_keys)

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one plan per loader, an epoch or two at a time
    def __call__(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(order, widths)``: example index per position, padded length per batch (or None)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.buckets is None:
            return order, None
        from jaxtl.data.text import bucket_for

        bs = self.batch_size
        kept = order[: self.steps * bs]
        batches = []
        for start in range(0, len(kept), bs * self.CHUNK):
            chunk = kept[start : start + bs * self.CHUNK]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
        if self.shuffle:
            shuffled = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
            batches = [batches[i] for i in shuffled]
        widths = np.array([bucket_for(int(self.lengths[b].max()), self.buckets) for b in batches])
        return np.concatenate(batches), widths


class _Positions:
    """Picklable map ``position -> example`` for the grain workers.

    Global position ``k`` of the run is row ``k % epoch_rows`` of epoch ``k // epoch_rows``; the
    plan names its example, which is cut to its batch's bucket and augmented with
    ``rng(seed, epoch, example index)``. ``local_position`` counts this process's rows only.
    """

    def __init__(self, plan: _EpochPlan, source, transform, shard: int, shards: int):
        self.plan, self.source, self.transform = plan, source, transform
        self.shard, self.shards = shard, shards
        self.epoch_rows = plan.steps * plan.batch_size

    def __call__(self, local_position: int) -> Example:
        # This process's rows of global batch b are [shard * local, (shard + 1) * local).
        bs = self.plan.batch_size
        local = bs // self.shards
        batch, row = divmod(int(local_position), local)
        k = batch * bs + self.shard * local + row
        epoch, pos = divmod(k, self.epoch_rows)
        order, widths = self.plan(epoch)
        index = int(order[pos])
        example = self.source[index]
        if widths is not None:  # every process cuts its rows of a batch to the same bucket
            width = int(widths[pos // bs])
            keys = self.plan.token_keys
            example = {k: v[:width] if k in keys else v for k, v in example.items()}
        if self.transform is not None:
            rng = np.random.default_rng([self.plan.seed, epoch, index, EXAMPLE_STREAM])
            example = self.transform(dict(example), rng)
        return example


class _BatchStep:
    """Picklable ``(i, batch) -> batch`` for the grain workers: the ``i``-th batch of this
    iterator is global step ``first_step + i``, transformed with its ``(seed, epoch, batch)``
    generator (the same in every process and worker)."""

    def __init__(self, transform, seed: int, steps_per_epoch: int, first_step: int):
        self.transform, self.seed = transform, seed
        self.steps_per_epoch, self.first_step = steps_per_epoch, first_step

    def __call__(self, i: int, batch: Example) -> Example:
        epoch, b = divmod(self.first_step + int(i), self.steps_per_epoch)
        rng = np.random.default_rng([self.seed, epoch, b, MIX_STREAM])
        return self.transform(dict(batch), rng)


class GrainLoader:
    """Training batches of ``source`` through grain, for :class:`jaxtl.train.Trainer` (a
    :class:`jaxtl.data.loader.Loader`; each process reads only its rows, ``process_local``).

    Args:
      source: random-access examples (e.g. :class:`ArraySource`).
      batch_size: global batch size; the last partial batch of each epoch is dropped.
      shuffle: reshuffle every epoch from ``(seed, epoch)``.
      seed: the data seed (order and augmentation).
      transform: ``(example, rng) -> example``, e.g. :func:`jaxtl.data.augment.parse`'s.
      batch_transform: ``(batch, rng) -> batch`` on this process's rows of each batch, e.g. a
        :class:`jaxtl.data.mixing.MixBatch` (whose row pairs never straddle processes).
      workers: grain worker processes (0: in this process).
      process_index / process_count: this process's share of every global batch
        (default: ``jax.process_index()`` / ``jax.process_count()``).
      length_buckets: padded lengths for text batches (see :class:`_EpochPlan`); None: every
        batch keeps the arrays' one padded length.
    """

    process_local = True

    def __init__(
        self,
        source,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        transform: Transform | None = None,
        batch_transform: Transform | None = None,
        workers: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        length_buckets: tuple[int, ...] | None = None,
    ):
        import jax

        self.source = source
        self.num_examples = len(source)
        if self.num_examples == 0:
            raise ValueError("The dataset is empty: there is nothing to batch.")
        if batch_size < 1:
            raise ValueError(f"batch_size (--batch-size) must be >= 1, got {batch_size}.")
        if self.num_examples < batch_size:
            raise ValueError(
                f"The training split has {self.num_examples} examples, fewer than one batch of "
                f"{batch_size}; lower batch_size (--batch-size)."
            )
        if workers < 0:
            raise ValueError(f"workers (--data-workers) must be >= 0, got {workers}.")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.transform, self.workers = transform, workers
        self.batch_transform = batch_transform
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size % self.process_count:
            raise ValueError(
                f"batch_size (--batch-size) {batch_size} does not split over "
                f"{self.process_count} processes."
            )
        # Fail here, not in a worker: transforms that can tell check the first example.
        if hasattr(transform, "check"):
            transform.check(source[0])
        if hasattr(batch_transform, "check"):
            batch_transform.check(batch_size // self.process_count, source[0])
        lengths, token_keys = _token_lengths(source)
        if length_buckets is not None and lengths is None:
            raise ValueError("length_buckets needs text inputs (an attention_mask).")
        self.plan = _EpochPlan(
            self.num_examples,
            batch_size,
            seed,
            shuffle,
            lengths,
            length_buckets,
            token_keys,
        )
        self._iterator: Iterator[Example] | None = None
        self._position: int | None = None  # global step the iterator yields next

    def examples(self, n: int) -> dict[str, np.ndarray]:
        """The first ``n`` examples in source order, unaugmented (exact BatchNorm statistics)."""
        rows = [self.source[i] for i in range(min(n, self.num_examples))]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

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
            "batch_transform": repr(self.batch_transform),
            "length_buckets": list(self.plan.buckets) if self.plan.buckets else None,
        }

    def padding_waste(self, epoch: int = 0) -> float | None:
        """Fraction of the token slots fed in ``epoch`` that are padding; None without text."""
        if self.plan.lengths is None:
            return None
        from jaxtl.data.text import padding_waste

        order, widths = self.plan(epoch)
        rows = order[: self.steps_per_epoch * self.batch_size].reshape(-1, self.batch_size)
        if widths is None:
            widths = np.full(len(rows), self.source.arrays["attention_mask"].shape[1])
        return padding_waste(self.plan.lengths[rows], widths)

    def check_state(self, saved: Mapping[str, Any] | None) -> None:
        """Refuses to resume a run whose batches would differ from the checkpointed run's."""
        check_same_data(saved, self.state())

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
            self.plan, self.source, self.transform, self.process_index, self.process_count
        )
        # An unbounded run of positions: epochs follow one another until the trainer stops.
        ds = grain.MapDataset.range(first_step * local, 2**62).map(positions)
        ds = ds.batch(local, drop_remainder=True)
        if self.batch_transform is not None:
            ds = ds.map_with_index(
                _BatchStep(self.batch_transform, self.seed, self.steps_per_epoch, first_step)
            )
        ds = ds.to_iter_dataset()
        if self.workers:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        return iter(ds)


def _token_lengths(source) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Real tokens per example (``attention_mask`` sums) and the ``[N, T]`` token arrays that a
    batch's bucket cuts; ``(None, ())`` for a source without text."""
    from jaxtl.data.text import token_arrays

    arrays = getattr(source, "arrays", {})
    if "attention_mask" not in arrays:
        return None, ()
    return arrays["attention_mask"].sum(axis=1), token_arrays(arrays)


@functools.cache
def _grain_flags() -> None:
    """grain's workers read absl flags; a program that never parsed them (any non-absl
    program) would fail with UnparsedFlagAccessError."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def training_loader(
    arrays: Mapping[str, np.ndarray], config: DataConfig, model: LoadedModel, *, seed: int = 0
) -> GrainLoader:
    """Shuffled, optionally augmented (per example) and mixed (per batch, with smoothed
    targets) training batches through grain (see :mod:`jaxtl.data.mixing`); in a multi-process
    run, this process's rows of each.

    Args:
      arrays: the training split's model inputs and labels, examples on axis 0.
      config: a :class:`jaxtl.DataConfig`, e.g. ``TrainConfig.data``.
      model: the model the batches feed (its preprocessing, task and label count).
      seed: the data seed (order, augmentation, mixing), e.g. ``TrainConfig.seed``.

    Raises:
      ValueError: augmentation asked for a model that does not read images, or bad options.
    """
    if config.augment and "pixel_values" not in arrays:
        raise ValueError(
            f"augment={config.augment!r} (--augment) transforms images, but this model reads "
            f"{sorted(k for k in arrays if k != 'label')}; drop the augmentation."
        )
    if config.augment and model.task == "segmentation":
        raise ValueError(
            f"augment={config.augment!r} (--augment) moves pixels but not their masks; "
            "task='segmentation' trains unaugmented: drop the augmentation."
        )
    return GrainLoader(
        ArraySource(arrays),
        config.batch_size,
        shuffle=True,
        seed=seed,
        transform=augment.parse(config.augment, model.extras.get("preprocessing")),
        batch_transform=mixing.for_training(
            config.mixup,
            config.cutmix,
            config.label_smoothing,
            task=model.task,
            num_classes=model.num_labels,
            inputs=arrays,
        ),
        workers=config.data_workers,
        length_buckets=buckets_for(arrays, config.bucket_by_length),
    )
