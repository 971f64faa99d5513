"""Many heads trained at once on one frozen backbone: one jitted step ``jax.vmap``-ed over K
heads, each with its own learning rate schedule, weight decay and seed, on features computed
once (:mod:`jaxtl.feature_cache`). Each head follows the single run a user would start for its
cell step for step (see :mod:`jaxtl.sweep`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl import feature_cache
from jaxtl.data import images, sources
from jaxtl.data.loader import ArrayLoader, evaluation_loader
from jaxtl.models.base import LoadedModel
from jaxtl.sweep.grid import SweepCell, grid_cells
from jaxtl.train import TrainConfig, steps
from jaxtl.train.losses import summarize
from jaxtl.train.state import TrainState
from jaxtl.train.tracker import Tracker
from jaxtl.transfer.optimizer import optimizer_factory
from jaxtl.transfer.plan import Plan
from jaxtl.transfer.recipes import make_plan
from jaxtl.transfer.trees import flatten, is_under, unflatten

__all__ = ["LoadModel", "sweep_heads", "vmappable"]

LoadModel = Callable[[int], LoadedModel]


def _head_only(model: LoadedModel, plan: Plan) -> list[str]:
    """The head's param paths, or a ValueError when ``plan`` trains anything else."""
    structure = model.structure
    under_head = lambda p: any(is_under(p, h) for h in structure.head)  # noqa: E731
    trained = [p for p, on in flatten(plan.trainable_mask(model.params)).items() if on]
    outside = [p for p in trained if not under_head(p)]
    if plan.stages or plan.adapters is not None or outside or not trained:
        what = f"trains {outside[0]!r}" if outside else "is staged or adds adapters"
        if not trained:
            what = "trains nothing"
        raise ValueError(
            f"recipe {plan.name!r} {what}: a vmapped sweep (sweep_heads) trains many heads on "
            "one frozen backbone's cached features, so it needs a frozen backbone (linear_probe: "
            "only the head trains). Run this recipe one config at a time with "
            "jaxtl.sweep.sweep_sequential."
        )
    return [p for p in flatten(model.params) if under_head(p)]


def vmappable(model: LoadedModel, recipe: str | Plan) -> bool:
    """Whether :func:`sweep_heads` can sweep ``recipe`` on ``model`` (it trains the head only);
    otherwise :func:`sweep_sequential` runs it.

    Raises:
      ValueError: an unknown or malformed recipe (the message lists the valid ones).
    """
    plan = make_plan(recipe, model.structure)
    try:
        _head_only(model, plan)
    except ValueError:
        return False
    return True


def _check_config(config: TrainConfig) -> TrainConfig:
    """``config`` with the feature cache on (in memory unless a directory is named); refuses
    what the vmapped step cannot reproduce."""
    data = config.data
    if data.bucket_by_length:
        raise ValueError(
            "bucket_by_length (--bucket-by-length) orders batches by text length, and the "
            "vmapped sweep feeds every head one cached feature array; drop it (the frozen "
            "backbone runs once whatever the padding)."
        )
    if data.label_smoothing:
        raise ValueError(
            "label_smoothing (--label-smoothing) is not supported by the vmapped sweep; run the "
            "grid with jaxtl.sweep.sweep_sequential."
        )
    if config.precise_bn:
        raise ValueError("precise_bn needs the backbone's inputs; drop it for a vmapped sweep.")
    randomized = [f"{arg} ({flag})" for arg, flag, on in (
        (f"augment={data.augment!r}", "--augment", bool(data.augment)),
        (f"mixup={data.mixup}", "--mixup", bool(data.mixup)),
        (f"cutmix={data.cutmix}", "--cutmix", bool(data.cutmix)),
    ) if on]  # fmt: skip
    if randomized:
        raise ValueError(
            f"{', '.join(randomized)}: the vmapped sweep trains its heads on features the frozen "
            "backbone computes once, which cannot see random augmentation; drop it, or run each "
            "cell in the Trainer, which applies it (jaxtl.sweep.sweep_sequential; --sequential)."
        )
    scale = config.scale
    given = [f"{arg} ({flag})" for arg, flag, on in (
        (f"precision={scale.precision!r}", "--precision", scale.precision != "float32"),
        (f"remat={scale.remat!r}", "--remat", scale.remat is not None),
        ("frozen_bf16=True", "--frozen-bf16", scale.frozen_bf16),
    ) if on]  # fmt: skip
    if given:
        raise ValueError(
            f"{', '.join(given)}: the vmapped sweep trains its heads on float32 features that "
            "the frozen backbone computes once, so it would not apply them; drop them, or run "
            "each cell in the Trainer, which does (jaxtl.sweep.sweep_sequential; --sequential)."
        )
    ck = config.checkpoint
    unused = [f"{arg}{flag}" for arg, flag, on in (
        (f"data_workers={data.data_workers}", " (--data-workers)", data.data_workers > 0),
        (f"compress_checkpoints={ck.compress_checkpoints}", " (--compress-checkpoints)",
         ck.compress_checkpoints is not None),
        (f"checkpoint_every={ck.checkpoint_every}", "", ck.checkpoint_every is not None),
    ) if on]  # fmt: skip
    if unused:
        raise ValueError(
            f"{', '.join(unused)}: the vmapped sweep reads its cached features in this process "
            "and writes no checkpoints, so it would not use them; drop them, or run each cell "
            "in the Trainer, which does (jaxtl.sweep.sweep_sequential; --sequential)."
        )
    if config.scale.mesh is not None and jax.device_count() > 1:
        raise ValueError("the vmapped sweep runs on one device; drop mesh (--mesh).")
    if jax.process_count() > 1:
        raise ValueError(
            "the vmapped sweep runs in one process; run it without --distributed (its heads "
            "are small), or use jaxtl.sweep.sweep_sequential."
        )
    # One process trains every head and writes no run directory: no metrics loggers.
    return dataclasses.replace(
        config,
        data=dataclasses.replace(data, feature_cache=data.feature_cache or "memory"),
        loggers=(),
    )


