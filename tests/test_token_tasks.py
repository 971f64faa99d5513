"""Token classification and extractive question answering end to end: the data (word-to-token
label alignment, answer tokens and character offsets) against transformers' fast tokenizer,
the metrics against independent implementations (seqeval's entity F1 on tags aligned by
transformers, torchmetrics' SQuAD), the span search against a brute-force loop, a real
fine-tune of the embedded MiniLM for each task, and the command line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _tiny import make_tiny_bert

import jaxtl
from jaxtl import cli, metrics
from jaxtl.data import qa, tagging, text
from jaxtl.encoding import encode_splits
from jaxtl.train import TrainConfig
from jaxtl.train.losses import best_spans


@pytest.fixture(scope="module")
def fast_tokenizer(minilm_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def test_word_labels_sit_on_each_words_first_token_as_transformers_aligns_them(
    minilm_dir, fast_tokenizer
):
    data = tagging.vader_tags(sizes=(40, 5, 5), seed=3)
    model = jaxtl.load(minilm_dir, task="token_classification", num_labels=5)
    arrays, facts = encode_splits(model, data)
    assert facts["truncated"] == 0
    sentences, tags = data.train
    for i, (words, row) in enumerate(zip(sentences, tags, strict=True)):
        enc = fast_tokenizer(words, is_split_into_words=True)
        expected, previous = [], None
        for word in enc.word_ids():  # transformers' token-classification example's rule
            expected.append(-100 if word is None or word == previous else row[word])
            previous = word
        k = len(enc["input_ids"])
        np.testing.assert_array_equal(arrays["train"]["input_ids"][i, :k], enc["input_ids"])
        np.testing.assert_array_equal(arrays["train"]["label"][i, :k], expected)
        assert np.all(arrays["train"]["label"][i, k:] == -100)
    # Any word split into pieces has exactly one labelled token.
    assert np.sum(arrays["train"]["label"] != -100) == sum(len(w) for w in sentences)


def test_a_sentence_longer_than_the_model_keeps_its_leading_words_and_counts_the_cut(minilm_dir):
    model = jaxtl.load(minilm_dir, task="token_classification", num_labels=2)
    words = ["good"] * 20
    encoded, cut = tagging.encode(
        model.extras["tokenizer"], [words, words[:3]], [[1] * 20, [0] * 3], max_length=8
    )
    assert cut == 1 and encoded["label"].shape == (2, 8)
    assert list(encoded["label"][0]) == [-100, 1, 1, 1, 1, 1, 1, -100]  # [CLS] 6 words [SEP]
    assert encoded["input_ids"][0, -1] == model.extras["tokenizer"].token_to_id("[SEP]")


def test_answer_tokens_and_offsets_match_transformers_offset_mapping(minilm_dir, fast_tokenizer):
    data = qa.vader_qa(sizes=(30, 5, 5), seed=2)
    model = jaxtl.load(minilm_dir, task="question_answering")
    assert model.num_labels == 2
    arrays, facts = encode_splits(model, data)
    assert facts["answers_lost"] == 0 and facts["truncated"] == 0
    questions, contexts, answers = data.train
    for i, (q, c, (answer, start)) in enumerate(zip(questions, contexts, answers, strict=True)):
        enc = fast_tokenizer(q, c, return_offsets_mapping=True)
        seq = enc.sequence_ids()
        spans = enc["offset_mapping"]
        tokens = [t for t in range(len(seq)) if seq[t] == 1]
        first = next(t for t in tokens if spans[t][1] > start)
        last = max(t for t in tokens if spans[t][0] < start + len(answer))
        assert tuple(arrays["train"]["label"][i]) == (first, last)
        for t in range(len(seq)):
            want = spans[t] if seq[t] == 1 else (-1, -1)
            assert tuple(arrays["train"]["offsets"][i, t]) == tuple(want)
        s, e = arrays["train"]["offsets"][i, first][0], arrays["train"]["offsets"][i, last][1]
        assert c[s:e] == answer


def test_an_answer_cut_off_with_its_context_is_labelled_at_the_first_token(minilm_dir):
    model = jaxtl.load(minilm_dir, task="question_answering")
    context = "the day was long and then it ended " * 3 + "wonderful."
    encoded, counts = qa.encode(
        model.extras["tokenizer"],
        ["Which word is positive?"],
        [context],
        [("wonderful", context.index("wonderful"))],
        max_length=16,
    )
    assert counts == {"truncated": 1, "answers_lost": 1}
    assert tuple(encoded["label"][0]) == (0, 0)


def test_best_span_is_the_brute_force_best_inside_the_context():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 40, 2)).astype(np.float32)
    offsets = np.full((6, 40, 2), -1, np.int32)
    for row in range(6):
        lo, hi = rng.integers(3, 12), rng.integers(20, 40)
        offsets[row, lo:hi] = np.stack([np.arange(hi - lo) * 3, np.arange(hi - lo) * 3 + 2], -1)
    spans = best_spans(logits, offsets)
    for row in range(6):
        inside = [t for t in range(40) if offsets[row, t, 0] >= 0]
        best = max(
            ((s, e) for s in inside for e in inside if s <= e < s + 30),
            key=lambda se: logits[row, se[0], 0] + logits[row, se[1], 1],
        )
        assert (int(spans["pred_start"][row]), int(spans["pred_end"][row])) == best
        assert int(spans["char_start"][row]) == offsets[row, best[0], 0]
        assert int(spans["char_end"][row]) == offsets[row, best[1], 1]


def test_squad_exact_match_and_f1_equal_torchmetrics():
    from torchmetrics.functional.text import squad

    contexts = ["The cat sat on the mat.", "An apple, a day!", "x y z", "rain in Spain"]
    golds = ["the mat", "apple", "y", "rain in Spain"]
    spans = [(15, 22), (3, 16), (0, 1), (0, 7)]  # exact (articles), partial, wrong, partial
    rows = {
        "label": np.zeros((4, 2), int),
        "pred_start": np.zeros(4, int),
        "pred_end": np.zeros(4, int),
        "char_start": np.array([s for s, _ in spans]),
        "char_end": np.array([e for _, e in spans]),
    }
    ours = metrics.question_answering(rows, list(zip(contexts, golds, strict=True)))
    preds = [
        {"prediction_text": c[s:e], "id": str(i)}
        for i, (c, (s, e)) in enumerate(zip(contexts, spans, strict=True))
    ]
    target = [
        {"answers": {"answer_start": [c.index(g)], "text": [g]}, "id": str(i)}
        for i, (c, g) in enumerate(zip(contexts, golds, strict=True))
    ]
    theirs = squad(preds, target)
    assert ours["exact_match"] == pytest.approx(float(theirs["exact_match"]), abs=1e-4)
    assert ours["f1"] == pytest.approx(float(theirs["f1"]), abs=1e-4)
    assert 0 < ours["exact_match"] < 100 and 0 < ours["f1"] < 100


def test_length_buckets_cut_per_token_labels_and_offsets_but_not_class_labels():
    mask = np.ones((4, 16), np.int32)
    arrays = {
        "input_ids": mask,
        "attention_mask": mask,
        "label": np.zeros((4, 16), np.int32),
        "offsets": np.zeros((4, 16, 2), np.int32),
    }
    assert set(text.token_arrays(arrays)) == {"input_ids", "attention_mask", "label", "offsets"}
    soft = {**arrays, "label": np.zeros((4, 16), np.float32)}  # per-class probabilities
    assert "label" not in text.token_arrays(soft)


def test_data_of_another_task_is_refused_naming_the_task(minilm_dir):
    tagger = jaxtl.load(minilm_dir, task="token_classification", num_labels=5)
    with pytest.raises(
        ValueError, match=r"task='question_answering' \(--task question_answering\)"
    ):
        encode_splits(tagger, qa.vader_qa(sizes=(4, 2, 2)))
    classifier = jaxtl.load(minilm_dir, num_labels=2)
    with pytest.raises(ValueError, match=r"--task token_classification"):
        encode_splits(classifier, tagging.vader_tags(sizes=(4, 2, 2)))
    with pytest.raises(ValueError, match=r"num_labels=5 \(--num-labels 5\)"):
        encode_splits(
            jaxtl.load(minilm_dir, task="token_classification", num_labels=3),
            tagging.vader_tags(sizes=(4, 2, 2)),
        )


def test_conll_and_squad_files_read_and_refuse_what_they_cannot(tmp_path):
    conll = tmp_path / "ner.conll"
    sentences = [("John lives in Paris".split(), ["B-PER", "O", "O", "B-LOC"])] * 10
    conll.write_text(
        "-DOCSTART- O\n\n"
        + "\n\n".join("\n".join(f"{w} {t}" for w, t in zip(*s, strict=True)) for s in sentences)
        + "\n"
    )
    data = tagging.from_conll(str(conll))
    assert data.label_names == ["O", "B-LOC", "B-PER"] and sum(data.sizes().values()) == 10
    assert data.train[1][0] == [2, 0, 0, 1]
    bad = tmp_path / "bad.conll"
    bad.write_text("John B-PER\nlives\n")
    with pytest.raises(ValueError, match=r"line 2: 'lives' has no tag"):
        tagging.read_conll(str(bad))

    squad_file = tmp_path / "squad.json"
    qas = [{"question": "Who?", "answers": [{"text": "John", "answer_start": 0}]}] * 10
    squad_file.write_text(
        json.dumps({"data": [{"paragraphs": [{"context": "John lives here", "qas": qas}]}]})
    )
    data = qa.from_squad(str(squad_file))
    assert sum(data.sizes().values()) == 10 and data.train[2][0] == ("John", 0)
    wrong = qa.QASplits(*(([q], [c], [("Paris", 3)]) for q, c in [("Who?", "John lives here")] * 3))
    with pytest.raises(ValueError, match=r"not at character 3"):
        qa.check(wrong)
    not_squad = tmp_path / "table.json"
    not_squad.write_text(json.dumps([{"text": "a", "label": 1}]))
    with pytest.raises(ValueError, match=r"not a SQuAD JSON file"):
        qa.read_squad(str(not_squad))


def _logits(model, params, encodings):
    """Each encoding's per-token logits (unpadded), from one forward pass over all of them,
    each padded with masked zeros to the longest: one compiled program for every length."""
    keys = ("input_ids", "attention_mask", "token_type_ids")
    width = max(enc["input_ids"].shape[1] for enc in encodings)
    batch = {
        k: np.stack([np.pad(enc[k][0], (0, width - enc[k].shape[1])) for enc in encodings])
        for k in keys
    }
    logits = np.asarray(model.apply(params, batch))
    return [row[: enc["input_ids"].shape[1]] for row, enc in zip(logits, encodings, strict=True)]


def _predicted_tags(model, params, data, fast_tokenizer):
    """Word tags predicted by ``params``, aligned by transformers' ``word_ids`` (the first
    token of each word), independently of jaxtl's alignment."""
    sentences, tags = data.test
    encodings = [
        fast_tokenizer(words, is_split_into_words=True, return_tensors="np") for words in sentences
    ]
    y_true, y_pred = [], []
    for enc, logits, row in zip(encodings, _logits(model, params, encodings), tags, strict=True):
        seen, pred = set(), []
        for t, word in enumerate(enc.word_ids()):
            if word is not None and word not in seen:
                seen.add(word)
                pred.append(data.label_names[int(logits[t].argmax())])
        y_true.append([data.label_names[i] for i in row])
        y_pred.append(pred)
    return y_true, y_pred


