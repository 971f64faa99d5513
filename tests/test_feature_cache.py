"""The feature cache (linear probe: backbone features; last_n: activations at the first trained
block): the same params as the uncached run, keys that change with every input that matters,
and refusals where caching would change the computation."""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import numpy as np
import pytest
import torch
import transformers
from _tiny import make_tiny_bert, small_vader

import jaxtl
from jaxtl import cli, feature_cache
from jaxtl.data import digits
from jaxtl.encoding import encode_splits
from jaxtl.run import evaluate_run, finetune
from jaxtl.transfer.trees import flatten, is_under


def _config(**kwargs):
    base = dict(epochs=2, batch_size=16, learning_rate=1e-2, progress=False, eval_every=None)
    return jaxtl.TrainConfig(**{**base, **kwargs})


# Attention's key bias adds q . b_k to every score of a query alike, and softmax ignores a
# constant shift: its exact gradient is 0. What reaches it is rounding noise, which Adam divides
# by its own RMS into steps of ~lr * 1e-3; two graphs that round differently (cached vs not,
# and one CPU vs another) move it differently. It is checked to stay at that noise, not
# compared (on an AMD EPYC, cached and plain ended 6e-6 apart on values of 4e-6).
_ZERO_GRADIENT = re.compile(r".*/attention/self/key/bias")


