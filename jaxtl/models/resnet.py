"""ResNets in Flax linen, read from Hugging Face directories or torchvision state dicts.

One network, two naming schemes. A Hugging Face checkpoint (``ResNetModel`` /
``ResNetForImageClassification``, config.json ``model_type: resnet``) builds :class:`HFResNet`,
whose param tree mirrors transformers' module names
(``resnet/encoder/stages/0/layers/0/layer/1/convolution``, head ``classifier/1``); a torchvision
state dict (``resnet18`` ... ``resnet152``, and the ResNeXt / wide variants, recognised by
:func:`detect`) builds :class:`TorchvisionResNet`, mirroring torchvision's (``layer1/0/conv1``,
``layer1/0/downsample/0``, head ``fc``). Both share one plan of what each residual block
computes (:func:`block_plan`), so the checkpoint name maps stay mechanical and rules such as
``layer4`` select what a PyTorch user expects.

Numerics follow PyTorch, tested against transformers' PyTorch ResNet and torchvision's in
``tests/test_resnet.py``:

* Convolutions pad explicitly by ``kernel // 2`` on every side as ``nn.Conv2d(padding=k // 2)``
  does; ``"SAME"`` would pad a stride-2 conv asymmetrically (e.g. (2, 3) for the 7x7 stem on
  even inputs) and shift every feature map.
* The stem max pool (3x3, stride 2, padding 1) pads with ``-inf``, as ``nn.MaxPool2d`` does.
* transformers applies ``config.hidden_act`` only after the stem and after each residual sum;
  the convolutions inside a block always use ReLU (``ResNetConvLayer``'s default). Mirrored here.
* BatchNorm uses ``epsilon=1e-5`` and runs in inference mode unless its path is under
  ``bn_train`` (see :func:`jaxtl.models.layers.bn_trains`). In training mode both frameworks
  normalize with the biased batch variance, but the running average they keep differs:
  PyTorch updates ``running_var`` with the *unbiased* batch variance (times ``n / (n - 1)``,
  ``n = batch * height * width``), Flax's ``nn.BatchNorm`` with the biased one. Running means
  agree; running variances are smaller here by that factor on the new-batch term (measured in
  ``test_bn_train_updates_only_listed_layers``). Negligible at ImageNet batch sizes, visible for
  tiny feature maps.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models import torch_layers as tl
from jaxtl.models.common import (
    ACTIVATIONS,
    abstract_variables_in_order,
    adapt_input_channels,
    check_in_channels,
    hf_exporter,
    host_dtype,
    leaf_rng,
    make_apply,
    segmentation_exporter,
    state_dict_exporter,
)
from jaxtl.models.conv import conv_general_dilated
from jaxtl.models.layers import SEGMENTATION_HEAD, SegmentationHead, batch_norm, check_nhwc
from jaxtl.models.preprocessing import for_checkpoint, torchvision_imagenet
from jaxtl.models.registry import ModelSpec
from jaxtl.transfer.structure import Structure

BLOCKS = ("basic", "bottleneck")
EPSILON = 1e-5  # torch.nn.BatchNorm2d's default, used by both sources
# torchvision's named depths: (block, blocks per stage) -> the number in the arch name.
_TORCHVISION_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """The architecture, whichever source it came from.

    Attributes:
      source: ``"hf"`` or ``"torchvision"``: whose names the param tree uses.
      block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1, 3x3, 1x1).
      depths: residual blocks per stage.
      widths: output channels of each stage (HF ``hidden_sizes``).
      inner_widths: channels of a bottleneck's 3x3 conv per stage (equal to ``widths`` for
        basic blocks).
      groups: groups of the bottleneck 3x3 conv (ResNeXt).
      stem_width: channels of the stem conv (HF ``embedding_size``).
      num_channels: input channels.
      hidden_act: activation after the stem and after each residual sum.
      downsample_in_first_stage: the first stage strides 2 too (an HF option).
      downsample_in_bottleneck: a bottleneck strides in its first 1x1 conv (ResNet v1, an HF
        option) instead of in its 3x3 conv (v1.5, torchvision's and HF's default).
      arch: torchvision's name for the architecture, e.g. ``"resnet50"`` (also for Hugging Face
        checkpoints: microsoft/resnet-50 is ``"resnet50"``), or a description of the layout.
      num_classes_in_checkpoint: width of the checkpoint's classifier, ``None`` without one.
    """

    source: str
    block: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    inner_widths: tuple[int, ...]
    groups: int = 1
    stem_width: int = 64
    num_channels: int = 3
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    arch: str = ""
    num_classes_in_checkpoint: int | None = None

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> ResNetConfig:
        """Reads a transformers ``ResNetConfig`` dict, checking what this module supports."""
        block = raw.get("layer_type", "bottleneck")
        act = raw.get("hidden_act", "relu")
        depths = tuple(raw.get("depths", (3, 4, 6, 3)))
        widths = tuple(raw.get("hidden_sizes", (256, 512, 1024, 2048)))
        if block not in BLOCKS:
            raise ValueError(f"{source}: layer_type={block!r}; expected one of {BLOCKS}.")
        if act not in ACTIVATIONS:
            raise ValueError(
                f"{source}: hidden_act={act!r} is not supported; expected one of "
                f"{sorted(ACTIVATIONS)}."
            )
        if len(depths) != len(widths) or not depths:
            raise ValueError(
                f"{source}: depths {list(depths)} and hidden_sizes {list(widths)} must have the "
                "same, non-zero length (one entry per stage)."
            )
        labels = raw.get("id2label")
        inner_widths = tuple(w // 4 for w in widths) if block == "bottleneck" else widths
        return cls(
            source="hf",
            block=block,
            depths=depths,
            widths=widths,
            # transformers' ResNetBottleNeckLayer reduces by a fixed factor of 4.
            inner_widths=inner_widths,
            stem_width=int(raw.get("embedding_size", 64)),
            num_channels=int(raw.get("num_channels", 3)),
            hidden_act=act,
            downsample_in_first_stage=bool(raw.get("downsample_in_first_stage", False)),
            downsample_in_bottleneck=bool(raw.get("downsample_in_bottleneck", False)),
            arch=_arch_name(block, list(depths), inner_widths[0], 1),
            num_classes_in_checkpoint=len(labels) if labels else raw.get("num_labels"),
        )

    @classmethod
    def from_torchvision(cls, raw: Mapping[str, Any]) -> ResNetConfig:
        """Reads the raw config :func:`detect` returns for a torchvision state dict."""
        return cls(
            source="torchvision",
            block=raw["block"],
            depths=tuple(raw["layers"]),
            widths=tuple(raw["widths"]),
            inner_widths=tuple(raw["inner_widths"]),
            groups=int(raw.get("groups", 1)),
            stem_width=int(raw["stem_width"]),
            num_channels=int(raw.get("in_channels", 3)),
            arch=raw["arch"],
            num_classes_in_checkpoint=raw.get("num_classes_in_checkpoint"),
        )


class Conv(NamedTuple):
    """One convolution of a residual block's main path."""

    features: int
    kernel: int
    stride: int
    groups: int = 1


