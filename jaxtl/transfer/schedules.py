"""Learning-rate schedules: a linear warmup from 0, then constant, linear decay to 0 (BERT's)
or cosine decay to 0.

:class:`LRSchedule` holds a run's schedule: its kind, peak, warmup steps and total steps.
:func:`schedule_value` computes its value at a step count with the peak, warmup and total as
data, so that one traced program serves every schedule of a kind
(``OptimConfig.learning_rate_input`` keeps them in the optimizer state). Called, an
``LRSchedule`` computes the same with its numbers behind an ``optimization_barrier``, so that
XLA treats them as data too rather than folding them into other constants: a program with the
numbers as constants and one that reads them from its inputs do the same float32 arithmetic,
and their updates are equal to the bit (``tests/test_schedules.py``). The values are optax's
schedules (``optax.warmup_cosine_decay_schedule``, ``optax.linear_schedule`` joined by
``optax.join_schedules``, which jaxtl used before) written with the operations XLA makes of
them in a train step, so that a step's learning rate is the one optax's schedule gave it, to
the bit; a group's ``lr_mult`` may round differently (by a unit in the last place) where
XLA folded it into optax's constants.

Example:
  >>> import jax.numpy as jnp
  >>> s = LRSchedule("linear", 1e-3, warmup=2, total=10)
  >>> [round(float(s(c)), 6) for c in (0, 1, 2, 6, 10)]
  [0.0, 0.0005, 0.001, 0.0005, 0.0]
  >>> float(schedule_value("linear", jnp.int32(6), *s.numbers())) == float(s(6))
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["SCHEDULES", "LRSchedule", "schedule_value"]

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """A run's learning rate per optimizer step: ``warmup`` steps of linear warmup from 0 to
    ``peak``, then ``kind``: ``"constant"``, ``"linear"`` (to 0 at ``total``) or ``"cosine"``
    (to 0 at ``total``). Called with a step count (an optax schedule), the learning rate."""

    kind: str
    peak: float
    warmup: int
    total: int

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(
                f"schedule (--schedule) must be one of {SCHEDULES}, got {self.kind!r}."
            )
        if not 0 <= self.warmup <= self.total:
            raise ValueError(
                f"warmup steps must be in [0, total steps = {self.total}], got {self.warmup}."
            )

    @classmethod
    def of(
        cls, kind: str, peak: float, total_steps: int, warmup_steps: int, warmup_ratio: float
    ) -> LRSchedule:
        """The schedule of a run of ``total_steps``: ``warmup_steps`` of warmup, or
        ``warmup_ratio`` of the total when that is 0 (never more than the total)."""
        warmup = warmup_steps or int(warmup_ratio * total_steps)
        return cls(kind, peak, min(warmup, total_steps), total_steps)

    def numbers(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(peak, warmup, total)`` as float32 / int32 scalars: :func:`schedule_value`'s data."""
        return (
            jnp.asarray(self.peak, jnp.float32),
            jnp.asarray(self.warmup, jnp.int32),
            jnp.asarray(self.total, jnp.int32),
        )

    def __call__(self, count: Any) -> jax.Array:
        # The numbers as data even where they are constants of a traced program: see above.
        numbers = jax.lax.optimization_barrier(self.numbers())
        return schedule_value(self.kind, count, *numbers)


def _ramp(start: jax.Array, end: jax.Array, count: jax.Array, steps: jax.Array) -> jax.Array:
    """``optax.linear_schedule(start, end, steps)`` at ``count`` (``steps`` >= 1)."""
    count = jnp.clip(count, 0, steps).astype(jnp.float32)
    # XLA computes optax's ``1 - count / steps`` (``steps`` a constant) as a multiplication by
    # the reciprocal; the same here keeps jaxtl's runs where optax's schedules had them.
    frac = 1 - count * (1 / steps.astype(jnp.float32))
    return (start - end) * frac + end


def _cosine(peak: jax.Array, count: jax.Array, steps: jax.Array) -> jax.Array:
    """``optax.cosine_decay_schedule(peak, steps)`` at ``count`` (``steps`` >= 1)."""
    count = jnp.minimum(count, steps).astype(jnp.float32)
    # As in _ramp: XLA folds optax's ``pi * count / steps`` into ``count * (pi * (1 / steps))``.
    angle = count * (jnp.pi * (1 / steps.astype(jnp.float32)))
    return peak * (0.5 * (1 + jnp.cos(angle)))


def schedule_value(
    kind: str, count: jax.Array, peak: jax.Array, warmup: jax.Array, total: jax.Array
) -> jax.Array:
    """``LRSchedule(kind, peak, warmup, total)(count)`` with ``peak`` (float32), ``warmup`` and
    ``total`` (int32) as data: one traced program for every schedule of ``kind``."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule (--schedule) must be one of {SCHEDULES}, got {kind!r}.")
    count = jnp.asarray(count)
    zero = jnp.zeros((), jnp.float32)
    if kind == "cosine":
        after = _cosine(peak, count - warmup, jnp.maximum(total, warmup + 1) - warmup)
    elif kind == "constant":
        after = jnp.broadcast_to(peak, jnp.shape(count))
    else:
        after = _ramp(peak, zero, count - warmup, jnp.maximum(total - warmup, 1))
    # optax.join_schedules: the warmup before its boundary (none when warmup is 0).
    up = _ramp(zero, peak, count, jnp.maximum(warmup, 1))
    return jnp.where(count < warmup, up, after)