@pytest.mark.slow
def test_a_real_tagging_finetune_scores_entities_as_seqeval_does(
    minilm_dir, fast_tokenizer, tmp_path
):
    from seqeval.metrics import f1_score

    data = tagging.vader_tags(sizes=(320, 64, 100))
    model = jaxtl.load(minilm_dir, task="token_classification", num_labels=5)
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=1e-4, seed=0)
    result = jaxtl.finetune(model, "full", data, config, str(tmp_path / "run"), verbose=False)
    y_true, y_pred = _predicted_tags(model, result.params, data, fast_tokenizer)
    theirs = f1_score(y_true, y_pred)
    shown = result.test["entity_f1"], result.test["word_accuracy"]
    print("entity F1 {:.4f}, word accuracy {:.4f}".format(*shown))
    assert result.test["entity_f1"] == pytest.approx(theirs, abs=1e-9)
    words = sum(len(t) for t in y_true)
    right = sum(
        a == b for t, p in zip(y_true, y_pred, strict=True) for a, b in zip(t, p, strict=True)
    )
    assert result.test["word_accuracy"] == pytest.approx(right / words, abs=1e-9)
    # It learned: better than tagging every word O (entity F1 0) and than the untrained head.
    untrained = f1_score(*_predicted_tags(model, model.params, data, fast_tokenizer))
    assert result.test["entity_f1"] > max(0.2, untrained + 0.1)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"]["entity_f1"] == result.test["entity_f1"]


