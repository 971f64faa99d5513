"""RandAugment (Cubuk et al. 2020, "RandAugment: Practical automated data augmentation with a
reduced search space"): the 14 ops of its Table 1 on intensities in ``[0, 1]``.

Magnitudes follow torchvision's RandAugment (31 bins, 0..30): the op strength at magnitude m is
m / 30 of its strength at 30. The ops work on floats, without rounding to 8 bits, except
posterize and equalize, which act on 8-bit levels; each one's reference is PIL's (ImageOps,
ImageEnhance, Image.transform: what AutoAugment and timm call), checked in
``tests/test_augment.py``. Geometric ops sample the nearest pixel and fill with black. The
conversion between ``pixel_values`` and intensities is :class:`jaxtl.data.augment.Intensity`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

_GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2 luma, as PIL's "L" mode


def _gray(x: np.ndarray) -> np.ndarray:
    """``[H, W, 1]`` luma of an RGB image; a 1-channel image is its own gray."""
    if x.shape[-1] == 3:
        return (x @ _GRAY)[..., None]
    return x.mean(axis=-1, keepdims=True)


def _blend(x: np.ndarray, degenerate: np.ndarray | float, factor: float) -> np.ndarray:
    """``degenerate + factor * (x - degenerate)`` in ``[0, 1]``: factor 0 gives the degenerate
    image, 1 the input, above 1 extrapolates (PIL's ImageEnhance)."""
    return np.clip(degenerate + np.float32(factor) * (x - degenerate), 0.0, 1.0)


def _levels(x: np.ndarray) -> np.ndarray:
    """Intensities -> uint8 levels 0..255."""
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _warp(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Nearest-neighbour affine warp in PIL's convention: pixel ``(col, row)`` covers
    ``[col, col + 1) x [row, row + 1)``; the output pixel centred at ``p`` takes the input pixel
    that contains ``matrix @ (p, 1)`` (a ``2x3`` map to input coordinates); outside: black."""
    h, w = x.shape[:2]
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    src_col = np.floor(matrix[0, 0] * cols + matrix[0, 1] * rows + matrix[0, 2]).astype(np.int64)
    src_row = np.floor(matrix[1, 0] * cols + matrix[1, 1] * rows + matrix[1, 2]).astype(np.int64)
    inside = (src_col >= 0) & (src_col < w) & (src_row >= 0) & (src_row < h)
    out = np.zeros_like(x)
    out[inside] = x[src_row[inside], src_col[inside]]
    return out


def identity(x: np.ndarray, _: float = 0.0) -> np.ndarray:
    return x


def autocontrast(x: np.ndarray, _: float = 0.0) -> np.ndarray:
    """Stretch each channel's range to ``[0, 1]``; a flat channel stays as it is."""
    lo, hi = x.min(axis=(0, 1), keepdims=True), x.max(axis=(0, 1), keepdims=True)
    span = hi - lo
    stretched = (x - lo) / np.where(span > 0, span, 1.0)
    return np.clip(np.where(span > 0, stretched, x), 0.0, 1.0).astype(np.float32)


def equalize(x: np.ndarray, _: float = 0.0) -> np.ndarray:
    """Histogram equalization of each channel's 256 levels, PIL's ``ImageOps.equalize`` rule:
    level ``v`` maps to ``(count below v + step // 2) // step`` with ``step`` the pixel count
    less the top level's, over 255; a channel with one level (or step 0) is unchanged."""
    levels = _levels(x)
    out = np.empty_like(x)
    for c in range(x.shape[-1]):
        hist = np.bincount(levels[..., c].ravel(), minlength=256)
        used = np.flatnonzero(hist)
        step = (hist.sum() - hist[used[-1]]) // 255
        if step == 0:
            out[..., c] = x[..., c]
            continue
        below = np.concatenate([[0], np.cumsum(hist)[:-1]])
        lut = np.minimum((below + step // 2) // step, 255)
        out[..., c] = lut[levels[..., c]] / np.float32(255)
    return out


def rotate(x: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate counter-clockwise by ``degrees`` about the image centre."""
    h, w = x.shape[:2]
    t = math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    cx, cy = w / 2, h / 2
    # Inverse map: an output pixel at offset (dx, dy) from the centre (y pointing down) reads
    # the input at the offset rotated the other way.
    matrix = np.array([[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy]])
    return _warp(x, matrix)


def solarize(x: np.ndarray, threshold: float) -> np.ndarray:
    """Invert intensities at or above ``threshold``."""
    return np.where(x >= np.float32(threshold), np.float32(1.0) - x, x).astype(np.float32)


def color(x: np.ndarray, factor: float) -> np.ndarray:
    """Saturation: blend with the gray image (0: gray, 1: unchanged)."""
    return _blend(x, _gray(x), factor)


def posterize(x: np.ndarray, bits: float) -> np.ndarray:
    """Keep the top ``bits`` bits of each 8-bit level (8 or more: the image unchanged)."""
    if bits >= 8:
        return x
    mask = np.uint8((0xFF << (8 - int(bits))) & 0xFF)
    return (_levels(x) & mask) / np.float32(255)


def contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the image's mean gray level (0: flat gray, 1: unchanged)."""
    return _blend(x, np.float32(_gray(x).mean()), factor)


def brightness(x: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black (0: black, 1: unchanged)."""
    return _blend(x, np.float32(0.0), factor)


def sharpness(x: np.ndarray, factor: float) -> np.ndarray:
    """Blend with a smoothed image (PIL's SMOOTH kernel: 1s around a centre 5, over 13); the
    border pixels of the smoothed image are the input's (0: smooth, 1: unchanged)."""
    smooth = x.copy()
    if x.shape[0] > 2 and x.shape[1] > 2:
        h, w = x.shape[:2]
        total = sum(x[i : h - 2 + i, j : w - 2 + j] for i in range(3) for j in range(3))
        smooth[1:-1, 1:-1] = (total + 4 * x[1:-1, 1:-1]) / np.float32(13)
    return _blend(x, smooth, factor)


def shear_x(x: np.ndarray, shear: float) -> np.ndarray:
    """Move row ``y`` left by ``shear * (y + 1/2)`` pixels: a shear about the top edge, as
    AutoAugment's PIL transform ``(1, shear, 0, 0, 1, 0)``."""
    return _warp(x, np.array([[1.0, shear, 0.0], [0.0, 1.0, 0.0]]))


def shear_y(x: np.ndarray, shear: float) -> np.ndarray:
    """Move column ``x`` up by ``shear * (x + 1/2)`` pixels: a shear about the left edge."""
    return _warp(x, np.array([[1.0, 0.0, 0.0], [shear, 1.0, 0.0]]))


def translate_x(x: np.ndarray, pixels: float) -> np.ndarray:
    """Move the content right by ``pixels`` (whole pixels, left if negative)."""
    return _warp(x, np.array([[1.0, 0.0, -float(int(pixels))], [0.0, 1.0, 0.0]]))


def translate_y(x: np.ndarray, pixels: float) -> np.ndarray:
    """Move the content down by ``pixels`` (whole pixels, up if negative)."""
    return _warp(x, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -float(int(pixels))]]))


class RandOp(NamedTuple):
    """A RandAugment op and how strong it is: its argument is
    ``base + sign * strength(level, (H, W))`` with ``level = magnitude / 30`` and a random sign
    where ``signed``; ``strength`` None: the op has no argument."""

    op: Callable[..., np.ndarray]
    strength: Callable[[float, tuple[int, ...]], float] | None = None
    signed: bool = False
    base: float = 0.0


def _enhance(op: Callable[..., np.ndarray]) -> RandOp:
    # Enhancement factors 1 +- 0.9 at magnitude 30 (0.1..1.9, AutoAugment's range).
    return RandOp(op, lambda level, hw: 0.9 * level, signed=True, base=1.0)


RAND_AUGMENT_OPS: dict[str, RandOp] = {
    "identity": RandOp(identity),
    "autocontrast": RandOp(autocontrast),
    "equalize": RandOp(equalize),
    "rotate": RandOp(rotate, lambda level, hw: 30.0 * level, signed=True),
    "solarize": RandOp(solarize, lambda level, hw: -level, base=1.0),
    "color": _enhance(color),
    "posterize": RandOp(posterize, lambda level, hw: -round(4 * level), base=8),
    "contrast": _enhance(contrast),
    "brightness": _enhance(brightness),
    "sharpness": _enhance(sharpness),
    "shear_x": RandOp(shear_x, lambda level, hw: 0.3 * level, signed=True),
    "shear_y": RandOp(shear_y, lambda level, hw: 0.3 * level, signed=True),
    # AutoAugment's 150 pixels on 331-pixel images, as a fraction of the side (torchvision).
    "translate_x": RandOp(translate_x, lambda level, hw: level * 150 / 331 * hw[1], signed=True),
    "translate_y": RandOp(translate_y, lambda level, hw: level * 150 / 331 * hw[0], signed=True),
}
"""RandAugment's 14 ops at magnitude ``m``: rotate up to 30 degrees, solarize above
``1 - m/30``, posterize to ``8 - round(m/7.5)`` bits, enhancement factors ``1 +- 0.9 m/30``,
shear ``+- 0.3 m/30``, translate ``+- (m/30) (150/331)`` of the side."""


def rand_augment_op(name: str, x: np.ndarray, magnitude: float, sign: float = 1.0) -> np.ndarray:
    """One RandAugment op at ``magnitude`` (0..30) on intensities ``x`` in ``[0, 1]``."""
    spec = RAND_AUGMENT_OPS[name]
    if spec.strength is None:
        return spec.op(x)
    return spec.op(x, spec.base + sign * spec.strength(magnitude / 30.0, x.shape[:2]))


def rand_augment(
    pixels: np.ndarray, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 9
) -> np.ndarray:
    """RandAugment on intensities in ``[0, 1]``: ``num_ops`` ops drawn uniformly (with
    replacement) from :data:`RAND_AUGMENT_OPS`, each at ``magnitude`` (0..30) with a random sign
    where the op has one."""
    names = tuple(RAND_AUGMENT_OPS)
    for _ in range(int(num_ops)):
        name = names[int(rng.integers(len(names)))]
        sign = -1.0 if RAND_AUGMENT_OPS[name].signed and rng.random() < 0.5 else 1.0
        pixels = rand_augment_op(name, pixels, magnitude, sign)
    return pixels.astype(np.float32)


def check_rand_augment(num_ops: float = 2, magnitude: float = 9) -> None:
    if num_ops != int(num_ops) or num_ops < 1:
        raise ValueError(f"rand_augment: num_ops must be a whole number >= 1, got {num_ops:g}.")
    if not 0 <= magnitude <= 30:
        raise ValueError(f"rand_augment: magnitude must be in [0, 30], got {magnitude:g}.")
