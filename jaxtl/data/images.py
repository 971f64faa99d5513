"""Labeled image sources: scikit-learn's handwritten digits (embedded, offline) and user arrays.

A source returns :class:`ImageSplits`: train / validation / test images (``[N, H, W, C]``,
uint8 0..255 or floats) with integer labels, one per image or, for segmentation, one per pixel
(masks ``[N, H, W]``, :func:`digits_segmentation`). :func:`encode` turns them into the model's
inputs with its :class:`~jaxtl.models.preprocessing.ImagePreprocessing`, masks moved with
their images.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxtl.models.preprocessing import ImagePreprocessing

# The pixel label that segmentation losses and metrics skip: PyTorch's CrossEntropyLoss
# ignore_index default, which Hugging Face segmentation datasets and models use too.
IGNORE_LABEL = -100


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


def digits_segmentation(
    canvas: int = 32,
    *,
    digits_per_canvas: int = 1,
    scale: int = 2,
    threshold: int = 4,
    seed: int = 0,
) -> ImageSplits:
    """Semantic segmentation with real masks: scikit-learn's handwritten digits placed on blank
    canvases, each pixel labelled with the class of the digit it belongs to.

    Every 8x8 digit is enlarged ``scale`` times (nearest neighbour) and put at a random position
    on a ``canvas`` x ``canvas`` grayscale image (uint8 ``[N, canvas, canvas, 1]``, sklearn's
    0..16 scaled to 0..255, as :func:`digits`), ``digits_per_canvas`` digits to a canvas with
    non-overlapping boxes. The mask (int32 ``[N, canvas, canvas]``) is ``d + 1`` where digit
    ``d``'s ink is above ``threshold`` (of 0..16), 0 (``"background"``) on blank pixels, and
    :data:`IGNORE_LABEL` on faint ink (1..``threshold``), which is neither clearly stroke nor
    clearly background. ``label_names`` is ``["background", "0", ..., "9"]``.

    The digits are split 60/20/20 stratified by class with ``seed`` (the split :func:`digits`
    makes), then each split's digits are shuffled and placed: no digit is in two splits, and
    the same arguments give the same canvases.

    Raises:
      ImportError: scikit-learn is missing (``pip install 'jaxtl[vision]'``).
      ValueError: a canvas too small for its digits, or arguments out of range.

    Example:
      >>> data = digits_segmentation()
      >>> images, masks = data.train
      >>> images.shape, masks.shape, data.label_names[:3]
      ((1078, 32, 32, 1), (1078, 32, 32), ['background', '0', '1'])
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "The digits data ships with scikit-learn: pip install 'jaxtl[vision]'."
        ) from e
    for name, value, low in (
        ("canvas", canvas, 1),
        ("digits_per_canvas", digits_per_canvas, 1),
        ("scale", scale, 1),
        ("threshold", threshold, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if threshold >= 16:
        raise ValueError(f"threshold must be below 16 (the digits' darkest ink), got {threshold}.")
    side = 8 * scale
    if canvas < side or digits_per_canvas * side * side > canvas * canvas:
        raise ValueError(
            f"A {canvas}x{canvas} canvas cannot hold {digits_per_canvas} digit(s) of "
            f"{side}x{side} (8x8 at scale={scale}) without overlap; pass a larger canvas, a "
            "smaller scale or fewer digits_per_canvas."
        )
    raw = load_digits()
    ink = raw.images.astype(np.int32).repeat(scale, axis=1).repeat(scale, axis=2)
    labels = raw.target.astype(np.int32)
    splits = stratified_split(labels, seed, (0.6, 0.2))
    out = []
    for index, members in enumerate(splits):
        rng = np.random.default_rng([seed, index])
        members = rng.permutation(members)
        groups = [
            members[i : i + digits_per_canvas] for i in range(0, len(members), digits_per_canvas)
        ]
        images = np.zeros((len(groups), canvas, canvas, 1), np.uint8)
        masks = np.zeros((len(groups), canvas, canvas), np.int32)
        for n, group in enumerate(groups):
            for digit, (top, left) in zip(
                group, _boxes(rng, len(group), side, canvas), strict=True
            ):
                box = (slice(top, top + side), slice(left, left + side))
                images[n][box] = np.round(ink[digit] * (255.0 / 16.0)).astype(np.uint8)[..., None]
                masks[n][box] = np.where(
                    ink[digit] > threshold,
                    labels[digit] + 1,
                    np.where(ink[digit] > 0, IGNORE_LABEL, 0),
                )
        out.append((images, masks))
    return ImageSplits(
        train=out[0],
        validation=out[1],
        test=out[2],
        label_names=["background", *(str(d) for d in range(10))],
        name=f"digits-segmentation ({canvas}x{canvas}, {digits_per_canvas}/canvas)",
    )


def _boxes(rng: np.random.Generator, count: int, side: int, canvas: int) -> list[tuple[int, int]]:
    """``count`` random ``(top, left)`` corners of non-overlapping ``side`` x ``side`` boxes on a
    ``canvas`` x ``canvas`` image, drawn one by one (each redrawn until it overlaps none)."""
    boxes: list[tuple[int, int]] = []
    for _ in range(count):
        for _ in range(1000):
            top, left = (int(v) for v in rng.integers(0, canvas - side + 1, 2))
            if all(abs(top - t) >= side or abs(left - u) >= side for t, u in boxes):
                boxes.append((top, left))
                break
        else:
            raise ValueError(
                f"Could not place {count} non-overlapping {side}x{side} digits on a "
                f"{canvas}x{canvas} canvas; pass a larger canvas or fewer digits_per_canvas."
            )
    return boxes


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
    preprocessing: ImagePreprocessing, data: ImageSplits, task: str | None = None
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Preprocess every split once: ``{split: {"pixel_values", "label"}}`` and facts to log.

    Labels of shape ``[N, H, W]`` are segmentation masks: they go through the images' resize
    and center crop with nearest neighbour (:func:`encode_masks`), so ``label`` is
    ``[N, *preprocessing.size]``. Given the model's ``task``, masks are refused for any task but
    ``"segmentation"`` and required for it.
    """
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
        where = f"The {split} split of {data.name!r}"
        check_pixels(images, preprocessing.rescale, where)
        labels = np.asarray(labels)
        masks = labels.ndim == 3
        if task is not None and masks != (task == "segmentation"):
            raise ValueError(
                f"{where} has labels of shape {labels.shape}: "
                + (
                    f"per-pixel masks, which only a task='segmentation' model reads (this one's "
                    f"task is {task!r}); load the model with task='segmentation' "
                    "(--task segmentation)."
                    if masks
                    else "one per image, but a task='segmentation' model needs a mask "
                    "[N, H, W] of class ids per image (e.g. images.digits_segmentation())."
                )
            )
        if masks:
            names = data.label_names
            labels = encode_masks(preprocessing, images, labels, where, len(names or ()) or None)
        out[split] = {"pixel_values": preprocessing(images), "label": labels}
    facts = {"sizes": data.sizes(), "image_size": list(preprocessing.size)}
    return out, facts


def encode_masks(
    preprocessing: ImagePreprocessing,
    images: np.ndarray,
    masks: np.ndarray,
    where: str = "masks",
    num_labels: int | None = None,
) -> np.ndarray:
    """Segmentation masks ``[N, H, W]`` moved as ``preprocessing`` moves their ``images``:
    int32 ``[N, *preprocessing.size]``.

    The masks go through the same preprocessing (its resize, then its center crop) with
    nearest-neighbour sampling, so each output pixel takes the label of the input pixel whose
    image value it shows (bilinear or bicubic would blend class ids into ids of other
    classes); :data:`IGNORE_LABEL` stays as it is.

    Raises:
      ValueError: masks whose height and width differ from their images', images of different
        sizes (an object array), masks that are not integers, or ids outside ``[0,
        num_labels)`` other than :data:`IGNORE_LABEL`; the message says what to fix.
    """
    masks = np.asarray(masks)
    ragged = isinstance(images, list | tuple) or np.asarray(images).dtype == object
    if ragged:
        raise ValueError(
            f"{where}: segmentation masks need their images as one array [N, H, W, C] of one "
            "size; resize or pad the images (and their masks) to a common size first."
        )
    shape = np.shape(images)
    if masks.ndim != 3 or len(shape) < 3 or tuple(shape[1:3]) != masks.shape[1:]:
        raise ValueError(
            f"{where}: masks of shape {masks.shape} do not cover images of shape {shape}; each "
            "mask must be [H, W] of its image's height and width (labels [N, H, W])."
        )
    if not np.issubdtype(masks.dtype, np.integer):
        raise ValueError(
            f"{where}: masks are {masks.dtype}; they must hold integer class ids per pixel "
            f"(masks.astype(np.int32)), with {IGNORE_LABEL} for pixels to ignore."
        )
    bad = (masks < 0) & (masks != IGNORE_LABEL)
    if num_labels is not None:
        bad |= masks >= num_labels
    if bad.any():
        found = sorted(set(masks[bad].tolist()))[:10]
        allowed = f"[0, {num_labels})" if num_labels is not None else "0 and up"
        raise ValueError(
            f"{where}: masks hold class ids {found} (first at pixel "
            f"{tuple(int(i) for i in np.argwhere(bad)[0])}); ids must be in {allowed}, or "
            f"{IGNORE_LABEL} for pixels to ignore."
        )
    nearest = dataclasses.replace(
        preprocessing, mean=(0.0,), std=(1.0,), rescale=1.0, interpolation="nearest"
    )
    # Float32 holds every id exactly, and PIL's float mode resizes without rounding.
    moved = nearest(masks.astype(np.float32)[..., None])[..., 0]
    return np.rint(moved).astype(np.int32)


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
