"""The transfer plan: an ordered rule table -> groups -> labels, masks and the plan table.

A :class:`Plan` maps every param (by its "/"-joined path, :mod:`jaxtl.transfer.rules`) to a
named :class:`Group`. From it come the label tree, the trainable mask, the printed plan table and
(:mod:`jaxtl.transfer.optimizer`) an ``optax.partition`` optimizer: frozen groups get no update
and no optimizer state, each trainable group its optimizer at ``learning_rate * lr_mult``.
Recipes that build plans live in :mod:`jaxtl.transfer.recipes`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import optax

from jaxtl.transfer.optimizer import DEFAULT_OPTIMIZER, make_optimizer
from jaxtl.transfer.rules import tree_from_rules
from jaxtl.transfer.rules import unused_rules as _unused_rules
from jaxtl.transfer.stages import check_stages, describe
from jaxtl.transfer.trees import count_params, flatten, tree_bytes

__all__ = ["Group", "GroupRow", "Plan"]


@dataclasses.dataclass(frozen=True)
class Group:
    """How one set of params trains.

    Attributes:
      name: the label rules map to.
      trainable: False freezes the group: no update, no optimizer state.
      lr_mult: multiplies the learning rate (and so the decoupled weight decay, as in AdamW).
      weight_decay: overrides the optimizer's ``weight_decay`` for this group; None keeps it.
      wd_mult: multiplies the group's weight decay (the override, or the optimizer's).
      clip: False leaves the group's gradients out of the global-norm clipping, neither counted
        in the norm nor scaled (an auxiliary network trained beside the model, such as DANN's
        domain classifier in :mod:`jaxtl.domain`).
    """

    name: str
    trainable: bool
    lr_mult: float = 1.0
    weight_decay: float | None = None
    wd_mult: float = 1.0
    clip: bool = True

    def __post_init__(self):
        if not (math.isfinite(self.lr_mult) and self.lr_mult >= 0):
            raise ValueError(
                f"Group {self.name!r}: lr_mult must be finite and >= 0, got {self.lr_mult}."
            )
        if not (math.isfinite(self.wd_mult) and self.wd_mult >= 0):
            raise ValueError(
                f"Group {self.name!r}: wd_mult must be finite and >= 0, got {self.wd_mult}."
            )
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(
                f"Group {self.name!r}: weight_decay must be >= 0 or None, got {self.weight_decay}."
            )


@dataclasses.dataclass(frozen=True)
class GroupRow:
    """One line of :meth:`Plan.summary`. ``opt_state_bytes`` is None when the optimizer measured
    has no ``optax.partition`` state for the group."""

    group: str
    rules: tuple[str, ...]
    trainable: bool
    lr_mult: float
    weight_decay: float | None
    num_params: int
    param_bytes: int
    opt_state_bytes: int | None
    # Bytes one device holds when the leaves are cut into pieces (``Plan.summary(pieces=)``).
    param_bytes_per_device: int | None = None
    opt_state_bytes_per_device: int | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """An ordered rule table ``(path regex, group name)`` and the groups it names.

    Attributes:
      rules: ``(pattern, group_name)`` pairs; the first :func:`re.fullmatch` of a param's
        "/"-joined path wins and every param must match one (end with ``(".*", ...)``).
      groups: group name -> :class:`Group` (a sequence of Groups is accepted too).
      name: how the plan is shown, e.g. ``"last_n(2)"``.
      adapters: the :class:`~jaxtl.transfer.lora.LoRA` options when the plan trains LoRA
        adapters, which a run adds to the model first (:func:`jaxtl.lora.adapt`); else None.
      source: the rules file the plan was read from (:mod:`jaxtl.transfer.rules_file`), whose
        every pattern must label a param; None for a recipe's plan.
      stages: for a staged recipe (``gradual``, ``lp_ft``), its
        :class:`~jaxtl.transfer.stages.Stage` s in order; the plan's own rules and groups are
        then its last stage's (:mod:`jaxtl.transfer.stages`). Empty: one plan for the run.
    """

    rules: tuple[tuple[str, str], ...]
    groups: dict[str, Group]
    name: str = "custom"
    adapters: Any = None
    source: str | None = None
    stages: tuple = ()

    def __post_init__(self):
        groups = self.groups
        if not isinstance(groups, Mapping):
            groups = {g.name: g for g in groups}
        for key, g in groups.items():
            if key != g.name:
                raise ValueError(f"Plan {self.name!r}: groups[{key!r}] is named {g.name!r}.")
        rules = self.rules.items() if isinstance(self.rules, Mapping) else self.rules
        rules = tuple((p, v) for p, v in rules)
        tree_from_rules({}, rules)  # validates every pattern now, not at the first optax.init
        unknown = sorted({v for _, v in rules if v not in groups})
        if unknown:
            raise ValueError(
                f"Plan {self.name!r}: rules name group(s) {unknown} that are not in groups "
                f"{sorted(groups)}. Add a Group for each, or fix the rule."
            )
        object.__setattr__(self, "groups", dict(groups))
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "stages", tuple(self.stages))
        check_stages(self.stages, self.name)

    def labels(self, params: Any) -> Any:
        """A tree like ``params`` holding each leaf's group name.

        Raises:
          jaxtl.transfer.rules.UnmatchedParamsError: a param matches no rule.
        """
        return tree_from_rules(params, self.rules)

    def trainable_mask(self, params: Any) -> Any:
        """A tree like ``params`` holding True where the leaf's group trains."""
        return jax.tree.map(lambda g: self.groups[g].trainable, self.labels(params))

    def check_trains(self, params: Any, family: str) -> None:
        """Refuse a plan that means to train params but trains none of ``params``: its trained
        groups' rules match nothing here (e.g. a plan made for another model, whose head rule
        names another head), so the run would step without learning. A plan that freezes
        every group on purpose (a rules file's, to score the pretrained model as it is) passes.

        Raises:
          ValueError: naming the rules that match nothing.
        """
        if any(jax.tree.leaves(self.trainable_mask(params))):
            return
        trains = {p for p, g in self.rules if self.groups[g].trainable}
        unused = [p for p, _ in self.unused_rules(params) if p in trains]
        if unused:
            raise ValueError(
                f"The plan {self.name!r} trains no param of this {family!r} model: its trained "
                f"groups' rules {unused} match none of its params (a plan made for another "
                "model? build it with jaxtl.make_plan(recipe, model.structure) of this one)."
            )

    def unused_rules(self, params: Any) -> list[tuple[str, str]]:
        """Rules that label no param of ``params`` (shown as notes by :meth:`table`)."""
        return _unused_rules(params, self.rules)

    def optimizer(
        self,
        learning_rate: float | optax.Schedule,
        *,
        name: str = DEFAULT_OPTIMIZER,
        weight_decay: float = 0.01,
        clip_norm: float | None = 1.0,
        l2_sp: tuple[float, float] | None = None,
        **options: Any,
    ) -> optax.GradientTransformation:
        """This plan's optimizer: :func:`jaxtl.transfer.optimizer.make_optimizer` (AdamW by
        default, or any optax optimizer by ``name``) per trainable group, nothing for frozen
        groups, clipping of the trainable gradients' global norm.

        Example:
          >>> import jax.numpy as jnp
          >>> plan = Plan(((r"head/.*", "head"), (".*", "frozen")),
          ...             [Group("head", True), Group("frozen", False)])
          >>> params = {"head": {"w": jnp.ones((2, 2))}, "body": {"w": jnp.ones((2, 2))}}
          >>> tx = plan.optimizer(0.1)
          >>> grads = jax.tree.map(jnp.ones_like, params)
          >>> updates, _ = tx.update(grads, tx.init(params), params)
          >>> new = optax.apply_updates(params, updates)
          >>> bool((new["body"]["w"] == 1).all()), bool((new["head"]["w"] < 1).all())
          (True, True)
        """
        return make_optimizer(
            self,
            learning_rate,
            name=name,
            weight_decay=weight_decay,
            clip_norm=clip_norm,
            l2_sp=l2_sp,
            **options,
        )

    def _measure(self, params: Any, optimizer: optax.GradientTransformation | None, pieces=None):
        labels = flatten(self.labels(params))
        flat = flatten(params)
        if optimizer is None:
            optimizer = self.optimizer(1e-3)
        state = jax.eval_shape(optimizer.init, params)
        # Per device: each leaf's bytes divided by the pieces it is cut into.
        split = lambda tree: _split_bytes(tree, pieces(tree))  # noqa: E731
        by_group: dict[str, int] = {}
        by_group_device: dict[str, int] = {}
        is_part = lambda x: isinstance(x, optax.PartitionState)  # noqa: E731
        for node in jax.tree.leaves(state, is_leaf=is_part):
            if is_part(node):
                for name, inner in node.inner_states.items():
                    by_group[name] = by_group.get(name, 0) + tree_bytes(inner)
                    if pieces is not None:
                        by_group_device[name] = by_group_device.get(name, 0) + split(inner)
        param_split = flatten(pieces(params)) if pieces is not None else {}
        rows = []
        for name, g in self.groups.items():
            paths = [p for p, label in labels.items() if label == name]
            leaves = [flat[p] for p in paths]
            rows.append(
                GroupRow(
                    group=name,
                    rules=tuple(p for p, v in self.rules if v == name),
                    trainable=g.trainable,
                    lr_mult=g.lr_mult,
                    weight_decay=g.weight_decay,
                    num_params=count_params(leaves),
                    param_bytes=tree_bytes(leaves),
                    opt_state_bytes=by_group.get(name),
                    param_bytes_per_device=(
                        sum(tree_bytes(flat[p]) // param_split[p] for p in paths)
                        if pieces is not None
                        else None
                    ),
                    opt_state_bytes_per_device=by_group_device.get(name),
                )
            )
        return rows, tree_bytes(state), (split(state) if pieces is not None else None)

    def summary(
        self, params: Any, optimizer: optax.GradientTransformation | None = None, *, pieces=None
    ) -> list[GroupRow]:
        """One :class:`GroupRow` per group, in ``groups`` order.

        Args:
          params: the param tree (arrays or ``jax.ShapeDtypeStruct``).
          optimizer: whose state to measure (``jax.eval_shape(optimizer.init, params)``, no
            memory allocated); None measures ``self.optimizer(<float lr>)``.
          pieces: ``pieces(tree) -> tree of ints``, how many pieces a sharded layout cuts each
            leaf of the params or of (part of) the optimizer state into
            (:func:`jaxtl.sharding.piece_counter`); fills the per-device byte counts.
        """
        return self._measure(params, optimizer, pieces)[0]

    def table(
        self, params: Any, optimizer: optax.GradientTransformation | None = None, *, pieces=None
    ) -> str:
        """The plan as a printable table: one line per group, a total line, and notes. With
        ``pieces`` (see :meth:`summary`) it also shows what one device holds of each group's
        params and optimizer state.

        Example:
          >>> import numpy as np
          >>> plan = Plan(((".*", "all"),), [Group("all", True)], name="full")
          >>> w = {"w": np.zeros((2, 2), np.float32)}
          >>> print(plan.table(w))  # doctest: +NORMALIZE_WHITESPACE
          Transfer plan full
          group  rules  trains  lr_mult  weight_decay  params  opt_state
          all    .*     yes     1        default       4       36 B
          total: 4 trainable + 0 frozen = 4 params; optimizer state 36 B
        """
        rows, total_bytes, device_bytes = self._measure(params, optimizer, pieces)
        header = ("group", "rules", "trains", "lr_mult", "weight_decay", "params", "opt_state")
        if pieces is not None:
            header += ("params/device", "opt_state/device")
        lines: list[tuple[str, ...]] = []
        for r in rows:
            state = "?" if r.opt_state_bytes is None else _fmt_bytes(r.opt_state_bytes)
            wd = (
                "-"
                if not r.trainable
                else ("default" if r.weight_decay is None else f"{r.weight_decay:g}")
            )
            wd_mult = self.groups[r.group].wd_mult
            if r.trainable and wd_mult != 1.0:
                wd += f" x{wd_mult:g}"
            mult = f"{r.lr_mult:g}" if r.trainable else "-"
            first, *more = r.rules or ("(none)",)
            trains = "yes" if r.trainable else "no"
            line = (r.group, first, trains, mult, wd, f"{r.num_params:,}", state)
            if pieces is not None:
                per = r.opt_state_bytes_per_device
                line += (_fmt_bytes(r.param_bytes_per_device or 0), _fmt_bytes(per or 0))
            lines.append(line)
            lines.extend(("", rule, *[""] * (len(header) - 2)) for rule in more)
        widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
        fmt = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()  # noqa: E731
        trainable = sum(r.num_params for r in rows if r.trainable)
        frozen = sum(r.num_params for r in rows if not r.trainable)
        out = [describe(self, params)] if self.stages else []
        last = " (its last stage)" if self.stages else ""
        out += [f"Transfer plan {self.name}{last}", fmt(header), *(fmt(x) for x in lines)]
        out.append(
            f"total: {trainable:,} trainable + {frozen:,} frozen = {trainable + frozen:,} params; "
            f"optimizer state {_fmt_bytes(total_bytes)}"
        )
        if pieces is not None:
            params_device = sum(r.param_bytes_per_device or 0 for r in rows)
            out.append(
                f"per device: params {_fmt_bytes(params_device)} + optimizer state "
                f"{_fmt_bytes(device_bytes)}"
            )
        if frozen or self.adapters is not None:
            out.append(self._against_full(params, trainable, total_bytes))
        outside = total_bytes - sum(r.opt_state_bytes or 0 for r in rows)
        if outside:
            out.append(f"note: {_fmt_bytes(outside)} of optimizer state belong to no group")
        for pattern, group in self.unused_rules(params):
            out.append(f"note: rule {pattern!r} -> {group} labels no param")
        return "\n".join(out)

    def _against_full(self, params: Any, trainable: int, state_bytes: int) -> str:
        """One line: this plan's trainable params and optimizer state as a share of full
        fine-tuning's (every param of the base model, without adapters, under AdamW)."""
        from jaxtl.transfer.lora import base_params  # lora builds on plans; imported late

        base = base_params(params)
        full = Plan(((".*", "all"),), [Group("all", True)], name="full").optimizer(1e-3)
        full_params = count_params(base)
        full_bytes = tree_bytes(jax.eval_shape(full.init, base))
        return (
            f"vs full fine-tuning: trainable {_pct(trainable, full_params)} of its "
            f"{full_params:,} params; optimizer state {_pct(state_bytes, full_bytes)} of its "
            f"{_fmt_bytes(full_bytes)} (AdamW)"
        )


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def _split_bytes(tree: Any, pieces: Any) -> int:
    """Bytes of ``tree`` that one device holds when each leaf is cut into ``pieces``."""
    return sum(
        tree_bytes(leaf) // n
        for leaf, n in zip(jax.tree.leaves(tree), jax.tree.leaves(pieces), strict=True)
    )


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
