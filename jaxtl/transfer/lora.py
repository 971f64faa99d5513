"""LoRA on param trees: which kernels get adapters, the adapters themselves, and their plan.

LoRA (Hu et al. 2021) trains a low-rank update of a frozen kernel: ``W + (alpha / rank) B A``.
In jaxtl the adapters are new params in the same tree, beside the kernel they update::

    bert/encoder/layer_0/attention/self/query/kernel   (768, 768)  frozen
    bert/encoder/layer_0/attention/self/query/lora_a   (768, 8)    trains
    bert/encoder/layer_0/attention/self/query/lora_b   (8, 768)    trains, starts at zero

so the rule language, the plan table, checkpoints and sharding see them like any param. For a
Dense kernel ``(in, out)``, ``lora_a`` is ``(in, rank)`` and ``lora_b`` ``(rank, out)``; for a
convolution kernel ``(kh, kw, in, out)``, ``lora_a`` is a ``(kh, kw, in, rank)`` convolution
with the layer's strides and padding and ``lora_b`` a 1x1 convolution ``(rank, out)`` (PEFT's
``Conv2d`` LoRA). ``lora_b`` starts at zero, so an adapted model's outputs are exactly the base
model's until it trains.

What is here works on trees and Flax calls, with no model: :class:`LoRA` (the options, checked),
:func:`targets` (target rules -> kernels, checked), :func:`add_adapters`, :func:`merged` (the
update folded into the kernels), :func:`interceptor` (the adapters added to the outputs of their
layers during ``module.apply``) and :func:`plan` (base frozen, adapters and head trained). The
model-level API (``jaxtl.lora.adapt``, ``merge``, the PEFT layout) is :mod:`jaxtl.lora`.

Example:
  >>> import numpy as np
  >>> from jaxtl.transfer.structure import Structure
  >>> params = {"enc": {"q": {"kernel": np.ones((4, 6), np.float32)}},
  ...           "head": {"kernel": np.ones((6, 2))}}
  >>> s = Structure(blocks=("enc",), head=("head",), lora_targets=("enc/q",))
  >>> spec = LoRA(rank=2).resolve(s)
  >>> adapted = add_adapters(params, spec, seed=0)
  >>> adapted["enc"]["q"]["lora_a"].shape, adapted["enc"]["q"]["lora_b"].shape
  ((4, 2), (2, 6))
  >>> bool((merged(adapted, spec)["enc"]["q"]["kernel"] == 1).all())  # B = 0: nothing changed yet
  True
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.transfer.plan import Group, Plan
from jaxtl.transfer.rules import matcher, prefix_pattern, search_only
from jaxtl.transfer.structure import Structure
from jaxtl.transfer.trees import flatten, unflatten

__all__ = [
    "ADAPTER_PATTERN",
    "LORA_A",
    "LORA_B",
    "LoRA",
    "LoRAError",
    "add_adapters",
    "adapter_modules",
    "base_params",
    "default_targets",
    "has_adapters",
    "interceptor",
    "kernels",
    "merged",
    "plan",
    "targets",
]

LORA_A, LORA_B = "lora_a", "lora_b"
# The rule that labels every adapter leaf (and nothing else) in a param tree.
ADAPTER_PATTERN = f"(.*/)?({LORA_A}|{LORA_B})"
_MAX_LISTED = 12


class LoRAError(ValueError):
    """LoRA options that cannot apply to this model: a bad rank or alpha, targets that match no
    kernel, an adapter made for another model."""


@dataclasses.dataclass(frozen=True)
class LoRA:
    """The options of one LoRA run.

    Attributes:
      rank: the adapters' rank r (>= 1, at most the smaller dimension of every target kernel).
      alpha: the update is scaled by ``alpha / rank``; None: ``alpha = rank`` (scale 1).
      targets: regexes over module paths (``.../query``) or kernel paths (``.../query/kernel``),
        each fully matched, each required to match at least one kernel; None: the family's
        defaults (:func:`default_targets`).
      dropout: dropout on each adapter's input while training (PEFT's ``lora_dropout``).
    """

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    dropout: float = 0.0

    def __post_init__(self):
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, int | np.integer) or r < 1:
            raise LoRAError(
                f"lora: rank must be an integer >= 1, got {r!r} (--recipe 'lora(8)': the first "
                "argument is the rank)."
            )
        object.__setattr__(self, "rank", int(r))
        a = self.alpha
        if a is not None:
            if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a):
                raise LoRAError(f"lora: alpha must be a number >= 0, got {a!r}.")
            if a < 0:
                raise LoRAError(
                    f"lora: alpha must be >= 0, got {a} (the update is scaled by alpha / rank; "
                    "a negative alpha flips its sign). Pass e.g. lora(8, alpha=16)."
                )
            object.__setattr__(self, "alpha", float(a))
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1:
            raise LoRAError(f"lora: dropout must be a number in [0, 1), got {p!r}.")
        object.__setattr__(self, "dropout", float(p))
        if self.targets is not None:
            t = self.targets
            if isinstance(t, str):
                t = (t,)
            if not t or not all(isinstance(x, str) for x in t):
                raise LoRAError(
                    f"lora: targets must be a non-empty list of path regexes, got {self.targets!r}"
                    " (e.g. targets=['.*/query', '.*/value'])."
                )
            matcher(t, "lora target")  # a bad regex fails here, naming the option
            object.__setattr__(self, "targets", tuple(t))

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on ``B A``."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def resolve(self, structure: Structure) -> LoRA:
        """These options with ``targets`` filled in from the family's defaults."""
        if self.targets is not None:
            return self
        return dataclasses.replace(self, targets=default_targets(structure))

    def describe(self) -> str:
        """How a recipe string writes these options (``lora(8)``, ``lora(8, alpha=16)``, ...);
        :func:`jaxtl.transfer.recipes.make_plan` parses it back to the same options."""
        args = [str(self.rank)]
        if self.alpha is not None:
            args.append(f"alpha={self.alpha:g}")
        if self.targets is not None:
            args.append(f"targets={list(self.targets)!r}")
        if self.dropout:
            args.append(f"dropout={self.dropout:g}")
        return f"lora({', '.join(args)})"


