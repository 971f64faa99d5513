"""CLIP (contrastive image-text pretraining) in Flax linen, read from Hugging Face checkpoints.

A ``CLIPModel`` checkpoint holds two towers and the temperature that joins them. jaxtl builds
one tower per model, chosen with the ``tower`` load option:

* ``"vision"`` (default): ``vision_model`` (strided-conv patches + a class embedding + learned
  positions, ``pre_layrnorm``, pre-LayerNorm blocks, ``post_layernorm`` on the class token) and
  ``visual_projection``; input NHWC ``pixel_values`` (``extras["preprocessing"]`` is CLIP's).
* ``"text"``: ``text_model`` (token + position embeddings, causal blocks, ``final_layer_norm``,
  pooled at the end-of-text token) and ``text_projection``; inputs ``input_ids`` and
  ``attention_mask``.

``task="features"`` returns the tower's projected embedding ``[B, projection_dim]`` (transformers'
``image_embeds`` / ``text_embeds`` before normalization); ``"classification"`` and
``"regression"`` put a new Dense ``classifier`` on it, so ``linear_probe`` is CLIP's linear probe.
The other tower's tensors and ``logit_scale`` are reported as *unexpected*, as transformers
reports them when ``CLIPVisionModelWithProjection`` reads a ``CLIPModel`` checkpoint: a tower
that is loaded but never called would get no gradient, yet weight decay and optimizer memory.
:func:`zero_shot_classifier` joins the towers again: a vision-tower classifier whose logits are
``CLIPModel``'s ``logits_per_image`` for one prompt per class.

Param paths mirror HF's names (``vision_model/encoder/layers_0/self_attn/q_proj``). Parity with
the PyTorch implementation is tested in ``tests/test_clip.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models import preprocessing
from jaxtl.models.base import LoadedModel
from jaxtl.models.common import (
    ACTIVATIONS,
    abstract_params,
    abstract_variables,
    flat_numpy,
    hf_exporter,
    host_dtype,
    leaf_rng,
    make_apply,
    recomputed,
)
from jaxtl.models.layers import (
    block,
    causal_mask,
    check_nhwc,
    dense,
    dot_product_attention,
    layer_norm,
    shard_batch,
    split_heads,
)
from jaxtl.models.registry import ModelSpec, check_sizes
from jaxtl.transfer.structure import Structure

TOWERS = ("vision", "text")
ROOT = {"vision": "vision_model", "text": "text_model"}
PROJECTION = {"vision": "visual_projection", "text": "text_projection"}
# OpenAI's normalization (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The legacy end-of-text id: configs saved before transformers PR #24773 say 2, and transformers
# then pools at the highest token id (OpenAI's end-of-text token is the last of the vocabulary).
LEGACY_EOS = 2


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI's sigmoid approximation of GELU, ``x * sigmoid(1.702 x)`` (transformers'
    ``QuickGELUActivation``): what every OpenAI CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {**ACTIVATIONS, "quick_gelu": recomputed(quick_gelu)}


def tensor_parallel(root: str) -> tuple[tuple[str, str], ...]:
    """Megatron's split of a tower's blocks (see :mod:`jaxtl.sharding`), as BERT's."""
    layers = rf"{root}/encoder/layers_\d+"
    return (
        (rf"{layers}/self_attn/(q_proj|k_proj|v_proj)", "column"),
        (rf"{layers}/self_attn/out_proj", "row"),
        (rf"{layers}/mlp/fc1", "column"),
        (rf"{layers}/mlp/fc2", "row"),
    )


def lora_targets(root: str) -> tuple[str, ...]:
    """LoRA's default targets: the attention query and value projections, as for BERT."""
    return (rf"{root}/encoder/layers_\d+/self_attn/(q_proj|v_proj)",)


