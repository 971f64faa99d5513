"""Vision Transformers (ViT) in Flax linen, read from Hugging Face checkpoints.

The param tree mirrors the names Hugging Face checkpoints are stored under
(``vit/encoder/layer_0/attention/attention/query``), so the name map is mechanical; transformers
>= 5 renames its in-memory modules (``vit.layers.0.attention.q_proj``) but still writes these
names to disk, and :func:`convert_hf_checkpoint` reads both. Numerics follow
``transformers.ViTModel``: a strided-conv patch embedding, a CLS token, absolute position
embeddings, pre-LayerNorm blocks with exact erf GELU, a final LayerNorm, and classification from
the CLS token (``ViTForImageClassification`` has no pooler). Parity with the PyTorch
implementation is tested in ``tests/test_vit.py``.

Inputs are NHWC ``pixel_values``, already normalized (see ``extras["preprocessing"]``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models import preprocessing
from jaxtl.models.common import (
    ACTIVATIONS,
    abstract_variables,
    adapt_input_channels,
    check_in_channels,
    hf_exporter,
    leaf_rng,
    make_apply,
    segmentation_exporter,
    trunc_normal,
)
from jaxtl.models.layers import (
    SEGMENTATION_HEAD,
    Dropout,
    SegmentationHead,
    block,
    check_nhwc,
    dense,
    dot_product_attention,
    layer_norm,
    shard_batch,
    split_heads,
)
from jaxtl.models.registry import ModelSpec
from jaxtl.transfer.structure import Structure
from jaxtl.transfer.trees import flatten

STEM_KERNEL = "vit/embeddings/patch_embeddings/projection/kernel"
POSITIONS = "vit/embeddings/position_embeddings"

# Megatron's split of each encoder layer (see jaxtl.sharding), as BERT's.
TENSOR_PARALLEL = (
    (r"vit/encoder/layer_\d+/attention/attention/(query|key|value)", "column"),
    (r"vit/encoder/layer_\d+/attention/output/dense", "row"),
    (r"vit/encoder/layer_\d+/intermediate/dense", "column"),
    (r"vit/encoder/layer_\d+/output/dense", "row"),
)


# LoRA's default targets: the attention query and value projections, as for BERT.
LORA_TARGETS = (r"vit/encoder/layer_\d+/attention/attention/(query|value)",)


def _pair(value: int | tuple[int, int] | list[int], what: str, source: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(
            f"{source}: {what} must be a positive int or (height, width), got {value!r}."
        )
    return pair  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The config.json fields the model uses (names as in ``transformers.ViTConfig``).

    ``image_size`` and ``patch_size`` are ``(height, width)`` pairs; config.json may hold ints.
    ``head_dim`` is read when a config sets it (transformers uses it if present), else
    ``hidden_size // num_attention_heads``.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    qkv_bias: bool = True
    head_dim: int | None = None
    # jaxtl's, not config.json's: rematerialize each block under this policy (layers.block).
    remat: str | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along (height, width)."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def attention_dim(self) -> int:
        return self.num_attention_heads * (
            self.head_dim or self.hidden_size // self.num_attention_heads
        )

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> ViTConfig:
        """Builds the config from a parsed config.json, checking what this model supports.

        ``encoder_stride`` (masked-image-modeling decoder), ``pooler_*`` (``ViTModel``'s pooler,
        which no jaxtl task reads) and label maps are ignored.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names and v is not None}
        for key in ("image_size", "patch_size"):
            if key in values:
                values[key] = _pair(values[key], key, source)
        config = cls(**values)
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"{source}: hidden_act={config.hidden_act!r} is not supported; expected one of "
                f"{sorted(ACTIVATIONS)}."
            )
        if config.head_dim is None and config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"{source}: hidden_size={config.hidden_size} is not a multiple of "
                f"num_attention_heads={config.num_attention_heads}."
            )
        return config.resized(config.image_size, source)

    def resized(self, image_size: int | tuple[int, int], source: str = "image_size") -> ViTConfig:
        """The same model for another input size; it must be a whole number of patches."""
        size = _pair(image_size, "image_size", source)
        if size[0] % self.patch_size[0] or size[1] % self.patch_size[1]:
            raise ValueError(
                f"{source}: image_size={size} is not a whole number of {self.patch_size} patches; "
                "pick a multiple of patch_size (HF would silently drop the remainder)."
            )
        return dataclasses.replace(self, image_size=size)


