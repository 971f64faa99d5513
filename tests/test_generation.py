"""jaxtl.generation against transformers' ``generate`` and logits warpers (the independent
reference): greedy tokens on padded batches with and without the KV cache, eos stopping,
top-k/top-p filtering, seeded sampling, and one compile per prompt shape."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from test_gpt2 import tiny_gpt2_config
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaxtl import generation
from jaxtl.generation import Sampling, filter_logits, generate
from jaxtl.weights.loading import load

PAD = 0
NEW = 12


def _reference(tmp_path, eos=None):
    """A tiny random GPT-2 LM (weights large enough that greedy text does not just repeat one
    token), saved for jaxtl to load."""
    torch.manual_seed(4)
    config = tiny_gpt2_config(initializer_range=0.3, eos_token_id=eos)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path)
    return reference


def _prompts(seed=5):
    """Three prompts of 7, 4 and 2 tokens, left-padded to 7 with PAD."""
    ids = np.random.default_rng(seed).integers(1, 99, size=(3, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return np.where(mask == 1, ids, PAD), mask


def _hf_greedy(reference, ids, mask, eos=None):
    with torch.no_grad():
        return reference.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=NEW,
            pad_token_id=PAD,
            eos_token_id=eos,
        ).numpy()


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_greedy_tokens_equal_transformers_on_a_padded_batch(tmp_path, use_cache):
    reference = _reference(tmp_path)
    ids, mask = _prompts()
    theirs = _hf_greedy(reference, ids, mask)
    assert theirs.shape == (3, 7 + NEW)
    assert len(set(theirs[0, 7:].tolist())) > 3  # the check covers more than a repeated token

    ours = generate(
        load(tmp_path, task="causal_lm"),
        None,
        ids,
        mask,
        max_new_tokens=NEW,
        pad_token_id=PAD,
        use_cache=use_cache,
    )
    np.testing.assert_array_equal(ours, theirs)


def test_rows_stop_at_the_configs_eos_and_are_padded_like_transformers(tmp_path):
    ids, mask = _prompts()
    free = _hf_greedy(_reference(tmp_path), ids, mask)
    eos = int(free[0, 7 + 3])  # row 0 ends at its 4th new token; the others when they meet it
    reference = _reference(tmp_path, eos=eos)  # same weights, eos in config.json
    theirs = _hf_greedy(reference, ids, mask, eos=eos)

    ours = generate(
        load(tmp_path, task="causal_lm"), None, ids, mask, max_new_tokens=NEW, pad_token_id=PAD
    )
    width = theirs.shape[1]  # transformers stops when every row has ended
    np.testing.assert_array_equal(ours[:, :width], theirs)
    assert (ours[:, width:] == PAD).all()
    assert (ours[0, 7 + 4 :] == PAD).all() and ours[0, 7 + 3] == eos


def test_right_padded_prompts_continue_as_left_padded_ones(tmp_path):
    _reference(tmp_path)
    model = load(tmp_path, task="causal_lm")
    ids, mask = _prompts()
    right_ids = np.zeros_like(ids)
    right_mask = np.zeros_like(mask)
    for row in range(3):
        real = ids[row][mask[row] == 1]
        right_ids[row, : len(real)], right_mask[row, : len(real)] = real, 1
    kwargs = dict(max_new_tokens=NEW, pad_token_id=PAD)
    np.testing.assert_array_equal(
        generate(model, None, right_ids, right_mask, **kwargs),
        generate(model, None, ids, mask, **kwargs),
    )


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, 10, 0.9), (1.3, None, 0.5), (1.0, 5, 1.0), (0.5, 1, 0.95)]
)
def test_filtering_keeps_what_transformers_warpers_keep(temperature, top_k, top_p):
    logits = (np.random.default_rng(0).normal(size=(4, 50)) * 3).astype(np.float32)
    ours = np.asarray(
        filter_logits(logits, np.float32(temperature), np.float32(top_p), top_k=top_k)
    )
    theirs = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits))
    if top_k is not None:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    theirs = theirs.numpy()
    kept = ours > np.finfo(np.float32).min
    np.testing.assert_array_equal(kept, np.isfinite(theirs))
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)


def test_sampling_is_reproducible_from_its_seed_and_stays_in_the_top_k(tmp_path):
    _reference(tmp_path)
    model = load(tmp_path, task="causal_lm")
    ids, mask = _prompts()
    sampling = Sampling(temperature=1.0, top_k=4)

    def sample(seed):
        return generate(model, None, ids, mask, max_new_tokens=NEW, sampling=sampling, seed=seed)

    first = sample(1)
    np.testing.assert_array_equal(first, sample(1))
    assert (first != sample(2)).any()
    assert (first != generate(model, None, ids, mask, max_new_tokens=NEW)).any()  # not greedy

    # Teacher-forced logits of each row's text (alone, without its padding): every new token
    # was among the 4 most likely.
    for row in range(3):
        real = first[row][np.concatenate([mask[row], np.ones(NEW, int)]) == 1]
        row_logits = np.asarray(model.apply(model.params, {"input_ids": real[None]}))[0]
        prompt = int(mask[row].sum())
        for t in range(prompt, len(real)):
            rank = (row_logits[t - 1] > row_logits[t - 1, real[t]]).sum()
            assert rank < 4, (row, t, rank)


def test_one_compile_per_prompt_shape_and_settings_none_per_token(tmp_path):
    _reference(tmp_path)
    model = load(tmp_path, task="causal_lm")
    ids, mask = _prompts()
    before = generation._generate._cache_size()
    generate(model, None, ids, mask, max_new_tokens=NEW)
    assert generation._generate._cache_size() == before + 1
    # Other prompts of the same shape, another seed or temperature: the same executable.
    generate(model, None, ids[::-1].copy(), mask[::-1].copy(), max_new_tokens=NEW)
    generate(model, None, ids, mask, max_new_tokens=NEW, sampling=Sampling(0.8), seed=3)
    generate(model, None, ids, mask, max_new_tokens=NEW, sampling=Sampling(1.5), seed=4)
    assert generation._generate._cache_size() == before + 2  # greedy and sampling


def test_bad_requests_are_refused_with_the_fix(tmp_path):
    _reference(tmp_path)
    lm = load(tmp_path, task="causal_lm")
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="task='causal_lm'"):
        generate(load(tmp_path, task="features"), None, ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"exceeds the model's 64 positions.*--max-new-tokens"):
        generate(lm, None, ids, mask, max_new_tokens=60)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, None, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        generate(lm, None, ids, mask[:, :3], max_new_tokens=2)
    with pytest.raises(ValueError, match="rows have different lengths; pad them to one length"):
        generate(lm, None, [[1, 2, 3], [4, 5]], max_new_tokens=2)
    vocab = lm.config.vocab_size
    with pytest.raises(ValueError, match=rf"input_ids \(--token-ids\) hold \[{vocab}\], outside "
                       rf"the model's {vocab} token ids \[0, {vocab}\); tokenize"):  # fmt: skip
        generate(lm, None, np.where(mask == 1, vocab, ids), mask, max_new_tokens=2)
    assert generate(lm, None, np.where(mask == 0, -7, ids), mask, max_new_tokens=1).shape[0] == 3
    with pytest.raises(ValueError, match=rf"pad_token_id={vocab} is outside"):
        generate(lm, None, ids, mask, max_new_tokens=2, pad_token_id=vocab)
    with pytest.raises(ValueError, match=r"Rows \[1\] have no tokens"):
        generate(lm, None, ids, np.where(np.arange(3)[:, None] == 1, 0, mask), max_new_tokens=2)
    with pytest.raises(ValueError, match="--top-p"):
        Sampling(1.0, top_p=0.0)
    with pytest.raises(ValueError, match="--temperature"):
        Sampling(-1.0)
    for cut in ({"top_k": 4}, {"top_p": 0.9}):  # greedy would ignore them
        with pytest.raises(ValueError, match=r"temperature=0 \(--temperature, 0 by default\)"):
            Sampling(**cut)


def test_cli_generates_from_token_ids_like_the_python_call(tmp_path, capsys):
    from jaxtl import cli

    _reference(tmp_path / "lm")
    out = tmp_path / "g.json"
    argv = ["generate", str(tmp_path / "lm"), "--token-ids", "5,6,7", "--token-ids", "8"]
    assert cli.main([*argv, "--max-new-tokens", "4", "--json", str(out)]) == 0
    assert "4 new tokens at most, greedy" in capsys.readouterr().out
    model = load(tmp_path / "lm", task="causal_lm")
    expected = generate(
        model, None, [[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]], max_new_tokens=4
    )
    written = json.loads(out.read_text())
    assert [r["new_ids"] for r in written] == expected[:, 3:].tolist()
    assert [r["prompt_ids"] for r in written] == [[5, 6, 7], [8]]

    assert cli.main(["generate", str(tmp_path / "lm"), "--prompt", "hello"]) == 2
    assert "no tokenizer.json: give the prompts as ids (--token-ids)" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path / "lm"), "--token-ids", "5,x"]) == 2
    assert "--token-ids takes comma-separated integers" in capsys.readouterr().err
    assert cli.main([*argv, "--seed", "0"]) == 2
    assert "--seed 0 seeds sampling, and --temperature 0" in capsys.readouterr().err
    assert cli.main([*argv, "--checkpoint", "best"]) == 2
    assert "is a model directory (it has no run.json); drop --checkpoint" in (
        capsys.readouterr().err
    )


def test_a_lora_model_generates_what_its_adapted_forward_predicts(tmp_path):
    import jax

    import jaxtl

    _reference(tmp_path)
    model = load(tmp_path, task="causal_lm")
    adapted = jaxtl.lora.adapt(model, jaxtl.lora.LoRA(rank=4, alpha=8.0), seed=1)
    # Trained-looking adapters: lora_b away from its zero init, so they change the outputs.
    keys = iter(jax.random.split(jax.random.PRNGKey(7), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jax.random.normal(next(keys), x.shape) * 0.5
            if "lora_b" in jax.tree_util.keystr(path)
            else x
        ),
        adapted.params,
    )
    ids, mask = _prompts()
    out = generate(adapted, params, ids[:1], mask[:1], max_new_tokens=NEW)
    assert (out != generate(model, None, ids[:1], mask[:1], max_new_tokens=NEW)).any()
    # Greedy: each new token is the argmax of the adapted model's own forward (the LoRA
    # interceptor, not the merged kernels generate decodes with) on the text before it.
    logits = np.asarray(adapted.apply(params, {"input_ids": out}))[0]
    np.testing.assert_array_equal(out[0, 7:], logits[6:-1].argmax(-1))
