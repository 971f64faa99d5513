"""Inception-v3 in Flax linen, read from torchvision state dicts.

torchvision's ``Inception3`` (``torchvision.models.inception_v3``) is recognised from its state
dict names (:func:`detect`); the param tree mirrors them (``Conv2d_1a_3x3/conv/kernel``,
``Conv2d_1a_3x3/bn/scale``, ``Mixed_5b/branch1x1/conv/kernel``, ..., head ``fc``), so rules such
as ``Mixed_7`` select what a PyTorch user expects. Parity with torchvision 0.29.1 is tested in
``tests/test_inception.py``.

Numerics follow torchvision's eval forward:

* ``BasicConv2d`` is a bias-free conv, ``BatchNorm2d(eps=0.001)`` and ReLU. Every conv pads
  explicitly as torchvision declares it (``(0, 3)`` / ``(3, 0)`` for the 1x7 / 7x1 convs, none
  for the stride-2 ones); ``"SAME"`` would pad differently.
* Max pools are 3x3, stride 2, unpadded (floor mode); the ``branch_pool`` average pools are 3x3,
  stride 1, padding 1 with ``count_include_pad=True`` (torch's default: border windows divide
  by 9, zeros included).
* BatchNorm runs in inference mode unless its path is under ``bn_train`` (see
  :func:`jaxtl.models.layers.bn_trains`); the running-variance caveat in
  :mod:`jaxtl.models.resnet` (biased vs unbiased batch variance) applies here too.
* Dropout (p=0.5) before ``fc`` in training only.

``transform_input`` (on by default): torchvision's pretrained Inception-v3 is Google's port,
trained on pixels scaled to ``[-1, 1]``. torchvision nonetheless feeds it ImageNet-normalized
pixels (``(x - mean) / std``, the same recipe as every other torchvision model) and converts
inside the model: channel ``c`` becomes ``x_c * std_c / 0.5 + (mean_c - 0.5) / 0.5``. jaxtl does
the same, so ``pixel_values`` are what ``extras["preprocessing"]`` produces. A state dict does not
say whether its model used the transform; :func:`detect` assumes torchvision's pretrained
setting. For weights trained with ``transform_input=False``, call :func:`build` with
``raw_config={**detect(shapes), "transform_input": False}``.

With ``in_channels=1`` the stem's RGB kernels are summed (timm's rule) and the preprocessing
normalizes gray pixels with the mean of the ImageNet means and stds
(:meth:`ImagePreprocessing.with_channels`). The transform then uses those averaged statistics,
which is exactly the mean of the three channel transforms (it is affine in mean and std): a gray
image ``g`` reaches the stem as ``(g - 0.5) / 0.5``, the value each RGB channel of ``(g, g, g)``
reaches it with, so the adapted model matches the RGB model on gray images (tested). Other channel
counts have no such correspondence and are refused with ``transform_input`` on.

The auxiliary classifier (``AuxLogits.*``) is not part of the model. torchvision runs it only in
training mode, to add ``0.4 * aux_loss`` to the from-scratch ImageNet recipe; transfer recipes
(torchvision's fine-tuning tutorial among them) train without it. Keeping its params in the tree
unused would leave them with zero gradients under full fine-tuning, so :meth:`convert` leaves its
tensors unmapped and the load report lists them as ``unexpected``. Exports therefore hold no
``AuxLogits``: they load strictly into ``inception_v3(aux_logits=False, init_weights=False,
num_classes=N)``, or with ``load_state_dict(strict=False)`` into a model that has the head.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models import torch_layers as tl
from jaxtl.models.common import (
    abstract_variables_in_order,
    adapt_input_channels,
    check_in_channels,
    host_dtype,
    leaf_rng,
    make_apply,
    state_dict_exporter,
    trunc_normal,
)
from jaxtl.models.layers import Dropout, batch_norm, check_nhwc
from jaxtl.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, torchvision_imagenet
from jaxtl.models.registry import ModelSpec
from jaxtl.transfer.structure import Structure

EPSILON = 1e-3  # torchvision's BasicConv2d: nn.BatchNorm2d(out_channels, eps=0.001)
FEATURES = 2048
MIN_SIZE = 75  # smaller inputs leave no pixels after Mixed_7a (torchvision's documented minimum)
STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
BLOCKS = (
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
)
STEM_KERNEL = "Conv2d_1a_3x3/conv/kernel"


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """The architecture's variable parts (the rest is fixed by Inception-v3).

    Attributes:
      num_channels: input channels.
      transform_input: re-normalize ImageNet-normalized inputs to the ``[-1, 1]`` scaling the
        weights were trained with (torchvision's ``transform_input``).
      dropout: dropout rate before ``fc`` (torchvision's default 0.5).
      arch: ``"inception_v3"``.
      num_classes_in_checkpoint: width of the checkpoint's ``fc``, ``None`` without one.
    """

    num_channels: int = 3
    transform_input: bool = True
    dropout: float = 0.5
    arch: str = "inception_v3"
    num_classes_in_checkpoint: int | None = None

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any], in_channels: int | None = None) -> InceptionConfig:
        """Reads :func:`detect`'s raw config; ``in_channels`` overrides the checkpoint's."""
        channels = check_in_channels(in_channels) or int(raw.get("in_channels", 3))
        config = cls(
            num_channels=channels,
            transform_input=bool(raw.get("transform_input", True)),
            dropout=float(raw.get("dropout", 0.5)),
            arch=str(raw.get("arch", "inception_v3")),
            num_classes_in_checkpoint=raw.get("num_classes_in_checkpoint"),
        )
        config.input_transform()  # refuse an undefined transform before building anything
        return config

    def input_transform(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel ``(scale, shift)`` of torchvision's ``_transform_input``.

        Computed in Python floats as torchvision writes them (``0.229 / 0.5``,
        ``(0.485 - 0.5) / 0.5``), so the float32 constants are identical.
        """
        if self.num_channels == 3:
            means, stds = IMAGENET_MEAN, IMAGENET_STD
        elif self.num_channels == 1:
            means, stds = (float(np.mean(IMAGENET_MEAN)),), (float(np.mean(IMAGENET_STD)),)
        elif self.transform_input:
            raise ValueError(
                f"Inception-v3 with in_channels={self.num_channels}: transform_input re-normalizes "
                "each RGB channel with its own ImageNet mean/std (grayscale with their average), "
                f"which defines no mapping for {self.num_channels} channels. Use in_channels=1 or "
                "3, or build with raw_config['transform_input'] = False and feed pixels scaled to "
                "[-1, 1]."
            )
        else:
            return (1.0,) * self.num_channels, (0.0,) * self.num_channels
        return tuple(s / 0.5 for s in stds), tuple((m - 0.5) / 0.5 for m in means)


class BasicConv2d(nn.Module):
    """torchvision's ``BasicConv2d``: ``conv`` (no bias), ``bn`` (eps 0.001), ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        (ph, pw) = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.stride,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            # torchvision's init_weights: trunc_normal_(std=0.1, a=-2, b=2), i.e. untruncated.
            kernel_init=nn.initializers.normal(0.1),
            dtype=self.dtype,
            param_dtype=self.dtype,
            name="conv",
        )(x)
        bn = batch_norm(
            self, "bn", train=train, bn_train=bn_train, epsilon=EPSILON, dtype=self.dtype
        )
        return nn.relu(bn(x))


def _avg_pool(x: jax.Array) -> jax.Array:
    # F.avg_pool2d(kernel_size=3, stride=1, padding=1), count_include_pad=True by default.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)


class _Block(nn.Module):
    """A Mixed block: its ``conv(name, features, kernel, stride, padding)`` factory is shared."""

    dtype: Any = jnp.float32

    def conv(self, name: str, features: int, kernel: int | tuple[int, int], **kwargs: Any):
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        return BasicConv2d(features, kernel, dtype=self.dtype, name=name, **kwargs)


def _pad(kernel: tuple[int, int]) -> tuple[int, int]:
    return (kernel[0] // 2, kernel[1] // 2)


class InceptionA(_Block):
    """``Mixed_5b/5c/5d``: 1x1, 5x5, double 3x3 and pooled branches at 35x35 (299 input)."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        mode = dict(train=train, bn_train=bn_train)
        b1 = self.conv("branch1x1", 64, 1)(x, **mode)
        b5 = self.conv("branch5x5_1", 48, 1)(x, **mode)
        b5 = self.conv("branch5x5_2", 64, 5, padding=(2, 2))(b5, **mode)
        b3 = self.conv("branch3x3dbl_1", 64, 1)(x, **mode)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(b3, **mode)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=(1, 1))(b3, **mode)
        bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool(x), **mode)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """``Mixed_6a``: grid reduction 35 -> 17 (stride-2 3x3, double 3x3, max pool)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        mode = dict(train=train, bn_train=bn_train)
        b3 = self.conv("branch3x3", 384, 3, stride=2)(x, **mode)
        bd = self.conv("branch3x3dbl_1", 64, 1)(x, **mode)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(bd, **mode)
        bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd, **mode)
        return jnp.concatenate([b3, bd, tl.max_pool(x, 3, 2)], axis=-1)


class InceptionC(_Block):
    """``Mixed_6b..6e``: factorized 7x7 branches (1x7 then 7x1) at 17x17."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        mode = dict(train=train, bn_train=bn_train)
        c7, row, col = self.channels_7x7, (1, 7), (7, 1)
        b1 = self.conv("branch1x1", 192, 1)(x, **mode)
        b7 = self.conv("branch7x7_1", c7, 1)(x, **mode)
        b7 = self.conv("branch7x7_2", c7, row, padding=_pad(row))(b7, **mode)
        b7 = self.conv("branch7x7_3", 192, col, padding=_pad(col))(b7, **mode)
        bd = self.conv("branch7x7dbl_1", c7, 1)(x, **mode)
        bd = self.conv("branch7x7dbl_2", c7, col, padding=_pad(col))(bd, **mode)
        bd = self.conv("branch7x7dbl_3", c7, row, padding=_pad(row))(bd, **mode)
        bd = self.conv("branch7x7dbl_4", c7, col, padding=_pad(col))(bd, **mode)
        bd = self.conv("branch7x7dbl_5", 192, row, padding=_pad(row))(bd, **mode)
        bp = self.conv("branch_pool", 192, 1)(_avg_pool(x), **mode)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """``Mixed_7a``: grid reduction 17 -> 8."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        mode = dict(train=train, bn_train=bn_train)
        row, col = (1, 7), (7, 1)
        b3 = self.conv("branch3x3_1", 192, 1)(x, **mode)
        b3 = self.conv("branch3x3_2", 320, 3, stride=2)(b3, **mode)
        b7 = self.conv("branch7x7x3_1", 192, 1)(x, **mode)
        b7 = self.conv("branch7x7x3_2", 192, row, padding=_pad(row))(b7, **mode)
        b7 = self.conv("branch7x7x3_3", 192, col, padding=_pad(col))(b7, **mode)
        b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7, **mode)
        return jnp.concatenate([b3, b7, tl.max_pool(x, 3, 2)], axis=-1)


class InceptionE(_Block):
    """``Mixed_7b/7c``: expanded filter banks (1x3 and 3x1 side by side) at 8x8."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        mode = dict(train=train, bn_train=bn_train)
        row, col = (1, 3), (3, 1)
        b1 = self.conv("branch1x1", 320, 1)(x, **mode)
        b3 = self.conv("branch3x3_1", 384, 1)(x, **mode)
        b3 = jnp.concatenate(
            [
                self.conv("branch3x3_2a", 384, row, padding=_pad(row))(b3, **mode),
                self.conv("branch3x3_2b", 384, col, padding=_pad(col))(b3, **mode),
            ],
            axis=-1,
        )
        bd = self.conv("branch3x3dbl_1", 448, 1)(x, **mode)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=(1, 1))(bd, **mode)
        bd = jnp.concatenate(
            [
                self.conv("branch3x3dbl_3a", 384, row, padding=_pad(row))(bd, **mode),
                self.conv("branch3x3dbl_3b", 384, col, padding=_pad(col))(bd, **mode),
            ],
            axis=-1,
        )
        bp = self.conv("branch_pool", 192, 1)(_avg_pool(x), **mode)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# torchvision's Inception3.__init__: each Mixed block's class and arguments, in order.
