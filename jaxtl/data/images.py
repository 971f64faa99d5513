"""Labeled image sources: scikit-learn's handwritten digits (embedded, offline) and user arrays.

A source returns :class:`ImageSplits`: train / validation / test images (``[N, H, W, C]``,
uint8 0..255 or floats) with integer labels. :func:`encode` turns them into the model's inputs
with its :class:`~jaxtl.models.preprocessing.ImagePreprocessing`.
"""

from __future__ import annotations

import dataclasses
import os

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
    skipped: list[str] = dataclasses.field(default_factory=list)  # corrupt files left out

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


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def from_folder(
    path: str,
    *,
    seed: int = 0,
    fractions: tuple[float, float] = (0.8, 0.1),
    channels: int | None = None,
    skip_corrupt: bool = False,
) -> ImageSplits:
    """An image folder with one subfolder per class, split stratified 80/10/10 by ``seed``.

    Class ids follow the sorted subfolder names. Images keep their own sizes (the model's
    preprocessing resizes them); they are decoded to uint8 with ``channels`` (1: grayscale,
    3: RGB; default 3, or 1 when every image is grayscale).

    Args:
      skip_corrupt: skip files that do not decode, and count them in ``name``; otherwise the
        first one is an error that names it.

    Raises:
      FileNotFoundError: ``path`` is not a directory.
      ValueError: no class subfolders, a class without images, or a corrupt file.
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Image folder not found: {path!r}. Pass a directory with one subfolder per class."
        )
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise ValueError(
            f"{path!r} has no class subfolders: put the images of each class in PATH/<class name>/."
        )
    decoded, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        folder = os.path.join(path, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"Class folder {folder!r} holds no images ({IMAGE_EXTENSIONS}).")
        for f in files:
            file = os.path.join(folder, f)
            try:
                with Image.open(file) as im:
                    im.load()
                    decoded.append(im.copy())
            except (UnidentifiedImageError, OSError, SyntaxError) as e:
                if not skip_corrupt:
                    raise ValueError(
                        f"Cannot decode image {file!r} ({e}). Remove it, or skip corrupt files "
                        "(skip_corrupt=True / --skip-corrupt) and count them."
                    ) from e
                skipped.append(file)
                continue
            labels.append(label)
    images = pil_arrays(decoded, channels)
    labels = np.asarray(labels, np.int32)
    train, val, test = stratified_split(labels, seed, fractions)
    note = f", {len(skipped)} corrupt skipped" if skipped else ""
    return ImageSplits(
        train=(images[train], labels[train]),
        validation=(images[val], labels[val]),
        test=(images[test], labels[test]),
        label_names=classes,
        name=f"{os.path.basename(os.path.normpath(path))} ({len(labels)} images{note})",
        skipped=skipped,
    )


def pil_arrays(images, channels: int | None = None) -> np.ndarray:
    """PIL images -> an object array of ``[H, W, channels]`` uint8 arrays (sizes may differ).

    ``channels``: 1 (grayscale) or 3 (RGB); default 3, or 1 when every image is grayscale.
    """
    if channels is None:
        channels = 1 if all(im.mode in ("L", "1", "I;16", "I") for im in images) else 3
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    mode = "L" if channels == 1 else "RGB"
    out = np.empty(len(images), dtype=object)
    for i, im in enumerate(images):
        array = np.asarray(im.convert(mode), np.uint8)
        out[i] = array[..., None] if channels == 1 else array
    return out


def encode(
    preprocessing: ImagePreprocessing, data: ImageSplits
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Preprocess every split once: ``{split: {"pixel_values", "label"}}`` and facts to log."""
    out = {}
    for split in ("train", "validation", "test"):
        images, labels = getattr(data, split)
        if len(labels) == 0:
            raise ValueError(
                f"The {split} split of {data.name!r} is empty (sizes {data.sizes()}); every "
                "split needs examples: add images."
            )
        if len(images) != len(labels):
            raise ValueError(
                f"The {split} split has {len(images)} images but {len(labels)} labels."
            )
        check_pixels(images, preprocessing.rescale, f"The {split} split of {data.name!r}")
        out[split] = {"pixel_values": preprocessing(images), "label": np.asarray(labels)}
    facts = {"sizes": data.sizes(), "image_size": list(preprocessing.size)}
    return out, facts


def check_pixels(images: np.ndarray, rescale: float, where: str) -> None:
    """Pixel values in the range the preprocessing reads them in: integers as 8-bit 0..255,
    floats as already rescaled (0..1 for the usual ``rescale`` of 1/255).

    Images outside it would train, silently, on inputs hundreds of times too bright (0..255
    floats) or normalized twice; ``images`` is ``[N, H, W, C]`` or an object array of images.
    """
    ragged = isinstance(images, list | tuple) or images.dtype == object
    for image in map(np.asarray, images if ragged else [images]):
        if image.dtype == np.uint8:
            continue
        lo, hi = float(image.min()), float(image.max())
        if image.dtype.kind in "iu" and (lo < 0 or hi > 255):
            raise ValueError(
                f"{where}: {image.dtype} images hold values {lo:g} to {hi:g}, but integer images "
                "are read as 8-bit pixels 0..255. Scale them to uint8 0..255, or to floats in "
                f"[0, {255 * rescale:g}]."
            )
        top = 255 * rescale  # where uint8 pixels land: float images are read as already there
        if image.dtype.kind == "f" and (hi > 1.5 * top or lo < -0.5 * top):
            fix = (
                "they look normalized already: pass the raw pixels, which the model's "
                "preprocessing normalizes"
                if lo < -0.5 * top
                else f"they look like 0..255 pixels: pass them as uint8 (images.astype(np.uint8)) "
                f"or divide them by {1 / rescale:g}"
            )
            raise ValueError(
                f"{where}: float images are read as already rescaled to [0, {top:g}], but these "
                f"run from {lo:g} to {hi:g}; {fix}."
            )
