"""AlexNet (torchvision ``alexnet``, the one-GPU variant of "One weird trick") from state dicts.

Five convs (11x11/4, 5x5, 3x3 x3) with 3x3/2 max pools, a 6x6 adaptive average pool, and the
9216 -> 4096 -> 4096 -> classes classifier with dropout 0.5 before each hidden Linear. The network
is :class:`jaxtl.models.plain_cnn.SequentialCNN`; parity with torchvision is tested in
``tests/test_plain_cnn.py`` against fixtures that real torchvision produced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jaxtl.models import torch_layers as tl
from jaxtl.models.plain_cnn import build_sequential, detect_sequential
from jaxtl.models.preprocessing import torchvision_imagenet
from jaxtl.models.registry import ModelSpec

FEATURES = (
    ("conv", 64, 11, 4, 2),
    ("relu",),
    ("pool", 3, 2),
    ("conv", 192, 5, 1, 2),
    ("relu",),
    ("pool", 3, 2),
    ("conv", 384, 3, 1, 1),
    ("relu",),
    ("conv", 256, 3, 1, 1),
    ("relu",),
    ("conv", 256, 3, 1, 1),
    ("relu",),
    ("pool", 3, 2),
)
CLASSIFIER = (
    ("dropout", 0.5),
    ("linear", 4096),
    ("relu",),
    ("dropout", 0.5),
    ("linear", 4096),
    ("relu",),
    ("linear", 1000),
)
_CONV_SHAPES = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3)}
_CONV_SHAPES[10] = (256, 256, 3, 3)


def detect(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """``{"arch": "alexnet", ...}`` for a torchvision AlexNet state dict; ``None`` otherwise."""
    found = detect_sequential(shapes, _CONV_SHAPES)
    if found is None or shapes.get("classifier.1.weight", (0, 0))[1] != 256 * 6 * 6:
        return None
    return {"format": "torchvision", "arch": "alexnet", **found}


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
    """Builds AlexNet for a torchvision state dict recognised by :func:`detect`."""
    del directory
    return build_sequential(
        family="alexnet",
        features=FEATURES,
        classifier=CLASSIFIER,
        pool_size=(6, 6),
        raw_config={"arch": "alexnet", **raw_config},
        task=task,
        num_labels=num_labels,
        dtype=dtype,
        in_channels=in_channels,
        image_size=image_size,
        preprocessing=torchvision_imagenet(),
        init_leaf=tl.torch_default_leaf,  # torchvision's AlexNet keeps PyTorch's default init
        min_size=63,
    )