def _decay_varies(config: TrainConfig, weight_decays: list[float]) -> bool:
    """Whether weight decay must be a traced (per head) value; refuses optimizers that add it
    to the gradient only when it is non-zero (a host-side test that cannot see a traced one)."""
    if len(weight_decays) == 1:
        return False
    accepted = inspect.signature(optimizer_factory(config.optim.optimizer)).parameters
    if not {"weight_decay", "weight_decay_rate"} & set(accepted):
        raise ValueError(
            f"optimizer {config.optim.optimizer!r} (--optimizer) has no weight-decay argument, "
            "so the vmapped sweep cannot vary weight_decays (--weight-decay) per head; sweep "
            "one weight decay at a time, or use jaxtl.sweep.sweep_sequential."
        )
    return True


def _load_heads(load_model: LoadModel, seeds: list[int], recipe: str | Plan):
    """``(model of the first seed, plan, the head's param paths, {seed: its head's init})``;
    every seed's backbone must be the first's."""
    if not callable(load_model) or isinstance(load_model, LoadedModel):
        raise TypeError(
            "load_model must be a function seed -> LoadedModel (each seed draws its own new "
            "head), e.g. lambda s: jaxtl.load(path, num_labels=2, seed=s)."
        )
    model = load_model(seeds[0])
    plan = make_plan(recipe, model.structure)
    head = _head_only(model, plan)
    first = flatten(model.params)
    inits = {seeds[0]: {p: np.asarray(first[p]) for p in head}}
    for seed in seeds[1:]:
        other = load_model(seed)
        flat = flatten(other.params)
        stats, stats_other = flatten(model.batch_stats or {}), flatten(other.batch_stats or {})
        same = flat.keys() == first.keys() and stats.keys() == stats_other.keys()
        same = same and all(
            p in head or np.array_equal(np.asarray(first[p]), np.asarray(flat[p])) for p in first
        )
        same = same and all(np.array_equal(stats[p], stats_other[p]) for p in stats)
        if not same:
            raise ValueError(
                f"load_model({seed}) returned another backbone than load_model({seeds[0]}) (a "
                "model loaded with pretrained=False draws it from the seed), and a vmapped sweep "
                "shares one frozen backbone. Load it pretrained, or use "
                "jaxtl.sweep.sweep_sequential."
            )
        inits[seed] = {p: np.asarray(flat[p]) for p in head}
    return model, plan, head, inits


class _Carry(NamedTuple):
    """One head's train state (stacked over the heads): its params, what the optimizer and
    the step keep, and its non-finite steps (``bad``: in a row now, most in a row so far)."""

    head: dict
    opt_state: Any
    rng: jax.Array
    step: jax.Array
    batch_stats: Any
    bad: jax.Array


