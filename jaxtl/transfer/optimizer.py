"""The optimizer of a transfer plan: one optax transformation from a :class:`~jaxtl.transfer.Plan`.

Frozen groups get no update and no optimizer state (``optax.partition`` with a stateless
freeze); each trainable group gets the named optax optimizer at ``learning_rate * lr_mult``.
AdamW is the default. Any optax optimizer whose first argument is ``learning_rate`` works by
name (``"sgd"``, ``"lion"``, ``"adafactor"``, ``"lamb"``, ...), with its own keyword arguments.

Weight decay follows the optimizer: where it declares a decay argument (``adamw``'s and
``lion``'s decoupled ``weight_decay``, ``adafactor``'s ``weight_decay_rate``), that is what
``weight_decay`` sets; for the others (``sgd``, ``adam``, ``rmsprop``, ...) it is added to the
gradient as L2, the meaning of PyTorch's ``weight_decay`` for those optimizers. Either way, only
trainable leaves with ``ndim >= 2`` decay: biases and norm scales never do (BERT practice,
Devlin et al. 2019), frozen leaves are never touched.

With ``weight_decay_input``, the weight decay is data, not a constant of the program: each
trainable group without its own ``weight_decay`` keeps the value in its optimizer state
(:class:`WeightDecayInput`, set with :func:`set_weight_decay`, ``wd_mult`` applied in the
update), so one compiled step serves every weight decay. The update is the constant one's up to
float rounding; a group's own ``weight_decay`` stays a constant.

With ``schedule_input``, the learning-rate schedule (a
:class:`~jaxtl.transfer.schedules.LRSchedule`) is data in the same way: each trainable group
keeps its peak, warmup and total steps in its optimizer state (:class:`ScheduleInput`, set with
:func:`set_schedule`) and computes its learning rate from them
(:func:`~jaxtl.transfer.schedules.schedule_value`, times its ``lr_mult``), so one compiled step
serves every learning rate and run length. On CPU its updates are the constant schedule's to
the bit.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxtl.transfer.plan import Group, Plan
  >>> plan = Plan(((r"head/.*", "head"), (".*", "frozen")),
  ...             [Group("head", True), Group("frozen", False)])
  >>> tx = make_optimizer(plan, 0.1, name="sgd", momentum=0.9)
  >>> params = {"head": {"w": jnp.ones((2, 2))}, "body": {"w": jnp.ones((2, 2))}}
  >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  >>> bool((updates["body"]["w"] == 0).all()), bool((updates["head"]["w"] < 0).all())
  (True, True)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from jaxtl.transfer.schedules import LRSchedule, schedule_value

__all__ = [
    "DEFAULT_OPTIMIZER",
    "AnchorState",
    "Grouped",
    "ScheduleInput",
    "WeightDecayInput",
    "available_optimizers",
    "check_decay_and_clip",
    "clip_by_global_norm",
    "l2_sp_transform",
    "make_optimizer",
    "optimizer_factory",
    "set_schedule",
    "set_weight_decay",
]

DEFAULT_OPTIMIZER = "adamw"

# optax functions whose first argument is learning_rate but that are not optimizers to pick by
# name: building blocks and a line-search method that needs the loss at every step.
_NOT_OPTIMIZERS = frozenset({"lbfgs", "scale_by_learning_rate", "scale_by_rprop"})

# (decay argument, its mask argument) as optax's optimizers name them.
_DECAY_ARGS = (("weight_decay", "mask"), ("weight_decay", "weight_decay_mask"),
               ("weight_decay_rate", "weight_decay_mask"))  # fmt: skip


class Grouped(Protocol):
    """What the optimizer needs of a plan (:class:`jaxtl.transfer.plan.Plan` is one): its
    groups (``trainable``, ``lr_mult``, ``weight_decay``, ``wd_mult``) and the labels of any
    param tree."""

    groups: Mapping[str, Any]

    def labels(self, params: Any) -> Any: ...

    def trainable_mask(self, params: Any) -> Any: ...


def available_optimizers() -> list[str]:
    """The optax optimizer names that :func:`make_optimizer` accepts.

    Example:
      >>> {"adamw", "sgd", "lion", "adafactor"} <= set(available_optimizers())
      True
    """
    names = []
    for name in dir(optax):
        fn = getattr(optax, name)
        if name.startswith("_") or name in _NOT_OPTIMIZERS or isinstance(fn, type):
            continue
        if not callable(fn):
            continue
        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue
        if params[:1] == ["learning_rate"]:
            names.append(name)
    return sorted(names)


def optimizer_factory(name: str) -> Callable[..., optax.GradientTransformation]:
    """The optax function ``name(learning_rate, ...)``.

    Raises:
      ValueError: ``name`` is not an optax optimizer; the message lists the valid names.
    """
    names = available_optimizers()
    if name not in names:
        raise ValueError(
            f"optimizer {name!r} (--optimizer) is not an optax optimizer; expected one of "
            f"{', '.join(names)}."
        )
    return getattr(optax, name)


def _decay_mask(tree: Any) -> Any:
    # BERT practice (Devlin et al. 2019): no decay on biases and LayerNorm scales, i.e. ndim < 2.
    return jax.tree.map(lambda x: x.ndim >= 2, tree)


def _freeze() -> optax.GradientTransformation:
    """``optax.set_to_zero()`` with ``-0.0`` instead of ``+0.0``.

    ``p + (-0.0) == p`` bit for bit for every float, but ``(-0.0) + (+0.0)`` is ``+0.0``, so
    ``set_to_zero`` flips the sign bit of frozen entries that are ``-0.0``. Stateless like it.
    """
    return optax.stateless(
        lambda updates, _: jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates)
    )


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm``'s rule: updates whose global norm is below ``max_norm``
    pass unchanged (bit for bit), larger ones are scaled to norm ``max_norm``. The scale is
    one scalar, ``t * (max_norm / norm)``, where optax computes ``(t / norm) * max_norm`` per
    leaf (the two differ by float rounding). XLA keeps optax's divided copy of every gradient
    in memory, since both of AdamW's moments read it; a scalar product it folds into each
    reader. On MiniLM's full fine-tune at 32 x 8 tokens that is 186 -> 117 MiB of the step's
    working memory and a 9% faster epoch on the demo task (``benchmarks/README.md``).
    Stateless, like optax's."""

    def clip(updates, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates)

    return optax.stateless(clip)


