"""Causal-LM fine-tuning of GPT-2 through the Trainer, the run directory and the CLI.

The reference for the loss is transformers' PyTorch ``GPT2LMHeadModel`` on the same weights:
its token cross-entropy with padded targets set to -100 (summed with ``reduction="sum"``, so
that jaxtl's count over batches, padding rows and devices is checked token for token).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from _tiny import evaluate, fit, read_json
from test_gpt2 import PAD, tiny_gpt2_config

import jaxtl
from jaxtl import cli
from jaxtl.generation import generate
from jaxtl.train import Trainer


def _save_lm(path, seed: int = 0, **config) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    reference = transformers.GPT2LMHeadModel(tiny_gpt2_config(**config)).eval()
    reference.save_pretrained(path)
    return reference


def _padded_set(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` rows of random ids with trailing padding of varied lengths (>= 2 real tokens)."""
    rng = np.random.default_rng(seed)
    length = 10
    real = rng.integers(2, length + 1, size=n)
    mask = (np.arange(length)[None, :] < real[:, None]).astype(np.int32)
    ids = rng.integers(1, 99, size=(n, length)).astype(np.int32)
    return {"input_ids": np.where(mask == 1, ids, PAD), "attention_mask": mask}


def test_lm_evaluation_counts_every_real_target_token_once(tmp_path):
    reference = _save_lm(tmp_path, seed=1)
    model = jaxtl.load(tmp_path, task="causal_lm")
    data = _padded_set(7, seed=2)  # eval batches of 4: the last one has a padding row
    config = jaxtl.TrainConfig(eval_batch_size=4, progress=False)
    trainer = Trainer(model, jaxtl.make_plan("full", model.structure), config)
    ours = evaluate(trainer, trainer.init_state(1), data)

    ids = torch.from_numpy(data["input_ids"]).long()
    mask = torch.from_numpy(data["attention_mask"]).long()
    labels = torch.where(mask == 1, ids, -100)
    with torch.no_grad():
        logits = reference(input_ids=ids, attention_mask=mask).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    tokens = int(data["attention_mask"][:, 1:].sum())
    theirs = float(nll) / tokens
    print(f"LM eval loss over {tokens} tokens: jaxtl {ours['loss']:.7f} transformers {theirs:.7f}")
    assert ours["examples"] == 7 and ours["tokens"] == tokens
    assert abs(ours["loss"] - theirs) <= 1e-5
    assert ours["perplexity"] == pytest.approx(np.exp(ours["loss"]), rel=1e-12)


def _fit(model, recipe: str, arrays: dict, steps: int):
    config = jaxtl.TrainConfig(
        max_steps=steps, batch_size=4, learning_rate=1e-2, schedule="constant", progress=False
    )
    return fit(Trainer(model, jaxtl.make_plan(recipe, model.structure), config), arrays)


def test_lm_fine_tuning_ignores_padding_and_learns_the_sequences(tmp_path):
    _save_lm(tmp_path, seed=2)
    model = jaxtl.load(tmp_path, task="causal_lm")
    arrays = _padded_set(8, seed=3)
    arrays["input_ids"][:, :4] = np.random.default_rng(4).integers(1, 99, size=(8, 4))
    arrays["attention_mask"][:, :4] = 1  # every sequence has a 4-token prompt
    fit = _fit(model, "full", arrays, steps=150)

    # Padding is out of the loss: other pad ids give bitwise the same training run.
    other = dict(arrays, input_ids=np.where(arrays["attention_mask"] == 1, arrays["input_ids"], 42))
    again = _fit(model, "full", other, steps=150)
    for a, b in zip(jax_leaves(fit.state.params), jax_leaves(again.state.params), strict=True):
        np.testing.assert_array_equal(a, b)

    # The fine-tuned LM continues each training prompt with the tokens it was trained on.
    lengths = arrays["attention_mask"].sum(1)
    for row in np.flatnonzero(lengths >= 7)[:3]:
        prompt = arrays["input_ids"][row : row + 1, :4]
        out = generate(model, fit.state.params, prompt, max_new_tokens=3)
        np.testing.assert_array_equal(out[0, 4:], arrays["input_ids"][row, 4:7])


def jax_leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.parametrize("recipe", ["linear_probe", "last_n(1)", "bitfit"])
def test_lm_partial_recipes_train_the_output_side_and_keep_the_tied_embedding(tmp_path, recipe):
    _save_lm(tmp_path, seed=3)
    model = jaxtl.load(tmp_path, task="causal_lm")
    fit = _fit(model, recipe, _padded_set(8, seed=5), steps=3)
    before, after = model.params["transformer"], jax.device_get(fit.state.params)["transformer"]
    # wte is both the input embedding and the (tied) output layer: only `full` trains it.
    np.testing.assert_array_equal(after["wte"]["embedding"], before["wte"]["embedding"])
    assert not np.array_equal(after["ln_f"]["bias"], before["ln_f"]["bias"])
    first_block_changed = not np.array_equal(
        after["h_0"]["attn"]["c_attn"]["bias"], before["h_0"]["attn"]["c_attn"]["bias"]
    )
    assert first_block_changed == (recipe == "bitfit")


