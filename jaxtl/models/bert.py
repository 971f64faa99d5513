"""BERT-style text encoders in Flax linen, read from Hugging Face checkpoints.

The param tree mirrors Hugging Face's module names (``bert/encoder/layer_0/attention/self/query``)
so the checkpoint name map is mechanical. Numerics follow ``transformers.BertModel``: exact erf
GELU, post-LayerNorm residual blocks, padding keys masked with ``finfo(dtype).min``; parity with
the PyTorch implementation is tested in ``tests/test_bert_parity.py``.
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
    dense,
    dot_product_attention,
    layer_norm,
    shard_batch,
    split_heads,
)
from jaxtl.models.registry import ModelSpec
from jaxtl.transfer.structure import Structure

POOLINGS = ("cls", "mean")

# Megatron's split of each encoder layer (see jaxtl.sharding): q/k/v and the MLP's first layer by
# output column (whole heads per device), the attention output and the MLP's second by input row.
TENSOR_PARALLEL = (
    (r"bert/encoder/layer_\d+/attention/self/(query|key|value)", "column"),
    (r"bert/encoder/layer_\d+/attention/output/dense", "row"),
    (r"bert/encoder/layer_\d+/intermediate/dense", "column"),
    (r"bert/encoder/layer_\d+/output/dense", "row"),
)


# LoRA's default targets (Hu et al. 2021 adapt the query and value projections).
LORA_TARGETS = (r"bert/encoder/layer_\d+/attention/self/(query|value)",)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The config.json fields the encoder uses (names as in ``transformers.BertConfig``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # jaxtl's, not config.json's: rematerialize each block under this policy (layers.block).
    remat: str | None = None

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> BertConfig:
        """Builds the config from a parsed config.json, checking what this encoder supports."""
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in names and v is not None})
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"{source}: hidden_act={config.hidden_act!r} is not supported; expected one of "
                f"{sorted(ACTIVATIONS)}."
            )
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"{source}: position_embedding_type={position_type!r} is not supported; only "
                "'absolute' position embeddings are implemented."
            )
        if raw.get("is_decoder") or raw.get("add_cross_attention"):
            raise ValueError(
                f"{source}: decoder BERTs (is_decoder/add_cross_attention) are not supported."
            )
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"{source}: hidden_size={config.hidden_size} is not a multiple of "
                f"num_attention_heads={config.num_attention_heads}."
            )
        return config


def _dense(config: BertConfig, features: int, name: str, dtype: Any) -> nn.Dense:
    return dense(features, name, dtype, std=config.initializer_range)


class _BertModule(nn.Module):
    """Fields every BERT submodule shares: the config and the param/compute dtype."""

    config: BertConfig
    dtype: Any = jnp.float32


class BertEmbeddings(_BertModule):
    """Word + token-type + absolute position embeddings, then LayerNorm and dropout."""

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array, *, train: bool
    ) -> jax.Array:
        c = self.config

        def embed(num: int, name: str) -> nn.Embed:
            return nn.Embed(
                num,
                c.hidden_size,
                embedding_init=nn.initializers.normal(c.initializer_range),
                dtype=self.dtype,
                param_dtype=self.dtype,
                name=name,
            )

        words = embed(c.vocab_size, "word_embeddings")(input_ids)
        positions = embed(c.max_position_embeddings, "position_embeddings")(
            jnp.arange(input_ids.shape[-1])[None, :]
        )
        types = embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = layer_norm(c.layer_norm_eps, "LayerNorm", self.dtype)(words + types + positions)
        return Dropout(c.hidden_dropout_prob)(x, deterministic=not train)


class BertSelfAttention(_BertModule):
    """Multi-head self-attention over unmasked keys (HF ``attention.self``)."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool) -> jax.Array:
        c = self.config
        q, k, v = (
            split_heads(_dense(c, c.hidden_size, name, self.dtype)(x), c.num_attention_heads)
            for name in ("query", "key", "value")
        )
        return dot_product_attention(
            q,
            k,
            v,
            None if mask is None else mask[:, None, None, :],  # padded keys, for every query
            dropout_rate=c.attention_probs_dropout_prob,
            deterministic=not train,
            dtype=self.dtype,
        )


class BertAddNorm(_BertModule):
    """Dense, dropout, then LayerNorm(x + residual): HF's ``*.output`` blocks."""

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, *, train: bool) -> jax.Array:
        c = self.config
        x = _dense(c, c.hidden_size, "dense", self.dtype)(x)
        x = Dropout(c.hidden_dropout_prob)(x, deterministic=not train)
        return layer_norm(c.layer_norm_eps, "LayerNorm", self.dtype)(x + residual)


