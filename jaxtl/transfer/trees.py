"""Param trees as "/"-joined paths: the one naming that every layer of jaxtl speaks.

Rules (:mod:`jaxtl.transfer.rules`), load reports (:mod:`jaxtl.weights.merge`), BatchNorm
layer lists, the feature cache's boundary and the plan table all name a leaf by its keys joined
with ``"/"``: ``{"bert": {"encoder": {"layer_0": {"kernel": x}}}}`` ->
``"bert/encoder/layer_0/kernel"``.
This file turns trees into such paths and back, tests prefixes at ``"/"`` boundaries, and
measures trees (element counts and bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

__all__ = [
    "count_params",
    "flatten",
    "is_under",
    "path_str",
    "paths_and_leaves",
    "tree_bytes",
    "unflatten",
]


def path_str(keypath: Iterable[Any]) -> str:
    """Joins a jax key path (from ``jax.tree_util.tree_flatten_with_path``) with ``"/"``.

    Args:
      keypath: a sequence of ``DictKey``, ``GetAttrKey``, ``SequenceKey`` or
        ``FlattenedIndexKey`` entries.

    Returns:
      e.g. ``"enc/layer_0/kernel"``; list and tuple indices appear as numbers (``"blocks/0/w"``).

    Example:
      >>> from jax.tree_util import DictKey, SequenceKey
      >>> path_str((DictKey("enc"), SequenceKey(0), DictKey("kernel")))
      'enc/0/kernel'
    """
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:  # A custom key type: its str() is the best name we have.
            parts.append(str(k))
    return "/".join(parts)


def paths_and_leaves(tree: Any) -> tuple[list[str], list[Any], Any]:
    """``(paths, leaves, treedef)`` of ``tree``, in tree order."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_str(kp) for kp, _ in leaves_with_path]
    return paths, [leaf for _, leaf in leaves_with_path], treedef


def flatten(tree: Any) -> dict[str, Any]:
    """Maps each leaf's "/"-joined path to the leaf, in tree order.

    Raises:
      ValueError: two leaves share a path (e.g. a key ``"a/b"`` beside ``{"a": {"b": ...}}``),
        which would make rules ambiguous.

    Example:
      >>> flatten({"b": {"x": 1}, "a": [2, 3]})
      {'a/0': 2, 'a/1': 3, 'b/x': 1}
    """
    paths, leaves, _ = paths_and_leaves(tree)
    out = dict(zip(paths, leaves, strict=True))
    if len(out) != len(paths):
        seen: set[str] = set()
        dupes = sorted({p for p in paths if p in seen or seen.add(p)})
        raise ValueError(
            f"Several leaves share the path(s) {dupes}: a key contains '/'. "
            "Rename the key so that every leaf has its own '/'-joined path."
        )
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts from ``{"a/b/c": leaf}``: the inverse of :func:`flatten` for dict trees.

    Example:
      >>> unflatten({"enc/kernel": 1, "enc/bias": 0})
      {'enc': {'kernel': 1, 'bias': 0}}
    """
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def is_under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` itself or lies below it (at a ``"/"`` boundary).

    Example:
      >>> is_under("enc/layer_1/kernel", "enc/layer_1"), is_under("enc/layer_10", "enc/layer_1")
      (True, False)
    """
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _leaf_size(leaf: Any) -> int:
    # ShapeDtypeStruct has .shape but no array protocol; Python scalars have neither.
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
    return int(np.prod(shape, dtype=np.int64))


def _leaf_bytes(leaf: Any) -> int:
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return _leaf_size(leaf) * np.dtype(dtype).itemsize


def count_params(tree: Any) -> int:
    """Total number of elements over the leaves (arrays or ``jax.ShapeDtypeStruct``).

    Example:
      >>> import numpy as np
      >>> count_params({"w": np.zeros((3, 4)), "b": np.zeros(4)})
      16
    """
    return sum(_leaf_size(x) for x in jax.tree.leaves(tree))


def tree_bytes(tree: Any) -> int:
    """Total bytes of the leaves (arrays, scalars or ``jax.ShapeDtypeStruct``).

    Example:
      >>> import numpy as np
      >>> tree_bytes({"w": np.zeros((3, 4), np.float32), "step": np.int32(0)})
      52
    """
    return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree))
