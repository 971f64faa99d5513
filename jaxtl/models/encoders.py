"""What the BERT-style text encoders (BERT, RoBERTa, DistilBERT) share, written once.

Each family keeps its own file, module tree and Hugging Face names (:mod:`jaxtl.models.bert`,
:mod:`jaxtl.models.roberta`, :mod:`jaxtl.models.distilbert`); what is here is the part of them
that is the same arithmetic or the same wiring under other names:

* :class:`HFNames`: a family's state-dict layout (base-model prefix, block list, head modules)
  and the name map both ways, with and without the prefix;
* :func:`read_config`: config.json's entries into the family's config dataclass, checked;
* :func:`self_attention` and :func:`run_blocks`: the q/k/v attention core and the block stack
  (remat, activations pinned to the batch split) in the calling module's scope;
* :func:`padding_row`: the padding index's embedding row, which gets no gradient;
* :func:`mean_pool` and :func:`linear_head`: the mean-pooled head every family offers;
* :func:`token_head` and :func:`head_layout`: the per-token heads (tags, answer spans) and
  which modules and ``...For<Task>`` class each task's head is;
* :func:`check_pooling`, :func:`check_length` and :func:`encoder_spec`: the ``pooling`` option,
  the sequence-length limit, and the :class:`~jaxtl.models.registry.ModelSpec` a ``build``
  returns.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
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
    make_apply,
)
from jaxtl.models.layers import (
    Dropout,
    block,
    dense,
    dot_product_attention,
    shard_batch,
    split_heads,
)
from jaxtl.models.registry import TOKEN_TASKS, ModelSpec
from jaxtl.transfer.structure import Structure

POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class HFNames:
    """Where a BERT-style family's params sit in its Hugging Face state dict.

    The tree mirrors the state dict: the base model's modules under ``root`` (HF's
    ``base_model_prefix``), its blocks ``{root}.{layers}.layer.N`` as ``{root}/{layers}/layer_N``,
    and the task head's modules (``heads``) at the top, as the ``...ForSequenceClassification``
    classes name them. LayerNorms (``LayerNorm``, ``*layer_norm``) hold ``scale``/``bias``,
    embeddings an ``embedding``, and Linear weights are transposed to Dense kernels.

    Attributes:
      root: the base model's prefix: ``bert``, ``roberta``, ``distilbert``.
      body: the base model's top-level modules (``embeddings``, the block list, ``pooler``).
      layers: the module holding the block list (``encoder``; DistilBERT's ``transformer``).
      heads: the head's top-level modules (``classifier``; DistilBERT's ``pre_classifier`` too).
    """

    root: str
    body: tuple[str, ...]
    layers: str
    heads: tuple[str, ...]

    def convert(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The state dict renamed to model paths, torch layouts to Flax ones (see
        :func:`jaxtl.models.bert.convert_hf_checkpoint`)."""
        out: dict[str, np.ndarray] = {}
        for name, array in tensors.items():
            parts = name.split(".")
            if parts[0] == self.root:
                parts = parts[1:]
            if parts[:1] == ["embeddings"] and parts[-1] in ("position_ids", "token_type_ids"):
                continue  # index buffers saved by older transformers, not weights
            if parts[0] in self.body:
                parts = [self.root, *parts]
            elif parts[0] not in self.heads:
                out[name] = array
                continue
            if parts[1:3] == [self.layers, "layer"]:  # encoder.layer.N -> encoder/layer_N
                parts = [parts[0], self.layers, f"layer_{parts[3]}", *parts[4:]]
            *module, leaf = parts
            if module[-1] == "LayerNorm" or module[-1].endswith("layer_norm"):
                leaf = {"weight": "scale", "gamma": "scale", "beta": "bias"}.get(leaf, leaf)
            elif module[-1].endswith("embeddings") and leaf == "weight":
                leaf = "embedding"
            elif leaf == "weight" and array.ndim == 2:
                leaf, array = "kernel", array.T  # torch Linear stores (out, in)
            path = "/".join([*module, leaf])
            if path in out:
                raise ValueError(
                    f"Checkpoint names {path!r} twice (with and without '{self.root}.' prefix)."
                )
            out[path] = array
        return out

    def export(
        self, params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """The inverse of :meth:`convert`: HF names (``root.`` prefixed) and torch layouts
        (Linear weights ``(out, in)``)."""
        del batch_stats  # BERT-style encoders have no BatchNorm
        out: dict[str, np.ndarray] = {}
        for path, array in flat_numpy(params).items():
            *module, leaf = path.split("/")
            names = module
            if module[:2] == [self.root, self.layers]:  # root/encoder/layer_N -> encoder.layer.N
                names = [*module[:2], "layer", module[2].removeprefix("layer_"), *module[3:]]
            if leaf == "kernel":
                leaf, array = "weight", array.T
            elif leaf in ("scale", "embedding"):
                leaf = "weight"
            out[".".join([*names, leaf])] = np.ascontiguousarray(array)
        return out

    def blocks(self, count: int) -> tuple[str, ...]:
        """The paths of the first ``count`` blocks, input to output (:class:`Structure`)."""
        return tuple(f"{self.root}/{self.layers}/layer_{i}" for i in range(count))


def read_config(cls: type, raw: Mapping[str, Any], source: str, names: tuple[str, str, str]):
    """A BERT-style config dataclass ``cls`` from config.json's entries (``None`` or absent:
    the field's default), checked. ``names`` are its fields for the activation, the width and
    the number of heads: the activation must be one jaxtl implements, and the heads must
    divide the width.

    Example:
      >>> from jaxtl.models.bert import BertConfig
      >>> read_config(BertConfig, {"hidden_size": 30}, "config.json", ("hidden_act",
      ...     "hidden_size", "num_attention_heads"))
      Traceback (most recent call last):
      ValueError: config.json: hidden_size=30 is not a multiple of num_attention_heads=12.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    config = cls(**{k: v for k, v in raw.items() if k in fields and v is not None})
    activation, width, heads = names
    if getattr(config, activation) not in ACTIVATIONS:
        raise ValueError(
            f"{source}: {activation}={getattr(config, activation)!r} is not supported; expected "
            f"one of {sorted(ACTIVATIONS)}."
        )
    if getattr(config, width) % getattr(config, heads):
        raise ValueError(
            f"{source}: {width}={getattr(config, width)} is not a multiple of "
            f"{heads}={getattr(config, heads)}."
        )
    return config


def self_attention(
    x: jax.Array,
    mask: jax.Array | None,
    names: tuple[str, str, str],
    *,
    num_heads: int,
    std: float,
    dropout_rate: float,
    train: bool,
    dtype: Any,
) -> jax.Array:
    """The context of a BERT-style encoder's self-attention: q, k and v projections (Dense
    layers named ``names``, built in the calling module's scope, as is the attention dropout)
    of ``x [B, T, H]``, attending over the keys where ``mask [B, T]`` is True.

    BERT's and RoBERTa's ``query``/``key``/``value`` and DistilBERT's ``q_lin``/``k_lin``/
    ``v_lin`` are the same arithmetic under other names."""
    q, k, v = (
        split_heads(dense(x.shape[-1], name, dtype, std=std)(x), num_heads) for name in names
    )
    return dot_product_attention(
        q,
        k,
        v,
        None if mask is None else mask[:, None, None, :],  # padded keys, for every query
        dropout_rate=dropout_rate,
        deterministic=not train,
        dtype=dtype,
    )


def run_blocks(
    layer: type[nn.Module],
    config: Any,
    dtype: Any,
    count: int,
    x: jax.Array,
    mask: jax.Array | None,
    *,
    train: bool,
) -> jax.Array:
    """``x`` through ``count`` blocks ``layer(config, dtype)`` named ``layer_0`` ... in the
    calling module's scope (``layer(x, mask, train)``), each rematerialized under
    ``config.remat`` (:func:`jaxtl.models.layers.block`), the activations between them pinned
    to the batch split (:func:`jaxtl.models.layers.shard_batch`)."""
    layer = block(layer, config.remat, train_argnum=3)
    for i in range(count):
        x = shard_batch(layer(config, dtype, name=f"layer_{i}")(shard_batch(x), mask, train))
    return x


def padding_row(embedded: jax.Array, ids: jax.Array, padding_idx: int) -> jax.Array:
    """``embedded`` (the embedding rows of ``ids``) with no gradient into row ``padding_idx``:
    torch's ``nn.Embedding(padding_idx=...)``, which transformers' word embeddings (and
    RoBERTa's positions) use, so a loss that reads padded positions (question answering's
    softmax over the sequence) leaves the padding row as it was, as in transformers."""
    at_pad = (ids == padding_idx)[..., None]
    return jnp.where(at_pad, jax.lax.stop_gradient(embedded), embedded)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Averages ``hidden [B, T, H]`` over the positions where ``attention_mask`` is 1."""
    if attention_mask is None:
        return hidden.mean(axis=1)
    weights = attention_mask.astype(hidden.dtype)[..., None]
    # Clamp like sentence-transformers so an all-padding row gives zeros, not NaN.
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


def linear_head(
    pooled: jax.Array, num_labels: int, *, dropout_rate: float, std: float, train: bool, dtype: Any
) -> jax.Array:
    """Dropout, then a Dense ``classifier`` to ``num_labels``: the head over pooled features
    (BERT's, and the mean-pooled head of every BERT-style family). Built in the calling module's
    scope, so the params are ``classifier/kernel`` and ``classifier/bias`` beside its body."""
    pooled = Dropout(dropout_rate, stream=True)(pooled, deterministic=not train)
    return dense(num_labels, "classifier", dtype, std=std)(pooled)


# The Dense each per-token task's head is, named as transformers' ...For<Task> classes name it.
TOKEN_HEAD_NAMES = {"token_classification": "classifier", "question_answering": "qa_outputs"}
# transformers' class suffix for each task's head.
ARCHITECTURES = {
    "token_classification": "ForTokenClassification",
    "question_answering": "ForQuestionAnswering",
}


def token_head(
    hidden: jax.Array,
    task: str,
    num_labels: int,
    *,
    dropout_rate: float,
    std: float,
    train: bool,
    dtype: Any,
) -> jax.Array:
    """Per-token logits over ``hidden [B, T, H]``: dropout, then a Dense to ``num_labels``,
    named as transformers names it (:data:`TOKEN_HEAD_NAMES`). ``task="token_classification"``
    gives tag logits ``[B, T, num_labels]`` (``...ForTokenClassification``'s ``classifier``);
    ``"question_answering"`` gives ``[B, T, 2]``, the answer's start and end logits
    (``...ForQuestionAnswering``'s ``qa_outputs``; BERT and RoBERTa put no dropout before it)."""
    hidden = Dropout(dropout_rate, stream=True)(hidden, deterministic=not train)
    return dense(num_labels, TOKEN_HEAD_NAMES[task], dtype, std=std)(hidden)


def head_layout(
    prefix: str, task: str, pooled_head: tuple[str, ...], own_head: bool
) -> tuple[tuple[str, ...], str]:
    """``(head modules, exported architecture)`` of a BERT-style family whose transformers
    classes are ``{prefix}Model``, ``{prefix}ForSequenceClassification`` ...: the per-token
    tasks' Dense (:data:`TOKEN_HEAD_NAMES`) and class; ``pooled_head`` and the sequence
    classifier's class for classification / regression with the family's own head
    (``own_head``); a mean-pooled head has no transformers class and is exported beside a plain
    ``{prefix}Model`` (``jaxtl.load`` reads it back); no head for features.

    Example:
      >>> head_layout("Bert", "question_answering", ("classifier",), True)
      (('qa_outputs',), 'BertForQuestionAnswering')
    """
    if task in TOKEN_TASKS:
        return (TOKEN_HEAD_NAMES[task],), prefix + ARCHITECTURES[task]
    if task == "features":
        return (), f"{prefix}Model"
    if own_head:
        return pooled_head, f"{prefix}ForSequenceClassification"
    return ("classifier",), f"{prefix}Model"


def check_pooling(pooling: str | None) -> str:
    """The ``pooling`` load option of a BERT-style family, checked: ``"cls"`` (the default: the
    family's own first-token head) or ``"mean"``."""
    pooling = "cls" if pooling is None else pooling
    if pooling not in POOLINGS:
        raise ValueError(
            f"pooling={pooling!r} is not supported; expected one of {POOLINGS} or None."
        )
    return pooling


def check_length(input_ids: jax.Array, limit: int, what: str) -> None:
    """Refuses a sequence longer than the ``limit`` positions the model numbers (``what``
    names the config entry that sets it), while tracing: past the table, ``jnp.take`` would
    clamp silently and give garbage positions."""
    if input_ids.shape[-1] > limit:
        raise ValueError(
            f"Sequence length {input_ids.shape[-1]} exceeds {what}={limit}; truncate inputs to "
            "extras['max_length']."
        )


def encoder_spec(
    module: nn.Module,
    raw_config: Mapping[str, Any],
    *,
    names: HFNames,
    structure: Structure,
    architecture: str,
    init: Callable[..., jax.Array],
    input_keys: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids"),
) -> ModelSpec:
    """The :class:`ModelSpec` of a BERT-style family's ``module`` (which has ``config``,
    ``task``, ``num_labels`` and ``pooling``; its config has ``max_length``, the longest
    sequence it numbers, and ``hidden_size``): abstract params, ``apply``/``forward`` over
    ``input_keys``, the HF name map ``names`` and its inverse, exported as ``architecture``,
    and ``init(path, leaf, seed, config=...)`` for params the checkpoint lacks."""
    config = module.config
    apply, forward = make_apply(module, input_keys)
    extras = {
        "pooling": module.pooling,
        "max_length": config.max_length,
        "hidden_size": config.hidden_size,
    }
    return ModelSpec(
        config=config,
        module=module,
        abstract_params=abstract_params(module, config.max_length),
        init_leaf=functools.partial(init, config=config),
        convert=names.convert,
        apply=apply,
        forward=forward,
        structure=structure,
        extras=extras,
        export=hf_exporter(names.export, raw_config, architecture, module.num_labels, module.task),
    )
