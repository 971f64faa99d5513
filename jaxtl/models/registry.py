"""Which family reads which checkpoint: config.json ``model_type`` / ``architectures`` -> family.

Adding a family is one :class:`Family` entry in ``_FAMILIES``; its ``builder`` names a function
``build(directory, raw_config, *, task, num_labels, pooling, dtype) -> ModelSpec`` that is imported
only when that family is loaded, so the registry stays cheap to import and free of cycles.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxtl.models.base import Params, Structure

TASKS = ("classification", "regression", "features")
# Every task some family offers; load() checks the family's own list once the family is known.
KNOWN_TASKS = (*TASKS, "causal_lm")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a family's ``build`` returns: everything :func:`jaxtl.loading.load` needs.

    Attributes:
      config: the family's config dataclass.
      module: the Flax linen module for the requested task.
      abstract_params: the param tree (the inner ``"params"`` collection, nested dicts) with
        ``jax.ShapeDtypeStruct`` leaves: shapes and dtypes without spending memory or compute.
      init_leaf: ``init_leaf(path, placeholder, seed) -> array``: the family's initialization of
        one param; loading calls it only for params the checkpoint does not supply.
      convert: ``convert({checkpoint name: array}) -> {"/"-joined model path: array}``; names it
        cannot map pass through unchanged (they become ``unexpected`` in the load report).
      apply: ``apply(params, batch, *, train=False, rng=None) -> outputs``.
      structure: where stem, blocks, neck and head live.
      extras: family-specific facts for :attr:`LoadedModel.extras`.
    """

    config: Any
    module: Any
    abstract_params: Params
    init_leaf: Callable[[str, Any, int], Any]
    convert: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    apply: Callable[..., Any]
    structure: Structure
    extras: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture family and the checkpoints it reads.

    Attributes:
      name: registry name, e.g. ``"bert"``.
      builder: ``"module:function"`` of the family's ``build``.
      model_types: config.json ``model_type`` values this family reads.
      architecture_prefixes: config.json ``architectures`` prefixes, used only when a config has
        no ``model_type`` (very old checkpoints).
      formats: weight formats it reads.
      tasks: tasks it can build a head for.
      description: one line for :func:`list_models`.
    """

    name: str
    builder: str
    model_types: tuple[str, ...]
    architecture_prefixes: tuple[str, ...] = ()
    formats: tuple[str, ...] = ("safetensors",)
    tasks: tuple[str, ...] = TASKS
    description: str = ""

    def build(self, *args: Any, **kwargs: Any) -> ModelSpec:
        """Imports the family's builder and calls it."""
        module_name, function = self.builder.split(":")
        return getattr(importlib.import_module(module_name), function)(*args, **kwargs)


_FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert",
        builder="jaxtl.models.bert:build",
        model_types=("bert",),
        architecture_prefixes=("Bert",),
        description="BERT-style text encoders (BERT, MiniLM, sentence-transformers BERTs)",
    ),
    Family(
        name="gpt2",
        builder="jaxtl.models.gpt2:build",
        model_types=("gpt2",),
        architecture_prefixes=("GPT2",),
        tasks=(*TASKS, "causal_lm"),
        description="GPT-2 decoders: last-token classification, features, tied-head causal LM",
    ),
)
FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}


def supported_model_types() -> tuple[str, ...]:
    """Returns every config.json ``model_type`` some family reads."""
    return tuple(t for f in _FAMILIES for t in f.model_types)


def family_for_config(config: Mapping[str, Any], source: str = "config.json") -> Family:
    """Picks the family that reads a checkpoint, from its parsed config.json.

    Args:
      config: the parsed config.json.
      source: where the config came from, for error messages.

    Returns:
      The matching :class:`Family`.

    Raises:
      ValueError: when no family reads this ``model_type`` (or, lacking one, these
        ``architectures``); the message lists the supported types.
    """
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type:
        for family in _FAMILIES:
            if model_type in family.model_types:
                return family
    else:
        for family in _FAMILIES:
            if any(a.startswith(family.architecture_prefixes) for a in architectures):
                return family
    found = f"model_type={model_type!r}" if model_type else f"architectures={architectures!r}"
    raise ValueError(
        f"{source} declares {found}, which jaxtl cannot load yet. Supported model_type values: "
        f"{', '.join(supported_model_types())} (see jaxtl.models.list_models()). Convert the "
        "checkpoint to a supported family, or add a family in jaxtl/models/registry.py."
    )


def list_models() -> list[dict[str, Any]]:
    """Lists the registered families, the checkpoints they read and the heads they build.

    Example:
      >>> [m["family"] for m in list_models()]
      ['bert', 'gpt2']
    """
    return [
        {
            "family": f.name,
            "model_types": list(f.model_types),
            "formats": list(f.formats),
            "heads": list(f.tasks),
            "description": f.description,
        }
        for f in _FAMILIES
    ]
