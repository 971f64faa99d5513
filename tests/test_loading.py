"""jaxtl.load (jaxtl/weights/loading.py): load reports, sharded checkpoints, checked merges and
clear errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from _tiny import tiny_config

from jaxtl.models import family_for_config, list_models
from jaxtl.models.bert import convert_hf_checkpoint
from jaxtl.transfer.trees import flatten
from jaxtl.weights import merge_checkpoint, read_safetensors_dir, read_safetensors_file
from jaxtl.weights.loading import load, tokenizer

HEAD = ["classifier/bias", "classifier/kernel"]
POOLER = ["bert/pooler/dense/bias", "bert/pooler/dense/kernel"]


def save_tiny(directory, cls=transformers.BertModel, seed=0, **kwargs):
    torch.manual_seed(seed)
    cls(tiny_config(**kwargs)).save_pretrained(directory)
    return directory


def tiny_batch():
    ids = np.array([[2, 5, 7, 9, 3], [2, 8, 3, 0, 0]], np.int32)
    return {
        "input_ids": ids,
        "attention_mask": (ids > 0).astype(np.int32),
        "label": np.array([0, 1]),
    }


# --- load reports -------------------------------------------------------------------------------


def test_minilm_classification_report(minilm_dir):
    model = load(minilm_dir, task="classification", num_labels=2)
    report = model.report

    assert model.extras["pooling"] == "mean"
    assert sorted(report.initialized) == HEAD
    assert sorted(report.unexpected) == POOLER  # pooler unused under mean pooling: not an error
    assert report.mismatched == []
    body = [p for p in flatten(model.params) if not p.startswith("classifier/")]
    assert sorted(report.loaded) == sorted(body) and len(body) == 5 + 6 * 16

    assert model.structure.stem == ("bert/embeddings",)
    assert model.structure.blocks == tuple(f"bert/encoder/layer_{i}" for i in range(6))
    assert model.structure.neck == () and model.structure.head == ("classifier",)
    assert model.extras["max_length"] == 512
    assert model.params["classifier"]["kernel"].shape == (384, 2)

    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["initialized"] == report.initialized
    text = str(report)
    assert "initialized" in text and "classifier/kernel" in text and "bert/pooler" in text


def test_cls_pooling_on_minilm_loads_its_pooler(minilm_dir):
    model = load(minilm_dir, pooling="cls")
    assert set(POOLER) <= set(model.report.loaded)
    assert model.report.unexpected == [] and model.structure.neck == ("bert/pooler",)


def test_sharded_index_gives_identical_params(tmp_path):
    torch.manual_seed(0)
    reference = transformers.BertModel(tiny_config())
    reference.save_pretrained(tmp_path / "single")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    assert len(shards) > 1

    single = load(tmp_path / "single", task="features")
    sharded = load(tmp_path / "sharded", task="features")
    assert sharded.report.source.endswith("model.safetensors.index.json")
    assert sharded.report.loaded == single.report.loaded
    flat_a, flat_b = flatten(single.params), flatten(sharded.params)
    assert flat_a.keys() == flat_b.keys()
    for path in flat_a:
        np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg=path)


def test_missing_shard_is_reported(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(tiny_config()).save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load(tmp_path, task="features")


def test_classifier_with_other_label_count_is_reinitialized(tmp_path):
    save_tiny(tmp_path, transformers.BertForSequenceClassification, num_labels=3)
    ckpt = read_safetensors_dir(tmp_path)
    assert "bert.pooler.dense.weight" in ckpt and ckpt["classifier.weight"].shape == (3, 32)

    model = load(tmp_path, num_labels=2)
    report = model.report
    assert {m.path: (m.ckpt_shape, m.model_shape) for m in report.mismatched} == {
        "classifier/kernel": ((32, 3), (32, 2)),
        "classifier/bias": ((3,), (2,)),
    }
    assert set(POOLER) <= set(report.loaded) and report.unexpected == []
    assert model.params["classifier"]["kernel"].shape == (32, 2)
    assert "checkpoint (32, 3) vs model (32, 2)" in report.table()
    # Same label count: the checkpoint's head loads.
    same = load(tmp_path, num_labels=3)
    np.testing.assert_array_equal(same.params["classifier"]["kernel"], ckpt["classifier.weight"].T)


def test_head_is_reinitialized_as_a_unit():
    init = {
        "body": {"kernel": jnp.zeros((2, 2))},
        "head": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)},
    }
    ckpt = {
        "body/kernel": np.ones((2, 2), np.float32),
        "head/kernel": np.ones((2, 4), np.float32),
        "head/bias": np.ones(3, np.float32),  # fits, but belongs to a 4-way head
    }
    params, report = merge_checkpoint(init, ckpt, head=("head",))
    assert report.loaded == ["body/kernel"]
    assert report.initialized == ["head/bias"] and [m.path for m in report.mismatched] == [
        "head/kernel"
    ]
    np.testing.assert_array_equal(params["head"]["bias"], np.zeros(3))


def test_wrong_shape_outside_head_raises_with_key_shapes_and_option(tmp_path):
    save_tiny(tmp_path)
    tensors = read_safetensors_dir(tmp_path)
    name = "encoder.layer.1.attention.self.query.weight"
    tensors[name] = np.zeros((31, 32), np.float32)
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))

    with pytest.raises(ValueError) as excinfo:
        load(tmp_path, task="features")
    message = str(excinfo.value)
    for expected in (
        "bert/encoder/layer_1/attention/self/query/kernel",
        "(32, 31)",
        "(32, 32)",
        "ignore_mismatched",
    ):
        assert expected in message

    model = load(
        tmp_path, task="features", ignore_mismatched=(r".*layer_1/attention/self/query/.*",)
    )
    assert [m.path for m in model.report.mismatched] == [
        "bert/encoder/layer_1/attention/self/query/kernel"
    ]


def test_missing_param_outside_head_raises_unless_allowed(tmp_path):
    save_tiny(tmp_path)
    tensors = read_safetensors_dir(tmp_path)
    del tensors["pooler.dense.weight"], tensors["pooler.dense.bias"]
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))

    with pytest.raises(ValueError, match=r"(?s)bert/pooler/dense/kernel.*allow_missing"):
        load(tmp_path, pooling="cls")
    model = load(tmp_path, pooling="cls", allow_missing=(r"bert/pooler/.*",))
    assert sorted(model.report.initialized) == sorted(HEAD + POOLER)
    assert load(tmp_path, pooling="mean").report.unexpected == []  # no pooler needed at all


def test_old_gamma_beta_names_and_pretraining_heads(tmp_path):
    converted = convert_hf_checkpoint({
        "bert.embeddings.LayerNorm.gamma": np.ones(4),
        "bert.embeddings.LayerNorm.beta": np.zeros(4),
        "bert.embeddings.position_ids": np.arange(4)[None],
        "cls.predictions.bias": np.zeros(9),
    })  # fmt: skip
    assert sorted(converted) == [
        "bert/embeddings/LayerNorm/bias",
        "bert/embeddings/LayerNorm/scale",
        "cls.predictions.bias",
    ]


def test_bfloat16_checkpoint_reads_exactly(tmp_path):
    torch.manual_seed(0)
    reference = transformers.BertModel(tiny_config()).to(torch.bfloat16)
    reference.save_pretrained(tmp_path)
    tensors = read_safetensors_file(tmp_path / "model.safetensors")
    weight = reference.embeddings.word_embeddings.weight.float().detach().numpy()
    np.testing.assert_array_equal(
        tensors["embeddings.word_embeddings.weight"].astype(np.float32), weight
    )

    model = load(tmp_path, task="features")  # float32 model from a bf16 checkpoint
    embedding = model.params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert embedding.dtype == jnp.float32
    np.testing.assert_array_equal(embedding, weight)


# --- tasks, init, apply -------------------------------------------------------------------------


def test_pretrained_false_same_shapes_different_values(tmp_path):
    save_tiny(tmp_path, transformers.BertForSequenceClassification, num_labels=2)
    pretrained = load(tmp_path, num_labels=2)
    scratch = load(tmp_path, num_labels=2, pretrained=False)
    assert scratch.report is None

    shapes = lambda m: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), m.params)  # noqa: E731
    assert shapes(pretrained) == shapes(scratch)
    a, b = flatten(pretrained.params), flatten(scratch.params)
    assert not np.allclose(
        a["bert/encoder/layer_0/attention/self/query/kernel"],
        b["bert/encoder/layer_0/attention/self/query/kernel"],
    )
    # BERT init: normal(0.02) kernels, zero biases, unit LayerNorm scales.
    assert abs(float(np.std(b["bert/embeddings/word_embeddings/embedding"])) - 0.02) < 0.002
    assert not np.any(b["bert/encoder/layer_0/output/dense/bias"])
    np.testing.assert_array_equal(b["bert/encoder/layer_0/output/LayerNorm/scale"], 1.0)
    # Seeded: same seed same values, other seed other values.
    again = flatten(load(tmp_path, pretrained=False).params)
    other = flatten(load(tmp_path, pretrained=False, seed=1).params)
    np.testing.assert_array_equal(again["classifier/kernel"], b["classifier/kernel"])
    assert not np.allclose(other["classifier/kernel"], b["classifier/kernel"])


def test_tasks_outputs_and_dropout(tmp_path):
    save_tiny(tmp_path)
    batch = tiny_batch()

    features = load(tmp_path, task="features")
    assert "classifier" not in features.params and features.structure.head == ()
    assert features.num_labels == 0
    assert features.apply(features.params, batch).shape == (2, 5, 32)

    regression = load(tmp_path, task="regression", num_labels=5)
    assert regression.num_labels == 1
    assert regression.apply(regression.params, batch).shape == (2, 1)

    model = load(tmp_path, num_labels=4)
    eval_out = model.apply(model.params, batch)
    assert eval_out.shape == (2, 4)
    np.testing.assert_array_equal(eval_out, model.apply(model.params, batch))
    with pytest.raises(ValueError, match="rng"):
        model.apply(model.params, batch, train=True)
    train_out = model.apply(model.params, batch, train=True, rng=jax.random.key(0))
    assert not np.allclose(train_out, eval_out)

    too_long = {"input_ids": np.ones((1, 65), np.int32)}
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model.apply(model.params, too_long)


def test_tokenizer_from_vocab_txt_matches_tokenizer_json(minilm_dir, tmp_path):
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(minilm_dir, name), tmp_path / name)
    built, shipped = tokenizer(tmp_path), tokenizer(minilm_dir)
    shipped.no_padding()  # MiniLM's tokenizer.json pads every encoding to 128
    for text in ("Hello, World! Transfer learning in JAX.", "Ünïcödé café naïve"):
        assert built.encode(text).ids == shipped.encode(text).ids


# --- clear errors -------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*local Hugging Face"):
        load(tmp_path / "nope")


def test_missing_config(tmp_path):
    save_tiny(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"(?s)No config\.json.*model\.safetensors"):
        load(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "t5", "architectures": ["T5Model"]})
    )
    with pytest.raises(ValueError, match=r"(?s)'t5'.*Supported model_type values: bert"):
        load(tmp_path)


def test_no_safetensors_mentions_pytorch_bin(tmp_path):
    save_tiny(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(
        FileNotFoundError, match=r"(?s)expected model\.safetensors.*pretrained=False"
    ):
        load(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(
        FileNotFoundError, match=r"(?s)pytorch_model\.bin.*not read .*save_pretrained"
    ):
        load(tmp_path)
    assert load(tmp_path, pretrained=False).report is None  # no weights needed from scratch


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_labels": 0}, r"num_labels \(--num-labels\) must be an integer >= 1.*got 0"),
        ({"num_labels": 2.0}, r"num_labels \(--num-labels\) must be an integer"),
        ({"task": "detection"}, r"Unknown task 'detection'.*classification"),
        (
            {"task": "segmentation"},
            r"'bert' family has no 'segmentation' head \(task / --task\); "
            r"it supports .* Families with a 'segmentation' head: vit, resnet, convnext\.",
        ),
        ({"pooling": "max"}, r"pooling='max' is not supported"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, pattern):
    save_tiny(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        load(tmp_path, **kwargs)


def test_registry():
    assert [m["family"] for m in list_models()][:2] == ["bert", "gpt2"]
    assert "classification" in list_models()[0]["heads"]
    assert family_for_config({"architectures": ["BertForMaskedLM"]}).name == "bert"
    assert family_for_config({"model_type": "qwen2"}).name == "llama"
    with pytest.raises(ValueError, match="t5"):
        family_for_config({"model_type": "t5"})
