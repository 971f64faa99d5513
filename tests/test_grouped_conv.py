"""``jaxtl.models.conv.conv_general_dilated``: on CPU a grouped convolution's kernel gradient
is one batched matmul per kernel tap, where XLA:CPU has no fast kernel for it (ResNeXt's
grouped 3x3 convolutions, wav2vec2's positional convolution). Checked against PyTorch's grouped
``conv1d`` / ``conv2d`` and against JAX's own gradient of ``lax.conv_general_dilated``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F

import jaxtl
from jaxtl.models import conv, resnet
from jaxtl.transfer.trees import flatten

# (input shape NHWC / NWC, features, kernel, strides, padding, kernel dilation, groups)
CASES = {
    "3x3 same, 4 groups": ((2, 7, 6, 8), 8, (3, 3), (1, 1), "SAME", (1, 1), 4),
    "3x5 strided, dilated, uneven pads": (
        (2, 9, 11, 4), 6, (3, 5), (2, 1), ((2, 0), (1, 3)), (1, 2), 2
    ),
    "two outputs per input channel, valid, stride 2": ((1, 8, 8, 16), 32, (3, 3), (2, 2),
                                                        "VALID", (1, 1), 8),
    "negative pad crops": ((2, 6, 6, 6), 6, (2, 2), (1, 1), ((-1, 2), (1, 1)), (1, 1), 3),
    "1-D, wav2vec2's layout (even kernel, K // 2 pads)": ((2, 40, 16), 16, (16,), (1,), ((8, 8),),
                                                          (1,), 4),
    "3-D, strided and dilated": ((1, 7, 8, 9, 4), 8, (2, 3, 2), (2, 1, 3), "SAME", (2, 1, 1), 2),
}  # fmt: skip


def _layer(features, kernel, strides, padding, dilation, groups, fn):
    return nn.Conv(features, kernel, strides=strides, padding=padding, kernel_dilation=dilation,
                   feature_group_count=groups, conv_general_dilated=fn)  # fmt: skip


def _grads(layer, params, x, weights):
    loss = lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)) * weights)  # noqa: E731
    return layer.apply(params, x), *jax.grad(loss, argnums=(1, 0))(params, x)


def _torch(x, kernel, bias, strides, padding, dilation, groups, weights):
    """PyTorch's grouped convolution of the same arrays: output, input and kernel gradients in
    jaxtl's layouts."""
    n = x.ndim - 2
    if isinstance(padding, str):
        window = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:n], dilation, strict=True)]
        padding = jax.lax.padtype_to_pads(x.shape[1:-1], window, strides, padding)
    xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).requires_grad_()
    wt = torch.from_numpy(np.moveaxis(kernel, (-1, -2), (0, 1)).copy()).requires_grad_()
    flat = [p for lo, hi in reversed(padding) for p in (lo, hi)]  # F.pad: last dim first
    op = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    y = op(F.pad(xt, flat), wt, torch.from_numpy(bias), stride=strides, dilation=dilation,
           groups=groups)  # fmt: skip
    y = y.movedim(1, -1)
    (torch.sin(y) * torch.from_numpy(weights)).sum().backward()
    return (y.detach().numpy(), np.moveaxis(xt.grad.numpy(), 1, -1),
            np.moveaxis(wt.grad.numpy(), (0, 1), (-1, -2)))  # fmt: skip


