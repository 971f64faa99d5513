"""Where each param lives on the mesh: sharding rules -> ``PartitionSpec`` per leaf, checked.

The mesh has three named axes (:mod:`jaxtl.parallel`): ``data`` (batch split, params
replicated), ``fsdp`` (batch split *and* params/optimizer state split, gathered per use) and
``tensor`` (Megatron-style split of the attention and MLP matrices). Which dimension of which
param is split over which axis is answered by the same rule language as freezing
(:mod:`jaxtl.transfer.rules`): ordered ``(path regex, spec)`` pairs, first ``re.fullmatch``
wins, every param covered. A spec is one of

* a :class:`jax.sharding.PartitionSpec` (or a tuple): one entry per leading dimension, each an
  axis name, a tuple of axis names, or ``None``, e.g. ``P("fsdp", "tensor")``;
* :data:`FSDP` (``"fsdp"``): split the largest dimension that divides evenly over ``fsdp``, if
  the leaf has at least ``min_shard_size`` elements, else replicate (big_vision's rule);
* :data:`REPLICATED` (``"replicated"``): a full copy on every device.

The rules a run uses are the user's (first), then the family's tensor-parallel rules (from its
:class:`~jaxtl.transfer.structure.Structure`: which Dense layers are column- and which
row-parallel), then ``(".*", FSDP)``. On the default mesh (every device on ``data``) all of
them are full copies: today's data parallelism.

LoRA adapters follow their kernels (``lora_a`` the kernel's input dims, ``lora_b`` its output
dim), whatever the rules say. Optimizer state follows its params: a moment whose path ends
with a param's path and has its shape gets the param's spec; any other state leaf (a step
count, Adafactor's factored moments) gets the :data:`FSDP` rule on its own shape.

Everything here is decided from shapes and axis sizes, before anything compiles, and every bad
input (an unknown axis, a spec longer than the leaf, a dimension that does not divide) is an
error that names the param and says what would fit.

Example:
  >>> import numpy as np
  >>> params = {"enc": {"kernel": np.zeros((48, 64)), "bias": np.zeros(64)}}
  >>> specs = param_specs(params, {"data": 2, "fsdp": 4, "tensor": 1}, min_shard_size=100)
  >>> specs["enc"]["kernel"], specs["enc"]["bias"]  # the bias is below min_shard_size
  (P(None, 'fsdp'), P())
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from jaxtl.parallel import AXES, parse_mesh, splits_params
from jaxtl.transfer.lora import LORA_A, LORA_B
from jaxtl.transfer.rules import InvalidRuleError, Rules, tree_from_rules
from jaxtl.transfer.structure import Structure
from jaxtl.transfer.trees import flatten, path_str, paths_and_leaves, tree_bytes

__all__ = [
    "AXES",
    "FSDP",
    "MIN_SHARD_SIZE",
    "REPLICATED",
    "ShardingError",
    "check_axes",
    "default_rules",
    "load_placement",
    "param_specs",
    "per_device_bytes",
    "piece_counter",
    "shard_count",
    "state_specs",
    "train_state_specs",
]

FSDP = "fsdp"
REPLICATED = "replicated"
# Leaves smaller than this (elements) stay whole under the FSDP rule: biases, norms, small heads.
# 2**16 float32 elements = 256 KiB; gathering such a leaf costs more latency than it saves memory.
MIN_SHARD_SIZE = 2**16


class ShardingError(ValueError):
    """A sharding rule or mesh that cannot place a param."""


def _roles(structure: Structure | None) -> list[tuple[str, Any]]:
    """A family's tensor-parallel layer roles as leaf rules (Megatron: the input projection of a
    block is split by its output columns, the output projection by its input rows, so a block's
    matmuls need one all-reduce; the other dimension of each kernel goes over ``fsdp``)."""
    rules: list[tuple[str, Any]] = []
    for layer, role in structure.tensor_parallel if structure is not None else ():
        if role == "column":
            rules += [
                (f"{layer}/kernel", PartitionSpec("fsdp", "tensor")),
                (f"{layer}/bias", PartitionSpec("tensor")),
            ]
        elif role == "row":
            rules += [
                (f"{layer}/kernel", PartitionSpec("tensor", "fsdp")),
                (f"{layer}/bias", REPLICATED),
            ]
        else:
            raise ValueError(f"tensor_parallel role of {layer!r} must be 'column' or 'row'.")
    return rules


def default_rules(structure: Structure | None = None, tensor: int = 2) -> list[tuple[str, Any]]:
    """What follows a user's rules: the family's tensor-parallel rules when the ``tensor`` axis
    has more than one device, then ``(".*", FSDP)``. With ``tensor=1`` the Megatron layers
    fall to the FSDP rule too, with its fallbacks (a dim that does not divide, a small leaf)."""
    return [*(_roles(structure) if tensor > 1 else []), (".*", FSDP)]


def _axis_sizes(mesh: Any) -> dict[str, int]:
    """``{axis: size}`` of a Mesh or of a mapping; missing standard axes have size 1."""
    sizes = mesh if isinstance(mesh, Mapping) else dict(mesh.shape)
    return {a: int(sizes.get(a, 1)) for a in AXES} | {a: int(n) for a, n in sizes.items()}


def _entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _as_spec(value: Any, where: str) -> PartitionSpec | str:
    if value in (FSDP, REPLICATED):
        return value
    if value is None:
        return REPLICATED
    if isinstance(value, PartitionSpec):
        return value
    if isinstance(value, tuple | list):
        return PartitionSpec(*(tuple(e) if isinstance(e, list) else e for e in value))
    raise InvalidRuleError(
        f"{where}: sharding value {value!r} is not a PartitionSpec, a tuple of mesh axes, "
        f"{FSDP!r} or {REPLICATED!r}."
    )


def _auto(shape: tuple[int, ...], sizes: dict[str, int], min_size: int):
    """The FSDP rule: the largest dimension divisible by ``fsdp`` (the last such on ties)."""
    n = sizes["fsdp"]
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    best = None
    for i, d in enumerate(shape):
        if d % n == 0 and (best is None or d >= shape[best]):
            best = i
    if best is None:
        return PartitionSpec()
    return PartitionSpec(*([None] * best), "fsdp")


def _fits(d: int, sizes: dict[str, int]) -> str:
    ok = [f"{a}={n}" for a, n in sizes.items() if n > 1 and d % n == 0]
    return ", ".join(ok) if ok else "none of this mesh's axes"


def check_axes(spec: Any, where: str) -> None:
    """Raise when a spec (a PartitionSpec or tuple of entries) names an axis the mesh never
    has; ``where`` says which rule, in the user's terms."""
    if isinstance(spec, str) or spec is None:
        return
    for entry in spec:
        for axis in _entry_axes(entry):
            if axis not in AXES:
                raise ShardingError(
                    f"{where} names mesh axis {axis!r}; the mesh's axes are {list(AXES)} "
                    "(--mesh data=...,fsdp=...,tensor=...)."
                )


