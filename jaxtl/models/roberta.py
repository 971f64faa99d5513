"""RoBERTa text encoders in Flax linen, read from Hugging Face checkpoints.

RoBERTa's encoder is BERT's arithmetic (``transformers.RobertaModel`` is a copy of
``BertModel``), so the blocks are :mod:`jaxtl.models.bert`'s modules under ``roberta/``, with
HF's names (``roberta/encoder/layer_0/attention/self/query``). What differs:

* positions are numbered after the padding index, as transformers'
  ``create_position_ids_from_input_ids`` does: ``pad_token_id + 1 + (non-pad tokens so far)``
  for a real token and ``pad_token_id`` for a pad token, so a checkpoint with
  ``max_position_embeddings=514`` reads 512 tokens (``extras["max_length"]``);
* pretrained checkpoints have one token type (``type_vocab_size=1``) and no trained pooler
  (RoBERTa drops next-sentence prediction, so ``roberta-base`` ships none);
* the classification head is ``RobertaClassificationHead``: dropout, ``dense``, tanh, dropout,
  ``out_proj`` on the first token (``<s>``).

How ``task="classification"`` (or ``"regression"``) picks the head: ``pooling="cls"``, the
default, is always RoBERTa's own head (``classifier/dense``, ``classifier/out_proj``), whether
the checkpoint has it (a ``RobertaForSequenceClassification``: it loads) or not (a base
checkpoint: it is initialized, and reported so). BERT's ``cls`` reads a pooler that RoBERTa
never trained, and the own head's ``dense`` + tanh is that pooler's arithmetic, trained with the
task, so the own head is the one first-token head, and it exports as the HF class.
``pooling="mean"`` (or a sentence-transformers checkpoint that declares it) is BERT's
mean-pooled head: the mask mean of the last hidden states, dropout, a Dense ``classifier``,
exported beside a plain ``RobertaModel``. Parity with the PyTorch implementation is tested in
``tests/test_roberta.py``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtl.models.bert import (
    BertConfig,
    BertEmbeddings,
    BertForTask,
    BertModel,
    _BertModule,
    classifier_dropout,
    init_leaf,
    lora_targets,
    tensor_parallel,
)
from jaxtl.models.encoders import HFNames, check_pooling, encoder_spec, head_layout
from jaxtl.models.layers import Dropout, dense
from jaxtl.models.registry import ModelSpec
from jaxtl.transfer.structure import Structure

NAMES = HFNames(
    "roberta", ("embeddings", "encoder", "pooler"), "encoder", ("classifier", "qa_outputs")
)
TENSOR_PARALLEL = tensor_parallel("roberta")
LORA_TARGETS = lora_targets("roberta")


@dataclasses.dataclass(frozen=True)
class RobertaConfig(BertConfig):
    """The config.json fields the encoder uses, with ``transformers.RobertaConfig``'s defaults
    (a config.json omits what equals them)."""

    vocab_size: int = 50265
    pad_token_id: int = 1
    max_length_source: ClassVar[str] = "max_position_embeddings - pad_token_id - 1"

    @property
    def max_length(self) -> int:
        """The longest sequence the position table numbers: positions start after the pad id."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> RobertaConfig:
        """Builds the config from a parsed config.json, checking what this encoder supports."""
        config = super().from_hf(raw, source)
        if config.max_length < 1:
            raise ValueError(
                f"{source}: max_position_embeddings={config.max_position_embeddings} leaves no "
                f"position after pad_token_id={config.pad_token_id} (RoBERTa numbers positions "
                "from pad_token_id + 1); restore config.json from the checkpoint's source."
            )
        return config


def position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """transformers' ``create_position_ids_from_input_ids``: ``pad_token_id`` at pad tokens, and
    ``pad_token_id + n`` at the ``n``-th real token of a row (fairseq's ``make_positions``).

    Example:
      >>> position_ids(jnp.array([[0, 5, 6, 2, 1, 1]]), pad_token_id=1).tolist()
      [[2, 3, 4, 5, 1, 1]]
    """
    real = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=-1) * real + pad_token_id


class RobertaEmbeddings(BertEmbeddings):
    """BERT's embeddings (same params) with RoBERTa's positions, counted from the token ids;
    the pad position's row, like the pad token's, gets no gradient."""

    padded_positions = True

    def position_ids(self, input_ids: jax.Array) -> jax.Array:
        return position_ids(input_ids, self.config.pad_token_id)


class RobertaModel(BertModel):
    """The encoder (HF ``RobertaModel``): :class:`~jaxtl.models.bert.BertModel` with
    :class:`RobertaEmbeddings`."""

    embeddings_class = RobertaEmbeddings


class RobertaClassificationHead(_BertModule):
    """HF's ``RobertaClassificationHead``: dropout, ``dense``, tanh, dropout, ``out_proj``, on
    the first token's hidden state."""

    num_labels: int = 2

    @nn.compact
    def __call__(self, hidden: jax.Array, *, train: bool) -> jax.Array:
        c = self.config
        rate = classifier_dropout(c)
        x = Dropout(rate, stream=True)(hidden[:, 0], deterministic=not train)
        x = jnp.tanh(dense(c.hidden_size, "dense", self.dtype, std=c.initializer_range)(x))
        x = Dropout(rate, stream=True)(x, deterministic=not train)
        return dense(self.num_labels, "out_proj", self.dtype, std=c.initializer_range)(x)


class RobertaForTask(BertForTask):
    """RoBERTa with a task head: :class:`~jaxtl.models.bert.BertForTask` over
    :class:`RobertaModel` (params under ``roberta/``, no pooler), whose ``pooling="cls"`` head is
    :class:`RobertaClassificationHead` and ``pooling="mean"`` head BERT's."""

    root = "roberta"
    encoder_class = RobertaModel
    reads_pooler = False

    def first_token_head(
        self, hidden: jax.Array, pooled: jax.Array | None, *, train: bool
    ) -> jax.Array:
        del pooled  # RoBERTa's encoder runs no pooler
        c, dt = self.config, self.dtype
        return RobertaClassificationHead(c, dt, self.num_labels, name="classifier")(
            hidden, train=train
        )


def build(
    directory: str,
    raw_config: Mapping[str, Any],
    *,
    task: str,
    num_labels: int,
    pooling: str | None,
    dtype: Any = jnp.float32,
) -> ModelSpec:
    """Builds the RoBERTa module, initializer, converter and structure for one checkpoint.

    Called by :func:`jaxtl.weights.loading.load` through the registry; ``task`` and
    ``num_labels`` are already validated there. ``pooling`` is ``"cls"`` (default: RoBERTa's own
    classification head) or ``"mean"`` (see the module docstring).
    """
    config = RobertaConfig.from_hf(raw_config, os.path.join(directory, "config.json"))
    pooling = check_pooling(pooling)
    module = RobertaForTask(config, dtype, task, num_labels, pooling)

    head, architecture = head_layout("Roberta", task, ("classifier",), pooling == "cls")
    structure = Structure(
        stem=("roberta/embeddings",),
        blocks=NAMES.blocks(config.num_hidden_layers),
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
        init=init_leaf,  # transformers initializes RoBERTa as BERT
    )