@dataclasses.dataclass(frozen=True)
class CLIPTowerConfig:
    """One tower's entries of config.json (``vision_config`` or ``text_config``), names as in
    transformers' ``CLIPVisionConfig`` / ``CLIPTextConfig``; a tower ignores the other's."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    # vision
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    # text
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407

    @property
    def grid(self) -> int:
        """Patches along each side of the (square) image."""
        return self.image_size // self.patch_size


_DEFAULTS = {
    "vision": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    ),
    "text": dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8
    ),
}


def _tower_config(raw: Mapping[str, Any], tower: str, source: str) -> CLIPTowerConfig:
    check_sizes(raw, source)  # the registry checks only config.json's top-level keys
    names = {f.name for f in dataclasses.fields(CLIPTowerConfig)}
    values = {**_DEFAULTS[tower], **{k: v for k, v in raw.items() if k in names and v is not None}}
    config = CLIPTowerConfig(**values)
    if config.hidden_act not in _ACTIVATIONS:
        raise ValueError(
            f"{source}: hidden_act={config.hidden_act!r} is not supported; expected one of "
            f"{sorted(_ACTIVATIONS)}."
        )
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"{source}: hidden_size={config.hidden_size} is not a multiple of "
            f"num_attention_heads={config.num_attention_heads}."
        )
    if tower == "vision" and (
        not isinstance(config.image_size, int) or config.image_size % config.patch_size
    ):
        raise ValueError(
            f"{source}: image_size={config.image_size!r} is not a whole number of "
            f"patch_size={config.patch_size} patches (CLIP reads square images of one size)."
        )
    return config


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """The config.json of a ``CLIPModel``: both towers, the shared embedding width, and which
    tower this model runs.

    ``initializer_factor`` scales transformers' initialization (:func:`init_leaf`);
    ``remat`` is jaxtl's: rematerialize each block under this policy (``layers.block``).
    """

    vision: CLIPTowerConfig
    text: CLIPTowerConfig
    projection_dim: int = 512
    initializer_factor: float = 1.0
    tower: str = "vision"
    remat: str | None = None

    @property
    def active(self) -> CLIPTowerConfig:
        """The config of the tower this model runs."""
        return self.vision if self.tower == "vision" else self.text

    @property
    def vocab_size(self) -> int:
        """The text tower's embedding rows (what a tokenizer's ids are checked against)."""
        return self.text.vocab_size

    @property
    def max_length(self) -> int:
        """The longest sequence the text tower numbers."""
        return self.text.max_position_embeddings

    @classmethod
    def from_hf(
        cls, raw: Mapping[str, Any], source: str = "config.json", tower: str | None = None
    ) -> CLIPConfig:
        """Builds the config from a parsed ``CLIPModel`` config.json, checking what this model
        supports and the ``tower`` option (``None``: ``"vision"``)."""
        tower = check_tower(tower)

        def sub(name: str) -> dict[str, Any]:
            # Configs saved by transformers < 4.27 may also hold {name}_dict, which wins there.
            return {**(raw.get(name) or {}), **(raw.get(f"{name}_dict") or {})}

        return cls(
            vision=_tower_config(sub("vision_config"), "vision", f"{source} vision_config"),
            text=_tower_config(sub("text_config"), "text", f"{source} text_config"),
            projection_dim=raw.get("projection_dim") or 512,
            initializer_factor=raw.get("initializer_factor") or 1.0,
            tower=tower,
        )


def check_tower(tower: str | None) -> str:
    """The ``tower`` load option, checked: ``"vision"`` (the default) or ``"text"``."""
    tower = "vision" if tower is None else tower
    if tower not in TOWERS:
        raise ValueError(
            f"tower={tower!r} is not a CLIP tower; expected one of {TOWERS} (None: 'vision')."
        )
    return tower


class _TowerModule(nn.Module):
    """Fields every tower submodule shares: the tower's config and the param/compute dtype."""

    config: CLIPTowerConfig
    dtype: Any = jnp.float32


def _dense(c: CLIPTowerConfig, features: int, name: str, dtype: Any) -> nn.Dense:
    return dense(features, name, dtype, std=c.initializer_range)