class BertAttention(_BertModule):
    """Self-attention + its output projection (HF ``attention``: ``self`` and ``output``)."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool) -> jax.Array:
        context = BertSelfAttention(self.config, self.dtype, name="self")(x, mask, train=train)
        return BertAddNorm(self.config, self.dtype, name="output")(context, x, train=train)


class BertIntermediate(_BertModule):
    """The feed-forward expansion: Dense to intermediate_size, then the activation."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        return ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "dense", self.dtype)(x))


class BertLayer(_BertModule):
    """One post-LayerNorm transformer block."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
        x = BertAttention(self.config, self.dtype, name="attention")(x, mask, train=train)
        h = BertIntermediate(self.config, self.dtype, name="intermediate")(x)
        return BertAddNorm(self.config, self.dtype, name="output")(h, x, train=train)


class BertEncoder(_BertModule):
    """The stack of blocks, named ``layer_0`` ... ``layer_{N-1}``."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool) -> jax.Array:
        layer = block(BertLayer, self.config.remat, train_argnum=3)
        for i in range(self.config.num_hidden_layers):
            x = shard_batch(
                layer(self.config, self.dtype, name=f"layer_{i}")(shard_batch(x), mask, train)
            )
        return x


class BertPooler(_BertModule):
    """Classic BERT pooler: tanh(Dense(hidden state of the first, [CLS], token))."""

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        return jnp.tanh(
            _dense(self.config, self.config.hidden_size, "dense", self.dtype)(hidden[:, 0])
        )


class BertModel(_BertModule):
    """The encoder (HF ``BertModel``): returns ``(last hidden state, pooled or None)``."""

    add_pooler: bool = True

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        token_type_ids: jax.Array | None,
        *,
        train: bool,
    ) -> tuple[jax.Array, jax.Array | None]:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = None if attention_mask is None else attention_mask.astype(bool)
        x = BertEmbeddings(self.config, self.dtype, name="embeddings")(
            input_ids, token_type_ids, train=train
        )
        x = BertEncoder(self.config, self.dtype, name="encoder")(x, mask, train=train)
        pooled = BertPooler(self.config, self.dtype, name="pooler")(x) if self.add_pooler else None
        return x, pooled


class BertForTask(_BertModule):
    """BERT with a task head.

    ``task="features"`` returns the last hidden state ``[B, T, H]``; ``"classification"`` and
    ``"regression"`` return logits ``[B, num_labels]`` from a Dense head named ``classifier`` over
    the pooled sequence: the pooler output (``pooling="cls"``) or the attention-mask mean of the
    last hidden states (``pooling="mean"``, as sentence-transformers does).
    """

    task: str = "classification"
    num_labels: int = 2
    pooling: str = "cls"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        c = self.config
        if input_ids.shape[-1] > c.max_position_embeddings:
            # Past the table, jnp.take would clamp silently and give garbage positions.
            raise ValueError(
                f"Sequence length {input_ids.shape[-1]} exceeds max_position_embeddings="
                f"{c.max_position_embeddings}; truncate inputs to extras['max_length']."
            )
        has_head = self.task != "features"
        add_pooler = has_head and self.pooling == "cls"
        hidden, pooled = BertModel(c, self.dtype, add_pooler, name="bert")(
            input_ids, attention_mask, token_type_ids, train=train
        )
        if not has_head:
            return hidden
        if self.pooling == "mean":
            pooled = mean_pool(hidden, attention_mask)
        rate = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        pooled = Dropout(rate)(pooled, deterministic=not train)
        return _dense(c, self.num_labels, "classifier", self.dtype)(pooled)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Averages ``hidden [B, T, H]`` over the positions where ``attention_mask`` is 1."""
    if attention_mask is None:
        return hidden.mean(axis=1)
    weights = attention_mask.astype(hidden.dtype)[..., None]
    # Clamp like sentence-transformers so an all-padding row gives zeros, not NaN.
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


def init_leaf(path: str, leaf: jax.ShapeDtypeStruct, seed: int, *, config: BertConfig) -> jax.Array:
    """Initializes one param the way transformers' ``BertPreTrainedModel._init_weights`` does.

    Dense kernels and embeddings ~ normal(std=initializer_range), biases 0, LayerNorm scales 1:
    the same rule the modules' own initializers encode. Each param draws from its own stream
    (:func:`jaxtl.models.common.leaf_rng`), so a head's init does not depend on the rest of the tree
    and is identical whether or not the body came from a checkpoint.
    """
    return init_normal_leaf(path, leaf, seed, config.initializer_range, "BERT")


def convert_hf_checkpoint(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames a Hugging Face BERT state dict to model paths and torch layouts to Flax ones.

    ``bert.`` is optional (sentence-transformers checkpoints have none); ``classifier.*`` maps to
    the head; ``embeddings.position_ids``/``token_type_ids`` buffers are dropped; other names
    (pretraining heads like ``cls.predictions.*``) pass through unchanged.

    Example:
      >>> out = convert_hf_checkpoint({"bert.pooler.dense.weight": np.zeros((4, 3))})
      >>> out["bert/pooler/dense/kernel"].shape
      (3, 4)
    """
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        parts = name.split(".")
        if parts[0] == "bert":
            parts = parts[1:]
        if parts[:1] == ["embeddings"] and parts[-1] in ("position_ids", "token_type_ids"):
            continue  # index buffers saved by older transformers, not weights
        if parts[0] in ("embeddings", "encoder", "pooler"):
            parts = ["bert", *parts]
        elif parts[0] != "classifier":
            out[name] = array
            continue
        if parts[1:3] == ["encoder", "layer"]:  # encoder.layer.N -> encoder/layer_N
            parts = [parts[0], "encoder", f"layer_{parts[3]}", *parts[4:]]
        *module, leaf = parts
        if module[-1] == "LayerNorm":
            leaf = {"weight": "scale", "gamma": "scale", "beta": "bias"}.get(leaf, leaf)
        elif module[-1].endswith("embeddings") and leaf == "weight":
            leaf = "embedding"
        elif leaf == "weight" and array.ndim == 2:
            leaf, array = "kernel", array.T  # torch Linear stores (out, in)
        path = "/".join([*module, leaf])
        if path in out:
            raise ValueError(f"Checkpoint names {path!r} twice (with and without 'bert.' prefix).")
        out[path] = array
    return out


