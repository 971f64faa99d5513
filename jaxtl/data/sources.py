"""Labeled text sources: the embedded VADER lexicon and user CSV / JSONL files.

A source returns a :class:`TextSplits`: train / validation / test lists of texts with labels.
Validation of what a user handed us happens here (a file's rows) and in
:mod:`jaxtl.data.labels` (its labels), on the host, before anything compiles; errors name the
file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxtl.data.labels import check_task, encode_labels, show_value

SPLITS = ("train", "validation", "test")  # every source's three splits, in this order


@dataclasses.dataclass
class TextSplits:
    """Texts and labels per split; ``label_names[i]`` names integer label ``i`` (classification).
    Unlabeled text (for a causal LM) has ``None`` in place of each labels array."""

    train: tuple[list[str], np.ndarray | None]
    validation: tuple[list[str], np.ndarray | None]
    test: tuple[list[str], np.ndarray | None]
    label_names: list[str] | None = None
    name: str = "data"

    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)[0]) for s in ("train", "validation", "test")}


def split_indices(n: int, seed: int = 0, fractions=(0.8, 0.1)) -> tuple[np.ndarray, ...]:
    """Permute ``range(n)`` with ``default_rng(seed)``: first 80% train, next 10% val, rest test."""
    perm = np.random.default_rng(seed).permutation(n)
    a, b, _ = split_sizes(n, fractions)
    return perm[:a], perm[a : a + b], perm[a + b :]


def split_sizes(n: int, fractions=(0.8, 0.1)) -> tuple[int, int, int]:
    """How many of ``n`` examples :func:`split_indices` puts in train, validation and test."""
    a, b = int(n * fractions[0]), int(n * fractions[1])
    return a, b, n - a - b


def check_split_sizes(n: int, name: str, unit: str = "examples") -> None:
    """Refuse ``n`` examples too few for every 80/10/10 split to hold one, saying how many it
    takes (``unit``: what the user counts, e.g. a file's ``"rows"``)."""
    empty = [s for s, k in zip(SPLITS, split_sizes(n), strict=True) if k == 0]
    if empty:
        need = next(m for m in range(1, 1000) if min(split_sizes(m)) > 0)
        raise ValueError(
            f"The dataset {name!r} has {n} {unit}, too few to split 80/10/10: the "
            f"{' and '.join(empty)} split would be empty. It takes at least {need} {unit}: "
            f"add {unit}."
        )


def default_splits(available: Sequence[str]) -> tuple[str, str, str]:
    """Train / validation / test expressions from the splits a dataset has: its own
    ``validation`` and ``test`` when present, otherwise carved from ``train`` by slicing
    (TFDS / Hugging Face split expressions)."""
    if "train" not in available:
        raise ValueError(
            f"The dataset has no 'train' split (it has {list(available)}); name the splits "
            "with splits= (--splits TRAIN,VALIDATION,TEST)."
        )
    has_val = "validation" in available
    has_test = "test" in available
    if has_val and has_test:
        return "train", "validation", "test"
    if has_test:
        return "train[:90%]", "train[90%:]", "test"
    if has_val:
        return "train[:90%]", "validation", "train[90%:]"
    return "train[:80%]", "train[80%:90%]", "train[90%:]"


def pick_column(
    columns: Mapping[str, Any],
    wanted: str | None,
    accept: Callable[[Any], bool],
    what: str,
    flag: str,
    noun: str = "column",
) -> str:
    """``wanted`` if ``columns`` has it, else the only column whose type ``accept``s.

    Raises ValueError naming the columns there are: for an unknown ``wanted``, and when zero or
    several columns qualify (the fix is ``flag``).
    """
    names = list(columns.keys())
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"The dataset has no {noun} {wanted!r} ({what}); it has {names}.")
        return wanted
    hits = [k for k in names if accept(columns[k])]
    if len(hits) != 1:
        raise ValueError(
            f"Cannot tell which {noun} is the {what}: {len(hits)} candidates among {names}. "
            f"Name it with {flag}."
        )
    return hits[0]


