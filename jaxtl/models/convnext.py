"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s") in Flax linen, read from Hugging Face
checkpoints.

The param tree mirrors the names transformers stores ``ConvNextModel`` /
``ConvNextForImageClassification`` under, ``nn.ModuleList`` indices included
(``convnext/encoder/stages/1/downsampling_layer/1``, ``convnext/encoder/stages/0/layers/2/
pwconv1``), so the name map is the mechanical one of :mod:`jaxtl.models.torch_layers` plus the
per-block ``layer_scale_parameter``. Numerics follow ``transformers.ConvNextModel``:

* a patch embedding (a conv with kernel = stride = ``patch_size``) and a LayerNorm;
* stages of blocks; every stage after the first opens with a LayerNorm and a 2x2 stride-2 conv
  (``downsampling_layer``);
* a block: 7x7 depthwise conv (padding 3), LayerNorm over channels, ``pwconv1`` (a Linear to 4x
  the width), the activation (exact erf GELU for ``"gelu"``), ``pwconv2`` back, times the
  per-channel ``layer_scale_parameter``, stochastic depth (training only), plus the input;
* global average pooling and the final LayerNorm (``pooler_output``); ``classifier`` reads it.

Inside the network every LayerNorm has epsilon 1e-6, as transformers hard-codes; only the final
one reads ``layer_norm_eps``. transformers permutes NCHW to NHWC around each block's LayerNorm
and Linears; here everything is NHWC, so those LayerNorms are the plain last-axis one. Parity
with the PyTorch implementation is tested in ``tests/test_convnext.py``.

Inputs are NHWC ``pixel_values``, already normalized (see ``extras["preprocessing"]``), of any
size from :attr:`ConvNextConfig.smallest_input` up.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models import preprocessing
from jaxtl.models import torch_layers as tl
from jaxtl.models.common import (
    ACTIVATIONS,
    abstract_variables_in_order,
    adapt_input_channels,
    check_in_channels,
    flat_numpy,
    hf_exporter,
    init_normal_leaf,
    make_apply,
    segmentation_exporter,
)
from jaxtl.models.conv import DepthwiseConv
from jaxtl.models.layers import (
    SEGMENTATION_HEAD,
    Dropout,
    SegmentationHead,
    block,
    check_nhwc,
    dense,
    layer_norm,
    shard_batch,
)
from jaxtl.models.registry import ModelSpec
from jaxtl.transfer.structure import Structure

BASE = "convnext"  # transformers' base_model_prefix
STEM_KERNEL = "convnext/embeddings/patch_embeddings/kernel"
LAYER_SCALE = "layer_scale_parameter"
INNER_EPS = 1e-6  # transformers' ConvNextLayerNorm default, used by every norm but the final one
_LAYERS = r"convnext/encoder/stages/\d+/layers/\d+"

# Megatron's split of the block MLP (see jaxtl.sharding): the depthwise conv and the LayerNorm
# act per channel, so pwconv1 splits by output column and pwconv2 by input row, one all-reduce.
TENSOR_PARALLEL = ((rf"{_LAYERS}/pwconv1", "column"), (rf"{_LAYERS}/pwconv2", "row"))

# LoRA's default targets: the two pointwise (Linear) layers of every block. The depthwise conv
# is left out: a low-rank update of a grouped kernel is not a grouped kernel (jaxtl.lora).
LORA_TARGETS = (rf"{_LAYERS}/pwconv(1|2)",)


