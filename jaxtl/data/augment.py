"""Per-example image augmentation on the model's inputs (``pixel_values`` ``[H, W, C]``, already
preprocessed), driven by the generator :class:`~jaxtl.data.pipeline.GrainLoader` derives from
``(seed, epoch, example index)``.

A spec string names the ops in order, e.g. ``"random_resized_crop(0.35),hflip"``; see
:data:`OPS`. Ops keep the image's shape, so a batch keeps one shape and jit compiles once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

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


OPS: dict[str, Callable[..., np.ndarray]] = {
    "hflip": hflip,
    "random_resized_crop": random_resized_crop,
    "translate": translate,
}


@dataclasses.dataclass(frozen=True)
class Augment:
    """A sequence of ``(op name, args)`` applied to ``example["pixel_values"]``."""

    ops: tuple[tuple[str, tuple[float, ...]], ...]

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        pixels = example["pixel_values"]
        for name, args in self.ops:
            pixels = OPS[name](pixels, rng, *args)
        example["pixel_values"] = np.ascontiguousarray(pixels, dtype=np.float32)
        return example

    def __repr__(self) -> str:  # the spec, so that checkpoints can record what augmented
        return ",".join(f"{n}({', '.join(f'{a:g}' for a in args)})" for n, args in self.ops)


_OP = re.compile(r"^\s*([a-z_]+)\s*(?:\(([^()]*)\))?\s*$")


def parse(spec: str | None) -> Augment | None:
    """``"random_resized_crop(0.35),hflip"`` -> an :class:`Augment`; ``None``/``""`` -> None.

    Example:
      >>> parse("translate(2),hflip")
      translate(2),hflip()
    """
    if not spec:
        return None
    ops = []
    for part in _split(spec):
        m = _OP.match(part)
        if not m or m[1] not in OPS:
            raise ValueError(
                f"Unknown augmentation {part.strip()!r} in {spec!r}; use a comma-separated list "
                f"of {sorted(OPS)}, each with optional numeric arguments, e.g. "
                "'random_resized_crop(0.35),hflip'."
            )
        try:
            args = tuple(float(a) for a in m[2].split(",")) if m[2] and m[2].strip() else ()
        except ValueError as e:
            raise ValueError(f"Augmentation {part.strip()!r}: arguments must be numbers.") from e
        if m[1] == "translate":
            args = tuple(int(a) for a in args)
        ops.append((m[1], args))
    return Augment(tuple(ops))


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
