"""Parity of jaxtl's Flax RoBERTa against transformers' PyTorch RoBERTa (the independent
reference): features, both heads, the load report of a new head, the export round trip, and a
short real training run under ``full`` and ``lora(4)``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from _encoders import (
    assert_both_heads_export,
    assert_finetune_lowers_the_loss,
    assert_matches_reference,
    assert_megatron_split,
    assert_only_the_head_is_new,
    checkpoint_names,
    labelled,
    random_batch,
)
from _tiny import tiny_roberta_config

import jaxtl
from jaxtl.models.roberta import NAMES

PAD, BOS = 1, 0  # RoBERTa's <pad> and <s>
HEAD = [f"classifier/{m}/{p}" for m in ("dense", "out_proj") for p in ("bias", "kernel")]


def saved(path, model_class: str, **overrides) -> str:
    torch.manual_seed(0)
    getattr(transformers, model_class)(tiny_roberta_config(**overrides)).save_pretrained(path)
    return str(path)


def batch(seed: int = 0) -> dict:
    return random_batch(seed, pad_id=PAD, first_id=BOS)


def test_random_roberta_features_match_pytorch(tmp_path):
    src = saved(tmp_path, "RobertaModel")
    assert not any(n.startswith("roberta.") for n in checkpoint_names(src))  # no prefix
    # Every position, padded ones too (a pad token's position is pad_token_id's row); the text
    # pipeline's token_type_ids (zeros) are the same as none.
    zeros = np.zeros_like(batch()["input_ids"])
    model = assert_matches_reference(
        src, "AutoModel", batch(), task="features", token_type_ids=zeros
    )
    assert model.family == "roberta" and model.extras["max_length"] == 64
    assert not model.report.initialized


def test_roberta_refuses_sequences_past_its_numbered_positions(tmp_path):
    model = jaxtl.load(saved(tmp_path, "RobertaModel"), task="features")
    ids = np.full((1, 65), 5)
    with pytest.raises(ValueError, match=r"max_position_embeddings - pad_token_id - 1=64"):
        model.apply(model.params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})


@pytest.mark.parametrize(("task", "num_labels"), [("classification", 3), ("regression", 1)])
def test_roberta_for_sequence_classification_matches_pytorch(tmp_path, task, num_labels):
    src = saved(tmp_path, "RobertaForSequenceClassification", num_labels=num_labels)
    assert all(n.startswith(("roberta.", "classifier.")) for n in checkpoint_names(src))
    model = assert_matches_reference(src, "RobertaForSequenceClassification", batch(1), task=task)
    assert model.extras["pooling"] == "cls" and model.structure.head == ("classifier",)
    report = model.report
    assert not report.initialized and not report.unexpected and not report.mismatched


def test_base_checkpoint_for_classification_initializes_only_the_new_head(tmp_path):
    src = saved(tmp_path, "RobertaModel")  # add_pooling_layer=True: a pooler no head reads
    unexpected = ["roberta/pooler/dense/bias", "roberta/pooler/dense/kernel"]
    assert_only_the_head_is_new(src, batch(), HEAD, unexpected)


def test_export_round_trip_through_transformers(tmp_path):
    src = saved(tmp_path / "src", "RobertaModel")
    base = dict(add_pooling_layer=False)  # the export has no pooler
    assert_both_heads_export(
        src, tmp_path, "RobertaForSequenceClassification", "RobertaModel", batch(2), **base
    )


def test_converter_reads_both_prefixes_and_refuses_a_name_given_twice():
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    bare = {"encoder.layer.1.attention.self.query.weight": weight}
    prefixed = {f"roberta.{k}": v for k, v in bare.items()}
    path = "roberta/encoder/layer_1/attention/self/query/kernel"
    for tensors in (bare, prefixed):
        np.testing.assert_array_equal(NAMES.convert(tensors)[path], weight.T)
    head = NAMES.convert({"classifier.out_proj.weight": weight, "lm_head.bias": weight[0]})
    assert set(head) == {"classifier/out_proj/kernel", "lm_head.bias"}  # the MLM head: unread
    with pytest.raises(ValueError, match="twice"):
        NAMES.convert({**bare, **prefixed})


def test_tensor_parallel_layers_are_the_encoders_megatron_split(tmp_path):
    # An even MLP width: the tensor axis splits it in two.
    model = jaxtl.load(saved(tmp_path, "RobertaModel", intermediate_size=64), num_labels=2)
    column = ("attention/self/query", "attention/self/key", "attention/self/value")
    column += ("intermediate/dense",)
    assert_megatron_split(model, column, row=("attention/output/dense", "output/dense"))


# LoRA trains the mean-pooled head: in a random tiny base (weights ~ normal(0.02)) attention is
# nearly uniform and weak, so the first token's state barely reflects the others, and a frozen
# base leaves the first-token head little to learn from (measured: 0.695 -> 0.680 in 48 steps).
@pytest.mark.parametrize(("recipe", "pooling"), [("full", "cls"), ("lora(4)", "mean")])
def test_a_short_real_finetune_lowers_the_loss(tmp_path, recipe, pooling):
    model = jaxtl.load(saved(tmp_path, "RobertaModel"), num_labels=2, pooling=pooling)
    arrays = labelled(0, pad_id=PAD, first_id=BOS)
    arrays["token_type_ids"] = np.zeros_like(arrays["input_ids"])
    # LoRA's default targets: every block's query and value.
    targets = ("attention/self/query", "attention/self/value")
    assert_finetune_lowers_the_loss(model, recipe, arrays, lora_targets=targets)
