"""``jaxtl.models.conv.DepthwiseConv``: on CPU a depthwise convolution runs as shifted
multiply-adds; its outputs and both gradients are PyTorch's grouped ``conv2d``'s, and its params
are those of the ``flax.linen.Conv`` it replaces (EfficientNet's and ConvNeXt's depthwise layers,
so checkpoints, rules and LoRA see the same tree)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxtl.models.conv import DepthwiseConv


def _torch_pads(size: int, k: int, s: int, padding, dim: int) -> tuple[int, int]:
    """(low, high) padding of spatial dim ``dim``: TF's SAME rule, VALID, an int, or given
    per dim."""
    if padding == "VALID":
        return 0, 0
    if padding == "SAME":
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        return total // 2, total - total // 2
    if isinstance(padding, int):
        return padding, padding
    return padding[dim]


def _reference(x, kernel, bias, strides, padding):
    """PyTorch's depthwise conv2d (groups = channels) on NHWC ``x`` and an HWIO ``kernel``, with
    the input's and the kernel's gradients of ``sum(sin(y))``."""
    xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).requires_grad_(True)
    wt = torch.tensor(np.asarray(kernel)).permute(3, 2, 0, 1).requires_grad_(True)
    top, bottom = _torch_pads(x.shape[1], kernel.shape[0], strides[0], padding, 0)
    left, right = _torch_pads(x.shape[2], kernel.shape[1], strides[1], padding, 1)
    padded = torch.nn.functional.pad(xt, (left, right, top, bottom))  # negative: crops
    bt = None if bias is None else torch.tensor(np.asarray(bias))
    y = torch.nn.functional.conv2d(padded, wt, bt, stride=strides, groups=x.shape[-1])
    torch.sin(y).sum().backward()
    return (
        y.detach().permute(0, 2, 3, 1).numpy(),
        xt.grad.permute(0, 2, 3, 1).numpy(),
        wt.grad.permute(2, 3, 1, 0).numpy(),
    )


@pytest.mark.parametrize(
    ("size", "channels", "k", "strides", "padding", "bias"),
    [
        ((9, 9), 8, (3, 3), (1, 1), "SAME", False),
        ((9, 9), 8, (3, 3), (2, 2), "SAME", False),  # odd size, stride 2: SAME pads high more
        ((8, 8), 6, (5, 5), (2, 2), "SAME", False),
        ((10, 10), 4, (3, 3), (3, 3), "SAME", True),
        ((7, 7), 5, (7, 7), (1, 1), ((3, 3), (3, 3)), True),  # ConvNeXt's 7x7
        ((6, 6), 3, (3, 3), (1, 1), "VALID", False),
        ((1, 1), 16, (5, 5), (1, 1), "SAME", False),  # a 1x1 map: only the centre tap sees data
        # Height and width apart: each axis its own size, kernel, stride and padding.
        ((9, 7), 4, (3, 5), (1, 2), "SAME", False),
        ((9, 7), 4, (3, 5), (2, 1), ((1, 2), (0, 3)), True),
        ((8, 6), 3, (3, 3), (1, 1), ((-1, 1), (1, 1)), False),  # a negative pad crops
        ((6, 5), 3, (3, 3), (1, 1), 1, False),  # an int pads every side
    ],
)  # fmt: skip
def test_outputs_and_gradients_are_pytorchs_grouped_conv(size, channels, k, strides, padding, bias):
    rng = np.random.default_rng(size[0] * 100 + size[1] * 10 + k[1])
    x = rng.standard_normal((2, *size, channels)).astype(np.float32)
    layer = DepthwiseConv(
        channels, k, strides=strides, padding=padding, feature_group_count=channels,
        use_bias=bias,
    )  # fmt: skip
    params = layer.init(jax.random.key(0), x)["params"]
    if bias:
        params = {**params, "bias": jnp.asarray(rng.standard_normal(channels), jnp.float32)}

    def loss(x, params):
        return jnp.sum(jnp.sin(layer.apply({"params": params}, x)))

    y = layer.apply({"params": params}, x)
    dx, dparams = jax.grad(loss, argnums=(0, 1))(x, params)
    ref_y, ref_dx, ref_dk = _reference(x, params["kernel"], params.get("bias"), strides, padding)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dparams["kernel"], ref_dk, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 2), (0, 3)), 1])
def test_other_backends_run_flaxs_grouped_conv(monkeypatch, padding):
    """Off CPU the layer is flax's grouped convolution, bit for bit (checked here by making
    the CPU report another backend)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 7, 6)).astype(np.float32)
    options = dict(features=6, kernel_size=(3, 5), strides=(2, 1), padding=padding,
                   feature_group_count=6)  # fmt: skip
    params = nn.Conv(**options).init(jax.random.key(0), x)
    flax = nn.Conv(**options).apply(params, x)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    np.testing.assert_array_equal(DepthwiseConv(**options).apply(params, x), flax)


