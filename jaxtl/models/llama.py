"""Llama-style decoders (Llama, Mistral, Qwen2) in Flax linen, read from Hugging Face checkpoints.

One module covers the three ``model_type`` values; they differ only in config values:
Qwen2 puts biases on q/k/v (not on ``o_proj``), Mistral attends within a ``sliding_window``
(Qwen2 too on the layers its ``layer_types`` say, when ``use_sliding_window``), and Llama reads
``attention_bias`` / ``mlp_bias``. The param tree mirrors transformers'
(``model/layers_0/self_attn/q_proj``, ``mlp/gate_proj``, ``model/norm``, ``lm_head``, ``score``),
so the name map is mechanical; every ``nn.Linear`` weight is transposed to a Dense kernel.

Numerics follow ``transformers.LlamaForCausalLM``: RMSNorm with its variance in float32 (then
``weight * x`` in the input dtype), rotary embeddings on q and k from each token's position
(``rope_theta``, ``head_dim``, and ``rope_scaling`` of type ``linear`` or ``llama3`` computed as
``transformers.modeling_rope_utils`` does, in float32), grouped-query attention (the KV cache
keeps ``num_key_value_heads`` heads; they are repeated to the query heads only when attending),
a SwiGLU MLP ``down(act(gate(x)) * up(x))``, and an LM head tied to ``embed_tokens`` or not per
``tie_word_embeddings``. Parity with transformers is tested in ``tests/test_llama.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models.base import DecoderInfo
from jaxtl.models.common import (
    ACTIVATIONS,
    abstract_params,
    flat_numpy,
    hf_exporter,
    init_normal_leaf,
    make_apply,
)
from jaxtl.models.gpt2 import last_token_index
from jaxtl.models.layers import (
    block,
    causal_mask,
    dense,
    dot_product_attention,
    shard_batch,
    split_heads,
    write_cache,
)
from jaxtl.models.registry import ModelSpec
from jaxtl.transfer.structure import Structure

TASKS = ("classification", "regression", "features", "causal_lm")
VARIANTS = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")

# Megatron's split of each block (see jaxtl.sharding): separate q/k/v, gate and up projections
# split by output column on head (or unit) boundaries, o_proj and down_proj by input row.
TENSOR_PARALLEL = (
    (r"model/layers_\d+/self_attn/(q_proj|k_proj|v_proj)", "column"),
    (r"model/layers_\d+/self_attn/o_proj", "row"),
    (r"model/layers_\d+/mlp/(gate_proj|up_proj)", "column"),
    (r"model/layers_\d+/mlp/down_proj", "row"),
)

# LoRA's default targets: query and value (PEFT's default for Llama, Mistral and Qwen2).
LORA_TARGETS = (r"model/layers_\d+/self_attn/(q_proj|v_proj)",)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The config.json fields the decoder uses (names as in ``transformers.LlamaConfig``), and
    what :meth:`from_hf` derives from the variant's own keys: the projection biases, the
    rotary frequencies' settings and each layer's attention window."""

    variant: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    pad_token_id: int | None = None
    # A tuple when config.json lists several (Llama 3's); a tuple keeps the config hashable.
    eos_token_id: int | tuple[int, ...] | None = None
    # Derived: q/k/v, o_proj and MLP biases (Llama's attention_bias / mlp_bias; Qwen2: q/k/v).
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Derived: rotary embedding (rope_parameters, or rope_theta + rope_scaling before v5).
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int | None = None
    # Derived: each layer's sliding attention window (None: full causal attention).
    sliding_windows: tuple[int | None, ...] = ()
    # jaxtl's, not config.json's: rematerialize each block under this policy (layers.block).
    remat: str | None = None

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> LlamaConfig:
        """Builds the config from a parsed config.json, checking what this decoder supports."""
        variant = _variant(raw, source)
        kwargs = {k: v for k, v in raw.items() if k in _PLAIN and v is not None}
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        bias = bool(raw.get("attention_bias", False)) if variant == "llama" else False
        config = cls(
            **kwargs,
            variant=variant,
            eos_token_id=eos,
            qkv_bias=bias or variant == "qwen2",
            o_bias=bias,
            mlp_bias=bool(raw.get("mlp_bias", False)) if variant == "llama" else False,
            sliding_windows=_sliding_windows(raw, variant, source),
            **_rope(raw, source),
        )
        _check(config, source)
        return config


