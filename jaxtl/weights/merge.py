"""Checked merge of a converted checkpoint into freshly initialized params, with a report.

The checkpoint arrives already renamed to the model's "/"-joined param paths (each family's
converter does that). Every model param ends up in exactly one of three states: ``loaded`` from the
checkpoint, ``initialized`` (new, e.g. the head), or left initialized because its shape
``mismatched``. Anything that would silently break a load raises instead, naming the key, the
shapes, and the option that allows it (the big_vision habit: every mismatch explained or raised).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.transfer.rules import matcher, prefix_pattern, search_only
from jaxtl.transfer.trees import flatten, is_under, unflatten


class Mismatch(NamedTuple):
    """A checkpoint tensor whose shape differs from the model param of the same path."""

    path: str
    ckpt_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclasses.dataclass
class LoadReport:
    """What a checked load did, param by param ("/"-joined model paths).

    Attributes:
      loaded: params taken from the checkpoint.
      initialized: params that kept their fresh initialization because the checkpoint has no
        tensor for them (a new head) or because they sit in a head that was re-initialized.
      unexpected: checkpoint tensors that no model param uses (e.g. a pooler under mean pooling,
        a pretraining head).
      mismatched: params whose checkpoint shape differs; they kept their initialization.
      source: where the checkpoint came from.
      sizes: element count of every entry above (for the summary table).
      placement: where the params were put, when loaded onto a mesh (``jaxtl.load(mesh=...)``):
        the mesh and how much of the params one device holds; ``None``: the default device.
    """

    loaded: list[str] = dataclasses.field(default_factory=list)
    initialized: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[Mismatch] = dataclasses.field(default_factory=list)
    source: str | None = None
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    placement: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as JSON-able builtins."""
        return {
            "source": self.source,
            "loaded": list(self.loaded),
            "initialized": list(self.initialized),
            "unexpected": list(self.unexpected),
            "mismatched": [
                {
                    "path": m.path,
                    "ckpt_shape": list(m.ckpt_shape),
                    "model_shape": list(m.model_shape),
                }
                for m in self.mismatched
            ],
            "placement": self.placement,
        }

    def include(self, other: LoadReport, prefix: str) -> None:
        """Adds another collection's report (e.g. BatchNorm statistics) under ``prefix``."""
        self.loaded += [prefix + p for p in other.loaded]
        self.initialized += [prefix + p for p in other.initialized]
        self.unexpected += [prefix + p for p in other.unexpected]
        self.mismatched += [m._replace(path=prefix + m.path) for m in other.mismatched]
        self.sizes.update({prefix + p: n for p, n in other.sizes.items()})

    def table(self, max_names: int = 8) -> str:
        """Returns a short human-readable summary: counts, sizes, and the notable names."""

        def count(names: Iterable[str]) -> str:
            names = list(names)
            n = sum(self.sizes.get(p, 0) for p in names)
            return f"{len(names):5d} tensors {n:>12,d} values"

        def listing(names: Sequence[str]) -> str:
            shown = ", ".join(names[:max_names])
            more = f", ... (+{len(names) - max_names})" if len(names) > max_names else ""
            return f": {shown}{more}" if names else ""

        lines = [f"LoadReport({self.source or 'checkpoint'})"]
        lines.append(f"  loaded      {count(self.loaded)}")
        lines.append(f"  initialized {count(self.initialized)}{listing(self.initialized)}")
        lines.append(f"  unexpected  {count(self.unexpected)}{listing(self.unexpected)}")
        lines.append(f"  mismatched  {count(m.path for m in self.mismatched)}")
        for m in self.mismatched:
            lines.append(f"    {m.path}: checkpoint {m.ckpt_shape} vs model {m.model_shape}")
        if self.placement:
            lines.append(f"  placed on   {self.placement}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def merge_checkpoint(
    init_params: Mapping[str, Any],
    checkpoint: Mapping[str, np.ndarray],
    *,
    head: Sequence[str] = (),
    ignore_mismatched: Sequence[str] = (),
    allow_missing: Sequence[str] = (),
    initializer: Callable[[str, Any], Any] | None = None,
    source: str | None = None,
    described_model: str | None = None,
    place: Callable[[str, Any], Any] | None = None,
) -> tuple[dict[str, Any], LoadReport]:
    """Merges checkpoint tensors into freshly initialized params.

    Args:
      init_params: the model's param tree (nested dicts). Leaves are initialized arrays, or
        ``jax.ShapeDtypeStruct`` placeholders that ``initializer`` materializes only where the
        checkpoint does not supply the value (so a large model is not initialized twice).
      checkpoint: ``{model path: array}``, already renamed and laid out by the family converter;
        names that are not model paths (e.g. unconverted pretraining heads) count as unexpected.
      head: path prefixes of the task head. A head may be absent from the checkpoint (then it
        stays initialized) or have other shapes (then the whole head is re-initialized).
      ignore_mismatched: patterns of non-head params allowed to keep their initialization when
        the checkpoint shape differs. The rule language's dialect
        (:func:`jaxtl.transfer.rules.matcher`): each pattern must match a whole "/"-joined path
        (``re.fullmatch``), e.g. ``prefix_pattern("bert/pooler")`` or ``r".*/query/kernel"``.
      allow_missing: patterns (the same dialect) of non-head params allowed to be absent from
        the checkpoint.
      initializer: ``initializer(path, placeholder) -> array`` for placeholder leaves.
      source: where the checkpoint came from, for the report.
      described_model: what ``init_params`` are, for messages (e.g. "the 'bert' model that
        DIR/config.json describes").
      place: ``place(path, value) -> array`` puts each leaf of the result where it lives: a
        checkpoint tensor comes as a numpy array already in the leaf's dtype, an initialized
        leaf as ``initializer`` made it (e.g. split over a mesh shard by shard,
        :func:`jaxtl.parallel.put_from_host`). Default: ``jnp.asarray`` (the default device).

    Returns:
      ``(params, report)``: params in the init tree's structure, shapes and dtypes.

    Raises:
      ValueError: a non-head shape mismatch not allowed by ``ignore_mismatched``, or non-head
        params absent from the checkpoint and not allowed by ``allow_missing``.

    Example:
      >>> init = {"enc": {"kernel": jnp.zeros((2, 2))}, "classifier": {"bias": jnp.zeros(3)}}
      >>> params, report = merge_checkpoint(
      ...     init, {"enc/kernel": np.ones((2, 2), np.float32)}, head=("classifier",))
      >>> report.loaded, report.initialized
      (['enc/kernel'], ['classifier/bias'])
    """
    model = flatten(init_params)
    in_head = _prefix_matcher(head)
    mismatch_ok = matcher(ignore_mismatched, "ignore_mismatched")
    missing_ok = matcher(allow_missing, "allow_missing")

    report = LoadReport(source=source)
    errors: list[Mismatch] = []
    missing: list[str] = []
    for path, init in model.items():
        report.sizes[path] = int(math.prod(init.shape))
        if path not in checkpoint:
            if not (in_head(path) or missing_ok(path)):
                missing.append(path)
            report.initialized.append(path)
        elif tuple(checkpoint[path].shape) != tuple(init.shape):
            mismatch = Mismatch(path, tuple(checkpoint[path].shape), tuple(init.shape))
            if not (in_head(path) or mismatch_ok(path)):
                errors.append(mismatch)
            report.mismatched.append(mismatch)
        else:
            report.loaded.append(path)
    if errors:
        hint = _substring_hint(ignore_mismatched, [m.path for m in errors], "ignore_mismatched")
        raise ValueError(_mismatch_message(errors, head) + hint)
    if missing:
        hint = _substring_hint(allow_missing, missing, "allow_missing")
        message = _missing_message(missing, checkpoint, model, head, source, described_model)
        raise ValueError(message + hint)

    # A head is one unit: if any of its params mismatched, a half-loaded head (say a 3-label bias
    # next to a fresh 2-label kernel) is meaningless, so every param under it is re-initialized.
    bad_heads = [h for h in head if any(is_under(m.path, h) for m in report.mismatched)]
    reinit = [p for p in report.loaded if any(is_under(p, h) for h in bad_heads)]
    report.loaded = [p for p in report.loaded if p not in reinit]
    report.initialized += reinit

    loaded = set(report.loaded)
    merged: dict[str, Any] = {}
    for path, init in model.items():
        if path in loaded:
            if place is None:
                merged[path] = jnp.asarray(checkpoint[path], dtype=init.dtype)
            else:  # cast on the host: no device holds the whole tensor unless placed so
                merged[path] = place(path, np.asarray(checkpoint[path], dtype=init.dtype))
        elif isinstance(init, jax.ShapeDtypeStruct):
            if initializer is None:
                raise ValueError(f"{path} needs initializing but no initializer was given.")
            merged[path] = initializer(path, init)
            if place is not None:
                merged[path] = place(path, merged[path])
        else:
            merged[path] = init if place is None else place(path, init)
    report.unexpected = [name for name in checkpoint if name not in model]
    report.sizes.update({name: int(np.size(checkpoint[name])) for name in report.unexpected})
    return unflatten(merged), report


