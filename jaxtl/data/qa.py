"""Extractive question answering data: questions over contexts whose answer is a span of the
context (SQuAD's layout), the token positions of that span, a SQuAD JSON reader and an
embedded task.

An example is ``(question, context, answer_text, answer_start)``, ``answer_start`` the
answer's first character in the context. :func:`encode` tokenizes ``question [SEP] context``
as a pair with the model's fast tokenizer (a context too long for the model is cut, the
question never), and labels the answer's first and last token (``label [N, 2]``). Its
``offsets [N, T, 2]`` hold each context token's characters in the context (``-1`` for the
question, special tokens and padding): the predicted span stays inside the context and maps
back to text (:func:`jaxtl.train.losses.best_spans`, :func:`jaxtl.metrics.question_answering`).
An answer cut off with its context is labelled ``(0, 0)`` (the first token), as transformers'
question-answering examples label it, and counted.

Example:
  >>> splits = vader_qa(sizes=(4, 2, 2))
  >>> q, c, text, start = splits.train[0][0], splits.train[1][0], *splits.train[2][0]
  >>> c[start : start + len(text)] == text
  True
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from jaxtl.data.sources import SPLITS, check_split_sizes, split_indices
from jaxtl.data.tagging import FILLER, polar_words
from jaxtl.data.text import pad_id, split_back


@dataclasses.dataclass
class QASplits:
    """Questions, contexts and answers per split: ``(questions, contexts, answers)``, each
    answer ``(text, start character in its context)``."""

    train: tuple[list[str], list[str], list[tuple[str, int]]]
    validation: tuple[list[str], list[str], list[tuple[str, int]]]
    test: tuple[list[str], list[str], list[tuple[str, int]]]
    name: str = "qa"
    label_names: None = None  # no classes: run directories record None

    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)[0]) for s in SPLITS}

    def references(self, split: str) -> list[tuple[str, str]]:
        """``(context, answer text)`` per example of ``split``: what the text metrics read."""
        _, contexts, answers = getattr(self, split)
        return [(c, a[0]) for c, a in zip(contexts, answers, strict=True)]


def check(data: QASplits) -> None:
    """Every split is non-empty, its three lists equally long, every answer a non-empty span
    of its context at its start; errors name the split and the example."""
    for s in SPLITS:
        questions, contexts, answers = getattr(data, s)
        if len(questions) == 0:
            raise ValueError(
                f"The {s} split of {data.name!r} is empty; every split needs examples."
            )
        if not len(questions) == len(contexts) == len(answers):
            raise ValueError(
                f"The {s} split of {data.name!r} has {len(questions)} questions, "
                f"{len(contexts)} contexts and {len(answers)} answers; give one of each per "
                "example."
            )
        for i, (q, c, a) in enumerate(zip(questions, contexts, answers, strict=True)):
            if not isinstance(q, str) or not isinstance(c, str) or not q or not c:
                raise ValueError(
                    f"{s} example {i} of {data.name!r}: question and context are texts."
                )
            text, start = a
            if (
                not text
                or not isinstance(start, int | np.integer)
                or c[start : start + len(text)] != text
            ):
                raise ValueError(
                    f"{s} example {i} of {data.name!r}: the answer {text!r} is not at character "
                    f"{start!r} of its context; answer_start is where the answer text begins."
                )


def encode(
    tokenizer,
    questions: Sequence[str],
    contexts: Sequence[str],
    answers: Sequence[tuple[str, int]],
    *,
    max_length: int,
    pad_multiple: int = 8,
) -> tuple[dict[str, np.ndarray], dict]:
    """``question [SEP] context`` pairs -> ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (int32 ``[N, T]``), ``offsets`` (int32 ``[N, T, 2]``: context characters
    per token, ``-1`` elsewhere) and ``label`` (int32 ``[N, 2]``: the answer's first and last
    token). Contexts longer than the model's positions are cut (``only_second``).

    Returns the arrays and counts: ``truncated`` (contexts cut) and ``answers_lost`` (answers
    cut off with them, labelled ``(0, 0)``).
    """
    tok = tokenizer
    tok.no_padding()
    tok.enable_truncation(max_length, strategy="only_second")
    try:
        encs = tok.encode_batch(list(zip(questions, contexts, strict=True)))
    finally:
        tok.no_truncation()
    longest = max(len(e.ids) for e in encs)
    length = min(max_length, -(-longest // pad_multiple) * pad_multiple)
    pad = pad_id(tok)
    n = len(encs)
    out = {
        "input_ids": np.full((n, length), pad, np.int32),
        "attention_mask": np.zeros((n, length), np.int32),
        "token_type_ids": np.zeros((n, length), np.int32),
        "offsets": np.full((n, length, 2), -1, np.int32),
        "label": np.zeros((n, 2), np.int32),
    }
    truncated = lost = 0
    for i, (e, context, (text, start)) in enumerate(zip(encs, contexts, answers, strict=True)):
        k = len(e.ids)
        out["input_ids"][i, :k] = e.ids
        out["attention_mask"][i, :k] = 1
        out["token_type_ids"][i, :k] = e.type_ids
        in_context = np.array([s == 1 for s in e.sequence_ids])
        spans = np.array(e.offsets, np.int32).reshape(-1, 2)
        out["offsets"][i, :k][in_context] = spans[in_context]
        truncated += int(spans[in_context][:, 1].max(initial=0) < len(context.rstrip()))
        end = start + len(text)
        first = np.flatnonzero(in_context & (spans[:, 1] > start))
        last = np.flatnonzero(in_context & (spans[:, 0] < end))
        if len(first) == 0 or len(last) == 0 or spans[last[-1], 1] < end:
            lost += 1  # the answer is not (wholly) in what was kept
            continue
        out["label"][i] = (first[0], last[-1])
    return out, {"truncated": truncated, "answers_lost": lost}


def encode_splits(
    tokenizer, data: QASplits, *, max_length: int
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Every split encoded to one padded length: ``{split: arrays}`` and facts worth logging."""
    check(data)
    every = [sum((list(getattr(data, s)[j]) for s in SPLITS), []) for j in range(3)]
    encoded, counts = encode(tokenizer, *every, max_length=max_length)
    out = split_back(encoded, [(s, len(getattr(data, s)[0])) for s in SPLITS])
    facts = {"length": int(encoded["input_ids"].shape[1]), **counts, "sizes": data.sizes()}
    return out, facts


