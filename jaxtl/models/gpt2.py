"""GPT-2 decoders in Flax linen, read from Hugging Face checkpoints.

The param tree mirrors ``transformers.GPT2Model`` (``transformer/h_0/attn/c_attn``), so the
checkpoint name map is mechanical. HF's ``Conv1D`` already stores its weight as ``(in, out)``, the
layout of a Flax ``Dense`` kernel, so GPT-2 weights are *not* transposed (only the ``score`` head,
an ``nn.Linear``, is). Numerics follow the PyTorch model: pre-LayerNorm blocks, tanh-approximated
GELU (``gelu_new``), causal attention with padded keys masked by ``finfo(dtype).min``, and an LM
head tied to ``wte``. Parity with transformers is tested in ``tests/test_gpt2.py``.
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
from jaxtl.models.layers import (
    Dropout,
    block,
    causal_mask,
    dense,
    dot_product_attention,
    layer_norm,
    shard_batch,
    split_heads,
    write_cache,
)
from jaxtl.models.registry import ModelSpec
from jaxtl.transfer.structure import Structure

TASKS = ("classification", "regression", "features", "causal_lm")

# Megatron's split of each block (see jaxtl.sharding). c_attn holds q, k and v side by side, so
# its column split does not fall on head boundaries: correct (XLA moves what it needs) but with
# more traffic than BERT's separate q/k/v.
TENSOR_PARALLEL = (
    (r"transformer/h_\d+/attn/c_attn", "column"),
    (r"transformer/h_\d+/attn/c_proj", "row"),
    (r"transformer/h_\d+/mlp/c_fc", "column"),
    (r"transformer/h_\d+/mlp/c_proj", "row"),
)


# LoRA's default targets: the fused q/k/v projection (PEFT's default for GPT-2).
LORA_TARGETS = (r"transformer/h_\d+/attn/c_attn",)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The config.json fields the decoder uses (names as in ``transformers.GPT2Config``)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    # jaxtl's, not config.json's: rematerialize each block under this policy (layers.block).
    remat: str | None = None

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> GPT2Config:
        """Builds the config from a parsed config.json, checking what this decoder supports."""
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in names and v is not None})
        if config.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"{source}: activation_function={config.activation_function!r} is not supported; "
                f"expected one of {sorted(ACTIVATIONS)}."
            )
        if raw.get("add_cross_attention"):
            raise ValueError(f"{source}: GPT-2 with cross-attention is not supported.")
        if config.n_embd % config.n_head:
            raise ValueError(
                f"{source}: n_embd={config.n_embd} is not a multiple of n_head={config.n_head}."
            )
        return config


def _dense(config: GPT2Config, features: int, name: str, dtype: Any, bias: bool = True):
    # HF's Conv1D computes x @ W + b with W stored (in, out): a Dense, kernel unchanged.
    return dense(features, name, dtype, std=config.initializer_range, bias=bias)


def _embed(config: GPT2Config, num: int, name: str, dtype: Any) -> nn.Embed:
    init = nn.initializers.normal(config.initializer_range)
    return nn.Embed(
        num, config.n_embd, embedding_init=init, dtype=dtype, param_dtype=dtype, name=name
    )


class _GPT2Module(nn.Module):
    """Fields every GPT-2 submodule shares: the config and the param/compute dtype."""

    config: GPT2Config
    dtype: Any = jnp.float32


class GPT2Attention(_GPT2Module):
    """Causal multi-head self-attention; q, k, v from one fused ``c_attn`` projection.

    With ``cache=(keys, values)`` (``[B, S, H, D]`` each, see :func:`init_cache`) the chunk's keys
    and values are written into the cache at ``cache_index`` and the queries attend over the
    whole cache (``mask`` says which slots); the updated cache is returned beside the output.
    """

    layer_idx: int = 0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        *,
        train: bool,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c = self.config
        qkv = _dense(c, 3 * c.n_embd, "c_attn", self.dtype)(x)
        q, k, v = (split_heads(y, c.n_head) for y in jnp.split(qkv, 3, -1))
        if cache is not None:
            k, v = cache = write_cache(cache, (k, v), cache_index)
        scale = (c.n_embd // c.n_head) ** -0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        out = dot_product_attention(
            q,
            k,
            v,
            mask[:, None],  # [B or 1, Tq, Tk]: one causal-and-padding mask for every head
            dropout_rate=c.attn_pdrop,
            deterministic=not train,
            dtype=self.dtype,
            scale=scale,
        )
        out = _dense(c, c.n_embd, "c_proj", self.dtype)(out)
        return Dropout(c.resid_pdrop, stream=True)(out, deterministic=not train), cache


class GPT2MLP(_GPT2Module):
    """The feed-forward block: ``c_fc`` to ``inner_size``, activation, ``c_proj`` back."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = self.config
        h = ACTIVATIONS[c.activation_function](_dense(c, c.inner_size, "c_fc", self.dtype)(x))
        h = _dense(c, c.n_embd, "c_proj", self.dtype)(h)
        return Dropout(c.resid_pdrop, stream=True)(h, deterministic=not train)


