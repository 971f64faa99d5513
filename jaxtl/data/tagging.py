"""Token classification data (NER-style tags): word-tagged sentences, their word-to-token label
alignment, a CoNLL file reader and an embedded tagging task.

A sentence is a list of words, each with one tag (``label_names[tag]``: ``"O"``, ``"B-PER"``,
``"I-PER"`` ...; the IOB2 scheme that entity-level F1 reads). The model sees sub-word tokens:
:func:`encode` tokenizes the words with the model's fast tokenizer and gives each word's *first*
token the word's tag, every other token (later pieces of a word, special tokens, padding)
:data:`~jaxtl.train.losses.IGNORE` (-100), as transformers' token-classification examples
align labels. A prediction is then one tag per word: the first token's
(:func:`jaxtl.metrics.token_classification`).

Example:
  >>> splits = vader_tags(sizes=(8, 4, 4))
  >>> words, tags = splits.train
  >>> len(words[0]) == len(tags[0]), splits.label_names[:3]
  (True, ['O', 'B-NEG', 'I-NEG'])
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from jaxtl.data.sources import SPLITS, check_split_sizes, split_indices, vader_lexicon_path
from jaxtl.data.text import pad_id, split_back

IGNORE = -100  # jaxtl.train.losses.IGNORE: a token no loss or metric counts


@dataclasses.dataclass
class TaggedSplits:
    """Word-tagged sentences per split: ``(sentences, tags)``, each a list of word lists and a
    list of tag-id lists of the same lengths; ``label_names[i]`` names tag ``i``."""

    train: tuple[list[list[str]], list[list[int]]]
    validation: tuple[list[list[str]], list[list[int]]]
    test: tuple[list[list[str]], list[list[int]]]
    label_names: list[str]
    name: str = "tags"

    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)[0]) for s in SPLITS}


def check(data: TaggedSplits) -> None:
    """Every split holds sentences of non-empty string words, one tag id per word, each a
    name in ``label_names``; errors name the split and the sentence."""
    names = data.label_names
    if not names or len(set(names)) != len(names):
        raise ValueError(f"label_names must be distinct tag names, got {names!r}.")
    for s in SPLITS:
        sentences, tags = getattr(data, s)
        if len(sentences) == 0:
            raise ValueError(
                f"The {s} split of {data.name!r} is empty; every split needs sentences."
            )
        if len(sentences) != len(tags):
            raise ValueError(
                f"The {s} split has {len(sentences)} sentences but {len(tags)} tag lists."
            )
        for i, (words, row) in enumerate(zip(sentences, tags, strict=True)):
            if len(words) == 0 or len(words) != len(row):
                raise ValueError(
                    f"{s} sentence {i} of {data.name!r} has {len(words)} words and {len(row)} "
                    "tags: give every sentence at least one word and one tag per word."
                )
            if not all(isinstance(w, str) and w for w in words):
                raise ValueError(f"{s} sentence {i} of {data.name!r} has a word that is no text.")
            bad = [t for t in row if not isinstance(t, int | np.integer) or not 0 <= t < len(names)]
            if bad:
                raise ValueError(
                    f"{s} sentence {i} of {data.name!r} has tag {bad[0]!r}; tags are ids "
                    f"0..{len(names) - 1} into label_names {names}."
                )


def encode(
    tokenizer,
    sentences: Sequence[Sequence[str]],
    tags: Sequence[Sequence[int]],
    *,
    max_length: int,
    length: int | None = None,
    pad_multiple: int = 8,
) -> tuple[dict[str, np.ndarray], int]:
    """Tokenize word lists (``is_pretokenized``) -> ``input_ids``, ``attention_mask``,
    ``token_type_ids`` and the aligned ``label`` (int32 ``[N, T]``): each word's first token
    holds its tag, every other position :data:`IGNORE`.

    Rows are padded to ``length`` (default: the longest, rounded up to ``pad_multiple``, at most
    ``max_length``). A longer sentence keeps its leading tokens and its closing special token;
    the words cut off are not scored. Returns the arrays and how many sentences were cut.
    """
    tok = tokenizer
    tok.no_padding()
    tok.no_truncation()
    space = " " if _byte_level_without_prefix(tok) else ""
    encs = tok.encode_batch(
        [[space + w for w in words] for words in sentences], is_pretokenized=True
    )
    longest = max(len(e.ids) for e in encs)
    if length is None:
        length = min(max_length, -(-longest // pad_multiple) * pad_multiple)
    length = min(length, max_length)
    pad = pad_id(tok)
    n = len(encs)
    out = {
        "input_ids": np.full((n, length), pad, np.int32),
        "attention_mask": np.zeros((n, length), np.int32),
        "token_type_ids": np.zeros((n, length), np.int32),
        "label": np.full((n, length), IGNORE, np.int32),
    }
    cut = 0
    for i, (e, row) in enumerate(zip(encs, tags, strict=True)):
        keep = list(range(len(e.ids)))
        if len(keep) > length:
            cut += 1
            keep = keep[: length - 1] + keep[-1:]  # the closing special token stays
        previous = None
        for j, k in enumerate(keep):
            out["input_ids"][i, j] = e.ids[k]
            out["attention_mask"][i, j] = 1
            out["token_type_ids"][i, j] = e.type_ids[k]
            word = e.word_ids[k]
            if word is not None and word != previous:  # a word's first token
                out["label"][i, j] = row[word]
            previous = word
    return out, cut


def _byte_level_without_prefix(tokenizer) -> bool:
    """Whether ``tokenizer`` splits bytes (GPT-2's and RoBERTa's BPE) without adding a space
    before a text. Such a tokenizer marks a word that follows a space with its own symbol
    (``Ġword``), so a word given alone would get the pieces of a word glued to the previous
    one; :func:`encode` gives each word its space, as transformers' ``add_prefix_space=True``
    (which it requires for pre-split words) does."""
    pre = tokenizer.pre_tokenizer
    if pre is None:
        return False
    state = json.loads(pre.__getstate__())
    parts = state.get("pretokenizers", [state])
    return any(p.get("type") == "ByteLevel" and not p.get("add_prefix_space") for p in parts)


def encode_splits(
    tokenizer, data: TaggedSplits, *, max_length: int
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Every split encoded to one padded length (the longest sentence of all, within the
    model's limit): ``{split: arrays}`` and facts worth logging."""
    check(data)
    every = [w for s in SPLITS for w in getattr(data, s)[0]]
    every_tags = [t for s in SPLITS for t in getattr(data, s)[1]]
    encoded, cut = encode(tokenizer, every, every_tags, max_length=max_length)
    out = split_back(encoded, [(s, len(getattr(data, s)[0])) for s in SPLITS])
    facts = {"length": int(encoded["input_ids"].shape[1]), "truncated": cut, "sizes": data.sizes()}
    return out, facts