def _predicted_answers(model, params, data, fast_tokenizer):
    """Each test question's answer text by a brute-force search over transformers' offsets."""
    questions, contexts, _ = data.test
    encodings = [
        fast_tokenizer(q, c, return_offsets_mapping=True, return_tensors="np")
        for q, c in zip(questions, contexts, strict=True)
    ]
    out = []
    for c, enc, logits in zip(contexts, encodings, _logits(model, params, encodings), strict=True):
        inside = [t for t, s in enumerate(enc.sequence_ids()) if s == 1]
        s, e = max(
            ((s, e) for s in inside for e in inside if s <= e < s + 30),
            key=lambda se: logits[se[0], 0] + logits[se[1], 1],
        )
        spans = enc["offset_mapping"][0]
        out.append(c[spans[s][0] : spans[e][1]])
    return out


@pytest.mark.slow
def test_a_real_question_answering_finetune_scores_as_torchmetrics_squad(
    minilm_dir, fast_tokenizer
):
    from torchmetrics.functional.text import squad

    data = qa.vader_qa(sizes=(320, 64, 100))
    model = jaxtl.load(minilm_dir, task="question_answering")
    config = TrainConfig(epochs=3, batch_size=16, learning_rate=1e-4, seed=0)
    # No run directory: nothing here reads one (the CLI test above checks a QA run's files).
    result = jaxtl.finetune(model, "full", data, config, None, verbose=False)

    def scores(params):
        predicted = _predicted_answers(model, params, data, fast_tokenizer)
        _, contexts, answers = data.test
        return squad(
            [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predicted)],
            [
                {"answers": {"answer_start": [a[1]], "text": [a[0]]}, "id": str(i)}
                for i, a in enumerate(answers)
            ],
        )

    theirs = scores(result.params)
    print(f"exact match {result.test['exact_match']:.1f}, F1 {result.test['f1']:.1f}")
    assert result.test["exact_match"] == pytest.approx(float(theirs["exact_match"]), abs=1e-4)
    assert result.test["f1"] == pytest.approx(float(theirs["f1"]), abs=1e-4)
    untrained = float(scores(model.params)["exact_match"])
    assert result.test["exact_match"] > max(30.0, untrained + 20.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "data", "metric"),
    [("token_classification", "vader-tags", "entity_f1"), ("question_answering", "vader-qa", "f1")],
)
def test_the_command_line_finetunes_and_evaluates_each_task(tmp_path, capsys, task, data, metric):
    tiny = make_tiny_bert(str(tmp_path / "tiny"))
    out = str(tmp_path / "out")
    argv = ["finetune", "--model", tiny, "--task", task, "--data", data, "--recipe", "full",
            "--no-scratch", "--epochs", "1", "--batch-size", "32", "--out", out]  # fmt: skip
    if task == "token_classification":
        argv += ["--num-labels", "5"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{metric} " in printed
    run = os.path.join(out, "pretrained-full")
    with open(os.path.join(run, "results.json")) as f:
        results = json.load(f)
    assert f"test {metric}" in printed  # the comparison table's column
    assert cli.main(["evaluate", run]) == 0
    printed = capsys.readouterr().out
    assert f"{metric}: {results['test'][metric]:.4f}" in printed  # rebuilt data, same score


@pytest.mark.parametrize("task", ["token_classification", "question_answering"])
def test_a_linear_probe_on_cached_features_scores_like_the_uncached_probe(tmp_path, task):
    """linear_probe with feature_cache: the per-token features are computed once, and the
    labels (and question answering's context offsets) travel beside them, so the test split
    gets the task's metrics, the same as without the cache."""
    import dataclasses

    tiny = make_tiny_bert(str(tmp_path / "tiny"), dropout=0.0)
    if task == "token_classification":
        data, options, metric = (
            tagging.vader_tags(sizes=(64, 16, 32)),
            {"num_labels": 5},
            "entity_f1",
        )
    else:
        data, options, metric = qa.vader_qa(sizes=(64, 16, 32)), {}, "f1"
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=1e-2, seed=0)
    cached = dataclasses.replace(
        config, data=dataclasses.replace(config.data, feature_cache="memory")
    )
    results = [
        jaxtl.finetune(
            jaxtl.load(tiny, task=task, **options), "linear_probe", data, c, verbose=False
        ).test  # fmt: skip
        for c in (config, cached)
    ]
    assert metric in results[1]
    assert results[1][metric] == pytest.approx(results[0][metric], abs=1e-6)
    # The cached features are computed in other batch shapes, which round differently; eight
    # steps at lr 1e-2 carry that into the fourth digit of the loss, no further.
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-4)


