"""wav2vec 2.0 audio encoders (Baevski et al. 2020) in Flax linen, read from Hugging Face
checkpoints.

The param tree mirrors the names transformers stores ``Wav2Vec2Model`` /
``Wav2Vec2ForSequenceClassification`` under, list indices written ``_N`` as in ViT
(``wav2vec2/feature_extractor/conv_layers_0/conv``, ``wav2vec2/encoder/layers_1/attention/
q_proj``). Numerics follow ``transformers.Wav2Vec2Model`` in eval mode:

* a stack of unpadded strided 1-D convs over the raw waveform, each followed by GELU: with
  ``feat_extract_norm="group"`` the first one is followed by a per-channel GroupNorm over time,
  with ``"layer"`` every one by a LayerNorm over channels (both epsilon 1e-5, as transformers
  hard-codes);
* ``feature_projection``: LayerNorm, then a Linear to ``hidden_size``;
* the positional conv embedding: a grouped conv (padding ``K // 2``, one output step dropped for
  an even ``K``) with weight norm, whose ``weight_g`` / ``weight_v`` (or
  ``parametrizations.weight.original0/1``) are folded into one plain kernel at load;
* ``do_stable_layer_norm=False`` (wav2vec2-base): LayerNorm after the positional embedding and
  post-norm blocks; ``True`` (wav2vec2-large-lv60, XLS-R): pre-norm blocks and a LayerNorm
  after the last.

Inputs are ``input_values`` ``[B, samples]`` (float, normalized as the checkpoint's feature
extractor does: ``extras["audio_preprocessing"]``, from its ``preprocessor_config.json``, which
:func:`jaxtl.data.audio.encode` follows) and an optional ``attention_mask`` ``[B, samples]``;
the frame-level mask is computed from each example's sample count as transformers does.
SpecAugment (time and feature masking, ``masked_spec_embed``) and LayerDrop are training-time
regularizers that jaxtl does not apply: training here runs without them. Parity is tested in
``tests/test_wav2vec2.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models.common import ACTIVATIONS, flat_numpy, hf_exporter, leaf_rng, make_apply
from jaxtl.models.conv import conv_general_dilated
from jaxtl.models.layers import (
    Dropout,
    block,
    dense,
    dot_product_attention,
    layer_norm,
    shard_batch,
    split_heads,
)
from jaxtl.models.registry import ModelSpec
from jaxtl.transfer.structure import Structure

BASE = "wav2vec2"  # transformers' base_model_prefix
CONV_EPS = 1e-5  # the feature extractor's norms: torch defaults, not config.layer_norm_eps
POS_CONV = f"{BASE}/encoder/pos_conv_embed/conv"
# Only SpecAugment reads it, in training; jaxtl does not mask time steps, so it is not loaded.
MASKED_SPEC_EMBED = f"{BASE}.masked_spec_embed"
_LAYERS = rf"{BASE}/encoder/layers_\d+"

# Megatron's split of each encoder layer (see jaxtl.sharding), as BERT's.
TENSOR_PARALLEL = (
    (rf"{_LAYERS}/attention/(q_proj|k_proj|v_proj)", "column"),
    (rf"{_LAYERS}/attention/out_proj", "row"),
    (rf"{_LAYERS}/feed_forward/intermediate_dense", "column"),
    (rf"{_LAYERS}/feed_forward/output_dense", "row"),
)

# LoRA's default targets: the attention query and value projections, as for BERT.
LORA_TARGETS = (rf"{_LAYERS}/attention/(q_proj|v_proj)",)


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
    """The config.json fields the model uses (names as in ``transformers.Wav2Vec2Config``).

    ``vocab_size`` (the CTC head's width) is used by no jaxtl task; it is kept because
    :func:`jaxtl.weights.loading.load` reads ``config.vocab_size`` of any model whose extras
    have no ``"preprocessing"`` (to check a tokenizer, which audio checkpoints do not ship).
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    activation_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_proj_dropout: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    classifier_proj_size: int = 256
    vocab_size: int = 32
    # jaxtl's, not config.json's: rematerialize each block under this policy (layers.block).
    remat: str | None = None

    @property
    def receptive_field(self) -> int:
        """The fewest samples that give one frame."""
        field = 1
        for kernel, stride in reversed(tuple(zip(self.conv_kernel, self.conv_stride, strict=True))):
            field = (field - 1) * stride + kernel
        return field

    def frames(self, samples: Any) -> Any:
        """Frames the feature extractor gives for ``samples`` (an int or an integer array),
        transformers' ``_get_feat_extract_output_lengths`` without an adapter."""
        for kernel, stride in zip(self.conv_kernel, self.conv_stride, strict=True):
            samples = (samples - kernel) // stride + 1
        return samples

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> Wav2Vec2Config:
        """Builds the config from a parsed config.json, refusing what this model lacks:
        adapters (``add_adapter``, ``adapter_attn_dim``) and ``use_weighted_layer_sum``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"remat"}
        values = {k: v for k, v in raw.items() if k in names and v is not None}
        for key in ("conv_dim", "conv_stride", "conv_kernel"):
            if key in values:
                values[key] = tuple(values[key])
        config = cls(**values)
        for key in ("hidden_act", "feat_extract_activation"):
            if getattr(config, key) not in ACTIVATIONS:
                raise ValueError(
                    f"{source}: {key}={getattr(config, key)!r} is not supported; expected one "
                    f"of {sorted(ACTIVATIONS)}."
                )
        if config.feat_extract_norm not in ("group", "layer"):
            raise ValueError(
                f"{source}: feat_extract_norm={config.feat_extract_norm!r}; expected 'group' or "
                "'layer' (transformers accepts no other)."
            )
        if not config.conv_dim or not (
            len(config.conv_dim) == len(config.conv_stride) == len(config.conv_kernel)
        ):
            raise ValueError(
                f"{source}: conv_dim, conv_stride and conv_kernel must have one entry per conv "
                f"layer; got {len(config.conv_dim)}, {len(config.conv_stride)} and "
                f"{len(config.conv_kernel)}."
            )
        if config.hidden_size % config.num_attention_heads or (
            config.hidden_size % config.num_conv_pos_embedding_groups
        ):
            raise ValueError(
                f"{source}: hidden_size={config.hidden_size} must be a multiple of "
                f"num_attention_heads={config.num_attention_heads} and of "
                f"num_conv_pos_embedding_groups={config.num_conv_pos_embedding_groups}."
            )
        unsupported = [
            key
            for key in ("add_adapter", "use_weighted_layer_sum", "adapter_attn_dim")
            if raw.get(key)
        ]
        if unsupported:
            raise ValueError(
                f"{source} sets {', '.join(unsupported)}, which jaxtl's wav2vec2 does not "
                "implement; load a checkpoint without them (or set them false/null in a copy "
                "of config.json if the weights do not use them)."
            )
        return config


class _Module(nn.Module):
    """Fields every wav2vec2 submodule shares: the config and the param/compute dtype."""

    config: Wav2Vec2Config
    dtype: Any = jnp.float32


def _dense(config: Wav2Vec2Config, features: int, name: str, dtype: Any) -> nn.Module:
    return dense(features, name, dtype, std=config.initializer_range)


class FeatureEncoder(_Module):
    """HF ``feature_extractor``: the conv stack over ``[B, samples]`` -> ``[B, frames, C]``."""

    @nn.compact
    def __call__(self, input_values: jax.Array) -> jax.Array:
        c = self.config
        x = input_values[..., None]  # NWC, one channel
        act = ACTIVATIONS[c.feat_extract_activation]
        for i, (dim, kernel, stride) in enumerate(
            zip(c.conv_dim, c.conv_kernel, c.conv_stride, strict=True)
        ):
            layer = ConvLayer(c, self.dtype, dim, kernel, stride, i, name=f"conv_layers_{i}")
            x = act(layer(x))
        return x


class ConvLayer(_Module):
    """One ``conv_layers.N``: the conv and, per ``feat_extract_norm``, its norm (before the
    activation, which :class:`FeatureEncoder` applies)."""

    features: int = 0
    kernel: int = 1
    stride: int = 1
    index: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dtype = self.config, self.dtype
        x = nn.Conv(
            self.features,
            (self.kernel,),
            strides=(self.stride,),
            padding="VALID",
            use_bias=c.conv_bias,
            dtype=dtype,
            param_dtype=dtype,
            name="conv",
        )(x)
        if c.feat_extract_norm == "layer":
            return layer_norm(CONV_EPS, "layer_norm", dtype)(x)
        if self.index == 0:  # GroupNorm(groups = channels): each channel over time
            return nn.GroupNorm(
                num_groups=self.features,
                epsilon=CONV_EPS,
                use_fast_variance=False,
                dtype=dtype,
                param_dtype=dtype,
                name="layer_norm",
            )(x)
        return x


class FeatureProjection(_Module):
    """HF ``feature_projection``: LayerNorm, Linear to ``hidden_size``, dropout."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = self.config
        x = layer_norm(c.layer_norm_eps, "layer_norm", self.dtype)(x)
        x = _dense(c, c.hidden_size, "projection", self.dtype)(x)
        return Dropout(c.feat_proj_dropout, stream=True)(x, deterministic=not train)


class PositionalConvEmbedding(_Module):
    """HF ``pos_conv_embed``: grouped conv (the weight-normed kernel, folded), same-length
    output, activation."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        k = c.num_conv_pos_embeddings
        y = nn.Conv(
            c.hidden_size,
            (k,),
            padding=((k // 2, k // 2),),
            feature_group_count=c.num_conv_pos_embedding_groups,
            conv_general_dilated=conv_general_dilated,  # grouped: its kernel gradient, fast on CPU
            dtype=self.dtype,
            param_dtype=self.dtype,
            name="conv",
        )(x)
        y = y[:, : x.shape[1]]  # an even kernel gives one step more (Wav2Vec2SamePadLayer)
        return ACTIVATIONS[c.feat_extract_activation](y)


class Attention(_Module):
    """HF ``attention``: q/k/v projections, masked softmax attention, ``out_proj``."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool) -> jax.Array:
        c = self.config
        q, k, v = (
            split_heads(_dense(c, c.hidden_size, name, self.dtype)(x), c.num_attention_heads)
            for name in ("q_proj", "k_proj", "v_proj")
        )
        context = dot_product_attention(
            q,
            k,
            v,
            None if mask is None else mask[:, None, None, :],
            dropout_rate=c.attention_dropout,
            deterministic=not train,
            dtype=self.dtype,
        )
        return _dense(c, c.hidden_size, "out_proj", self.dtype)(context)


class FeedForward(_Module):
    """HF ``feed_forward``: ``intermediate_dense``, activation, dropout, ``output_dense``,
    dropout."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = self.config
        h = ACTIVATIONS[c.hidden_act](
            _dense(c, c.intermediate_size, "intermediate_dense", self.dtype)(x)
        )
        h = Dropout(c.activation_dropout, stream=True)(h, deterministic=not train)
        h = _dense(c, c.hidden_size, "output_dense", self.dtype)(h)
        return Dropout(c.hidden_dropout, stream=True)(h, deterministic=not train)


class EncoderLayer(_Module):
    """One encoder block: post-norm (``Wav2Vec2EncoderLayer``) or, with
    ``do_stable_layer_norm``, pre-norm (``Wav2Vec2EncoderLayerStableLayerNorm``)."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
        c, dtype = self.config, self.dtype
        attention = Attention(c, dtype, name="attention")
        norm = layer_norm(c.layer_norm_eps, "layer_norm", dtype)
        feed_forward = FeedForward(c, dtype, name="feed_forward")
        final_norm = layer_norm(c.layer_norm_eps, "final_layer_norm", dtype)
        dropout = Dropout(c.hidden_dropout, stream=True)
        if c.do_stable_layer_norm:
            x = x + dropout(attention(norm(x), mask, train=train), deterministic=not train)
            return x + feed_forward(final_norm(x), train=train)
        x = norm(x + dropout(attention(x, mask, train=train), deterministic=not train))
        return final_norm(x + feed_forward(x, train=train))


class Encoder(_Module):
    """HF ``encoder``: padded frames zeroed, positional conv embedding added, the blocks
    ``layers_0 ... layers_{N-1}``, and ``layer_norm`` (before the blocks when post-norm, after
    them when pre-norm)."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool) -> jax.Array:
        c, dtype = self.config, self.dtype
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0)
        x = x + PositionalConvEmbedding(c, dtype, name="pos_conv_embed")(x)
        norm = layer_norm(c.layer_norm_eps, "layer_norm", dtype)
        if not c.do_stable_layer_norm:
            x = norm(x)
        x = Dropout(c.hidden_dropout, stream=True)(x, deterministic=not train)
        layer = block(EncoderLayer, c.remat, train_argnum=3)
        for i in range(c.num_hidden_layers):
            x = shard_batch(layer(c, dtype, name=f"layers_{i}")(shard_batch(x), mask, train))
        return norm(x) if c.do_stable_layer_norm else x


def frame_mask(config: Wav2Vec2Config, attention_mask: jax.Array, frames: int) -> jax.Array:
    """``[B, frames]`` bool: the frames inside each example's valid samples, from its sample
    count (``attention_mask.sum(-1)``), as transformers' ``_get_feature_vector_attention_mask``.
    """
    lengths = config.frames(jnp.sum(attention_mask.astype(jnp.int32), axis=-1))
    return jnp.arange(frames)[None, :] < lengths[:, None]


class Wav2Vec2Model(_Module):
    """HF ``Wav2Vec2Model`` (no adapter): ``(last_hidden_state [B, frames, H], frame mask or
    None)``."""

    @nn.compact
    def __call__(self, input_values: jax.Array, attention_mask: jax.Array | None, *, train: bool):
        c = self.config
        x = FeatureEncoder(c, self.dtype, name="feature_extractor")(input_values)
        mask = None if attention_mask is None else frame_mask(c, attention_mask, x.shape[1])
        x = FeatureProjection(c, self.dtype, name="feature_projection")(x, train=train)
        return Encoder(c, self.dtype, name="encoder")(x, mask, train=train), mask


class Wav2Vec2ForTask(_Module):
    """wav2vec2 with a task head.

    ``task="features"`` returns the last hidden state ``[B, frames, hidden_size]``;
    ``"classification"`` and ``"regression"`` return logits ``[B, num_labels]`` as
    ``Wav2Vec2ForSequenceClassification`` does: ``projector`` (Dense to
    ``classifier_proj_size``), the mean over the valid frames, then ``classifier``.
    """

    task: str = "classification"
    num_labels: int = 2

    @nn.compact
    def __call__(
        self,
        input_values: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        c = self.config
        if input_values.ndim != 2 or input_values.shape[1] < c.receptive_field:
            raise ValueError(
                f"input_values must be [batch, samples] with at least {c.receptive_field} "
                f"samples (one frame), got shape {tuple(input_values.shape)}. Pass raw mono "
                "waveforms at the checkpoint's sampling rate (16 kHz for the published ones)."
            )
        if attention_mask is not None and attention_mask.shape != input_values.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_values "
                f"{tuple(input_values.shape)}: 1 for real samples, 0 for padding."
            )
        hidden, mask = Wav2Vec2Model(c, self.dtype, name=BASE)(
            input_values, attention_mask, train=train
        )
        if self.task == "features":
            return hidden
        h = _dense(c, c.classifier_proj_size, "projector", self.dtype)(hidden)
        if mask is None:
            pooled = h.mean(axis=1)
        else:
            # An example with fewer valid samples than one frame has no frame to average: it
            # pools to zeros (transformers reads frame -1 for it) instead of making the batch NaN.
            count = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1).astype(h.dtype)
            pooled = jnp.sum(jnp.where(mask[..., None], h, 0), axis=1) / count
        return _dense(c, self.num_labels, "classifier", self.dtype)(pooled)


def init_leaf(
    path: str, leaf: jax.ShapeDtypeStruct, seed: int, *, config: Wav2Vec2Config
) -> jax.Array:
    """Initializes one param as transformers' ``Wav2Vec2PreTrainedModel._init_weights`` does.

    Feature-extractor conv kernels: Kaiming normal (fan in), conv biases uniform in
    ``±sqrt(groups / fan_in)``; the positional conv kernel ~ normal(``2 / sqrt(K * hidden)``),
    bias 0; ``feature_projection/projection`` uniform in ``±1 / sqrt(fan_in)``; other Linear
    kernels ~ normal(``initializer_range``), biases 0; norm scales 1 and biases 0. Each param
    draws from its own stream (:func:`jaxtl.models.common.leaf_rng`).
    """
    module, name = path.rsplit("/", 1)
    rng = leaf_rng(seed, path)
    shape = leaf.shape
    if module.endswith("layer_norm") or module.endswith("final_layer_norm"):
        return jnp.full(shape, 1.0 if name == "scale" else 0.0, leaf.dtype)
    if module.endswith("feature_projection/projection"):
        bound = 1 / math.sqrt(config.conv_dim[-1])
        values = rng.uniform(-bound, bound, shape)
    elif module == POS_CONV:
        std = 2 / math.sqrt(config.num_conv_pos_embeddings * config.hidden_size)
        values = rng.standard_normal(shape) * std if name == "kernel" else np.zeros(shape)
    elif module.endswith("/conv"):  # a feature-extractor conv (conv_layers_N), kernel [K, in, out]
        index = int(module.rsplit("/", 2)[-2].rsplit("_", 1)[-1])
        fan_in = (config.conv_dim[index - 1] if index else 1) * config.conv_kernel[index]
        if name == "kernel":
            values = rng.standard_normal(shape) * math.sqrt(2 / fan_in)
        else:
            values = rng.uniform(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), shape)
    elif name == "kernel":
        values = rng.standard_normal(shape) * config.initializer_range
    elif name == "bias":
        values = np.zeros(shape)
    else:
        raise ValueError(f"No wav2vec2 initializer for param {path!r}.")
    return jnp.asarray(values, dtype=leaf.dtype)


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """torch's ``weight_norm(dim=2)`` of a Conv1d: ``g * v / ||v||``, the norm over every axis
    but the kernel axis (``v`` is ``[out, in / groups, K]``, ``g`` is ``[1, 1, K]``).

    Example:
      >>> v = np.ones((2, 1, 3))  # ||v|| = sqrt(2) at every kernel step
      >>> fold_weight_norm(np.full((1, 1, 3), 2.0), v)[:, 0, 0].round(4).tolist()
      [1.4142, 1.4142]
    """
    v64 = np.asarray(v, np.float64)
    norm = np.sqrt(np.sum(v64**2, axis=(0, 1), keepdims=True))
    return (np.asarray(g, np.float64) * v64 / norm).astype(np.asarray(v).dtype)


_WEIGHT_NORM = {
    "weight_g": "g",
    "weight_v": "v",
    "parametrizations.weight.original0": "g",
    "parametrizations.weight.original1": "v",
}


def convert_hf_checkpoint(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames a Hugging Face wav2vec2 state dict to model paths and torch layouts to Flax ones.

    ``wav2vec2.`` is optional (``Wav2Vec2Model`` checkpoints have none); ``projector.*`` and
    ``classifier.*`` map to the head. Conv1d weights go from ``[out, in, K]`` to ``[K, in, out]``,
    Linear weights are transposed, norm weights become ``scale``. The positional conv's
    weight-norm pair (``weight_g`` / ``weight_v``, or transformers >= 4.3x's
    ``parametrizations.weight.original0/1``) becomes its plain kernel
    (:func:`fold_weight_norm`). ``masked_spec_embed`` (SpecAugment's fill vector, which jaxtl
    does not use) is dropped; other names (a CTC ``lm_head``, a pretraining quantizer) pass
    through unchanged, so the load report lists them as unexpected.

    Example:
      >>> q = "encoder.layers.1.attention.q_proj.weight"
      >>> out = convert_hf_checkpoint({q: np.zeros((4, 3))})
      >>> out["wav2vec2/encoder/layers_1/attention/q_proj/kernel"].shape
      (3, 4)
    """
    out: dict[str, np.ndarray] = {}
    norm_pair: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        bare = name.removeprefix(f"{BASE}.")
        if bare == MASKED_SPEC_EMBED.removeprefix(f"{BASE}."):
            continue
        prefix = "encoder.pos_conv_embed.conv."
        if bare.startswith(prefix) and bare[len(prefix) :] in _WEIGHT_NORM:
            norm_pair[_WEIGHT_NORM[bare[len(prefix) :]]] = array
            continue
        parts = bare.split(".")
        if parts[0] in ("feature_extractor", "feature_projection", "encoder"):
            parts = [BASE, *parts]
        elif parts[0] not in ("projector", "classifier"):
            out[name] = array
            continue
        module, leaf = _joined(parts[:-1]), parts[-1]
        if leaf == "weight":
            if array.ndim == 3:
                leaf, array = "kernel", array.transpose(2, 1, 0)
            elif array.ndim == 2:
                leaf, array = "kernel", array.T
            else:
                leaf = "scale"
        path = f"{module}/{leaf}"
        if path in out:
            raise ValueError(f"Checkpoint names {path!r} twice (with and without '{BASE}.').")
        out[path] = array
    if norm_pair:
        if set(norm_pair) != {"g", "v"}:
            raise ValueError(
                "The checkpoint holds only half of the positional conv's weight norm "
                f"({sorted(norm_pair)} of g and v); it is truncated or was edited."
            )
        kernel = fold_weight_norm(norm_pair["g"], norm_pair["v"])
        out[f"{POS_CONV}/kernel"] = kernel.transpose(2, 1, 0)
    return out


def _joined(parts: list[str]) -> str:
    """``conv_layers.N`` / ``layers.N`` (torch ModuleList) -> ``conv_layers_N`` / ``layers_N``."""
    joined: list[str] = []
    for part in parts:
        if part.isdigit() and joined and joined[-1] in ("conv_layers", "layers"):
            joined[-1] = f"{joined[-1]}_{part}"
        else:
            joined.append(part)
    return "/".join(joined)


def export_hf_checkpoint(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None = None, *, task: str
) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_hf_checkpoint`: an HF state dict, float32 numpy arrays.

    Names and layouts are ``Wav2Vec2ForSequenceClassification``'s (``Wav2Vec2Model``'s, without
    the prefix, for ``task="features"``). The positional kernel is written as the weight-norm
    pair transformers reads, ``parametrizations.weight.original0`` (the norm, ``g``) and
    ``original1`` (the kernel itself, ``v``), so ``g * v / ||v||`` gives it back.
    ``masked_spec_embed`` is not written (jaxtl holds none; transformers draws a fresh one).
    """
    del batch_stats  # wav2vec2 has no BatchNorm
    state: dict[str, np.ndarray] = {}
    for path, value in flat_numpy(params).items():
        array = value.astype(np.float32)
        *module, leaf = path.split("/")
        if module[0] == BASE and task == "features":
            module = module[1:]  # Wav2Vec2Model's own names have no prefix
        module = [
            m.replace("layers_", "layers.") if m.startswith(("layers_", "conv_layers_")) else m
            for m in module
        ]
        torch_name = ".".join(module)
        if path == f"{POS_CONV}/kernel":
            weight = array.transpose(2, 1, 0)  # [out, in / groups, K]
            norm = np.sqrt(np.sum(weight.astype(np.float64) ** 2, axis=(0, 1), keepdims=True))
            state[f"{torch_name}.parametrizations.weight.original0"] = norm.astype(np.float32)
            state[f"{torch_name}.parametrizations.weight.original1"] = np.ascontiguousarray(weight)
            continue
        if leaf == "scale":
            leaf = "weight"
        elif leaf == "kernel":
            leaf = "weight"
            array = array.T if array.ndim == 2 else array.transpose(2, 1, 0)
        state[f"{torch_name}.{leaf}"] = np.ascontiguousarray(array)
    return state


FEATURE_EXTRACTOR = "Wav2Vec2FeatureExtractor"


def audio_preprocessing(directory: str | None, config: Wav2Vec2Config) -> dict[str, Any]:
    """What the checkpoint's feature extractor does to a waveform (read by
    :func:`jaxtl.data.audio.encode`): ``sampling_rate``, ``do_normalize``,
    ``return_attention_mask``, ``padding_value``, and ``source`` (the file they came from, or
    ``"defaults"``).

    The values are ``preprocessor_config.json``'s where the checkpoint has one (transformers'
    ``Wav2Vec2FeatureExtractor`` fields). Without one, they are what the published checkpoints
    set: 16 kHz, normalized, padding 0.0, and an attention mask only for
    ``feat_extract_norm="layer"`` models (wav2vec2-large-lv60, XLS-R): the ``"group"`` ones
    (wav2vec2-base) were pretrained without one, and transformers' feature extractor documents
    that they should be fed zero-padded input and no mask. (``Wav2Vec2FeatureExtractor()``'s own
    default is ``return_attention_mask=False`` for both.)

    Raises:
      ValueError: a preprocessor config of another feature extractor (e.g. filter-bank
        features), ``feature_size`` other than 1, or values of the wrong type.
    """
    facts: dict[str, Any] = {
        "sampling_rate": 16000,
        "do_normalize": True,
        "return_attention_mask": config.feat_extract_norm == "layer",
        "padding_value": 0.0,
        "source": "defaults",
    }
    path = os.path.join(directory, "preprocessor_config.json") if directory else ""
    if not (path and os.path.isfile(path)):
        return facts
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    kind = raw.get("feature_extractor_type", FEATURE_EXTRACTOR)
    if kind != FEATURE_EXTRACTOR:
        raise ValueError(
            f"{path}: feature_extractor_type={kind!r}, but jaxtl's wav2vec2 reads raw waveforms "
            f"as {FEATURE_EXTRACTOR} prepares them; this checkpoint expects other inputs."
        )
    if raw.get("feature_size", 1) != 1:
        raise ValueError(
            f"{path}: feature_size={raw['feature_size']!r}; wav2vec2 reads one value per sample "
            "(feature_size 1, mono waveforms)."
        )
    for key, kinds in (
        ("sampling_rate", (int,)),
        ("do_normalize", (bool,)),
        ("return_attention_mask", (bool,)),
        ("padding_value", (int, float)),
    ):
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) != (kinds == (bool,)) or not isinstance(value, kinds):
            raise ValueError(
                f"{path}: {key}={value!r} must be {' or '.join(k.__name__ for k in kinds)}."
            )
        facts[key] = float(value) if key == "padding_value" else value
    if facts["sampling_rate"] < 1:
        raise ValueError(f"{path}: sampling_rate={facts['sampling_rate']} must be positive.")
    facts["source"] = path
    return facts


def build(
    directory: str,
    raw_config: Mapping[str, Any],
    *,
    task: str,
    num_labels: int,
    dtype: Any = jnp.float32,
) -> ModelSpec:
    """Builds the wav2vec2 module, initializer, converter, exporter and structure for one
    checkpoint.

    Called by :func:`jaxtl.weights.loading.load` through the registry; ``task`` and
    ``num_labels`` are already validated there. The model takes no load options (its input is
    any number of samples from :attr:`Wav2Vec2Config.receptive_field` up).
    """
    config_path = os.path.join(directory, "config.json") if directory else "config.json"
    config = Wav2Vec2Config.from_hf(raw_config, config_path)
    num_labels = 0 if task == "features" else num_labels
    module = Wav2Vec2ForTask(config, dtype, task, num_labels)

    samples = jax.ShapeDtypeStruct((1, config.receptive_field), dtype)
    abstract = jax.eval_shape(
        lambda r, x: module.init({"params": r}, x), jax.random.key(0), samples
    )["params"]
    apply, forward = make_apply(module, ("input_values", "attention_mask"))

    # Post-norm models apply the encoder's LayerNorm before the first block: it is stem.
    encoder_norm = (f"{BASE}/encoder/layer_norm",)
    structure = Structure(
        stem=(
            f"{BASE}/feature_extractor",
            f"{BASE}/feature_projection",
            f"{BASE}/encoder/pos_conv_embed",
            *(() if config.do_stable_layer_norm else encoder_norm),
        ),
        blocks=tuple(f"{BASE}/encoder/layers_{i}" for i in range(config.num_hidden_layers)),
        neck=encoder_norm if config.do_stable_layer_norm else (),
        head=("projector", "classifier") if task != "features" else (),
        tensor_parallel=TENSOR_PARALLEL,
        lora_targets=LORA_TARGETS,
    )
    # No "preprocessing" key: jaxtl's image paths read that one. Audio is fed as input_values,
    # made by jaxtl.data.audio.encode from "audio_preprocessing".
    extras = {
        "hidden_size": config.hidden_size,
        "receptive_field": config.receptive_field,
        "frames": config.frames,
        "audio_preprocessing": audio_preprocessing(directory, config),
    }
    return ModelSpec(
        config=config,
        module=module,
        abstract_params=abstract,
        init_leaf=functools.partial(init_leaf, config=config),
        convert=convert_hf_checkpoint,
        apply=apply,
        forward=forward,
        structure=structure,
        extras=extras,
        export=hf_exporter(
            functools.partial(export_hf_checkpoint, task=task),
            raw_config,
            "Wav2Vec2Model" if task == "features" else "Wav2Vec2ForSequenceClassification",
            num_labels,
            task,
            model_type="wav2vec2",
            dtype="float32",
        ),
    )
