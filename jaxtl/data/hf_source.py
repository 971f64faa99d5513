"""Hugging Face ``datasets``: a ``Dataset`` or ``DatasetDict`` in memory, or saved on disk.

:func:`from_hf` reads one in memory; :func:`load_from_disk` (``--data hf:DIR``) reads a
directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``. Nothing is
downloaded. The ``datasets`` package is optional: ``pip install 'jaxtl[hf]'``.

A ``Dataset`` is split 80/10/10 with :func:`~jaxtl.data.sources.split_indices`, like the CSV /
JSONL sources. A ``DatasetDict`` keeps its own ``train`` / ``validation`` / ``test`` splits; a
missing one is carved from ``train`` (:func:`~jaxtl.data.sources.default_splits`), or
``splits`` names three split expressions (``train[:90%]``, ``train[100:200]+test``) in the
syntax that ``datasets.load_dataset(split=...)`` and TFDS share.

A string column becomes :class:`~jaxtl.data.sources.TextSplits`; an ``Image`` column (decoded
by PIL to ``[H, W, C]`` uint8) or a numeric array column of rank 2 or 3 becomes
:class:`~jaxtl.data.images.ImageSplits`. A ``ClassLabel`` column gives the label names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtl.data import arrays
from jaxtl.data.images import ImageSplits, pil_arrays
from jaxtl.data.labels import labels_for_head
from jaxtl.data.sources import SPLITS, TextSplits, default_splits, pick_column

PREFIX = "hf:"
INSTALL = "pip install 'jaxtl[hf]' (or pip install datasets)"


def require_datasets():
    """The ``datasets`` module, or an ImportError that names the install command."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "Reading Hugging Face datasets needs the 'datasets' package, which is not "
            f"installed. Install it with {INSTALL}."
        ) from e
    return datasets


def load_from_disk(path: str, **options: Any) -> TextSplits | ImageSplits:
    """A ``Dataset`` or ``DatasetDict`` saved with ``save_to_disk``, read with :func:`from_hf`
    (``options`` are its keyword arguments)."""
    datasets = require_datasets()
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Hugging Face dataset directory not found: {path!r}. Pass a directory written by "
            "Dataset.save_to_disk or DatasetDict.save_to_disk."
        )
    try:
        data = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise ValueError(
            f"{path!r} is not a saved Hugging Face dataset (it holds "
            f"{sorted(os.listdir(path))[:8]}). Write one with Dataset.save_to_disk(DIR) or "
            "DatasetDict.save_to_disk(DIR); for "
            "an image folder pass the directory itself, without hf:."
        ) from e
    options.setdefault("name", PREFIX + os.path.basename(os.path.normpath(path)))
    return from_hf(data, **options)


def from_hf(
    data: Any,
    *,
    input_column: str | None = None,
    label_column: str | None = None,
    splits: Sequence[str] | None = None,
    seed: int = 0,
    task: str = "classification",
    num_labels: int | None = None,
    modality: str | None = None,
    name: str | None = None,
) -> TextSplits | ImageSplits:
    """A Hugging Face ``Dataset`` or ``DatasetDict`` as train / validation / test splits.

    Args:
      data: a ``datasets.Dataset`` (split 80/10/10 by ``seed``) or ``datasets.DatasetDict``.
      input_column: the text or image column; default the only one (see ``modality``).
      label_column: default the only ``ClassLabel`` column, else ``"label"``. Not read for
        ``task="causal_lm"``.
      splits: for a ``DatasetDict``, three split expressions (train, validation, test);
        default its own splits, with missing ones carved from a ``seed``-shuffled ``train``.
      seed: the permutation that splits a ``Dataset`` or carves missing splits.
      task: the head's task; regression reads numeric labels as float32.
      num_labels: the head's width; class ids must lie in ``[0, num_labels)`` (default: the
        ``ClassLabel``'s classes, or inferred).
      modality: ``"text"`` or ``"image"`` (what the model reads) narrows the default input.
      name: the dataset's name in reports.

    Raises:
      ImportError: ``datasets`` is not installed.
      ValueError: an unknown or ambiguous column, a bad or empty split, labels that are not
        one class id per example (or outside the head).

    Example:
      >>> import datasets
      >>> from jaxtl.data import from_hf
      >>> ds = datasets.Dataset.from_dict({"text": ["good", "bad"] * 10, "label": [1, 0] * 10})
      >>> from_hf(ds).sizes()
      {'train': 16, 'validation': 2, 'test': 2}
    """
    datasets = require_datasets()
    if isinstance(data, datasets.DatasetDict):
        parts = select_splits(data, splits, seed)
    elif isinstance(data, datasets.Dataset):
        if splits is not None:
            raise ValueError(
                "splits name the splits of a DatasetDict; a Dataset is split 80/10/10 by seed. "
                "Drop splits (--splits), or pass a DatasetDict."
            )
        parts = [data]
    else:
        raise TypeError(
            f"Expected a datasets.Dataset or datasets.DatasetDict, got {type(data).__name__}. "
            "For NumPy arrays or dicts of them use jaxtl.data.from_arrays; materialize an "
            "IterableDataset first (datasets.Dataset.from_generator)."
        )
    title = name or _name(parts[0])
    features = parts[0].features
    label = None if task == "causal_lm" else _label_column(features, label_column, datasets)
    column = input_column_of(features, input_column, modality, datasets, exclude=label)
    for part in parts[1:]:
        missing = [c for c in (column, label) if c is not None and c not in part.features]
        if missing:
            raise ValueError(
                f"{title}: a split has no column(s) {missing}; it has {list(part.features)}."
            )
    kind, inputs = arrays.as_inputs(_read_inputs(parts, column, datasets), title)
    labels, label_names = None, None
    if label is not None:
        feature = features[label]
        label_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        labels, label_names = _labels(parts, label, feature, task, num_labels, label_names, title)
    if task == "causal_lm" and kind != "text":
        raise ValueError(f"{title}: a causal LM reads text, but {column!r} holds images.")
    if len(parts) == 1:
        return arrays.split_examples(inputs, labels, seed=seed, label_names=label_names, name=title)
    ends = np.cumsum([len(p) for p in parts])
    pieces = []
    for start, end in zip((0, *ends[:-1]), ends, strict=True):
        x = inputs[start:end]
        pieces.append((x, None if labels is None else labels[start:end]))
    if kind == "text":
        return TextSplits(*pieces, label_names=label_names, name=title)
    return ImageSplits(*pieces, label_names=label_names, name=title)