def _check(path: str, shape: tuple[int, ...], spec: PartitionSpec, sizes: dict[str, int]):
    if len(spec) > len(shape):
        raise ShardingError(
            f"Sharding rule for {path!r} gives {spec} ({len(spec)} dims) but the param has "
            f"shape {shape} ({len(shape)} dims). Give at most {len(shape)} entries."
        )
    check_axes(spec, f"Sharding rule for {path!r}")
    used: list[str] = []
    for dim, entry in enumerate(spec):
        axes = _entry_axes(entry)
        for a in axes:
            if a in used:
                raise ShardingError(f"Sharding rule for {path!r} uses axis {a!r} twice: {spec}.")
            used.append(a)
        n = int(np.prod([sizes[a] for a in axes], dtype=np.int64))
        if shape[dim] % n:
            raise ShardingError(
                f"Param {path!r} (shape {shape}): dim {dim} has size {shape[dim]}, not divisible "
                f"by axis {'x'.join(axes)} = {n} in {spec}. Dim {dim} divides over "
                f"{_fits(shape[dim], sizes)}; choose a mesh (--mesh) whose sizes divide "
                f"{shape[dim]}, or put a rule first in sharding_rules (jaxtl finetune "
                f"--shard-rule) that shards another dim or keeps it whole: "
                f"({re.escape(path)!r}, 'replicated')."
            )


