"""Hugging Face ``datasets`` and in-memory arrays as data sources: real VADER words and
scikit-learn digits put into ``datasets.Dataset`` / ``DatasetDict`` (built in memory and saved
with ``save_to_disk``, never downloaded), the errors a user meets, and ``--data hf:DIR``."""

from __future__ import annotations

import collections
import importlib
import json
import sys

import datasets
import numpy as np
import pytest
from _tiny import make_tiny_bert, read_json, small_vader
from PIL import Image

from jaxtl import cli
from jaxtl.cli import options
from jaxtl.data import digits, from_arrays, from_hf, hf_source, resolve, sources

datasets.disable_progress_bars()
SENTIMENT = datasets.ClassLabel(names=["negative", "positive"])


def text_dataset(texts, labels) -> datasets.Dataset:
    features = datasets.Features({"text": datasets.Value("string"), "label": SENTIMENT})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


@pytest.fixture(scope="module")
def vader_dict() -> datasets.DatasetDict:
    words = small_vader(n_train=64, n_val=32, n_test=32)
    return datasets.DatasetDict(
        {s: text_dataset(*getattr(words, s)) for s in ("train", "validation", "test")}
    )


@pytest.fixture(scope="module")
def digit_images() -> datasets.Dataset:
    """60 of the real 8x8 digits as a PIL ``Image`` column (grayscale PNGs) and a ClassLabel."""
    images, labels = digits().train
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    pil = [Image.fromarray(x[..., 0]) for x in images[:60]]
    return datasets.Dataset.from_dict({"image": pil, "label": labels[:60]}, features=features)


def _pairs(inputs, labels) -> collections.Counter:
    keys = [x if isinstance(x, str) else np.asarray(x).tobytes() for x in inputs]
    return collections.Counter(zip(keys, np.asarray(labels).tolist(), strict=True))


# --- Dataset and DatasetDict --------------------------------------------------------------------


def test_a_dataset_is_split_like_a_csv_file():
    words = sources.vader()
    texts, labels = words.train[0][:200], words.train[1][:200]
    ours = from_hf(text_dataset(texts, labels), seed=3)
    table = sources.split(texts, labels, seed=3)  # what a CSV file of the same rows gives
    assert ours.label_names == ["negative", "positive"]
    assert ours.sizes() == {"train": 160, "validation": 20, "test": 20}
    for split in ("train", "validation", "test"):
        assert getattr(ours, split)[0] == getattr(table, split)[0]
        np.testing.assert_array_equal(getattr(ours, split)[1], getattr(table, split)[1])
        assert getattr(ours, split)[1].dtype == np.int32


def test_image_column_decodes_to_uint8_hwc_like_an_image_folder(digit_images):
    data = from_hf(digit_images, modality="image")
    embedded = digits().train
    assert data.label_names == [str(d) for d in range(10)] and data.sizes()["train"] == 48
    for split in ("train", "validation", "test"):
        images, labels = getattr(data, split)
        assert images.shape[1:] == (8, 8, 1) and images.dtype == np.uint8  # grayscale: 1 channel
        assert not _pairs(images, labels) - _pairs(embedded[0][:60], embedded[1][:60])


def test_array_columns_of_rank_2_and_3_are_images(digit_images):
    images, labels = digits().train
    gray = datasets.Dataset.from_dict({"pixels": images[:40, ..., 0], "label": labels[:40]})
    assert str(gray.features["pixels"]) == "List(List(Value('uint8')))"
    data = from_hf(gray)
    assert data.train[0].shape == (32, 8, 8, 1) and data.train[0].dtype == np.uint8
    assert _pairs(*data.train) == _pairs(*from_arrays(images[:40], labels[:40]).train)

    fixed = datasets.Features(
        {"rgb": datasets.Array3D((8, 8, 3), "float32"), "label": datasets.Value("int64")}
    )
    rgb = np.repeat(images[:20].astype(np.float32) / 255, 3, axis=-1)
    data = from_hf(datasets.Dataset.from_dict({"rgb": rgb, "label": labels[:20]}, features=fixed))
    assert data.train[0].shape == (16, 8, 8, 3) and data.train[0].dtype == np.float32
    assert data.label_names is None