def select_splits(data: Mapping, splits: Sequence[str] | None, seed: int = 0) -> list:
    """Three ``Dataset``s (train, validation, test) of a ``DatasetDict``, each non-empty."""
    datasets = require_datasets()
    sizes = {k: len(v) for k, v in data.items()}
    chosen = tuple(splits) if splits is not None else default_splits(list(data))
    if len(chosen) != 3:
        raise ValueError(f"splits must be three expressions (train, validation, test): {chosen}.")
    if splits is None and chosen != ("train", "validation", "test"):
        # Unlike TFDS, which shuffles when it prepares a dataset, a saved train split keeps the
        # order it was written in (often sorted by label); carve from a seeded shuffle of it.
        perm = np.random.default_rng(seed).permutation(sizes["train"])
        data = {**data, "train": data["train"].select(perm)}
    parts = []
    for role, expr in zip(SPLITS, chosen, strict=True):
        try:
            instructions = datasets.ReadInstruction.from_spec(expr).to_absolute(sizes)
        except (ValueError, AssertionError) as e:
            raise ValueError(
                f"Bad split expression {expr!r} for the {role} split: {e} The DatasetDict has "
                f"{sizes} examples per split; expressions look like train, train[:90%] or "
                "train[100:200]+test."
            ) from e
        pieces = []
        for ins in instructions:
            start = ins.from_ or 0
            end = sizes[ins.splitname] if ins.to is None else ins.to
            # select(range(n, n)) of an n-row split is an IndexError in datasets 5.
            pieces.append(data[ins.splitname].select(range(start, end) if end > start else []))
        part = pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
        if len(part) == 0:
            raise ValueError(
                f"The {role} split {expr!r} is empty ({sizes} examples per split); name "
                "non-empty splits with splits= (--splits TRAIN,VALIDATION,TEST)."
            )
        parts.append(part)
    return parts


def input_kind(feature: Any, datasets: Any) -> str | None:
    """``"text"`` (a string ``Value``), ``"image"`` (an ``Image``, or numbers of rank 2 or 3:
    ``Array2D`` / ``Array3D`` or nested lists) or ``None``."""
    if isinstance(feature, datasets.Value):
        return "text" if feature.dtype in ("string", "large_string") else None
    if isinstance(feature, datasets.Image):
        return "image"
    rank, leaf = _array_type(feature, datasets)
    return "image" if rank in (2, 3) and _numeric(leaf) else None


def _array_type(feature: Any, datasets: Any) -> tuple[int, str | None]:
    """(rank, leaf dtype) of an array column, (0, None) for anything else."""
    fixed = tuple(getattr(datasets, f"Array{n}D") for n in (2, 3, 4, 5))
    if isinstance(feature, fixed):
        return len(feature.shape), feature.dtype
    lists = tuple(
        getattr(datasets, n) for n in ("List", "Sequence", "LargeList") if hasattr(datasets, n)
    )
    rank = 0
    while isinstance(feature, lists) and not isinstance(feature.feature, dict):
        feature, rank = feature.feature, rank + 1
    if rank and isinstance(feature, datasets.Value):
        return rank, feature.dtype
    return 0, None