def _prefix_matcher(prefixes: Sequence[str]):
    return lambda path: any(is_under(path, p) for p in prefixes)


def _substring_hint(patterns: Sequence[str], paths: Sequence[str], option: str) -> str:
    """Names the patterns that were written as substrings (``re.search`` style): they match
    inside these paths but not a whole path, which is what the rule language requires."""
    near = search_only(patterns, paths)
    if not near:
        return ""
    fixes = ", ".join(f"{p!r} -> {'.*' + p.strip('^$') + '.*'!r}" for p in near)
    return (
        f'\nNote: {option} patterns must match a whole "/"-joined path (re.fullmatch, as in '
        f"every jaxtl rule); these only match part of one: {fixes}."
    )


def _mismatch_message(errors: list[Mismatch], head: Sequence[str]) -> str:
    lines = [
        f"{len(errors)} checkpoint tensor(s) have a different shape than the model expects, "
        f"outside the head {tuple(head)}:"
    ]
    lines += [f"  {m.path}: checkpoint {m.ckpt_shape}, model {m.model_shape}" for m in errors[:10]]
    if len(errors) > 10:
        lines.append(f"  ... and {len(errors) - 10} more")
    example = "|".join(re.escape(m.path) for m in errors[:3])
    lines.append(
        "This usually means config.json does not describe these weights. To start these params "
        f"from random init instead, pass ignore_mismatched=(r'{example}',) (patterns match "
        "whole param paths)."
    )
    return "\n".join(lines)