class GPT2Block(_GPT2Module):
    """One pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    Returns ``(x, cache)``: the layer's updated KV cache, or ``None`` when none was given.
    """

    layer_idx: int = 0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        train: bool,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c, dt = self.config, self.dtype
        attn = GPT2Attention(c, dt, self.layer_idx, name="attn")
        eps = c.layer_norm_epsilon
        h, cache = attn(
            layer_norm(eps, "ln_1", dt)(x), mask, train=train, cache=cache, cache_index=cache_index
        )
        x = x + h
        return x + GPT2MLP(c, dt, name="mlp")(layer_norm(eps, "ln_2", dt)(x), train=train), cache


class GPT2Model(_GPT2Module):
    """The decoder (HF ``GPT2Model``): returns ``(last hidden state, tied LM logits or None,
    updated KV cache or None)``.

    Training and evaluation pass ``input_ids`` and ``attention_mask`` only: positions
    ``0..T-1``, causal attention within the chunk. Decoding (:mod:`jaxtl.generation`) also
    passes each token's ``positions``, a ``cache`` of every layer's keys and values, and
    ``cache_index``, the cache slot of the chunk's first token; ``attention_mask`` then covers
    all the cache's slots (``[B, S]``), and a query attends to the valid slots up to its own.
    ``logits_at`` computes the LM logits of that one position of the chunk only (``[B, 1, V]``).
    """

    lm_logits: bool = False

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
        c = self.config
        embed = functools.partial(_embed, c, dtype=self.dtype)
        wte = embed(c.vocab_size, name="wte")
        length = input_ids.shape[-1]
        if positions is None:
            # HF's default position_ids: 0..T-1 whatever the padding (right padding keeps them
            # right).
            positions = jnp.arange(length)[None, :]
        x = wte(input_ids) + embed(c.n_positions, name="wpe")(positions)
        x = Dropout(c.embd_pdrop, stream=True)(x, deterministic=not train)
        slots = length if cache is None else cache[0][0].shape[1]
        mask = causal_mask(length, slots, cache_index, attention_mask)
        layer = block(GPT2Block, c.remat, train_argnum=3)
        caches = []
        for i in range(c.n_layer):
            mine = None if cache is None else cache[i]
            x, mine = layer(c, self.dtype, i, name=f"h_{i}")(
                shard_batch(x), mask, train, mine, cache_index
            )
            x = shard_batch(x)
            caches.append(mine)
        x = layer_norm(c.layer_norm_epsilon, "ln_f", self.dtype)(x)
        logits = None
        if self.lm_logits:
            at = x if logits_at is None else jax.lax.dynamic_slice_in_dim(x, logits_at, 1, 1)
            logits = wte.attend(at)
        return x, logits, (None if cache is None else tuple(caches))


def last_token_index(attention_mask: jax.Array | None, length: int) -> jax.Array:
    """Index of the rightmost real token per row (``[B]``); ``length - 1`` when no mask.

    Equals ``sum(mask) - 1`` under right padding and stays right under left padding. HF's
    ``GPT2ForSequenceClassification`` finds the rightmost token that is not ``pad_token_id``
    instead; the two agree when padding uses ``pad_token_id``, but the mask also works when the
    pad id is a real token (GPT-2 is usually padded with its eos token, and jaxtl's text pipeline
    pads with 0, a real GPT-2 token).
    """
    if attention_mask is None:
        return jnp.array([length - 1])
    return jnp.argmax(jnp.arange(length) * attention_mask.astype(jnp.int32), axis=-1)