def _assert_same_run(cached, plain, start=None):
    for tree in ("params", "batch_stats"):
        a, b = flatten(getattr(cached, tree)), flatten(getattr(plain, tree))
        assert a.keys() == b.keys()
        for path in a:
            x, y = np.asarray(a[path]), np.asarray(b[path])
            if tree == "params" and start is not None and _ZERO_GRADIENT.fullmatch(path):
                x0 = np.asarray(flatten(start)[path])
                assert np.abs(x - x0).max() < 1e-4 and np.abs(y - x0).max() < 1e-4, path
                continue
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=path)
    assert cached.test["examples"] == plain.test["examples"]
    assert cached.test["loss"] == pytest.approx(plain.test["loss"], rel=1e-4)
    assert cached.test["accuracy"] == plain.test["accuracy"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    # No dropout: nothing random happens before the head, so the two runs must agree.
    directory = make_tiny_bert(str(tmp_path_factory.mktemp("bert")), layers=3, dropout=0.0)
    return jaxtl.load(directory, num_labels=2)


def test_cached_linear_probe_trains_the_same_head_text(bert, tmp_path):
    data = small_vader(n_train=96, n_val=32, n_test=48)
    plain = finetune(bert, "linear_probe", data, _config(), verbose=False)
    cached = finetune(bert, "linear_probe", data, _config(feature_cache="memory"))
    _assert_same_run(cached, plain)
    # The backbone in the returned params is the pretrained one, untouched.
    for x, y in zip(
        jax.tree.leaves(cached.params["bert"]), jax.tree.leaves(bert.params["bert"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cached_last_n_trains_the_same_blocks_text(bert, tmp_path, capsys):
    # The cache holds per-token activations at layer_1, cut to each batch's length bucket like
    # the token ids; the attention mask still reaches the trained blocks.
    data = small_vader(n_train=96, n_val=32, n_test=48)
    config = _config(bucket_by_length=True)
    plain = finetune(bert, "last_n(2)", data, config, verbose=False)
    cached = finetune(
        bert, "last_n(2)", data, dataclasses.replace(config, feature_cache=str(tmp_path / "c"))
    )
    out = capsys.readouterr().out
    assert "feature cache: train (96, 16, 32) at bert/encoder/layer_1 computed" in out
    assert len(list((tmp_path / "c").glob("*.npy"))) == 3
    _assert_same_run(cached, plain, start=bert.params)
    trained = ("bert/encoder/layer_1", "bert/encoder/layer_2", "bert/pooler", "classifier")
    before, after = flatten(bert.params), flatten(cached.params)
    moved = [p for p in after if not np.array_equal(after[p], before[p])]
    assert {next(t for t in trained if is_under(p, t)) for p in moved} == set(trained)


@pytest.mark.slow
def test_lp_ft_probes_on_cached_features_then_fine_tunes_the_whole_model(bert, tmp_path, capsys):
    # 6 steps per epoch: the probe (epoch 1) reads cached features, fine-tuning (epoch 2) the
    # tokens, in one run directory; stopped inside the probe and resumed, it is the same run.
    data = small_vader(n_train=96, n_val=32, n_test=48)
    recipe = "lp_ft(1, probe_lr=0.01)"
    base = dict(learning_rate=1e-3, restore_best=False)  # the final step's params, both runs
    plain = finetune(bert, recipe, data, _config(**base), verbose=False)
    config = _config(**base, feature_cache="memory")
    work = str(tmp_path / "run")
    finetune(bert, recipe, data, config, work, stop_at=4)
    out = capsys.readouterr().out
    assert "feature cache: train (96, 32) at classifier" in out  # (an earlier test's features)
    cached = finetune(bert, recipe, data, config, work, resume=True)
    _assert_same_run(cached, plain)
    before, after = flatten(bert.params), flatten(cached.params)
    moved = [p for p in before if not np.array_equal(before[p], after[p])]
    assert any(is_under(p, "bert/embeddings") for p in moved)
    with open(f"{work}/run.json") as f:
        assert json.load(f)["data_facts"]["feature_cache"] == "memory (stage 0)"


def test_cached_runs_train_the_same_params_batchnorm_cnn(tmp_path):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic"
    )
    transformers.ResNetModel(config).save_pretrained(tmp_path / "resnet")
    model = jaxtl.load(tmp_path / "resnet", num_labels=10, in_channels=1, image_size=16)
    data = digits(per_class=10)
    cache = str(tmp_path / "c")
    # last_n(2): the trained blocks' BatchNorms normalize with batch statistics and update
    # their running averages, in the cached run as in the plain one.
    for recipe, files in (("linear_probe", 3), ("last_n(2)", 6)):
        plain = finetune(model, recipe, data, _config(), verbose=False)
        cached = finetune(model, recipe, data, _config(feature_cache=cache), verbose=False)
        _assert_same_run(cached, plain)
        assert len(list((tmp_path / "c").glob("*.npy"))) == files  # train, validation, test
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: not np.array_equal(a, b), cached.batch_stats, model.batch_stats)
    )
    assert any(moved) and not all(moved)
    with pytest.raises(ValueError, match="train_bn updates the BatchNorm .* drop train_bn"):
        finetune(model, "last_n(2)", data, _config(feature_cache=cache, train_bn=True))


def test_cache_keys_follow_inputs_and_frozen_params_not_the_head(bert, tmp_path):
    arrays, _ = encode_splits(bert, small_vader(n_train=40, n_val=8, n_test=8))
    inputs = {k: v for k, v in arrays["train"].items() if k != "label"}
    cache = str(tmp_path / "cache")
    features = functools.partial(feature_cache.features, bert, at="classifier", cache_dir=cache)
    first, hit = features(bert.params, inputs)
    assert not hit and first.shape == (40, 32)
    again, hit = features(bert.params, inputs)
    assert hit and np.array_equal(again, first)

    new_head = jax.tree.map(lambda x: x + 1, bert.params)
    new_head["bert"] = bert.params["bert"]  # only the head moved: the features are the same
    assert features(new_head, inputs)[1]

    other_text = dict(inputs, input_ids=inputs["input_ids"].copy())
    other_text["input_ids"][0, 1] += 1
    assert not features(bert.params, other_text)[1]
    moved = jax.tree.map(lambda x: x, bert.params)
    moved["bert"] = jax.tree.map(lambda x: x * 1.01, bert.params["bert"])
    recomputed, hit = features(moved, inputs)
    assert not hit and not np.allclose(recomputed, first)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3
    # At layer_2 the key ignores layer_2 and what follows, but not layer_1.
    at_block = functools.partial(features, at="bert/encoder/layer_2")
    block, hit = at_block(bert.params, inputs)
    assert not hit and block.shape == (40, inputs["input_ids"].shape[1], 32)
    later = jax.tree.map(lambda x: x, bert.params)
    later["bert"]["encoder"]["layer_2"] = jax.tree.map(
        lambda x: x + 1, bert.params["bert"]["encoder"]["layer_2"]
    )
    assert at_block(later, inputs)[1]
    earlier = jax.tree.map(lambda x: x, bert.params)
    earlier["bert"]["encoder"]["layer_1"] = jax.tree.map(
        lambda x: x + 1, bert.params["bert"]["encoder"]["layer_1"]
    )
    assert not at_block(earlier, inputs)[1]


def test_cache_refuses_recipes_and_augmentation_it_would_change(bert):
    data = small_vader(n_train=32, n_val=16, n_test=16)
    for recipe in ("full", "bitfit", "layerwise_lr_decay(0.5)"):  # each trains the stem
        with pytest.raises(ValueError, match=re.escape(f"recipe '{recipe}': feature_cache needs")):
            finetune(bert, recipe, data, _config(feature_cache="memory"), verbose=False)
    for random in ({"augment": "hflip"}, {"mixup": 0.2}, {"cutmix": 1.0}):
        with pytest.raises(ValueError, match="cannot see random augmentation"):
            config = _config(feature_cache="memory", **random)
            finetune(bert, "last_n(1)", data, config, verbose=False)
    with pytest.raises(ValueError, match="precise_bn recomputes BatchNorm statistics"):
        finetune(bert, "linear_probe", data, _config(feature_cache="memory", precise_bn=64))


def test_cli_disk_cache_is_reused_and_its_runs_rescore_without_it(bert, tmp_path, capsys):
    argv = ["finetune", "--model", bert.path, "--no-scratch", "--max-steps", "4"]
    argv += ["--feature-cache", str(tmp_path / "cache")]
    assert cli.main([*argv, "--recipe", "linear_probe", "--out", str(tmp_path / "a")]) == 0
    assert "feature cache: train" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3
    # A second run on the same model and data reads every split from the cache; `full` has no
    # frozen prefix and runs uncached.
    assert cli.main([*argv, "--recipe", "linear_probe,full", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert out.count("read from the cache") == 3
    assert "pretrained full: trains from the stem on, so --feature-cache does not apply" in out
    # The checkpoint holds the whole model: `jaxtl evaluate` scores it without the cache and
    # finds the test metrics the cached run reported.
    run_dir = tmp_path / "b" / "pretrained-linear_probe"
    with open(run_dir / "results.json") as f:
        reported = json.load(f)["test"]
    rescored = evaluate_run(str(run_dir), which="latest")["test"]
    assert rescored["examples"] == reported["examples"] == 683
    assert rescored["loss"] == pytest.approx(reported["loss"], rel=1e-4)
    assert rescored["accuracy"] == reported["accuracy"]
