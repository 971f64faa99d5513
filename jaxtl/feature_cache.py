"""Feature cache: run a recipe's frozen prefix once, train the rest from its outputs.

A linear probe trains only the head; ``last_n(2)`` trains the last two blocks, the neck and
the head. Everything the forward pass computes before the first trained module (the
*boundary*: the head, or ``blocks[-n]``) is then a fixed function of the input. The cache
records the boundary's input for every example, once, with the model in inference mode (no
dropout, BatchNorm on its running statistics), and every training step feeds it straight to
the boundary.

The cached model (:func:`tail_model`) is the whole model with one change: the boundary's first
argument is replaced by the cached activation. It keeps every param and every other input
(attention masks, ...); the prefix is still traced but its result is unused, so XLA drops it
from the compiled step. The trained params are therefore the whole tree, dropout draws the
same random bits as in the uncached run, and BatchNorm layers in the trained blocks update as
they would. Image models do not get their pixels back: a zero array of the same shape stands
in, and is discarded with the prefix (image models read pixels only before their first block).

This is the same computation as the uncached run whenever nothing random happens in the
prefix: no augmentation (refused), no BatchNorm trained on batch statistics before the boundary
(refused), and no dropout there. With dropout in the prefix the cached run is the classic
"extract features, then fit" recipe, which differs from training through dropout.

Activations are keyed by a fingerprint of the model (family, source, task), the boundary, the
params that can reach the boundary (all but those of the boundary and what follows it), and
the inputs (every array's bytes, so tokenization and image preprocessing are covered). They
live in memory (for the life of the process) or, given a directory, in
``DIR/<fingerprint>.npy``. A change to any of them gives another key: a stale cache is never
read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.data.text import bucket_for, bucket_lengths, token_arrays
from jaxtl.models.base import LoadedModel
from jaxtl.models.common import batch_norm_paths, forward_functions
from jaxtl.train.config import TrainConfig
from jaxtl.transfer.plan import Plan
from jaxtl.transfer.trees import flatten, is_under

_MEMORY: dict[str, np.ndarray] = {}

PIXELS = "pixel_values"


def boundary(model: LoadedModel, trainable: Mapping[str, bool]) -> str | None:
    """The first trained part of ``model``: the first of its blocks, neck and head (in that
    order) holding a param that ``trainable`` (``{path: bool}``) marks. ``None`` when the stem
    trains (nothing frozen comes first) or nothing trains."""
    s = model.structure
    trains = [p for p, on in trainable.items() if on]
    if not trains or any(is_under(p, part) for p in trains for part in s.stem):
        return None
    for part in (*s.blocks, *s.neck, *s.head):
        if any(is_under(p, part) for p in trains):
            return part
    return None


def check_options(config: Any, plan: Plan) -> None:
    """Refuse what a cached run cannot do with ``config`` (a :class:`jaxtl.TrainConfig` whose
    ``feature_cache`` is set) and ``plan``, before anything is encoded or compiled.

    Raises:
      ValueError: remat or a precision other than float32 (the tail model's forward cannot be
        rebuilt for them), or a plan with adapters in every block (no frozen prefix).
    """
    if not config.data.feature_cache:
        return
    if config.scale.remat is not None or config.scale.precision != "float32":
        raise ValueError(
            "feature_cache (--feature-cache) trains a tail model whose forward cannot be "
            "rebuilt for remat (--remat) or precision (--precision); drop one of them."
        )
    if plan.adapters is not None:
        raise ValueError(
            f"feature_cache (--feature-cache) caches a frozen prefix, but {plan.name} puts "
            "adapters in every block from the first; drop one of them."
        )


def applies(model: LoadedModel, plan: Plan) -> bool:
    """Whether ``plan`` (a :class:`jaxtl.Plan`) leaves a frozen prefix to cache; for a staged
    plan, its first stage (the one the cache serves: LP-FT's probe, gradual's head stage)."""
    plan = plan.stages[0].plan if plan.stages else plan
    return boundary(model, flatten(plan.trainable_mask(model.params))) is not None


def _after(model: LoadedModel, at: str) -> tuple[str, ...]:
    """The structure parts from ``at`` on: params the boundary's input cannot depend on."""
    parts = (*model.structure.blocks, *model.structure.neck, *model.structure.head)
    return parts[parts.index(at) :]


