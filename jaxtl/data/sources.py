"""Labeled text sources: the embedded VADER lexicon and user CSV / JSONL files.

A source returns a :class:`TextSplits`: train / validation / test lists of texts with labels.
Validation of what a user handed us happens here, on the host, before anything compiles.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

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
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    return perm[:a], perm[a:b], perm[b:]


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
    (``label_column=None``: texts only, labels ``None``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Data file not found: {path!r}. Pass an existing .csv or .jsonl file."
        )
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            _check_columns(path, columns, text_column, label_column)
            rows = list(reader)
    elif ext in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not a JSON object per line ({e}).") from e
        for n, row in enumerate(rows, 1):
            _check_columns(f"{path} (record {n})", list(row), text_column, label_column)
    else:
        raise ValueError(f"Unsupported data file type {ext!r} for {path!r}: use .csv or .jsonl.")
    if not rows:
        raise ValueError(f"The data file {path!r} has no rows: there is nothing to train on.")
    texts = [str(r[text_column]) for r in rows]
    return texts, None if label_column is None else [r[label_column] for r in rows]


def _check_columns(where: str, columns, text_column: str, label_column: str | None) -> None:
    missing = [c for c in (text_column, label_column) if c is not None and c not in columns]
    if missing:
        raise ValueError(
            f"{where} has no column(s) {missing}; found {list(columns)}. "
            "Name the columns with text_column= / label_column= (--text-column / --label-column)."
        )


def encode_labels(raw: Sequence, num_labels: int, task: str, where: str = "data"):
    """Raw labels -> array, with the label names for string labels; checked against the head.

    Integer-like labels must lie in ``[0, num_labels)``. String labels are mapped to integers in
    sorted order. Regression labels must be numbers.
    """
    if task == "regression":
        try:
            return np.asarray([float(x) for x in raw], np.float32), None
        except (TypeError, ValueError) as e:
            raise ValueError(f"Regression labels in {where} must be numbers ({e}).") from e
    try:
        ints = np.asarray([int(str(x).strip()) for x in raw], np.int64)
        names = None
    except ValueError:
        names = sorted({str(x) for x in raw})
        index = {n: i for i, n in enumerate(names)}
        ints = np.asarray([index[str(x)] for x in raw], np.int64)
    bad = (ints < 0) | (ints >= num_labels)
    if bad.any():
        found = sorted(set(ints[bad].tolist()))[:10]
        need = int(ints.max()) + 1
        raise ValueError(
            f"Labels in {where} must be in [0, {num_labels}) for a {num_labels}-way head; found "
            f"{found}. Pass num_labels={need} (--num-labels {need}) or fix the labels."
        )
    return ints.astype(np.int32), names


def check_labels(
    raw,
    task: str,
    where: str,
    *,
    fix_shape: str = "name the label feature with label_key= (--label-column)",
    fix_type: str = "store them as a ClassLabel feature",
) -> np.ndarray:
    """Labels as a typed source (TFDS, Hugging Face, arrays) holds them, checked: one value per
    example, integer class ids (int32) or, for regression, numbers (float32).

    ``where`` names them in errors (``"'label' of split 'train'"``); ``fix_shape`` and
    ``fix_type`` say what to do about labels of the wrong shape or type.
    """
    values = np.asarray(raw)
    if values.ndim != 1:
        raise ValueError(
            f"Labels {where} are not one value per example (each has shape "
            f"{values.shape[1:]}); {fix_shape}."
        )
    if task == "regression":
        if not np.issubdtype(values.dtype, np.number):
            raise ValueError(f"Regression labels {where} are not numbers.")
        return values.astype(np.float32)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"Labels {where} are {values.dtype}, not integer class ids; {fix_type}.")
    return values.astype(np.int32)


def check_label_count(names: Sequence[str] | None, num_labels: int | None, where: str) -> None:
    """Named classes must match the head's width (no check when either is unknown)."""
    if names is not None and num_labels is not None and len(names) != num_labels:
        raise ValueError(
            f"{where} has {len(names)} distinct labels {list(names)[:10]} but the head has "
            f"{num_labels} outputs. Pass num_labels={len(names)} (--num-labels {len(names)})."
        )


def from_table(
    path, *, text_column="text", label_column="label", num_labels=2, task="classification", seed=0
) -> TextSplits:
    """A user file split 80/10/10 like the embedded data; ``task="causal_lm"`` reads only the
    text column."""
    if task == "causal_lm":
        texts, _ = read_table(path, text_column, None)
        return split(texts, None, seed=seed, name=os.path.basename(path))
    texts, raw = read_table(path, text_column, label_column)
    labels, names = encode_labels(raw, num_labels, task, where=path)
    check_label_count(names, num_labels, path)
    return split(texts, labels, seed=seed, label_names=names, name=os.path.basename(path))
