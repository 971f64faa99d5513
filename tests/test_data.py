"""Data sources, splits, label checks and batch loading."""

import json

import numpy as np
import pytest

from jaxtl.data import ArrayLoader, encode, resolve, sources


def test_vader_split_is_the_published_one():
    d = sources.vader()
    assert d.sizes() == {"train": 5453, "validation": 681, "test": 683}
    assert sum(d.sizes().values()) == 6817
    # Recompute the split independently from the raw file to check order and labels.
    rows = []
    with open(sources.vader_lexicon_path(), encoding="utf-8") as f:
        for line in f:
            word, mean = line.split("\t")[:2]
            if abs(float(mean)) >= 0.5:
                rows.append((word, int(float(mean) > 0)))
    perm = np.random.default_rng(0).permutation(len(rows))
    assert d.train[0][:5] == [rows[i][0] for i in perm[:5]]
    assert list(d.test[1][-5:]) == [rows[i][1] for i in perm[-5:]]
    assert set(np.unique(d.train[1])) == {0, 1}


def test_csv_and_jsonl_sources(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,y\n" + "".join(f"text {i},{i % 3}\n" for i in range(30)))
    d = sources.from_table(str(csv_path), text_column="sentence", label_column="y", num_labels=3)
    assert d.sizes() == {"train": 24, "validation": 3, "test": 3}
    jl = tmp_path / "d.jsonl"
    jl.write_text(
        "".join(
            json.dumps({"text": f"t{i}", "label": ["pos", "neg"][i % 2]}) + "\n" for i in range(10)
        )
    )
    d = resolve({"kind": "table", "path": str(jl)}, num_labels=2, task="classification")
    assert d.label_names == ["neg", "pos"]


def test_csv_without_named_columns_is_a_clear_error(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b\nx,1\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['text', 'label'\].*--text-column"):
        sources.from_table(str(p))


def test_labels_outside_num_labels_are_a_clear_error(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,0\nb,1\nc,5\n")
    with pytest.raises(ValueError, match=r"\[0, 2\).*found \[5\].*--num-labels 6"):
        sources.from_table(str(p), num_labels=2)


def test_class_names_beyond_the_head_are_named_not_given_as_ids(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,pos\nb,neg\nc,meh\n")
    with pytest.raises(ValueError) as e:
        sources.from_table(str(p), num_labels=2)
    assert str(e.value) == (
        f"The label column in {p} has 3 distinct labels ['meh', 'neg', 'pos'] but the head has "
        "2 outputs. Pass num_labels=3 (--num-labels 3)."
    )
    with pytest.raises(ValueError, match=r"has 3 distinct labels .* head has 4 outputs"):
        sources.from_table(str(p), num_labels=4)


def test_empty_dataset_is_a_clear_error(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n")
    with pytest.raises(ValueError, match="no rows"):
        sources.from_table(str(p))
    with pytest.raises(ValueError, match="empty"):
        ArrayLoader({"x": np.zeros((0, 2))}, 4, shuffle=False, drop_last=False)


def test_train_loader_is_reproducible_and_resumable():
    x = {"x": np.arange(103), "label": np.arange(103) % 2}
    a = ArrayLoader(x, 10, shuffle=True, seed=3, drop_last=True)
    assert a.steps_per_epoch == 10
    e1 = [b["x"] for b in a.epoch(1)]
    assert all(len(b) == 10 for b in e1)
    assert [b["x"].tolist() for b in a.epoch(1, start=4)] == [b.tolist() for b in e1[4:]]
    assert [b["x"].tolist() for b in a.epoch(1)] == [b.tolist() for b in e1]
    assert e1[0].tolist() != next(a.epoch(2))["x"].tolist()  # reshuffled each epoch


def test_eval_loader_counts_every_example_once():
    x = {"x": np.arange(13), "label": np.zeros(13)}
    batches = list(ArrayLoader(x, 8, shuffle=False, drop_last=False).epoch(0))
    assert [len(b["x"]) for b in batches] == [8, 8]
    seen = np.concatenate([b["x"][b["weight"] > 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(13))
    assert batches[1]["weight"].sum() == 5


def test_texts_longer_than_the_model_are_truncated_and_counted_or_refused(tmp_path, capsys):
    from _tiny import make_tiny_bert

    from jaxtl import cli
    from jaxtl.weights.loading import tokenizer

    tok = tokenizer(make_tiny_bert(str(tmp_path / "bert")))
    texts = ["short one", "a much longer text " * 20, "another long one " * 30]
    encoded, truncated = encode(tok, texts, max_length=16)
    assert truncated == 2 and encoded["input_ids"].shape == (3, 16)
    with pytest.raises(ValueError, match="2 text\\(s\\) exceed the model's 16 positions"):
        encode(tok, texts, max_length=16, on_long="error")

    # From the CLI: refused before any training, nothing written for the run.
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(texts * 10)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["finetune", "--model", str(tmp_path / "bert"), "--data", str(data)]
    argv += ["--long-texts", "error", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert "exceed the model's 64 positions" in capsys.readouterr().err
    assert not (tmp_path / "run" / "pretrained-full" / "checkpoints").exists()


def test_texts_are_padded_with_the_tokenizers_own_pad_id():
    """RoBERTa-style vocabularies pad with ``<pad>`` (id 1 there, not 0, which is ``<s>``), as
    transformers' fast tokenizer pads the same texts; BERT's with ``[PAD]``."""
    import tokenizers
    import transformers

    from jaxtl.data import qa, tagging, text

    words = ["<s>", "<pad>", "</s>", "good", "bad", "film", "a"]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    texts = ["good film", "a bad bad film", "good"]
    ours, _ = text.encode(tok, texts, max_length=16, pad_multiple=1)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    theirs = fast(texts, padding="longest", return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])
    assert text.pad_id(tok) == 1 and tagging.pad_id is qa.pad_id is text.pad_id
    bert = tokenizers.Tokenizer(tokenizers.models.WordLevel({"x": 0, "[PAD]": 3}, unk_token="x"))
    assert text.pad_id(bert) == 3