def _outermost(act):
    """A method interceptor that calls ``act(next_fun, args, kwargs, path, method)`` for the
    outermost call at each module path only: a module sharing its parent's scope (a new head's
    inner module, :mod:`jaxtl.surgery`) runs at the parent's path, inside the parent's call."""
    active: set[str] = set()

    def intercept(next_fun, args, kwargs, context):
        path = "/".join(context.module.path)
        if path in active:
            return next_fun(*args, **kwargs)
        active.add(path)
        try:
            return act(next_fun, args, kwargs, path, context.method_name)
        finally:
            active.discard(path)

    return intercept


def call_order(model: LoadedModel, inputs: Mapping[str, np.ndarray]) -> list[str]:
    """The "/"-joined path of every module call (``__call__``) of one forward pass, in order
    (one abstract trace, no compile); calls nested at their caller's path are the caller's."""
    calls: list[str] = []

    @_outermost
    def record(next_fun, args, kwargs, path, method):
        if method == "__call__":
            calls.append(path)
        return next_fun(*args, **kwargs)

    one = {k: np.asarray(v)[:1] for k, v in inputs.items()}

    def forward(params, batch_stats, batch):
        with nn.intercept_methods(record):
            return model.forward.traceable(params, batch_stats, batch, train=False)

    jax.eval_shape(forward, model.params, model.batch_stats, one)
    return calls


def check_prefix(
    model: LoadedModel,
    trainable: Mapping[str, bool],
    inputs: Mapping[str, np.ndarray],
    train_bn: bool = False,
) -> str:
    """The boundary for a plan's ``trainable`` mask, checked against one real forward pass:
    the boundary runs exactly once, and every trained param (and, with ``train_bn``, every
    BatchNorm) belongs to a module first called at or after it. Raises ValueError otherwise."""
    at = boundary(model, trainable)
    if at is None:
        raise ValueError(
            "feature_cache needs a frozen prefix before the trained part (linear_probe, "
            "last_n(k)); this recipe trains from the stem on. Drop feature_cache for it."
        )
    calls = call_order(model, inputs)
    if calls.count(at) != 1:
        raise ValueError(
            f"feature_cache: {at!r} runs {calls.count(at)} times per forward pass; the cache "
            "needs the first trained module to run exactly once."
        )
    first = {}
    for i, path in enumerate(calls):
        first.setdefault(path, i)
    start = first[at]

    def before(module: str) -> bool:
        return first.get(module, start) < start and not is_under(module, at)

    early = [p for p, on in trainable.items() if on and before(p.rpartition("/")[0])]
    if early:
        raise ValueError(
            f"feature_cache: {early[0]!r} trains but runs before {at!r}, where the cache would "
            "start; drop feature_cache for this recipe."
        )
    if train_bn:
        bns = [p for p in batch_norm_paths(model.batch_stats) if before(p)]
        if bns:
            raise ValueError(
                f"feature_cache: train_bn updates the BatchNorm {bns[0]!r} before {at!r}, so the "
                "frozen prefix is not a fixed function; drop train_bn or feature_cache."
            )
    return at