def _numeric(dtype: str | None) -> bool:
    try:
        return dtype is not None and np.dtype(dtype).kind in "uif"
    except TypeError:
        return False


def input_column_of(
    features: Mapping,
    wanted: str | None,
    modality: str | None,
    datasets: Any,
    exclude: str | None = None,
) -> str:
    """The input column: ``wanted``, or the only text / image column (of ``modality``) other
    than ``exclude`` (the label column: class names are strings too)."""
    kinds = {k: input_kind(f, datasets) for k, f in features.items()}
    what = {"text": "text", "image": "image"}.get(modality, "text or image") + " input"

    def accept(k: str) -> bool:
        return k != exclude and kinds[k] is not None and modality in (None, kinds[k])

    flag = "input_column= (--text-column)"
    column = pick_column({k: k for k in features}, wanted, accept, what, flag)
    if kinds[column] is None:
        raise ValueError(
            f"Column {column!r} ({features[column]}) is neither text (a string Value) nor an "
            "image (an Image feature, or numbers of shape [H, W] or [H, W, C]); name the input "
            f"column with {flag}."
        )
    if modality is not None and kinds[column] != modality:
        raise ValueError(
            f"Column {column!r} holds {kinds[column]}s, but the model reads {modality}; name a "
            f"{modality} column with {flag}, or pass a {kinds[column]} model."
        )
    return column


def _label_column(features: Mapping, wanted: str | None, datasets) -> str:
    class_labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if wanted is None and not class_labels and "label" in features:
        wanted = "label"  # the name Dataset.from_dict data and CSV files usually give it
    column = pick_column(
        features,
        wanted,
        lambda f: isinstance(f, datasets.ClassLabel),
        "label",
        "label_column= (--label-column)",
    )
    rank, _ = _array_type(features[column], datasets)
    if rank:
        raise ValueError(
            f"Label column {column!r} holds a list per example ({features[column]}); the head "
            "needs one label per example. Name another column with label_column= "
            "(--label-column)."
        )
    return column


def _column(part, column: str, numpy: bool = False):
    """One column of a split, whole: a list (python format) or an array (numpy format)."""
    part = part.select_columns([column])
    if numpy:
        part = part.with_format("numpy")
    return part[:][column]


def _read_inputs(parts: list, column: str, datasets) -> list | np.ndarray:
    feature = parts[0].features[column]
    if isinstance(feature, datasets.Value):  # text
        texts = [x for p in parts for x in _column(p, column)]
        if any(x is None for x in texts):
            i = next(i for i, x in enumerate(texts) if x is None)
            raise ValueError(f"Text column {column!r} has a missing value (example {i}).")
        return texts
    if isinstance(feature, datasets.Image):
        # Decide grayscale vs RGB over every split together, as an image folder does.
        if not feature.decode:
            parts = [p.cast_column(column, datasets.Image()) for p in parts]
        return list(pil_arrays([im for p in parts for im in _column(p, column)]))
    # The numpy format widens integers to int64; keep the column's own dtype (uint8 images
    # are 0..255 to the preprocessing, other integers and floats are not).
    _, dtype = _array_type(feature, datasets)
    out = []
    for p in parts:
        out.extend(np.asarray(x, dtype) for x in _column(p, column, numpy=True))
    return out


def _labels(parts, label, feature, task, num_labels, names, title):
    raw = [y for p in parts for y in _column(p, label)]
    where = f"{label!r} of {title}"
    if names is not None and -1 in raw:
        # datasets marks an unlabeled example with -1 (GLUE's test splits are all -1).
        if len(parts) == 1:
            raise ValueError(
                f"Labels {where} are -1 (unlabeled) in {raw.count(-1)} examples; drop them "
                "first (dataset.filter(lambda x: x[label] != -1)) or label them."
            )
        found = [SPLITS[i] for i, p in enumerate(parts) if -1 in _column(p, label)]
        raise ValueError(
            f"Labels {where} are -1 (unlabeled) in the {', '.join(found)} split(s); pick "
            "labeled splits with splits= (--splits TRAIN,VALIDATION,TEST)."
        )
    return labels_for_head(
        raw,
        task,
        num_labels,
        where,
        label_names=names,
        fix_shape="name the label column with label_column= (--label-column)",
        fix_type=(
            f"make it a ClassLabel (dataset.class_encode_column({label!r})) or name another "
            "column with label_column= (--label-column)"
        ),
    )


def _name(dataset) -> str:
    info = getattr(dataset, "info", None)
    return (
        getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "hf dataset"
    )