def _dense(config: ViTConfig, features: int, name: str, dtype: Any, bias: bool = True):
    return dense(features, name, dtype, std=config.initializer_range, bias=bias)


class _ViTModule(nn.Module):
    """Fields every ViT submodule shares: the config and the param/compute dtype."""

    config: ViTConfig
    dtype: Any = jnp.float32


class ViTPatchEmbeddings(_ViTModule):
    """Non-overlapping patches -> hidden vectors by a strided conv, flattened row-major."""

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Conv(
            c.hidden_size,
            kernel_size=c.patch_size,
            strides=c.patch_size,
            padding="VALID",
            kernel_init=nn.initializers.normal(c.initializer_range),
            dtype=self.dtype,
            param_dtype=self.dtype,
            name="projection",
        )(pixel_values)
        return x.reshape(x.shape[0], -1, c.hidden_size)  # (h, w) row-major, as torch's flatten(2)


class ViTEmbeddings(_ViTModule):
    """CLS token + patch embeddings, plus absolute position embeddings, then dropout."""

    @nn.compact
    def __call__(self, pixel_values: jax.Array, *, train: bool) -> jax.Array:
        c = self.config
        patches = ViTPatchEmbeddings(c, self.dtype, name="patch_embeddings")(pixel_values)
        init = nn.initializers.normal(c.initializer_range)
        cls = self.param("cls_token", init, (1, 1, c.hidden_size), self.dtype)
        positions = self.param(
            "position_embeddings", init, (1, patches.shape[1] + 1, c.hidden_size), self.dtype
        )
        cls = jnp.broadcast_to(cls, (patches.shape[0], 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + positions
        return Dropout(c.hidden_dropout_prob, stream=True)(x, deterministic=not train)


class ViTSelfAttention(_ViTModule):
    """Multi-head self-attention over all tokens (HF ``attention.attention``)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = self.config
        q, k, v = (
            split_heads(
                _dense(c, c.attention_dim, name, self.dtype, c.qkv_bias)(x), c.num_attention_heads
            )
            for name in ("query", "key", "value")
        )
        return dot_product_attention(
            q,
            k,
            v,
            dropout_rate=c.attention_probs_dropout_prob,
            deterministic=not train,
            dtype=self.dtype,
        )


class ViTDenseDropout(_ViTModule):
    """Dense then dropout: HF's ``attention.output`` and ``output`` (the layer adds the
    residual)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = _dense(self.config, self.config.hidden_size, "dense", self.dtype)(x)
        return Dropout(self.config.hidden_dropout_prob, stream=True)(x, deterministic=not train)


class ViTAttention(_ViTModule):
    """Self-attention + its output projection (HF ``attention``: ``attention`` and ``output``)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        context = ViTSelfAttention(self.config, self.dtype, name="attention")(x, train=train)
        return ViTDenseDropout(self.config, self.dtype, name="output")(context, train=train)


class ViTIntermediate(_ViTModule):
    """The feed-forward expansion: Dense to intermediate_size, then the activation."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        return ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "dense", self.dtype)(x))


class ViTLayer(_ViTModule):
    """One pre-LayerNorm transformer block."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c, dtype = self.config, self.dtype
        h = layer_norm(c.layer_norm_eps, "layernorm_before", dtype)(x)
        x = x + ViTAttention(c, dtype, name="attention")(h, train=train)
        h = ViTIntermediate(c, dtype, name="intermediate")(
            layer_norm(c.layer_norm_eps, "layernorm_after", dtype)(x)
        )
        return x + ViTDenseDropout(c, dtype, name="output")(h, train=train)


class ViTEncoder(_ViTModule):
    """The stack of blocks, named ``layer_0`` ... ``layer_{N-1}``."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        layer = block(ViTLayer, self.config.remat, train_argnum=2)
        for i in range(self.config.num_hidden_layers):
            x = shard_batch(
                layer(self.config, self.dtype, name=f"layer_{i}")(shard_batch(x), train)
            )
        return x


class ViTModel(_ViTModule):
    """The encoder (HF ``ViTModel`` without its pooler): last hidden state ``[B, 1 + P, H]``,
    final LayerNorm applied; token 0 is CLS."""

    @nn.compact
    def __call__(self, pixel_values: jax.Array, *, train: bool = False) -> jax.Array:
        x = ViTEmbeddings(self.config, self.dtype, name="embeddings")(pixel_values, train=train)
        x = ViTEncoder(self.config, self.dtype, name="encoder")(x, train=train)
        return layer_norm(self.config.layer_norm_eps, "layernorm", self.dtype)(x)


class ViTForTask(_ViTModule):
    """ViT with a task head.

    ``task="features"`` returns the CLS token's final-LayerNorm hidden state ``[B, H]``;
    ``"classification"`` and ``"regression"`` return logits ``[B, num_labels]`` from a Dense head
    named ``classifier`` over that state, as ``ViTForImageClassification`` does.
    ``"segmentation"`` returns per-pixel logits ``[B, H, W, num_labels]`` at the input's size
    from ``segmentation_head`` (:class:`~jaxtl.models.layers.SegmentationHead`) over the patch
    tokens (final LayerNorm applied, CLS left out) laid back on the patch grid.
    """

    task: str = "classification"
    num_labels: int = 2

    @nn.compact
    def __call__(self, pixel_values: jax.Array, *, train: bool = False) -> jax.Array:
        c = self.config
        check_nhwc(pixel_values, c.num_channels, c.image_size)  # one size: position embeddings
        hidden = ViTModel(c, self.dtype, name="vit")(pixel_values, train=train)
        if self.task == "segmentation":
            grid = hidden[:, 1:].reshape(hidden.shape[0], *c.grid, hidden.shape[-1])  # row-major
            head = SegmentationHead(
                self.num_labels, c.initializer_range, self.dtype, name=SEGMENTATION_HEAD
            )
            return head(grid, c.image_size)
        cls = hidden[:, 0]
        if self.task == "features":
            return cls
        return _dense(c, self.num_labels, "classifier", self.dtype)(cls)


def init_leaf(path: str, leaf: jax.ShapeDtypeStruct, seed: int, *, config: ViTConfig) -> jax.Array:
    """Initializes one param the way transformers' ``ViTPreTrainedModel._init_weights`` does.

    Kernels, ``cls_token`` and ``position_embeddings`` ~ ``trunc_normal_(std=initializer_range,
    a=-2, b=2)``; biases 0; LayerNorm scales 1. torch's bounds are absolute, not in stds, so at
    ViT's std 0.02 this equals the plain normal that transformers >= 5 uses for Linear/Conv
    kernels. Each param draws from its own stream
    (:func:`jaxtl.models.common.leaf_rng`): a head's init does not depend on the rest of the
    tree and needs no XLA compilation.
    """
    name = path.rsplit("/", 1)[-1]
    if name == "bias":
        return jnp.zeros(leaf.shape, leaf.dtype)
    if name == "scale":
        return jnp.ones(leaf.shape, leaf.dtype)
    if name not in ("kernel", "cls_token", "position_embeddings"):
        raise ValueError(f"No ViT initializer for param {path!r}.")
    values = trunc_normal(leaf_rng(seed, path), leaf.shape, config.initializer_range)
    return jnp.asarray(values, dtype=leaf.dtype)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    # torch's get_cubic_upsample_coefficients (ATen UpSample.h): Keys' kernel with a = -0.75.
    # jax.image.resize's "bicubic" uses a = -0.5 and differs by up to ~0.15 on unit inputs.
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def torch_bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` weights of torch's ``interpolate(mode="bicubic",
    align_corners=False, size=...)`` along one axis (edge taps clamped, no antialiasing).

    Example:
      >>> np.allclose(torch_bicubic_matrix(4, 4), np.eye(4))
      True
    """
    # With size= (no scale_factor) torch samples at (i + 0.5) * in / out - 0.5 (and, for cubic,
    # does not clamp that to 0); the base index is clamped to size_in - 1, t to [0, 1].
    real = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    index = np.minimum(np.floor(real), size_in - 1).astype(np.int64)
    weights = _cubic_weights(np.clip(real - index, 0.0, 1.0))
    matrix = np.zeros((size_out, size_in))
    rows = np.arange(size_out)
    for tap in range(4):
        np.add.at(matrix, (rows, np.clip(index + tap - 1, 0, size_in - 1)), weights[:, tap])
    return matrix


def interpolate_positions(
    positions: np.ndarray, grid_in: tuple[int, int], grid_out: tuple[int, int]
) -> np.ndarray:
    """Resizes ``[1, 1 + h*w, D]`` position embeddings to another patch grid, CLS kept.

    Matches transformers' ``ViTEmbeddings.interpolate_pos_encoding`` (bicubic, align_corners
    False, ``size=`` the new grid), computed once at load instead of every forward; float64 here,
    so it is at least as exact as torch's float32.
    """
    positions = np.asarray(positions)
    if tuple(grid_in) == tuple(grid_out):
        return positions
    dim = positions.shape[-1]
    grid = positions[0, 1:].astype(np.float64).reshape(*grid_in, dim)
    rows = torch_bicubic_matrix(grid_in[0], grid_out[0])
    cols = torch_bicubic_matrix(grid_in[1], grid_out[1])
    resized = np.einsum("ph,qw,hwd->pqd", rows, cols, grid).reshape(1, -1, dim)
    return np.concatenate([positions[:, :1], resized.astype(positions.dtype)], axis=1)


# transformers >= 5 in-memory names (model.state_dict()) -> the on-disk names used here.
_V5_NAMES = {
    ("attention", "q_proj"): ("attention", "attention", "query"),
    ("attention", "k_proj"): ("attention", "attention", "key"),
    ("attention", "v_proj"): ("attention", "attention", "value"),
    ("attention", "o_proj"): ("attention", "output", "dense"),
    ("mlp", "fc1"): ("intermediate", "dense"),
    ("mlp", "fc2"): ("output", "dense"),
}


def in_memory_name(name: str) -> str:
    """The module an on-disk name (``vit.encoder.layer.0.attention.attention.query``) is in the
    installed transformers' model: renamed by transformers >= 5 (``vit.layers.0.attention.
    q_proj``), the same before. PEFT adapters name in-memory modules."""
    parts = name.split(".")
    start = 1 if parts[:1] == ["vit"] else 0
    if parts[start : start + 2] != ["encoder", "layer"] or _transformers_major() < 5:
        return name
    index, rest = parts[start + 2], tuple(parts[start + 3 :])
    inverse = {v: k for k, v in _V5_NAMES.items()}
    for old, new in inverse.items():
        if rest[: len(old)] == old:
            rest = (*new, *rest[len(old) :])
            break
    return ".".join([*parts[:start], "layers", index, *rest])


def _transformers_major() -> int:
    from importlib import metadata

    try:
        return int(metadata.version("transformers").split(".")[0])
    except metadata.PackageNotFoundError:
        return 5  # the current major, for an export read elsewhere


def convert_hf_checkpoint(
    tensors: Mapping[str, np.ndarray],
    source: ViTConfig | None = None,
    target: ViTConfig | None = None,
) -> dict[str, np.ndarray]:
    """Renames a Hugging Face ViT state dict to model paths and torch layouts to Flax ones.

    ``vit.`` is optional (``ViTModel`` checkpoints have none); ``classifier.*`` maps to the head;
    ``pooler.*`` and ``embeddings.mask_token`` map to paths no jaxtl model has (so they are
    reported unexpected, as transformers does); other names (e.g. a masked-image-modeling
    ``decoder``) pass through unchanged. Linear weights are transposed, the patch conv goes from
    OIHW to HWIO. Given ``source`` (the checkpoint's config) and ``target`` (the model's), the
    patch kernel is adapted to ``target.num_channels`` (:func:`adapt_input_channels`) and the
    position embeddings are interpolated to ``target``'s patch grid.

    Example:
      >>> out = convert_hf_checkpoint({"vit.encoder.layer.0.output.dense.weight": np.zeros((4, 3))})
      >>> out["vit/encoder/layer_0/output/dense/kernel"].shape
      (3, 4)
    """
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        parts = name.split(".")
        if parts[0] == "vit":
            parts = parts[1:]
        if parts[0] == "layers" and len(parts) > 3:  # transformers >= 5 in-memory names
            rest = tuple(parts[2:4])
            parts = ["encoder", "layer", parts[1], *_V5_NAMES.get(rest, rest), *parts[4:]]
        if parts[0] in ("embeddings", "encoder", "layernorm", "pooler"):
            parts = ["vit", *parts]
        elif parts[0] != "classifier":
            out[name] = array
            continue
        if parts[1:3] == ["encoder", "layer"]:  # encoder.layer.N -> encoder/layer_N
            parts = ["vit", "encoder", f"layer_{parts[3]}", *parts[4:]]
        *module, leaf = parts
        if module[-1].startswith("layernorm") and leaf == "weight":
            leaf = "scale"
        elif leaf == "weight" and array.ndim == 2:
            leaf, array = "kernel", array.T  # torch Linear stores (out, in)
        elif leaf == "weight" and array.ndim == 4:
            leaf, array = "kernel", array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        path = "/".join([*module, leaf])
        if path in out:
            raise ValueError(f"Checkpoint names {path!r} twice (with and without 'vit.' prefix).")
        out[path] = array
    if source is not None and target is not None:
        _adapt_inputs(out, source, target)
    return out


def _adapt_inputs(out: dict[str, np.ndarray], source: ViTConfig, target: ViTConfig) -> None:
    kernel = out.get(STEM_KERNEL)
    if kernel is not None and kernel.ndim == 4 and kernel.shape[2] != target.num_channels:
        out[STEM_KERNEL] = adapt_input_channels(kernel, target.num_channels)
    positions = out.get(POSITIONS)
    expected = (1, 1 + source.grid[0] * source.grid[1], source.hidden_size)
    # A table of any other shape is left alone: the merge then reports it as mismatched.
    if positions is not None and tuple(positions.shape) == expected:
        out[POSITIONS] = interpolate_positions(positions, source.grid, target.grid)


def export_hf_checkpoint(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None = None, *, task: str
) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_hf_checkpoint`: an HF state dict, float32 numpy arrays.

    Names and layouts are ``ViTForImageClassification``'s (``ViTModel``'s, without the ``vit.``
    prefix, for ``task="features"``). Written with ``safetensors.numpy.save_file`` beside
    :func:`export_hf_config`'s config.json, the directory loads in
    ``transformers.ViTForImageClassification.from_pretrained``.
    """
    del batch_stats  # ViT has no BatchNorm
    base = [] if task == "features" else ["vit"]  # ViTModel's own names have no prefix
    state: dict[str, np.ndarray] = {}
    for path, value in flatten(params).items():
        array = np.asarray(jax.device_get(value), dtype=np.float32)
        *module, leaf = path.split("/")
        if module[0] == "vit":
            module = [*base, *module[1:]]
        # encoder/layer_N -> encoder.layer.N
        module = [m.replace("_", ".") if m.startswith("layer_") else m for m in module]
        if leaf == "scale":
            leaf = "weight"
        elif leaf == "kernel":
            leaf = "weight"
            array = array.T if array.ndim == 2 else array.transpose(3, 2, 0, 1)
        state[".".join([*module, leaf])] = np.ascontiguousarray(array)
    return state


def export_hf_config(config: ViTConfig) -> dict[str, Any]:
    """What the exported config.json changes besides the head: the model's own input size and
    channels (after ``image_size=`` / ``in_channels=``), and the float32 of
    :func:`export_hf_checkpoint`'s arrays."""
    square = config.image_size[0] == config.image_size[1]
    return {
        "model_type": "vit",
        "image_size": config.image_size[0] if square else list(config.image_size),
        "num_channels": config.num_channels,
        "dtype": "float32",
    }