class GPT2ForTask(_GPT2Module):
    """GPT-2 with a task output.

    ``"features"``: last hidden state ``[B, T, H]``. ``"causal_lm"``: logits ``[B, T, vocab]`` from
    the hidden state times ``wte`` transposed (tied; no head param). ``"classification"`` /
    ``"regression"``: ``[B, num_labels]`` from a bias-free Dense ``score`` on the hidden state of
    each row's last real token (HF ``GPT2ForSequenceClassification``, no dropout before it).

    Decoding (``task="causal_lm"``, :mod:`jaxtl.generation`) passes the keyword arguments of
    :class:`GPT2Model` (``positions``, ``cache``, ``cache_index``, ``logits_at``) and gets
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
        slots = input_ids.shape[-1] if "cache" not in decoding else decoding["cache"][0][0].shape[1]
        if slots > c.n_positions:
            # Past the table, jnp.take would clamp silently and give garbage positions.
            raise ValueError(
                f"Sequence length {slots} exceeds n_positions={c.n_positions}; "
                "truncate inputs to extras['max_length']."
            )
        lm = self.task == "causal_lm"
        if decoding and not lm:
            raise ValueError(f"Decoding arguments need task='causal_lm', not {self.task!r}.")
        hidden, logits, cache = GPT2Model(c, self.dtype, lm, name="transformer")(
            input_ids, attention_mask, train=train, **decoding
        )
        if lm:
            return (logits, cache) if decoding else logits
        if self.task == "features":
            return hidden
        index = last_token_index(attention_mask, input_ids.shape[-1])
        last = hidden[jnp.arange(hidden.shape[0]), index]  # [B, H]
        return _dense(c, self.num_labels, "score", self.dtype, bias=False)(last)


def init_cache(config: GPT2Config, batch: int, slots: int, dtype: Any = jnp.float32) -> tuple:
    """An empty KV cache for :mod:`jaxtl.generation`: per layer, keys and values
    ``[batch, slots, n_head, head_dim]`` of zeros."""
    shape = (batch, slots, config.n_head, config.n_embd // config.n_head)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layer))


def init_leaf(path: str, leaf: jax.ShapeDtypeStruct, seed: int, *, config: GPT2Config) -> jax.Array:
    """Initializes one param the way transformers' ``GPT2PreTrainedModel._init_weights`` does.

    Kernels and embeddings ~ normal(std=initializer_range), except residual projections
    (``*/c_proj/kernel``) whose std is divided by sqrt(2 * n_layer) (GPT-2 paper, section 2.3);
    biases 0, LayerNorm scales 1. Each param draws from its own stream
    (:func:`jaxtl.models.common.leaf_rng`), so a head's init does not depend on the rest of the
    tree.
    """
    std = config.initializer_range
    if path.endswith("c_proj/kernel"):
        std /= math.sqrt(2 * config.n_layer)
    return init_normal_leaf(path, leaf, seed, std, "GPT-2")


_BUFFERS = ("bias", "masked_bias")  # attn.bias / attn.masked_bias: causal-mask buffers, not weights


def convert_hf_checkpoint(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames a Hugging Face GPT-2 state dict to model paths.

    ``transformer.`` is optional (``GPT2Model`` checkpoints have none). ``Conv1D`` weights keep
    their ``(in, out)`` layout; ``score.weight`` (an ``nn.Linear``) is transposed. The attention
    mask buffers and ``lm_head.weight`` (tied to ``wte``) are dropped; other names pass through.

    Example:
      >>> out = convert_hf_checkpoint({"h.0.attn.c_attn.weight": np.zeros((4, 12))})
      >>> out["transformer/h_0/attn/c_attn/kernel"].shape
      (4, 12)
    """
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        parts = name.split(".")
        if parts[0] == "transformer":
            parts = parts[1:]
        if parts == ["lm_head", "weight"]:
            continue  # tied to wte; the causal_lm head reads wte
        if parts[0] == "score":
            leaf, array = ("kernel", array.T) if parts[-1] == "weight" else (parts[-1], array)
            out[f"score/{leaf}"] = array
            continue
        if parts[0] == "h" and len(parts) > 2:
            if parts[2:-1] == ["attn"] and parts[-1] in _BUFFERS:
                continue
            parts = [f"h_{parts[1]}", *parts[2:]]
        elif parts[0] not in ("wte", "wpe", "ln_f"):
            out[name] = array
            continue
        *module, leaf = parts
        if module[-1].startswith("ln_"):
            leaf = {"weight": "scale", "g": "scale", "b": "bias"}.get(leaf, leaf)
        elif module[-1] in ("wte", "wpe"):
            leaf = "embedding"
        elif leaf == "weight":
            leaf = "kernel"  # Conv1D: already (in, out)
        path = "/".join(["transformer", *module, leaf])
        if path in out:
            raise ValueError(
                f"Checkpoint names {path!r} twice (with and without 'transformer.' prefix)."
            )
        out[path] = array
    return out


