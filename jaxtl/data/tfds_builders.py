"""The embedded data sets as TFDS datasets, prepared locally (no download).

``prepare("jaxtl_vader", data_dir)`` writes the VADER lexicon (text, ClassLabel neg/pos) and
``prepare("jaxtl_digits", data_dir)`` scikit-learn's digits (8x8x1 uint8 images, ClassLabel
0-9) as real TFDS datasets, in array_record (read without TensorFlow) or tfrecord (read
through TensorFlow). ``jaxtl finetune --data tfds:jaxtl_vader --data-dir DIR`` then reads them
like any prepared TFDS dataset. They also serve as a template for a user's own builder.

The builders keep the embedded split (VADER's 80/10/10, digits' stratified 60/20/20) as
``train`` / ``validation`` / ``test``.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from jaxtl.data import images, sources


class JaxtlVader(tfds.core.GeneratorBasedBuilder):
    """VADER sentiment lexicon: positive vs negative words and emoticons (|mean| >= 0.5)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "VADER lexicon from the vaderSentiment package, split 80/10/10."}

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["negative", "positive"]),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=None)

    def _split_generators(self, dl_manager):
        del dl_manager  # embedded data: nothing to download
        data = sources.vader()
        return {s: self._generate_examples(*getattr(data, s)) for s in sources.SPLITS}

    def _generate_examples(self, texts, labels):
        for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
            yield i, {"text": text, "label": int(label)}


class JaxtlDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits as 8x8x1 uint8 images (0-255), 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn.datasets.load_digits, stratified 60/20/20."}

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                # A uint8 tensor rather than tfds.features.Image: Image encodes PNG, and decoding
                # PNG needs TensorFlow.
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=None)

    def _split_generators(self, dl_manager):
        del dl_manager
        data = images.digits()
        return {s: self._generate_examples(*getattr(data, s)) for s in sources.SPLITS}

    def _generate_examples(self, pixels, labels):
        for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}


BUILDERS = {"jaxtl_vader": JaxtlVader, "jaxtl_digits": JaxtlDigits}


def prepare(name: str, data_dir: str, file_format: str = "array_record") -> str:
    """Prepares one of :data:`BUILDERS` under ``data_dir``; returns the dataset directory."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown embedded dataset {name!r}; choose from {sorted(BUILDERS)}.")
    builder = BUILDERS[name](data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare()
    return str(builder.data_dir)
