"""BERT-style text encoders in Flax linen, read from Hugging Face checkpoints.

The param tree mirrors Hugging Face's module names (``bert/encoder/layer_0/attention/self/query``)
so the checkpoint name map is mechanical. Numerics follow ``transformers.BertModel``: exact erf
GELU, post-LayerNorm residual blocks, padding keys masked with ``finfo(dtype).min``; parity with
the PyTorch implementation is tested in ``tests/test_bert_parity.py``.

RoBERTa (:mod:`jaxtl.models.roberta`) subclasses this file's embeddings (its positions), encoder
and task module; what DistilBERT shares too (the name map, attention core, block stack, heads
and spec) is in :mod:`jaxtl.models.encoders`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models.common import ACTIVATIONS, init_normal_leaf
from jaxtl.models.encoders import (
    HFNames,
    check_length,
    check_pooling,
    encoder_spec,
    head_layout,
    linear_head,
    mean_pool,
    padding_row,
    read_config,
    run_blocks,
    self_attention,
    token_head,
)
from jaxtl.models.layers import Dropout, dense, layer_norm
from jaxtl.models.registry import TOKEN_TASKS, ModelSpec
from jaxtl.transfer.structure import Structure


def tensor_parallel(root: str) -> tuple[tuple[str, str], ...]:
    """Megatron's split of each layer of the BERT encoder under ``root`` (``bert``, and RoBERTa's
    ``roberta``; see jaxtl.sharding): q/k/v and the MLP's first layer by output column (whole
    heads per device), the attention output and the MLP's second by input row."""
    layer = rf"{root}/encoder/layer_\d+"
    return (
        (rf"{layer}/attention/self/(query|key|value)", "column"),
        (rf"{layer}/attention/output/dense", "row"),
        (rf"{layer}/intermediate/dense", "column"),
        (rf"{layer}/output/dense", "row"),
    )


def lora_targets(root: str) -> tuple[str, ...]:
    """LoRA's default targets in the encoder under ``root``: the query and value projections
    (Hu et al. 2021 adapt those)."""
    return (rf"{root}/encoder/layer_\d+/attention/self/(query|value)",)


TENSOR_PARALLEL = tensor_parallel("bert")
LORA_TARGETS = lora_targets("bert")


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
    # What sets max_length, for messages.
    max_length_source: ClassVar[str] = "max_position_embeddings"

    @property
    def max_length(self) -> int:
        """The longest sequence the position table numbers (``extras["max_length"]``)."""
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> BertConfig:
        """Builds the config from a parsed config.json, checking what this encoder supports."""
        config = read_config(cls, raw, source, ("hidden_act", "hidden_size", "num_attention_heads"))
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
        return config


def _dense(config: BertConfig, features: int, name: str, dtype: Any) -> nn.Dense:
    return dense(features, name, dtype, std=config.initializer_range)


class _BertModule(nn.Module):
    """Fields every BERT submodule shares: the config and the param/compute dtype."""

    config: BertConfig
    dtype: Any = jnp.float32


class BertEmbeddings(_BertModule):
    """Word + token-type + absolute position embeddings, then LayerNorm and dropout. The pad
    token's word embedding gets no gradient (:func:`~jaxtl.models.encoders.padding_row`), nor
    does the pad position's when ``padded_positions`` (RoBERTa's)."""

    padded_positions: ClassVar[bool] = False

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
        words = padding_row(words, input_ids, c.pad_token_id)
        ids = self.position_ids(input_ids)
        positions = embed(c.max_position_embeddings, "position_embeddings")(ids)
        if self.padded_positions:
            positions = padding_row(positions, ids, c.pad_token_id)
        types = embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = layer_norm(c.layer_norm_eps, "LayerNorm", self.dtype)(words + types + positions)
        return Dropout(c.hidden_dropout_prob, stream=True)(x, deterministic=not train)

    def position_ids(self, input_ids: jax.Array) -> jax.Array:
        """BERT's absolute positions ``0 .. T-1``, the same for every row (RoBERTa numbers its
        own: :class:`jaxtl.models.roberta.RobertaEmbeddings`)."""
        return jnp.arange(input_ids.shape[-1])[None, :]