class CLIPAttention(_TowerModule):
    """Multi-head self-attention (HF ``self_attn``): ``q_proj``/``k_proj``/``v_proj``, the
    attention core, ``out_proj``."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
        c, dt = self.config, self.dtype
        q, k, v = (
            split_heads(_dense(c, c.hidden_size, name, dt)(x), c.num_attention_heads)
            for name in ("q_proj", "k_proj", "v_proj")
        )
        context = dot_product_attention(
            q,
            k,
            v,
            None if mask is None else mask[:, None],  # [B, Tq, Tk] for every head
            dropout_rate=c.attention_dropout,
            deterministic=not train,
            dtype=dt,
        )
        return _dense(c, c.hidden_size, "out_proj", dt)(context)


class CLIPMLP(_TowerModule):
    """``fc1``, the activation (quick GELU for OpenAI's checkpoints), ``fc2``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt = self.config, self.dtype
        x = _ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "fc1", dt)(x))
        return _dense(c, c.hidden_size, "fc2", dt)(x)


class CLIPEncoderLayer(_TowerModule):
    """One pre-LayerNorm block (HF ``CLIPEncoderLayer``)."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
        c, dt = self.config, self.dtype
        h = layer_norm(c.layer_norm_eps, "layer_norm1", dt)(x)
        x = x + CLIPAttention(c, dt, name="self_attn")(h, mask, train)
        h = layer_norm(c.layer_norm_eps, "layer_norm2", dt)(x)
        return x + CLIPMLP(c, dt, name="mlp")(h)


class CLIPEncoder(_TowerModule):
    """The stack of blocks, named ``layers_0`` ... (HF ``encoder.layers.N``)."""

    remat: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool) -> jax.Array:
        layer = block(CLIPEncoderLayer, self.remat, train_argnum=3)
        for i in range(self.config.num_hidden_layers):
            x = shard_batch(
                layer(self.config, self.dtype, name=f"layers_{i}")(shard_batch(x), mask, train)
            )
        return x


def _embed(count: int, features: int, name: str, std: float, dtype: Any) -> nn.Embed:
    return nn.Embed(
        count,
        features,
        embedding_init=nn.initializers.normal(std),
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )


class CLIPVisionEmbeddings(_TowerModule):
    """Class embedding + strided-conv patches (no bias), plus learned position embeddings."""

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c, dt = self.config, self.dtype
        patches = nn.Conv(
            c.hidden_size,
            kernel_size=(c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            kernel_init=nn.initializers.normal(c.initializer_range),
            dtype=dt,
            param_dtype=dt,
            name="patch_embedding",
        )(pixel_values)
        patches = patches.reshape(patches.shape[0], -1, c.hidden_size)  # row-major, as torch's
        cls = self.param(
            "class_embedding", nn.initializers.normal(c.hidden_size**-0.5), (c.hidden_size,), dt
        )
        cls = jnp.broadcast_to(cls, (patches.shape[0], 1, c.hidden_size))
        count = 1 + c.grid**2
        positions = _embed(count, c.hidden_size, "position_embedding", c.initializer_range, dt)
        return jnp.concatenate([cls, patches], axis=1) + positions(jnp.arange(count))[None]


class CLIPVisionTransformer(_TowerModule):
    """HF ``CLIPVisionModel``'s body: the pooled output ``[B, H]`` (``post_layernorm`` of the
    class token)."""

    remat: str | None = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array, *, train: bool) -> jax.Array:
        c, dt = self.config, self.dtype
        x = CLIPVisionEmbeddings(c, dt, name="embeddings")(pixel_values)
        x = layer_norm(c.layer_norm_eps, "pre_layrnorm", dt)(x)  # HF's spelling
        x = CLIPEncoder(c, dt, self.remat, name="encoder")(x, None, train=train)
        return layer_norm(c.layer_norm_eps, "post_layernorm", dt)(x[:, 0])


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Where transformers' ``CLIPTextModel`` pools each row: the first ``eos_token_id``, or for
    a legacy config (``eos_token_id == 2``) the highest token id (OpenAI's end-of-text is the
    last id of its vocabulary). A row without the token pools at position 0, as transformers'
    ``argmax`` of an all-False row does.

    Example:
      >>> eos_positions(jnp.array([[9, 5, 7, 7, 0]]), 7).tolist(), eos_positions(
      ...     jnp.array([[9, 5, 12, 3]]), 2).tolist()
      ([2], [2])
    """
    if eos_token_id == LEGACY_EOS:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextEmbeddings(_TowerModule):
    """Token embeddings plus learned position embeddings (positions ``0 .. T - 1``)."""

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c, dt = self.config, self.dtype
        std = c.initializer_range
        tokens = _embed(c.vocab_size, c.hidden_size, "token_embedding", std, dt)
        positions = _embed(c.max_position_embeddings, c.hidden_size, "position_embedding", std, dt)
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[-1]))[None]


