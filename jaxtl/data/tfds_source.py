"""TensorFlow Datasets by name: ``tfds:NAME[/CONFIG][:VERSION]``.

Datasets prepared as array_record are read with ``tfds.data_source`` (random access, no
TensorFlow). Datasets prepared as tfrecord (TFDS's default) need TensorFlow to read; without it
the error names the extra to install. Nothing is downloaded: the dataset must already be
prepared under ``data_dir`` (``tfds build NAME --file_format=array_record``, or a
``GeneratorBasedBuilder``'s ``download_and_prepare``; see :mod:`jaxtl.data.tfds_builders`).

Each split is a TFDS split expression, slicing included (``train[:90%]``). Examples come back
as :class:`~jaxtl.data.sources.TextSplits` (a ``Text`` feature) or
:class:`~jaxtl.data.images.ImageSplits` (an ``Image`` or uint8 image ``Tensor`` feature), with
label names from a ``ClassLabel`` feature.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtl.data.images import ImageSplits
from jaxtl.data.labels import check_labels
from jaxtl.data.sources import SPLITS, TextSplits, default_splits, pick_column

PREFIX = "tfds:"
_SPEC = re.compile(r"^(?P<name>[a-z0-9_]+)(?:/(?P<config>[\w.-]+))?(?::(?P<version>[\w.*]+))?$")


@dataclasses.dataclass(frozen=True)
class TfdsName:
    """A parsed ``tfds:NAME[/CONFIG][:VERSION]``."""

    name: str
    config: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, spec: str) -> TfdsName:
        """Example:
        >>> TfdsName.parse("tfds:glue/sst2:2.0.0")
        TfdsName(name='glue', config='sst2', version='2.0.0')
        """
        body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
        m = _SPEC.match(body)
        if not m:
            raise ValueError(
                f"Not a TFDS dataset name: {spec!r}. Expected tfds:NAME[/CONFIG][:VERSION], "
                "e.g. tfds:mnist or tfds:glue/sst2:2.0.0 (lower-case snake_case names)."
            )
        return cls(m["name"], m["config"], m["version"])

    def __str__(self) -> str:
        out = self.name + (f"/{self.config}" if self.config else "")
        return out + (f":{self.version}" if self.version else "")


def is_tfds(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def builder(name: TfdsName, data_dir: str | None):
    """The prepared dataset's read-only builder, or an error that says what is prepared where."""
    import tensorflow_datasets as tfds

    try:
        b = tfds.builder(str(name), data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(_not_found(name, data_dir)) from e
    if not b.is_prepared():
        raise ValueError(_not_found(name, data_dir))
    return b


def _not_found(name: TfdsName, data_dir: str | None) -> str:
    where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets)"
    found = _prepared(data_dir)
    listing = f" Prepared there: {', '.join(found)}." if found else " Nothing is prepared there."
    return (
        f"No prepared TFDS dataset {str(name)!r} in {where}.{listing} jaxtl reads datasets that "
        "are already prepared (it never downloads): pass data_dir= (--data-dir) with the directory "
        "that "
        "holds NAME/VERSION/, or prepare it first (tfds build NAME --file_format=array_record)."
    )


def _prepared(data_dir: str | None) -> list[str]:
    root = os.path.expanduser(data_dir or os.path.join("~", "tensorflow_datasets"))
    if not os.path.isdir(root):
        return []
    return sorted(
        d
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)) and d not in ("downloads",)
    )


def split_names(split: str) -> list[str]:
    """The base split names an expression uses: ``"train[:90%]+test"`` -> ``["train", "test"]``."""
    return [re.sub(r"\[.*\]$", "", part.strip()) for part in split.split("+")]


def read_split(b, split: str) -> Any:
    """A random-access source of one split (a sequence of example dicts of numpy values)."""
    available = list(b.info.splits)
    unknown = [s for s in split_names(split) if s not in available]
    if unknown:
        raise ValueError(
            f"Unknown split {unknown[0]!r} in {split!r} of TFDS dataset {b.info.full_name!r}; "
            f"it has {available}. Slices look like train[:90%] or train[100:200]."
        )
    try:
        count = b.info.splits[split].num_examples
    except (ValueError, KeyError, AssertionError) as e:
        raise ValueError(f"Bad split expression {split!r} for {b.info.full_name!r}: {e}") from e
    if count == 0:
        raise ValueError(
            f"Split {split!r} of TFDS dataset {b.info.full_name!r} is empty "
            f"({dict((k, v.num_examples) for k, v in b.info.splits.items())} examples per split)."
        )
    fmt = str(getattr(b.info.file_format, "value", b.info.file_format))
    if "array_record" in fmt:
        source = b.as_data_source(split=split)
    else:
        source = _read_with_tensorflow(b, split, fmt)
    return source


