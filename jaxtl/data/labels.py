"""Labels checked against the head, for every source: class ids in ``[0, num_labels)``, class
names mapped to ids, regression targets that are finite numbers.

A file's labels arrive as the Python values it holds (``"1"``, ``1.0``, ``"pos"``, ``None``), a
typed source's as an array. Every check says where the first bad label is (a file's line, an
array's example), what it holds and what to do, before anything compiles.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

_CLASS_IDS = "class ids are whole numbers 0, 1, ..., num_labels - 1"
_REGRESSION = "For a numeric target, pass task='regression' (--task regression)"


# The tasks whose data the sources build: a label per example, a number, or no label.
DATA_TASKS = ("classification", "regression", "causal_lm")


def check_task(task: str, where: str) -> None:
    """``task`` is one a data source builds for, else an error naming the valid ones (a
    misspelled ``"regresion"`` would otherwise read the labels as classes)."""
    if task not in DATA_TASKS:
        raise ValueError(
            f"{where}: task (--task) must be one of {list(DATA_TASKS)}, got {task!r}. "
            "token_classification and question_answering read data of their own: "
            "jaxtl.data.tagging (--data vader-tags or FILE.conll) and jaxtl.data.qa (--data "
            "vader-qa or squad:FILE.json)."
        )


def place(i: int, places: Sequence[str] | None) -> str:
    """Where example ``i`` is: ``places[i]`` (a file's ``"line 7"``), else ``"example i"``."""
    return places[i] if places is not None else f"example {i}"


def encode_labels(
    raw: Sequence,
    num_labels: int | None,
    task: str,
    where: str = "in data",
    places: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[str] | None]:
    """Raw labels -> array, with the label names for string labels; checked against the head.

    Whole numbers (``1``, ``"1"``, ``1.0``) are class ids and must lie in ``[0, num_labels)``;
    a column with any other string holds class names, mapped to ids in sorted order
    (``num_labels=None``: as many classes as names, or the largest id + 1). Regression labels
    must be finite numbers. ``where`` (``"in data.csv"``) and ``places`` (one per label,
    ``"line 7"``) place a bad label in the error.
    """
    if task == "regression":
        return regression_targets(raw, where, places), None
    ids, names = class_ids(raw, where, places)
    num_labels = head_width(num_labels, names, ids)
    if names is not None:  # class names, as the user wrote them, rather than their ids
        check_label_count(names, num_labels, f"The label column {where}")
    check_ids(ids, num_labels, where, places)
    return ids, names


def head_width(num_labels: int | None, names: Sequence[str] | None, ids: np.ndarray) -> int:
    """``num_labels``, or when it is ``None`` the width the labels ask for: the number of
    class names, else the largest class id + 1."""
    if num_labels is not None:
        return num_labels
    return len(names) if names else max(int(ids.max()) + 1 if ids.size else 1, 1)


def class_ids(
    raw: Sequence, where: str, places: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str] | None]:
    """``(int32 ids, None)`` for whole numbers, ``(ids, sorted names)`` for class names."""
    for i, x in enumerate(raw):
        if x is None or (isinstance(x, str) and not x.strip()):
            raise ValueError(
                f"Labels {where}: {place(i, places)} has no label. Fill it in or drop it."
            )
        if isinstance(x, list | tuple | dict | np.ndarray):
            raise ValueError(
                f"Labels {where} must be one class id per example, but {place(i, places)} "
                f"holds {show_value(x)}. For one-hot labels pass the index of the 1 "
                f"(one_hot.argmax(-1)); {_CLASS_IDS}."
            )
    numbers = _numbers(raw)
    if numbers is None:
        names = sorted({str(x) for x in raw})
        index = {n: i for i, n in enumerate(names)}
        return np.asarray([index[str(x)] for x in raw], np.int32), names
    return whole_ids(numbers, where, places, "numbers with a fraction"), None


def _numbers(raw: Sequence) -> np.ndarray | None:
    """Every label as a float64 (JSON ``true`` / ``false`` as 1 / 0), or ``None`` when one is a
    string that is no number: then the labels are class names."""
    out = np.empty(len(raw), np.float64)
    for i, x in enumerate(raw):
        if isinstance(x, int | float | np.integer | np.floating | np.bool_):
            out[i] = x
            continue
        try:
            out[i] = float(str(x).strip())
        except ValueError:
            return None
    return out


