"""One rule language over parameter paths: ordered ``(regex, value)`` pairs, first match wins.

Every "which params does X apply to" question in jaxtl (freezing, LR multipliers, LoRA targets,
sharding) is answered the same way, after big_vision's ``(regex, value)`` tables:

1. each leaf of a pytree gets a path, its keys joined with ``"/"`` (:mod:`jaxtl.transfer.trees`:
   ``{"bert": {"encoder": {"layer_0": {"kernel": x}}}}`` -> ``"bert/encoder/layer_0/kernel"``);
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jaxtl.transfer.trees import flatten, paths_and_leaves

__all__ = [
    "REQUIRED",
    "InvalidRuleError",
    "Rules",
    "UnmatchedParamsError",
    "match",
    "matcher",
    "search_only",
    "prefix_pattern",
    "rule_usage",
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
        compiled.append((pattern, _regex(pattern, f"rule #{i}"), value))
    return compiled


def _regex(pattern: str, where: str) -> re.Pattern[str]:
    """``pattern`` compiled, or an error that names where it came from (a rule, an option)."""
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise InvalidRuleError(
            f"{where} pattern {pattern!r} is not a valid regular expression: {e}. Patterns match "
            'whole "/"-joined param paths (re.fullmatch); escape literal characters '
            "(re.escape, or prefix_pattern() for a subtree)."
        ) from e


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
    paths, _, treedef = paths_and_leaves(tree)
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


def matcher(patterns: str | Sequence[str], what: str = "a") -> Callable[[str], bool]:
    """A predicate ``path -> bool``: whether any of ``patterns`` fully matches the path.

    The same dialect as the rule tables (:func:`re.fullmatch`), for options that name a set of
    params without values, e.g. :func:`jaxtl.load`'s ``allow_missing`` and
    ``ignore_mismatched``. A bare string is one pattern, not a sequence of characters.

    Raises:
      InvalidRuleError: a pattern is not a valid regular expression (``what`` names the option).

    Example:
      >>> allowed = matcher([prefix_pattern("bert/pooler")])
      >>> allowed("bert/pooler/dense/kernel"), allowed("bert/embeddings/word_embeddings")
      (True, False)
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    compiled = [_regex(pattern, what) for pattern in patterns]
    return lambda path: any(r.fullmatch(path) for r in compiled)


def search_only(patterns: str | Sequence[str], paths: Sequence[str]) -> list[str]:
    """The patterns that fully match none of ``paths`` but would match inside one
    (:func:`re.search`): a hint that the caller wrote a substring, not a whole-path pattern.

    Example:
      >>> search_only(["pooler/", "enc(/.*)?"], ["enc/kernel", "bert/pooler/dense/kernel"])
      ['pooler/']
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    out = []
    for pattern in patterns:
        regex = _regex(pattern, "a")
        if not any(regex.fullmatch(p) for p in paths) and any(regex.search(p) for p in paths):
            out.append(pattern)
    return out