class _Heads:
    """K heads as one vmapped computation over one tail model: their init, train step and
    scoring, each head with its cell's LR schedule, weight decay and seed.

    Args:
      tail: the feature-cache model (:func:`jaxtl.feature_cache.tail_model`).
      plan: the recipe's plan (trains the head only).
      config: the sweep's configuration.
      head: the head's param paths.
      cells: ``(learning rate, weight decay, seed)`` per head.
      total: the run's steps (the LR schedules span them).
      vary_decay: each head's weight decay traced; False: the one value is a constant, as in
        a single run's optimizer.
    """

    def __init__(self, tail, plan, config, head, cells, total: int, vary_decay: bool):
        self.tail, self.plan, self.config, self.head = tail, plan, config, head
        self.frozen = {p: v for p, v in flatten(tail.params).items() if p not in set(head)}
        self.trainable = tuple(map(bool, jax.tree.leaves(plan.trainable_mask(tail.params))))
        self.bn_train: tuple[str, ...] = ()
        if tail.batch_stats:  # the Trainer's own rule for which BatchNorm layers train
            from jaxtl.train.trainer import Trainer

            self.bn_train = Trainer(tail, plan, config).bn_train(plan)
        # Each cell's LR at every optimizer count, from its own schedule: optax's schedules
        # test their peak in Python, so a traced peak cannot build them.
        tables = {}
        for lr in dict.fromkeys(c[0] for c in cells):
            schedule = dataclasses.replace(config.optim, learning_rate=lr).lr_schedule(total)
            tables[lr] = np.asarray(jax.vmap(schedule)(jnp.arange(total + 1, dtype=jnp.int32)))
        self.lr_rows = jnp.asarray(np.stack([tables[c[0]] for c in cells]))
        self.fixed_decay = None if vary_decay else float(cells[0][1])
        self.decays = jnp.asarray([c[1] for c in cells], jnp.float32) if vary_decay else None
        axis = 0 if vary_decay else None
        self._init = jax.jit(jax.vmap(self._create, in_axes=(0, 0, axis, 0, None)))
        self._step = jax.jit(
            jax.vmap(self._train_step, in_axes=(0, 0, axis, 0, None, None)), donate_argnums=0
        )
        self._score = jax.jit(jax.vmap(self._eval_step, in_axes=(0, 0, None, None)))
        self.frozen_placed = jax.device_put(self.frozen)

    def _tx(self, lr_row, weight_decay):
        optim = self.config.optim
        last = lr_row.shape[0] - 1
        return self.plan.optimizer(
            lambda count: lr_row[jnp.minimum(count, last)],  # the single run's schedule(count)
            name=optim.optimizer,
            weight_decay=weight_decay if self.fixed_decay is None else self.fixed_decay,
            clip_norm=optim.clip_norm,
            l2_sp=optim.l2_sp,
            **optim.optimizer_options,
        )

    def _state(self, head, opt_state, rng, step, batch_stats, tx, frozen) -> TrainState:
        return TrainState(
            step=step,
            params=unflatten({**frozen, **head}),
            opt_state=opt_state,
            rng=rng,
            apply_fn=self.tail.forward,
            tx=tx,
            task=self.tail.task,
            batch_stats=batch_stats,
            bn_train=self.bn_train,
            loss=None,
            trainable=self.trainable,
        )

    def _create(self, head, lr_row, weight_decay, seed, frozen):
        params = unflatten({**frozen, **head})
        state = TrainState.create(
            apply_fn=self.tail.forward,
            params=params,
            tx=self._tx(lr_row, weight_decay),
            seed=seed,
            task=self.tail.task,
            batch_stats=self.tail.batch_stats,
            bn_train=self.bn_train,
            trainable=self.plan.trainable_mask(params),
        )
        bad = jnp.zeros((2,), jnp.int32)
        return _Carry(head, state.opt_state, state.rng, state.step, state.batch_stats, bad)

    def _train_step(self, carry, lr_row, weight_decay, rows, frozen, data):
        tx = self._tx(lr_row, weight_decay)
        state = self._state(*carry[:5], tx, frozen)
        batch = {k: v[rows] for k, v in data.items()}
        state, metrics = steps.train_step(state, batch, grad_accum=self.config.scale.grad_accum)
        run = jnp.where(metrics["skipped"] > 0, carry.bad[0] + 1, 0)
        bad = jnp.stack([run, jnp.maximum(carry.bad[1], run)])
        new = flatten(state.params)  # the frozen leaves are dropped: XLA never computes them
        head = {p: new[p] for p in self.head}
        carry = _Carry(head, state.opt_state, state.rng, state.step, state.batch_stats, bad)
        return carry, metrics

    def _eval_step(self, head, batch_stats, frozen, batch):
        return steps.eval_step(self._state(head, None, None, 0, batch_stats, None, frozen), batch)

    def init(self, heads: dict, seeds: list[int]):
        """The heads' train states (``heads``: each param stacked over the heads)."""
        seeds = jnp.asarray(seeds, jnp.int32)
        return self._init(heads, self.lr_rows, self.decays, seeds, self.frozen_placed)

    def step(self, carry, rows: np.ndarray, data: dict):
        """One train step of every head, head ``i`` on the examples ``rows[i]`` of ``data``."""
        return self._step(carry, self.lr_rows, self.decays, rows, self.frozen_placed, data)[0]

    def evaluate(self, head, batch_stats, arrays) -> list[dict]:
        """Each head's summarized metrics over every example of ``arrays``, summed as
        :meth:`jaxtl.Trainer.evaluate` sums them (batch by batch, padding weighted out)."""
        total = None
        for batch in evaluation_loader(arrays, self.config.data).epoch(0):
            sums = self._score(head, batch_stats, self.frozen_placed, batch)
            total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
        host = jax.device_get(total)
        k = len(next(iter(host.values())))
        task = self.tail.task
        return [summarize({n: v[i] for n, v in host.items()}, task) for i in range(k)]