def _byte_level_tokenizer(texts: list[str], path: str) -> int:
    """A small byte-level BPE tokenizer (GPT-2's scheme) trained on ``texts``; its vocab size."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    return tok.get_vocab_size()


@pytest.mark.slow
def test_cli_fine_tunes_a_causal_lm_and_reports_perplexity(tmp_path, capsys):
    rng = np.random.default_rng(0)
    animals, places = ["cat", "dog", "fox", "owl"], ["mat", "log", "box", "hill"]
    texts = [
        f"the {rng.choice(animals)} sat on the {rng.choice(places)}"
        + " and slept" * int(rng.integers(0, 3))
        for _ in range(120)
    ]
    model_dir = tmp_path / "gpt2"
    model_dir.mkdir()
    vocab = _byte_level_tokenizer(texts, str(model_dir))
    _save_lm(model_dir, seed=4, vocab_size=vocab)
    data = tmp_path / "sentences.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))  # no label column

    out = tmp_path / "runs"
    argv = ["finetune", "--model", str(model_dir), "--task", "causal_lm", "--data", str(data)]
    # 8 epochs (120 steps): at 4 the greedy continuation of "the owl sat on the" was a place
    # with one dropout stream and "the" again with another (the four places share the 25% that
    # "the" competes with), so the check below depended on the random draw; at 8 it held for
    # seeds 0, 1, 2 and both streams.
    argv += ["--recipe", "full,last_n(1)", "--epochs", "8", "--batch-size", "8", "--lr", "3e-3"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test perplexity" in printed
    summary = read_json(out / "summary.json")
    by_name = {r["name"]: r["test"] for r in summary["results"]}
    assert set(by_name) == {"pretrained full", "pretrained last_n(1)", "scratch full"}
    for name, test in by_name.items():
        assert test["examples"] == 12
        # A random LM is near uniform over the vocab (chance accuracy 1/vocab); the sentences
        # are highly predictable.
        assert test["accuracy"] > 0.5, (name, test)
        if name.endswith("full"):  # last_n(1) keeps the random tied embedding: less sharp
            assert test["perplexity"] < vocab / 8, (name, test)

    run_dir = out / "pretrained-full"
    assert cli.main(["evaluate", str(run_dir)]) == 0
    rescored = capsys.readouterr().out
    assert "perplexity" in rescored

    # The fine-tuned run continues a prompt the way its training sentences go.
    argv = ["generate", str(run_dir), "--prompt", "the owl sat on", "--prompt", "the cat"]
    assert cli.main([*argv, "--max-new-tokens", "8", "--json", str(tmp_path / "g.json")]) == 0
    assert "8 new tokens at most, greedy" in capsys.readouterr().out
    owl, cat = (r["text"] for r in read_json(tmp_path / "g.json"))
    assert owl.split()[:2] in [["the", place] for place in places], owl
    assert cat.split()[:3] == ["sat", "on", "the"], cat  # (which place follows is random)
    # Options are checked before anything loads.
    assert cli.main(["generate", str(run_dir)]) == 2
    assert "--prompt TEXT or --token-ids" in capsys.readouterr().err
    assert cli.main(["generate", str(run_dir), "--prompt", "x", "--top-p", "2"]) == 2


def test_lm_early_stopping_ranks_by_loss_like_the_best_checkpoint(tmp_path):
    # Every target is token 7: once the LM predicts it, token accuracy is 1.0 at every
    # evaluation while the loss keeps falling. The one rule for a causal LM is the loss, so
    # patience 1 must not stop the run on the tied accuracies.
    _save_lm(tmp_path / "lm", seed=4)
    model = jaxtl.load(tmp_path / "lm", task="causal_lm")
    constant = {
        "input_ids": np.full((8, 6), 7, np.int32),
        "attention_mask": np.ones((8, 6), np.int32),
    }
    config = jaxtl.TrainConfig(
        max_steps=12,
        batch_size=4,
        learning_rate=3e-2,
        schedule="constant",
        eval_every=3,
        early_stopping=jaxtl.EarlyStopping(patience=1),
        progress=False,
    )
    trainer = Trainer(model, jaxtl.make_plan("full", model.structure), config, str(tmp_path / "r"))
    result = fit(trainer, constant, constant)
    losses = [h["val_loss"] for h in result.history]
    accuracies = [h["val_accuracy"] for h in result.history]
    assert accuracies[-2:] == [1.0, 1.0]  # a tie that an accuracy rule would stop on
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert not result.stopped_early and result.steps == 12
    assert result.best["step"] == 12  # the best checkpoint ranks by the same loss