# --- files: CoNLL ----------------------------------------------------------------------------


def read_conll(path: str, tag_column: int = -1) -> tuple[list[list[str]], list[list[str]]]:
    """Sentences and tag names from a CoNLL-style file: one word per line, its first
    whitespace-separated field the word and field ``tag_column`` (default: the last) its tag;
    a blank line ends a sentence; ``-DOCSTART-`` lines are skipped (CoNLL-2003's layout).

    Raises:
      FileNotFoundError: no such file.
      ValueError: a line with one field only, or a file with no sentence; with its line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CoNLL file not found: {path!r}.")
    sentences, tags, words, row = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if words:
                    sentences.append(words)
                    tags.append(row)
                words, row = [], []
                continue
            if len(fields) < 2:
                raise ValueError(
                    f"{path}, line {number}: {line.strip()!r} has no tag; each line is a word "
                    "and its tag separated by whitespace, a blank line between sentences."
                )
            words.append(fields[0])
            row.append(fields[tag_column])
    if words:
        sentences.append(words)
        tags.append(row)
    if not sentences:
        raise ValueError(f"{path} holds no sentence (a word and its tag per line).")
    return sentences, tags


def from_conll(path: str, *, seed: int = 0, name: str | None = None) -> TaggedSplits:
    """A CoNLL file's sentences split 80/10/10 (seeded, as every jaxtl file source), tags
    numbered ``O`` first, then the entity tags sorted."""
    sentences, names = read_conll(path)
    return split_tagged(sentences, names, seed=seed, name=name or os.path.basename(path))


def split_tagged(
    sentences: list[list[str]], tag_names: list[list[str]], *, seed: int = 0, name: str = "tags"
) -> TaggedSplits:
    """Sentences with tag *names* split 80/10/10 (:func:`~jaxtl.data.sources.split_indices`),
    the names numbered ``O`` first, then sorted."""
    check_split_sizes(len(sentences), name, "sentences")
    found = sorted({t for row in tag_names for t in row} - {"O"})
    label_names = ["O", *found]
    index = {t: i for i, t in enumerate(label_names)}
    ids = [[index[t] for t in row] for row in tag_names]
    parts = split_indices(len(sentences), seed)
    taken = [([sentences[i] for i in p], [ids[i] for i in p]) for p in parts]
    return TaggedSplits(*taken, label_names=label_names, name=name)


# --- the embedded tagging task: sentiment phrases from the VADER lexicon ---------------------

VADER_TAGS = ["O", "B-NEG", "I-NEG", "B-POS", "I-POS"]
# Neutral words around the phrases (tagged O); none of them is in the VADER lexicon.
FILLER = (
    "the a an this that it he she they we you i my our their his her its and then so or was is "
    "were are be been today yesterday morning evening at in on of to for with from about after "
    "before movie book meal trip weather service room team story game song city day night week "
    "people friends family dinner seemed looked felt sounded became really quite rather very"
).split()
_WORD = re.compile(r"[a-z]+")


def polar_words(
    sizes: tuple[int, int, int], *, seed: int, min_abs: float, path: str | None
) -> tuple[list[list[str]], list[list[str]]]:
    """The VADER lexicon's single lower-case words rated ``|mean| >= min_abs`` (none of
    :data:`FILLER`), positive and negative apart, each split 80/10/10 with ``seed``: ``(
    positive words per split, negative words per split)``, what the embedded token-level tasks
    draw from (``sizes``: the tasks' split sizes, checked here)."""
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"sizes must be three split sizes >= 1, got {sizes!r}.")
    polar = {True: [], False: []}
    with open(path or vader_lexicon_path(), encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2 or not _WORD.fullmatch(parts[0]) or parts[0] in FILLER:
                continue
            mean = float(parts[1])
            if abs(mean) >= min_abs:
                polar[mean > 0].append(parts[0])
    return tuple(
        [[words[i] for i in p] for p in split_indices(len(words), seed)]
        for words in (polar[True], polar[False])
    )


def vader_tags(
    sizes: tuple[int, int, int] = (2000, 250, 250),
    *,
    seed: int = 0,
    min_abs: float = 1.0,
    path: str | None = None,
) -> TaggedSplits:
    """Sentiment phrases tagged in sentences: a token-classification task with human labels.

    The VADER lexicon's single words rated ``|mean| >= min_abs`` by its 10 raters are split
    80/10/10 (seeded), so the test sentences' sentiment words never appear in training: the
    model must know them from pretraining. Each sentence (``sizes`` per split) is 6 to 14
    words: neutral :data:`FILLER` words (``O``) and one to three phrases of one or two words of
    one polarity (``B-POS I-POS``, ``B-NEG``), phrases never adjacent. Tags follow IOB2, so
    entity-level F1 scores whole phrases (:data:`VADER_TAGS`).
    """
    positive, negative = polar_words(sizes, seed=seed, min_abs=min_abs, path=path)
    rng = np.random.default_rng(seed)
    out = [
        _tagged_sentences(n, p, q, rng) for n, p, q in zip(sizes, positive, negative, strict=True)
    ]
    return TaggedSplits(*out, label_names=list(VADER_TAGS), name="vader-tags")


def _tagged_sentences(n: int, positive: list[str], negative: list[str], rng) -> tuple:
    sentences, tags = [], []
    for _ in range(n):
        phrases = int(rng.integers(1, 4))
        fillers = int(rng.integers(phrases + 2, 11))
        slots = np.sort(rng.choice(fillers - 1, size=phrases, replace=False)) + 1
        words, row, placed = [], [], 0
        for i in range(fillers):
            if placed < phrases and i == slots[placed]:
                placed += 1
                pos = bool(rng.integers(2))
                pool, b = (positive, 3) if pos else (negative, 1)
                for j in range(int(rng.integers(1, 3))):
                    words.append(pool[int(rng.integers(len(pool)))])
                    row.append(b if j == 0 else b + 1)
            words.append(FILLER[int(rng.integers(len(FILLER)))])
            row.append(0)
        sentences.append(words)
        tags.append(row)
    return sentences, tags