# --- files: SQuAD JSON ----------------------------------------------------------------------


def read_squad(path: str) -> tuple[list[str], list[str], list[tuple[str, int]]]:
    """Questions, contexts and first answers from a SQuAD-format JSON file (``{"data":
    [{"paragraphs": [{"context", "qas": [{"question", "answers": [{"text",
    "answer_start"}]}]}]}]}``); questions without an answer (SQuAD 2.0's) are skipped.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not in that layout, or holds no answered question.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SQuAD file not found: {path!r}.")
    with open(path, encoding="utf-8") as f:
        try:
            articles = json.load(f)["data"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path} is not a SQuAD JSON file (a top-level 'data' list of articles): {e}"
            ) from e
    questions, contexts, answers = [], [], []
    try:
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    if qa.get("answers"):
                        first = qa["answers"][0]
                        questions.append(qa["question"])
                        contexts.append(paragraph["context"])
                        answers.append((first["text"], int(first["answer_start"])))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: an article lacks the SQuAD field {e}.") from e
    if not questions:
        raise ValueError(f"{path} holds no answered question.")
    return questions, contexts, answers


def from_squad(path: str, *, seed: int = 0, name: str | None = None) -> QASplits:
    """A SQuAD-format file's answered questions split 80/10/10 (seeded)."""
    questions, contexts, answers = read_squad(path)
    check_split_sizes(len(questions), path, "questions")
    parts = split_indices(len(questions), seed)
    taken = [
        ([questions[i] for i in p], [contexts[i] for i in p], [answers[i] for i in p])
        for p in parts
    ]
    return QASplits(*taken, name=name or os.path.basename(path))


# --- the embedded task: which word is positive? ---------------------------------------------


def vader_qa(
    sizes: tuple[int, int, int] = (2000, 250, 250),
    *,
    seed: int = 0,
    min_abs: float = 1.5,
    path: str | None = None,
) -> QASplits:
    """Which word of a sentence is positive (or negative)? Extractive QA with human labels.

    Each context is 5 to 12 neutral :data:`~jaxtl.data.tagging.FILLER` words with one positive
    and one negative word of the VADER lexicon (rated ``|mean| >= min_abs`` by its raters)
    at seeded places; the question asks for one of the two polarities, the answer is that word.
    The lexicon's words are split 80/10/10 first, so test contexts hold only words training
    never saw: the answer comes from what the model knows of them.
    """
    positive, negative = polar_words(sizes, seed=seed, min_abs=min_abs, path=path)
    rng = np.random.default_rng(seed)
    pools = {True: positive, False: negative}
    splits = []
    for k, n in enumerate(sizes):
        questions, contexts, answers = [], [], []
        for _ in range(n):
            words = [
                FILLER[int(i)] for i in rng.integers(len(FILLER), size=int(rng.integers(5, 13)))
            ]
            a, b = sorted(rng.choice(len(words) + 1, size=2, replace=False))
            pos = pools[True][k][int(rng.integers(len(pools[True][k])))]
            neg = pools[False][k][int(rng.integers(len(pools[False][k])))]
            first, second = (pos, neg) if rng.integers(2) else (neg, pos)
            words = [*words[:a], first, *words[a:b], second, *words[b:]]
            context = " ".join(words) + "."
            asked = bool(rng.integers(2))
            answer = pos if asked else neg
            at = words.index(answer)
            start = sum(len(w) + 1 for w in words[:at])
            questions.append(f"Which word is {'positive' if asked else 'negative'}?")
            contexts.append(context)
            answers.append((answer, start))
        splits.append((questions, contexts, answers))
    return QASplits(*splits, name="vader-qa")