class _HeadRun:
    """One head's side of the single run's loop: its tracker (best evaluation, early stopping),
    its best params for restore-best, and where and why it ended."""

    def __init__(self, tracker: Tracker, keep_best: bool):
        self.tracker, self.keep_best = tracker, keep_best
        self.best_params = None
        self.end = None  # (step, head, batch_stats) once it stopped or failed
        self.error: str | None = None

    def record(self, rec: dict, params: Callable[[], tuple]) -> None:
        """An evaluation record; ``params()``: this head's (head, batch_stats) on the host."""
        improved = self.tracker.record(rec)
        if improved and self.keep_best:
            self.best_params = params()
        if self.tracker.stopped:
            self.end = (rec["step"], *params())

    def fail(self, step: int, error: str) -> None:
        self.error, self.end = error, (step, None, None)

    def returned(self, step: int, params: tuple, restore: bool) -> tuple[int, Any, Any]:
        """``(last step, head, batch_stats)`` the single run returns: the best evaluation's
        params with restore-best (when it is not the last step), else the last step's."""
        last, head, stats = self.end or (step, *params)
        best = self.tracker.best
        if restore and best is not None and best["step"] != last and self.best_params is not None:
            head, stats = self.best_params
        return last, head, stats


def _pick(tree: Any, i: int) -> Any:
    return jax.tree.map(lambda x: x[i], tree)


def _fit(heads: _Heads, cells, carry, cached: dict, total: int) -> tuple[list[_HeadRun], Any]:
    """The single run's loop (:meth:`jaxtl.Trainer.fit`) for every head at once: steps in each
    seed's data order, evaluations every ``eval_interval`` steps and at the end, early stopping
    and restore-best per head."""
    config = heads.config
    train, bs = cached["train"], config.data.batch_size
    spe = len(train["label"]) // bs
    ck = config.checkpoint
    runs = [_HeadRun(Tracker(*ck.monitor(heads.tail.task), ck.early_stopping), ck.restores_best)
            for _ in cells]  # fmt: skip
    interval = ck.eval_interval(spe)
    data = jax.device_put(train)
    seeds = list(dict.fromkeys(c[2] for c in cells))
    order: dict[int, np.ndarray] = {}
    step = 0
    while step < total and any(r.end is None for r in runs):
        epoch, b = divmod(step, spe)
        if b == 0 or not order:  # each seed's order of the epoch: its training loader's
            order = {
                s: ArrayLoader(train, bs, shuffle=True, seed=s, drop_last=True).order(epoch)
                for s in seeds
            }
        carry = heads.step(
            carry, np.stack([order[c[2]][b * bs : (b + 1) * bs] for c in cells]), data
        )
        step += 1
        if step % interval and step != total:
            continue
        val = heads.evaluate(carry.head, carry.batch_stats, cached["validation"])
        host = functools.cache(lambda: jax.device_get((carry.head, carry.batch_stats)))  # noqa: B023
        bad = np.asarray(carry.bad)[:, 1]
        for i, run in enumerate(runs):
            if run.end is not None:
                continue
            if bad[i] >= config.max_bad_steps:
                run.fail(
                    step,
                    f"{bad[i]} non-finite steps in a row (max_bad_steps {config.max_bad_steps}) "
                    f"by step {step}: learning rate {cells[i][0]:g} is likely too high",
                )
                continue
            rec = {"split": "val", "step": step, "epoch": step / spe}
            rec.update({f"val_{m}": v for m, v in val[i].items()})
            run.record(rec, lambda i=i: _pick(host(), i))  # noqa: B023
    return runs, (step, jax.device_get((carry.head, carry.batch_stats)))