def _close(ours, theirs, what, tol=1e-5):
    scale = max(1.0, float(np.max(np.abs(theirs))))
    diff = float(np.max(np.abs(np.asarray(ours) - theirs)))
    assert diff <= tol * scale, f"{what}: max |diff| {diff:.3g} (values up to {scale:.3g})"


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_match_pytorch_grouped_conv(case):
    shape, features, kernel, strides, padding, dilation, groups = CASES[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    layer = _layer(features, kernel, strides, padding, dilation, groups, conv.conv_general_dilated)
    params = layer.init(jax.random.key(0), x)
    y = layer.apply(params, x)
    weights = rng.standard_normal(y.shape).astype(np.float32)
    y, dx, dparams = _grads(layer, params, x, weights)
    p = params["params"]
    ty, tdx, tdk = _torch(x, np.array(p["kernel"]), np.array(p["bias"]), strides, padding,
                          dilation, groups, weights)  # fmt: skip
    _close(y, ty, "output")
    _close(dx, tdx, "input gradient")
    _close(dparams["params"]["kernel"], tdk, "kernel gradient", tol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_the_output_and_input_gradient_are_xlas_bit_for_bit(case):
    """Only the kernel gradient is computed another way; it sums the same products as JAX's own
    gradient of ``lax.conv_general_dilated``, in another order."""
    shape, features, kernel, strides, padding, dilation, groups = CASES[case]
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    ours = _layer(features, kernel, strides, padding, dilation, groups, conv.conv_general_dilated)
    plain = _layer(features, kernel, strides, padding, dilation, groups, None)
    params = plain.init(jax.random.key(0), x)
    weights = rng.standard_normal(plain.apply(params, x).shape).astype(np.float32)
    y, dx, dp = _grads(ours, params, x, weights)
    ref_y, ref_dx, ref_dp = _grads(plain, params, x, weights)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(dx, ref_dx)
    np.testing.assert_array_equal(dp["params"]["bias"], ref_dp["params"]["bias"])
    _close(dp["params"]["kernel"], np.asarray(ref_dp["params"]["kernel"]), "kernel gradient")


def test_other_cases_are_lax_itself(monkeypatch):
    """One group, input dilation, or another backend: ``lax.conv_general_dilated``, whose
    gradient is JAX's, bit for bit."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 9, 9, 8)).astype(np.float32)
    variants = [
        dict(features=8, kernel_size=(3, 3), feature_group_count=1),
        dict(features=8, kernel_size=(3, 3), feature_group_count=4, input_dilation=2, padding=1),
    ]
    for options in variants:
        params = nn.Conv(**options).init(jax.random.key(0), x)
        weights = rng.standard_normal(nn.Conv(**options).apply(params, x).shape)
        ours = _grads(nn.Conv(**options, conv_general_dilated=conv.conv_general_dilated),
                      params, x, weights)  # fmt: skip
        ref = _grads(nn.Conv(**options), params, x, weights)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(a, b)
    options = dict(features=8, kernel_size=(3, 3), feature_group_count=4)
    params = nn.Conv(**options).init(jax.random.key(0), x)
    weights = rng.standard_normal(nn.Conv(**options).apply(params, x).shape)
    ref = _grads(nn.Conv(**options), params, x, weights)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    ours = _grads(nn.Conv(**options, conv_general_dilated=conv.conv_general_dilated), params, x,
                  weights)  # fmt: skip
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_float64_vmap_and_an_empty_output():
    """Under ``jax_enable_x64`` the gradient is float64 (and its loop indices int64); under
    ``jax.vmap`` over kernels each kernel gets its own gradient; an empty strided output gives
    the zero gradient, as lax's does."""
    rng = np.random.default_rng(8)
    options = dict(window_strides=(2, 1), padding="SAME", rhs_dilation=(1, 2),
                   dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)  # fmt: skip

    def grads(fn, x, w):
        loss = lambda x, w: jnp.sum(jnp.sin(fn(x, w, **options)))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(x, w)

    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 7, 9, 8)))
        w = jnp.asarray(rng.standard_normal((3, 3, 2, 8)))
        ours, ref = (
            grads(conv.conv_general_dilated, x, w),
            grads(jax.lax.conv_general_dilated, x, w),
        )
        assert ours[1].dtype == jnp.float64
        np.testing.assert_array_equal(ours[0], ref[0])
        np.testing.assert_allclose(ours[1], ref[1], rtol=1e-12, atol=1e-12)

    x = jnp.asarray(rng.standard_normal((2, 7, 9, 8)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 8)), jnp.float32)  # 3 kernels
    ours = jax.vmap(lambda w: grads(conv.conv_general_dilated, x, w)[1])(ws)
    ref = jax.vmap(lambda w: grads(jax.lax.conv_general_dilated, x, w)[1])(ws)
    _close(ours, np.asarray(ref), "vmapped kernel gradients")

    options = dict(options, padding="VALID", rhs_dilation=(1, 1))
    x, w = jnp.ones((2, 2, 2, 8)), jnp.ones((3, 3, 2, 8))  # a 3x3 kernel on a 2x2 input
    ours, ref = grads(conv.conv_general_dilated, x, w), grads(jax.lax.conv_general_dilated, x, w)
    assert conv.conv_general_dilated(x, w, **options).shape == (2, 0, 0, 8)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_kernel_gradient_accumulates_in_float32():
    """bf16 inputs: the products are summed in float32 and the gradient rounded once to bf16,
    so it is the float32 gradient of the same bf16 values, rounded."""
    rng = np.random.default_rng(3)
    shape, features, kernel, strides, padding, dilation, groups = CASES["3x3 same, 4 groups"]
    x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    params = _layer(features, kernel, strides, padding, dilation, groups, None).init(
        jax.random.key(0), x.astype(jnp.float32)
    )
    k16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    dy = jnp.asarray(rng.standard_normal((*shape[:-1], features)), jnp.bfloat16)
    cfg = (strides, ((1, 1), (1, 1)), dilation, groups, None)
    kernel16 = k16["params"]["kernel"]
    g16 = conv.grouped_kernel_grad(x, dy, kernel16.shape, cfg)
    g32 = conv.grouped_kernel_grad(x.astype(jnp.float32), dy.astype(jnp.float32),
                                   kernel16.shape, cfg)  # fmt: skip
    assert g16.dtype == jnp.float32  # the caller rounds it to the kernel's dtype
    np.testing.assert_array_equal(g16, g32)  # bf16 products are exact in float32
    y = conv.conv_general_dilated(
        x, kernel16, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )  # fmt: skip
    assert y.dtype == jnp.bfloat16