def _pair(value: int | tuple[int, int] | list[int], what: str, source: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(
            f"{source}: {what} must be a positive int or (height, width), got {value!r}."
        )
    return pair  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class ConvNextConfig:
    """The config.json fields the model uses (names as in ``transformers.ConvNextConfig``).

    ``image_size`` and ``patch_size`` are ``(height, width)`` pairs; config.json may hold ints.
    The network reads any input size from :attr:`smallest_input` up; ``image_size`` only sets
    the default preprocessing.
    """

    num_channels: int = 3
    patch_size: tuple[int, int] = (4, 4)
    hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (3, 3, 9, 3)
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    layer_scale_init_value: float = 1e-6
    drop_path_rate: float = 0.0
    image_size: tuple[int, int] = (224, 224)
    # jaxtl's, not config.json's: rematerialize each block under this policy (layers.block).
    remat: str | None = None

    @property
    def smallest_input(self) -> tuple[int, int]:
        """The smallest ``(height, width)`` that leaves one pixel after the patch embedding and
        the downsampling (by 2) that opens every stage after the first."""
        scale = 2 ** (len(self.depths) - 1)
        return (self.patch_size[0] * scale, self.patch_size[1] * scale)

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        """Each block's stochastic-depth rate: 0 to ``drop_path_rate`` evenly over the blocks, in
        order, as transformers' ``ConvNextEncoder`` assigns them."""
        return tuple(float(r) for r in np.linspace(0.0, self.drop_path_rate, sum(self.depths)))

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> ConvNextConfig:
        """Builds the config from a parsed config.json, checking what this model supports.

        Backbone keys (``out_features``, ``stage_names``) and label maps are ignored.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"remat"}
        values = {k: v for k, v in raw.items() if k in names and v is not None}
        for key in ("image_size", "patch_size"):
            if key in values:
                values[key] = _pair(values[key], key, source)
        for key in ("hidden_sizes", "depths"):
            if key in values:
                values[key] = tuple(values[key])
        config = cls(**values)
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"{source}: hidden_act={config.hidden_act!r} is not supported; expected one of "
                f"{sorted(ACTIVATIONS)}."
            )
        stages = raw.get("num_stages")
        stages = len(config.depths) if stages is None else stages
        if not config.depths or not len(config.hidden_sizes) == len(config.depths) == stages:
            raise ValueError(
                f"{source}: depths {list(config.depths)}, hidden_sizes "
                f"{list(config.hidden_sizes)} and num_stages={stages} must agree (one entry "
                "per stage, at least one stage)."
            )
        return config.resized(config.image_size, source)

    def resized(self, image_size: int | tuple[int, int], source: str = "image_size"):
        """The same model, preprocessed for another input size (at least
        :attr:`smallest_input`)."""
        size = _pair(image_size, "image_size", source)
        low = self.smallest_input
        if size[0] < low[0] or size[1] < low[1]:
            raise ValueError(
                f"{source}: image_size={size} is smaller than this ConvNeXt reads: its "
                f"{self.patch_size} patches and {len(self.depths) - 1} downsamplings by 2 need "
                f"at least {low}."
            )
        return dataclasses.replace(self, image_size=size)


class _ConvNextModule(nn.Module):
    """Fields every ConvNeXt submodule shares: the config and the param/compute dtype."""

    config: ConvNextConfig
    dtype: Any = jnp.float32


def _conv(
    config: ConvNextConfig,
    features: int,
    kernel: tuple[int, int],
    stride: int | tuple[int, int],
    padding: Any,
    name: str,
    dtype: Any,
    groups: int = 1,
) -> nn.Conv:
    return (DepthwiseConv if groups > 1 else nn.Conv)(
        features,
        kernel_size=kernel,
        strides=stride,
        padding=padding,
        feature_group_count=groups,
        kernel_init=nn.initializers.normal(config.initializer_range),
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )


class _ModuleList(nn.Module):
    """torch's ``nn.ModuleList`` names: children ``"0"``, ``"1"``, ... called in order as
    ``make(name=str(i))(x, train)``, the activations between them pinned to the batch split
    (:func:`jaxtl.models.layers.shard_batch`)."""

    layers: tuple[Callable[..., nn.Module], ...]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i, make in enumerate(self.layers):
            x = shard_batch(make(name=str(i))(shard_batch(x), train))
        return x


class ConvNextEmbeddings(_ConvNextModule):
    """Non-overlapping patches -> ``hidden_sizes[0]`` channels by a strided conv, then
    LayerNorm (HF ``embeddings``: ``patch_embeddings``, ``layernorm``)."""

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        patch = c.patch_size
        x = _conv(c, c.hidden_sizes[0], patch, patch, "VALID", "patch_embeddings", self.dtype)(
            pixel_values
        )
        return layer_norm(INNER_EPS, "layernorm", self.dtype)(x)


class ConvNextLayer(_ConvNextModule):
    """One ConvNeXt block (HF ``ConvNextLayer``), ``dim`` channels in and out.

    Stochastic depth drops the whole residual branch per example with probability
    ``drop_path`` and scales the survivors by ``1 / (1 - drop_path)``, in training only.
    """

    dim: int = 0
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c, dim, dtype = self.config, self.dim, self.dtype
        h = _conv(c, dim, (7, 7), 1, ((3, 3), (3, 3)), "dwconv", dtype, groups=dim)(x)
        h = layer_norm(INNER_EPS, "layernorm", dtype)(h)
        h = dense(4 * dim, "pwconv1", dtype, std=c.initializer_range)(h)
        h = dense(dim, "pwconv2", dtype, std=c.initializer_range)(ACTIVATIONS[c.hidden_act](h))
        if c.layer_scale_init_value > 0:  # transformers has no such param otherwise
            scale = nn.initializers.constant(c.layer_scale_init_value)
            h = h * self.param(LAYER_SCALE, scale, (dim,), dtype)
        # One keep/drop draw per example (broadcast over H, W, C): transformers' ConvNextDropPath.
        h = Dropout(self.drop_path, broadcast_dims=(1, 2, 3), stream=True)(
            h, deterministic=not train
        )
        return x + h


class ConvNextDownsampling(_ConvNextModule):
    """HF ``downsampling_layer`` (an ``nn.ModuleList``: children ``0`` and ``1``): LayerNorm,
    then a 2x2 stride-2 conv to ``features`` channels."""

    features: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layer_norm(INNER_EPS, "0", self.dtype)(x)
        return _conv(self.config, self.features, (2, 2), 2, "VALID", "1", self.dtype)(x)


class ConvNextStage(_ConvNextModule):
    """HF ``ConvNextStage``: ``downsampling_layer`` (every stage but the first: transformers
    adds one when the width changes or the stage strides, and stages 1.. stride 2), then its
    blocks under ``layers``."""

    stage: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c, s = self.config, self.stage
        if s > 0:
            down = ConvNextDownsampling(c, self.dtype, c.hidden_sizes[s], name="downsampling_layer")
            x = shard_batch(down(x))
        layer = block(ConvNextLayer, c.remat, train_argnum=2)
        first = sum(c.depths[:s])
        layers = tuple(
            functools.partial(layer, c, self.dtype, c.hidden_sizes[s], c.drop_path_rates[first + j])
            for j in range(c.depths[s])
        )
        return _ModuleList(layers, name="layers")(x, train)


class ConvNextEncoder(_ConvNextModule):
    """HF ``ConvNextEncoder``: the stages under ``stages``."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        stages = tuple(
            functools.partial(ConvNextStage, self.config, self.dtype, s)
            for s in range(len(self.config.depths))
        )
        return _ModuleList(stages, name="stages")(x, train)