def _resolve(flat: dict[str, Any], rules: Rules, sizes: dict, min_size: int) -> dict:
    values = tree_from_rules(flat, rules)
    out = {}
    for path, leaf in flat.items():
        shape = tuple(np.shape(leaf))
        spec = _as_spec(values[path], f"the sharding rule for {path!r}")
        if spec == FSDP:
            spec = _auto(shape, sizes, min_size)
        elif spec == REPLICATED:
            spec = PartitionSpec()
        _check(path, shape, spec, sizes)
        out[path] = spec
    return out


def _user_rules(rules: Rules | None) -> list[tuple[str, Any]]:
    user = list(rules.items() if isinstance(rules, Mapping) else rules or ())
    tree_from_rules({}, user)  # malformed rules and bad regexes fail here
    return user


def param_specs(
    params: Any,
    mesh: Any,
    rules: Rules | None = None,
    *,
    structure: Structure | None = None,
    min_shard_size: int = MIN_SHARD_SIZE,
    defaults: bool = True,
) -> Any:
    """A tree like ``params`` of ``PartitionSpec`` s.

    Args:
      params: the param tree (arrays or ``jax.ShapeDtypeStruct`` s).
      mesh: a :class:`jax.sharding.Mesh`, or its axis sizes (``{"data": 2, "fsdp": 4}``).
      rules: the user's ``(path regex, spec)`` pairs, tried before the defaults.
      structure: the family's :class:`Structure` (its ``tensor_parallel`` roles).
      min_shard_size: the FSDP rule leaves smaller leaves whole.
      defaults: follow ``rules`` with :func:`default_rules`; False: ``rules`` alone, and a
        param they do not match is an error.

    Raises:
      ShardingError: a spec names an unknown axis, has more entries than the leaf has dims, or
        splits a dimension that its axes do not divide.
      jaxtl.transfer.rules.InvalidRuleError: a rule is malformed.
      jaxtl.transfer.rules.UnmatchedParamsError: ``defaults=False`` and a param matches no rule.
    """
    sizes = _axis_sizes(mesh)
    paths, leaves, treedef = paths_and_leaves(params)
    flat = dict(zip(paths, leaves, strict=True))
    table = _user_rules(rules)
    if defaults:
        table += default_rules(structure, sizes["tensor"])
    adapters = {p for p in paths if p.rpartition("/")[2] in (LORA_A, LORA_B)}
    specs = _resolve(
        {p: x for p, x in flat.items() if p not in adapters}, table, sizes, min_shard_size
    )
    for path in adapters:
        module, _, name = path.rpartition("/")
        kernel = f"{module}/kernel"
        specs[path] = _adapter_spec(specs[kernel], np.ndim(flat[kernel]), name)
    return jax.tree_util.tree_unflatten(treedef, [specs[p] for p in paths])


def _adapter_spec(kernel: PartitionSpec, kernel_ndim: int, name: str) -> PartitionSpec:
    """A LoRA adapter's spec, from its kernel's: ``lora_a`` (kernel's input dims, rank) splits
    its input dims as the kernel does, ``lora_b`` (rank, output) its output dim; the rank
    stays whole. So ``x A`` needs no more communication than ``x W``."""
    full = (*kernel, *([None] * (kernel_ndim - len(kernel))))
    if name == LORA_A:
        return PartitionSpec(*full[:-1], None)
    return PartitionSpec(None, full[-1])