def _scaled(learning_rate: float | optax.Schedule, mult: float) -> float | optax.Schedule:
    if mult == 1.0:
        return learning_rate
    if callable(learning_rate):
        return lambda count: learning_rate(count) * mult
    return learning_rate * mult


def _group_optimizer(
    factory: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    weight_decay: float | jax.Array,
    options: dict[str, Any],
) -> optax.GradientTransformation:
    accepted = inspect.signature(factory).parameters
    for decay, mask in _DECAY_ARGS:
        if decay in accepted:
            extra = {mask: _decay_mask} if mask in accepted else {}
            return factory(learning_rate, **{decay: weight_decay, **extra, **options})
    tx = factory(learning_rate, **options)
    if not isinstance(weight_decay, jax.Array) and not weight_decay:  # an input: always
        return tx
    # No decay argument: L2 on the gradient, as PyTorch's weight_decay for SGD / Adam / RMSprop.
    return optax.chain(optax.add_decayed_weights(weight_decay, _decay_mask), tx)


class WeightDecayInput(NamedTuple):
    """The optimizer state of a group whose weight decay is an input (``weight_decay_input``):
    the run's weight decay as a float32 scalar (before the group's ``wd_mult``), and the
    group optimizer's own state."""

    weight_decay: jax.Array
    inner: Any


def _decay_input(
    build: Callable[[jax.Array], optax.GradientTransformation], initial: float
) -> optax.GradientTransformation:
    """``build(weight_decay)`` with the weight decay read from the state at every update: the
    same transformation as ``build(initial)`` (its state structure must not depend on the
    value), with the value data rather than a constant of the traced program."""

    def init_fn(params):
        weight_decay = jnp.asarray(initial, jnp.float32)
        return WeightDecayInput(weight_decay, build(weight_decay).init(params))

    def update_fn(updates, state, params=None):
        updates, inner = build(state.weight_decay).update(updates, state.inner, params)
        return updates, state._replace(inner=inner)

    return optax.GradientTransformation(init_fn, update_fn)