class ConvNextModel(_ConvNextModule):
    """HF ``ConvNextModel``: ``(last_hidden_state [B, h, w, C], pooler_output [B, C])``, the
    pooled output being the final ``layernorm`` of the spatial mean.

    With ``pool=False`` the second output is that ``layernorm`` applied to every position of
    the map instead (``[B, h, w, C]``), what a segmentation head reads: the pretrained final
    norm, used per pixel, so the backbone keeps every param of ``ConvNextModel`` and each one
    trains (transformers' ``ConvNextBackbone`` adds fresh ``hidden_states_norms`` instead).
    """

    pool: bool = True

    @nn.compact
    def __call__(self, pixel_values: jax.Array, *, train: bool = False):
        x = ConvNextEmbeddings(self.config, self.dtype, name="embeddings")(pixel_values)
        x = ConvNextEncoder(self.config, self.dtype, name="encoder")(x, train=train)
        norm = layer_norm(self.config.layer_norm_eps, "layernorm", self.dtype)
        return x, norm(x.mean(axis=(1, 2)) if self.pool else x)


class ConvNextForTask(_ConvNextModule):
    """ConvNeXt with a task head.

    ``task="features"`` returns the pooled output ``[B, hidden_sizes[-1]]``; ``"classification"``
    and ``"regression"`` return logits ``[B, num_labels]`` from a Dense head named
    ``classifier`` over it, as ``ConvNextForImageClassification`` does. ``"segmentation"``
    returns per-pixel logits ``[B, H, W, num_labels]`` at the input's size from
    ``segmentation_head`` (:class:`~jaxtl.models.layers.SegmentationHead`) over the last
    stage's map, normalized per pixel by the final ``layernorm``.
    """

    task: str = "classification"
    num_labels: int = 2

    @nn.compact
    def __call__(self, pixel_values: jax.Array, *, train: bool = False) -> jax.Array:
        c = self.config
        check_nhwc(pixel_values, c.num_channels)
        size, low = tuple(pixel_values.shape[1:3]), c.smallest_input
        if size[0] < low[0] or size[1] < low[1]:  # torch raises too; XLA would return NaN
            raise ValueError(
                f"pixel_values of {size[0]}x{size[1]} are smaller than this ConvNeXt reads: "
                f"at least {low[0]}x{low[1]}. Preprocess images with "
                f"model.extras['preprocessing'], which gives {c.image_size[0]}x{c.image_size[1]}."
            )
        dense_task = self.task == "segmentation"
        _, out = ConvNextModel(c, self.dtype, pool=not dense_task, name=BASE)(
            pixel_values, train=train
        )
        if dense_task:
            head = SegmentationHead(
                self.num_labels, c.initializer_range, self.dtype, name=SEGMENTATION_HEAD
            )
            return head(out, pixel_values.shape[1:3])
        pooled = out
        if self.task == "features":
            return pooled
        return dense(self.num_labels, "classifier", self.dtype, std=c.initializer_range)(pooled)


