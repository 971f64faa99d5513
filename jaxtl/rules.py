"""One rule language over parameter paths: ordered ``(regex, value)`` pairs, first match wins.

Every "which params does X apply to" question in jaxtl (freezing, LR multipliers, LoRA targets,
sharding) is answered the same way, after big_vision's ``(regex, value)`` tables:

1. each leaf of a pytree gets a path, its keys joined with ``"/"``
   (``{"bert": {"encoder": {"layer_0": {"kernel": x}}}}`` -> ``"bert/encoder/layer_0/kernel"``);
2. the rules are tried in order and the first whose pattern :func:`re.fullmatch` es the whole
   path gives the leaf's value;
3. a leaf that no rule matches is an error (:class:`UnmatchedParamsError`) unless the caller
   declared a ``default=``. Silently leaving a param out of a plan is the bug this prevents.

Full matching (not :func:`re.search`) means ``"classifier"`` matches only the path
``"classifier"``; use :func:`prefix_pattern` (``"classifier(/.*)?"``) for a subtree.

Example:
  >>> import numpy as np
  >>> params = {"enc": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}, "head": np.zeros(2)}
  >>> tree_from_rules(params, [(".*/bias", 0.0), (prefix_pattern("enc"), 1.0), (".*", 2.0)])
  {'enc': {'bias': 0.0, 'kernel': 1.0}, 'head': 2.0}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "REQUIRED",
    "InvalidRuleError",
    "Rules",
    "UnmatchedParamsError",
    "count_params",
    "flatten",
    "match",
    "path_str",
    "prefix_pattern",
    "rule_usage",
    "tree_bytes",
    "tree_from_rules",
    "unused_rules",
]

# Ordered (pattern, value) pairs. A Mapping is accepted too: dicts keep insertion order.
Rules = Sequence[tuple[str, Any]] | Mapping[str, Any]

# How many unmatched paths an error lists before it says "... and N more".
_MAX_LISTED = 10


class _Required:
    """Sentinel type for "no default declared": ``None`` is a legitimate rule value."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class InvalidRuleError(ValueError):
    """A rule is malformed: not a ``(pattern, value)`` pair, or its pattern is not a regex."""


class UnmatchedParamsError(ValueError):
    """Some params match no rule and no ``default=`` was declared.

    Attributes:
      paths: every unmatched path, in tree order.
      patterns: the patterns that were tried, in order.
    """

    def __init__(self, paths: Sequence[str], rules: Sequence[tuple[str, Any]]):
        self.paths = tuple(paths)
        self.patterns = tuple(p for p, _ in rules)
        listed = "\n".join(f"  {p}" for p in self.paths[:_MAX_LISTED])
        if len(self.paths) > _MAX_LISTED:
            listed += f"\n  ... and {len(self.paths) - _MAX_LISTED} more"
        tried = "\n".join(f"  {p!r} -> {v!r}" for p, v in rules) or "  (no rules)"
        super().__init__(
            f"{len(self.paths)} param(s) match no rule and no default= was given:\n{listed}\n"
            f"Rules tried, in order (first re.fullmatch wins):\n{tried}\n"
            'Fix: add a catch-all rule last, e.g. (".*", <value>), widen a pattern '
            '(prefix_pattern("enc") matches "enc" and everything below it), '
            "or pass default=<value>."
        )


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


def _paths_and_leaves(tree: Any) -> tuple[list[str], list[Any], Any]:
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
    paths, leaves, _ = _paths_and_leaves(tree)
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


def prefix_pattern(prefix: str) -> str:
    """A pattern matching ``prefix`` itself and every path below it.

    ``prefix_pattern("enc/layer_1")`` matches ``"enc/layer_1/kernel"`` but not
    ``"enc/layer_10/kernel"``: the escape makes every character literal and the match ends at a
    ``"/"`` boundary.

    Example:
      >>> prefix_pattern("enc/layer_1")
      'enc/layer_1(/.*)?'
    """
    prefix = prefix.strip("/")
    if not prefix:
        raise ValueError('prefix_pattern needs a non-empty prefix; use ".*" to match everything.')
    return re.escape(prefix) + "(/.*)?"