def default_preprocessing(config: ViTConfig) -> preprocessing.ImagePreprocessing:
    """transformers' ``ViTImageProcessor`` defaults: resize straight to the model's size
    (bilinear, no crop), rescale by 1/255, normalize with mean = std = 0.5."""
    half = (0.5,) * config.num_channels
    return preprocessing.ImagePreprocessing(
        size=config.image_size,
        mean=half,
        std=half,
        resize=None,
        interpolation="bilinear",
        source="transformers ViTImageProcessor defaults",
    )


def build(
    directory: str,
    raw_config: Mapping[str, Any],
    *,
    task: str,
    num_labels: int,
    dtype: Any = jnp.float32,
    image_size: int | tuple[int, int] | None = None,
    in_channels: int | None = None,
) -> ModelSpec:
    """Builds the ViT module, initializer, converter, exporter and structure for one checkpoint.

    Called by :func:`jaxtl.weights.loading.load` through the registry; ``task`` and
    ``num_labels`` are already validated there. ``image_size`` builds the model for another
    input size (position embeddings interpolated at load, as HF's
    ``interpolate_pos_encoding=True`` does per call); ``in_channels`` adapts the patch
    projection to that many input channels. ``task="segmentation"`` puts ``segmentation_head``
    on the backbone of ``task="features"``, every backbone path unchanged; such a model does not
    export (:func:`jaxtl.models.common.segmentation_exporter`).
    """
    config_path = os.path.join(directory, "config.json") if directory else "config.json"
    source = ViTConfig.from_hf(raw_config, config_path)
    config = source
    if image_size is not None:
        config = config.resized(image_size, "jaxtl.load(image_size=...)")
    in_channels = check_in_channels(in_channels)
    if in_channels is not None:
        config = dataclasses.replace(config, num_channels=in_channels)
    num_labels = 0 if task == "features" else num_labels
    module = ViTForTask(config, dtype, task, num_labels)

    pixels = jax.ShapeDtypeStruct((1, *config.image_size, config.num_channels), dtype)
    abstract = abstract_variables(module, pixels)["params"]
    apply, forward = make_apply(module, ("pixel_values",))

    structure = Structure(
        stem=("vit/embeddings",),
        blocks=tuple(f"vit/encoder/layer_{i}" for i in range(config.num_hidden_layers)),
        neck=("vit/layernorm",),
        head={"features": (), "segmentation": (SEGMENTATION_HEAD,)}.get(task, ("classifier",)),
        tensor_parallel=TENSOR_PARALLEL,
        lora_targets=LORA_TARGETS,
    )
    recipe = preprocessing.for_checkpoint(directory, default_preprocessing(source))
    extras = {
        "preprocessing": recipe.with_inputs(image_size, in_channels),
        "image_size": config.image_size,
        "hidden_size": config.hidden_size,
        "stem_kernel": STEM_KERNEL,
        "in_memory_name": in_memory_name,  # for the PEFT layout (jaxtl.lora)
    }
    if task == "segmentation":
        export = segmentation_exporter("vit")
    else:
        export = hf_exporter(
            functools.partial(export_hf_checkpoint, task=task),
            raw_config,
            "ViTModel" if task == "features" else "ViTForImageClassification",
            num_labels,
            task,
            **export_hf_config(config),
        )
    return ModelSpec(
        config=config,
        module=module,
        abstract_params=abstract,
        init_leaf=functools.partial(init_leaf, config=config),
        convert=functools.partial(convert_hf_checkpoint, source=source, target=config),
        apply=apply,
        forward=forward,
        structure=structure,
        extras=extras,
        export=export,
    )
