"""In-memory sources: NumPy arrays, lists of texts, and dicts of such columns.

:func:`from_arrays` turns texts (a list or array of ``str``) into
:class:`~jaxtl.data.sources.TextSplits` and images (``[N, H, W]`` / ``[N, H, W, C]`` numbers,
or a list of ``[H, W(, C)]`` arrays of different sizes) into
:class:`~jaxtl.data.images.ImageSplits`, split 80/10/10 with
:func:`~jaxtl.data.sources.split_indices` like the CSV / JSONL sources. What is wrong with the
arrays (lengths, ranks, layouts, NaN, label types) is an error here, before anything compiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtl.data.images import ImageSplits, pil_arrays
from jaxtl.data.labels import check_finite, check_task, labels_for_head
from jaxtl.data.sources import TextSplits, check_split_sizes, pick_column, split, split_indices

_RANKS = "texts (a list of str) or images ([N, H, W] or [N, H, W, C] numbers)"


def from_arrays(
    inputs: Any,
    labels: Any = None,
    *,
    input_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
    task: str = "classification",
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    name: str = "arrays",
) -> TextSplits | ImageSplits:
    """Texts or images with their labels, split 80/10/10 by ``seed``.

    Args:
      inputs: texts (a list, tuple or array of ``str``, or of UTF-8 ``bytes``); images as one
        numeric array ``[N, H, W]`` (grayscale) or ``[N, H, W, C]``, or a list of
        ``[H, W(, C)]`` arrays or PIL images of different sizes (uint8 images are 0..255, float
        images already rescaled, e.g. to 0..1; any size: the model's preprocessing resizes
        them); or a dict of such columns, e.g. ``{"image": x, "label": y}``.
      labels: one per example: integer class ids (whole floats such as 1.0 too) or class-name
        strings (mapped to ids in sorted order), finite numbers for ``task="regression"``;
        ``None`` for ``task="causal_lm"``.
      input_column: for a dict, the inputs' key (default: the only key that is not the label).
      label_column: for a dict, the labels' key (default ``"label"``).
      seed: the split's permutation (:func:`~jaxtl.data.sources.split_indices`).
      task: the head's task: ``"classification"``, ``"regression"`` or ``"causal_lm"``.
      num_labels: the head's width; class ids must lie in ``[0, num_labels)`` (default: inferred).
      label_names: names of class ids ``0, 1, ...``.
      name: the dataset's name in reports.

    Raises:
      ValueError: inputs neither texts nor images, channels-first images, NaN or inf in
        them, inputs and labels of different lengths, labels that are not one class id per
        example (a fraction, a one-hot row, a missing or out-of-range id), NaN or inf targets,
        or too few examples to split; each names the first bad example.

    Example:
      >>> import numpy as np
      >>> from jaxtl.data import from_arrays
      >>> data = from_arrays({"image": np.zeros((20, 8, 8), np.uint8), "label": [0, 1] * 10})
      >>> data.sizes(), data.train[0].shape
      ({'train': 16, 'validation': 2, 'test': 2}, (16, 8, 8, 1))
    """
    check_task(task, "from_arrays")
    label_key = "labels"  # what the labels are called in errors
    if isinstance(inputs, Mapping):
        inputs, labels, label_key = _columns(inputs, labels, input_column, label_column, task)
    elif input_column is not None or label_column is not None:
        raise ValueError(
            "input_column / label_column pick keys of a dict of arrays; inputs is a "
            f"{type(inputs).__name__}. Pass the dict, or drop them."
        )
    kind, inputs = as_inputs(inputs, name)
    if task == "causal_lm":
        if kind != "text":
            raise ValueError(f"{name}: a causal LM reads text, but the inputs are images.")
        return split_examples(inputs, None, seed=seed, name=name)
    if labels is None:
        raise ValueError(
            f"{name}: labels are missing. Pass one label per example (labels=, or a 'label' "
            "column), or task='causal_lm' for unlabeled text."
        )
    if len(labels) != len(inputs):
        raise ValueError(
            f"{name}: {len(inputs)} inputs but {len(labels)} labels; pass one label per example."
        )
    labels, label_names = labels_for_head(
        labels,
        task,
        num_labels,
        f"{label_key!r} of {name}",
        label_names=label_names,
        fix_shape="pass one class id per example (e.g. one_hot.argmax(-1))",
        fix_type="pass integer class ids or class-name strings",
    )
    return split_examples(inputs, labels, seed=seed, label_names=label_names, name=name)


def _columns(columns: Mapping, labels, input_column, label_column, task: str):
    if labels is not None:
        raise ValueError(
            "Pass labels either as a column of the dict (label_column=) or as labels=, not both."
        )
    if task != "causal_lm":
        label_column = label_column or "label"
        if label_column not in columns:
            raise ValueError(
                f"The dict has no label column {label_column!r}; it has {list(columns)}. Name "
                "it with label_column=, or pass task='causal_lm' for unlabeled text."
            )
    rest = {k: v for k, v in columns.items() if k != label_column}
    key = pick_column(rest, input_column, lambda _: True, "input", "input_column=")
    if task == "causal_lm":
        return columns[key], None, None
    return columns[key], columns[label_column], label_column


def as_inputs(inputs: Any, name: str = "inputs") -> tuple[str, list[str] | np.ndarray]:
    """``("text", list of str)`` or ``("image", images)``: images as one ``[N, H, W, C]``
    numeric array, or an object array of ``[H, W, C]`` arrays when their shapes differ."""
    if isinstance(inputs, str):
        raise ValueError(f"{name}: inputs is one string; pass a list of texts.")
    if len(inputs) == 0:
        raise ValueError(f"The dataset {name!r} is empty: there is nothing to train on.")
    array = inputs if isinstance(inputs, np.ndarray) else None
    if array is None or array.dtype == object:
        items = list(inputs)
        if items and all(isinstance(x, str) for x in items):
            return "text", items
        if any(isinstance(x, str) for x in items):
            other = next(i for i, x in enumerate(items) if not isinstance(x, str))
            raise ValueError(
                f"{name}: inputs mix texts and other values (item {other} is "
                f"{type(items[other]).__name__}); pass only texts or only images."
            )
        if items and all(isinstance(x, np.ndarray) for x in items):
            return "image", _image_list(items, name)
        if items and all(_is_pil(x) for x in items):
            return "image", _image_list(list(pil_arrays(items)), name)
        array = np.asarray(items)
    if array.dtype.kind == "U":
        return "text", array.tolist()
    if array.dtype.kind == "S":  # bytes, as TFDS and files opened in binary give texts
        return "text", _decoded(array.tolist(), name)
    if array.dtype.kind not in "uif" or array.ndim not in (3, 4):
        what = array.dtype if array.dtype.kind not in "uif" else f"shape {array.shape}"
        raise ValueError(f"{name}: inputs of {what}; expected {_RANKS}.")
    if array.ndim == 3:
        array = array[..., None]
    _check_channels_last(array.shape, name)
    if array.dtype.kind == "f":
        check_finite(array, f"{name}: images")
    return "image", array


def _decoded(items: list[bytes], name: str) -> list[str]:
    """Texts given as bytes, read as UTF-8; bytes that are not UTF-8 are named, not guessed."""
    texts = []
    for i, b in enumerate(items):
        try:
            texts.append(b.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{name}: text {i} is bytes that are not UTF-8 ({e.reason} at byte {e.start}: "
                f"{b[:40]!r}); decode the texts to str yourself (bytes.decode(encoding))."
            ) from None
    return texts


def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(x, Image.Image)


def _image_list(items: list[np.ndarray], name: str) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, image in enumerate(items):
        if image.dtype.kind not in "uif" or image.ndim not in (2, 3):
            raise ValueError(
                f"{name}: image {i} is {image.dtype} of shape {image.shape}; expected numbers of "
                "shape [H, W] or [H, W, C]."
            )
        out[i] = image[..., None] if image.ndim == 2 else image
        _check_channels_last(out[i].shape, name, item=i)
        if image.dtype.kind == "f":
            check_finite(image[None], f"{name}: images", [f"image {i}"])
    if len({(x.shape, x.dtype) for x in out}) == 1:
        return np.stack(list(out))
    return out


def _check_channels_last(shape: tuple[int, ...], name: str, item: int | None = None) -> None:
    # NCHW is the torch habit; without this check a [N, 3, 32, 32] array would read as 32x3
    # images with 32 channels and fail later, in preprocessing, with a less useful message.
    if shape[-1] > 4 and shape[-3] in (1, 3, 4):
        if item is None:
            raise ValueError(
                f"{name}: images of shape {shape} look channels-first [N, C, H, W]; jaxtl reads "
                "[N, H, W, C]: pass np.moveaxis(images, 1, -1)."
            )
        raise ValueError(
            f"{name}: image {item} of shape {shape} looks channels-first [C, H, W]; jaxtl reads "
            "[H, W, C]: pass np.moveaxis(image, 0, -1) for each image."
        )


def split_examples(
    inputs: list[str] | np.ndarray,
    labels: np.ndarray | None,
    *,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
    name: str = "arrays",
) -> TextSplits | ImageSplits:
    """Checked inputs (:func:`as_inputs`) and labels split 80/10/10 with ``split_indices``."""
    names = None if label_names is None else list(label_names)
    if isinstance(inputs, list):
        return split(inputs, labels, seed=seed, label_names=names, name=name)
    if len(inputs) == 0:
        raise ValueError(f"The dataset {name!r} is empty: there is nothing to train on.")
    check_split_sizes(len(inputs), name)
    train, val, test = split_indices(len(inputs), seed)
    return ImageSplits(
        train=(inputs[train], labels[train]),
        validation=(inputs[val], labels[val]),
        test=(inputs[test], labels[test]),
        label_names=names,
        name=name,
    )
