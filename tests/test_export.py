"""Export round trips: jaxtl writes a model in its source format, and the independent reference
(transformers' PyTorch classes) loads the files and computes the same outputs as jaxtl.

Vision families have their own round-trip tests next to their parity tests (test_vit.py,
test_resnet.py, test_efficientnet.py).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers
from _tiny import perturbed, read_json, tiny_config

import jaxtl
from jaxtl.transfer.trees import flatten

TOL = 1e-5  # float32, as in the parity tests


def text_batch(vocab=99, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def torch_logits(model, batch):
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in batch.items()})
    return out.logits.numpy()


def test_bert_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(tiny_config()).save_pretrained(tmp_path / "src")
    model = jaxtl.load(tmp_path / "src", num_labels=3, pooling="cls")
    tuned = perturbed(model.params)
    out = jaxtl.export(model, tmp_path / "out", tuned)

    config = read_json(os.path.join(out, "config.json"))
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["num_labels"] == 3
    reference = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    batch = text_batch()
    ours = np.asarray(
        model.apply(tuned, {**batch, "token_type_ids": np.zeros_like(batch["input_ids"])})
    )
    assert np.abs(ours - torch_logits(reference, batch)).max() <= TOL

    # And jaxtl reads its own export back to the same tree.
    again = jaxtl.load(out, num_labels=3, pooling="cls")
    assert again.report.initialized == [] and again.report.unexpected == []
    for path, value in flatten(again.params).items():
        np.testing.assert_array_equal(np.asarray(value), flatten(tuned)[path])


def test_bert_mean_pooled_head_exports_encoder_and_head(tmp_path):
    """HF has no mean-pooling classifier class: the encoder goes out as a BertModel that
    transformers loads exactly, and the head travels in the same file for jaxtl."""
    torch.manual_seed(0)
    transformers.BertModel(tiny_config(), add_pooling_layer=False).save_pretrained(tmp_path / "s")
    model = jaxtl.load(tmp_path / "s", num_labels=2, pooling="mean")
    tuned = perturbed(model.params)
    out = jaxtl.export(model, tmp_path / "out", tuned)
    assert read_json(os.path.join(out, "config.json"))["architectures"] == ["BertModel"]

    encoder = transformers.BertModel.from_pretrained(out, add_pooling_layer=False).eval()
    features = jaxtl.load(out, task="features")
    batch = text_batch()
    with torch.no_grad():
        theirs = encoder(**{k: torch.from_numpy(v) for k, v in batch.items()})[0].numpy()
    ours = np.asarray(features.apply(features.params, batch))
    real = batch["attention_mask"].astype(bool)
    assert np.abs(ours - theirs)[real].max() <= TOL

    again = jaxtl.load(out, num_labels=2, pooling="mean")
    assert again.report.initialized == []
    np.testing.assert_array_equal(
        np.asarray(again.params["classifier"]["kernel"]), tuned["classifier"]["kernel"]
    )


@pytest.mark.parametrize(
    ("task", "cls"),
    [("classification", "GPT2ForSequenceClassification"), ("causal_lm", "GPT2LMHeadModel")],
)
def test_gpt2_round_trip(tmp_path, task, cls):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=99,
        n_positions=64,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    transformers.GPT2Model(config).save_pretrained(tmp_path / "src")
    model = jaxtl.load(tmp_path / "src", task=task, num_labels=4)
    tuned = perturbed(model.params)
    out = jaxtl.export(model, tmp_path / "out", tuned)
    reference = getattr(transformers, cls).from_pretrained(out).eval()
    batch = text_batch()
    ours = np.asarray(model.apply(tuned, batch))
    theirs = torch_logits(reference, batch)
    if task == "causal_lm":
        real = batch["attention_mask"].astype(bool)
        assert np.abs(ours - theirs)[real].max() <= TOL
    else:
        assert np.abs(ours - theirs).max() <= TOL


def test_export_refuses_to_overwrite_and_checks_the_tree(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(tiny_config()).save_pretrained(tmp_path / "src")
    model = jaxtl.load(tmp_path / "src", num_labels=2, pooling="cls")
    jaxtl.export(model, tmp_path / "out")
    before = os.path.getmtime(tmp_path / "out" / "model.safetensors")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jaxtl.export(model, tmp_path / "out")
    assert os.path.getmtime(tmp_path / "out" / "model.safetensors") == before
    (tmp_path / "notes.txt").write_text("kept")
    for overwrite in (False, True):  # an export is a directory: a file there is not replaced
        with pytest.raises(FileExistsError, match="notes.txt is a file; an export is a directory"):
            jaxtl.export(model, tmp_path / "notes.txt", overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "kept"
    with pytest.raises(
        ValueError, match=r"notes.txt/sub' cannot be written \(.*notes.txt is a file"
    ):
        jaxtl.export(model, tmp_path / "notes.txt" / "sub")  # before: NotADirectoryError
    with pytest.raises(FileExistsError, match=r"pass overwrite=True \(--overwrite\)"):
        jaxtl.export(model, tmp_path / "out")
    wrong = {**model.params, "classifier": {"kernel": np.zeros((32, 5)), "bias": np.zeros(5)}}
    with pytest.raises(ValueError, match="do not match"):
        jaxtl.export(model, tmp_path / "other", wrong)