def _take(texts: Sequence[str], labels: np.ndarray | None, idx: np.ndarray):
    return [texts[i] for i in idx], None if labels is None else labels[idx]


def split(texts, labels=None, *, seed=0, label_names=None, name="data") -> TextSplits:
    """Split one list of texts (labeled, or not for a causal LM) 80/10/10 with
    :func:`split_indices`."""
    labels = None if labels is None else np.asarray(labels)
    if len(texts) == 0:
        raise ValueError(f"The dataset {name!r} is empty: there is nothing to train on.")
    check_split_sizes(len(texts), name)
    tr, va, te = split_indices(len(texts), seed)
    return TextSplits(
        train=_take(texts, labels, tr),
        validation=_take(texts, labels, va),
        test=_take(texts, labels, te),
        label_names=label_names,
        name=name,
    )


# --- the embedded default: VADER sentiment lexicon ----------------------------------------------


def vader_lexicon_path() -> str:
    try:
        import vaderSentiment
    except ImportError as e:
        raise ImportError(
            "The embedded demo data is the VADER lexicon from the 'vaderSentiment' package. "
            "Install it with: pip install 'jaxtl[demo]' (or pip install vaderSentiment)."
        ) from e
    return os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")


def vader(path: str | None = None, min_abs: float = 0.5) -> TextSplits:
    """Positive vs negative on the VADER lexicon, with the split every toolkit compares on.

    Keeps entries with ``|mean rating| >= 0.5`` in file order (6,817), label = mean > 0,
    permutes with ``numpy.random.default_rng(0)``; 80% train, 10% validation, 10% test.
    """
    texts, labels = [], []
    with open(path or vader_lexicon_path(), encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                continue
            mean = float(parts[1])
            if abs(mean) >= min_abs:
                texts.append(parts[0])
                labels.append(int(mean > 0))
    return split(
        texts, np.asarray(labels, np.int32), label_names=["negative", "positive"], name="vader"
    )


# --- user files -----------------------------------------------------------------------------------


def read_table(
    path: str, text_column: str = "text", label_column: str | None = "label"
) -> tuple[list[str], list | None]:
    """Read texts and raw labels from a ``.csv`` or ``.jsonl``/``.json`` file with named columns
    (``label_column=None``: texts only, labels ``None``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: what is wrong with the file, at its line: a quote left open, a row with more
        or fewer fields than the header, a column named twice, a line that is no JSON object,
        a missing column, or a text that is not a string.
    """
    texts, labels, _ = _read_table(path, text_column, label_column)
    return texts, labels


def _read_table(path: str, text_column: str, label_column: str | None):
    """Texts, raw labels and where each row is (``"line 7"``), for errors about its label."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Data file not found: {path!r} (data / --data). Pass an existing .csv or .jsonl "
            "file, an image or audio folder, tfds:NAME, hf:DIR, or an embedded set: vader, "
            "vader-tags, vader-qa, digits, digits-segmentation."
        )
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        records = _csv_records(path, text_column, label_column)
    elif ext in (".jsonl", ".json"):
        records = _jsonl_records(path)
        for n, row in records:
            _check_columns(f"{path}, line {n}", list(row), text_column, label_column)
    else:
        raise ValueError(f"Unsupported data file type {ext!r} for {path!r}: use .csv or .jsonl.")
    if not records:
        raise ValueError(f"The data file {path!r} has no rows: there is nothing to train on.")
    for n, row in records:
        if not isinstance(row[text_column], str):
            raise ValueError(
                f"{path}, line {n}: the text column {text_column!r} holds "
                f"{show_value(row[text_column])}, not a string. Write the text as a string, drop "
                "the row, or name another column with text_column= (--text-column)."
            )
    texts = [row[text_column] for _, row in records]
    labels = None if label_column is None else [row[label_column] for _, row in records]
    return texts, labels, [f"line {n}" for n, _ in records]


_CSV_FIX = (
    'Quote a field that holds a comma or a line break ("a, b"), and write a quote inside a '
    'quoted field as two ("").'
)


def _csv_records(path: str, text_column: str, label_column: str | None):
    """``[(line, {column: field})]``: every row checked against the header at its line.

    The reader is strict: without it a quote left open swallows the rest of the file into one
    field, and the run fails later, far from the cause (an empty validation split).
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)
        rows, start = [], 1
        try:
            for row in reader:
                if row:  # a blank line
                    rows.append((start, reader.line_num, row))
                start = reader.line_num + 1
        except csv.Error as e:
            raise ValueError(
                f"{path}, line {start}: a quoted field that starts here does not end where it "
                f"should (csv: {e}; read through line {reader.line_num}). A field that starts "
                f"with a quote must end with one right before a comma or the line's end. "
                f"{_CSV_FIX}"
            ) from e
    header = rows[0][2] if rows else []
    _check_columns(path, header, text_column, label_column)
    for column in (text_column, label_column):
        at = [i + 1 for i, c in enumerate(header) if c == column]
        if len(at) > 1:
            raise ValueError(
                f"{path}, line {rows[0][0]}: the header names column {column!r} {len(at)} "
                f"times (columns {at}), so which one to read is ambiguous. Rename the others."
            )
    for start, end, row in rows[1:]:
        if len(row) != len(header):
            spans = (
                f" The row runs on to line {end}: a quote opened on line {start} may be left open."
                if end > start
                else ""
            )
            raise ValueError(
                f"{path}, line {start}: {len(row)} field(s), but the header (line {rows[0][0]}) "
                f"has {len(header)}: {header}.{spans} Give every row one field per column. "
                f"{_CSV_FIX}"
            )
    return [(start, dict(zip(header, row, strict=True))) for start, _, row in rows[1:]]


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
_JSONL_FIX = 'Each line must hold one JSON object, such as {"text": "...", "label": 0}.'