def test_byte_level_words_get_the_space_transformers_add_prefix_space_gives_them():
    """RoBERTa's and GPT-2's byte-level BPE tokenize a word after a space as ``Ġword``: a word
    given alone must get that space, as transformers' ``add_prefix_space=True`` (required for
    pre-split words) does, or its pieces are those of a word glued to the previous one."""
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the good movie was wonderful, the bad day awful"] * 20, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    reference = tokenizers.Tokenizer.from_str(tok.to_str())
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=reference, pad_token="<pad>")

    sentences = [["the", "good", "movie"], ["wonderful", "day", "was", "awful"]]
    tags = [[0, 1, 0], [1, 0, 0, 2]]
    ours, _ = tagging.encode(tok, sentences, tags, max_length=32)
    for i, (words, row) in enumerate(zip(sentences, tags, strict=True)):
        enc = fast(words, is_split_into_words=True)
        k = len(enc["input_ids"])
        np.testing.assert_array_equal(ours["input_ids"][i, :k], enc["input_ids"])
        word_ids = enc.word_ids()
        firsts = [
            w is not None and w != p for w, p in zip(word_ids, [None, *word_ids[:-1]], strict=True)
        ]
        expected = [row[w] if f else -100 for w, f in zip(word_ids, firsts, strict=True)]
        np.testing.assert_array_equal(ours["label"][i, :k], expected)
    # "good" is one symbol with its space, as in running text (alone it would be "go" + "od").
    assert tok.id_to_token(int(ours["input_ids"][0, 2])) == "Ġgood"