def init_leaf(
    path: str, leaf: jax.ShapeDtypeStruct, seed: int, *, config: ConvNextConfig
) -> jax.Array:
    """Initializes one param as transformers' ``ConvNextPreTrainedModel._init_weights`` does.

    Conv and Linear kernels ~ normal(``initializer_range``), biases 0, LayerNorm scales 1, and
    ``layer_scale_parameter`` = ``layer_scale_init_value``. Each param draws from its own stream
    (:func:`jaxtl.models.common.leaf_rng`).
    """
    if path.rsplit("/", 1)[-1] == LAYER_SCALE:
        return jnp.full(leaf.shape, config.layer_scale_init_value, leaf.dtype)
    return init_normal_leaf(path, leaf, seed, config.initializer_range, "ConvNeXt")


def convert_hf_checkpoint(
    tensors: Mapping[str, np.ndarray], in_channels: int | None = None
) -> dict[str, np.ndarray]:
    """Renames a Hugging Face ConvNeXt state dict to model paths and torch layouts to Flax ones.

    ``convnext.`` is optional (``ConvNextModel`` checkpoints have none); ``classifier.*`` maps
    to the head. Conv weights go from OIHW to HWIO (a depthwise ``[C, 1, 7, 7]`` becomes
    ``[7, 7, 1, C]``, Flax's ``feature_group_count`` layout), Linear weights are transposed,
    LayerNorm weights become ``scale`` (:func:`jaxtl.models.torch_layers.to_flax`). Other names
    (a ``ConvNextBackbone``'s ``hidden_states_norms``) pass through unchanged, so the load report
    lists them as unexpected. With ``in_channels`` the patch kernel is adapted
    (:func:`jaxtl.models.common.adapt_input_channels`).

    Example:
      >>> depthwise = {"encoder.stages.0.layers.1.dwconv.weight": np.zeros((8, 1, 7, 7))}
      >>> convert_hf_checkpoint(depthwise)["convnext/encoder/stages/0/layers/1/dwconv/kernel"].shape
      (7, 7, 1, 8)
    """
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        *module, leaf = name.split(".")
        if module[:1] == [BASE]:
            module = module[1:]
        if module[:1] in (["embeddings"], ["encoder"], ["layernorm"]):
            module = [BASE, *module]
        elif module != ["classifier"]:
            out[name] = array
            continue
        if leaf == LAYER_SCALE:
            placed = ("/".join([*module, leaf]), array)
        else:
            placed = tl.to_flax("/".join(module), leaf, array)
        path, array = placed if placed is not None else (name, array)
        if path in out:
            raise ValueError(f"Checkpoint names {path!r} twice (with and without '{BASE}.').")
        out[path] = array
    if in_channels is not None and STEM_KERNEL in out:
        out[STEM_KERNEL] = adapt_input_channels(out[STEM_KERNEL], in_channels)
    return out


