"""Model families (one per file), the checkpoint -> family registry, and the shared contract."""

from jaxtl.models.base import Batch, LoadedModel, Params, Structure
from jaxtl.models.registry import (
    FAMILIES,
    Family,
    ModelSpec,
    family_for_config,
    list_models,
    supported_model_types,
)

__all__ = [
    "FAMILIES",
    "Batch",
    "Family",
    "LoadedModel",
    "ModelSpec",
    "Params",
    "Structure",
    "family_for_config",
    "list_models",
    "supported_model_types",
]
