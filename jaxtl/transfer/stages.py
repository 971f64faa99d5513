"""Staged plans: what trains changes during one run (gradual unfreezing, LP-FT).

A staged :class:`~jaxtl.transfer.plan.Plan` carries ``stages``: each a :class:`Stage` with its
own Plan and the epoch (or step) it starts at. The staged Plan's own rules and groups are those
of its last stage, so it labels every param that ever trains. The Trainer
(:mod:`jaxtl.train.trainer`) runs one stage at a time; at a boundary it builds the next stage's
optimizer and carries the optimizer state over with :func:`carry_state`:

- a group whose leaf set is unchanged (same name, same params, same optimizer) keeps its state,
  Adam moments and step counts included;
- every other group starts fresh: zero moments and bias correction from its first step, while
  its learning-rate schedule's count is set to the run's position, so a group unfrozen late
  joins the run's schedule where it is rather than warming up again;
- a stage with ``restart`` (LP-FT's fine-tuning stage) starts every group fresh and runs its
  own LR schedule (warmup and decay) over its own steps, at its own ``learning_rate``;
- L2-SP's anchors are the pretrained weights in every stage.

Each stage compiles its step once. Which stage a state belongs to is recorded with every
checkpoint, so a run stopped mid-stage resumes into that stage, bit for bit.

Example:
  >>> from jaxtl.transfer.structure import Structure
  >>> from jaxtl.transfer.recipes import make_plan
  >>> s = Structure(blocks=("enc/b0", "enc/b1"), head=("cls",))
  >>> plan = make_plan("gradual(every=2)", s)
  >>> for st in plan.stages:
  ...     print(st.start, sorted(g for g, v in st.plan.groups.items() if v.trainable))
  0 ['head']
  2 ['block_1', 'head']
  4 ['block_0', 'block_1', 'head']
  6 ['block_0', 'block_1', 'head', 'stem']
  >>> starts(plan, steps_per_epoch=10)
  [0, 20, 40, 60]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from jaxtl.transfer.trees import flatten

if TYPE_CHECKING:  # plan.py imports this module
    from jaxtl.transfer.plan import Plan

__all__ = [
    "UNITS",
    "Stage",
    "carry_state",
    "check_stages",
    "describe",
    "segment",
    "stage_schedules",
    "starts",
    "trained_anywhere",
]

UNITS = ("epochs", "steps")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a staged plan.

    Attributes:
      plan: what trains during the stage (a plain Plan).
      start: when the stage begins, in ``unit`` (the first stage starts at 0).
      unit: ``"epochs"`` or ``"steps"``.
      restart: start every group's optimizer state fresh and run a new LR schedule (warmup,
        decay) over the stage's steps, up to the next restarting stage or the run's end.
      learning_rate: the peak learning rate of the schedule this stage begins (with
        ``restart``, or for the first stage); None: the run's (``--lr``).
    """

    plan: Plan
    start: float
    unit: str = "epochs"
    restart: bool = False
    learning_rate: float | None = None

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"Stage unit must be one of {UNITS}, got {self.unit!r}.")
        if isinstance(self.start, bool) or not isinstance(self.start, int | float):
            raise ValueError(f"Stage start must be a number of {self.unit}, got {self.start!r}.")
        if not self.start >= 0:
            raise ValueError(f"Stage start must be >= 0, got {self.start!r}.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"Stage learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.plan.stages:
            raise ValueError("A stage's plan cannot itself have stages.")

    def start_step(self, steps_per_epoch: int) -> int:
        """The global step this stage's first update is (0-based), for ``steps_per_epoch``."""
        if self.unit == "steps":
            return int(self.start)
        return int(round(self.start * steps_per_epoch))


def check_stages(stages: Sequence[Stage], name: str) -> None:
    """A staged plan's stages: the first starts at 0, and they start in increasing order in one
    unit. Raises ValueError naming the plan."""
    if not stages:
        return
    for st in stages:
        if st.plan.adapters is not None:
            raise ValueError(
                f"Plan {name!r}: stage plan {st.plan.name!r} adds LoRA adapters; staged recipes "
                "(gradual, lp_ft) train the model's own params. Use lora(r) as its own recipe."
            )
    for i, st in enumerate(stages[1:], 1):
        if st.learning_rate is not None and not st.restart:
            raise ValueError(
                f"Plan {name!r}: stage {i} sets learning_rate but does not restart; a stage "
                "continues the schedule it is in, so only the first stage and restarting "
                "stages set one."
            )
    if stages[0].start != 0:
        raise ValueError(f"Plan {name!r}: the first stage must start at 0, not {stages[0].start}.")
    units = {s.unit for s in stages}
    if len(units) > 1:
        raise ValueError(f"Plan {name!r}: stages mix units {sorted(units)}; use one.")
    for a, b in zip(stages, stages[1:], strict=False):
        if not b.start > a.start:
            raise ValueError(
                f"Plan {name!r}: stage starts must increase, got {a.start} then {b.start}."
            )


def starts(plan: Plan, steps_per_epoch: int) -> list[int]:
    """The global step each stage of ``plan`` begins at; ``[0]`` for an unstaged plan.

    Raises:
      ValueError: two stages fall on the same step (an epoch too short for ``every``).
    """
    if not plan.stages:
        return [0]
    out = [s.start_step(steps_per_epoch) for s in plan.stages]
    for i, (a, b) in enumerate(zip(out, out[1:], strict=False)):
        if b <= a:
            raise ValueError(
                f"recipe {plan.name}: stages {i} and {i + 1} both start at step {a} with "
                f"{steps_per_epoch} steps per epoch; make the stages longer (every=...) or "
                "count them in steps."
            )
    return out


def plans(plan: Plan) -> list[Plan]:
    """The plan of each stage; ``[plan]`` for an unstaged plan."""
    return [s.plan for s in plan.stages] if plan.stages else [plan]


def stage_of(plan: Plan, index: int) -> Stage:
    """Stage ``index`` of ``plan`` (an unstaged plan is one stage)."""
    if not plan.stages:
        return Stage(plan, 0)
    return plan.stages[index]


def segment(plan: Plan, index: int, stage_starts: Sequence[int], total: int) -> tuple[int, int]:
    """``(first step, steps)`` of the LR schedule that stage ``index`` runs on: from the last
    restarting stage at or before it (or the run's start) to the next restart (or the end)."""
    stages = plan.stages or (stage_of(plan, 0),)
    first = max(i for i in range(index + 1) if i == 0 or stages[i].restart)
    later = [i for i in range(index + 1, len(stages)) if stages[i].restart]
    end = stage_starts[later[0]] if later else total
    return stage_starts[first], max(min(end, total) - stage_starts[first], 1)


def stage_schedules(
    plan: Plan,
    stage_starts: Sequence[int],
    total: int,
    schedule: Callable[[int, float | None], optax.Schedule],
) -> tuple[list[optax.Schedule], Callable[[int], float]]:
    """Each stage's LR schedule (over counts from its segment's first step) and the run's
    learning rate at any global step (what ``metrics.jsonl`` logs).

    ``schedule(steps, peak)`` builds one segment's schedule (``peak`` None: the run's LR).
    """
    stages = plan.stages or (stage_of(plan, 0),)
    per_stage, segments = [], []
    for i in range(len(stages)):
        first, steps = segment(plan, i, stage_starts, total)
        head = max(j for j in range(i + 1) if j == 0 or stages[j].restart)
        per_stage.append(schedule(steps, stages[head].learning_rate))
        segments.append(first)

    def at(step: int) -> float:
        i = max(j for j, s in enumerate(stage_starts) if s <= step)
        return float(per_stage[i](step - segments[i]))

    return per_stage, at


def trained_anywhere(plan: Plan, params: Any) -> Any:
    """A tree like ``params``: True where any stage of ``plan`` trains the leaf."""
    masks = [p.trainable_mask(params) for p in plans(plan)]
    return jax.tree.map(lambda *m: any(m), *masks)


def _is_part(x: Any) -> bool:
    return isinstance(x, optax.PartitionState)


def _partition(opt_state: Any) -> optax.PartitionState | None:
    parts = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_part) if _is_part(x)]
    return parts[0] if parts else None