def default_targets(structure: Structure) -> tuple[str, ...]:
    """The family's LoRA targets (:attr:`Structure.lora_targets`, e.g. query and value for
    BERT and ViT, ``c_attn`` for GPT-2), or else every kernel inside the blocks."""
    if structure.lora_targets:
        return tuple(structure.lora_targets)
    if not structure.blocks:
        raise LoRAError(
            "lora: this model names no blocks and no default LoRA targets; pass targets= "
            "(regexes over module paths, e.g. targets=['.*/query'])."
        )
    return tuple(re.escape(b.strip("/")) + "/.*" for b in structure.blocks)


def kernels(params: Any) -> dict[str, tuple[int, ...]]:
    """``{module path: kernel shape}`` of every 2-D (Dense) or 4-D (convolution) kernel."""
    out = {}
    for path, leaf in flatten(params).items():
        module, _, name = path.rpartition("/")
        if name == "kernel" and module and len(np.shape(leaf)) in (2, 4):
            out[module] = tuple(np.shape(leaf))
    return out


def _listed(items: Sequence[str]) -> str:
    shown = "\n".join(f"  {x}" for x in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f"\n  ... and {len(items) - _MAX_LISTED} more"
    return shown


def targets(params: Any, spec: LoRA) -> dict[str, tuple[int, ...]]:
    """``{module path: kernel shape}`` of the kernels ``spec`` adapts, in tree order.

    Raises:
      LoRAError: a target rule matches no kernel (the message lists the kernels it could
        match), or ``rank`` exceeds a target kernel's smaller dimension.
    """
    if spec.targets is None:
        raise LoRAError("lora: targets are not resolved; call LoRA.resolve(structure) first.")
    found = kernels(params)
    candidates = list(found)
    for rule in spec.targets:
        hit = matcher(rule, "lora target")
        if not any(hit(m) or hit(f"{m}/kernel") for m in candidates):
            hint = (
                f" It occurs inside some paths but must match a whole path: try '.*{rule}'."
                if search_only(rule, candidates)
                else ""
            )
            raise LoRAError(
                f"lora: target rule {rule!r} matches no Dense or convolution kernel.{hint} "
                f"Kernels it could match ({len(candidates)}, by module path):\n"
                f"{_listed(candidates)}"
            )
    hit = matcher(spec.targets, "lora target")
    chosen = {m: s for m, s in found.items() if hit(m) or hit(f"{m}/kernel")}
    for module, shape in chosen.items():
        fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
        if spec.rank > min(fan_in, fan_out):
            raise LoRAError(
                f"lora: rank {spec.rank} is larger than the smaller dimension of the kernel of "
                f"{module!r}, {shape} ({min(fan_in, fan_out)}); a rank-{spec.rank} update of it is "
                f"not low-rank. Choose rank <= {min(fan_in, fan_out)}, or leave it out of targets."
            )
    return chosen


def adapter_shapes(kernel: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(lora_a shape, lora_b shape)`` for a kernel: all but its output axis, then rank."""
    return (*kernel[:-1], rank), (rank, kernel[-1])


def add_adapters(params: Any, spec: LoRA, seed: int) -> dict[str, Any]:
    """``params`` with ``lora_a`` and ``lora_b`` beside every target kernel.

    ``lora_a`` is drawn as PEFT does (``kaiming_uniform_(a=sqrt(5))``: U(+-1/sqrt(fan_in))),
    from a numpy stream seeded by ``(seed, path)``; ``lora_b`` is zero. Both are float32
    whatever the kernel's dtype: the adapters train, the base may be stored in bf16.
    """
    flat = dict(flatten(params))
    for module, shape in targets(params, spec).items():
        a_shape, b_shape = adapter_shapes(shape, spec.rank)
        rng = np.random.default_rng([seed, zlib.crc32(f"{module}/{LORA_A}".encode())])
        bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
        flat[f"{module}/{LORA_A}"] = jnp.asarray(rng.uniform(-bound, bound, a_shape), jnp.float32)
        flat[f"{module}/{LORA_B}"] = jnp.zeros(b_shape, jnp.float32)
    return unflatten(flat)


def has_adapters(params: Any) -> bool:
    """Whether any leaf of ``params`` is an adapter."""
    return any(p.rpartition("/")[2] in (LORA_A, LORA_B) for p in flatten(params))


def adapter_modules(params: Any) -> dict[str, dict[str, Any]]:
    """``{module path: {"lora_a": A, "lora_b": B}}`` of the adapters in ``params``."""
    out: dict[str, dict[str, Any]] = {}
    for path, leaf in flatten(params).items():
        module, _, name = path.rpartition("/")
        if name in (LORA_A, LORA_B):
            out.setdefault(module, {})[name] = leaf
    return out


def base_params(params: Any) -> dict[str, Any]:
    """``params`` without its adapter leaves: the base model's tree."""
    return unflatten(
        {p: x for p, x in flatten(params).items() if p.rpartition("/")[2] not in (LORA_A, LORA_B)}
    )


def delta(
    a: Any, b: Any, kernel_shape: tuple[int, ...], scale: float, dtype: Any = jnp.float32
) -> jax.Array:
    """``scale * A B`` in the kernel's shape, computed in ``dtype``."""
    a2 = jnp.reshape(jnp.asarray(a, dtype), (-1, a.shape[-1]))
    return jnp.reshape(a2 @ jnp.asarray(b, dtype), kernel_shape) * scale


def merged(params: Any, spec: LoRA) -> dict[str, Any]:
    """The base tree with every adapted kernel replaced by ``W + scale * A B`` (computed in
    at least float32, stored in the kernel's dtype) and the adapter leaves removed."""
    flat = dict(flatten(base_params(params)))
    for module, ad in adapter_modules(params).items():
        kernel = flat[f"{module}/kernel"]
        wide = jnp.promote_types(kernel.dtype, jnp.float32)  # bf16 kernels merge in float32
        update = delta(ad[LORA_A], ad[LORA_B], tuple(np.shape(kernel)), spec.scale, wide)
        flat[f"{module}/kernel"] = (jnp.asarray(kernel, wide) + update).astype(kernel.dtype)
    return unflatten(flat)


def plan(structure: Structure, spec: LoRA) -> Plan:
    """Adapters and head train; everything else (the base model) is frozen, with no optimizer
    state. The plan carries ``spec`` (``Plan.adapters``), so a run adds the adapters to the
    model first (:func:`jaxtl.lora.adapt`)."""
    spec = spec.resolve(structure)
    head = [(prefix_pattern(h), "head") for h in structure.head]
    rules = [*head, (ADAPTER_PATTERN, "lora"), (".*", "frozen")]
    groups = [Group("head", True)] if head else []
    groups += [Group("lora", True), Group("frozen", False)]
    return Plan(tuple(rules), groups, name=spec.describe(), adapters=spec)


# ----------------------------------------------------------------------------- forward


def _conv_padding(padding: Any, n: int) -> Any:
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
        raise LoRAError(f"lora: convolution padding {padding!r} is not supported by adapters.")
    if isinstance(padding, int):
        return ((padding, padding),) * n
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _lora_output(module: Any, x: jax.Array, a: jax.Array, b: jax.Array, path: str) -> jax.Array:
    """``(x A) B`` the way the layer applies its kernel: a matmul, or a convolution with the
    layer's strides and padding followed by a 1x1 convolution."""
    import flax.linen as nn

    from jaxtl.models.conv import pairs

    dtype = module.dtype if module.dtype is not None else jnp.result_type(x.dtype, jnp.float32)
    x, a, b = x.astype(dtype), a.astype(dtype), b.astype(dtype)
    if isinstance(module, nn.Dense):
        return (x @ a) @ b
    if isinstance(module, nn.Conv) and a.ndim == 4:
        if module.feature_group_count != 1:
            raise LoRAError(
                f"lora: {path!r} is a grouped (depthwise) convolution "
                f"(feature_group_count={module.feature_group_count}). A low-rank update B A is "
                "a dense convolution, not of the grouped kernel's form, so it cannot be merged "
                "into it (PEFT refuses to merge it too). Leave it out of targets, e.g. "
                "targets=['.*/(expand_conv|project_conv)'] for EfficientNet."
            )
        h = jax.lax.conv_general_dilated(
            x,
            a,
            window_strides=pairs(module.strides, 2),
            padding=_conv_padding(module.padding, 2),
            lhs_dilation=pairs(module.input_dilation, 2),
            rhs_dilation=pairs(module.kernel_dilation, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return h @ b
    raise LoRAError(
        f"lora: {path!r} is a {type(module).__name__}, not a Dense or Conv layer; adapters apply "
        "to Dense and 2-D convolution kernels only. Leave it out of targets."
    )


def interceptor(
    adapters: Mapping[str, Mapping[str, jax.Array]],
    spec: LoRA,
    *,
    train: bool,
    rng: jax.Array | None,
):
    """A ``flax.linen.intercept_methods`` interceptor that adds ``scale * (dropout(x) A) B`` to
    the output of every layer whose path is in ``adapters``: the adapted model's forward pass,
    with the base kernels left as they are (their gradients are never formed).

    Dropout (``spec.dropout``, training only) draws from ``rng`` folded with the layer's path.
    """
    rate = spec.dropout if train else 0.0
    if rate and rng is None:
        raise ValueError("lora dropout needs an rng while training.")
    seen: set[str] = set()

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        path = "/".join(context.module.path)
        ad = adapters.get(path)
        if ad is None:
            return out
        seen.add(path)
        x = args[0]
        if rate:
            key = jax.random.fold_in(jax.random.fold_in(rng, 0x10A), zlib.crc32(path.encode()))
            keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
        update = _lora_output(context.module, x, ad[LORA_A], ad[LORA_B], path)
        return out + (spec.scale * update).astype(out.dtype)

    intercept.seen = seen
    return intercept
