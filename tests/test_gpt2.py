"""Parity of jaxtl's Flax GPT-2 against transformers' PyTorch GPT-2 (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from jaxtl.models.gpt2 import convert_hf_checkpoint
from jaxtl.train.losses import mean_loss
from jaxtl.weights.loading import load

TOL = 1e-5  # float32 end to end; never loosened to make a test pass
PAD = 0


def tiny_gpt2_config(**overrides) -> transformers.GPT2Config:
    # bos/eos None: GPT2Config defaults them to 50256, outside this vocab.
    kwargs = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64)
    kwargs.update(bos_token_id=None, eos_token_id=None)
    kwargs.update(overrides)
    return transformers.GPT2Config(**kwargs)


def random_batch(seed: int = 0, batch: int = 3, length: int = 11, vocab: int = 99):
    """Random ids (never the pad id) with trailing padding of different lengths."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, length)).astype(np.int64)
    lengths = np.array([length, length - 4, 3])[:batch]
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": np.where(mask == 1, ids, PAD), "attention_mask": mask}


def torch_inputs(batch):
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def max_diff_real(ours, theirs, mask) -> float:
    """Max |diff| over real (unpadded) positions of ``[B, T, ...]`` outputs."""
    diff = np.abs(np.asarray(ours) - theirs.detach().numpy())
    return float(diff[mask.astype(bool)].max())


def test_random_gpt2_features_match_pytorch(tmp_path):
    torch.manual_seed(0)
    reference = transformers.GPT2Model(tiny_gpt2_config()).eval()
    reference.save_pretrained(tmp_path)
    batch = random_batch()

    model = load(tmp_path, task="features")
    assert model.family == "gpt2"
    assert not model.report.initialized and not model.report.unexpected
    ours = model.apply(model.params, {**batch, "token_type_ids": np.zeros_like(batch["input_ids"])})
    with torch.no_grad():
        theirs = reference(**torch_inputs(batch)).last_hidden_state

    assert ours.shape == tuple(theirs.shape) == (3, 11, 32)
    diff = max_diff_real(ours, theirs, batch["attention_mask"])
    print(f"random GPT2Model last hidden state max |diff| on real tokens = {diff:.3g}")
    assert diff <= TOL


def test_random_gpt2_lm_logits_match_pytorch(tmp_path):
    torch.manual_seed(1)
    reference = transformers.GPT2LMHeadModel(tiny_gpt2_config()).eval()
    reference.save_pretrained(tmp_path)
    batch = random_batch(seed=1)

    model = load(tmp_path, task="causal_lm")
    assert not model.report.initialized and not model.report.unexpected
    assert model.structure.head == ("transformer/ln_f",)  # tied LM: wte is not a head
    ours = model.apply(model.params, batch)
    with torch.no_grad():
        theirs = reference(**torch_inputs(batch)).logits

    assert ours.shape == tuple(theirs.shape) == (3, 11, 99)
    diff = max_diff_real(ours, theirs, batch["attention_mask"])
    print(f"random GPT2LMHeadModel logits max |diff| on real tokens = {diff:.3g}")
    assert diff <= TOL


def test_random_gpt2_for_sequence_classification_logits_match_pytorch(tmp_path):
    torch.manual_seed(2)
    config = tiny_gpt2_config(num_labels=3, pad_token_id=PAD)
    reference = transformers.GPT2ForSequenceClassification(config).eval()
    reference.save_pretrained(tmp_path)
    batch = random_batch(seed=2)

    model = load(tmp_path, task="classification", num_labels=3)
    assert model.structure.head == ("score",)
    assert "score/kernel" in model.report.loaded
    assert not model.report.initialized and not model.report.mismatched
    ours = model.apply(model.params, batch)
    with torch.no_grad():
        theirs = reference(**torch_inputs(batch)).logits

    assert ours.shape == tuple(theirs.shape) == (3, 3)
    diff = float(np.abs(np.asarray(ours) - theirs.numpy()).max())
    print(f"random GPT2ForSequenceClassification logits max |diff| = {diff:.3g}")
    assert diff <= TOL