class BlockPlan(NamedTuple):
    """What residual block ``index`` of stage ``stage`` computes."""

    convs: tuple[Conv, ...]
    stride: int
    shortcut: bool  # a 1x1 conv + BN projects the input (else identity)


def block_plan(config: ResNetConfig, stage: int, index: int) -> BlockPlan:
    """The block's convs, stride and shortcut: one rule for both sources.

    A block projects its input when channels change or it strides (torchvision's ``downsample``
    rule and transformers' ``should_apply_shortcut``, which agree).
    """
    out = config.widths[stage]
    stride, in_channels = 1, out
    if index == 0:
        stride = 2 if stage > 0 or config.downsample_in_first_stage else 1
        in_channels = config.widths[stage - 1] if stage else config.stem_width
    if config.block == "basic":
        convs = (Conv(out, 3, stride), Conv(out, 3, 1))
    else:
        inner = config.inner_widths[stage]
        first, middle = (stride, 1) if config.downsample_in_bottleneck else (1, stride)
        convs = (Conv(inner, 1, first), Conv(inner, 3, middle, config.groups), Conv(out, 1, 1))
    return BlockPlan(convs, stride, in_channels != out or stride != 1)


def _conv(spec: Conv, name: str, dtype: Any) -> nn.Conv:
    pad = spec.kernel // 2
    return nn.Conv(
        spec.features,
        (spec.kernel, spec.kernel),
        strides=spec.stride,
        padding=((pad, pad), (pad, pad)),
        feature_group_count=spec.groups,
        # ResNeXt's grouped 3x3: the kernel gradient on XLA:CPU's matmul path (models/conv.py)
        conv_general_dilated=conv_general_dilated if spec.groups > 1 else None,
        use_bias=False,
        # torchvision and transformers: kaiming_normal_(mode="fan_out", nonlinearity="relu").
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )


def _linear(features: int, fan_in: int, name: str, dtype: Any) -> nn.Dense:
    # torch.nn.Linear's reset_parameters: weight and bias ~ U(+-1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Dense(
        features,
        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        bias_init=lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound),
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )


class _ResNetModule(nn.Module):
    """Fields every ResNet submodule shares: the config and the param/compute dtype."""

    config: ResNetConfig
    dtype: Any = jnp.float32


class Sequential(nn.Module):
    """torch's ``nn.Sequential`` / ``nn.ModuleList`` names: children ``"0"``, ``"1"``, ...

    ``layers`` holds module constructors (``functools.partial`` of a module class) called as
    ``layer(name=str(i))(x, train=..., bn_train=...)`` in order.
    """

    layers: tuple[Callable[..., nn.Module], ...]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        for i, make in enumerate(self.layers):
            x = make(name=str(i))(x, train=train, bn_train=bn_train)
        return x


class ConvBN(nn.Module):
    """Conv, BatchNorm, optional activation: transformers' ``ResNetConvLayer`` and
    ``ResNetShortCut``, and torchvision's ``downsample`` (``names=("0", "1")``)."""

    conv: Conv
    activation: str | None = None
    names: tuple[str, str] = ("convolution", "normalization")
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        conv_name, norm_name = self.names
        x = _conv(self.conv, conv_name, self.dtype)(x)
        x = batch_norm(
            self, norm_name, train=train, bn_train=bn_train, epsilon=EPSILON, dtype=self.dtype
        )(x)
        return ACTIVATIONS[self.activation](x) if self.activation else x


# ---- torchvision names: conv1, bn1, layer1/0/conv1, layer1/0/downsample/0, fc ------------------


class TorchvisionBlock(_ResNetModule):
    """torchvision's ``BasicBlock`` / ``Bottleneck``: ``conv{i}``/``bn{i}``, ``downsample``."""

    stage: int = 0
    index: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        plan = block_plan(self.config, self.stage, self.index)
        y = x
        for i, spec in enumerate(plan.convs, start=1):
            y = _conv(spec, f"conv{i}", self.dtype)(y)
            y = batch_norm(
                self, f"bn{i}", train=train, bn_train=bn_train, epsilon=EPSILON, dtype=self.dtype
            )(y)
            if i < len(plan.convs):
                y = nn.relu(y)
        if plan.shortcut:
            projection = Conv(self.config.widths[self.stage], 1, plan.stride)
            x = ConvBN(projection, None, ("0", "1"), self.dtype, name="downsample")(
                x, train=train, bn_train=bn_train
            )
        return nn.relu(y + x)


