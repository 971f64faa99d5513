"""DistilBERT text encoders in Flax linen, read from Hugging Face checkpoints.

The param tree mirrors ``transformers.DistilBertModel``'s names
(``distilbert/transformer/layer_0/attention/q_lin``, ``sa_layer_norm``, ``ffn/lin1``,
``output_layer_norm``), so the checkpoint name map is BERT's mechanical one
(:class:`jaxtl.models.encoders.HFNames`). The arithmetic is BERT's without token types or a pooler,
with no dropout after the attention's output projection (``out_lin``) and LayerNorm epsilon
fixed at 1e-12, as in the PyTorch model; the attention core is BERT's
(:func:`jaxtl.models.encoders.self_attention`).

Heads: ``pooling="cls"`` (the default) is ``DistilBertForSequenceClassification``'s:
``pre_classifier`` on the first token, ReLU, dropout (``seq_classif_dropout``), ``classifier``;
a base checkpoint gets both layers new. ``pooling="mean"`` is BERT's mean-pooled head (the mask
mean of the last hidden states, dropout, a Dense ``classifier``), exported beside a plain
``DistilBertModel``.

``sinusoidal_pos_embds=True`` checkpoints load: transformers (5.x) keeps the sinusoidal table
as an ordinary, saved and trained ``position_embeddings`` weight, and so does jaxtl; a table
that is not read from the checkpoint is initialized to the sinusoids, as transformers does.
Parity with the PyTorch implementation is tested in ``tests/test_distilbert.py``.
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

NAMES = HFNames(
    "distilbert",
    ("embeddings", "transformer"),
    "transformer",
    ("pre_classifier", "classifier", "qa_outputs"),
)

# Megatron's split of each block (see jaxtl.sharding), as BERT's: q/k/v and the FFN's first
# layer by output column, the attention output and the FFN's second layer by input row.
TENSOR_PARALLEL = (
    (r"distilbert/transformer/layer_\d+/attention/(q_lin|k_lin|v_lin)", "column"),
    (r"distilbert/transformer/layer_\d+/attention/out_lin", "row"),
    (r"distilbert/transformer/layer_\d+/ffn/lin1", "column"),
    (r"distilbert/transformer/layer_\d+/ffn/lin2", "row"),
)

# LoRA's default targets: the query and value projections, as for BERT (and PEFT's default).
LORA_TARGETS = (r"distilbert/transformer/layer_\d+/attention/(q_lin|v_lin)",)

# transformers hard-codes every DistilBERT LayerNorm's epsilon; config.json does not carry it.
LAYER_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class DistilBertConfig:
    """The config.json fields the encoder uses (names as in ``transformers.DistilBertConfig``)."""

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    initializer_range: float = 0.02
    seq_classif_dropout: float = 0.2
    qa_dropout: float = 0.1
    pad_token_id: int = 0
    # jaxtl's, not config.json's: rematerialize each block under this policy (layers.block).
    remat: str | None = None

    @property
    def hidden_size(self) -> int:
        """``dim`` under the name the other encoders give it (as transformers maps it)."""
        return self.dim

    @property
    def max_length(self) -> int:
        """The longest sequence the position table numbers (``extras["max_length"]``)."""
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> DistilBertConfig:
        """Builds the config from a parsed config.json, checking what this encoder supports."""
        return read_config(cls, raw, source, ("activation", "dim", "n_heads"))


class _DistilBertModule(nn.Module):
    """Fields every DistilBERT submodule shares: the config and the param/compute dtype."""

    config: DistilBertConfig
    dtype: Any = jnp.float32

    def dense(self, features: int, name: str) -> nn.Dense:
        return dense(features, name, self.dtype, std=self.config.initializer_range)


class DistilBertEmbeddings(_DistilBertModule):
    """Word + absolute position embeddings, then LayerNorm and dropout (no token types)."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, *, train: bool) -> jax.Array:
        c = self.config
        embed = functools.partial(
            nn.Embed,
            features=c.dim,
            embedding_init=nn.initializers.normal(c.initializer_range),
            dtype=self.dtype,
            param_dtype=self.dtype,
        )
        words = embed(c.vocab_size, name="word_embeddings")(input_ids)
        words = padding_row(words, input_ids, c.pad_token_id)
        positions = embed(c.max_position_embeddings, name="position_embeddings")(
            jnp.arange(input_ids.shape[-1])[None, :]
        )
        x = layer_norm(LAYER_NORM_EPS, "LayerNorm", self.dtype)(words + positions)
        return Dropout(c.dropout, stream=True)(x, deterministic=not train)


