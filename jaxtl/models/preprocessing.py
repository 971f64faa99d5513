"""How a vision checkpoint expects its pixels: resize, center crop, rescale, normalize.

The values come from the checkpoint's ``preprocessor_config.json`` where it has one (Hugging Face
image processors), otherwise from the family's documented values (torchvision's ImageNet recipe:
resize the shorter side to 256, center-crop 224, ImageNet mean/std). A :class:`LoadedModel` of a
vision family carries its :class:`ImagePreprocessing` as ``extras["preprocessing"]``, and the data
pipeline calls it, so train and eval images match what the weights were trained on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL resample codes, as stored in Hugging Face preprocessor configs.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PIL = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """Resize -> center crop -> rescale -> normalize, producing the model's NHWC float input.

    Attributes:
      size: the model's input ``(height, width)`` after cropping.
      resize: before cropping, resize the shorter side to this (an int), or to exactly this
        ``(height, width)``; ``None`` resizes straight to ``size``.
      mean, std: per-channel normalization after rescaling.
      rescale: multiplies raw pixel values first (1/255 for uint8 images).
      interpolation: PIL resampling filter name.
      source: where these values came from.
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int | tuple[int, int] | None = None
    rescale: float = 1 / 255
    interpolation: str = "bilinear"
    source: str = ""

    def __post_init__(self) -> None:
        if self.interpolation not in _PIL:
            raise ValueError(
                f"interpolation must be one of {sorted(_PIL)}, got {self.interpolation!r}."
            )
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} differ in length.")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImagePreprocessing:
        """The inverse of :meth:`to_dict` (JSON turned the tuples into lists)."""
        resize = d.get("resize")
        return cls(
            size=tuple(d["size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            resize=tuple(resize) if isinstance(resize, list) else resize,
            rescale=d.get("rescale", 1 / 255),
            interpolation=d.get("interpolation", "bilinear"),
            source=d.get("source", ""),
        )

    def with_channels(self, channels: int) -> ImagePreprocessing:
        """The same recipe for ``channels`` inputs, matching how
        :func:`jaxtl.models.common.adapt_input_channels` adapts the stem kernel: grayscale uses
        the mean of the per-channel values, other counts cycle them."""
        if channels == self.channels:
            return self
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}.")
        if channels == 1:
            return dataclasses.replace(
                self, mean=(float(np.mean(self.mean)),), std=(float(np.mean(self.std)),)
            )
        cycle = lambda v: tuple(v[i % len(v)] for i in range(channels))  # noqa: E731
        return dataclasses.replace(self, mean=cycle(self.mean), std=cycle(self.std))

    def with_size(self, size: int | tuple[int, int]) -> ImagePreprocessing:
        """The same recipe at another input size (the resize keeps its ratio to the crop)."""
        size = _pair(size)
        resize = self.resize
        if isinstance(resize, int):
            resize = round(resize * min(size) / min(self.size))
        elif resize is not None:
            resize = size
        return dataclasses.replace(self, size=size, resize=resize)

    def with_inputs(
        self, image_size: int | tuple[int, int] | None, in_channels: int | None
    ) -> ImagePreprocessing:
        """The recipe for a model loaded with ``image_size=`` / ``in_channels=`` (``None``
        keeps the recipe's own)."""
        recipe = self if image_size is None else self.with_size(image_size)
        return recipe if in_channels is None else recipe.with_channels(in_channels)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Preprocesses ``[N, H, W, C]`` or ``[N, H, W]`` (or one ``[H, W, C]``) images, or a
        list (object array) of ``[H, W, C]`` images of different sizes.

        Integer images are taken as 0..255; float images as already in the rescaled range
        (``rescale`` is not applied again).
        """
        if isinstance(images, list | tuple) or getattr(images, "dtype", None) == np.dtype(object):
            return np.stack([self._checked(np.asarray(im), i) for i, im in enumerate(images)])
        images = np.asarray(images)
        single = images.ndim == 3 and images.shape[-1] in (1, 3, 4) and self.channels in (1, 3)
        if images.ndim == 3 and not single:
            images = images[..., None]  # [N, H, W] grayscale
        if single:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"Expected images [N, H, W, C], got shape {images.shape}.")
        if images.shape[-1] != self.channels:
            raise ValueError(
                f"Images have {images.shape[-1]} channels, the model expects {self.channels}"
                f"{self._channels_fix(images.shape[-1], images.shape[1])}"
            )
        out = np.stack([self._one(im) for im in images])
        return out[0] if single else out

    def _checked(self, image: np.ndarray, i: int) -> np.ndarray:
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] != self.channels:
            raise ValueError(
                f"Image {i} has shape {image.shape}; the model expects [H, W, {self.channels}]"
                f"{self._channels_fix(image.shape[-1], image.shape[0] if image.ndim == 3 else 0)}"
            )
        return self._one(image)

    def _channels_fix(self, channels: int, first: int) -> str:
        """What to do about images with ``channels`` (their last axis; ``first``: their first
        pixel axis, which holds the channels of a channels-first array)."""
        if first == self.channels:
            return (
                ". They look channels-first; jaxtl reads channels last: np.moveaxis(images, 1, -1) "
                "(one image: np.moveaxis(image, 0, -1))."
            )
        return (
            f"; load the model with in_channels={channels} (--in-channels {channels}) to adapt "
            "its stem, or convert the images."
        )

    def _one(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if isinstance(self.resize, int):
            # The short side becomes ``resize``; the long side is truncated, not rounded, as in
            # torchvision's Resize and transformers' get_resize_output_image_size.
            short, long = min(h, w), max(h, w)
            other = max(1, int(self.resize * long / short))
            target = (self.resize, other) if h <= w else (other, self.resize)
        else:
            target = _pair(self.resize) if self.resize is not None else self.size
        if image.dtype == np.uint8:
            # Resize the 8-bit image itself, as PIL-based pipelines (transformers' and
            # torchvision's image processors) do: they round back to uint8 before rescaling.
            pixels = _resize_uint8(image, target, self.interpolation).astype(np.float32)
            pixels *= np.float32(self.rescale)
        else:
            integer = np.issubdtype(image.dtype, np.integer)
            pixels = image.astype(np.float32) * np.float32(self.rescale if integer else 1.0)
            pixels = _resize(pixels, target, self.interpolation)
        top = (pixels.shape[0] - self.size[0]) // 2
        left = (pixels.shape[1] - self.size[1]) // 2
        if top < 0 or left < 0:
            raise ValueError(f"Cannot center-crop {self.size} from a {pixels.shape[:2]} image.")
        pixels = pixels[top : top + self.size[0], left : left + self.size[1]]
        return ((pixels - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "preprocessor_config.json"):
        """Reads a Hugging Face image processor config (ViT, ConvNext/ResNet, BiT styles)."""
        size_cfg = raw.get("size", 224)
        crop_cfg = raw.get("crop_size")
        interpolation = _RESAMPLE.get(raw.get("resample", 2), "bilinear")
        mean = (
            tuple(raw.get("image_mean", IMAGENET_MEAN))
            if raw.get("do_normalize", True)
            else (0.0,) * 3
        )
        std = (
            tuple(raw.get("image_std", IMAGENET_STD))
            if raw.get("do_normalize", True)
            else (1.0,) * 3
        )
        rescale = raw.get("rescale_factor", 1 / 255) if raw.get("do_rescale", True) else 1.0
        resize: int | tuple[int, int] | None
        if isinstance(size_cfg, Mapping) and "height" in size_cfg:
            size = (int(size_cfg["height"]), int(size_cfg["width"]))
            resize = None
        else:
            edge = int(size_cfg["shortest_edge"] if isinstance(size_cfg, Mapping) else size_cfg)
            crop_pct = raw.get("crop_pct")
            if crop_cfg is not None and raw.get("do_center_crop", True):
                crop = (
                    crop_cfg
                    if isinstance(crop_cfg, Mapping)
                    else {"height": crop_cfg, "width": crop_cfg}
                )
                size, resize = (int(crop["height"]), int(crop["width"])), edge
            elif crop_pct is not None and edge < 384:
                # ConvNextImageProcessor: resize the short side to edge / crop_pct, crop edge.
                size, resize = (edge, edge), int(edge / crop_pct)
            else:
                size, resize = (edge, edge), None
        return cls(
            size=size,
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            resize=resize,
            rescale=float(rescale),
            interpolation=interpolation,
            source=source,
        )

    def to_hf(self, template: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A Hugging Face image processor config that :meth:`from_hf` (and transformers) read
        back as this recipe; ``template`` (the source checkpoint's config) keeps its other keys
        and its style: ``crop_pct`` (ConvNext/ResNet) or ``crop_size`` (ViT/BiT)."""
        raw = {k: v for k, v in (template or {}).items() if k not in ("size", "crop_size")}
        h, w = self.size
        exact = isinstance(self.resize, tuple) and tuple(self.resize) == self.size
        resize = None if exact else self.resize  # a resize straight to the crop size
        if resize is None:
            raw.pop("crop_pct", None)
            raw.update(size={"height": h, "width": w}, do_center_crop=False)
        elif not isinstance(resize, int):
            raise ValueError(
                f"A resize to {resize} before a {self.size} crop has no Hugging Face config form."
            )
        elif "crop_pct" in raw:
            if h != w or h >= 384:  # transformers skips the crop from 384 on
                raise ValueError(f"A crop_pct config cannot express a {self.size} crop.")
            # transformers resizes the short side to int(edge / crop_pct): aim mid-way.
            raw.update(size={"shortest_edge": h}, crop_pct=h / (resize + 0.5))
        else:
            raw.update(
                size={"shortest_edge": resize},
                crop_size={"height": h, "width": w},
                do_center_crop=True,
            )
        raw.update(
            do_resize=True,
            resample={v: k for k, v in _RESAMPLE.items()}[self.interpolation],
            do_rescale=self.rescale != 1.0,
            rescale_factor=self.rescale,
            do_normalize=True,
            image_mean=list(self.mean),
            image_std=list(self.std),
        )
        return raw


def for_checkpoint(directory: str | None, default: ImagePreprocessing) -> ImagePreprocessing:
    """The checkpoint's ``preprocessor_config.json`` if it has one, else the family's default."""
    path = os.path.join(directory, "preprocessor_config.json") if directory else ""
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return ImagePreprocessing.from_hf(json.load(f), source=path)
    return default


def torchvision_imagenet(crop: int = 224, resize: int = 256, interpolation: str = "bilinear"):
    """torchvision's ImageNet eval recipe (its ``ImageClassification`` transform)."""
    return ImagePreprocessing(
        size=(crop, crop),
        resize=resize,
        interpolation=interpolation,
        source="torchvision ImageNet defaults",
    )


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _resize_uint8(image: np.ndarray, target: tuple[int, int], interpolation: str) -> np.ndarray:
    if image.shape[:2] == tuple(target):
        return image
    mode_image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(mode_image.resize(target[::-1], _PIL[interpolation]))
    return out.reshape(*target, image.shape[-1])


def _resize(pixels: np.ndarray, target: tuple[int, int], interpolation: str) -> np.ndarray:
    if pixels.shape[:2] == tuple(target):
        return pixels
    # PIL's float mode ("F") resizes one channel at a time, at full precision.
    channels = [
        np.asarray(Image.fromarray(pixels[..., c]).resize(target[::-1], _PIL[interpolation]))
        for c in range(pixels.shape[-1])
    ]
    return np.stack(channels, axis=-1)