def causal_lm_loss(logits, input_ids, attention_mask=None):
    """The trainer's next-token loss (jaxtl.train.losses.mean_loss), on a batch of these."""
    batch = {"input_ids": input_ids}
    if attention_mask is not None:
        batch["attention_mask"] = attention_mask
    return mean_loss(logits, batch, "causal_lm")


def test_causal_lm_loss_matches_pytorch_and_ignores_padding(tmp_path):
    torch.manual_seed(3)
    reference = transformers.GPT2LMHeadModel(tiny_gpt2_config()).eval()
    reference.save_pretrained(tmp_path)
    model = load(tmp_path, task="causal_lm")

    full = random_batch(seed=3, batch=2, length=9)
    full["attention_mask"][:] = 1
    full["input_ids"] = np.random.default_rng(3).integers(1, 99, size=(2, 9))
    ours = float(causal_lm_loss(model.apply(model.params, full), full["input_ids"]))
    ids = torch.from_numpy(full["input_ids"])
    with torch.no_grad():
        theirs = float(reference(input_ids=ids, labels=ids).loss)
    print(f"causal LM loss (unpadded): jaxtl {ours:.7f} transformers {theirs:.7f}")
    assert abs(ours - theirs) <= TOL

    padded = random_batch(seed=4)
    mask = padded["attention_mask"]
    loss = float(causal_lm_loss(model.apply(model.params, padded), padded["input_ids"], mask))
    labels = torch.from_numpy(np.where(mask == 1, padded["input_ids"], -100))
    with torch.no_grad():
        theirs = float(reference(**torch_inputs(padded), labels=labels).loss)
    print(f"causal LM loss (padded, -100 labels): jaxtl {loss:.7f} transformers {theirs:.7f}")
    assert abs(loss - theirs) <= TOL

    changed = dict(padded, input_ids=np.where(mask == 1, padded["input_ids"], 42))
    again = float(causal_lm_loss(model.apply(model.params, changed), changed["input_ids"], mask))
    assert again == loss


def test_lm_checkpoint_loaded_for_classification_initializes_only_score(tmp_path):
    torch.manual_seed(5)
    transformers.GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(tmp_path)

    model = load(tmp_path, task="classification", num_labels=4)
    report = model.report
    print(report.table())
    assert report.initialized == ["score/kernel"]
    assert not report.mismatched and not report.unexpected
    assert model.params["score"]["kernel"].shape == (32, 4)
    assert model.apply(model.params, random_batch(seed=6)).shape == (3, 4)


def test_converter_accepts_both_prefixes_and_drops_buffers_and_tied_head():
    conv1d = np.arange(12, dtype=np.float32).reshape(4, 3)  # Conv1D (in, out): not transposed
    bare = {
        "h.0.attn.c_attn.weight": conv1d,
        "h.0.attn.bias": np.ones((1, 1, 8, 8), bool),
        "h.0.attn.masked_bias": np.array(-1e4, np.float32),
        "ln_f.weight": np.ones(4, np.float32),
        "wte.weight": np.zeros((9, 4), np.float32),
    }
    prefixed = {f"transformer.{k}": v for k, v in bare.items()}
    prefixed["lm_head.weight"] = np.zeros((9, 4), np.float32)
    prefixed["score.weight"] = np.zeros((3, 4), np.float32)  # nn.Linear (out, in): transposed
    want = {
        "transformer/h_0/attn/c_attn/kernel",
        "transformer/ln_f/scale",
        "transformer/wte/embedding",
    }

    assert set(convert_hf_checkpoint(bare)) == want
    converted = convert_hf_checkpoint(prefixed)
    assert set(converted) == want | {"score/kernel"}
    np.testing.assert_array_equal(converted["transformer/h_0/attn/c_attn/kernel"], conv1d)
    assert converted["score/kernel"].shape == (4, 3)
    with pytest.raises(ValueError, match="twice"):
        convert_hf_checkpoint({**bare, **prefixed})
