"""Per-example image augmentation on the model's inputs (``pixel_values`` ``[H, W, C]``, already
preprocessed), driven by the generator :class:`~jaxtl.data.pipeline.GrainLoader` derives from
``(seed, epoch, example index)``.

A spec string names the ops in order, e.g. ``"random_resized_crop(0.35),hflip"`` or
``"rand_augment(2, 9),hflip"``; see :data:`OPS`. Ops keep the image's shape, so a batch keeps one
shape and jit compiles once.

Geometric ops (crop, flip, translate) do not care what the values mean. RandAugment's photometric
ops (solarize, posterize, equalize, ...) do: they work on intensities in ``[0, 1]`` (0 black,
1 white), so they need the model's normalization to get from ``pixel_values`` there and back
(:class:`Intensity`, from the model's :class:`~jaxtl.models.preprocessing.ImagePreprocessing`);
the RandAugment ops themselves are :mod:`jaxtl.data.randaugment`.
Batch-level mixing (mixup, cutmix) is in :mod:`jaxtl.data.mixing`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable

import numpy as np
from PIL import Image

from jaxtl.data.randaugment import check_rand_augment, rand_augment


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
_CHECKS: dict[str, Callable[..., None]] = {"rand_augment": check_rand_augment}


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
            hint = " (mixup and cutmix mix batches: TrainConfig.mixup / .cutmix, --mixup/--cutmix)"
            raise ValueError(
                f"Unknown augmentation {part.strip()!r} in augment (--augment) {spec!r}; use a "
                "comma-separated list "
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