_BLOCK_LAYOUT: tuple[tuple[type[_Block], dict[str, int]], ...] = (
    (InceptionA, {"pool_features": 32}),
    (InceptionA, {"pool_features": 64}),
    (InceptionA, {"pool_features": 64}),
    (InceptionB, {}),
    (InceptionC, {"channels_7x7": 128}),
    (InceptionC, {"channels_7x7": 160}),
    (InceptionC, {"channels_7x7": 160}),
    (InceptionC, {"channels_7x7": 192}),
    (InceptionD, {}),
    (InceptionE, {}),
    (InceptionE, {}),
)


def _check_pixels(pixel_values: jax.Array, channels: int) -> None:
    check_nhwc(pixel_values, channels)
    height, width = pixel_values.shape[1:3]
    if min(height, width) < MIN_SIZE:
        raise ValueError(
            f"Inception-v3 needs inputs of at least {MIN_SIZE}x{MIN_SIZE} pixels (its stride-2 "
            f"layers leave nothing smaller), got {height}x{width}. Resize the images (its "
            "pretrained size is 299)."
        )


class Inception3(nn.Module):
    """torchvision's ``Inception3`` (eval forward, without ``AuxLogits``) with a task head.

    Takes ImageNet-normalized NHWC ``pixel_values`` (see the module docstring on
    ``transform_input``). Returns ``fc`` logits ``[B, num_labels]`` over the globally
    average-pooled features, or for ``task="features"`` those features ``[B, 2048]``.
    """

    config: InceptionConfig
    task: str = "classification"
    num_labels: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, *, train: bool = False, bn_train: tuple[str, ...] = ()
    ) -> jax.Array:
        c = self.config
        _check_pixels(pixel_values, c.num_channels)
        x = pixel_values.astype(self.dtype)
        if c.transform_input:
            scale, shift = c.input_transform()
            x = x * jnp.asarray(scale, self.dtype) + jnp.asarray(shift, self.dtype)
        mode = dict(train=train, bn_train=bn_train)
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x, **mode)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x, **mode)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x, **mode)
        x = tl.max_pool(x, 3, 2)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x, **mode)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x, **mode)
        x = tl.max_pool(x, 3, 2)
        for name, (block, kwargs) in zip(BLOCKS, _BLOCK_LAYOUT, strict=True):
            x = block(dtype=self.dtype, name=name, **kwargs)(x, **mode)
        pooled = x.mean(axis=(1, 2))  # AdaptiveAvgPool2d(1) + flatten
        if self.task == "features":
            return pooled
        pooled = Dropout(c.dropout, stream=True)(pooled, deterministic=not train)
        return nn.Dense(
            self.num_labels,
            kernel_init=nn.initializers.normal(0.1),
            dtype=self.dtype,
            param_dtype=self.dtype,
            name="fc",
        )(pooled)


