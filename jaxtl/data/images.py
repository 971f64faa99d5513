"""Labeled image sources: scikit-learn's handwritten digits (embedded, offline) and user arrays.

A source returns :class:`ImageSplits`: train / validation / test images (``[N, H, W, C]``,
uint8 0..255 or floats) with integer labels. :func:`encode` turns them into the model's inputs
with its :class:`~jaxtl.models.preprocessing.ImagePreprocessing`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxtl.models.preprocessing import ImagePreprocessing


@dataclasses.dataclass
class ImageSplits:
    """Images and labels per split; ``label_names[i]`` names label ``i``."""

    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    label_names: list[str] | None = None
    name: str = "images"

    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)[1]) for s in ("train", "validation", "test")}


def digits(per_class: int | None = None, seed: int = 0) -> ImageSplits:
    """scikit-learn's 1,797 handwritten digits (8x8 grayscale, 10 classes), split 60/20/20.

    The split is stratified and fixed by ``seed``; ``per_class`` keeps only that many training
    images of each class (the low-data regime) while validation and test stay whole, so results
    of different training-set sizes are scored on the same images. Pixel values 0..16 are scaled
    to uint8 0..255.

    Raises:
      ImportError: scikit-learn is missing (``pip install 'jaxtl[vision]'``).
      ValueError: ``per_class`` < 1 or larger than the smallest class's training share.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "The digits data ships with scikit-learn: pip install 'jaxtl[vision]'."
        ) from e
    raw = load_digits()
    images = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = raw.target.astype(np.int32)
    train, val, test = stratified_split(labels, seed, (0.6, 0.2))
    if per_class is not None:
        train = subsample_per_class(labels, train, per_class, seed)
    return ImageSplits(
        train=(images[train], labels[train]),
        validation=(images[val], labels[val]),
        test=(images[test], labels[test]),
        label_names=[str(d) for d in range(10)],
        name=f"digits ({per_class}/class)" if per_class else "digits",
    )


def stratified_split(labels: np.ndarray, seed: int, fractions=(0.6, 0.2)):
    """Per-class shuffled split into train / validation / test index arrays (sorted)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a = int(round(len(idx) * fractions[0]))
        b = a + int(round(len(idx) * fractions[1]))
        for part, chunk in zip(parts, (idx[:a], idx[a:b], idx[b:]), strict=True):
            part.append(chunk)
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def subsample_per_class(
    labels: np.ndarray, indices: np.ndarray, per_class: int, seed: int
) -> np.ndarray:
    """``per_class`` of ``indices`` from every class, drawn with ``default_rng(seed)``."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}.")
    rng = np.random.default_rng(seed + 1)
    out = []
    for c in np.unique(labels[indices]):
        pool = indices[labels[indices] == c]
        if len(pool) < per_class:
            raise ValueError(
                f"per_class={per_class} but class {c} has only {len(pool)} training images."
            )
        out.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(out))


def encode(
    preprocessing: ImagePreprocessing, data: ImageSplits
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Preprocess every split once: ``{split: {"pixel_values", "label"}}`` and facts to log."""
    out = {}
    for split in ("train", "validation", "test"):
        images, labels = getattr(data, split)
        if len(labels) == 0:
            raise ValueError(f"The {split} split of {data.name!r} is empty.")
        if len(images) != len(labels):
            raise ValueError(
                f"The {split} split has {len(images)} images but {len(labels)} labels."
            )
        out[split] = {"pixel_values": preprocessing(images), "label": np.asarray(labels)}
    facts = {"sizes": data.sizes(), "image_size": list(preprocessing.size)}
    return out, facts