def export_hf_checkpoint(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_hf_checkpoint`: HF names (``bert.`` prefixed) and torch
    layouts (Linear weights ``(out, in)``)."""
    del batch_stats  # BERT has no BatchNorm
    out: dict[str, np.ndarray] = {}
    for path, array in flat_numpy(params).items():
        *module, leaf = path.split("/")
        names = module
        if module[:2] == ["bert", "encoder"]:  # bert/encoder/layer_N -> bert.encoder.layer.N
            names = [*module[:2], "layer", module[2].removeprefix("layer_"), *module[3:]]
        if leaf == "kernel":
            leaf, array = "weight", array.T
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[".".join([*names, leaf])] = np.ascontiguousarray(array)
    return out


def build(
    directory: str,
    raw_config: Mapping[str, Any],
    *,
    task: str,
    num_labels: int,
    pooling: str | None,
    dtype: Any = jnp.float32,
) -> ModelSpec:
    """Builds the BERT module, initializer, converter and structure for one checkpoint.

    Called by :func:`jaxtl.weights.loading.load` through the registry; ``task`` and
    ``num_labels`` are already validated there.
    """
    config = BertConfig.from_hf(raw_config, os.path.join(directory, "config.json"))
    pooling = "cls" if pooling is None else pooling  # classic BERT: [CLS] through the pooler
    if pooling not in POOLINGS:
        raise ValueError(
            f"pooling={pooling!r} is not supported; expected one of {POOLINGS} or None."
        )
    module = BertForTask(config, dtype, task, num_labels, pooling)

    abstract = abstract_params(module, config.max_position_embeddings)
    apply, forward = make_apply(module, ("input_ids", "attention_mask", "token_type_ids"))

    has_head = task != "features"
    # HF's BertForSequenceClassification classifies from the pooler ([CLS]); a mean-pooled head
    # has no HF class, so it is exported beside a plain BertModel (jaxtl.load reads it back).
    architecture = "BertForSequenceClassification" if has_head and pooling == "cls" else "BertModel"

    structure = Structure(
        stem=("bert/embeddings",),
        blocks=tuple(f"bert/encoder/layer_{i}" for i in range(config.num_hidden_layers)),
        neck=("bert/pooler",) if has_head and pooling == "cls" else (),
        head=("classifier",) if has_head else (),
        tensor_parallel=TENSOR_PARALLEL,
        lora_targets=LORA_TARGETS,
    )
    extras = {
        "pooling": pooling,
        "max_length": config.max_position_embeddings,
        "hidden_size": config.hidden_size,
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
        export=hf_exporter(export_hf_checkpoint, raw_config, architecture, num_labels, task),
    )