class CLIPTextTransformer(_TowerModule):
    """HF ``CLIPTextModel``'s body: causal blocks over token + position embeddings, the pooled
    output ``[B, H]`` (``final_layer_norm`` at the end-of-text token, :func:`eos_positions`)."""

    remat: str | None = None

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, *, train: bool
    ) -> jax.Array:
        c, dt = self.config, self.dtype
        length = input_ids.shape[-1]
        if length > c.max_position_embeddings:
            raise ValueError(
                f"Sequence length {length} exceeds max_position_embeddings="
                f"{c.max_position_embeddings}; truncate inputs to extras['max_length']."
            )
        x = CLIPTextEmbeddings(c, dt, name="embeddings")(input_ids)
        mask = causal_mask(length, length, 0, attention_mask)
        x = CLIPEncoder(c, dt, self.remat, name="encoder")(x, mask, train=train)
        x = layer_norm(c.layer_norm_eps, "final_layer_norm", dt)(x)
        return x[jnp.arange(x.shape[0]), eos_positions(input_ids, c.eos_token_id)]


class CLIPForTask(nn.Module):
    """One CLIP tower with a task head.

    ``task="features"`` returns the projected embedding ``[B, projection_dim]``;
    ``"classification"`` / ``"regression"`` return logits from a Dense ``classifier`` on it.
    ``normalize`` divides the embedding by its L2 norm first, as ``CLIPModel`` does before its
    similarities (:func:`zero_shot_classifier`).
    """

    config: CLIPConfig
    dtype: Any = jnp.float32
    task: str = "classification"
    num_labels: int = 2
    normalize: bool = False

    @nn.compact
    def __call__(
        self, inputs: jax.Array, attention_mask: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        c, dt = self.config, self.dtype
        tower = c.active
        if c.tower == "vision":
            check_nhwc(inputs, tower.num_channels, (tower.image_size, tower.image_size))
            body = CLIPVisionTransformer(tower, dt, c.remat, name=ROOT["vision"])
            pooled = body(inputs, train=train)
        else:
            body = CLIPTextTransformer(tower, dt, c.remat, name=ROOT["text"])
            pooled = body(inputs, attention_mask, train=train)
        projection = dense(
            c.projection_dim, PROJECTION[c.tower], dt, std=tower.hidden_size**-0.5, bias=False
        )
        x = projection(pooled)
        if self.normalize:
            # transformers' _get_vector_norm: sqrt(sum(x^2)), no epsilon.
            x = x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
        if self.task == "features":
            return x
        return dense(self.num_labels, "classifier", dt, std=c.projection_dim**-0.5)(x)


def init_std(path: str, config: CLIPConfig) -> float:
    """The std of transformers' ``CLIPPreTrainedModel._init_weights`` for one kernel or
    embedding (``initializer_factor`` included); the new ``classifier``'s is
    ``projection_dim ** -0.5``, as ``CLIPForImageClassification``'s is its input width's."""
    factor = config.initializer_factor
    parts = path.split("/")
    tower = config.vision if parts[0] == ROOT["vision"] else config.text
    width, depth = tower.hidden_size, tower.num_hidden_layers
    module = parts[-2]
    if parts[0] in PROJECTION.values():
        tower = config.vision if parts[0] == PROJECTION["vision"] else config.text
        return tower.hidden_size**-0.5 * factor
    if parts[0] == "classifier":
        return config.projection_dim**-0.5 * factor
    if parts[0] == ROOT["text"] and module in ("token_embedding", "position_embedding"):
        return 0.02 * factor
    if parts[-1] == "class_embedding":
        return width**-0.5 * factor
    if module in ("patch_embedding", "position_embedding"):
        return tower.initializer_range * factor
    if module in ("q_proj", "k_proj", "v_proj", "fc2"):
        return width**-0.5 * (2 * depth) ** -0.5 * factor
    if module == "out_proj":
        return width**-0.5 * factor
    if module == "fc1":
        return (2 * width) ** -0.5 * factor
    raise ValueError(f"No CLIP initializer for param {path!r}.")


def init_leaf(path: str, leaf: jax.ShapeDtypeStruct, seed: int, *, config: CLIPConfig):
    """Initializes one param the way transformers' ``CLIPPreTrainedModel._init_weights`` does:
    kernels and embeddings ~ normal(:func:`init_std`), biases 0, LayerNorm scales 1; each param
    from its own stream (:func:`jaxtl.models.common.leaf_rng`)."""
    name = path.rsplit("/", 1)[-1]
    if name == "bias":
        return jnp.zeros(leaf.shape, leaf.dtype)
    if name == "scale":
        return jnp.ones(leaf.shape, leaf.dtype)
    values = leaf_rng(seed, path).standard_normal(leaf.shape, dtype=host_dtype(leaf))
    return jnp.asarray(values * init_std(path, config), dtype=leaf.dtype)


_TOP = (*ROOT.values(), *PROJECTION.values(), "logit_scale")
# HF's LayerNorm names: layer_norm1/2, final_layer_norm, post_layernorm and pre_layrnorm (sic).
_NORMS = ("layer_norm1", "layer_norm2", "final_layer_norm", "post_layernorm", "pre_layrnorm")


def convert_hf_checkpoint(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames a Hugging Face CLIP state dict (``CLIPModel``, ``CLIPVisionModelWithProjection``
    or ``CLIPTextModelWithProjection``) to model paths, torch layouts to Flax ones.

    ``encoder.layers.N`` becomes ``encoder/layers_N``; Linear weights are transposed, the patch
    conv goes from OIHW to HWIO, LayerNorm weights become ``scale`` and embedding weights
    ``embedding``. Both towers and ``logit_scale`` are converted: the merge reports whatever the
    built tower lacks as unexpected. ``position_ids`` buffers (older saves) are dropped; other
    names pass through unchanged.

    Example:
      >>> name = "text_model.encoder.layers.0.mlp.fc1.weight"
      >>> out = convert_hf_checkpoint({name: np.ones((4, 3))})
      >>> out["text_model/encoder/layers_0/mlp/fc1/kernel"].shape
      (3, 4)
    """
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        parts = name.split(".")
        if parts[0] not in _TOP:
            out[name] = array
            continue
        if parts[-1] == "position_ids":
            continue  # an index buffer, not a weight
        if parts[1:3] == ["encoder", "layers"]:  # encoder.layers.N -> encoder/layers_N
            parts = [parts[0], "encoder", f"layers_{parts[3]}", *parts[4:]]
        *module, leaf = parts
        if module and module[-1].endswith(_NORMS) and leaf == "weight":
            leaf = "scale"
        elif module and module[-1].endswith("embedding") and leaf == "weight":
            if array.ndim == 4:
                leaf, array = "kernel", array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            else:
                leaf = "embedding"
        elif leaf == "weight" and array.ndim == 2:
            leaf, array = "kernel", array.T  # torch Linear stores (out, in)
        out["/".join([*module, leaf])] = array
    return out


def export_hf_checkpoint(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_hf_checkpoint`: HF names (``CLIPModel``'s, which
    ``CLIP{Vision,Text}ModelWithProjection`` share) and torch layouts, float32 numpy arrays."""
    del batch_stats  # CLIP has no BatchNorm
    out: dict[str, np.ndarray] = {}
    for path, array in flat_numpy(params).items():
        array = array.astype(np.float32)
        *module, leaf = path.split("/")
        module = [f"layers.{m[len('layers_') :]}" if m.startswith("layers_") else m for m in module]
        if leaf == "kernel":
            leaf, array = "weight", (array.T if array.ndim == 2 else array.transpose(3, 2, 0, 1))
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[".".join([*module, leaf])] = np.ascontiguousarray(array)
    return out


def _refuse_head_export(params: Mapping[str, Any], batch_stats: Mapping[str, Any]):
    raise ValueError(
        "A CLIP classification/regression head (a Dense on the projected embedding) has no "
        "transformers class to export to (CLIPForImageClassification reads the mean patch "
        "token, not the projection). Export a task='features' model of the tower, or save the "
        "params with jaxtl's checkpoints."
    )


def default_preprocessing(config: CLIPTowerConfig) -> preprocessing.ImagePreprocessing:
    """transformers' ``CLIPImageProcessor`` defaults: resize the shorter side to the model's
    size (bicubic), center crop, rescale by 1/255, normalize with OpenAI's mean and std."""
    return preprocessing.ImagePreprocessing(
        size=(config.image_size, config.image_size),
        mean=CLIP_MEAN,
        std=CLIP_STD,
        resize=config.image_size,
        interpolation="bicubic",
        source="transformers CLIPImageProcessor defaults",
    )


def structure(config: CLIPConfig, task: str) -> Structure:
    """Stem (embeddings, and the vision tower's ``pre_layrnorm``), the chosen tower's blocks,
    neck (its final LayerNorm and projection) and the head."""
    root, tower = ROOT[config.tower], config.active
    stem = (f"{root}/embeddings",)
    if config.tower == "vision":
        stem = (*stem, f"{root}/pre_layrnorm")
    final = "post_layernorm" if config.tower == "vision" else "final_layer_norm"
    return Structure(
        stem=stem,
        blocks=tuple(f"{root}/encoder/layers_{i}" for i in range(tower.num_hidden_layers)),
        neck=(f"{root}/{final}", PROJECTION[config.tower]),
        head=("classifier",) if task != "features" else (),
        tensor_parallel=tensor_parallel(root),
        lora_targets=lora_targets(root),
    )


def build(
    directory: str,
    raw_config: Mapping[str, Any],
    *,
    task: str,
    num_labels: int,
    dtype: Any = jnp.float32,
    tower: str | None = None,
) -> ModelSpec:
    """Builds one CLIP tower's module, initializer, converter, exporter and structure.

    Called by :func:`jaxtl.weights.loading.load` through the registry; ``task`` and
    ``num_labels`` are already validated there. ``tower`` is ``"vision"`` (default) or
    ``"text"`` (see the module docstring).
    """
    config_path = os.path.join(directory, "config.json") if directory else "config.json"
    config = CLIPConfig.from_hf(raw_config, config_path, tower)
    num_labels = 0 if task == "features" else num_labels
    module = CLIPForTask(config, dtype, task, num_labels)
    extras: dict[str, Any] = {"tower": config.tower, "projection_dim": config.projection_dim}
    if config.tower == "vision":
        size = config.vision.image_size
        pixels = jax.ShapeDtypeStruct((1, size, size, config.vision.num_channels), dtype)
        abstract = abstract_variables(module, pixels)["params"]
        apply, forward = make_apply(module, ("pixel_values",))
        recipe = preprocessing.for_checkpoint(directory, default_preprocessing(config.vision))
        extras.update(preprocessing=recipe, image_size=(size, size))
        architecture = "CLIPVisionModelWithProjection"
    else:
        abstract = abstract_params(module, config.max_length)
        apply, forward = make_apply(module, ("input_ids", "attention_mask"))
        extras.update(max_length=config.max_length)
        architecture = "CLIPTextModelWithProjection"
    extras["hidden_size"] = config.active.hidden_size
    # CLIP{Vision,Text}ModelWithProjection read projection_dim from their own sub-config, which
    # CLIPConfig leaves at its default (512) whatever the top-level value.
    sub = f"{config.tower}_config"
    tower_config = {**(raw_config.get(sub) or {}), "projection_dim": config.projection_dim}
    export = hf_exporter(
        export_hf_checkpoint,
        raw_config,
        architecture,
        num_labels,
        task,
        **{sub: tower_config, "dtype": "float32"},
    )
    return ModelSpec(
        config=config,
        module=module,
        abstract_params=abstract,
        init_leaf=functools.partial(init_leaf, config=config),
        convert=convert_hf_checkpoint,
        apply=apply,
        forward=forward,
        structure=structure(config, task),
        extras=extras,
        export=export if task == "features" else _refuse_head_export,
    )


def zero_shot_classifier(
    path: str | os.PathLike,
    class_prompts: Sequence[str] | Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
) -> LoadedModel:
    """A vision-tower classifier that scores each image against one text prompt per class.

    The text tower embeds the prompts; the head's kernel is their L2-normalized embeddings
    times ``exp(logit_scale)`` (bias 0) and the image embedding is normalized before it, so the
    logits are ``CLIPModel``'s ``logits_per_image`` for these prompts. The result is an ordinary
    ``task="classification"`` model: evaluate it as is, or fine-tune from it (the head starts at
    the zero-shot solution, as in WiSE-FT / LP-FT).

    Args:
      path: a ``CLIPModel`` checkpoint directory.
      class_prompts: one prompt per class: strings (tokenized with the checkpoint's
        ``tokenizer.json``), or token ids: a mapping with ``input_ids`` ``[C, T]`` and
        optionally ``attention_mask`` (each row ending in the end-of-text token, as CLIP's
        tokenizer writes it).
      dtype: dtype of params and computation.

    Returns:
      A :class:`~jaxtl.models.base.LoadedModel` with ``num_labels = len(class_prompts)``; its
      report is the vision tower's load report, ``extras["zero_shot"]`` the text tower's.

    Raises:
      ValueError: no prompts, a checkpoint without ``logit_scale`` or a complete text tower.
    """
    # Imported here: the weights layer imports the model registry, so a module-level import
    # would run back up the layers.
    from jaxtl.weights.loading import load, tokenizer
    from jaxtl.weights.merge import merge_checkpoint
    from jaxtl.weights.safetensors_io import read_safetensors_dir

    ids, mask = _prompt_ids(path, class_prompts, tokenizer)
    if not len(ids):
        raise ValueError("class_prompts is empty; give one prompt per class.")
    model = load(path, task="classification", num_labels=len(ids), dtype=dtype)
    directory = model.path
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        raw_config = json.load(f)  # load() has read and checked it
    text = build(directory, raw_config, task="features", num_labels=0, tower="text", dtype=dtype)
    tensors = text.convert(read_safetensors_dir(directory))
    if "logit_scale" not in tensors:
        raise ValueError(
            f"{directory} has no logit_scale: zero-shot logits need a CLIPModel checkpoint "
            "(both towers and the temperature)."
        )
    text_params, report = merge_checkpoint(
        text.abstract_params,
        tensors,
        source=directory,
        described_model=f"the CLIP text tower that {directory}/config.json describes",
    )
    embeds = text.apply(text_params, {"input_ids": ids, "attention_mask": mask})
    embeds = embeds / jnp.sqrt(jnp.sum(jnp.square(embeds), axis=-1, keepdims=True))
    scale = jnp.exp(jnp.asarray(tensors["logit_scale"], embeds.dtype))
    params = dict(model.params)
    params["classifier"] = {
        "kernel": (embeds * scale).T.astype(dtype),
        "bias": jnp.zeros((len(ids),), dtype),
    }
    module = model.module.clone(normalize=True)
    apply, forward = make_apply(module, ("pixel_values",))
    extras = {**model.extras, "zero_shot": report}
    return dataclasses.replace(
        model, module=module, params=params, apply=apply, forward=forward, extras=extras
    )


def _prompt_ids(path, class_prompts, tokenizer_of) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(class_prompts, Mapping):
        ids = np.asarray(class_prompts["input_ids"], np.int32)
        mask = class_prompts.get("attention_mask")
        mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
        return ids, mask
    if isinstance(class_prompts, str):
        raise ValueError("class_prompts must be a list of prompts, one per class, not one string.")
    encodings = tokenizer_of(path).encode_batch(list(class_prompts))
    length = max((len(e.ids) for e in encodings), default=0)
    ids = np.zeros((len(encodings), length), np.int32)
    mask = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    return ids, mask