def _jsonl_records(path: str) -> list[tuple[int, dict]]:
    """``[(line, record)]`` of a JSON Lines file, blank lines skipped."""
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            # A .json file written by json.dump is one array, not JSON Lines.
            first = not records and line.lstrip()[:1] == "["
            array = (
                " The file looks like one JSON array: write one object per line." if first else ""
            )
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}). "
                    f"{_JSONL_FIX}{array} Fix or remove the line."
                ) from e
            if not isinstance(record, dict):
                kind = _JSON_TYPES.get(type(record), "number")
                raise ValueError(
                    f"{path}, line {n}: a JSON {kind} ({show_value(record)}), not an object. "
                    f"{_JSONL_FIX}{array}"
                )
            records.append((n, record))
    return records


def _check_columns(where: str, columns, text_column: str, label_column: str | None) -> None:
    missing = [c for c in (text_column, label_column) if c is not None and c not in columns]
    if missing:
        raise ValueError(
            f"{where} has no column(s) {missing}; found {list(columns)}. "
            "Name the columns with text_column= / label_column= (--text-column / --label-column)."
        )


def from_table(
    path,
    *,
    text_column="text",
    label_column="label",
    num_labels=None,
    task="classification",
    seed=0,
) -> TextSplits:
    """A user file (.csv, or .jsonl of JSON objects) split 80/10/10 like the embedded data;
    ``task="causal_lm"`` reads only the text column.

    Labels are class ids or class names (mapped to ids in sorted order), or numbers for
    ``task="regression"``. ``num_labels`` is the head's width, which the class ids must fit;
    ``None`` (the default, as in :func:`jaxtl.data.from_arrays`) takes it from the labels.
    """
    check_task(task, f"from_table({path!r})")
    name = os.path.basename(path)
    if task == "causal_lm":
        texts, _, _ = _read_table(path, text_column, None)
        check_split_sizes(len(texts), path, "rows")
        return split(texts, None, seed=seed, name=name)
    texts, raw, places = _read_table(path, text_column, label_column)
    labels, names = encode_labels(raw, num_labels, task, f"in {path}", places)
    check_split_sizes(len(texts), path, "rows")
    return split(texts, labels, seed=seed, label_names=names, name=name)