def state_specs(
    state: Any, params: Any, specs: Any, mesh: Any, *, min_shard_size: int = MIN_SHARD_SIZE
) -> Any:
    """Specs for an optimizer state (or any tree holding param-shaped moments): a leaf whose
    path ends with a param's path and that has its shape gets the param's spec; the others the
    :data:`FSDP` rule on their own shape."""
    sizes = _axis_sizes(mesh)
    flat_params, flat_specs = flatten(params), flatten(specs)
    shapes = {p: tuple(np.shape(x)) for p, x in flat_params.items()}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    out = []
    for keypath, leaf in leaves:
        parts = path_str(keypath).split("/")
        shape = tuple(np.shape(leaf))
        spec = None
        for start in range(len(parts)):
            tail = "/".join(parts[start:])
            if tail in shapes and shapes[tail] == shape:
                spec = flat_specs[tail]
                break
        out.append(spec if spec is not None else _auto(shape, sizes, min_shard_size))
    return jax.tree_util.tree_unflatten(treedef, out)


def train_state_specs(
    state: Any,
    mesh: Any,
    rules: Rules | None = None,
    *,
    structure: Structure | None = None,
    min_shard_size: int = MIN_SHARD_SIZE,
) -> Any:
    """Specs for a :class:`~jaxtl.train.state.TrainState`: params by the rules, optimizer state
    like its params (:func:`state_specs`), BatchNorm statistics, step and RNG key replicated."""
    params = param_specs(
        state.params, mesh, rules, structure=structure, min_shard_size=min_shard_size
    )
    opt = state_specs(state.opt_state, state.params, params, mesh, min_shard_size=min_shard_size)
    whole = lambda tree: jax.tree.map(lambda _: PartitionSpec(), tree)  # noqa: E731
    return state.replace(
        step=PartitionSpec(),
        params=params,
        opt_state=opt,
        rng=PartitionSpec(),
        batch_stats=whole(state.batch_stats),
    )


def load_placement(
    mesh: Any, rules: Rules | None = (), min_shard_size: int = MIN_SHARD_SIZE
) -> dict[str, Any]:
    """:func:`jaxtl.load`'s options that build a model as a train state on the mesh ``mesh``
    (``--mesh``; ``None``: every device on ``data``) with ``rules`` (``--shard-rule``) holds its
    params; ``{}`` when that state replicates them all (no rules, and ``fsdp`` and ``tensor``
    of 1), so the model loads onto one device as by default.

    Raises:
      ValueError: a mesh these devices cannot form (:func:`jaxtl.parallel.parse_mesh`).
    """
    rules = list(rules.items() if isinstance(rules, Mapping) else rules or ())
    if not (rules or splits_params(mesh)):
        return {}
    if mesh is None:
        mesh = f"data={parse_mesh(None, jax.device_count())['data']}"
    return {"mesh": mesh, "sharding_rules": rules, "min_shard_size": min_shard_size}


def piece_counter(
    params: Any,
    mesh: Any,
    rules: Rules | None = None,
    *,
    structure: Structure | None = None,
    min_shard_size: int = MIN_SHARD_SIZE,
):
    """``count(tree) -> tree of ints``: how many pieces each leaf of ``params`` or of any tree of
    param-shaped state (an optimizer state or part of one) is cut into on ``mesh``. What
    :meth:`jaxtl.Plan.table` divides by for its per-device columns."""
    specs = param_specs(params, mesh, rules, structure=structure, min_shard_size=min_shard_size)

    def count(tree: Any) -> Any:
        placed = state_specs(tree, params, specs, mesh, min_shard_size=min_shard_size)
        return jax.tree.map(
            lambda s: shard_count(s, mesh), placed, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )

    return count


def shard_count(spec: PartitionSpec, mesh: Any) -> int:
    """How many pieces ``spec`` cuts a leaf into on ``mesh`` (1: a full copy per device)."""
    sizes = _axis_sizes(mesh)
    return int(np.prod([sizes[a] for e in spec for a in _entry_axes(e)], dtype=np.int64))


def per_device_bytes(tree: Any, specs: Any, mesh: Any) -> int:
    """Bytes of ``tree`` that each device holds when its leaves are placed by ``specs``."""
    leaves = zip(jax.tree.leaves(tree), _spec_leaves(specs), strict=True)
    return sum(tree_bytes(leaf) // shard_count(spec, mesh) for leaf, spec in leaves)


def _spec_leaves(specs: Any) -> Sequence[PartitionSpec]:
    return jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