class TorchvisionResNet(_ResNetModule):
    """torchvision's ``ResNet`` with a task head.

    Returns logits ``[B, num_labels]`` from ``fc`` over the globally average-pooled features, or
    for ``task="features"`` those features ``[B, C]``; for ``task="segmentation"``, per-pixel
    logits ``[B, H, W, num_labels]`` at the input's size from ``segmentation_head`` over
    ``layer4``'s map (:class:`~jaxtl.models.layers.SegmentationHead`).
    """

    task: str = "classification"
    num_labels: int = 1000

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, *, train: bool = False, bn_train: tuple[str, ...] = ()
    ) -> jax.Array:
        c = self.config
        check_nhwc(pixel_values, c.num_channels)
        x = _conv(Conv(c.stem_width, 7, 2), "conv1", self.dtype)(pixel_values.astype(self.dtype))
        x = batch_norm(
            self, "bn1", train=train, bn_train=bn_train, epsilon=EPSILON, dtype=self.dtype
        )(x)
        x = tl.max_pool(nn.relu(x), 3, 2, 1)
        for s, depth in enumerate(c.depths):
            blocks = tuple(
                functools.partial(TorchvisionBlock, c, self.dtype, s, i) for i in range(depth)
            )
            x = Sequential(blocks, name=f"layer{s + 1}")(x, train=train, bn_train=bn_train)
        if self.task == "segmentation":
            head = SegmentationHead(self.num_labels, dtype=self.dtype, name=SEGMENTATION_HEAD)
            return head(x, pixel_values.shape[1:3])
        x = x.mean(axis=(1, 2))
        if self.task == "features":
            return x
        return _linear(self.num_labels, c.widths[-1], "fc", self.dtype)(x)


# ---- transformers names: resnet/embedder/..., resnet/encoder/stages/0/layers/0/..., classifier --


class HFBlock(_ResNetModule):
    """transformers' ``ResNetBasicLayer`` / ``ResNetBottleNeckLayer``: ``shortcut``, ``layer``."""

    stage: int = 0
    index: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        plan = block_plan(self.config, self.stage, self.index)
        if plan.shortcut:  # created first: torch registers `shortcut` before `layer`
            projection = Conv(self.config.widths[self.stage], 1, plan.stride)
            residual = ConvBN(projection, dtype=self.dtype, name="shortcut")(
                x, train=train, bn_train=bn_train
            )
        else:
            residual = x
        last = len(plan.convs) - 1
        layers = tuple(
            functools.partial(ConvBN, spec, "relu" if i < last else None, dtype=self.dtype)
            for i, spec in enumerate(plan.convs)
        )
        y = Sequential(layers, name="layer")(x, train=train, bn_train=bn_train)
        return ACTIVATIONS[self.config.hidden_act](y + residual)


class HFStage(_ResNetModule):
    """transformers' ``ResNetStage``: its blocks under ``layers``."""

    stage: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        blocks = tuple(
            functools.partial(HFBlock, self.config, self.dtype, self.stage, i)
            for i in range(self.config.depths[self.stage])
        )
        return Sequential(blocks, name="layers")(x, train=train, bn_train=bn_train)


class HFEmbeddings(_ResNetModule):
    """transformers' ``ResNetEmbeddings``: the 7x7 stride-2 ``embedder`` conv layer, max pool."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        c = self.config
        stem = ConvBN(Conv(c.stem_width, 7, 2), c.hidden_act, dtype=self.dtype, name="embedder")
        return tl.max_pool(stem(x, train=train, bn_train=bn_train), 3, 2, 1)


class HFEncoder(_ResNetModule):
    """transformers' ``ResNetEncoder``: its stages under ``stages``."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        stages = tuple(
            functools.partial(HFStage, self.config, self.dtype, s)
            for s in range(len(self.config.depths))
        )
        return Sequential(stages, name="stages")(x, train=train, bn_train=bn_train)


