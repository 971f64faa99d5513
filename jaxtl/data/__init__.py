"""Data: labeled text and image sources, tokenization / preprocessing and batch loaders."""

from __future__ import annotations

from jaxtl.data.arrays import from_arrays
from jaxtl.data.audio import AudioSplits
from jaxtl.data.hf_source import from_hf
from jaxtl.data.images import ImageSplits, digits, digits_segmentation, from_folder
from jaxtl.data.loader import ArrayLoader, Loader, evaluation_loader
from jaxtl.data.pipeline import GrainLoader, training_loader
from jaxtl.data.qa import QASplits, from_squad, vader_qa
from jaxtl.data.shots import few_shot
from jaxtl.data.sources import TextSplits, from_table, read_table, split, vader
from jaxtl.data.spec import describe, resolve, with_shots
from jaxtl.data.tagging import TaggedSplits, from_conll, vader_tags
from jaxtl.data.text import encode

__all__ = [
    "ArrayLoader",
    "AudioSplits",
    "GrainLoader",
    "Loader",
    "evaluation_loader",
    "training_loader",
    "ImageSplits",
    "QASplits",
    "TaggedSplits",
    "digits",
    "digits_segmentation",
    "from_conll",
    "from_squad",
    "vader_qa",
    "vader_tags",
    "from_folder",
    "TextSplits",
    "describe",
    "encode",
    "few_shot",
    "from_arrays",
    "from_hf",
    "from_table",
    "read_table",
    "resolve",
    "split",
    "vader",
    "with_shots",
]
