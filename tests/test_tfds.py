"""TFDS datasets by name, prepared locally by real ``GeneratorBasedBuilder``s from the embedded
data, read through ``tfds.data_source`` (array_record) and through TensorFlow (tfrecord)."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import numpy as np
import pytest
from _tiny import make_tiny_bert, read_json

from jaxtl import cli
from jaxtl.data import digits, tfds_builders, tfds_source, vader


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tfds"))
    tfds_builders.prepare("jaxtl_vader", root)
    tfds_builders.prepare("jaxtl_digits", root)
    return root


def _pairs(inputs, labels) -> collections.Counter:
    keys = [x if isinstance(x, str) else np.asarray(x).tobytes() for x in inputs]
    return collections.Counter(zip(keys, np.asarray(labels).tolist(), strict=True))


def test_prepared_vader_holds_the_embedded_split(data_dir):
    ours, embedded = tfds_source.load("tfds:jaxtl_vader", data_dir=data_dir), vader()
    assert ours.label_names == ["negative", "positive"]
    assert ours.sizes() == embedded.sizes() == {"train": 5453, "validation": 681, "test": 683}
    for split in ("train", "validation", "test"):  # TFDS reorders records; the sets are equal
        assert _pairs(*getattr(ours, split)) == _pairs(*getattr(embedded, split))


def test_tfrecord_dataset_reads_through_tensorflow(data_dir, tmp_path):
    tfds_builders.prepare("jaxtl_digits", str(tmp_path), file_format="tfrecord")
    assert any(".tfrecord" in f for f in os.listdir(tmp_path / "jaxtl_digits" / "1.0.0"))
    through_tf = tfds_source.load("tfds:jaxtl_digits", data_dir=str(tmp_path))
    array_record = tfds_source.load("tfds:jaxtl_digits", data_dir=data_dir)
    embedded = digits()
    for split in ("train", "validation", "test"):
        images, labels = getattr(through_tf, split)
        assert images.shape[1:] == (8, 8, 1) and images.dtype == np.uint8
        assert _pairs(images, labels) == _pairs(*getattr(embedded, split))
        assert _pairs(images, labels) == _pairs(*getattr(array_record, split))


def test_tfrecord_without_tensorflow_names_the_extra(data_dir, tmp_path):
    tfds_builders.prepare("jaxtl_digits", str(tmp_path), file_format="tfrecord")
    # As if tensorflow were not installed: the path finder no longer sees it (find_spec gives
    # None and import raises ModuleNotFoundError), which is what tfds and etils check.
    script = (
        "import importlib.machinery as machinery, sys\n"
        "class HideTensorFlow:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'tensorflow':\n"
        "            return None\n"
        "        return machinery.PathFinder.find_spec(name, path, target)\n"
        "sys.meta_path[:] = [HideTensorFlow if f is machinery.PathFinder else f\n"
        "                    for f in sys.meta_path]\n"
        "from jaxtl.data import tfds_source\n"
        f"tfds_source.load('tfds:jaxtl_digits', data_dir={str(tmp_path)!r})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "stored as tfrecord, which only TensorFlow reads" in proc.stderr
    assert "pip install 'jaxtl[tensorflow]'" in proc.stderr


def test_split_slicing_and_default_splits(data_dir):
    sliced = tfds_source.load(
        "tfds:jaxtl_digits", data_dir=data_dir, splits=["train[:50%]", "train[50%:]", "test[:7]"]
    )
    assert sliced.sizes() == {"train": 539, "validation": 539, "test": 7}
    assert tfds_source.default_splits(["train", "test"]) == ("train[:90%]", "train[90%:]", "test")
    assert tfds_source.default_splits(["train"]) == ("train[:80%]", "train[80%:90%]", "train[90%:]")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spec": "tfds:Digits"}, "Not a TFDS dataset name"),
        ({"spec": "tfds:jaxtl_digitz"}, "No prepared TFDS dataset 'jaxtl_digitz'.*jaxtl_digits"),
        ({"splits": ["train", "valid", "test"]}, "Unknown split 'valid'.*'validation'"),
        ({"splits": ["train", "train[5:5]", "test"]}, "Split 'train\\[5:5\\]'.* is empty"),
        ({"splits": ["train", "train[2000:]", "test"]}, "incompatible with 1078 examples"),
        ({"splits": ["train", "train[:200%]", "test"]}, "Bad split expression 'train\\[:200%\\]'"),
        ({"splits": ["train", "test"]}, "three expressions"),
        ({"modality": "text"}, "Cannot tell which feature is the text input: 0 candidates"),
        ({"label_key": "image"}, "Labels 'image' of split 'train' are not one value per"),
        ({"spec": "tfds:jaxtl_vader", "label_key": "text"}, "Labels 'text'.* not integer class"),
        ({"input_key": "pixels"}, "no feature 'pixels'.*'image', 'label'"),
    ],
)
def test_bad_tfds_input_is_named(data_dir, kwargs, message):
    spec = kwargs.pop("spec", "tfds:jaxtl_digits")
    with pytest.raises(ValueError, match=message):
        tfds_source.load(spec, data_dir=data_dir, **kwargs)


def test_bad_tfds_cli_options_are_refused_before_training(data_dir, tmp_path, capsys):
    assert cli.main(["finetune", "--data", "tfds:jaxtl_vader", "--splits", "train,test"]) == 2
    assert "three comma-separated" in capsys.readouterr().err
    assert cli.main(["finetune", "--data", str(tmp_path / "x.csv"), "--data-dir", data_dir]) == 2
    assert "tfds:NAME only" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_fine_tunes_from_a_local_tfds_dataset(data_dir, tmp_path, capsys):
    model = make_tiny_bert(str(tmp_path / "bert"))
    out = tmp_path / "run"
    argv = ["finetune", "--model", model, "--data", "tfds:jaxtl_vader", "--data-dir", data_dir]
    argv += ["--splits", "train[:640],validation[:200],test[:300]", "--recipe", "full"]
    argv += ["--no-scratch", "--epochs", "1", "--lr", "1e-3", "--out", str(out)]
    argv += ["--bucket-by-length"]
    assert cli.main(argv) == 0
    assert "of the training token slots (length buckets)" in capsys.readouterr().out
    summary = read_json(out / "summary.json")
    (result,) = summary["results"]
    assert result["steps"] == 20 and result["test"]["examples"] == 300
    run = read_json(out / "pretrained-full" / "run.json")
    assert run["data"]["kind"] == "tfds" and run["data"]["data_dir"] == data_dir
    assert run["label_names"] == ["negative", "positive"]
    assert 0 <= run["data_facts"]["padding_waste"] < 0.5
    assert run["config"]["bucket_by_length"] is True

    # The run directory alone rebuilds the data: the re-scored test set is the same 300 words.
    assert cli.main(["evaluate", str(out / "pretrained-full")]) == 0
    assert "| 300 " in capsys.readouterr().out
