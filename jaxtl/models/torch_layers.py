"""PyTorch-equivalent layers and the generic torch <-> Flax state-dict map, for torchvision ports.

The plain torchvision CNNs (VGG, AlexNet) are ``nn.Sequential`` stacks, so their Flax trees
mirror the torch names one to one (``features.0.weight`` <-> ``features/0/kernel``) and one
mechanical map converts both ways; the ResNet, Inception and EfficientNet converters rename their
modules first and then place each tensor with the same map (:func:`to_flax`,
:func:`export_state_dict`):

* conv weights ``OIHW`` <-> Flax ``HWIO``; Linear weights ``(out, in)`` <-> ``(in, out)``;
* BatchNorm ``weight``/``bias`` <-> ``scale``/``bias``, ``running_mean``/``running_var`` <->
  the ``batch_stats`` collection; ``num_batches_tracked`` is dropped on the way in and written
  back as zeros.

The layers reproduce PyTorch's arithmetic, not just its shapes: explicit symmetric padding (a
``"SAME"`` stride-2 conv pads asymmetrically), max pools padded with ``-inf``, and
``AdaptiveAvgPool2d``'s overlapping bins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models.common import flat_numpy, leaf_rng

STATS = "batch_stats/"


def conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int = 0,
    bias: bool = True,
    name: str,
    dtype: Any = jnp.float32,
) -> nn.Conv:
    """``torch.nn.Conv2d(in, features, kernel, stride, padding, bias=bias)`` on NHWC inputs."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=bias,
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
    """``torch.nn.MaxPool2d(kernel, stride, padding)`` (floor mode): padding never wins the max,
    as Flax pads max pooling with ``-inf``."""
    pad = ((padding, padding), (padding, padding)) if padding else "VALID"
    return nn.max_pool(x, (kernel, kernel), (stride, stride), padding=pad)


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` averaging weights of ``AdaptiveAvgPool`` along one axis.

    Bin ``i`` covers ``floor(i * in / out)`` to ``ceil((i + 1) * in / out)`` (PyTorch's rule), so
    bins overlap when ``in`` does not divide by ``out``, and a smaller input is upsampled by
    repetition (a 1x1 map becomes 7x7 copies).
    """
    weights = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``torch.nn.AdaptiveAvgPool2d(size)`` on ``[N, H, W, C]``."""
    rows = adaptive_pool_matrix(x.shape[1], size[0])
    cols = adaptive_pool_matrix(x.shape[2], size[1])
    if rows.shape[0] == rows.shape[1] and cols.shape[0] == cols.shape[1]:
        return x  # identity (e.g. VGG at 224x224): skip the matmuls
    return jnp.einsum("oh,nhwc,pw->nopc", rows.astype(x.dtype), x, cols.astype(x.dtype))


def flatten_nchw(x: jax.Array) -> jax.Array:
    """``torch.flatten(x, 1)`` of the NCHW tensor this NHWC one stands for, so the first Linear
    after it takes torch's weights unpermuted."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


# --- checkpoint names ---------------------------------------------------------------------------


_STATS = {"running_mean": "mean", "running_var": "var"}


def to_flax(path: str, leaf: str, array: np.ndarray) -> tuple[str, np.ndarray] | None:
    """Where tensor ``leaf`` of the torch module at ``path`` ("/"-joined) goes in Flax, and in
    Flax's layout: ``(model path, array)``.

    A 4-D ``weight`` is a conv's (OIHW -> HWIO), a 2-D one a Linear's (transposed), a 1-D one a
    norm's ``scale``; running statistics go to the ``batch_stats`` collection. ``None`` for
    anything else (``num_batches_tracked`` among them): the caller drops it or passes it through.

    Example:
      >>> to_flax("features/0", "weight", np.zeros((8, 3, 3, 3)))[1].shape
      (3, 3, 3, 8)
    """
    if leaf in _STATS:
        return f"{STATS}{path}/{_STATS[leaf]}", array
    if leaf == "weight" and array.ndim == 4:
        return f"{path}/kernel", np.transpose(array, (2, 3, 1, 0))
    if leaf == "weight" and array.ndim == 2:
        return f"{path}/kernel", array.T
    if leaf == "weight" and array.ndim == 1:
        return f"{path}/scale", array
    if leaf == "bias":
        return f"{path}/bias", array
    return None


def convert_state_dict(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torch names and layouts -> "/"-joined Flax paths and layouts (see the module docstring).

    ``num_batches_tracked`` is dropped; a tensor :func:`to_flax` does not place passes through
    under its torch name (the load report lists it as unexpected).

    Example:
      >>> out = convert_state_dict({"features.0.weight": np.zeros((8, 3, 3, 3))})
      >>> out["features/0/kernel"].shape
      (3, 3, 3, 8)
    """
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        placed = to_flax(module.replace(".", "/"), leaf, array)
        path, array = placed if placed is not None else (name, array)
        out[path] = array
    return out


def export_state_dict(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, modules: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_flax`: a PyTorch state dict of float32 tensors.

    ``modules`` lists the model's module paths in creation order, which the torch model's
    ``state_dict()`` order mirrors (:func:`jaxtl.models.common.abstract_variables_in_order`).
    BatchNorm layers get ``num_batches_tracked`` as an int64 zero, as a fresh ``BatchNorm2d``
    has (the count is not tracked here).
    """
    flat_params = flat_numpy(params)
    flat_stats = flat_numpy(batch_stats)
    state: dict[str, np.ndarray] = {}

    def put(name: str, value: np.ndarray, layout: tuple[int, ...] | None = None) -> None:
        value = np.asarray(value, np.float32)
        state[name] = np.ascontiguousarray(value if layout is None else value.transpose(layout))

    for module in modules:
        name = module.replace("/", ".")
        if f"{module}/kernel" in flat_params:
            kernel = flat_params[f"{module}/kernel"]
            put(f"{name}.weight", kernel, (3, 2, 0, 1) if kernel.ndim == 4 else (1, 0))
        if f"{module}/scale" in flat_params:
            put(f"{name}.weight", flat_params[f"{module}/scale"])
        if f"{module}/bias" in flat_params:
            put(f"{name}.bias", flat_params[f"{module}/bias"])
        if f"{module}/mean" in flat_stats:
            put(f"{name}.running_mean", flat_stats[f"{module}/mean"])
            put(f"{name}.running_var", flat_stats[f"{module}/var"])
            state[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
    return state


# --- initialization -----------------------------------------------------------------------------


def torch_default_leaf(
    path: str, leaf: jax.ShapeDtypeStruct, seed: int, fan_ins: Mapping[str, int]
) -> jax.Array:
    """PyTorch's default ``reset_parameters`` for Conv2d/Linear: weight and bias ~
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (``kaiming_uniform_(a=sqrt(5))`` reduces to that bound);
    BatchNorm scale 1, bias 0. ``fan_ins`` maps each layer to its fan_in (:func:`fan_ins`), which
    a bias shape alone does not tell. Drawn from :func:`jaxtl.models.common.leaf_rng`."""
    module, _, name = path.rpartition("/")
    if name == "scale":
        return jnp.ones(leaf.shape, leaf.dtype)
    if name not in ("kernel", "bias"):
        raise ValueError(f"No torch initializer for param {path!r}.")
    bound = 1.0 / math.sqrt(fan_ins[module])
    return jnp.asarray(leaf_rng(seed, path).uniform(-bound, bound, leaf.shape), leaf.dtype)


def fan_ins(abstract_params: Mapping[str, Any]) -> dict[str, int]:
    """``{layer path: fan_in}`` from every kernel's shape (all but the output axis)."""
    from jaxtl.transfer.trees import flatten

    return {
        path.rsplit("/", 1)[0]: math.prod(leaf.shape[:-1])
        for path, leaf in flatten(abstract_params).items()
        if path.endswith("/kernel")
    }


def kaiming_fan_out_leaf(path: str, leaf: jax.ShapeDtypeStruct, seed: int, linear_std: float):
    """torchvision's VGG/ResNet rule: conv kernels ~ N(0, 2 / fan_out) (``kaiming_normal_``,
    ``mode="fan_out"``), Linear kernels ~ N(0, linear_std), biases 0, BatchNorm scale 1."""
    name = path.rsplit("/", 1)[-1]
    if name == "bias":
        return jnp.zeros(leaf.shape, leaf.dtype)
    if name == "scale":
        return jnp.ones(leaf.shape, leaf.dtype)
    if name != "kernel":
        raise ValueError(f"No torchvision initializer for param {path!r}.")
    rng = leaf_rng(seed, path)
    if len(leaf.shape) == 4:
        fan_out = leaf.shape[0] * leaf.shape[1] * leaf.shape[3]
        std = math.sqrt(2.0 / fan_out)
    else:
        std = linear_std
    return jnp.asarray(rng.standard_normal(leaf.shape) * std, leaf.dtype)