def _read_with_tensorflow(b, split: str, fmt: str) -> list[dict]:
    try:
        import tensorflow  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"TFDS dataset {b.info.full_name!r} is stored as {fmt}, which only TensorFlow reads. "
            "Install it with pip install 'jaxtl[tensorflow]' (tensorflow-cpu), or prepare the "
            "dataset as array_record (tfds build NAME --file_format=array_record)."
        ) from e
    import tensorflow_datasets as tfds

    return list(tfds.as_numpy(b.as_dataset(split=split, shuffle_files=False)))


def _is_input(feature, modality: str | None) -> bool:
    """Text, or an image: an Image or a uint8 tensor ([H, W] or [H, W, C])."""
    import tensorflow_datasets as tfds

    f = tfds.features
    if isinstance(feature, f.Text):
        return modality in (None, "text")
    image = isinstance(feature, f.Image) or (
        type(feature) is f.Tensor
        and np.dtype(feature.np_dtype) == np.uint8
        and len(feature.shape) in (2, 3)
    )
    return image and modality in (None, "image")


def load(
    spec: str,
    *,
    data_dir: str | None = None,
    splits: Sequence[str] | None = None,
    input_key: str | None = None,
    label_key: str | None = None,
    task: str = "classification",
    modality: str | None = None,
) -> TextSplits | ImageSplits:
    """Reads a prepared TFDS dataset into train / validation / test splits.

    Args:
      spec: ``tfds:NAME[/CONFIG][:VERSION]``.
      data_dir: where the dataset is prepared (default: TFDS's).
      splits: three split expressions (train, validation, test); default from the dataset's
        splits (:func:`default_splits`).
      input_key: the text or image feature; default the only ``Text`` / ``Image`` feature.
      label_key: the label feature; default the only ``ClassLabel`` feature. Not read for
        ``task="causal_lm"``.
      task: the head's task; regression reads numeric labels as float32.
      modality: ``"text"`` or ``"image"`` (what the model reads) narrows the default input.
    """
    import tensorflow_datasets as tfds

    name = TfdsName.parse(spec)
    b = builder(name, data_dir)
    features = b.info.features
    chosen = tuple(splits) if splits is not None else default_splits(list(b.info.splits))
    if len(chosen) != 3:
        raise ValueError(f"splits must be three expressions (train, validation, test): {chosen}.")
    f = tfds.features
    what = {"text": "text", "image": "image"}.get(modality, "text or image") + " input"
    key = pick_column(
        features,
        input_key,
        lambda x: _is_input(x, modality),
        what,
        "input_key= (--text-column)",
        "feature",
    )
    is_text = isinstance(features[key], f.Text)
    label_names = None
    if task != "causal_lm":
        label_key = pick_column(
            features,
            label_key,
            lambda x: isinstance(x, f.ClassLabel),
            "label",
            "label_key= (--label-column)",
            "feature",
        )
        if isinstance(features[label_key], f.ClassLabel):
            label_names = list(features[label_key].names)
    parts = []
    for role, split in zip(SPLITS, chosen, strict=True):
        source = read_split(b, split)
        examples = [source[i] for i in range(len(source))]
        inputs = [ex[key] for ex in examples]
        if is_text:
            inputs = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in inputs]
        else:
            inputs = _stack_images(inputs, f"{role} split {split!r}")
        labels = None
        if task != "causal_lm":
            raw = [ex[label_key] for ex in examples]
            labels = check_labels(raw, task, f"{label_key!r} of split {split!r}")
        parts.append((inputs, labels))
    title = f"tfds:{name}"
    if is_text:
        return TextSplits(*parts, label_names=label_names, name=title)
    if task == "causal_lm":
        raise ValueError(f"{title}: a causal LM reads text, but {key!r} is an image feature.")
    return ImageSplits(*parts, label_names=label_names, name=title)


def _stack_images(images: list, where: str) -> np.ndarray:
    shapes = {np.shape(x) for x in images}
    if len(shapes) != 1:
        raise ValueError(
            f"Images of the {where} differ in shape ({sorted(shapes)[:3]} ...); jaxtl batches "
            "one shape per split. Resize them when preparing the dataset."
        )
    out = np.stack(images)
    if out.ndim == 3:
        out = out[..., None]
    if out.ndim != 4:
        raise ValueError(f"Images of the {where} have shape {out.shape[1:]}; expected [H, W, C].")
    return out
