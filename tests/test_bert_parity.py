"""Parity of jaxtl's Flax BERT against transformers' PyTorch BERT (the independent reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _tiny import tiny_config

from jaxtl.models.bert import convert_hf_checkpoint, mean_pool
from jaxtl.transfer.trees import flatten
from jaxtl.weights.loading import load

TOL = 1e-5  # float32 end to end; never loosened to make a test pass


def random_batch(seed: int = 0, batch: int = 3, length: int = 11, vocab: int = 99):
    """Random ids with trailing padding of different lengths, and two token-type segments."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, length)).astype(np.int64)
    lengths = np.array([length, length - 4, 3])[:batch]
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask  # pad id 0 where masked, as a tokenizer would
    types = (np.arange(length)[None, :] >= lengths[:, None] // 2).astype(np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def torch_inputs(batch):
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs.detach().numpy())))


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "relu"])
def test_random_bert_features_match_pytorch(tmp_path, hidden_act):
    torch.manual_seed(0)
    reference = transformers.BertModel(tiny_config(hidden_act=hidden_act)).eval()
    reference.save_pretrained(tmp_path)
    batch = random_batch()

    model = load(tmp_path, task="features")
    ours = model.apply(model.params, batch)
    with torch.no_grad():
        theirs = reference(**torch_inputs(batch)).last_hidden_state

    assert ours.shape == tuple(theirs.shape) == (3, 11, 32)
    diff = max_diff(ours, theirs)
    print(f"random BertModel ({hidden_act}) last hidden state max |diff| = {diff:.3g}")
    assert diff <= TOL


def test_random_bert_for_sequence_classification_logits_match_pytorch(tmp_path):
    torch.manual_seed(0)
    reference = transformers.BertForSequenceClassification(tiny_config(num_labels=3)).eval()
    reference.save_pretrained(tmp_path)
    batch = random_batch(seed=1)

    model = load(tmp_path, task="classification", num_labels=3)
    assert model.extras["pooling"] == "cls"
    assert model.structure.neck == ("bert/pooler",)
    assert not model.report.initialized and not model.report.mismatched
    ours = model.apply(model.params, batch)
    with torch.no_grad():
        theirs = reference(**torch_inputs(batch)).logits

    assert ours.shape == (3, 3)
    diff = max_diff(ours, theirs)
    print(f"random BertForSequenceClassification logits max |diff| = {diff:.3g}")
    assert diff <= TOL


def test_missing_token_type_ids_default_to_zeros_like_pytorch(tmp_path):
    torch.manual_seed(0)
    reference = transformers.BertModel(tiny_config()).eval()
    reference.save_pretrained(tmp_path)
    batch = random_batch(seed=2)
    del batch["token_type_ids"]

    model = load(tmp_path, task="features")
    with torch.no_grad():
        theirs = reference(**torch_inputs(batch)).last_hidden_state
    assert max_diff(model.apply(model.params, batch), theirs) <= TOL


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "JAX transforms compose: jit, grad, vmap.",
    "Short one.",
    "Transfer learning reuses what a pretrained encoder already knows about language.",
]


def minilm_batch(model):
    tok = model.extras["tokenizer"]
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tok.encode_batch(SENTENCES)
    batch = {
        "input_ids": np.array([e.ids for e in encodings], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int64),
    }
    assert not batch["attention_mask"].all(), "the batch must contain padding"
    return batch


def test_minilm_last_hidden_state_matches_pytorch(minilm_dir):
    model = load(minilm_dir, task="features")
    assert model.extras["pooling"] == "mean"  # from 1_Pooling/config.json
    assert model.extras["tokenizer_file"].endswith("tokenizer.json")
    batch = minilm_batch(model)
    mask = batch["attention_mask"].astype(bool)

    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        theirs = reference(**torch_inputs(batch)).last_hidden_state.numpy()
    ours = np.asarray(model.apply(model.params, batch))

    diff_real = float(np.abs(ours - theirs)[mask].max())
    print(f"MiniLM float32 last hidden state max |diff| on real tokens = {diff_real:.3g}")
    assert diff_real <= TOL
    # Padded positions are not compared in float32: their outputs are ill-conditioned (measured:
    # PyTorch's own float32 eager and sdpa paths differ from its float64 result by 3.1e-5 and
    # 3.5e-5 there). test_minilm_float64_matches_pytorch_at_every_position covers them exactly.

    # Mean pooling as sentence-transformers defines it, computed independently in torch.
    t_hidden, t_mask = torch.from_numpy(theirs), torch.from_numpy(mask).float()[..., None]
    t_pooled = (t_hidden * t_mask).sum(1) / t_mask.sum(1).clamp(min=1e-9)
    assert max_diff(mean_pool(ours, batch["attention_mask"]), t_pooled) <= TOL


def test_minilm_float64_matches_pytorch_at_every_position(minilm_dir):
    """In float64 rounding noise vanishes, so padded positions must agree too."""
    with jax.enable_x64(True):
        model = load(minilm_dir, task="features", dtype=jnp.float64)
        batch = minilm_batch(model)
        ours = np.asarray(model.apply(model.params, batch))
    assert ours.dtype == np.float64

    reference = transformers.BertModel.from_pretrained(minilm_dir).eval().double()
    with torch.no_grad():
        theirs = reference(**torch_inputs(batch)).last_hidden_state.numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"MiniLM float64 last hidden state max |diff| at all positions = {diff:.3g}")
    assert diff <= 1e-10


def test_random_bert_gradients_match_pytorch(tmp_path):
    """Every param's gradient of a loss on the last hidden state equals transformers' (eval
    mode: no dropout). On CPU jaxtl's Dense writes its own backward pass
    (:class:`jaxtl.models.layers.Dense`), so the gradients, not only the outputs, are checked
    against the independent implementation."""
    torch.manual_seed(0)
    reference = transformers.BertModel(tiny_config()).eval()
    reference.save_pretrained(tmp_path)
    batch = random_batch(seed=2)
    # Real positions only: torch never gives the [PAD] embedding a gradient (padding_idx).
    weights = np.random.default_rng(0).standard_normal((3, 11, 32)).astype(np.float32)
    weights *= batch["attention_mask"][..., None]

    model = load(tmp_path, task="features")
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, batch) * weights))(model.params)
    (
        reference(**torch_inputs(batch)).last_hidden_state * torch.from_numpy(weights)
    ).sum().backward()
    theirs = convert_hf_checkpoint(
        {n: p.grad.numpy() for n, p in reference.named_parameters() if p.grad is not None}
    )

    ours = flatten(grads)
    assert set(ours) == set(theirs)
    kernels = [p for p in ours if p.endswith("/kernel")]
    assert len(kernels) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    for path, value in ours.items():
        scale = max(1.0, float(np.max(np.abs(theirs[path]))))
        diff = float(np.max(np.abs(np.asarray(value) - theirs[path])))
        assert diff <= TOL * scale, f"{path}: max |diff| {diff:.3g} (largest gradient {scale:.3g})"