def fingerprint(model: LoadedModel, params: Any, inputs: dict[str, np.ndarray], at: str) -> str:
    """A key for the activations at ``at`` of ``inputs`` under ``params``."""
    after = _after(model, at)
    h = hashlib.sha256()
    for part in (model.family, str(model.path), model.task, at):
        h.update(part.encode() + b"\0")
    for tree in (params, model.batch_stats or {}):
        for name, leaf in sorted(flatten(tree).items()):
            if not any(is_under(name, part) for part in after):
                h.update(name.encode() + np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    for name, array in sorted(inputs.items()):
        array = np.ascontiguousarray(array)
        h.update(f"{name}{array.shape}{array.dtype}".encode() + array.tobytes())
    return h.hexdigest()[:32]


def features(
    model: LoadedModel,
    params: Any,
    inputs: dict[str, np.ndarray],
    at: str,
    *,
    batch_size: int = 256,
    cache_dir: str | None = None,
) -> tuple[np.ndarray, bool]:
    """The input of module ``at`` for every example of ``inputs`` (model inputs, no labels),
    and whether it came from the cache."""
    key = fingerprint(model, params, inputs, at)
    file = os.path.join(cache_dir, f"{key}.npy") if cache_dir else None
    if file and os.path.exists(file):
        return np.load(file), True
    if not file and key in _MEMORY:
        return _MEMORY[key], True
    out = _extract(model, params, inputs, at, batch_size)
    if file:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = file + ".tmp.npy"
        np.save(tmp, out)
        os.replace(tmp, file)  # a crash mid-write never leaves a truncated cache entry
    else:
        _MEMORY[key] = out
    return out, False


def _run_capturing(traceable, at: str, params, batch_stats, batch, **options):
    """``(traceable(...)'s outputs, what module at received as its first argument)``; the
    module must run exactly once."""
    seen = []

    @_outermost
    def capture(next_fun, args, kwargs, path, method):
        if method == "__call__" and path == at:
            seen.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        out = traceable(params, batch_stats, batch, **options)
    if len(seen) != 1:
        raise ValueError(f"{at!r} ran {len(seen)} times per forward pass.")
    return out, seen[0]


def forward_with_input(model: LoadedModel, at: str):
    """``run(params, batch_stats, batch, *, train, rng, bn_train) -> ((outputs, batch_stats),
    input of module at)``: ``model``'s forward (traceable, differentiable) that also hands back
    what module ``at`` received as its first argument (e.g. the head's features)."""

    def run(params, batch_stats, batch, *, train=False, rng=None, bn_train=()):
        return _run_capturing(model.forward.traceable, at, params, batch_stats, batch,
                              train=train, rng=rng, bn_train=bn_train)  # fmt: skip

    return run


@functools.partial(jax.jit, static_argnames=("traceable", "at"))
def _boundary_input(params, batch_stats, batch, *, traceable, at: str):
    """What module ``at`` receives as its first argument in ``traceable``'s inference forward.
    One jit for every split and run of a model: the chunks share their shapes."""
    return _run_capturing(traceable, at, params, batch_stats, batch, train=False)[1]


def _extract(model: LoadedModel, params: Any, inputs: dict, at: str, batch_size: int):
    """The boundary's input for every example, in chunks of ``batch_size`` rows (the last one
    padded: one shape per width). Texts run grouped by length bucket, each group cut to its
    bucket: their padding is masked out, so the real tokens' activations do not depend on it,
    and most texts are much shorter than the longest. Per-token activations are stored at the
    full padded length, zero beyond each group's width."""

    boundary_input = functools.partial(_boundary_input, traceable=model.forward.traceable, at=at)
    n = len(next(iter(inputs.values())))
    batch_size = min(batch_size, n)
    tokens = token_arrays(inputs)
    full = jax.eval_shape(boundary_input, params, model.batch_stats, inputs)
    if tokens:
        length = inputs["attention_mask"].shape[1]
        buckets = bucket_lengths(length)
        widths = np.array([bucket_for(int(k), buckets) for k in inputs["attention_mask"].sum(1)])
        groups = [(w, np.flatnonzero(widths == w)) for w in buckets]
        narrow = {k: v[:, : buckets[0]] if k in tokens else v for k, v in inputs.items()}
        # Per-token activations have the token axis second: it follows the inputs' width.
        per_token = jax.eval_shape(boundary_input, params, model.batch_stats, narrow).shape
        per_token = len(per_token) > 1 and per_token[1] != full.shape[1]
    else:
        groups, per_token = [(None, np.arange(n))], False
    out = np.zeros(full.shape, full.dtype)
    for width, rows in groups:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            real = len(chunk)
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real)])
            batch = {k: v[chunk, :width] if k in tokens else v[chunk] for k, v in inputs.items()}
            got = np.asarray(boundary_input(params, model.batch_stats, batch))[:real]
            if per_token:
                out[chunk[:real], :width] = got
            else:
                out[chunk[:real]] = got
    return out