# ---- checkpoints: detect, convert, init, export ---------------------------------------------


def detect(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """Recognises a torchvision Inception-v3 state dict by its names.

    Returns:
      The raw config for :func:`build`, or ``None`` when the names are not Inception3's.
      ``transform_input`` is always True (torchvision's setting for its pretrained weights; a
      state dict cannot tell).

    Example:
      >>> detect({"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
      ...         "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
      ...         "fc.weight": (1000, 2048)})["num_classes_in_checkpoint"]
      1000
    """
    stem = shapes.get("Conv2d_1a_3x3.conv.weight")
    if stem is None or len(stem) != 4 or "Mixed_7c.branch_pool.conv.weight" not in shapes:
        return None
    fc = shapes.get("fc.weight")
    return {
        "format": "torchvision",
        "arch": "inception_v3",
        "in_channels": int(stem[1]),
        "num_classes_in_checkpoint": int(fc[0]) if fc is not None and len(fc) == 2 else None,
        "aux_logits": "AuxLogits.fc.weight" in shapes,
        "transform_input": True,
    }


_OURS = (*STEM, *BLOCKS, "fc")


def convert_state_dict(
    tensors: Mapping[str, np.ndarray], *, in_channels: int | None = None
) -> dict[str, np.ndarray]:
    """Renames a torchvision Inception3 state dict to model paths and Flax layouts.

    ``X.conv.weight`` -> ``X/conv/kernel`` (OIHW -> HWIO), ``X.bn.weight|bias`` ->
    ``X/bn/scale|bias``, running statistics -> ``batch_stats/X/bn/mean|var``, ``fc.weight`` ->
    ``fc/kernel`` (transposed); ``num_batches_tracked`` is dropped. ``AuxLogits.*`` and any other
    names pass through unchanged, so the load report lists them as ``unexpected``. With
    ``in_channels``, the stem kernel is adapted
    (:func:`jaxtl.models.common.adapt_input_channels`).

    Example:
      >>> out = convert_state_dict({"Mixed_6b.branch7x7_2.conv.weight": np.zeros((8, 4, 1, 7))})
      >>> out["Mixed_6b/branch7x7_2/conv/kernel"].shape
      (1, 7, 4, 8)
    """
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        *module, leaf = name.split(".")
        ours = bool(module) and module[0] in _OURS
        if ours and leaf == "num_batches_tracked":
            continue  # a step counter, not a weight (AuxLogits' stay: they are unexpected)
        placed = tl.to_flax("/".join(module), leaf, array) if ours else None
        path, array = placed if placed is not None else (name, array)
        out[path] = array
    if in_channels is not None and STEM_KERNEL in out:
        out[STEM_KERNEL] = adapt_input_channels(out[STEM_KERNEL], in_channels, axis=-2)
    return out


def init_leaf(path: str, leaf: jax.ShapeDtypeStruct, seed: int) -> jax.Array:
    """Initializes one param as torchvision's ``Inception3(init_weights=True)`` does.

    Conv and ``fc`` kernels ~ ``trunc_normal_(std=0.1, a=-2, b=2)`` (the bounds are absolute,
    20 standard deviations out, so no draw is cut in practice but they are honoured); BatchNorm
    scale 1, bias 0; the ``fc`` bias, which ``init_weights`` leaves alone, keeps ``nn.Linear``'s
    U(+-1/sqrt(2048)). Each param draws from its own stream
    (:func:`jaxtl.models.common.leaf_rng`).
    """
    module, name = path.rsplit("/", 1)
    rng = leaf_rng(seed, path)
    if name == "kernel":
        values = trunc_normal(rng, leaf.shape, 0.1)
    elif module == "fc" and name == "bias":
        bound = 1.0 / math.sqrt(FEATURES)
        values = rng.uniform(-bound, bound, leaf.shape)
    elif module.endswith("/bn") and name in ("scale", "bias"):
        values = np.full(leaf.shape, 1.0 if name == "scale" else 0.0)
    else:
        raise ValueError(f"No Inception-v3 initializer for param {path!r}.")
    return jnp.asarray(values.astype(host_dtype(leaf)), dtype=leaf.dtype)


def build(
    directory: str,
    raw_config: Mapping[str, Any],
    *,
    task: str,
    num_labels: int,
    dtype: Any = jnp.float32,
    image_size: int | tuple[int, int] | None = None,
    in_channels: int | None = None,
) -> ModelSpec:
    """Builds the Inception-v3 module, initializer, converters and structure for a state dict.

    Called by :func:`jaxtl.weights.loading.load` through the registry with :func:`detect`'s raw
    config. ``image_size`` only changes the preprocessing (the network takes any size of at least
    75x75); ``in_channels`` changes the stem, whose checkpoint kernel is adapted on load, and
    the input transform (see the module docstring).
    """
    del directory  # a state-dict file: everything comes from detect's raw config
    config = InceptionConfig.from_raw(raw_config, in_channels)
    # torchvision's Inception_V3_Weights transforms: ImageClassification(crop 299, resize 342).
    preprocessing = torchvision_imagenet(crop=299, resize=342).with_inputs(
        image_size, config.num_channels
    )
    if min(preprocessing.size) < MIN_SIZE:
        raise ValueError(
            f"image_size={image_size}: Inception-v3 needs at least {MIN_SIZE}x{MIN_SIZE}."
        )

    module = Inception3(config, task, num_labels, dtype)
    pixels = jax.ShapeDtypeStruct((1, *preprocessing.size, config.num_channels), dtype)
    variables, order = abstract_variables_in_order(module, pixels)
    apply, forward = make_apply(module, ("pixel_values",), has_batch_stats=True)

    return ModelSpec(
        config=config,
        module=module,
        abstract_params=variables["params"],
        abstract_batch_stats=variables["batch_stats"],
        init_leaf=init_leaf,
        convert=functools.partial(convert_state_dict, in_channels=in_channels),
        apply=apply,
        forward=forward,
        structure=Structure(stem=STEM, blocks=BLOCKS, head=("fc",) if task != "features" else ()),
        extras={
            "preprocessing": preprocessing,
            "stem_kernel": STEM_KERNEL,
            "feature_size": FEATURES,
            "transform_input": config.transform_input,
            "arch": config.arch,
        },
        export=state_dict_exporter(functools.partial(tl.export_state_dict, modules=tuple(order))),
    )