# The fields read from config.json under their own names; the others are derived.
_PLAIN = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_dropout",
    "pad_token_id",
)


def _variant(raw: Mapping[str, Any], source: str) -> str:
    model_type = raw.get("model_type")
    if model_type is None:  # very old configs: the class name says it
        prefixes = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2"}
        names = raw.get("architectures") or []
        found = [v for a in names for p, v in prefixes.items() if a.startswith(p)]
        model_type = found[0] if found else None
    if model_type not in VARIANTS:
        raise ValueError(
            f"{source}: model_type={model_type!r} is not a Llama-style decoder; this family reads "
            f"{VARIANTS}."
        )
    return model_type


def _rope(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The rotary settings, from transformers v5's ``rope_parameters`` or v4's top-level
    ``rope_theta`` + ``rope_scaling`` (transformers reads both; so does this)."""
    # transformers prefers rope_scaling where a config has both.
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(
            f"{source}: rope_parameters / rope_scaling must be one flat object; per-layer RoPE "
            f"parameters are not supported (got {params!r:.120})."
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"{source}: rope_scaling type {rope_type!r} is not supported; jaxtl computes the "
            f"rotary frequencies of the types {ROPE_TYPES} (as transformers does). Use a "
            "checkpoint with one of those, or add the type to jaxtl/models/llama.py."
        )
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(
            f"{source}: partial_rotary_factor={partial} is not supported: Llama-style decoders "
            "rotate the whole head."
        )
    theta = params.get("rope_theta", raw.get("rope_theta")) or 10000.0
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    needs = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
    missing = [k for k in needs.get(rope_type, ()) if params.get(k) is None]
    if missing:
        raise ValueError(f"{source}: rope_scaling of type {rope_type!r} needs {missing}.")
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        original = params.get("original_max_position_embeddings")
        out["rope_original_max_positions"] = int(
            original if original is not None else raw.get("max_position_embeddings", 2048)
        )
    return out


def _sliding_windows(raw: Mapping[str, Any], variant: str, source: str) -> tuple:
    """Each layer's attention window as transformers builds it: every Mistral layer attends
    within ``sliding_window``; Qwen2 layers only with ``use_sliding_window``, on the layers its
    ``layer_types`` mark ``sliding_attention`` (by default those from ``max_window_layers`` on);
    Llama never."""
    window = raw.get("sliding_window")
    layers = int(raw.get("num_hidden_layers", 32))
    if variant == "llama" or window is None:
        return ()
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{source}: sliding_window={window!r} must be a positive integer.")
    if variant == "mistral":
        return (window,) * layers
    if not raw.get("use_sliding_window"):
        return ()
    types = raw.get("layer_types")
    if types is None:
        first = int(raw.get("max_window_layers", 28))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if len(types) < layers:
        raise ValueError(f"{source}: layer_types names {len(types)} layers, not {layers}.")
    return tuple(window if t == "sliding_attention" else None for t in types[:layers])


def _check(config: LlamaConfig, source: str) -> None:
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"{source}: hidden_act={config.hidden_act!r} is not supported; expected one of "
            f"{sorted(ACTIVATIONS)}."
        )
    heads, kv = config.num_attention_heads, config.kv_heads
    if config.head_dim is None and config.hidden_size % heads:
        raise ValueError(
            f"{source}: hidden_size={config.hidden_size} is not a multiple of "
            f"num_attention_heads={heads}; give head_dim, or fix the sizes."
        )
    if heads % kv:
        raise ValueError(
            f"{source}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv} (grouped-query attention shares each key/value head "
            "among a whole number of query heads)."
        )
    if config.head_size % 2:
        raise ValueError(
            f"{source}: the head size {config.head_size} is odd; rotary embeddings rotate "
            "pairs of dimensions."
        )


def _dense(config: LlamaConfig, features: int, name: str, dtype: Any, bias: bool):
    # nn.Linear(in, out) stores (out, in); the converter transposes it to a Dense kernel.
    return dense(features, name, dtype, std=config.initializer_range, bias=bias)


class RMSNorm(nn.Module):
    """transformers' ``LlamaRMSNorm``: ``x / sqrt(mean(x^2) + eps)`` in float32, cast back to
    the input dtype, times ``scale`` (HF's ``weight``, initialized to ones)."""

    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        wide = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(wide), axis=-1, keepdims=True)
        normed = (wide * jax.lax.rsqrt(variance + self.epsilon)).astype(x.dtype)
        return jnp.asarray(scale, self.dtype) * normed.astype(self.dtype)


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """The rotary inverse frequencies ``[head_size // 2]`` (float32), computed as
    ``transformers.modeling_rope_utils`` does for the ``default``, ``linear`` and ``llama3``
    types (same float32 operations in the same order).

    Example:
      >>> inverse_frequencies(LlamaConfig(hidden_size=8, num_attention_heads=1)).tolist()
      [1.0, 0.10000000149011612, 0.009999999776482582, 0.0010000000474974513]
    """
    dim = config.head_size
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    if config.rope_type == "linear":
        return (inv / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type != "llama3":
        return inv
    # _compute_llama3_parameters: long wavelengths divided by factor, short ones kept, and a
    # smooth interpolation between the two.
    factor = np.float32(config.rope_factor)
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    context = config.rope_original_max_positions
    low_wavelen, high_wavelen = context / low, context / high
    wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
    scaled = np.where(wavelen > np.float32(low_wavelen), inv / factor, inv).astype(np.float32)
    smooth = ((np.float32(context) / wavelen - np.float32(low)) / np.float32(high - low)).astype(
        np.float32
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < np.float32(high_wavelen)) & ~(wavelen > np.float32(low_wavelen))
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary(config: LlamaConfig, positions: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each ``[B or 1, T, 1, head_size]``: the rotation of each token's q and k
    from its position (HF's ``LlamaRotaryEmbedding``, computed in float32)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies(config))
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` on heads ``[B, T, H, D]`` (HF's
    ``apply_rotary_pos_emb``, whose ``rotate_half`` pairs dimension ``i`` with ``i + D/2``)."""
    first, second = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-second, first], axis=-1) * sin


class _LlamaModule(nn.Module):
    """Fields every submodule shares: the config and the param/compute dtype."""

    config: LlamaConfig
    dtype: Any = jnp.float32


class LlamaAttention(_LlamaModule):
    """Causal grouped-query self-attention with rotary q and k.

    With ``cache=(keys, values)`` (``[B, S, kv_heads, head_size]`` each, :func:`init_cache`)
    the chunk's rotated keys and its values are written at ``cache_index`` and the queries
    attend over the whole cache (``mask`` says which slots); the updated cache is returned.
    """

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        *,
        train: bool,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c, dt = self.config, self.dtype
        heads, kv, size = c.num_attention_heads, c.kv_heads, c.head_size
        q = split_heads(_dense(c, heads * size, "q_proj", dt, c.qkv_bias)(x), heads)
        k = split_heads(_dense(c, kv * size, "k_proj", dt, c.qkv_bias)(x), kv)
        v = split_heads(_dense(c, kv * size, "v_proj", dt, c.qkv_bias)(x), kv)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache = write_cache(cache, (k, v), cache_index)
        # HF's repeat_kv: key/value head j serves query heads j * groups .. (j + 1) * groups - 1.
        groups = heads // kv
        out = dot_product_attention(
            q,
            jnp.repeat(k, groups, axis=2),
            jnp.repeat(v, groups, axis=2),
            mask[:, None],  # [B or 1, Tq, Tk]: one causal-and-padding mask for every head
            dropout_rate=c.attention_dropout,
            deterministic=not train,
            dtype=dt,
            scale=size**-0.5,
        )
        return _dense(c, c.hidden_size, "o_proj", dt, c.o_bias)(out), cache


class LlamaMLP(_LlamaModule):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt = self.config, self.dtype
        gate = _dense(c, c.intermediate_size, "gate_proj", dt, c.mlp_bias)(x)
        up = _dense(c, c.intermediate_size, "up_proj", dt, c.mlp_bias)(x)
        return _dense(c, c.hidden_size, "down_proj", dt, c.mlp_bias)(
            ACTIVATIONS[c.hidden_act](gate) * up
        )


class LlamaDecoderLayer(_LlamaModule):
    """One pre-RMSNorm block: x + attn(input_layernorm(x)), then x + mlp(post_attention_...).

    Returns ``(x, cache)``: the layer's updated KV cache, or ``None`` when none was given.
    """

    layer_idx: int = 0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        train: bool,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c, dt = self.config, self.dtype
        norm = functools.partial(RMSNorm, c.rms_norm_eps, dt)
        h, cache = LlamaAttention(c, dt, name="self_attn")(
            norm(name="input_layernorm")(x),
            mask,
            rope,
            train=train,
            cache=cache,
            cache_index=cache_index,
        )
        x = x + h
        return x + LlamaMLP(c, dt, name="mlp")(norm(name="post_attention_layernorm")(x)), cache


class LlamaModel(_LlamaModule):
    """The decoder (HF ``LlamaModel``): returns ``(last hidden state, tied LM logits or None,
    updated KV cache or None)``.

    Training and evaluation pass ``input_ids`` and ``attention_mask`` only: positions
    ``0..T-1`` (HF's default, right for right padding), causal attention within the chunk.
    Decoding (:mod:`jaxtl.generation`) also passes each token's ``positions`` (the rotation
    angles), a ``cache`` of every layer's keys and values, and ``cache_index``, the cache slot
    of the chunk's first token; ``attention_mask`` then covers all the cache's slots
    (``[B, S]``). A sliding-window layer sees only the keys less than its window behind the
    query's slot, as transformers' mask does. ``logits_at`` computes the tied LM logits of that
    one position of the chunk only (``[B, 1, V]``).
    """

    tied_logits: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        *,
        train: bool,
        positions: jax.Array | None = None,
        cache: tuple | None = None,
        cache_index: jax.Array | int = 0,
        logits_at: jax.Array | int | None = None,
    ) -> tuple[jax.Array, jax.Array | None, tuple | None]:
        c, dt = self.config, self.dtype
        embed = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.initializers.normal(c.initializer_range),
            dtype=dt,
            param_dtype=dt,
            name="embed_tokens",
        )
        x = embed(input_ids)
        length = input_ids.shape[-1]
        if positions is None:
            positions = jnp.arange(length)[None, :]
        rope = rotary(c, positions, dt)
        slots = length if cache is None else cache[0][0].shape[1]
        mask = causal_mask(length, slots, cache_index, attention_mask)
        masks = {None: mask}
        for window in sorted(set(c.sliding_windows) - {None}):
            # transformers' sliding_window_overlay: key slot > query slot - window.
            query = cache_index + jnp.arange(length)[:, None]
            masks[window] = mask & (jnp.arange(slots)[None, :] > query - window)[None]
        layer = block(LlamaDecoderLayer, c.remat, train_argnum=4)
        caches = []
        for i in range(c.num_hidden_layers):
            mine = None if cache is None else cache[i]
            x, mine = layer(c, dt, i, name=f"layers_{i}")(
                shard_batch(x), masks[c.window(i)], rope, train, mine, cache_index
            )
            x = shard_batch(x)
            caches.append(mine)
        x = RMSNorm(c.rms_norm_eps, dt, name="norm")(x)
        logits = None
        if self.tied_logits:
            logits = embed.attend(_at(x, logits_at))
        return x, logits, (None if cache is None else tuple(caches))


def _at(x: jax.Array, logits_at: jax.Array | int | None) -> jax.Array:
    """``x`` (``[B, T, H]``), or its one position ``logits_at`` (``[B, 1, H]``)."""
    return x if logits_at is None else jax.lax.dynamic_slice_in_dim(x, logits_at, 1, 1)


class LlamaForTask(_LlamaModule):
    """A Llama-style decoder with a task output.

    ``"features"``: last hidden state ``[B, T, H]``. ``"causal_lm"``: logits ``[B, T, vocab]``
    from ``lm_head`` (a bias-free Dense), or from ``embed_tokens`` transposed when
    ``tie_word_embeddings``. ``"classification"`` / ``"regression"``: ``[B, num_labels]`` from
    a bias-free Dense ``score`` on the hidden state of each row's last real token (HF
    ``LlamaForSequenceClassification``; the last token by the attention mask, see
    :func:`jaxtl.models.gpt2.last_token_index`).

    Decoding (``task="causal_lm"``, :mod:`jaxtl.generation`) passes the keyword arguments of
    :class:`LlamaModel` (``positions``, ``cache``, ``cache_index``, ``logits_at``) and gets
    ``(logits, updated cache)``.
    """

    task: str = "classification"
    num_labels: int = 2

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        train: bool = False,
        **decoding: Any,
    ) -> jax.Array | tuple[jax.Array, tuple | None]:
        c = self.config
        lm = self.task == "causal_lm"
        if decoding and not lm:
            raise ValueError(f"Decoding arguments need task='causal_lm', not {self.task!r}.")
        tied = lm and c.tie_word_embeddings
        hidden, logits, cache = LlamaModel(c, self.dtype, tied, name="model")(
            input_ids, attention_mask, train=train, **decoding
        )
        if lm:
            if not tied:
                at = _at(hidden, decoding.get("logits_at"))
                logits = _dense(c, c.vocab_size, "lm_head", self.dtype, False)(at)
            return (logits, cache) if decoding else logits
        if self.task == "features":
            return hidden
        index = last_token_index(attention_mask, input_ids.shape[-1])
        last = hidden[jnp.arange(hidden.shape[0]), index]  # [B, H]
        return _dense(c, self.num_labels, "score", self.dtype, False)(last)


def init_cache(config: LlamaConfig, batch: int, slots: int, dtype: Any = jnp.float32) -> tuple:
    """An empty KV cache for :mod:`jaxtl.generation`: per layer, keys and values
    ``[batch, slots, num_key_value_heads, head_size]`` of zeros (not repeated to the query
    heads: grouped-query attention's memory saving)."""
    shape = (batch, slots, config.kv_heads, config.head_size)
    zeros = functools.partial(jnp.zeros, shape, dtype)
    return tuple((zeros(), zeros()) for _ in range(config.num_hidden_layers))


EMBEDDING = "model/embed_tokens/embedding"


def init_leaf(
    path: str, leaf: jax.ShapeDtypeStruct, seed: int, *, config: LlamaConfig
) -> jax.Array:
    """Initializes one param the way transformers' ``PreTrainedModel._init_weights`` does for
    these models: kernels and embeddings ~ normal(std=initializer_range), biases 0, RMSNorm
    scales 1, and the ``pad_token_id`` row of ``embed_tokens`` zero (``nn.Embedding``'s
    ``padding_idx``). Each param draws from its own stream
    (:func:`jaxtl.models.common.leaf_rng`)."""
    value = init_normal_leaf(path, leaf, seed, config.initializer_range, "Llama")
    pad = config.pad_token_id
    if path == EMBEDDING and pad is not None and 0 <= pad < leaf.shape[0]:
        value = value.at[pad].set(0)
    return value


def _is_norm(module: str) -> bool:
    return module == "norm" or module.endswith("layernorm")


def convert_hf_checkpoint(
    tensors: Mapping[str, np.ndarray], *, tied: bool = False
) -> dict[str, np.ndarray]:
    """Renames a Hugging Face Llama / Mistral / Qwen2 state dict to model paths.

    ``model.`` is optional (``LlamaModel`` checkpoints have none). ``nn.Linear`` weights are
    transposed to Dense kernels; RMSNorm weights become ``scale``. ``lm_head.weight`` is dropped
    when ``tied`` (the config's ``tie_word_embeddings``: it is ``embed_tokens``), and so are
    the ``rotary_emb.inv_freq`` buffers older transformers saved; other names pass through.

    Example:
      >>> out = convert_hf_checkpoint({"model.layers.0.self_attn.q_proj.weight": np.zeros((8, 4))})
      >>> out["model/layers_0/self_attn/q_proj/kernel"].shape
      (4, 8)
    """
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        parts = name.split(".")
        if parts[0] == "model":
            parts = parts[1:]
        if parts[-2:] == ["rotary_emb", "inv_freq"]:
            continue  # a buffer, recomputed from the config
        if parts[0] in ("lm_head", "score") and len(parts) == 2:
            if parts[0] == "lm_head" and tied:
                continue
            leaf, array = ("kernel", array.T) if parts[1] == "weight" else (parts[1], array)
            out[f"{parts[0]}/{leaf}"] = array
            continue
        if parts[0] == "layers" and len(parts) > 2:
            parts = [f"layers_{parts[1]}", *parts[2:]]
        elif parts[0] not in ("embed_tokens", "norm"):
            out[name] = array
            continue
        *module, leaf = parts
        if _is_norm(module[-1]):
            leaf = "scale" if leaf == "weight" else leaf
        elif module[-1] == "embed_tokens":
            leaf = "embedding"
        elif leaf == "weight":
            leaf, array = "kernel", array.T
        path = "/".join(["model", *module, leaf])
        if path in out:
            raise ValueError(f"Checkpoint names {path!r} twice (with and without 'model.' prefix).")
        out[path] = array
    return out


def export_hf_checkpoint(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_hf_checkpoint`: ``model.``-prefixed HF names, kernels back
    to ``(out, in)``. A tied LM head has no param, so no ``lm_head.weight`` is written
    (transformers re-ties it to ``embed_tokens``)."""
    del batch_stats  # no BatchNorm
    out: dict[str, np.ndarray] = {}
    for path, array in flat_numpy(params).items():
        *module, leaf = path.split("/")
        if leaf == "kernel":
            leaf, array = "weight", array.T
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        if module[0] == "model" and module[1].startswith("layers_"):
            module = ["model", "layers", module[1].split("_", 1)[1], *module[2:]]
        out[".".join([*module, leaf])] = np.ascontiguousarray(array)
    return out


_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
_SUFFIXES = {
    "classification": "ForSequenceClassification",
    "regression": "ForSequenceClassification",
    "causal_lm": "ForCausalLM",
    "features": "Model",
}


def build(
    directory: str,
    raw_config: Mapping[str, Any],
    *,
    task: str,
    num_labels: int,
    pooling: str | None,
    dtype: Any = jnp.float32,
) -> ModelSpec:
    """Builds the Llama-style module, initializer, converter and structure for one checkpoint.

    Called by :func:`jaxtl.weights.loading.load` through the registry. ``pooling`` must be
    ``None`` or ``"last"``: these decoders classify from the last real token, as HF does.
    """
    config = LlamaConfig.from_hf(raw_config, os.path.join(directory, "config.json"))
    if task not in TASKS:
        raise ValueError(f"Llama-style decoders have no {task!r} head; expected one of {TASKS}.")
    if pooling not in (None, "last"):
        raise ValueError(
            f"pooling={pooling!r} is not supported for {config.variant}: it classifies from the "
            "last real token (pooling='last'); pass pooling=None."
        )
    num_labels = 0 if task in ("features", "causal_lm") else num_labels
    module = LlamaForTask(config, dtype, task, num_labels)
    abstract = abstract_params(module, config.max_position_embeddings)
    apply, forward = make_apply(module, ("input_ids", "attention_mask"))

    has_head = task in ("classification", "regression")
    if task == "causal_lm" and config.tie_word_embeddings:
        # The output layer is embed_tokens itself, also the input embedding (stem): the
        # output-side params are the final norm, the "head" that linear_probe, bitfit and
        # last_n train (as GPT-2's ln_f); embed_tokens trains only under full.
        head, neck = ("model/norm",), ()
    elif task == "causal_lm":
        head, neck = ("lm_head",), ("model/norm",)
    else:
        head, neck = ("score",) if has_head else (), ("model/norm",)
    structure = Structure(
        stem=("model/embed_tokens",),
        blocks=tuple(f"model/layers_{i}" for i in range(config.num_hidden_layers)),
        neck=neck,
        head=head,
        tensor_parallel=TENSOR_PARALLEL,
        lora_targets=LORA_TARGETS,
    )
    extras = {
        "pooling": "last" if has_head else None,
        "max_length": config.max_position_embeddings,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }
    if task == "causal_lm":
        extras["decoder"] = DecoderInfo(
            init_cache=functools.partial(init_cache, config),
            max_length=config.max_position_embeddings,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )
    architecture = _CLASSES[config.variant] + _SUFFIXES[task]
    return ModelSpec(
        config=config,
        module=module,
        abstract_params=abstract,
        init_leaf=functools.partial(init_leaf, config=config),
        convert=functools.partial(convert_hf_checkpoint, tied=config.tie_word_embeddings),
        apply=apply,
        forward=forward,
        structure=structure,
        extras=extras,
        export=hf_exporter(export_hf_checkpoint, raw_config, architecture, num_labels, task),
    )
