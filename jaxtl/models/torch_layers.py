"""PyTorch-equivalent layers and the generic torch <-> Flax state-dict map, for torchvision ports.

The plain torchvision CNNs (VGG, AlexNet) are ``nn.Sequential`` stacks, so their Flax trees mirror
the torch names one to one (``features.0.weight`` <-> ``features/0/kernel``) and one mechanical map
converts both ways:

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
import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models.common import flat_numpy

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
    """``torch.nn.MaxPool2d(kernel, stride, padding)``: padding never wins the max."""
    pad = ((padding, padding), (padding, padding))
    if padding:
        x = jnp.pad(x, ((0, 0), *pad, (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(x, (kernel, kernel), (stride, stride))


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


def convert_state_dict(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torch names and layouts -> "/"-joined Flax paths and layouts (see the module docstring).

    Example:
      >>> out = convert_state_dict({"features.0.weight": np.zeros((8, 3, 3, 3))})
      >>> out["features/0/kernel"].shape
      (3, 3, 3, 8)
    """
    norms = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".running_mean")}
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        module, _, leaf = name.rpartition(".")
        path = module.replace(".", "/")
        if leaf == "num_batches_tracked":
            continue
        if module in norms:
            renamed = {"weight": "scale", "bias": "bias"}
            stats = {"running_mean": "mean", "running_var": "var"}
            if leaf in stats:
                out[f"{STATS}{path}/{stats[leaf]}"] = array
            else:
                out[f"{path}/{renamed.get(leaf, leaf)}"] = array
        elif leaf == "weight" and array.ndim == 4:
            out[f"{path}/kernel"] = np.transpose(array, (2, 3, 1, 0))
        elif leaf == "weight" and array.ndim == 2:
            out[f"{path}/kernel"] = array.T
        else:
            out[f"{path}/{leaf}"] = array
    return out


def export_state_dict(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_state_dict`, in torch's layouts (``num_batches_tracked``
    written as int64 zeros, as a fresh ``BatchNorm2d`` has)."""
    out: dict[str, np.ndarray] = {}
    stats = flat_numpy(batch_stats)
    norms = {p.rsplit("/", 1)[0] for p in stats}
    for path, array in flat_numpy(params).items():
        module, _, leaf = path.rpartition("/")
        name = module.replace("/", ".")
        if module in norms:
            out[f"{name}.{'weight' if leaf == 'scale' else leaf}"] = array
        elif leaf == "kernel":
            layout = (3, 2, 0, 1) if array.ndim == 4 else (1, 0)
            out[f"{name}.weight"] = np.ascontiguousarray(np.transpose(array, layout))
        else:
            out[f"{name}.{leaf}"] = array
    for module in sorted(norms):
        name = module.replace("/", ".")
        out[f"{name}.running_mean"] = stats[f"{module}/mean"]
        out[f"{name}.running_var"] = stats[f"{module}/var"]
        out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
    return out


# --- initialization -----------------------------------------------------------------------------


def torch_default_leaf(
    path: str, leaf: jax.ShapeDtypeStruct, seed: int, fan_ins: Mapping[str, int]
) -> jax.Array:
    """PyTorch's default ``reset_parameters`` for Conv2d/Linear: weight and bias ~
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (``kaiming_uniform_(a=sqrt(5))`` reduces to that bound);
    BatchNorm scale 1, bias 0. ``fan_ins`` maps each layer to its fan_in (:func:`fan_ins`), which
    a bias shape alone does not tell. One numpy stream per ``(seed, crc32(path))``."""
    module, _, name = path.rpartition("/")
    if name == "scale":
        return jnp.ones(leaf.shape, leaf.dtype)
    if name not in ("kernel", "bias"):
        raise ValueError(f"No torch initializer for param {path!r}.")
    bound = 1.0 / math.sqrt(fan_ins[module])
    return jnp.asarray(_rng(seed, path).uniform(-bound, bound, leaf.shape), leaf.dtype)


def fan_ins(abstract_params: Mapping[str, Any]) -> dict[str, int]:
    """``{layer path: fan_in}`` from every kernel's shape (all but the output axis)."""
    from jaxtl.rules import flatten

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
    rng = _rng(seed, path)
    if len(leaf.shape) == 4:
        fan_out = leaf.shape[0] * leaf.shape[1] * leaf.shape[3]
        std = math.sqrt(2.0 / fan_out)
    else:
        std = linear_std
    return jnp.asarray(rng.standard_normal(leaf.shape) * std, leaf.dtype)


def _rng(seed: int, path: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(path.encode())])
