"""Feature cache for the linear probe: run the frozen backbone once, train the head from its
outputs.

A linear probe trains only the head, a single dense layer; everything before it is frozen. The
cache records the head's input for every example (the backbone in inference mode: no dropout,
BatchNorm on its running statistics), once, and every epoch then trains the head alone on
those features. This is the same computation as the uncached run whenever nothing random
happens before the head: no augmentation, and no dropout in the backbone or before the head.
With dropout, the cached run is the classic "extract features, then fit a classifier" recipe,
which differs from training through dropout.

Features are keyed by a fingerprint of the model (family, source, task, the frozen params'
bytes), the inputs (every array's bytes, so tokenization and image preprocessing are covered)
and the head's input path. They live in memory (for the life of the process) or, given a
directory, in ``DIR/<fingerprint>.npy``. A change to any input gives another key: a stale
cache is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models.base import LoadedModel, Structure
from jaxtl.rules import flatten, is_under, unflatten

_MEMORY: dict[str, np.ndarray] = {}


def head_path(model: LoadedModel) -> str:
    """The head's module path; the feature cache needs exactly one dense head."""
    heads = model.structure.head
    if len(heads) != 1:
        raise ValueError(
            f"The feature cache needs one head module; {model.family!r} has {list(heads)}."
        )
    leaves = {
        k.rsplit("/", 1)[1]: v for k, v in flatten(model.params).items() if is_under(k, heads[0])
    }
    if set(leaves) - {"kernel", "bias"} or np.ndim(leaves.get("kernel")) != 2:
        raise ValueError(
            f"The feature cache needs a dense head (kernel [features, outputs], bias); "
            f"{heads[0]!r} holds {sorted(leaves)}."
        )
    return heads[0]


def fingerprint(model: LoadedModel, params: Any, inputs: dict[str, np.ndarray]) -> str:
    """A key for the head inputs of ``inputs`` under the frozen part of ``params``."""
    head = head_path(model)
    h = hashlib.sha256()
    for part in (model.family, str(model.path), model.task, head):
        h.update(part.encode() + b"\0")
    for tree in (params, model.batch_stats or {}):
        for name, leaf in sorted(flatten(tree).items()):
            if not is_under(name, head):
                h.update(name.encode() + np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    for name, array in sorted(inputs.items()):
        array = np.ascontiguousarray(array)
        h.update(f"{name}{array.shape}{array.dtype}".encode() + array.tobytes())
    return h.hexdigest()[:32]


def features(
    model: LoadedModel,
    params: Any,
    inputs: dict[str, np.ndarray],
    *,
    batch_size: int = 256,
    cache_dir: str | None = None,
) -> tuple[np.ndarray, bool]:
    """The head's input for every example of ``inputs`` (model inputs, no labels), and whether
    it came from the cache."""
    key = fingerprint(model, params, inputs)
    file = os.path.join(cache_dir, f"{key}.npy") if cache_dir else None
    if file and os.path.exists(file):
        return np.load(file), True
    if not file and key in _MEMORY:
        return _MEMORY[key], True
    out = _extract(model, params, inputs, batch_size)
    if file:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = file + ".tmp.npy"
        np.save(tmp, out)
        os.replace(tmp, file)  # a crash mid-write never leaves a truncated cache entry
    else:
        _MEMORY[key] = out
    return out, False


def _extract(model: LoadedModel, params: Any, inputs: dict, batch_size: int) -> np.ndarray:
    target = tuple(head_path(model).split("/"))

    def head_input(params, batch_stats, batch):
        seen = []

        def capture(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and tuple(context.module.path) == target:
                seen.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(capture):
            model.forward.traceable(params, batch_stats, batch, train=False)
        if len(seen) != 1:
            raise ValueError(f"The head {head_path(model)!r} ran {len(seen)} times per forward.")
        return seen[0]

    run = jax.jit(head_input)
    n = len(next(iter(inputs.values())))
    batch_size = min(batch_size, n)
    chunks = []
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in inputs.items()}
        real = len(next(iter(batch.values())))
        if real < batch_size:  # pad with copies of row 0: one shape, one compile
            batch = {
                k: np.concatenate([v, np.repeat(v[:1], batch_size - real, axis=0)])
                for k, v in batch.items()
            }
        chunks.append(np.asarray(run(params, model.batch_stats, batch))[:real])
    return np.concatenate(chunks)


def head_model(model: LoadedModel) -> LoadedModel:
    """The head alone, as a model that reads ``{"features": [B, F]}``: what the cached run
    trains. Its params are the head's subtree; :func:`merge_head` puts them back."""
    head = head_path(model)
    flat = {k: v for k, v in flatten(model.params).items() if is_under(k, head)}
    kernel = next(k for k in flat if k.endswith("/kernel"))
    bias = next((k for k in flat if k.endswith("/bias")), None)

    def forward(params, batch_stats, batch, *, train=False, rng=None, bn_train=()):
        del train, rng, bn_train  # a dense layer: no dropout, no BatchNorm
        layer = flatten(params)
        out = jnp.dot(batch["features"], layer[kernel])
        if bias is not None:
            out = out + layer[bias]
        return out, batch_stats

    return dataclasses.replace(
        model,
        params=unflatten(flat),
        batch_stats={},
        structure=Structure(blocks=(), head=(head,)),
        forward=forward,
        apply=lambda params, batch, **kw: forward(params, {}, batch)[0],
    )


def merge_head(params: Any, head_params: Any) -> Any:
    """``params`` with the head's leaves replaced by ``head_params``'."""
    flat = flatten(jax.device_get(params))
    flat.update(flatten(jax.device_get(head_params)))
    return unflatten(flat)
