"""Plain convolutional stacks (torchvision's VGG and AlexNet) as one Flax module and one builder.

Both networks are ``features`` (an ``nn.Sequential`` of convs, ReLUs and max pools) ->
``AdaptiveAvgPool2d`` -> flatten -> ``classifier`` (an ``nn.Sequential`` of Linear, ReLU and
Dropout). :class:`SequentialCNN` takes the two layer lists and names every layer by its index in
the torch ``Sequential``, so the Flax tree is ``features/0/kernel`` ... ``classifier/6/bias`` and
the checkpoint map is :func:`jaxtl.models.torch_layers.convert_state_dict`. The family files
(``vgg.py``, ``alexnet.py``) hold only their layer tables, ``detect`` and ``build``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtl.models import torch_layers as tl
from jaxtl.models.common import (
    abstract_variables_in_order,
    adapt_input_channels,
    check_in_channels,
    make_apply,
    state_dict_exporter,
)
from jaxtl.models.layers import Dropout, check_nhwc
from jaxtl.models.preprocessing import ImagePreprocessing
from jaxtl.models.registry import ModelSpec
from jaxtl.transfer.structure import Structure

# Layer specs, in torch Sequential order: ("conv", out, kernel, stride, padding), ("relu",),
# ("pool", kernel, stride), ("linear", out), ("dropout", rate).
Layer = tuple


class _Sequential(nn.Module):
    """One torch ``nn.Sequential``: children named by their index."""

    layers: tuple[Layer, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for index, (kind, *args) in enumerate(self.layers):
            name = str(index)
            if kind == "conv":
                out, kernel, stride, padding = args
                x = tl.conv(
                    out, kernel, stride=stride, padding=padding, name=name, dtype=self.dtype
                )(x)
            elif kind == "linear":
                x = nn.Dense(args[0], dtype=self.dtype, param_dtype=self.dtype, name=name)(x)
            elif kind == "relu":
                x = nn.relu(x)
            elif kind == "pool":
                x = tl.max_pool(x, *args)
            elif kind == "dropout":
                x = Dropout(args[0], deterministic=not train, stream=True)(x)
            else:
                raise ValueError(f"Unknown layer kind {kind!r}.")
        return x


class SequentialCNN(nn.Module):
    """``features -> adaptive avg pool -> flatten (NCHW order) -> classifier`` for a task.

    ``"classification"``/``"regression"``: the classifier with its last Linear resized to
    ``num_labels``. ``"features"``: the classifier without its last Linear (e.g. VGG's fc7
    activations, the usual transfer features).
    """

    features: tuple[Layer, ...]
    classifier: tuple[Layer, ...]
    pool_size: tuple[int, int]
    task: str = "classification"
    num_labels: int = 2
    dtype: Any = jnp.float32
    in_channels: int = 3

    @nn.compact
    def __call__(self, pixel_values: jax.Array, *, train: bool = False) -> jax.Array:
        check_nhwc(pixel_values, self.in_channels)
        x = _Sequential(self.features, self.dtype, name="features")(
            pixel_values.astype(self.dtype), train=train
        )
        x = tl.flatten_nchw(tl.adaptive_avg_pool(x, self.pool_size))
        return _Sequential(self.head_layers(), self.dtype, name="classifier")(x, train=train)

    def head_layers(self) -> tuple[Layer, ...]:
        if self.task == "features":
            return self.classifier[:-1]
        return (*self.classifier[:-1], ("linear", self.num_labels))


def linear_indices(layers: tuple[Layer, ...]) -> list[int]:
    return [i for i, (kind, *_) in enumerate(layers) if kind in ("linear", "conv")]


def build_sequential(
    *,
    family: str,
    features: tuple[Layer, ...],
    classifier: tuple[Layer, ...],
    pool_size: tuple[int, int],
    raw_config: Mapping[str, Any],
    task: str,
    num_labels: int,
    dtype: Any,
    in_channels: int | None,
    image_size: int | tuple[int, int] | None,
    preprocessing: ImagePreprocessing,
    init_leaf: Callable[..., jax.Array],
    min_size: int,
) -> ModelSpec:
    """The :class:`ModelSpec` of a VGG/AlexNet-style network (see the family files)."""
    channels = check_in_channels(in_channels) or 3
    if image_size is not None:
        size = image_size if isinstance(image_size, int) else min(image_size)
        if size < min_size:
            raise ValueError(
                f"image_size={image_size} is too small for {raw_config['arch']}: its pools "
                f"need at least {min_size}x{min_size} pixels."
            )
    preprocessing = preprocessing.with_inputs(image_size, channels)
    module = SequentialCNN(features, classifier, pool_size, task, num_labels, dtype, channels)
    dummy = jax.ShapeDtypeStruct((1, min_size, min_size, channels), dtype)
    variables, order = abstract_variables_in_order(module, dummy)
    abstract = variables["params"]
    apply, forward = make_apply(module, ("pixel_values",))

    layers = [f"features/{i}" for i in linear_indices(features)]
    layers += [f"classifier/{i}" for i in linear_indices(classifier)]
    has_head = task != "features"
    structure = Structure(
        stem=(layers[0],),
        blocks=tuple(layers[1:-1]) if has_head else tuple(layers[1:]),
        head=(layers[-1],) if has_head else (),
    )
    stem_kernel = f"{layers[0]}/kernel"

    def convert(tensors):
        out = tl.convert_state_dict(tensors)
        if stem_kernel in out:
            out[stem_kernel] = adapt_input_channels(out[stem_kernel], channels)
        return out

    return ModelSpec(
        config=dict(raw_config),
        module=module,
        abstract_params=abstract,
        init_leaf=functools.partial(init_leaf, fan_ins=tl.fan_ins(abstract))
        if init_leaf is tl.torch_default_leaf
        else init_leaf,
        convert=convert,
        apply=apply,
        forward=forward,
        structure=structure,
        extras={
            "preprocessing": preprocessing,
            "stem_kernel": stem_kernel,
            "feature_size": _penultimate_width(classifier),
            "arch": raw_config["arch"],
            "family": family,
        },
        export=state_dict_exporter(functools.partial(tl.export_state_dict, modules=tuple(order))),
    )


def _penultimate_width(classifier: tuple[Layer, ...]) -> int:
    widths = [args[0] for kind, *args in classifier[:-1] if kind == "linear"]
    return widths[-1]


def detect_sequential(
    shapes: Mapping[str, tuple[int, ...]], conv_shapes: Mapping[int, tuple[int, ...]]
) -> dict[str, Any] | None:
    """Whether a state dict is a torch Sequential CNN with exactly these ``features.N`` convs.

    Returns ``{"num_classes_in_checkpoint": N}`` when every listed conv is present with the
    given (out, in, kh, kw) shape (``in`` of the first conv may differ: adapted stems) and no
    other ``features.*`` weight exists; ``None`` otherwise.
    """
    convs = {
        int(name.split(".")[1]): shape
        for name, shape in shapes.items()
        if name.startswith("features.") and name.endswith(".weight")
    }
    if set(convs) != set(conv_shapes):
        return None
    if not all(n.startswith(("features.", "classifier.")) for n in shapes):
        return None
    for index, want in conv_shapes.items():
        got = convs[index]
        if tuple(got) != tuple(want) and (index != min(conv_shapes) or got[0] != want[0]):
            return None
    last = max(
        (int(n.split(".")[1]), shape)
        for n, shape in shapes.items()
        if n.startswith("classifier.") and n.endswith(".weight")
    )
    return {"num_classes_in_checkpoint": int(last[1][0])}