def _input_group(
    weight_decay: jax.Array,
    *,
    factory: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    wd_mult: float,
    options: dict[str, Any],
) -> optax.GradientTransformation:
    wd = weight_decay if wd_mult == 1.0 else weight_decay * wd_mult
    return _group_optimizer(factory, learning_rate, wd, options)


def set_weight_decay(opt_state: Any, weight_decay: float | jax.Array) -> Any:
    """``opt_state`` (of a ``make_optimizer(..., weight_decay_input=True)`` optimizer) with
    the weight decay of every group that takes it as an input set to ``weight_decay`` (a number
    or a traced scalar; each group applies its ``wd_mult``). Other leaves are kept as they are.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxtl.transfer.plan import Group, Plan
      >>> plan = Plan(((".*", "all"),), [Group("all", True)])
      >>> tx = make_optimizer(plan, 1.0, name="sgd", weight_decay_input=True)
      >>> params = {"w": jnp.ones((2, 2))}
      >>> state = set_weight_decay(tx.init(params), 0.5)
      >>> updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
      >>> updates["w"].tolist()  # -1.0 * (gradient 0 + 0.5 * w)
      [[-0.5, -0.5], [-0.5, -0.5]]
    """
    is_input = lambda x: isinstance(x, WeightDecayInput)  # noqa: E731
    value = jnp.asarray(weight_decay, jnp.float32)
    return jax.tree.map(
        lambda x: x._replace(weight_decay=value) if is_input(x) else x, opt_state, is_leaf=is_input
    )


class ScheduleInput(NamedTuple):
    """The optimizer state of a group whose learning-rate schedule is an input
    (``schedule_input``): the run's peak learning rate (float32, before the group's
    ``lr_mult``), warmup steps and total steps (int32), and the group optimizer's own state
    (whose step count the schedule reads)."""

    peak: jax.Array
    warmup: jax.Array
    total: jax.Array
    inner: Any


def _schedule_input(
    build: Callable[[optax.Schedule], optax.GradientTransformation], schedule: LRSchedule
) -> optax.GradientTransformation:
    """``build(learning_rate)`` over ``schedule``'s kind with its numbers read from the state at
    every update: the transformation of ``build(schedule)``, with the numbers data rather than
    constants of the traced program."""

    def init_fn(params):
        return ScheduleInput(*schedule.numbers(), build(schedule).init(params))

    def update_fn(updates, state, params=None):
        def learning_rate(count):
            return schedule_value(schedule.kind, count, state.peak, state.warmup, state.total)

        updates, inner = build(learning_rate).update(updates, state.inner, params)
        return updates, state._replace(inner=inner)

    return optax.GradientTransformation(init_fn, update_fn)


def set_schedule(opt_state: Any, schedule: LRSchedule | tuple[Any, Any, Any]) -> Any:
    """``opt_state`` (of a ``make_optimizer(..., schedule_input=True)`` optimizer) with the
    schedule of every group set to ``schedule``'s numbers: an :class:`LRSchedule` of the
    optimizer's kind, or ``(peak, warmup, total)`` as numbers or traced scalars. Other leaves
    are kept as they are.

    Example:
      >>> from jaxtl.transfer.plan import Group, Plan
      >>> plan = Plan(((".*", "all"),), [Group("all", True)])
      >>> tx = make_optimizer(plan, LRSchedule("constant", 1.0, 0, 10), name="sgd",
      ...                     clip_norm=None, schedule_input=True)
      >>> params = {"w": jnp.ones((2,))}
      >>> state = set_schedule(tx.init(params), (0.5, 0, 10))
      >>> tx.update(jax.tree.map(jnp.ones_like, params), state, params)[0]["w"].tolist()
      [-0.5, -0.5]
    """
    numbers = schedule.numbers() if isinstance(schedule, LRSchedule) else schedule
    peak, warmup, total = numbers
    peak, warmup = jnp.asarray(peak, jnp.float32), jnp.asarray(warmup, jnp.int32)
    total = jnp.asarray(total, jnp.int32)
    is_input = lambda x: isinstance(x, ScheduleInput)  # noqa: E731
    return jax.tree.map(
        lambda x: x._replace(peak=peak, warmup=warmup, total=total) if is_input(x) else x,
        opt_state,
        is_leaf=is_input,
    )