class DistilBertAttention(_DistilBertModule):
    """Self-attention (``q_lin``/``k_lin``/``v_lin``) and its output projection ``out_lin``,
    with no dropout after it (HF's ``DistilBertSelfAttention``)."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool) -> jax.Array:
        c = self.config
        context = self_attention(
            x,
            mask,
            ("q_lin", "k_lin", "v_lin"),
            num_heads=c.n_heads,
            std=c.initializer_range,
            dropout_rate=c.attention_dropout,
            train=train,
            dtype=self.dtype,
        )
        return self.dense(c.dim, "out_lin")(context)


class DistilBertFFN(_DistilBertModule):
    """``lin1`` to ``hidden_dim``, the activation, ``lin2`` back, dropout (HF's ``FFN``)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = self.config
        h = ACTIVATIONS[c.activation](self.dense(c.hidden_dim, "lin1")(x))
        return Dropout(c.dropout, stream=True)(
            self.dense(c.dim, "lin2")(h), deterministic=not train
        )


class DistilBertLayer(_DistilBertModule):
    """One post-LayerNorm block (HF's ``TransformerBlock``)."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
        c, dt = self.config, self.dtype
        x = DistilBertAttention(c, dt, name="attention")(x, mask, train=train) + x
        x = layer_norm(LAYER_NORM_EPS, "sa_layer_norm", dt)(x)
        x = DistilBertFFN(c, dt, name="ffn")(x, train=train) + x
        return layer_norm(LAYER_NORM_EPS, "output_layer_norm", dt)(x)


class DistilBertModel(_DistilBertModule):
    """The encoder (HF ``DistilBertModel``): returns the last hidden state."""

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, *, train: bool
    ) -> jax.Array:
        c = self.config
        mask = None if attention_mask is None else attention_mask.astype(bool)
        x = DistilBertEmbeddings(c, self.dtype, name="embeddings")(input_ids, train=train)
        return DistilBertTransformer(c, self.dtype, name="transformer")(x, mask, train=train)


class DistilBertTransformer(_DistilBertModule):
    """The stack of blocks (HF's ``Transformer``), named ``layer_0`` ... ``layer_{N-1}``."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, *, train: bool) -> jax.Array:
        c = self.config
        return run_blocks(DistilBertLayer, c, self.dtype, c.n_layers, x, mask, train=train)


class DistilBertForTask(_DistilBertModule):
    """DistilBERT with a task head.

    ``task="features"`` returns the last hidden state ``[B, T, dim]``; ``"classification"`` and
    ``"regression"`` return ``[B, num_labels]``: ``pre_classifier``, ReLU, dropout and
    ``classifier`` on the first token (``pooling="cls"``), or dropout and ``classifier`` on the
    attention-mask mean of the last hidden states (``pooling="mean"``).
    ``"token_classification"`` / ``"question_answering"``: per-token logits after ``dropout`` /
    ``qa_dropout`` (:func:`~jaxtl.models.encoders.token_head`).
    """

    task: str = "classification"
    num_labels: int = 2
    pooling: str = "cls"

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        c = self.config
        check_length(input_ids, c.max_position_embeddings, "max_position_embeddings")
        hidden = DistilBertModel(c, self.dtype, name="distilbert")(
            input_ids, attention_mask, train=train
        )
        if self.task == "features":
            return hidden
        if self.task in TOKEN_TASKS:
            qa = self.task == "question_answering"
            return token_head(
                hidden,
                self.task,
                self.num_labels,
                dropout_rate=c.qa_dropout if qa else c.dropout,
                std=c.initializer_range,
                train=train,
                dtype=self.dtype,
            )
        if self.pooling == "cls":
            pooled = nn.relu(self.dense(c.dim, "pre_classifier")(hidden[:, 0]))
        else:
            pooled = mean_pool(hidden, attention_mask)
        return linear_head(
            pooled,
            self.num_labels,
            dropout_rate=c.seq_classif_dropout,
            std=c.initializer_range,
            train=train,
            dtype=self.dtype,
        )


def sinusoidal_table(positions: int, dim: int) -> np.ndarray:
    """transformers' ``create_sinusoidal_embeddings``: ``sin`` at even columns and ``cos`` at
    odd ones of ``pos / 10000 ** (2 * (j // 2) / dim)``, computed in float64.

    Example:
      >>> sinusoidal_table(2, 4).round(4).tolist()
      [[0.0, 1.0, 0.0, 1.0], [0.8415, 0.5403, 0.01, 1.0]]
    """
    j = np.arange(dim)
    angles = np.arange(positions)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None, :]
    return np.where(j % 2 == 0, np.sin(angles), np.cos(angles))


POSITIONS = "distilbert/embeddings/position_embeddings/embedding"


def init_leaf(
    path: str, leaf: jax.ShapeDtypeStruct, seed: int, *, config: DistilBertConfig
) -> jax.Array:
    """Initializes one param as transformers' ``DistilBertPreTrainedModel._init_weights`` does:
    kernels and embeddings ~ normal(std=initializer_range), biases 0, LayerNorm scales 1, and
    the sinusoidal position table when ``sinusoidal_pos_embds`` is set."""
    if path == POSITIONS and config.sinusoidal_pos_embds:
        table = sinusoidal_table(*leaf.shape)
        return jnp.asarray(table.astype(np.float32), dtype=leaf.dtype)  # torch.FloatTensor
    return init_normal_leaf(path, leaf, seed, config.initializer_range, "DistilBERT")


def build(
    directory: str,
    raw_config: Mapping[str, Any],
    *,
    task: str,
    num_labels: int,
    pooling: str | None,
    dtype: Any = jnp.float32,
) -> ModelSpec:
    """Builds the DistilBERT module, initializer, converter and structure for one checkpoint.

    Called by :func:`jaxtl.weights.loading.load` through the registry; ``task`` and
    ``num_labels`` are already validated there. ``pooling`` is ``"cls"`` (default:
    ``DistilBertForSequenceClassification``'s head) or ``"mean"``.
    """
    config = DistilBertConfig.from_hf(raw_config, os.path.join(directory, "config.json"))
    pooling = check_pooling(pooling)
    module = DistilBertForTask(config, dtype, task, num_labels, pooling)

    head, architecture = head_layout(
        "DistilBert", task, ("pre_classifier", "classifier"), pooling == "cls"
    )
    structure = Structure(
        stem=("distilbert/embeddings",),
        blocks=NAMES.blocks(config.n_layers),
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
        # No token types: DistilBertModel takes none (a text batch's token_type_ids stay out).
        input_keys=("input_ids", "attention_mask"),
        init=init_leaf,
    )