def _same_layout(a: Any, b: Any) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        x.shape == y.shape and x.dtype == y.dtype for x, y in zip(la, lb, strict=True)
    )


def _set_schedule_counts(inner: Any, count: jax.Array) -> Any:
    """``inner`` with every LR schedule's step count set to ``count``."""

    def put(node):
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=jnp.full_like(node.count, count))
        return node

    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(put, inner, is_leaf=is_sched)


def carry_state(old: Any, fresh: Any, *, restart: bool, count: jax.Array) -> tuple[Any, list[str]]:
    """The next stage's optimizer state: ``fresh`` (the new optimizer's ``init``) with the state
    of every group that ``old`` holds in the same layout carried over (see the module
    docstring). ``count``: the new stage's position in its LR schedule, given to fresh groups.

    Returns the state and the names of the groups carried over.
    """
    before = _partition(old)
    carried: list[str] = []

    def swap(node):
        if not _is_part(node):
            return node
        inner = dict(node.inner_states)
        for name, state in inner.items():
            prev = None if before is None else before.inner_states.get(name)
            if not restart and prev is not None and _same_layout(prev, state):
                inner[name] = prev
                if jax.tree.leaves(prev):  # a frozen group holds nothing to carry
                    carried.append(name)
            elif not restart:
                inner[name] = _set_schedule_counts(state, count)
        return node._replace(inner_states=inner)

    return jax.tree.map(swap, fresh, is_leaf=_is_part), carried


def describe(plan: Plan, params: Any) -> str:
    """One line per stage: when it starts, what it trains, and how its optimizer begins."""
    lines = [f"Staged plan {plan.name}: {len(plan.stages)} stages"]
    for i, st in enumerate(plan.stages):
        mask = flatten(st.plan.trainable_mask(params))
        labels = flatten(st.plan.labels(params))
        trained = [g for g, v in st.plan.groups.items() if v.trainable]
        n = sum(int(getattr(flatten(params)[p], "size", 0)) for p, m in mask.items() if m)
        how = "; fresh optimizer state and LR schedule" if st.restart else ""
        if st.learning_rate is not None:
            how += f"; lr {st.learning_rate:g}"
        shown = ", ".join(g for g in trained if g in labels.values())
        lines.append(
            f"  stage {i} at {st.unit[:-1]} {st.start:g}: trains {shown} ({n:,} params){how}"
        )
    return "\n".join(lines)