def sweep_heads(
    load_model: LoadModel,
    data: sources.TextSplits | images.ImageSplits,
    *,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    seeds: Sequence[int],
    config: TrainConfig | None = None,
    recipe: str | Plan = "linear_probe",
    long_texts: str = "truncate",
    verbose: bool = True,
) -> list[SweepCell]:
    """Train one head per cell of ``lrs x weight_decays x seeds`` at once, on a frozen backbone.

    Each cell's head equals that of the single run
    ``jaxtl.finetune(load_model(seed), recipe, data, config)`` with the cell's learning rate,
    weight decay and seed and ``feature_cache="memory"`` (see the module docstring).

    Args:
      load_model: ``seed -> model`` with its new head drawn from ``seed``, e.g.
        ``lambda s: jaxtl.load(path, num_labels=2, seed=s)``; called once per seed, and every
        seed's backbone must be the same (pretrained).
      data: train/validation/test splits (e.g. :func:`jaxtl.data.vader`).
      lrs: peak learning rates (``--lr``), each > 0.
      weight_decays: weight decays (``--weight-decay``), each >= 0.
      seeds: seeds (``--seeds``): each head's init, dropout and data order.
      config: everything else (epochs, batch size, schedule, clipping, evaluation, early
        stopping); its learning rate, weight decay and seed are the cells'. The feature cache is
        on (``"memory"`` unless ``config.data.feature_cache`` names a directory).
      recipe: a recipe that trains the head only (default ``"linear_probe"``).
      long_texts: ``"truncate"`` or ``"error"`` (:func:`jaxtl.encoding.encode_splits`).
      verbose: print what is computed.

    Returns:
      One :class:`SweepCell` per cell, learning rate first, then weight decay, then seed. A
      head whose steps stay non-finite (``max_bad_steps`` in a row, where a single run raises
      ``NonFiniteStepsError``) is a cell with ``error`` set; the others carry on.

    Raises:
      ValueError: a bad grid (naming the argument and flag), a recipe that trains more than the
        head (use :func:`sweep_sequential`), backbones that differ between seeds, or options the
        vmapped step cannot reproduce; all before anything trains.
      TypeError: ``load_model`` is not a function of the seed.
    """
    from jaxtl.encoding import encode_splits

    cells = grid_cells(lrs, weight_decays, seeds)
    config = _check_config(config or TrainConfig())
    vary_decay = _decay_varies(config, sorted({c[1] for c in cells}))
    model, plan, head, inits = _load_heads(
        load_model, list(dict.fromkeys(c[2] for c in cells)), recipe
    )
    arrays, _ = encode_splits(model, data, long_texts)
    tail, cached = feature_cache.cached_run(model, plan, config, arrays, verbose)
    n, bs = len(cached["train"]["label"]), config.data.batch_size
    if n < bs:
        raise ValueError(
            f"The training split has {n} examples, fewer than one batch of {bs}; lower "
            "batch_size (--batch-size)."
        )
    total = config.total_steps(n // bs)
    heads = _Heads(tail, plan, config, head, cells, total, vary_decay)
    if verbose:
        lr, wd, seed = (len(set(g)) for g in zip(*cells, strict=True))
        print(
            f"sweep: {len(cells)} heads ({lr} lrs x {wd} weight decays x {seed} seeds), "
            f"{total} steps of {bs}"
        )
    stacked = {p: np.stack([inits[c[2]][p] for c in cells]) for p in head}
    runs, (step, last) = _fit(
        heads, cells, heads.init(stacked, [c[2] for c in cells]), cached, total
    )
    restore = config.checkpoint.restores_best
    ended = [r.returned(step, _pick(last, i), restore) for i, r in enumerate(runs)]
    ok = [i for i, r in enumerate(runs) if r.error is None]
    tests = {}
    if ok:
        stack = lambda j: jax.tree.map(lambda *x: np.stack(x), *[ended[i][j] for i in ok])  # noqa: E731
        tests = dict(zip(ok, heads.evaluate(stack(1), stack(2), cached["test"]), strict=True))
    return [
        SweepCell(
            learning_rate=lr,
            weight_decay=wd,
            seed=s,
            validation=None if run.error else run.tracker.best,
            test=tests.get(i, {}),
            steps=ended[i][0],
            stopped_early=run.error is None and run.tracker.stopped,
            error=run.error,
            params=None if run.error else unflatten(ended[i][1]),
        )
        for i, ((lr, wd, s), run) in enumerate(zip(cells, runs, strict=True))
    ]