def export_hf_checkpoint(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_hf_checkpoint`: ``transformer.``-prefixed HF names; Conv1D
    kernels stay ``(in, out)``, the ``score`` Linear goes back to ``(out, in)``. The tied
    ``lm_head`` is not written (transformers re-ties it to ``wte``)."""
    del batch_stats  # GPT-2 has no BatchNorm
    out: dict[str, np.ndarray] = {}
    for path, array in flat_numpy(params).items():
        *module, leaf = path.split("/")
        if module == ["score"]:
            names, leaf, array = ["score"], "weight", array.T
        else:  # transformer/h_N/... -> transformer.h.N...
            names = (
                [module[0], *module[1].split("_", 1), *module[2:]]
                if module[1].startswith("h_")
                else module
            )
            leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
        out[".".join([*names, leaf])] = np.ascontiguousarray(array)
    return out


_ARCHITECTURES = {
    "classification": "GPT2ForSequenceClassification",
    "regression": "GPT2ForSequenceClassification",
    "causal_lm": "GPT2LMHeadModel",
    "features": "GPT2Model",
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
    """Builds the GPT-2 module, initializer, converter and structure for one checkpoint.

    Called by :func:`jaxtl.weights.loading.load` through the registry. ``pooling`` must be
    ``None`` or ``"last"``: GPT-2 classifies from the last real token, as HF does.
    """
    config = GPT2Config.from_hf(raw_config, os.path.join(directory, "config.json"))
    if task not in TASKS:
        raise ValueError(f"GPT-2 has no {task!r} head; expected one of {TASKS}.")
    if pooling not in (None, "last"):
        raise ValueError(
            f"pooling={pooling!r} is not supported for GPT-2: it classifies from the last real "
            "token (pooling='last'); pass pooling=None."
        )
    num_labels = 0 if task in ("features", "causal_lm") else num_labels
    module = GPT2ForTask(config, dtype, task, num_labels)

    abstract = abstract_params(module, config.n_positions)
    # token_type_ids are ignored on purpose: jaxtl's text pipeline always sends zeros, and HF
    # GPT-2 would add wte[0] to every position for them (it embeds token types with wte).
    apply, forward = make_apply(module, ("input_ids", "attention_mask"))

    has_head = task in ("classification", "regression")
    # The LM's output layer is wte itself (tied), which is also the input embedding; its own
    # output-side params are the final LayerNorm, so that is the "head" that linear_probe,
    # bitfit and last_n train for task="causal_lm" (wte trains only under full).
    if task == "causal_lm":
        head, neck = ("transformer/ln_f",), ()
    else:
        head, neck = ("score",) if has_head else (), ("transformer/ln_f",)
    structure = Structure(
        stem=("transformer/wte", "transformer/wpe"),
        blocks=tuple(f"transformer/h_{i}" for i in range(config.n_layer)),
        neck=neck,
        head=head,
        tensor_parallel=TENSOR_PARALLEL,
        lora_targets=LORA_TARGETS,
    )
    extras = {
        "pooling": "last" if has_head else None,
        "max_length": config.n_positions,
        "hidden_size": config.n_embd,
        "vocab_size": config.vocab_size,
    }
    if task == "causal_lm":
        extras["decoder"] = DecoderInfo(
            init_cache=functools.partial(init_cache, config),
            max_length=config.n_positions,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )

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
            export_hf_checkpoint, raw_config, _ARCHITECTURES[task], num_labels, task
        ),
    )