def _compile(rules: Rules) -> list[tuple[str, re.Pattern[str], Any]]:
    """Validates rules up front, so a bad one fails before any tree is walked."""
    if isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, str | bytes):
        raise InvalidRuleError(
            f"rules must be a sequence of (pattern, value) pairs, got the string {rules!r}."
        )
    else:
        items = list(rules)
    compiled = []
    for i, item in enumerate(items):
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            hint = ""
            if isinstance(item, str):
                hint = ' (a single rule must still be wrapped in a list: [("pattern", value)])'
            raise InvalidRuleError(
                f"rule #{i} is {item!r}; expected a (pattern: str, value) pair{hint}."
            )
        pattern, value = item
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise InvalidRuleError(
                f"rule #{i} pattern {pattern!r} is not a valid regular expression: {e}. "
                r"Escape literal characters (re.escape, or prefix_pattern() for a subtree)."
            ) from e
        compiled.append((pattern, regex, value))
    return compiled


def _first_match(compiled: list[tuple[str, re.Pattern[str], Any]], path: str) -> int | None:
    for i, (_, regex, _) in enumerate(compiled):
        if regex.fullmatch(path):
            return i
    return None


def match(rules: Rules, path: str, default: Any = REQUIRED) -> Any:
    """The value of the first rule whose pattern fully matches ``path``.

    Args:
      rules: ordered ``(pattern, value)`` pairs.
      path: a "/"-joined param path.
      default: returned when nothing matches; if not given, that is an error.

    Raises:
      UnmatchedParamsError: nothing matches and no default was given.
      InvalidRuleError: a rule is malformed.

    Example:
      >>> match([("enc/.*", "body"), (".*", "rest")], "enc/kernel")
      'body'
    """
    compiled = _compile(rules)
    i = _first_match(compiled, path)
    if i is not None:
        return compiled[i][2]
    if default is REQUIRED:
        raise UnmatchedParamsError([path], [(p, v) for p, _, v in compiled])
    return default


def tree_from_rules(tree: Any, rules: Rules, default: Any = REQUIRED) -> Any:
    """A tree shaped like ``tree`` whose leaves are the rule values of its paths.

    Args:
      tree: any pytree (params, gradients, ``jax.eval_shape`` structs).
      rules: ordered ``(pattern, value)`` pairs; first :func:`re.fullmatch` wins.
      default: the value for leaves no rule matches; if not given, such leaves are an error.

    Returns:
      A pytree with ``tree``'s structure. (A value of ``None`` is stored as a leaf, but a later
      ``jax.tree.map`` over the result will treat it as an empty subtree, as JAX does.)

    Raises:
      UnmatchedParamsError: a leaf matches no rule and no default was given; the message lists
        the unmatched paths and the rules tried.
      InvalidRuleError: a rule is malformed.

    Example:
      >>> tree_from_rules({"a": 1, "b": {"c": 2}}, [("b/.*", True)], default=False)
      {'a': False, 'b': {'c': True}}
    """
    compiled = _compile(rules)
    paths, _, treedef = _paths_and_leaves(tree)
    values, unmatched = [], []
    for path in paths:
        i = _first_match(compiled, path)
        if i is None:
            unmatched.append(path)
            values.append(default)
        else:
            values.append(compiled[i][2])
    if unmatched and default is REQUIRED:
        raise UnmatchedParamsError(unmatched, [(p, v) for p, _, v in compiled])
    return jax.tree_util.tree_unflatten(treedef, values)


def rule_usage(tree: Any, rules: Rules) -> list[list[str]]:
    """For each rule, in order, the paths it wins under first-match-wins.

    Example:
      >>> rule_usage({"a": 1, "b": 2}, [("a", 0), (".*", 1), ("b", 2)])
      [['a'], ['b'], []]
    """
    compiled = _compile(rules)
    won: list[list[str]] = [[] for _ in compiled]
    for path in flatten(tree):
        i = _first_match(compiled, path)
        if i is not None:
            won[i].append(path)
    return won


def unused_rules(tree: Any, rules: Rules) -> list[tuple[str, Any]]:
    """Rules that win no leaf of ``tree``: they match nothing, or only leaves an earlier rule won.

    Such a rule is usually a typo or a misordered table. Reported, not raised: a generic recipe
    may name parts (a pooler, a neck) that some models lack.

    Example:
      >>> unused_rules({"a": 1}, [("a", 0), ("typo", 1), (".*", 2)])
      [('typo', 1), ('.*', 2)]
    """
    compiled = _compile(rules)
    return [
        (p, v) for (p, _, v), won in zip(compiled, rule_usage(tree, rules), strict=True) if not won
    ]


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