def _trainable_group(
    g: Any,
    factory: Callable[..., optax.GradientTransformation],
    weight_decay: float,
    weight_decay_input: bool,
    options: dict[str, Any],
    learning_rate: float | optax.Schedule,
) -> optax.GradientTransformation:
    """Group ``g``'s optimizer at ``learning_rate * lr_mult``, its weight decay a constant or
    (``weight_decay_input``, unless the group has its own) an input."""
    lr = _scaled(learning_rate, g.lr_mult)
    if weight_decay_input and g.weight_decay is None:
        build = functools.partial(
            _input_group, factory=factory, learning_rate=lr, wd_mult=g.wd_mult, options=options
        )
        return _decay_input(build, weight_decay)
    wd = (weight_decay if g.weight_decay is None else g.weight_decay) * g.wd_mult
    return _group_optimizer(factory, lr, wd, options)


def _clipped(plan: Grouped, tree: Any) -> Any:
    """True on the leaves of trainable groups that take part in the global-norm clipping."""
    return jax.tree.map(
        lambda g: plan.groups[g].trainable and getattr(plan.groups[g], "clip", True),
        plan.labels(tree),
    )


class AnchorState(NamedTuple):
    """The values the regularized leaves started from (the pretrained weights)."""

    anchor: Any


def _toward_start(alpha: float) -> optax.GradientTransformation:
    """Adds ``alpha * (w - w0)`` to the gradient, ``w0`` the params at ``init``: the gradient
    of ``alpha / 2 * ||w - w0||^2``. The anchor lives in the optimizer state, so it is
    checkpointed, resumed and sharded with the moments."""

    def init_fn(params):
        return AnchorState(jax.tree.map(jnp.asarray, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("L2-SP needs the params in tx.update(grads, state, params).")
        out = jax.tree.map(
            lambda g, p, p0: g + alpha * (p - p0).astype(g.dtype), updates, params, state.anchor
        )
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def l2_sp_transform(plan: Grouped, alpha: float, beta: float) -> optax.GradientTransformation:
    """L2-SP (Li et al. 2018) as gradient terms: ``alpha * (w - w0)`` on every trainable param
    outside the ``"head"`` group (the gradient of ``alpha / 2 * ||w - w0||^2`` toward the
    pretrained ``w0``), ``beta * w`` on the head (of ``beta / 2 * ||w||^2``), nothing on
    frozen params. Only the regularized leaves' ``w0`` is kept (in the optimizer state)."""
    for value, what in ((alpha, "ALPHA"), (beta, "BETA")):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"l2_sp (--l2-sp ALPHA,BETA): {what} must be >= 0, got {value!r}.")

    def masks(head: bool):
        def mask(tree):
            labels = plan.labels(tree)
            return jax.tree.map(
                lambda g: plan.groups[g].trainable and ((g == "head") == head), labels
            )

        return mask

    return optax.chain(
        optax.masked(_toward_start(float(alpha)), masks(head=False)),
        optax.masked(optax.add_decayed_weights(float(beta)), masks(head=True)),
    )


def check_decay_and_clip(weight_decay: float, clip_norm: float | None) -> None:
    """Refuse the values that would train without failing, wrongly: a negative decay grows
    the weights, and a negative clipping norm flips the gradient (gradient ascent); 0 would
    zero every update.

    Raises:
      ValueError: naming the argument and its flag.
    """
    # Python numbers only: a sweep's vmapped heads pass each head's weight decay as an array.
    if isinstance(weight_decay, int | float) and not weight_decay >= 0:
        raise ValueError(f"weight_decay (--weight-decay) must be >= 0, got {weight_decay}.")
    if isinstance(clip_norm, int | float) and not clip_norm > 0:
        raise ValueError(
            f"clip_norm (--clip-norm) must be > 0, or None to clip nothing (--clip-norm 0), "
            f"got {clip_norm}."
        )


def make_optimizer(
    plan: Grouped,
    learning_rate: float | optax.Schedule,
    *,
    name: str = DEFAULT_OPTIMIZER,
    weight_decay: float = 0.01,
    clip_norm: float | None = 1.0,
    l2_sp: tuple[float, float] | None = None,
    weight_decay_input: bool = False,
    schedule_input: bool = False,
    **options: Any,
) -> optax.GradientTransformation:
    """The named optimizer per trainable group of ``plan``, nothing for frozen groups, and
    global-norm clipping of the trainable gradients.

    The transformation computes labels from the tree optax passes to ``init``/``update``
    (``optax.partition`` accepts a label function), so it needs no params to build and works on
    params, gradients and ``jax.eval_shape`` structs alike. A param no rule matches fails at
    ``init``; call ``plan.labels`` or ``plan.table`` to check earlier.

    Args:
      plan: what trains, in which group, at which ``lr_mult`` (and group weight decay).
      learning_rate: base learning rate or optax schedule; each group uses it times ``lr_mult``.
      name: an optax optimizer (see :func:`available_optimizers`); ``"adamw"`` by default.
      weight_decay: decay of trainable leaves with ``ndim >= 2`` (see the module docstring for
        what it means per optimizer); a group's own ``weight_decay`` overrides it.
      clip_norm: clip by the global norm of the *trainable* gradients; None disables.
      l2_sp: ``(alpha, beta)``: add L2-SP's gradient terms (:func:`l2_sp_transform`) before
        clipping, as a penalty added to the loss would be; None: no L2-SP.
      weight_decay_input: keep ``weight_decay`` in the optimizer state of each trainable group
        without its own ``weight_decay`` (:class:`WeightDecayInput`; change it with
        :func:`set_weight_decay`), so that it is an input of a compiled step, not a constant.
      schedule_input: ``learning_rate`` is an :class:`~jaxtl.transfer.schedules.LRSchedule`
        whose numbers each trainable group keeps in its optimizer state (:class:`ScheduleInput`;
        change them with :func:`set_schedule`): inputs of a compiled step, not constants.
      **options: the optimizer's own keyword arguments, e.g. ``b1``, ``b2``, ``eps`` for AdamW or
        ``momentum`` for SGD.

    Returns:
      An optax transformation. With AdamW its state is ``2 x`` the trainable params' bytes plus
      one int32 step count per trainable group (and one per group for a schedule).

    Raises:
      ValueError: unknown optimizer name, or options it does not take; ``schedule_input``
        without an ``LRSchedule``; a negative ``weight_decay`` or a ``clip_norm`` <= 0.
    """
    check_decay_and_clip(weight_decay, clip_norm)
    if schedule_input and not isinstance(learning_rate, LRSchedule):
        raise ValueError(
            "schedule_input=True keeps a schedule's numbers in the optimizer state: pass "
            f"learning_rate as a jaxtl.transfer.schedules.LRSchedule, not {learning_rate!r}."
        )
    factory = optimizer_factory(name)
    accepted = inspect.signature(factory).parameters
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise ValueError(
            f"optimizer {name!r} takes no option(s) {unknown}; it accepts "
            f"{[p for p in accepted if p != 'learning_rate']}."
        )
    transforms = {}
    for g in plan.groups.values():
        if not g.trainable:
            transforms[g.name] = _freeze()
            continue
        group = functools.partial(_trainable_group, g, factory, weight_decay,
                                  weight_decay_input, options)  # fmt: skip
        if schedule_input:
            transforms[g.name] = _schedule_input(group, learning_rate)
        else:
            transforms[g.name] = group(learning_rate)
    chain = []
    if clip_norm is not None:
        # The global norm must not see frozen grads: one large frozen grad would otherwise
        # shrink every trainable step. Zero them first (stateless), then clip.
        if any(not g.trainable for g in plan.groups.values()):
            frozen = lambda tree: jax.tree.map(lambda t: not t, plan.trainable_mask(tree))  # noqa: E731
            chain.append(optax.masked(optax.set_to_zero(), frozen))
    if l2_sp is not None:
        chain.append(l2_sp_transform(plan, *l2_sp))
    if clip_norm is not None:
        clip = clip_by_global_norm(clip_norm)
        if any(g.trainable and not getattr(g, "clip", True) for g in plan.groups.values()):
            # Groups with clip=False stay out of the norm and are not scaled.
            clip = optax.masked(clip, lambda tree: _clipped(plan, tree))
        chain.append(clip)
    chain.append(optax.partition(transforms, plan.labels))
    return optax.chain(*chain)
