"""Data: labeled text and image sources, tokenization / preprocessing and batch loaders."""

from __future__ import annotations

from jaxtl.data.arrays import from_arrays
from jaxtl.data.hf_source import from_hf
from jaxtl.data.images import ImageSplits, digits, from_folder
from jaxtl.data.loader import ArrayLoader
from jaxtl.data.sources import TextSplits, from_table, read_table, split, vader
from jaxtl.data.text import encode


def resolve(spec: dict, *, num_labels: int, task: str) -> TextSplits | ImageSplits:
    """Rebuild a dataset from the JSON spec that a run directory records.

    ``{"kind": "vader"}``, ``{"kind": "digits", "per_class": 10 or None, "seed": 0}`` or
    ``{"kind": "table", "path": ..., "text_column": ..., "label_column": ..., "seed": 0}`` or
    ``{"kind": "tfds", "name": "tfds:NAME", "data_dir": ..., "splits": [...] or None, ...}`` or
    ``{"kind": "folder", "path": ..., "seed": 0, "skip_corrupt": False}`` or
    ``{"kind": "hf", "path": ..., "splits": [...] or None, "input_column": ..., "seed": 0, ...}``
    (a Hugging Face dataset saved with ``save_to_disk``).
    """
    kind = spec.get("kind")
    if kind == "digits":
        return digits(spec.get("per_class"), seed=spec.get("seed", 0))
    if kind == "vader":
        return vader(spec.get("path"))
    if kind == "table":
        return from_table(
            spec["path"],
            text_column=spec.get("text_column", "text"),
            label_column=spec.get("label_column", "label"),
            num_labels=num_labels,
            task=task,
            seed=spec.get("seed", 0),
        )
    if kind == "folder":
        return from_folder(
            spec["path"], seed=spec.get("seed", 0), skip_corrupt=spec.get("skip_corrupt", False)
        )
    if kind == "tfds":
        from jaxtl.data import tfds_source

        return tfds_source.load(
            spec["name"],
            data_dir=spec.get("data_dir"),
            splits=spec.get("splits"),
            input_key=spec.get("input_key"),
            label_key=spec.get("label_key"),
            task=task,
            modality=spec.get("modality"),
        )
    if kind == "hf":
        from jaxtl.data import hf_source

        return hf_source.load_from_disk(
            spec["path"],
            input_column=spec.get("input_column"),
            label_column=spec.get("label_column"),
            splits=spec.get("splits"),
            seed=spec.get("seed", 0),
            task=task,
            num_labels=num_labels,
            modality=spec.get("modality"),
        )
    raise ValueError(
        f"Unknown data kind {kind!r}: expected 'vader', 'digits', 'table', 'folder', 'tfds' "
        "or 'hf'."
    )


__all__ = [
    "ArrayLoader",
    "ImageSplits",
    "digits",
    "from_folder",
    "TextSplits",
    "encode",
    "from_arrays",
    "from_hf",
    "from_table",
    "read_table",
    "resolve",
    "split",
    "vader",
]
