"""Parity of jaxtl's Flax DistilBERT against transformers' PyTorch DistilBERT (the independent
reference): features (learned and sinusoidal positions), both heads, the load report of a new
head, the export round trip, and a short real training run under ``full`` and ``lora(4)``."""

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
from _tiny import tiny_distilbert_config

import jaxtl
from jaxtl.models.distilbert import NAMES, DistilBertConfig

PAD = 0  # DistilBERT's [PAD]


def saved(path, model_class: str, **overrides) -> str:
    torch.manual_seed(0)
    getattr(transformers, model_class)(tiny_distilbert_config(**overrides)).save_pretrained(path)
    return str(path)


def batch(seed: int = 0) -> dict:
    return random_batch(seed, pad_id=PAD)


@pytest.mark.parametrize("sinusoidal", [False, True])
def test_random_distilbert_features_match_pytorch(tmp_path, sinusoidal):
    src = saved(tmp_path, "DistilBertModel", sinusoidal_pos_embds=sinusoidal)
    assert not any(n.startswith("distilbert.") for n in checkpoint_names(src))  # no prefix
    # A text batch's token_type_ids stay out: DistilBERT has no token types.
    ones = np.ones_like(batch()["input_ids"])
    model = assert_matches_reference(
        src, "AutoModel", batch(), task="features", token_type_ids=ones
    )
    assert model.family == "distilbert" and model.extras["max_length"] == 64
    assert not model.report.initialized and not model.report.unexpected


def test_a_sinusoidal_table_not_read_from_the_checkpoint_is_transformers_sinusoids(tmp_path):
    src = saved(tmp_path, "DistilBertModel", sinusoidal_pos_embds=True)
    scratch = jaxtl.load(src, task="features", pretrained=False)
    table = scratch.params["distilbert"]["embeddings"]["position_embeddings"]["embedding"]
    reference = transformers.DistilBertModel.from_pretrained(src)
    theirs = reference.embeddings.position_embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(table), theirs)


@pytest.mark.parametrize(("task", "num_labels"), [("classification", 3), ("regression", 1)])
def test_distilbert_for_sequence_classification_matches_pytorch(tmp_path, task, num_labels):
    src = saved(tmp_path, "DistilBertForSequenceClassification", num_labels=num_labels)
    heads = ("distilbert.", "pre_classifier.", "classifier.")
    assert all(n.startswith(heads) for n in checkpoint_names(src))
    reference = "DistilBertForSequenceClassification"
    model = assert_matches_reference(src, reference, batch(1), task=task)
    assert model.extras["pooling"] == "cls"
    assert model.structure.head == ("pre_classifier", "classifier")
    report = model.report
    assert not report.initialized and not report.unexpected and not report.mismatched


def test_base_checkpoint_for_classification_initializes_only_the_new_head(tmp_path):
    head = [f"{m}/{p}" for m in ("classifier", "pre_classifier") for p in ("bias", "kernel")]
    assert_only_the_head_is_new(saved(tmp_path, "DistilBertModel"), batch(), head)


def test_export_round_trip_through_transformers(tmp_path):
    src = saved(tmp_path / "src", "DistilBertModel")
    assert_both_heads_export(
        src, tmp_path, "DistilBertForSequenceClassification", "DistilBertModel", batch(2)
    )


def test_converter_reads_both_prefixes_and_refuses_a_name_given_twice():
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    bare = {
        "transformer.layer.1.attention.q_lin.weight": weight,
        "transformer.layer.1.sa_layer_norm.weight": weight[0],
        "embeddings.position_ids": np.arange(4)[None],  # a buffer older versions saved
    }
    prefixed = {f"distilbert.{k}": v for k, v in bare.items()}
    layer = "distilbert/transformer/layer_1"
    want = {f"{layer}/attention/q_lin/kernel", f"{layer}/sa_layer_norm/scale"}
    for tensors in (bare, prefixed):
        converted = NAMES.convert(tensors)
        assert set(converted) == want
        np.testing.assert_array_equal(converted[f"{layer}/attention/q_lin/kernel"], weight.T)
    mlm = NAMES.convert({"vocab_projector.weight": weight, "pre_classifier.weight": weight})
    assert set(mlm) == {"vocab_projector.weight", "pre_classifier/kernel"}  # MLM head: unread
    with pytest.raises(ValueError, match="twice"):
        NAMES.convert({**bare, **prefixed})


def test_config_refuses_what_the_encoder_does_not_implement():
    with pytest.raises(ValueError, match="activation='swiglu' is not supported"):
        DistilBertConfig.from_hf({"activation": "swiglu"})
    with pytest.raises(ValueError, match="dim=30 is not a multiple of n_heads=4"):
        DistilBertConfig.from_hf({"dim": 30, "n_heads": 4})


def test_tensor_parallel_layers_are_the_encoders_megatron_split(tmp_path):
    # An even FFN width: the tensor axis splits it in two.
    model = jaxtl.load(saved(tmp_path, "DistilBertModel", hidden_dim=64), num_labels=2)
    column = ("attention/q_lin", "attention/k_lin", "attention/v_lin", "ffn/lin1")
    assert_megatron_split(model, column, row=("attention/out_lin", "ffn/lin2"))


# LoRA trains the mean-pooled head, as in test_roberta.py: a frozen random tiny base gives a
# first-token head little to learn from.
@pytest.mark.parametrize(("recipe", "pooling"), [("full", "cls"), ("lora(4)", "mean")])
def test_a_short_real_finetune_lowers_the_loss(tmp_path, recipe, pooling):
    model = jaxtl.load(saved(tmp_path, "DistilBertModel"), num_labels=2, pooling=pooling)
    arrays = labelled(0, pad_id=PAD, first_id=None)
    # LoRA's default targets: every block's q_lin and v_lin (PEFT's default for DistilBERT).
    targets = ("attention/q_lin", "attention/v_lin")
    assert_finetune_lowers_the_loss(model, recipe, arrays, lora_targets=targets)
