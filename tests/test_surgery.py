"""Model surgery (jaxtl/surgery.py, jaxtl.load(drop_blocks=)): a truncated BERT equals
transformers' BERT built with fewer layers from the same checkpoint; new heads and poolings
compute what their definitions say, train under any recipe (feature cache included), resume
bit for bit and rebuild from run.json; a custom loss reaches training and evaluation; bad
input fails with the flag's name before anything compiles."""

import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import torch
import transformers
from _tiny import evaluate, fit, make_tiny_bert, small_vader, write_vader_csv

import jaxtl
from jaxtl import cli, surgery
from jaxtl.encoding import encode_splits
from jaxtl.run import evaluate_run, finetune
from jaxtl.transfer import trees


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    # No dropout: the cached and uncached runs below must agree.
    return make_tiny_bert(str(tmp_path_factory.mktemp("bert")), layers=3, dropout=0.0)


def _batch():
    ids = np.array([[101, 2023, 2003, 1037, 102, 0, 0], [101, 7592, 102, 0, 0, 0, 0]])
    mask = (ids > 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_dropping_blocks_matches_transformers_with_fewer_layers(bert_dir):
    model = jaxtl.load(bert_dir, task="features", drop_blocks=2)
    assert model.structure.blocks == ("bert/encoder/layer_0",)
    assert any("encoder/layer_2/" in name for name in model.report.unexpected)
    batch = _batch()
    ours = np.asarray(model.apply(model.params, batch))
    ref = transformers.BertModel.from_pretrained(bert_dir, num_hidden_layers=1).eval()
    with torch.no_grad():
        theirs = ref(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]),
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_dropping_too_many_blocks_or_from_a_family_without_a_stack_is_refused(bert_dir):
    with pytest.raises(ValueError, match=r"drop_blocks=3 \(--drop-blocks 3\).*3 blocks"):
        jaxtl.load(bert_dir, drop_blocks=3)
    with pytest.raises(ValueError, match=r"must be an int >= 0"):
        jaxtl.load(bert_dir, drop_blocks=-1)


def _dense_head():
    return surgery.MLPHead(num_labels=2, hidden=(), dropout=0.0)


@pytest.mark.parametrize("pooling", surgery.POOLINGS)
def test_each_pooling_computes_its_definition(bert_dir, pooling):
    base = jaxtl.load(bert_dir, task="features")
    model = surgery.with_head(base, _dense_head(), pooling=pooling)
    batch = _batch()
    out = np.asarray(model.apply(model.params, batch))
    hidden = np.asarray(base.apply(base.params, batch))
    mask = batch["attention_mask"].astype(bool)
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "mean":
        pooled = np.stack([h[m].mean(0) for h, m in zip(hidden, mask, strict=True)])
    elif pooling == "max":
        pooled = np.stack([h[m].max(0) for h, m in zip(hidden, mask, strict=True)])
    elif pooling == "last":
        pooled = np.stack([h[m][-1] for h, m in zip(hidden, mask, strict=True)])
    else:
        q = np.asarray(model.params["head"]["attention_pool"]["query"])
        rows = []
        for h, m in zip(hidden, mask, strict=True):
            s = h[m] @ q / np.sqrt(h.shape[-1])
            w = np.exp(s - s.max())
            rows.append((w / w.sum()) @ h[m])
        pooled = np.stack(rows)
    w = model.params["head"]["out"]
    np.testing.assert_allclose(out, pooled @ w["kernel"] + w["bias"], rtol=1e-5, atol=1e-5)


class _Scaled(nn.Module):
    """A user head: LayerNorm, then a Dense layer."""

    @nn.compact
    def __call__(self, x, *, train=False):
        return nn.Dense(2, name="proj")(nn.LayerNorm(name="norm")(x))


