"""Built target domains: a dataset's inputs shifted, labels kept (for scoring only), seeded.

Domain adaptation (:mod:`jaxtl.domain`, ``jaxtl adapt --target-shift``) needs a target domain;
when a user has none of their own these make one from the source data: images inverted,
rotated or noisy (:func:`shift_images`), texts with one typing slip in every word
(:func:`shift_texts`). :func:`shifted` picks the right one for the data.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxtl.data import images, sources

__all__ = [
    "IMAGE_SHIFTS",
    "SHIFTS",
    "TEXT_SHIFTS",
    "shift_images",
    "shift_texts",
    "shifted",
    "typo",
]

IMAGE_SHIFTS = ("invert", "rotate", "noise")
TEXT_SHIFTS = ("typos",)
SHIFTS = (*IMAGE_SHIFTS, *TEXT_SHIFTS)
# Each key's neighbours on a QWERTY keyboard: the letters a slipped finger types instead.
_KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_EDITS = ("swap", "drop", "double", "neighbour")


def shifted(data, kind: str, seed: int = 0):
    """A built target domain from ``data`` (``--target-shift``): :func:`shift_images` for
    images, :func:`shift_texts` for texts.

    Raises:
      ValueError: a shift that does not apply to this data (the message lists those that do).
    """
    if isinstance(data, images.ImageSplits) and kind in IMAGE_SHIFTS:
        return shift_images(data, kind, seed)
    if isinstance(data, sources.TextSplits) and kind in TEXT_SHIFTS:
        return shift_texts(data, kind, seed)
    images_ = isinstance(data, images.ImageSplits)
    fits = IMAGE_SHIFTS if images_ else TEXT_SHIFTS
    raise ValueError(
        f"shift={kind!r} (--target-shift) does not apply to {data.name!r} "
        f"({'images' if images_ else 'texts'}); choose one of {', '.join(fits)}, or give the "
        "target domain's own data (target= / --target-data)."
    )


def typo(word: str, rng: np.random.Generator) -> str:
    """``word`` with one typing slip, drawn from ``rng``: two neighbouring letters swapped, a
    letter dropped or doubled, or a letter replaced by a keyboard neighbour. Words of fewer
    than three letters are kept (a slip would leave little of them).

    Example:
      >>> [typo("awful", np.random.default_rng(s)) for s in range(4)]
      ['awgul', 'awul', 'aqful', 'aqful']
    """
    if len(word) < 3:
        return word
    edit = _EDITS[int(rng.integers(len(_EDITS)))]
    i = int(rng.integers(1, len(word) - 1))  # an inner letter: the word stays recognisable
    if edit == "swap" and word[i] != word[i + 1]:  # swapping "tt" would change nothing
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if edit in ("drop", "swap"):
        return word[:i] + word[i + 1 :]
    if edit == "double":
        return word[:i] + word[i] + word[i:]
    for row in _KEYBOARD:
        at = row.find(word[i].lower())
        if at >= 0:
            near = [row[j] for j in (at - 1, at + 1) if 0 <= j < len(row)]
            return word[:i] + near[int(rng.integers(len(near)))] + word[i + 1 :]
    return word[:i] + word[i + 1 :]  # not a letter: drop it


def shift_texts(data: sources.TextSplits, kind: str = "typos", seed: int = 0):
    """A built target domain: every word of every text with one typing slip (:func:`typo`),
    labels kept (for scoring only), seeded. The same texts a reader still understands, but
    sub-word pieces the model rarely saw (``"awful"`` -> ``"awfl"``).

    Raises:
      ValueError: an unknown shift, or image data.
    """
    if kind not in TEXT_SHIFTS or not isinstance(data, sources.TextSplits):
        return shifted(data, kind, seed)  # raises, naming the shifts that apply
    rng = np.random.default_rng(seed)

    def apply(texts):
        return [" ".join(typo(w, rng) for w in t.split(" ")) for t in texts]

    return _with_inputs(data, apply, kind)


def shift_images(data: images.ImageSplits, shift: str, seed: int = 0) -> images.ImageSplits:
    """A built target domain: every split's images shifted, labels kept (for scoring only):
    ``"invert"`` (255 - x), ``"rotate"`` (30 degrees, bilinear) or ``"noise"`` (Gaussian, std
    64 on 0..255, clipped) (``--target-shift``).

    Raises:
      ValueError: an unknown shift, or text data.
    """
    from scipy import ndimage

    if shift not in IMAGE_SHIFTS or not isinstance(data, images.ImageSplits):
        return shifted(data, shift, seed)  # raises, naming the shifts that apply
    rng = np.random.default_rng(seed)

    def apply(x):
        x = x.astype(np.float32)
        if shift == "invert":
            x = 255.0 - x
        elif shift == "rotate":
            x = ndimage.rotate(x, 30, axes=(1, 2), reshape=False, order=1)
        else:
            x = x + rng.normal(0, 64, x.shape)
        return np.clip(np.round(x), 0, 255).astype(np.uint8)

    return _with_inputs(data, apply, shift)


def _with_inputs(data, apply, shift: str):
    """``data`` with ``apply`` run on every split's inputs (labels kept), named for ``shift``."""
    splits = {s: (apply(getattr(data, s)[0]), getattr(data, s)[1]) for s in sources.SPLITS}
    return dataclasses.replace(data, **splits, name=f"{data.name}-{shift}")