def _missing_message(
    missing: list[str],
    checkpoint: Mapping[str, Any],
    model: Mapping[str, Any],
    head: Sequence[str],
    source: str | None,
    described_model: str | None,
) -> str:
    unused = [n for n in checkpoint if n not in model]
    source = source or "the checkpoint"
    described_model = described_model or "the model"
    if checkpoint and len(unused) == len(checkpoint):
        # Not one name in common: the weights are another architecture, and allow_missing would
        # only start the whole model from random init, so it is not offered.
        return (
            f"None of the {len(checkpoint)} tensors in {source} is a param of {described_model}: "
            f"it expects e.g. {missing[:3]}, the weights hold e.g. {unused[:3]}. The weights are "
            "of another architecture than the config says (e.g. a GPT-2 model.safetensors beside "
            "a BERT config.json): put the config.json saved with these weights beside them."
        )
    lines = [
        f"{source} has no tensor for {len(missing)} of the {len(model)} params of "
        f"{described_model} outside the head {tuple(head)}, e.g.:"
    ]
    lines += [f"  {p}" for p in missing[:10]]
    if unused:
        lines.append(
            f"Checkpoint tensors that matched no param ({len(unused)}), e.g. {unused[:5]}: if "
            "these look like the missing ones, the names did not map (wrong family or prefix)."
        )
    prefix = "/".join(missing[0].split("/")[:2])
    lines.append(
        "Loading would leave these params at random init. If that is intended, pass "
        f"allow_missing=(r'{prefix_pattern(prefix)}',) (patterns match whole param paths)."
    )
    return "\n".join(lines)