def test_a_dataset_dict_keeps_its_splits_or_carves_the_missing_ones(vader_dict):
    data = from_hf(vader_dict)
    for split in ("train", "validation", "test"):
        assert getattr(data, split)[0] == vader_dict[split]["text"][:]

    # No validation split: 90/10 of a seeded shuffle of train (a saved train split keeps its
    # order, often sorted by label, so plain slices could hold one class).
    train = vader_dict["train"]
    ordered = train.select(np.argsort(train["label"][:], kind="stable"))
    no_val = datasets.DatasetDict({"train": ordered, "test": vader_dict["test"]})
    carved = from_hf(no_val, seed=1)
    assert carved.sizes() == {"train": 58, "validation": 6, "test": 32}
    assert set(carved.train[0]) | set(carved.validation[0]) == set(ordered["text"][:])
    assert sorted(carved.train[1]) != carved.train[1].tolist()  # shuffled, not the sorted order

    sliced = from_hf(vader_dict, splits=["train[:50%]", "train[50%:]+validation", "test[:7]"])
    assert sliced.sizes() == {"train": 32, "validation": 64, "test": 7}
    assert sliced.train[0] == vader_dict["train"]["text"][:32]


def test_string_labels_get_one_mapping_across_splits():
    # The test split holds one class only: ids still follow the sorted names of all splits.
    train = datasets.Dataset.from_dict({"text": ["a", "b", "c"] * 4, "label": ["x", "y", "z"] * 4})
    test = datasets.Dataset.from_dict({"text": ["d"] * 3, "label": ["z"] * 3})
    data = from_hf(datasets.DatasetDict({"train": train, "validation": train, "test": test}))
    assert data.label_names == ["x", "y", "z"]
    assert data.test[1].tolist() == [2, 2, 2] and data.train[1][:3].tolist() == [0, 1, 2]


def test_causal_lm_reads_text_only_and_regression_reads_numbers():
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(20)], "score": [0.5] * 20})
    lm = from_hf(ds, task="causal_lm")
    assert lm.train[1] is None and lm.sizes()["train"] == 16
    scores = from_hf(ds, label_column="score", task="regression").train[1]
    assert scores.dtype == np.float32 and set(scores.tolist()) == {0.5}


def _mixed(n: int = 20) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "text": [f"w{i}" for i in range(n)],
            "title": [f"t{i}" for i in range(n)],
            "label": [0, 1] * (n // 2),
            "score": [0.5] * n,
            "tags": [[0, 1]] * n,
        }
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {},
            r"Cannot tell which column is the text or image input: 2 candidates among "
            r"\['text', 'title', 'label', 'score', 'tags'\]. Name it with input_column=",
        ),
        ({"input_column": "body"}, r"no column 'body' .*it has \['text', 'title', 'label'"),
        (
            {"input_column": "score"},
            r"'score' \(Value\('float64'\)\) is neither text .* nor an image",
        ),
        (
            {"input_column": "text", "modality": "image"},
            r"'text' holds texts, but the model reads image",
        ),
        (
            {"input_column": "text", "label_column": "score"},
            r"'score' of hf dataset are float64, not "
            r"integer class ids; make it a ClassLabel \(dataset.class_encode_column\('score'\)\)",
        ),
        ({"input_column": "text", "label_column": "tags"}, r"'tags' holds a list per example"),
        (
            {"input_column": "text", "num_labels": 1},
            r"must be in \[0, 1\) for a 1-way head; found \[1\]",
        ),
        (
            {"input_column": "text", "splits": ["train", "validation", "test"]},
            r"splits name the splits of a DatasetDict",
        ),
    ],
)
def test_bad_dataset_input_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_hf(_mixed(), **kwargs)


@pytest.mark.parametrize(
    "splits, message",
    [
        (
            ["train", "valid", "test"],
            r"Bad split expression 'valid' for the validation split: "
            r"Unknown split \"valid\".*\{'train': 64, 'validation': 32, 'test': 32\}",
        ),
        (["train", "train[5:5]", "test"], r"The validation split 'train\[5:5\]' is empty"),
        (["train", "train[200:]", "test"], r"The validation split 'train\[200:\]' is empty"),
        (["train", "train[:200%]", "test"], r"Bad split expression 'train\[:200%\]'"),
        (["train", "test"], r"three expressions"),
    ],
)
def test_bad_splits_are_named(vader_dict, splits, message):
    with pytest.raises(ValueError, match=message):
        from_hf(vader_dict, splits=splits)


