"""K-shot training subsets (issue 15, ``--shots K``): stratified, seeded and nested on real
data; validation and test untouched; too few examples of a class named before anything runs."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from _tiny import make_tiny_bert, read_json, write_vader_csv

from jaxtl import cli
from jaxtl.data import digits, few_shot, resolve, vader, with_shots


@pytest.fixture(scope="module")
def data():
    """VADER with each training text prefixed by its index (a few words occur twice)."""
    full = vader()
    texts, labels = full.train
    return dataclasses.replace(full, train=([f"{i}|{t}" for i, t in enumerate(texts)], labels))


def _picked(small) -> list[int]:
    """The original training index of every example of ``small``'s training split."""
    return [int(t.split("|", 1)[0]) for t in small.train[0]]


def test_k_of_each_class_seeded_nested_and_aligned(data):
    small = few_shot(data, 8, seed=0)
    assert np.bincount(small.train[1]).tolist() == [8, 8]
    picked = _picked(small)
    assert picked == sorted(picked)  # the original order is kept
    assert np.array_equal(small.train[1], np.asarray(data.train[1])[picked])  # texts match labels
    assert small.validation is data.validation and small.test is data.test
    assert small.label_names == data.label_names

    assert _picked(few_shot(data, 8, seed=0)) == picked  # the same draw for the same seed
    assert _picked(few_shot(data, 8, seed=1)) != picked
    assert set(_picked(few_shot(data, 4, seed=0))) < set(picked)  # nested across K


def test_images_too():
    full = digits()
    small = few_shot(full, 3, seed=2)
    assert small.train[0].shape == (30, *full.train[0].shape[1:])
    assert np.bincount(small.train[1]).tolist() == [3] * 10
    for image, label in zip(small.train[0], small.train[1], strict=True):
        match = np.flatnonzero((full.train[0] == image).all(axis=(1, 2, 3)))
        assert label in np.asarray(full.train[1])[match]


def test_a_class_with_too_few_examples_is_named(data):
    negatives = int(np.sum(np.asarray(data.train[1]) == 0))
    smallest = min(np.bincount(data.train[1]))
    with pytest.raises(ValueError) as e:
        few_shot(data, negatives + 1)
    message = str(e.value)
    assert f"shots={negatives + 1} (--shots {negatives + 1})" in message
    assert f"negative ({negatives})" in message and f"--shots {smallest} or less" in message
    with pytest.raises(ValueError, match=r"shots \(--shots\) must be a whole number >= 1"):
        few_shot(data, 0)
    with pytest.raises(ValueError, match="needs a classification dataset"):
        few_shot(
            type(data)(
                train=(["a", "b"], np.array([0.5, 1.5], np.float32)),
                validation=data.validation,
                test=data.test,
            ),
            1,
        )


def test_a_spec_records_the_shots_and_resolve_draws_them(data):
    spec = with_shots({"kind": "vader"}, 16, seed=3)
    again = resolve(spec, num_labels=2, task="classification")
    assert again.train[0] == few_shot(vader(), 16, seed=3).train[0]
    assert with_shots({"kind": "vader"}, None) == {"kind": "vader"}


def test_cli_trains_on_k_per_class_and_refuses_too_many(tmp_path, capsys):
    model = make_tiny_bert(str(tmp_path / "bert"))
    csv = write_vader_csv(tmp_path / "words.csv", 120)
    base = ["finetune", "--model", model, "--data", csv, "--text-column", "word",
            "--label-column", "sentiment", "--recipe", "full", "--no-scratch",
            "--batch-size", "4", "--epochs", "1"]  # fmt: skip
    out = tmp_path / "out"
    assert cli.main([*base, "--shots", "4", "--seed", "1", "--out", str(out)]) == 0
    info = read_json(os.path.join(out, "pretrained-full", "run.json"))
    assert info["data_facts"]["sizes"]["train"] == 8  # 4 of each of the 2 classes
    assert info["data"]["shots"] == 4 and info["data"]["shots_seed"] == 1
    results = read_json(os.path.join(out, "pretrained-full", "results.json"))
    assert results["steps"] == 2 and results["test"]["examples"] == 12  # test: all of it

    capsys.readouterr()
    assert cli.main([*base, "--shots", "500", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "error: shots=500 (--shots 500) needs 500 training examples of every class" in err
    assert not os.path.exists(tmp_path / "o2")