def export_hf_checkpoint(
    params: Mapping[str, Any],
    batch_stats: Mapping[str, Any] | None = None,
    *,
    task: str,
    modules: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_hf_checkpoint`: an HF state dict, float32 numpy arrays.

    Names and layouts are ``ConvNextForImageClassification``'s (``ConvNextModel``'s, without
    the ``convnext.`` prefix, for ``task="features"``). ``modules`` lists the module paths in
    creation order (:func:`jaxtl.models.common.abstract_variables_in_order`).
    """
    del batch_stats  # ConvNeXt has no BatchNorm
    state = tl.export_state_dict(params, {}, modules=modules)
    for path, value in flat_numpy(params).items():
        if path.endswith(f"/{LAYER_SCALE}"):
            state[path.replace("/", ".")] = np.ascontiguousarray(value, np.float32)
    if task == "features":  # ConvNextModel's own names have no prefix
        state = {k.removeprefix(f"{BASE}."): v for k, v in state.items()}
    return state


def export_hf_config(config: ConvNextConfig) -> dict[str, Any]:
    """What the exported config.json changes besides the head: the model's own input size and
    channels (after ``image_size=`` / ``in_channels=``), and the float32 of
    :func:`export_hf_checkpoint`'s arrays."""
    height, width = config.image_size
    return {
        "model_type": "convnext",
        "image_size": height if height == width else [height, width],
        "num_channels": config.num_channels,
        "dtype": "float32",
    }


def default_preprocessing(config: ConvNextConfig) -> preprocessing.ImagePreprocessing:
    """What facebook/convnext-*'s ``preprocessor_config.json`` hold (``ConvNextImageProcessor``
    with ``shortest_edge`` = the model's size): resize the short side to ``size / crop_pct``
    (crop_pct 224/256; from 384 on, straight to the size), center-crop, bicubic, ImageNet
    mean/std."""
    height, width = config.image_size
    size = {"shortest_edge": height} if height == width else {"height": height, "width": width}
    raw = {
        "size": size,
        "crop_pct": 224 / 256,
        "resample": 3,  # PIL bicubic
        "image_mean": preprocessing.IMAGENET_MEAN,
        "image_std": preprocessing.IMAGENET_STD,
    }
    recipe = preprocessing.ImagePreprocessing.from_hf(
        raw, source="facebook/convnext ConvNextImageProcessor defaults"
    )
    return recipe.with_channels(config.num_channels)


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
    """Builds the ConvNeXt module, initializer, converter, exporter and structure for one
    checkpoint.

    Called by :func:`jaxtl.weights.loading.load` through the registry; ``task`` and
    ``num_labels`` are already validated there. ``image_size`` only changes the preprocessing
    (and the exported config's ``image_size``): the network reads any size.
    ``in_channels`` adapts the patch embedding to that many input channels.
    ``task="segmentation"`` puts ``segmentation_head`` on the backbone of ``task="features"``,
    every backbone path unchanged; such a model does not export
    (:func:`jaxtl.models.common.segmentation_exporter`).
    """
    config_path = os.path.join(directory, "config.json") if directory else "config.json"
    source = ConvNextConfig.from_hf(raw_config, config_path)
    config = source
    if image_size is not None:
        config = config.resized(image_size, "jaxtl.load(image_size=...)")
    in_channels = check_in_channels(in_channels)
    if in_channels is not None:
        config = dataclasses.replace(config, num_channels=in_channels)
    num_labels = 0 if task == "features" else num_labels
    module = ConvNextForTask(config, dtype, task, num_labels)

    pixels = jax.ShapeDtypeStruct((1, *config.smallest_input, config.num_channels), dtype)
    variables, order = abstract_variables_in_order(module, pixels)
    apply, forward = make_apply(module, ("pixel_values",))

    # Blocks in forward order, each stage's downsampling layer among them: it sits between two
    # stages' blocks, so last_n(k) and layer-wise LR decay treat it as the block it is (timm's
    # ConvNeXt groups it the same way) instead of leaving it frozen with the stem.
    blocks: list[str] = []
    for s, depth in enumerate(config.depths):
        stage = f"{BASE}/encoder/stages/{s}"
        blocks += [f"{stage}/downsampling_layer"] if s > 0 else []
        blocks += [f"{stage}/layers/{j}" for j in range(depth)]
    head = {"features": (), "segmentation": (SEGMENTATION_HEAD,)}.get(task, ("classifier",))
    structure = Structure(
        stem=(f"{BASE}/embeddings",),
        blocks=tuple(blocks),
        neck=(f"{BASE}/layernorm",),
        head=head,
        tensor_parallel=TENSOR_PARALLEL,
        lora_targets=LORA_TARGETS,
    )
    recipe = preprocessing.for_checkpoint(directory, default_preprocessing(source))
    extras = {
        "preprocessing": recipe.with_inputs(image_size, in_channels),
        "image_size": config.image_size,
        "feature_size": config.hidden_sizes[-1],
        "stem_kernel": STEM_KERNEL,
    }
    state_dict = functools.partial(export_hf_checkpoint, task=task, modules=tuple(order))
    if task == "segmentation":
        export = segmentation_exporter("convnext")
    else:
        export = hf_exporter(
            state_dict,
            raw_config,
            "ConvNextModel" if task == "features" else "ConvNextForImageClassification",
            num_labels,
            task,
            **export_hf_config(config),
        )
    return ModelSpec(
        config=config,
        module=module,
        abstract_params=variables["params"],
        init_leaf=functools.partial(init_leaf, config=config),
        convert=functools.partial(convert_hf_checkpoint, in_channels=in_channels),
        apply=apply,
        forward=forward,
        structure=structure,
        extras=extras,
        export=export,
    )
