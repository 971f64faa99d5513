"""The linear probe's feature cache: the same params as the uncached run, keys that change with
every input that matters, and refusals where caching would change the computation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from _tiny import make_tiny_bert, small_vader

import jaxtl
from jaxtl import cli, feature_cache
from jaxtl.data import digits
from jaxtl.run import encode_splits, finetune


def _config(**kwargs):
    return jaxtl.TrainConfig(
        epochs=2, batch_size=16, learning_rate=1e-2, progress=False, eval_every=None, **kwargs
    )


def _assert_same_run(cached, plain):
    a, b = jax.tree.leaves(cached.params), jax.tree.leaves(plain.params)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    assert cached.test["examples"] == plain.test["examples"]
    assert cached.test["loss"] == pytest.approx(plain.test["loss"], rel=1e-4)
    assert cached.test["accuracy"] == plain.test["accuracy"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    # No dropout: nothing random happens before the head, so the two runs must agree.
    directory = make_tiny_bert(str(tmp_path_factory.mktemp("bert")), dropout=0.0)
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


@pytest.mark.slow
def test_cached_linear_probe_trains_the_same_head_batchnorm_cnn(tmp_path):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic"
    )
    transformers.ResNetModel(config).save_pretrained(tmp_path / "resnet")
    model = jaxtl.load(tmp_path / "resnet", num_labels=10, in_channels=1, image_size=16)
    data = digits(per_class=10)
    plain = finetune(model, "linear_probe", data, _config(), verbose=False)
    cached = finetune(
        model, "linear_probe", data, _config(feature_cache=str(tmp_path / "c")), verbose=False
    )
    _assert_same_run(cached, plain)
    assert len(list((tmp_path / "c").glob("*.npy"))) == 3  # train, validation, test


def test_cache_keys_follow_inputs_and_frozen_params_not_the_head(bert, tmp_path):
    arrays, _ = encode_splits(bert, small_vader(n_train=40, n_val=8, n_test=8))
    inputs = {k: v for k, v in arrays["train"].items() if k != "label"}
    cache = str(tmp_path / "cache")
    first, hit = feature_cache.features(bert, bert.params, inputs, cache_dir=cache)
    assert not hit and first.shape == (40, 32)
    again, hit = feature_cache.features(bert, bert.params, inputs, cache_dir=cache)
    assert hit and np.array_equal(again, first)

    new_head = jax.tree.map(lambda x: x + 1, bert.params)
    new_head["bert"] = bert.params["bert"]  # only the head moved: the features are the same
    assert feature_cache.features(bert, new_head, inputs, cache_dir=cache)[1]

    other_text = dict(inputs, input_ids=inputs["input_ids"].copy())
    other_text["input_ids"][0, 1] += 1
    assert not feature_cache.features(bert, bert.params, other_text, cache_dir=cache)[1]
    moved = jax.tree.map(lambda x: x, bert.params)
    moved["bert"] = jax.tree.map(lambda x: x * 1.01, bert.params["bert"])
    recomputed, hit = feature_cache.features(bert, moved, inputs, cache_dir=cache)
    assert not hit and not np.allclose(recomputed, first)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


def test_cache_refuses_recipes_and_augmentation_it_would_change(bert):
    data = small_vader(n_train=32, n_val=16, n_test=16)
    with pytest.raises(ValueError, match="train only the head .* 'full' trains"):
        finetune(bert, "full", data, _config(feature_cache="memory"), verbose=False)
    with pytest.raises(ValueError, match="cannot see random augmentation"):
        finetune(
            bert,
            "linear_probe",
            data,
            _config(feature_cache="memory", augment="hflip"),
            verbose=False,
        )


def test_cli_linear_probe_with_a_disk_cache_rescores_from_its_run_directory(bert, tmp_path, capsys):
    argv = ["finetune", "--model", bert.path, "--recipe", "linear_probe", "--no-scratch"]
    argv += ["--max-steps", "4", "--feature-cache", str(tmp_path / "cache")]
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "feature cache: train" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3
    # A second run on the same model and data reads every split from the cache.
    assert cli.main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.count("read from the cache") == 3
    # `jaxtl evaluate` rebuilds the features and loads the head checkpoint.
    assert cli.main(["evaluate", str(tmp_path / "b" / "pretrained-linear_probe")]) == 0
    assert "| 683 " in capsys.readouterr().out