class BertSelfAttention(_BertModule):
    """Multi-head self-attention over unmasked keys (HF ``attention.self``)."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool) -> jax.Array:
        c = self.config
        return self_attention(
            x,
            mask,
            ("query", "key", "value"),
            num_heads=c.num_attention_heads,
            std=c.initializer_range,
            dropout_rate=c.attention_probs_dropout_prob,
            train=train,
            dtype=self.dtype,
        )


class BertAddNorm(_BertModule):
    """Dense, dropout, then LayerNorm(x + residual): HF's ``*.output`` blocks."""

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, *, train: bool) -> jax.Array:
        c = self.config
        x = _dense(c, c.hidden_size, "dense", self.dtype)(x)
        x = Dropout(c.hidden_dropout_prob, stream=True)(x, deterministic=not train)
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
        c = self.config
        return run_blocks(BertLayer, c, self.dtype, c.num_hidden_layers, x, mask, train=train)


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
    # The embeddings' class: RoBERTa's (jaxtl.models.roberta) numbers positions after padding.
    embeddings_class: ClassVar[type[BertEmbeddings]] = BertEmbeddings

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
        x = self.embeddings_class(self.config, self.dtype, name="embeddings")(
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
    ``"token_classification"`` and ``"question_answering"`` return per-token logits from
    :func:`~jaxtl.models.encoders.token_head` (``[B, T, num_labels]``; ``[B, T, 2]``: answer
    start and end), with no pooler, as transformers' classes for them have none.

    Another BERT-style encoder (RoBERTa's, :class:`jaxtl.models.roberta.RobertaForTask`) is a
    subclass that names its ``root`` and ``encoder_class``, whether ``pooling="cls"`` reads the
    encoder's pooler, and its own :meth:`first_token_head`.
    """

    task: str = "classification"
    num_labels: int = 2
    pooling: str = "cls"

    # HF's base_model_prefix (the encoder's params live under it) and the encoder's class.
    root: ClassVar[str] = "bert"
    encoder_class: ClassVar[type[BertModel]] = BertModel
    reads_pooler: ClassVar[bool] = True  # pooling="cls" classifies the pooler's output

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
        check_length(input_ids, c.max_length, c.max_length_source)
        per_token = self.task in TOKEN_TASKS
        first_token = self.task != "features" and not per_token and self.pooling == "cls"
        add_pooler = first_token and self.reads_pooler
        hidden, pooled = self.encoder_class(c, self.dtype, add_pooler, name=self.root)(
            input_ids, attention_mask, token_type_ids, train=train
        )
        if self.task == "features":
            return hidden
        if per_token:  # ...ForTokenClassification / ...ForQuestionAnswering: no pooler
            qa = self.task == "question_answering"
            return token_head(
                hidden,
                self.task,
                self.num_labels,
                dropout_rate=0.0 if qa else classifier_dropout(c),
                std=c.initializer_range,
                train=train,
                dtype=self.dtype,
            )
        if first_token:
            return self.first_token_head(hidden, pooled, train=train)
        return self.pooled_head(mean_pool(hidden, attention_mask), train=train)

    def first_token_head(
        self, hidden: jax.Array, pooled: jax.Array | None, *, train: bool
    ) -> jax.Array:
        """The ``pooling="cls"`` head: BERT's classifies the pooler's output (``pooled``, the
        first token through Dense + tanh), as ``BertForSequenceClassification`` does."""
        del hidden  # the pooler read the first token
        return self.pooled_head(pooled, train=train)

    def pooled_head(self, pooled: jax.Array, *, train: bool) -> jax.Array:
        """Dropout and a Dense ``classifier`` over pooled features (:func:`linear_head`)."""
        c = self.config
        return linear_head(
            pooled,
            self.num_labels,
            dropout_rate=classifier_dropout(c),
            std=c.initializer_range,
            train=train,
            dtype=self.dtype,
        )


def classifier_dropout(config: BertConfig) -> float:
    """The dropout before a classifier: ``classifier_dropout``, else ``hidden_dropout_prob``
    (transformers' rule for BERT and RoBERTa)."""
    c = config
    return c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob


def init_leaf(path: str, leaf: jax.ShapeDtypeStruct, seed: int, *, config: BertConfig) -> jax.Array:
    """Initializes one param the way transformers' ``BertPreTrainedModel._init_weights`` does.

    Dense kernels and embeddings ~ normal(std=initializer_range), biases 0, LayerNorm scales 1:
    the same rule the modules' own initializers encode. Each param draws from its own stream
    (:func:`jaxtl.models.common.leaf_rng`), so a head's init does not depend on the rest of the tree
    and is identical whether or not the body came from a checkpoint.
    """
    return init_normal_leaf(path, leaf, seed, config.initializer_range, "BERT")


NAMES = HFNames(
    "bert", ("embeddings", "encoder", "pooler"), "encoder", ("classifier", "qa_outputs")
)


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
    return NAMES.convert(tensors)


def export_hf_checkpoint(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_hf_checkpoint`: HF names (``bert.`` prefixed) and torch
    layouts (Linear weights ``(out, in)``)."""
    return NAMES.export(params, batch_stats)


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
    pooling = check_pooling(pooling)  # classic BERT: [CLS] through the pooler
    module = BertForTask(config, dtype, task, num_labels, pooling)

    # HF's BertForSequenceClassification classifies from the pooler ([CLS]).
    own_head = pooling == "cls"
    head, architecture = head_layout("Bert", task, ("classifier",), own_head)
    pooler = own_head and task in ("classification", "regression")
    structure = Structure(
        stem=("bert/embeddings",),
        blocks=NAMES.blocks(config.num_hidden_layers),
        neck=("bert/pooler",) if pooler else (),
        head=head,
        tensor_parallel=TENSOR_PARALLEL,
        lora_targets=LORA_TARGETS,
    )
    return encoder_spec(
        module,
        raw_config,
        names=NAMES,
        structure=structure,
        architecture=architecture,
        init=init_leaf,
    )
