"""Convolutions that XLA:CPU runs slowly in their plain form, computed on its fast paths.

XLA:CPU has fast kernels for ordinary convolutions and matmuls. A convolution with
``feature_group_count > 1`` runs slower, and the kernel gradient of one slowest of all: with it
as matmuls, ResNeXt-50's grouped layers run forward + backward 31-53x faster
(``benchmarks/grouped_conv.py``). Each layer here keeps Flax's params, names and outputs (to
float rounding) and changes only how CPU computes them; other backends run Flax's own
convolution.

* :class:`DepthwiseConv` (EfficientNet, ConvNeXt): one filter per channel, run as ``k * k``
  shifted multiply-adds (``benchmarks/depthwise_conv.py``).
* :func:`conv_general_dilated` (ResNeXt's grouped 3x3 convolutions, wav2vec2's positional
  convolution): ``lax.conv_general_dilated`` for ``flax.linen.Conv(conv_general_dilated=...)``
  whose kernel gradient, for a grouped convolution on CPU, is one batched matmul per kernel tap
  (``benchmarks/grouped_conv.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class DepthwiseConv(nn.Conv):
    """A depthwise ``flax.linen.Conv`` (one filter per channel: ``feature_group_count`` =
    input channels = ``features``; same params, same outputs to float rounding) that runs, on
    CPU, as ``k * k`` shifted multiply-adds instead of a grouped convolution.

    XLA:CPU has no fast kernel for a grouped convolution: forward + backward of EfficientNet-
    Lite0's 16 depthwise layers (batch 32, 32 px) took 768 ms as grouped convolutions against
    71 ms as shifted multiply-adds, ConvNeXt-Tiny's 7x7 ones 3.5x longer, and a whole Lite0
    gradient step 6.2x (32 px) and 3.9x (128 px) longer; compiling it takes ~5 s more
    (``benchmarks/depthwise_conv.py``). The sum runs over the same products in another order, so
    outputs move by float rounding (the parity tests compare with PyTorch's at unchanged
    tolerances). Other backends run the grouped convolution, as Flax does.

    It overrides ``__call__`` whole (no call to Flax's): a LoRA interceptor sees one call.
    Padding is Flax's: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"``, an int, or per-dimension ints
    or ``(low, high)`` pairs (negative crops); ``"CIRCULAR"``, ``"REFLECT"`` and ``"CAUSAL"`` are
    refused. Under ``remat="dots_saveable"`` its CPU output is recomputed in the backward pass
    like any elementwise result, where a grouped convolution's would be saved.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        channels = jnp.shape(inputs)[-1]
        k = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        padding = _depthwise_padding(self.padding)
        if not (
            jnp.ndim(inputs) == 4
            and len(k) == 2
            and self.feature_group_count == channels == self.features
            and self.mask is None
            and self.input_dilation in (None, 1, (1, 1))
            and self.kernel_dilation in (None, 1, (1, 1))
            and padding is not None
        ):
            raise ValueError(
                f"DepthwiseConv takes NHWC inputs of {self.features} channels, a 2-D kernel, one "
                "group per channel, no dilation or mask, and SAME, SAME_LOWER, VALID or explicit "
                f"padding; got inputs {jnp.shape(inputs)}, kernel_size={self.kernel_size}, "
                f"feature_group_count={self.feature_group_count}, padding={self.padding!r}. Use "
                "flax.linen.Conv."
            )
        k = tuple(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, (*k, 1, self.features), self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        strides = pairs(self.strides, 2)
        if jax.default_backend() == "cpu":
            y = depthwise_conv(inputs, kernel, strides, padding)
        else:
            y = jax.lax.conv_general_dilated(
                inputs,
                kernel,
                strides,
                _pads(inputs.shape[1:3], k, strides, padding),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.features,
                precision=self.precision,
            )
        return y if bias is None else y + bias


def _depthwise_padding(padding: Any) -> str | tuple[tuple[int, int], ...] | None:
    """Flax's padding in the form :func:`depthwise_conv` reads (an upper-case name or two
    ``(low, high)`` pairs), or None for a form it does not compute."""
    from flax.linen.linear import canonicalize_padding

    if isinstance(padding, str):
        return padding.upper() if padding.upper() in ("SAME", "SAME_LOWER", "VALID") else None
    try:
        pairs = canonicalize_padding(padding, 2)
    except (TypeError, ValueError):
        return None
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


def pairs(value: Any, n: int) -> tuple[int, ...]:
    """A Flax conv's ``strides`` / dilation as ``n`` ints (``None`` means 1, an int each)."""
    if value is None:
        return (1,) * n
    return (value,) * n if isinstance(value, int) else tuple(value)


def _pads(spatial, kernel, strides, padding) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        return list(jax.lax.padtype_to_pads(spatial, kernel, strides, padding))
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Any):
    """A depthwise 2-D convolution of NHWC ``x`` with an HWIO ``kernel`` of shape
    ``[kh, kw, 1, C]``: ``lax.conv_general_dilated(..., feature_group_count=C)`` as a sum of
    ``kh * kw`` strided slices of the padded input, each times its tap. Padding is a Flax/lax
    padding: ``"SAME"`` (TF's rule, the smaller half first), ``"SAME_LOWER"``, ``"VALID"`` or
    ``(low, high)`` pairs. Narrower floats are multiplied and summed in float32 (as a
    convolution accumulates) and rounded once."""
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    pads = _pads(x.shape[1:3], (kh, kw), strides, padding)  # a negative pad crops, as in lax
    x = jax.lax.pad(
        x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0))
    )
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    dtype = x.dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    x, kernel = x.astype(acc), kernel.astype(acc)
    y = None
    for i in range(kh):
        for j in range(kw):
            window = jax.lax.slice(
                x,
                (0, i, j, 0),
                (x.shape[0], i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, x.shape[3]),
                (1, sh, sw, 1),
            )
            term = window * kernel[i, j, 0]
            y = term if y is None else y + term
    return y.astype(dtype)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Any,
    padding: Any,
    lhs_dilation: Any = None,
    rhs_dilation: Any = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``jax.lax.conv_general_dilated``, the same arguments and the same outputs, whose kernel
    gradient for a grouped convolution on CPU is a sum of batched matmuls, one per kernel tap.

    Pass it to ``flax.linen.Conv(conv_general_dilated=...)``. XLA:CPU computes a grouped
    convolution's kernel gradient without a fast kernel: forward + backward of a ResNeXt-50 3x3
    layer with 32 groups (batch 8, 28x28x128) took 2.2 s, of wav2vec2-base's positional
    convolution (16 groups, kernel 128, 250 frames, batch 4) 2.9 s, against 57 ms and 312 ms
    this way (``benchmarks/grouped_conv.py``). The output and the input gradient are XLA's own,
    bit for bit (they are now most of such a layer's time); the kernel gradient sums the same
    products in another order (float rounding), with narrower floats accumulated in float32.

    A ``jax.custom_vjp``, as :class:`jaxtl.models.layers.Dense` on CPU: reverse-mode
    derivatives of any order work, forward mode (``jax.jvp``, ``jax.jacfwd``) does not, and
    inside ``jax.shard_map`` a kernel replicated over a batch-split input needs
    ``check_vma=False``. jaxtl's training uses none of these (a jitted step over a mesh works).

    Any other case (one group, another backend, input dilation, a ``batch_group_count``, a
    ``preferred_element_type``, a layout other than channels last) is
    ``lax.conv_general_dilated`` itself.
    """
    args = dict(
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    n = lhs.ndim - 2
    ones = (1,) * n
    plain = (
        jax.default_backend() != "cpu"
        or feature_group_count == 1
        or batch_group_count != 1
        or preferred_element_type is not None
        or n < 1
        or tuple(lhs_dilation or ones) != ones
        or not _channels_last(lhs.shape, rhs.shape, dimension_numbers)
    )
    if plain:
        return jax.lax.conv_general_dilated(lhs, rhs, **args)
    strides = tuple(window_strides)
    dilation = tuple(rhs_dilation or ones)
    window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:n], dilation, strict=True)]
    pads = tuple((int(lo), int(hi)) for lo, hi in _pads(lhs.shape[1:-1], window, strides, padding))
    return _grouped_conv(lhs, rhs, (strides, pads, dilation, feature_group_count, precision))


def _flax_layout(nd: int) -> jax.lax.ConvDimensionNumbers:
    """Flax's layout for ``nd``-dimensional inputs: ``[N, *spatial, C]`` in and out, the
    kernel ``[*spatial, I, O]``."""
    last = (0, nd - 1, *range(1, nd - 1))
    return jax.lax.ConvDimensionNumbers(last, (nd - 1, nd - 2, *range(nd - 2)), last)


def _channels_last(lhs_shape, rhs_shape, dimension_numbers) -> bool:
    """Whether ``dimension_numbers`` is Flax's layout."""
    spec = jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    return tuple(map(tuple, spec)) == tuple(map(tuple, _flax_layout(len(lhs_shape))))


def _lax_grouped(x, kernel, cfg):
    strides, pads, dilation, groups, precision = cfg
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        pads,
        rhs_dilation=dilation,
        dimension_numbers=_flax_layout(x.ndim),
        feature_group_count=groups,
        precision=precision,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _grouped_conv(x, kernel, cfg):
    return _lax_grouped(x, kernel, cfg)


def _grouped_conv_fwd(x, kernel, cfg):
    return _lax_grouped(x, kernel, cfg), (x, kernel)


def _grouped_conv_bwd(cfg, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _lax_grouped(x, kernel, cfg), x)
    (dx,) = input_vjp(dy)  # XLA's own transposed convolution: it has a fast kernel
    return dx, grouped_kernel_grad(x, dy, kernel.shape, cfg).astype(kernel.dtype)


_grouped_conv.defvjp(_grouped_conv_fwd, _grouped_conv_bwd)


def grouped_kernel_grad(x, dy, kernel_shape, cfg) -> jax.Array:
    """The gradient of a grouped, channels-last convolution's kernel, ``[*K, C_in / G, C_out]``.

    For each kernel tap ``k`` it is the input window that tap reads (the padded input, offset by
    ``k`` times the kernel dilation, every ``stride``-th position) contracted with the output
    gradient over the batch and every output position, group by group: one batched matmul of
    ``[positions, G, C_in / G]`` by ``[positions, G, C_out / G]`` per tap, in a loop over the
    taps (``lax.map``, so the program stays one matmul long however large the kernel).
    """
    strides, pads, dilation, groups, precision = cfg
    n = x.ndim - 2
    taps_shape, c_in, c_out = kernel_shape[:n], x.shape[-1], dy.shape[-1]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x = jax.lax.pad(
        x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0))
    )  # a negative pad crops, as in lax
    out = dy.shape[1:-1]
    rows = dy.shape[0] * math.prod(out)
    if rows == 0:  # an empty output (or batch): nothing reaches the kernel
        return jnp.zeros((*taps_shape, c_in // groups, c_out), acc)
    dy = dy.reshape(rows, groups, c_out // groups)
    span = tuple((o - 1) * s + 1 for o, s in zip(out, strides, strict=True))

    def tap(offset: jax.Array) -> jax.Array:
        starts = (0, *(offset[i] for i in range(n)), 0)
        window = jax.lax.dynamic_slice(x, starts, (x.shape[0], *span, c_in))
        window = window[(slice(None), *(slice(None, None, s) for s in strides), slice(None))]
        return jnp.einsum(
            "rgi,rgo->igo",
            window.reshape(rows, groups, c_in // groups),
            dy,
            precision=precision,
            preferred_element_type=acc,
        )

    offsets = np.stack(np.meshgrid(*(np.arange(k) for k in taps_shape), indexing="ij"), -1)
    offsets = offsets.reshape(-1, n) * np.asarray(dilation)
    grads = jax.lax.map(tap, jnp.asarray(offsets))  # int64 under jax_enable_x64, as 0 is
    return grads.reshape(*taps_shape, c_in // groups, c_out)