def _resnext_file(path) -> str:
    """A small torchvision-layout ResNeXt state dict (one bottleneck per stage, 4 groups)."""
    rng = np.random.default_rng(4)
    t = {}

    def conv_bn(name, bn, out, inp, k):
        t[f"{name}.weight"] = rng.standard_normal((out, inp, k, k)).astype(np.float32) * 0.2
        t[f"{bn}.weight"] = 1 + 0.1 * rng.standard_normal(out).astype(np.float32)
        t[f"{bn}.bias"] = 0.1 * rng.standard_normal(out).astype(np.float32)
        t[f"{bn}.running_mean"] = 0.1 * rng.standard_normal(out).astype(np.float32)
        t[f"{bn}.running_var"] = 1 + 0.1 * rng.random(out).astype(np.float32)
        t[f"{bn}.num_batches_tracked"] = np.array(1, np.int64)

    conv_bn("conv1", "bn1", 8, 3, 7)
    inp = 8
    for stage, (inner, out) in enumerate(((16, 32), (32, 64)), start=1):
        p = f"layer{stage}.0"
        conv_bn(f"{p}.conv1", f"{p}.bn1", inner, inp, 1)
        conv_bn(f"{p}.conv2", f"{p}.bn2", inner, inner // 4, 3)
        conv_bn(f"{p}.conv3", f"{p}.bn3", out, inner, 1)
        conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", out, inp, 1)
        inp = out
    t["fc.weight"] = rng.standard_normal((5, inp)).astype(np.float32) * 0.1
    t["fc.bias"] = np.zeros(5, np.float32)
    safetensors.numpy.save_file(t, str(path))
    return str(path)


def test_a_resnext_trains_with_it_and_its_other_gradients_are_unchanged(tmp_path, monkeypatch):
    """A torchvision ResNeXt loaded by jaxtl uses it for its grouped 3x3 convolutions: every
    gradient but those kernels' equals the plain grouped convolution's bit for bit, and those
    kernels' agree with it to float rounding."""
    path = _resnext_file(tmp_path / "resnext.safetensors")
    x = np.random.default_rng(5).standard_normal((2, 32, 32, 3)).astype(np.float32)
    weights = np.random.default_rng(6).standard_normal((2, 5)).astype(np.float32)

    def gradients():
        """Each load builds (and traces) its own model."""
        model = jaxtl.load(path, num_labels=5)
        assert model.config.groups == 4

        def loss(p):
            logits = model.apply(p, {"pixel_values": x}, batch_stats=model.batch_stats)
            return jnp.sum(logits * weights)

        # The grouped layers that run jaxtl's kernel gradient.
        custom = str(jax.make_jaxpr(loss)(model.params)).count("custom_vjp_call")
        return custom, flatten(jax.grad(loss)(model.params))

    custom, ours = gradients()
    assert custom == 2
    monkeypatch.setattr(resnet, "conv_general_dilated", jax.lax.conv_general_dilated)
    custom, plain = gradients()
    assert custom == 0
    grouped = {path for path in plain if path.endswith("conv2/kernel")}
    assert len(grouped) == 2 and set(ours) == set(plain)
    for path in plain:
        if path in grouped:
            _close(ours[path], np.asarray(plain[path]), path)
        else:
            np.testing.assert_array_equal(ours[path], plain[path], err_msg=path)


def test_wav2vec2s_positional_convolution_uses_it(tmp_path, monkeypatch):
    """wav2vec2's grouped positional convolution takes its kernel gradient from jaxtl's
    (``tests/test_wav2vec2.py`` checks every gradient against transformers')."""
    import transformers
    from _tiny import tiny_wav2vec2_config

    directory = tmp_path / "wav2vec2"
    torch.manual_seed(0)
    transformers.Wav2Vec2ForSequenceClassification(tiny_wav2vec2_config()).save_pretrained(
        directory
    )
    model = jaxtl.load(str(directory), num_labels=3)
    shapes = []

    def counted(x, dy, kernel_shape, cfg):
        shapes.append(tuple(kernel_shape))
        return grouped_kernel_grad(x, dy, kernel_shape, cfg)

    grouped_kernel_grad = conv.grouped_kernel_grad
    monkeypatch.setattr(conv, "grouped_kernel_grad", counted)
    waves = np.random.default_rng(7).standard_normal((2, 400)).astype(np.float32)
    jax.grad(lambda p: jnp.sum(model.apply(p, {"input_values": waves})))(model.params)
    kernel = flatten(model.params)["wav2vec2/encoder/pos_conv_embed/conv/kernel"]
    assert shapes == [kernel.shape] == [(16, 8, 32)]


def test_the_benchmark_times_resnext50s_grouped_layers(tmp_path):
    """``benchmarks/grouped_conv.py``'s random ResNeXt-50 loads as torchvision's
    resnext50_32x4d, and its layers part times the widths of that model's grouped kernels."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import grouped_conv

    model = jaxtl.load(grouped_conv._resnext50_file(str(tmp_path)), num_labels=10)
    assert model.config.arch == "resnext50_32x4d" and model.config.groups == 32
    kernels = {v.shape for p, v in flatten(model.params).items() if p.endswith("conv2/kernel")}
    timed = {(3, 3, c // 32, c) for _, c, _ in grouped_conv.resnext_shapes(112)}
    assert timed == kernels
