"""VGG (torchvision ``vgg11``/``vgg13``/``vgg16``/``vgg19``, no BatchNorm) from state dicts.

The layer tables are torchvision's ``cfgs`` ("A", "B", "D", "E"): 3x3 convs with padding 1 and
2x2 max pools, then a 7x7 adaptive average pool and the 25088 -> 4096 -> 4096 -> classes
classifier with dropout 0.5. The network itself is :class:`jaxtl.models.plain_cnn.SequentialCNN`;
parity with torchvision is tested in ``tests/test_plain_cnn.py`` against fixtures that real
torchvision produced.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jaxtl.models import torch_layers as tl
from jaxtl.models.plain_cnn import build_sequential, detect_sequential
from jaxtl.models.preprocessing import torchvision_imagenet
from jaxtl.models.registry import ModelSpec

# torchvision.models.vgg.cfgs: conv widths, "M" = 2x2 max pool.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        *(64, 64, "M", 128, 128, "M", 256, 256, 256, "M"),
        *(512, 512, 512, "M", 512, 512, 512, "M"),
    ),
    "vgg19": (
        *(64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"),
        *(512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
    ),
}
CLASSIFIER = (
    ("linear", 4096),
    ("relu",),
    ("dropout", 0.5),
    ("linear", 4096),
    ("relu",),
    ("dropout", 0.5),
    ("linear", 1000),
)


def feature_layers(arch: str) -> tuple[tuple, ...]:
    """torchvision's ``make_layers(cfg, batch_norm=False)`` as layer specs."""
    layers: list[tuple] = []
    for width in CONFIGS[arch]:
        if width == "M":
            layers.append(("pool", 2, 2))
        else:
            layers += [("conv", width, 3, 1, 1), ("relu",)]
    return tuple(layers)


def _conv_shapes(arch: str) -> dict[int, tuple[int, ...]]:
    shapes, channels = {}, 3
    for index, layer in enumerate(feature_layers(arch)):
        if layer[0] == "conv":
            shapes[index] = (layer[1], channels, 3, 3)
            channels = layer[1]
    return shapes


def detect(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """``{"arch": "vgg16", ...}`` for a torchvision VGG state dict; ``None`` otherwise."""
    for arch in CONFIGS:
        found = detect_sequential(shapes, _conv_shapes(arch))
        if found is not None and shapes.get("classifier.0.weight", (0, 0))[1] == 512 * 7 * 7:
            return {"format": "torchvision", "arch": arch, **found}
    return None


def build(
    directory: str | None,
    raw_config: Mapping[str, Any],
    *,
    task: str,
    num_labels: int,
    dtype: Any = jnp.float32,
    image_size: int | tuple[int, int] | None = None,
    in_channels: int | None = None,
) -> ModelSpec:
    """Builds a VGG for a torchvision state dict recognised by :func:`detect`."""
    del directory
    arch = raw_config.get("arch")
    if arch not in CONFIGS:
        raise ValueError(f"Unknown VGG arch {arch!r}; expected one of {sorted(CONFIGS)}.")
    return build_sequential(
        family="vgg",
        features=feature_layers(arch),
        classifier=CLASSIFIER,
        pool_size=(7, 7),
        raw_config=raw_config,
        task=task,
        num_labels=num_labels,
        dtype=dtype,
        in_channels=in_channels,
        image_size=image_size,
        preprocessing=torchvision_imagenet(),
        # torchvision's VGG._initialize_weights: kaiming_normal(fan_out) convs, N(0, 0.01) Linear.
        init_leaf=functools.partial(tl.kaiming_fan_out_leaf, linear_std=0.01),
        min_size=32,
    )