def test_a_custom_head_and_loss_train_resume_and_evaluate(bert_dir, tmp_path):
    def doubled(outputs, batch):  # twice the cross-entropy: easy to check by hand
        return 2 * optax.softmax_cross_entropy_with_integer_labels(outputs, batch["label"])

    base = jaxtl.load(bert_dir, task="features")
    model = surgery.with_head(base, _Scaled(), num_labels=2, pooling="mean")
    assert sorted(model.params["head"]) == ["norm", "proj"]
    assert "head/proj/kernel" in model.report.initialized
    arrays, _ = encode_splits(model, small_vader(n_train=64, n_val=16, n_test=16))
    config = jaxtl.TrainConfig(epochs=2, batch_size=16, learning_rate=1e-3, restore_best=False)

    def trainer(work):
        plan = jaxtl.make_plan("full", model.structure)
        return jaxtl.Trainer(model, plan, config, str(work), loss=doubled)

    ref = fit(trainer(tmp_path / "a"), arrays["train"], arrays["validation"])
    fit(trainer(tmp_path / "b"), arrays["train"], arrays["validation"], stop_at=5)
    again = trainer(tmp_path / "b")
    resumed = fit(again, arrays["train"], arrays["validation"], resume=True)
    for a, b in zip(
        jax.tree.leaves(ref.state.params), jax.tree.leaves(resumed.state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Evaluation scores with the custom loss.
    test = arrays["test"]
    metrics = evaluate(again, resumed.state, test)
    logits = np.asarray(model.apply(jax.device_get(resumed.state.params), test))
    nll = -np.asarray(jax.nn.log_softmax(logits))[np.arange(len(logits)), test["label"]]
    assert metrics["loss"] == pytest.approx(2 * float(nll.mean()), rel=1e-5)
    # Training optimizes it: one step's reported loss is the doubled loss of its batch.
    first = {k: v[:16] for k, v in arrays["train"].items()}
    logits = np.asarray(model.apply(jax.device_get(resumed.state.params), first))
    nll = -np.asarray(jax.nn.log_softmax(logits))[np.arange(16), first["label"]]
    train_step, _ = again._steps(resumed.state)
    _, step_metrics = train_step(resumed.state, jax.device_put(first))  # (donates the state)
    assert float(step_metrics["loss"]) == pytest.approx(2 * float(nll.mean()), rel=1e-5)


def test_a_loss_that_is_not_per_example_is_refused(bert_dir):
    base = jaxtl.load(bert_dir, task="features")
    model = surgery.with_head(base, _dense_head())
    plan = jaxtl.make_plan("full", model.structure)
    with pytest.raises(ValueError, match="loss= must be a function"):
        jaxtl.Trainer(model, plan, jaxtl.TrainConfig(), loss="mse")


def test_an_mlp_head_probe_trains_the_same_params_with_the_feature_cache(bert_dir):
    model = surgery.with_head(
        jaxtl.load(bert_dir, task="features"),
        surgery.MLPHead(num_labels=2, hidden=(16,), dropout=0.1),
        pooling="attention",
    )
    data = small_vader(n_train=64, n_val=16, n_test=16)
    config = jaxtl.TrainConfig(epochs=1, batch_size=16, learning_rate=1e-2, progress=False)
    plain = finetune(model, "linear_probe", data, config, verbose=False)
    cached = finetune(
        model,
        "linear_probe",
        data,
        jaxtl.TrainConfig(**{**config.to_dict(), "feature_cache": "memory"}),
        verbose=False,
    )
    before, after = trees.flatten(model.params), trees.flatten(jax.device_get(plain.params))
    moved = {p for p in before if not np.array_equal(before[p], after[p])}
    assert moved and all(p.startswith("head/") for p in moved)  # only the new head trained
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(cached.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # Dropout acts in training only.
    batch = _batch()
    p = model.params
    one = model.apply(p, batch, train=True, rng=jax.random.key(0))
    two = model.apply(p, batch, train=True, rng=jax.random.key(1))
    assert not np.allclose(one, two)
    np.testing.assert_array_equal(model.apply(p, batch), model.apply(p, batch))


def test_cli_surgery_runs_rebuild_from_run_json(bert_dir, tmp_path, capsys):
    csv = write_vader_csv(tmp_path / "d.csv", 80)
    out = str(tmp_path / "out")
    argv = ["finetune", "--model", bert_dir, "--data", csv, "--text-column", "word",
            "--label-column", "sentiment", "--recipe", "full", "--no-scratch",
            "--epochs", "1", "--batch-size", "16", "--out", out, "--drop-blocks", "1",
            "--head", "mlp(16, dropout=0.0)", "--pooling", "max"]  # fmt: skip
    assert cli.main(argv) == 0
    run = os.path.join(out, "pretrained-full")
    with open(os.path.join(run, "run.json")) as f:
        m = json.load(f)["model"]
    assert m["drop_blocks"] == 1 and m["pooling"] == "max"
    assert m["head"] == {"module": "MLPHead", "hidden": [16], "dropout": 0.0}
    with open(os.path.join(run, "results.json")) as f:
        results = json.load(f)
    again = evaluate_run(run)
    assert again["test"]["accuracy"] == results["test"]["accuracy"]
    assert again["test"]["loss"] == pytest.approx(results["test"]["loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--drop-blocks", "3"], r"at most 2 can be dropped"),
        (["--head", "mlp(0)"], r"--head 'mlp\(0\)': widths must be positive"),
        (["--head", "deep"], r"unknown --head 'deep'"),
        (["--head", "mlp(16.5)"], r"widths must be positive ints, got 16.5"),
    ],
)
def test_cli_bad_surgery_is_refused_before_training(bert_dir, tmp_path, capsys, flags, message):
    csv = write_vader_csv(tmp_path / "d.csv", 40)
    argv = ["finetune", "--model", bert_dir, "--data", csv, "--text-column", "word",
            "--label-column", "sentiment", "--no-scratch", "--out",
            str(tmp_path / "o"), *flags]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()  # refused before any run started


def test_image_backbones_refuse_a_pooling_and_gpt2_pools_its_last_real_token(tmp_path):
    base = jaxtl.load(jaxtl.efficientnet_lite0_path(), task="features", image_size=32)
    with pytest.raises(ValueError, match=r"--pooling max\) applies to text models"):
        surgery.with_head(base, _dense_head(), pooling="max")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=99, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2Model(cfg).save_pretrained(tmp_path / "gpt2")
    gpt2 = jaxtl.load(str(tmp_path / "gpt2"), task="features")
    model = surgery.with_head(gpt2, _dense_head())
    assert model.extras["pooling"] == "last"
    ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)}
    hidden = np.asarray(gpt2.apply(gpt2.params, batch))
    w = model.params["head"]["out"]
    expected = np.stack([hidden[0, 3], hidden[1, 1]]) @ w["kernel"] + w["bias"]
    np.testing.assert_allclose(model.apply(model.params, batch), expected, rtol=1e-5, atol=1e-5)