class HFModel(_ResNetModule):
    """transformers' ``ResNetModel``: ``embedder`` and ``encoder``; returns pooled ``[B, C]``,
    or with ``pool=False`` the last stage's map ``[B, h, w, C]`` (``last_hidden_state``)."""

    pool: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        x = HFEmbeddings(self.config, self.dtype, name="embedder")(
            x, train=train, bn_train=bn_train
        )
        x = HFEncoder(self.config, self.dtype, name="encoder")(x, train=train, bn_train=bn_train)
        return x.mean(axis=(1, 2)) if self.pool else x


class _HFClassifier(nn.Module):
    """transformers' ``classifier = nn.Sequential(nn.Flatten(), nn.Linear(...))``."""

    num_labels: int
    fan_in: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _linear(self.num_labels, self.fan_in, "1", self.dtype)(x)


class HFResNet(_ResNetModule):
    """transformers' ``ResNetForImageClassification`` (``task="features"``: ``ResNetModel``'s
    pooled output ``[B, C]``; ``task="segmentation"``: per-pixel logits ``[B, H, W,
    num_labels]`` at the input's size from ``segmentation_head`` over the last stage's map,
    :class:`~jaxtl.models.layers.SegmentationHead`)."""

    task: str = "classification"
    num_labels: int = 1000

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, *, train: bool = False, bn_train: tuple[str, ...] = ()
    ) -> jax.Array:
        c = self.config
        check_nhwc(pixel_values, c.num_channels)
        dense = self.task == "segmentation"
        x = HFModel(c, self.dtype, pool=not dense, name="resnet")(
            pixel_values.astype(self.dtype), train=train, bn_train=bn_train
        )
        if dense:
            head = SegmentationHead(self.num_labels, dtype=self.dtype, name=SEGMENTATION_HEAD)
            return head(x, pixel_values.shape[1:3])
        if self.task == "features":
            return x
        return _HFClassifier(self.num_labels, c.widths[-1], self.dtype, name="classifier")(x)


# ---- checkpoints: detect, convert, init, export ---------------------------------------------