def test_params_are_those_of_flax_conv_and_other_layouts_are_refused():
    x = np.zeros((1, 8, 8, 6), np.float32)
    options = dict(features=6, kernel_size=(3, 3), strides=2, feature_group_count=6)
    ours = DepthwiseConv(**options).init(jax.random.key(0), x)
    flax = nn.Conv(**options).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, flax)
    # Same initializer, same key: the same draw.
    np.testing.assert_array_equal(ours["params"]["kernel"], flax["params"]["kernel"])

    with pytest.raises(ValueError, match=r"one group per channel.*Use flax.linen.Conv"):
        DepthwiseConv(6, (3, 3), feature_group_count=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="no dilation"):
        DepthwiseConv(6, (3, 3), feature_group_count=6, kernel_dilation=2).init(
            jax.random.key(0), x
        )
    with pytest.raises(ValueError, match=r"padding='CIRCULAR'.*Use flax.linen.Conv"):
        DepthwiseConv(6, (3, 3), feature_group_count=6, padding="CIRCULAR").init(
            jax.random.key(0), x
        )


def test_bfloat16_sums_in_float32():
    """In bf16 the taps are summed in float32 and rounded once, as a convolution accumulates:
    the result is the float32 layer's rounded to bf16 (to one bf16 ulp)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 6, 8)).astype(np.float32)
    options = dict(features=8, kernel_size=(5, 5), feature_group_count=8, use_bias=False)
    params = DepthwiseConv(**options).init(jax.random.key(0), x)
    y32 = DepthwiseConv(**options).apply(params, x)
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    y16 = DepthwiseConv(**options, dtype=jnp.bfloat16).apply(low, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    exact = DepthwiseConv(**options).apply(
        jax.tree.map(lambda a: a.astype(jnp.float32), low),
        x.astype(jnp.bfloat16).astype(jnp.float32),
    )
    np.testing.assert_array_equal(y16, exact.astype(jnp.bfloat16))
    np.testing.assert_allclose(y16.astype(np.float32), y32, rtol=0.05, atol=0.05)


def test_the_benchmark_times_the_real_models_depthwise_layers():
    """``benchmarks/depthwise_conv.py`` times the shapes of Lite0's depthwise kernels as loaded
    from the real ImageNet file, block by block."""
    import os
    import sys

    import jaxtl
    from jaxtl.transfer.trees import flatten

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import depthwise_conv

    model = jaxtl.load(jaxtl.efficientnet_lite0_path(), num_labels=10, image_size=32)
    params = flatten(model.params)
    loaded = [
        params[f"blocks/{i}/depthwise_conv/kernel"].shape for i in range(len(model.config.blocks))
    ]
    timed = [(k, k, 1, c) for _, c, k, _ in depthwise_conv.lite0_shapes(32)]
    assert timed == loaded and len(timed) == 16