def whole_ids(
    values: np.ndarray,
    where: str,
    places: Sequence[str] | None,
    found: str,
    fix: str = "fix the labels",
) -> np.ndarray:
    """Float labels as int32 class ids when each is a whole number (1.0 reads as 1); a fraction,
    NaN or inf is an error rather than an id silently truncated."""
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"Labels {where} are {found}, not integer class ids; {fix} ({place(i, places)} "
            f"holds {values[i]:g}; {_CLASS_IDS}). {_REGRESSION}."
        )
    return values.astype(np.int32)


def check_ids(
    ids: np.ndarray, num_labels: int, where: str, places: Sequence[str] | None = None
) -> None:
    """Every id in ``[0, num_labels)``, else an error naming the first one outside."""
    if (ids < 0).any():
        i = int(np.flatnonzero(ids < 0)[0])
        negative = sorted(set(ids[ids < 0].tolist()))[:5]
        raise ValueError(
            f"Labels {where} include negative class ids {negative} ({place(i, places)} holds "
            f"{ids[i]}); {_CLASS_IDS}. Fix or drop those examples (-1 often marks unlabeled "
            "ones)."
        )
    if (ids >= num_labels).any():
        i = int(np.flatnonzero(ids >= num_labels)[0])
        found = sorted(set(ids[ids >= num_labels].tolist()))[:10]
        need = int(ids.max()) + 1
        raise ValueError(
            f"Labels {where} must be in [0, {num_labels}) for a {num_labels}-way head; found "
            f"{found} ({place(i, places)} holds {ids[i]}). Pass num_labels={need} "
            f"(--num-labels {need}) or fix the labels."
        )


def regression_targets(raw: Sequence, where: str, places: Sequence[str] | None = None):
    """Raw values (a file's) -> finite float32 targets."""
    values = np.empty(len(raw), np.float32)
    for i, x in enumerate(raw):
        try:
            values[i] = float(x)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"Regression labels {where} must be numbers, but {place(i, places)} holds "
                f"{show_value(x)}. Fix or drop it."
            ) from e
    check_finite(values, f"Regression labels {where}", places)
    return values


def check_finite(values: np.ndarray, what: str, places: Sequence[str] | None = None) -> None:
    """No NaN or inf in ``values`` (one row per example): they would turn every loss and
    gradient they touch into NaN, silently, after compiling."""
    bad = ~np.isfinite(values)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise ValueError(
            f"{what} hold NaN or inf: {int(bad.sum())} value(s), the first in "
            f"{place(int(first[0]), places)} ({values[tuple(first)]}). Replace them "
            "(np.nan_to_num) or drop those examples."
        )


def check_labels(
    raw,
    task: str,
    where: str,
    *,
    fix_shape: str = "name the label feature with label_key= (--label-column)",
    fix_type: str = "store them as a ClassLabel feature",
) -> np.ndarray:
    """Labels as a typed source (TFDS, Hugging Face, arrays) holds them, checked: one value per
    example, integer class ids (int32; whole floats accepted) or, for regression, finite
    numbers (float32).

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
        check_finite(values, f"Regression labels {where}")
        return values.astype(np.float32)
    if np.issubdtype(values.dtype, np.floating):
        return whole_ids(values, where, None, str(values.dtype), fix_type)
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


def labels_for_head(
    raw: Any,
    task: str,
    num_labels: int | None,
    where: str,
    *,
    label_names: Sequence[str] | None = None,
    fix_shape: str = "name the label column with label_column= (--label-column)",
    fix_type: str = "store them as a ClassLabel feature",
) -> tuple[np.ndarray, list[str] | None]:
    """Labels checked against the head: ``(int32 class ids, label names)``, or float32 values
    for regression.

    Class-name strings become ids in sorted order (as in CSV files); integer ids must lie in
    ``[0, num_labels)``, where ``num_labels`` defaults to the number of names or the largest
    id + 1. ``where`` (``"'label' of NAME"``) places the labels in error messages.
    """
    values = np.asarray(raw)
    if task == "regression":
        return check_labels(values, task, where, fix_shape=fix_shape, fix_type=fix_type), None
    names = None if label_names is None else list(label_names)
    if values.ndim == 1 and values.dtype.kind in "USO":
        ids, strings = class_ids(values.tolist(), where)
        names = strings if strings is not None else names
    else:
        ids = check_labels(values, task, where, fix_shape=fix_shape, fix_type=fix_type)
    num_labels = head_width(num_labels, names, ids)
    # The names first: a class the head has no output for is named, not given as its id.
    check_label_count(names, num_labels, f"Label column {where}")
    check_ids(ids, num_labels, where)
    return ids, names


def show_value(x: Any) -> str:
    """A value as the user wrote it: JSON's ``null`` and ``[0, 1]`` rather than Python's."""
    try:
        text = json.dumps(x)
    except (TypeError, ValueError):
        text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."
