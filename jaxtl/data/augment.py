"""Per-example image augmentation on the model's inputs (``pixel_values`` ``[H, W, C]``, already
preprocessed), driven by the generator :class:`~jaxtl.data.pipeline.GrainLoader` derives from
``(seed, epoch, example index)``.

A spec string names the ops in order, e.g. ``"random_resized_crop(0.35),hflip"`` or
``"rand_augment(2, 9),hflip"``; see :data:`OPS`. Ops keep the image's shape, so a batch keeps one
shape and jit compiles once.

Geometric ops (crop, flip, translate) do not care what the values mean. RandAugment's photometric
ops (solarize, posterize, equalize, ...) do: they work on intensities in ``[0, 1]`` (0 black,
1 white), so they need the model's normalization to get from ``pixel_values`` there and back
(:class:`Intensity`, from the model's :class:`~jaxtl.models.preprocessing.ImagePreprocessing`).
Batch-level mixing (mixup, cutmix) is in :mod:`jaxtl.data.mixing`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image


def _resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float ``[h, w, C]`` image, channel by channel (PIL mode "F")."""
    if pixels.shape[:2] == (height, width):
        return pixels
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(pixels[..., c], np.float32), mode="F").resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
        for c in range(pixels.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def hflip(pixels: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror left-right with probability ``p``."""
    return pixels[:, ::-1] if rng.random() < p else pixels


def random_resized_crop(
    pixels: np.ndarray,
    rng: np.random.Generator,
    min_scale: float = 0.08,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Inception-style crop: a random area fraction in ``[min_scale, 1]`` and aspect ratio in
    ``ratio`` (log-uniform), resized back to the input size; the whole image after 10 misses."""
    h, w = pixels.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(min_scale, 1.0)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        ch, cw = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
        if 0 < ch <= h and 0 < cw <= w:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return _resize(pixels[top : top + ch, left : left + cw], h, w)
    return pixels


def translate(pixels: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Shift by up to ``pad`` pixels each way (CIFAR's pad-and-crop), filling with edge values."""
    h, w = pixels.shape[:2]
    padded = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    top, left = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
    return padded[top : top + h, left : left + w]


# --- RandAugment (Cubuk et al. 2020, "RandAugment: Practical automated data augmentation with a
# reduced search space"), the 14 ops of its Table 1 on intensities in [0, 1] ----------------------
#
# Magnitudes follow torchvision's RandAugment (31 bins, 0..30): the op strength at magnitude m is
# m / 30 of its strength at 30. The ops work on floats, without rounding to 8 bits, except
# posterize and equalize, which act on 8-bit levels; each one's reference is PIL's (ImageOps,
# ImageEnhance, Image.transform: what AutoAugment and timm call). Geometric ops sample the
# nearest pixel and fill with black.

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


def _check_rand_augment(num_ops: float = 2, magnitude: float = 9) -> None:
    if num_ops != int(num_ops) or num_ops < 1:
        raise ValueError(f"rand_augment: num_ops must be a whole number >= 1, got {num_ops:g}.")
    if not 0 <= magnitude <= 30:
        raise ValueError(f"rand_augment: magnitude must be in [0, 30], got {magnitude:g}.")


@dataclasses.dataclass(frozen=True)
class Intensity:
    """How ``pixel_values`` relate to intensities in ``[0, 1]``:
    ``pixel_values = (intensity * white - mean) / std`` per channel, with ``white`` the value a
    uint8 255 takes after rescaling (1 for the usual ``rescale = 1/255``)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    white: float = 1.0

    @classmethod
    def of(cls, preprocessing) -> Intensity:
        """From an :class:`~jaxtl.models.preprocessing.ImagePreprocessing`."""
        return cls(
            tuple(float(m) for m in preprocessing.mean),
            tuple(float(s) for s in preprocessing.std),
            255.0 * float(preprocessing.rescale),
        )

    def to_unit(self, pixels: np.ndarray) -> np.ndarray:
        return (pixels * np.float32(self.std) + np.float32(self.mean)) / np.float32(self.white)

    def from_unit(self, x: np.ndarray) -> np.ndarray:
        return (x * np.float32(self.white) - np.float32(self.mean)) / np.float32(self.std)


OPS: dict[str, Callable[..., np.ndarray]] = {
    "hflip": hflip,
    "random_resized_crop": random_resized_crop,
    "translate": translate,
    "rand_augment": rand_augment,
}
# Ops that read intensities in [0, 1] rather than pixel_values: Augment converts around them.
_ON_INTENSITIES = frozenset({"rand_augment"})
# Argument checks run by parse, so a bad spec fails before anything runs.
_CHECKS: dict[str, Callable[..., None]] = {"rand_augment": _check_rand_augment}


@dataclasses.dataclass(frozen=True)
class Augment:
    """A sequence of ``(op name, args)`` applied to ``example["pixel_values"]``.

    ``intensity`` is the model's normalization, needed by ops on intensities (rand_augment).
    """

    ops: tuple[tuple[str, tuple[float, ...]], ...]
    intensity: Intensity | None = None

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        pixels = example["pixel_values"]
        for name, args in self.ops:
            if name in _ON_INTENSITIES:
                scale = self._intensity(pixels)
                pixels = scale.from_unit(OPS[name](scale.to_unit(pixels), rng, *args))
            else:
                pixels = OPS[name](pixels, rng, *args)
        example["pixel_values"] = np.ascontiguousarray(pixels, dtype=np.float32)
        return example

    def check(self, example: dict) -> None:
        """Raises if this augmentation cannot run on ``example`` (before any worker starts)."""
        if "pixel_values" not in example:
            raise ValueError(
                f"augment={self!r} transforms images, but the examples hold "
                f"{sorted(k for k in example if k != 'label')}; drop the augmentation."
            )
        if any(name in _ON_INTENSITIES for name, _ in self.ops):
            self._intensity(example["pixel_values"])

    def _intensity(self, pixels: np.ndarray) -> Intensity:
        scale = self.intensity
        if scale is None:
            raise ValueError(
                f"augment={self!r}: rand_augment works on pixel intensities and needs the "
                "model's normalization; build it with augment.parse(spec, "
                "model.extras['preprocessing'])."
            )
        if len(scale.mean) not in (1, pixels.shape[-1]):
            raise ValueError(
                f"The normalization has {len(scale.mean)} channels but the images have "
                f"{pixels.shape[-1]}; pass the preprocessing the images were encoded with."
            )
        return scale

    def __repr__(self) -> str:  # the spec, so that checkpoints can record what augmented
        return ",".join(f"{n}({', '.join(f'{a:g}' for a in args)})" for n, args in self.ops)


_OP = re.compile(r"^\s*([a-z_]+)\s*(?:\(([^()]*)\))?\s*$")


def parse(spec: str | None, preprocessing=None) -> Augment | None:
    """``"random_resized_crop(0.35),hflip"`` -> an :class:`Augment`; ``None``/``""`` -> None.

    Args:
      spec: comma-separated ops of :data:`OPS`, each with optional numeric arguments.
      preprocessing: the model's :class:`~jaxtl.models.preprocessing.ImagePreprocessing`
        (``model.extras["preprocessing"]``), which ``rand_augment`` needs to see intensities.

    Example:
      >>> parse("translate(2),hflip")
      translate(2),hflip()
      >>> parse("rand_augment(2, 9)")
      rand_augment(2, 9)
    """
    if not spec:
        return None
    ops = []
    for part in _split(spec):
        m = _OP.match(part)
        if not m or m[1] not in OPS:
            batch_level = m is not None and m[1] in ("mixup", "cutmix")
            hint = " (mixup and cutmix mix batches: TrainConfig.mixup / .cutmix)"
            raise ValueError(
                f"Unknown augmentation {part.strip()!r} in {spec!r}; use a comma-separated list "
                f"of {sorted(OPS)}, each with optional numeric arguments, e.g. "
                f"'random_resized_crop(0.35),hflip'{hint if batch_level else ''}."
            )
        try:
            args = tuple(float(a) for a in m[2].split(",")) if m[2] and m[2].strip() else ()
        except ValueError as e:
            raise ValueError(f"Augmentation {part.strip()!r}: arguments must be numbers.") from e
        try:
            inspect.signature(OPS[m[1]]).bind(None, None, *args)
        except TypeError as e:
            raise ValueError(f"Augmentation {part.strip()!r}: too many arguments.") from e
        _CHECKS.get(m[1], lambda *a: None)(*args)
        if m[1] == "translate":
            args = tuple(int(a) for a in args)
        ops.append((m[1], args))
    intensity = Intensity.of(preprocessing) if preprocessing is not None else None
    return Augment(tuple(ops), intensity)


def _split(spec: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in spec:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]