def detect(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """Recognises a torchvision ResNet state dict by its names and shapes.

    Returns:
      The raw config for :func:`build` (block type from ``conv3``'s presence, blocks per stage
      counted from the names, widths and ResNeXt groups from the shapes), or ``None`` when the
      names are not torchvision ResNet's.

    Example:
      >>> detect({"conv1.weight": (64, 3, 7, 7), "layer1.0.conv1.weight": (64, 64, 3, 3),
      ...         "layer1.0.conv2.weight": (64, 64, 3, 3), "fc.weight": (10, 64)})["arch"]
      'resnet-basic-1'
    """
    stem = shapes.get("conv1.weight")
    if stem is None or len(stem) != 4 or "layer1.0.conv1.weight" not in shapes:
        return None
    block = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
    last = "conv3" if block == "bottleneck" else "conv2"
    layers: list[int] = []
    for stage in itertools.count(1):
        depth = next(i for i in itertools.count() if f"layer{stage}.{i}.conv1.weight" not in shapes)
        if not depth:
            break
        layers.append(depth)
    try:
        widths = [int(shapes[f"layer{s}.0.{last}.weight"][0]) for s in range(1, len(layers) + 1)]
        inner = [int(shapes[f"layer{s}.0.conv1.weight"][0]) for s in range(1, len(layers) + 1)]
        groups = inner[0] // int(shapes["layer1.0.conv2.weight"][1])
    except (KeyError, IndexError, ZeroDivisionError):
        return None  # ResNet-like names without a ResNet's blocks
    fc = shapes.get("fc.weight")
    return {
        "format": "torchvision",
        "arch": _arch_name(block, layers, inner[0], groups),
        "block": block,
        "layers": layers,
        "widths": widths,
        "inner_widths": inner if block == "bottleneck" else widths,
        "groups": groups,
        "stem_width": int(stem[0]),
        "in_channels": int(stem[1]),
        "num_classes_in_checkpoint": int(fc[0]) if fc is not None and len(fc) == 2 else None,
    }


def _arch_name(block: str, layers: list[int], inner: int, groups: int) -> str:
    depth = _TORCHVISION_DEPTHS.get((block, tuple(layers)))
    if depth is None:
        return f"resnet-{block}-{'-'.join(map(str, layers))}"
    if groups > 1:
        return f"resnext{depth}_{groups}x{inner // groups}d"
    if block == "bottleneck" and inner != 64:
        return f"wide_resnet{depth}_{inner // 64}"
    return f"resnet{depth}"


def convert_checkpoint(
    tensors: Mapping[str, np.ndarray],
    *,
    source: str,
    stem_kernel: str,
    in_channels: int | None = None,
) -> dict[str, np.ndarray]:
    """Renames a torchvision or transformers state dict to model paths and Flax layouts.

    ``a.b.weight`` -> ``a/b/kernel`` (OIHW -> HWIO for convs, transposed for Linear) or
    ``a/b/scale`` (BatchNorm); running statistics -> ``batch_stats/a/b/mean|var``;
    ``num_batches_tracked`` is dropped. transformers' ``ResNetModel`` names (no ``resnet.``)
    gain the prefix. Names outside the network pass through unchanged (they become
    ``unexpected``). With ``in_channels``, the stem kernel is adapted
    (:func:`jaxtl.models.common.adapt_input_channels`).

    Example:
      >>> out = convert_checkpoint({"layer1.0.conv1.weight": np.zeros((8, 4, 3, 3))},
      ...                          source="torchvision", stem_kernel="conv1/kernel")
      >>> out["layer1/0/conv1/kernel"].shape
      (3, 3, 4, 8)
    """
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        *module, leaf = name.split(".")
        if source == "hf" and module[:1] in (["embedder"], ["encoder"]):
            module = ["resnet", *module]
        if leaf == "num_batches_tracked":
            continue  # a step counter, not a weight
        placed = tl.to_flax("/".join(module), leaf, array) if _ours(module, source) else None
        path, array = placed if placed is not None else (name, array)
        out[path] = array
    if in_channels is not None and stem_kernel in out:
        out[stem_kernel] = adapt_input_channels(out[stem_kernel], in_channels, axis=-2)
    return out


def _ours(module: list[str], source: str) -> bool:
    root = module[0] if module else ""
    if source == "hf":
        return root in ("resnet", "classifier")
    return root in ("conv1", "bn1", "fc") or (root.startswith("layer") and root[5:].isdigit())


def init_leaf(
    path: str, leaf: jax.ShapeDtypeStruct, seed: int, *, dense_fan_in: Mapping[str, int]
) -> jax.Array:
    """Initializes one param as torchvision's ``ResNet.__init__`` and transformers'
    ``ResNetPreTrainedModel._init_weights`` do.

    Conv kernels ~ kaiming normal (fan_out, ReLU gain), BatchNorm scale 1 and bias 0, Linear
    kernel and bias ~ U(+-1/sqrt(fan_in)) (torch's default). Each param draws from its own
    stream (:func:`jaxtl.models.common.leaf_rng`).
    ``dense_fan_in`` maps each Linear module's path to its input width.
    """
    module, name = path.rsplit("/", 1)
    rng, wide = leaf_rng(seed, path), host_dtype(leaf)
    if module in dense_fan_in and name in ("kernel", "bias"):
        bound = 1.0 / math.sqrt(dense_fan_in[module])
        values = rng.uniform(-bound, bound, leaf.shape)
    elif name == "kernel" and len(leaf.shape) == 4:
        height, width, _, out = leaf.shape
        values = rng.standard_normal(leaf.shape, dtype=wide) * math.sqrt(2 / (height * width * out))
    elif name in ("scale", "bias"):
        values = np.full(leaf.shape, 1.0 if name == "scale" else 0.0)
    else:
        raise ValueError(f"No ResNet initializer for param {path!r}.")
    return jnp.asarray(values.astype(wide), dtype=leaf.dtype)


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
    """Builds the ResNet module, initializer, converters and structure for one checkpoint.

    Called by :func:`jaxtl.weights.loading.load` through the registry. ``raw_config`` is a
    Hugging Face config.json (``model_type: resnet``) or the dict :func:`detect` made from a
    torchvision state dict. ``image_size`` only changes the preprocessing (the network is
    size-agnostic); ``in_channels`` changes the stem, whose checkpoint kernel is adapted on load.
    ``task="segmentation"`` puts ``segmentation_head`` (its classifier initialized as torch's
    Linear) on the backbone of ``task="features"``, every backbone path unchanged; such a model
    does not export (:func:`jaxtl.models.common.segmentation_exporter`).
    """
    in_channels = check_in_channels(in_channels)
    torchvision = raw_config.get("format") == "torchvision"
    if torchvision:
        config = ResNetConfig.from_torchvision(raw_config)
    else:
        config = ResNetConfig.from_hf(raw_config, os.path.join(directory or "", "config.json"))
    if in_channels is not None:
        config = dataclasses.replace(config, num_channels=in_channels)
    top = TorchvisionResNet if torchvision else HFResNet
    module = top(config, dtype, task, num_labels)

    pixels = jax.ShapeDtypeStruct((1, 32, 32, config.num_channels), dtype)
    variables, order = abstract_variables_in_order(module, pixels)
    apply, forward = make_apply(module, ("pixel_values",), has_batch_stats=True)

    has_head = task != "features"
    segmentation = task == "segmentation"
    if torchvision:
        stem, head = ("conv1", "bn1"), ("fc",)
        blocks = tuple(f"layer{s + 1}/{i}" for s, d in enumerate(config.depths) for i in range(d))
        stem_kernel, dense = "conv1/kernel", "fc"
        preprocessing = torchvision_imagenet()
    else:
        stem, head = ("resnet/embedder",), ("classifier",)
        blocks = tuple(
            f"resnet/encoder/stages/{s}/layers/{i}"
            for s, d in enumerate(config.depths)
            for i in range(d)
        )
        stem_kernel, dense = "resnet/embedder/embedder/convolution/kernel", "classifier/1"
        preprocessing = for_checkpoint(directory, torchvision_imagenet())
    preprocessing = preprocessing.with_inputs(image_size, in_channels)
    if segmentation:
        head, dense = (SEGMENTATION_HEAD,), f"{SEGMENTATION_HEAD}/classifier"
    structure = Structure(stem=stem, blocks=blocks, head=head if has_head else ())

    state_dict = functools.partial(tl.export_state_dict, modules=tuple(order))
    if segmentation:
        export = segmentation_exporter("resnet")
    elif torchvision:
        export = state_dict_exporter(state_dict)
    else:
        export = hf_exporter(
            state_dict,
            raw_config,
            "ResNetForImageClassification" if has_head else "ResNetModel",
            num_labels,
            task,
            model_type="resnet",
            num_channels=config.num_channels,
        )

    return ModelSpec(
        config=config,
        module=module,
        abstract_params=variables["params"],
        abstract_batch_stats=variables["batch_stats"],
        init_leaf=functools.partial(
            init_leaf, dense_fan_in={dense: config.widths[-1]} if has_head else {}
        ),
        convert=functools.partial(
            convert_checkpoint,
            source=config.source,
            stem_kernel=stem_kernel,
            in_channels=in_channels,
        ),
        apply=apply,
        forward=forward,
        structure=structure,
        extras={
            "preprocessing": preprocessing,
            "stem_kernel": stem_kernel,
            "feature_size": config.widths[-1],
            "arch": config.arch,
        },
        export=export,
    )