def test_more_dataset_mistakes_are_named(vader_dict):
    with pytest.raises(ValueError, match=r"has 2 distinct labels .* head has 3 outputs"):
        from_hf(vader_dict, num_labels=3)
    unlabeled = vader_dict["test"].map(lambda _: {"label": -1})  # as in GLUE's test splits
    glue_like = datasets.DatasetDict({**vader_dict, "test": unlabeled})
    with pytest.raises(ValueError, match=r"-1 \(unlabeled\) in the test split.*--splits"):
        from_hf(glue_like)
    with pytest.raises(ValueError, match=r"has 5 examples, too few to split 80/10/10"):
        from_hf(vader_dict["test"].select(range(5)))
    with pytest.raises(ValueError, match=r"no 'train' split .*--splits TRAIN,VALIDATION,TEST"):
        from_hf(datasets.DatasetDict({"test": vader_dict["test"]}))
    with pytest.raises(TypeError, match=r"Expected a datasets.Dataset .*from_arrays"):
        from_hf({"text": ["a"], "label": [0]})


def test_saved_datasets_load_from_disk_and_bad_directories_are_named(vader_dict, tmp_path):
    vader_dict.save_to_disk(str(tmp_path / "words"))
    data = hf_source.load_from_disk(str(tmp_path / "words"))
    assert data.name == "hf:words" and data.sizes() == {"train": 64, "validation": 32, "test": 32}
    with pytest.raises(FileNotFoundError, match=r"directory not found: .*save_to_disk"):
        hf_source.load_from_disk(str(tmp_path / "missing"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match=r"not a saved Hugging Face dataset \(it holds \['notes"):
        hf_source.load_from_disk(str(tmp_path / "other"))


def test_without_datasets_the_error_names_the_extra(monkeypatch, vader_dict, tmp_path):
    vader_dict.save_to_disk(str(tmp_path / "words"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    importlib.reload(hf_source)  # the module itself imports without it
    importlib.reload(importlib.import_module("jaxtl.data"))
    with pytest.raises(
        ImportError, match=r"needs the 'datasets' package.*pip install 'jaxtl\[hf\]'"
    ):
        from_hf(vader_dict)
    spec = {"kind": "hf", "path": str(tmp_path / "words")}
    with pytest.raises(ImportError, match=r"pip install 'jaxtl\[hf\]'"):
        resolve(spec, num_labels=2, task="classification")


# --- the command line ---------------------------------------------------------------------------


def _args(*argv):
    return cli.build_parser().parse_args(["finetune", *argv])


def test_cli_records_an_hf_spec_that_rebuilds_the_data(vader_dict, tmp_path):
    vader_dict.save_to_disk(str(tmp_path / "words"))
    args = _args("--data", f"hf:{tmp_path / 'words'}", "--splits", "train,test,validation[:5]")
    spec = options.data_spec(args, modality="text")
    assert spec == {
        "kind": "hf",
        "path": str(tmp_path / "words"),
        "splits": ["train", "test", "validation[:5]"],
        "input_column": None,
        "label_column": None,
        "seed": 0,
        "modality": "text",
    }
    data = resolve(json.loads(json.dumps(spec)), num_labels=2, task="classification")
    assert data.sizes() == {"train": 64, "validation": 32, "test": 5}
    with pytest.raises(ValueError, match=r"--data-dir applies to tfds:NAME only"):
        options.data_spec(_args("--data", "hf:x", "--data-dir", "y"), modality="text")
    with pytest.raises(ValueError, match=r"--data hf:DIR names the directory"):
        options.data_spec(_args("--data", "hf:"), modality="text")
    with pytest.raises(ValueError, match=r"--splits applies to tfds:NAME or hf:DIR only; --data w"):
        options.data_spec(_args("--data", "words.csv", "--splits", "a,b,c"), modality="text")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return make_tiny_bert(str(tmp_path_factory.mktemp("hf") / "bert"))


def test_cli_names_a_missing_datasets_package(monkeypatch, tiny_bert, vader_dict, tmp_path, capsys):
    vader_dict.save_to_disk(str(tmp_path / "words"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert cli.main(["finetune", "--model", tiny_bert, "--data", f"hf:{tmp_path / 'words'}"]) == 2
    assert "pip install 'jaxtl[hf]'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_fine_tunes_from_a_saved_text_dataset(tiny_bert, vader_dict, tmp_path, capsys):
    vader_dict.save_to_disk(str(tmp_path / "words"))
    out = tmp_path / "run"
    argv = ["finetune", "--model", tiny_bert, "--data", f"hf:{tmp_path / 'words'}"]
    argv += ["--recipe", "full", "--no-scratch", "--max-steps", "4", "--batch-size", "16"]
    argv += ["--lr", "1e-3", "--out", str(out)]
    assert cli.main(argv) == 0
    (result,) = read_json(out / "summary.json")["results"]
    assert result["steps"] == 4 and result["test"]["examples"] == 32
    run = read_json(out / "pretrained-full" / "run.json")
    assert run["data"]["kind"] == "hf" and run["label_names"] == ["negative", "positive"]
    # The run directory alone rebuilds the data: the re-scored test set is the same 32 words.
    assert cli.main(["evaluate", str(out / "pretrained-full")]) == 0
    assert "| 32 " in capsys.readouterr().out


@pytest.mark.slow
def test_cli_fine_tunes_an_image_model_from_a_saved_image_dataset(digit_images, tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic"
    )
    transformers.ResNetModel(config).save_pretrained(tmp_path / "resnet")
    digit_images.save_to_disk(str(tmp_path / "digits"))
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(tmp_path / "resnet"), "--data", f"hf:{tmp_path / 'digits'}"]
    argv += ["--num-labels", "10", "--in-channels", "1", "--image-size", "16", "--recipe", "full"]
    argv += ["--no-scratch", "--max-steps", "3", "--batch-size", "16", "--out", str(out)]
    assert cli.main(argv) == 0
    (result,) = read_json(out / "summary.json")["results"]
    assert result["steps"] == 3 and result["test"]["examples"] == 6
    run = read_json(out / "pretrained-full" / "run.json")
    assert run["data"]["kind"] == "hf" and run["data"]["modality"] == "image"


# --- NumPy arrays and dicts of arrays -----------------------------------------------------------


def test_arrays_and_dicts_of_arrays():
    images, labels = digits().train
    data = from_arrays({"image": images[:, ..., 0], "label": labels}, seed=2)
    assert data.sizes() == {"train": 862, "validation": 107, "test": 109}
    assert data.train[0].shape[1:] == (8, 8, 1) and data.train[0].dtype == np.uint8
    train, _, _ = sources.split_indices(len(labels), 2)
    np.testing.assert_array_equal(data.train[0], images[train])
    np.testing.assert_array_equal(data.train[1], labels[train])

    texts = from_arrays(np.array(["good", "bad", "fine", "awful"] * 5), ["pos", "neg"] * 10)
    assert texts.label_names == ["neg", "pos"] and isinstance(texts.train[0], list)
    assert texts.train[0] == sources.split(["good", "bad", "fine", "awful"] * 5).train[0]

    sizes = [np.zeros((6 + i % 3, 5, 3), np.uint8) for i in range(20)]  # different sizes
    ragged = from_arrays(sizes, list(range(10)) * 2, label_names=[str(i) for i in range(10)])
    assert ragged.train[0].dtype == object and ragged.train[0][0].ndim == 3
    lm = from_arrays({"text": ["a b", "c d"] * 10}, task="causal_lm")
    assert lm.train[1] is None


@pytest.mark.parametrize(
    "inputs, labels, message",
    [
        (np.zeros((20, 8, 8)), [0, 1] * 9, r"20 inputs but 18 labels"),
        (np.zeros((20, 64)), [0, 1] * 10, r"shape \(20, 64\); expected texts .* or images"),
        (np.zeros((20, 3, 32, 32)), [0, 1] * 10, r"look channels-first .* np.moveaxis"),
        (np.zeros((20, 8, 8)), np.eye(2)[[0, 1] * 10], r"not one value per example .*argmax"),
        (np.zeros((20, 8, 8)), [0.5] * 20, r"float64, not integer class ids"),
        (np.zeros((20, 8, 8)), [0, -1] * 10, r"negative class ids \[-1\]"),
        (["a", 1] * 10, [0, 1] * 10, r"mix texts and other values \(item 1 is int\)"),
        (["a"] * 9, [0] * 9, r"9 examples, too few to split 80/10/10"),
        ([], [], r"is empty"),
        (["a"] * 20, None, r"labels are missing"),
        ({"image": np.zeros((20, 8, 8)), "y": [0] * 20}, None, r"no label column 'label'.*'y'"),
        (
            {"a": np.zeros((20, 8, 8)), "b": ["x"] * 20, "label": [0] * 20},
            None,
            r"which column is the input",
        ),
    ],
)
def test_bad_arrays_are_named(inputs, labels, message):
    with pytest.raises(ValueError, match=message):
        from_arrays(inputs, labels)