def tail_model(model: LoadedModel, at: str, pixels: jax.ShapeDtypeStruct | None) -> LoadedModel:
    """``model`` reading ``{"features": input of at, other inputs}``: the boundary's first
    argument is the cached activation. ``pixels`` (one example's shape and dtype) for an image
    model, whose pixels the batch no longer carries."""

    def run(params, batch_stats, batch, train, rng, bn_train):
        feats = batch["features"]
        inputs = {k: v for k, v in batch.items() if k != "features"}
        if pixels is not None:  # only the discarded prefix reads them
            inputs[PIXELS] = jnp.zeros((feats.shape[0], *pixels.shape), pixels.dtype)

        @_outermost
        def swap(next_fun, args, kwargs, path, method):
            if method == "__call__" and path == at:
                args = (feats.astype(args[0].dtype), *args[1:])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(swap):
            return model.forward.traceable(
                params, batch_stats, inputs, train=train, rng=rng, bn_train=bn_train
            )

    apply, forward = forward_functions(run, lambda batch: batch, bool(model.batch_stats))
    return dataclasses.replace(model, forward=forward, apply=apply)


def split_inputs(arrays: Mapping[str, np.ndarray]) -> tuple[dict, jax.ShapeDtypeStruct | None]:
    """``(inputs the tail still reads, pixel shape or None)`` of one split's model inputs."""
    kept = {k: v for k, v in arrays.items() if k != PIXELS}
    if PIXELS not in arrays:
        return kept, None
    pixels = np.asarray(arrays[PIXELS])
    return kept, jax.ShapeDtypeStruct(pixels.shape[1:], pixels.dtype)


def cached_run(
    model: LoadedModel, plan: Plan, config: TrainConfig, arrays: dict, verbose: bool = True
) -> tuple[LoadedModel, dict]:
    """``config.data.feature_cache`` for one run: the model that reads cached activations at
    the plan's first trained module and, per split, those activations in place of the inputs
    only the frozen prefix reads. Refused where it would change the computation (see the
    module docstring).

    Args:
      model: the run's model (its params are the frozen prefix's).
      plan: the run's plan; its first trained module is the boundary.
      config: the run's configuration (``data.feature_cache``: ``"memory"`` or a directory).
      arrays: ``{split: arrays}`` from :func:`jaxtl.encoding.encode_splits`.
      verbose: print what was computed or read from the cache.
    """
    data = config.data
    if data.augment or data.mixup or data.cutmix:
        raise ValueError(
            "feature_cache (--feature-cache) computes the frozen prefix's output once, so it "
            f"cannot see random augmentation (augment={data.augment!r}, mixup={data.mixup}, "
            f"cutmix={data.cutmix}); drop one of the two."
        )
    if config.precise_bn:
        raise ValueError(
            "precise_bn recomputes BatchNorm statistics from the training images, which a "
            "feature_cache (--feature-cache) run no longer feeds through the model; drop one of "
            "the two."
        )
    trainable = flatten(plan.trainable_mask(model.params))
    # Targets, and question answering's context offsets, pass beside the features.
    beside = ("label", "offsets")
    inputs = {s: {k: v for k, v in a.items() if k not in beside} for s, a in arrays.items()}
    try:
        at = check_prefix(model, trainable, inputs["train"], config.train_bn)
    except ValueError as e:
        raise ValueError(f"recipe {plan.name!r}: {e}") from None
    cache_dir = None if data.feature_cache == "memory" else data.feature_cache
    out, pixels = {}, None
    for split, x in inputs.items():
        # Twice the training batch: no gradients are kept, and on this CPU 64 beat 32 and 256
        # (benchmarks/README.md).
        feats, hit = features(
            model, model.params, x, at, batch_size=2 * data.batch_size, cache_dir=cache_dir
        )
        out[split], pixels = split_inputs(x)
        out[split]["features"] = feats
        out[split].update({k: arrays[split][k] for k in beside if k in arrays[split]})
        if verbose:
            how = "read from the cache" if hit else "computed"
            print(f"feature cache: {split} {feats.shape} at {at} {how} ({data.feature_cache})")
    return tail_model(model, at, pixels), out
