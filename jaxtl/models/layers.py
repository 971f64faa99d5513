"""The layers several model families share, one copy each.

Each family keeps its own module tree and param names (checkpoint name maps and parity tests
depend on them); what lives here is the arithmetic under those names, written once so that a
numerics fix reaches every family:

* :func:`dense` and :func:`layer_norm`: transformers' ``nn.Linear`` and PyTorch's
  ``nn.LayerNorm`` (BERT, GPT-2, ViT); ``dense`` builds a :class:`Dense`, whose kernel
  gradient XLA runs on its fast matmul path on CPU;
* :class:`Dropout`: every family's dropout, ``flax.linen.Dropout`` with a mask that costs a
  quarter of the random-number work;
* :func:`dot_product_attention`: the masked softmax-attention core of BERT, GPT-2 and ViT, after
  each family's own q/k/v projections (:func:`split_heads` gives it their shape);
* :func:`batch_norm`: PyTorch's ``BatchNorm2d``, in inference or training mode per layer
  (:func:`bn_trains`), for ResNet, Inception and EfficientNet;
* :func:`check_nhwc`: the pixel-layout contract of every image family, checked while tracing;
* :func:`block`: a block class, rematerialized (``jax.checkpoint``) under a named policy;
* :func:`shard_batch`: the activations between blocks pinned to a batch split over the mesh;
* :class:`SegmentationHead`: the per-pixel head of ``task="segmentation"`` (ResNet, ConvNeXt,
  ViT) over a backbone's last feature map.

The builders create their Flax modules in the caller's scope (they must be called inside a
``@nn.compact`` method), so a module built here has the path it had when each family built its
own.

Grouped and depthwise convolutions, which XLA:CPU runs slowly in their plain form, are in
:mod:`jaxtl.models.conv`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

from jaxtl.transfer.trees import is_under


def dense(features: int, name: str, dtype: Any, *, std: float, bias: bool = True) -> nn.Dense:
    """transformers' ``nn.Linear`` as its ``_init_weights`` draws it: kernel ~ normal(std), zero
    bias. (Loading initializes values with the family's ``init_leaf``; the module initializer
    matters only to a direct ``module.init``.)"""
    return Dense(
        features,
        use_bias=bias,
        kernel_init=nn.initializers.normal(std),
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )


class Dense(nn.Dense):
    """``flax.linen.Dense`` (same params, same outputs) whose backward pass, on CPU, runs the
    kernel's gradient on XLA's fast matmul path.

    Left to itself, XLA:CPU lays out the kernel-gradient dot ``x^T @ dy`` of every Dense with
    both operands transposed (``lhs_contracting_dims={0}``, ``rhs_contracting_dims={1}``),
    which its fast (YNNPACK) matmul path does not take: in MiniLM's full fine-tune step (batch
    32 x 128) those 36 dots ran at about half the speed of the forward ones and took 1.14 s of
    the 3.88 s step (``benchmarks/profile_step.py``). Here the backward pass is written out:
    ``x`` and ``dy`` are computed once, as rows, behind a ``lax.optimization_barrier`` (so a
    dropout or GELU before them is recomputed once, not once per consumer), the smaller of the
    two is copied transposed, and the kernel's gradient is a canonical ``[a, n] @ [n, b]`` dot
    that XLA cannot re-lay out; the input and bias gradients read the same ``dy``. The step
    took 3.2 s after. The math is the same (the parity tests compare gradients with PyTorch's
    at unchanged tolerances). Other backends use Flax's own ``Dense`` arithmetic.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        if jax.default_backend() == "cpu":
            return _cpu_dense(inputs, kernel, bias, self.precision)
        return _dense(inputs, kernel, bias, self.precision)


def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, precision: Any) -> jax.Array:
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    return y if bias is None else y + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cpu_dense(x, kernel, bias, precision):
    return _dense(x, kernel, bias, precision)


def _cpu_dense_fwd(x, kernel, bias, precision):
    return _dense(x, kernel, bias, precision), (x, kernel, bias)


def _cpu_dense_bwd(precision, residuals, dy):
    x, kernel, bias = residuals
    rows, dy_rows = jax.lax.optimization_barrier(
        (x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
    )
    canonical = (((1,), (0,)), ((), ()))
    if rows.shape[1] <= dy_rows.shape[1]:
        rows_t, dy_rows = jax.lax.optimization_barrier((rows.T, dy_rows))
        dkernel = jax.lax.dot_general(rows_t, dy_rows, canonical, precision=precision)
    else:
        dy_t, rows = jax.lax.optimization_barrier((dy_rows.T, rows))
        # The barrier keeps XLA from folding the transpose back into the dot's layout.
        dkernel_t = jax.lax.dot_general(dy_t, rows, canonical, precision=precision)
        dkernel = jax.lax.optimization_barrier(dkernel_t).T
    dx = jax.lax.dot_general(dy_rows, kernel, (((1,), (1,)), ((), ())), precision=precision)
    dbias = None if bias is None else jnp.sum(dy_rows, axis=0).astype(bias.dtype)
    return dx.reshape(x.shape).astype(x.dtype), dkernel.astype(kernel.dtype), dbias


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)


# Dropout keeps an element when a 16-bit random value is >= this many 65536ths of the rate.
DROPOUT_BITS = 16


class Dropout(nn.Dropout):
    """``flax.linen.Dropout`` (same attributes, same ``Dropout_<n>`` names) whose mask costs a
    quarter of the random-number work.

    Flax draws a 32-bit uniform for each element with ``jax.random.bernoulli``; with
    ``jax_threefry_partitionable`` (the default), that is one threefry-2x32 hash per element, of
    whose 64 output bits 32 are used. In MiniLM's attention (6.3 M probabilities per layer at
    batch 32 x 128) those hashes took about 15% of the full fine-tune step on CPU. Here each hash
    gives four 16-bit values (:func:`dropout_mask`), so there is one hash per four elements, and
    an element is kept when its value is at or above ``round(rate * 65536)``.

    What changes: the rate is resolved to a multiple of 2^-16 (0.1 -> 6554/65536 = 0.1000061),
    and the outputs are scaled by the exact inverse of the resolved keep probability, so their
    expectation still equals the input; the masks are a different draw from the same key, so a
    run's numbers differ from what ``flax.linen.Dropout`` gave. The mask is a function of the
    key and each element's global index (in a stream, also of the site's place in the pass and
    the shapes of the sites before it), so a sharded step draws the same mask on any number of
    devices.

    Where its key comes from: an explicit ``rng=``; else, with ``stream=True`` inside a
    :func:`dropout_stream` (jaxtl's families set it, and their training forward passes run in
    one), the pass's one key over a range of hash counters of this call's own; else flax's
    ``make_rng`` of the ``rng_collection``, as ``flax.linen.Dropout`` does. Leave ``stream``
    False in modules of your own that run under ``nn.scan``, ``nn.vmap`` or a ``jax.jit`` /
    ``jax.checkpoint`` helper: a stream is read while tracing, so such a body would draw one
    mask for every iteration (``nn.remat``, as :func:`block` applies it, traces each block
    once and is fine).
    """

    stream: bool = False

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        shape = list(inputs.shape)
        for dim in self.broadcast_dims:
            shape[dim] = 1
        shape = tuple(shape)
        use_stream = self.stream and rng is None and self.rng_collection == "dropout"
        stream = _STREAM.get() if use_stream else None
        offset = None if stream is None else stream.allocate(_mask_rows(shape))
        if offset is not None:
            keep, scale = _mask(stream.words, self.rate, shape, offset)
        else:
            if rng is None:
                rng = self.make_rng(self.rng_collection)
            keep, scale = dropout_mask(rng, self.rate, shape)
        if keep is None:  # the rate resolved to 1: nothing is kept (and no NaN gradients)
            return jnp.zeros_like(inputs)
        keep = jnp.broadcast_to(keep, inputs.shape)
        return jax.lax.select(
            keep, inputs * jnp.asarray(scale, inputs.dtype), jnp.zeros_like(inputs)
        )


class _DropoutStream:
    """The dropout masks of one forward pass, drawn from one key (:func:`dropout_stream`)."""

    def __init__(self, key: jax.Array):
        self.words = _key_words(key)
        # Row 0 is left out: jax.random's own uses of the key (bits, split, fold_in) hash the
        # counters (0, i), so the masks share no counter with them.
        self.next_row = 1

    def allocate(self, rows: int) -> int | None:
        """The first of ``rows`` counter rows for the next mask, or None when the pass would
        pass 2**32 rows: that mask then comes from flax's ``make_rng`` instead."""
        if self.next_row + rows > MAX_STREAM_ROWS:
            return None
        first, self.next_row = self.next_row, self.next_row + rows
        return first


MAX_STREAM_ROWS = 2**32


def _key_words(key: jax.Array) -> jax.Array:
    """Two uint32 words that key the stream's hash: a threefry key's own data (already a hash
    output, as ``jax.random.bits`` uses it), else two words drawn from the key. (Drawing them
    costs a hash that XLA copies into every mask's code: 3,400 instructions on MiniLM's step.)"""
    if str(jax.random.key_impl(key)) == "threefry2x32":
        typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        return jax.random.key_data(key) if typed else key
    return jax.random.bits(key, (2,), jnp.uint32)


_STREAM: contextvars.ContextVar[_DropoutStream | None] = contextvars.ContextVar(
    "jaxtl_dropout_stream", default=None
)


@contextlib.contextmanager
def dropout_stream(key: jax.Array | None):
    """Within this context, every :class:`Dropout` with ``stream=True`` and no ``rng=`` of its
    own draws its mask from ``key``, each from its own range of the hash's counters (in the
    order the forward pass calls them), instead of from a key that flax's ``make_rng`` folds for its
    module path. jaxtl models' forward passes (:func:`jaxtl.models.common.make_apply`) run in
    one. ``None``: no stream, flax's keys as usual.

    Why: flax folds each site's key with a threefry hash, and the mask's two key words take
    another; with one hash per site MiniLM's full train step at 16 tokens compiles to 23,284
    optimized HLO instructions instead of 29,609, and an executable's host memory follows its
    instruction count (52.0 instead of 67.2 MiB; ``benchmarks/README.md``). The masks stay a
    function of the key, each element's index and the site's place in the pass (the same on
    any number of devices), and disjoint counters give independent masks. A rematerialized
    block replays its traced forward pass, so its masks are the same in the backward pass.
    Only Dropouts with ``stream=True`` read it (see :class:`Dropout` for where not to set that).
    """
    token = _STREAM.set(None if key is None else _DropoutStream(key))
    try:
        yield
    finally:
        _STREAM.reset(token)


def dropout_mask(key: jax.Array, rate: float, shape: tuple[int, ...]):
    """``(keep, scale)``: a boolean mask of ``shape``, True with probability ``1 - r`` where
    ``r = round(rate * 65536) / 65536`` (at least one 65536th for a positive ``rate``), and
    ``1 / (1 - r)``, the factor that keeps the masked values' expectation; ``(None, 0.0)``
    when ``r`` is 1.

    One threefry-2x32 hash, keyed by two words drawn from ``key``, gives four 16-bit values:
    the hash of counter ``(row, j)``, where ``row`` is the flat index over all but the last
    dimension, gives the elements ``j``, ``j + n``, ``j + 2n`` and ``j + 3n`` of that row
    (``n`` = a quarter of the last dimension, rounded up). Values depend only on the key and
    each element's index.
    """
    return _mask(jax.random.bits(key, (2,), jnp.uint32), rate, shape, 0)


def _mask_rows(shape: tuple[int, ...]) -> int:
    """The hash counters' rows a mask of ``shape`` uses (:func:`dropout_mask`)."""
    return math.prod(shape[:-1]) if shape else 1


def _mask(words: jax.Array, rate: float, shape: tuple[int, ...], first_row: int):
    """:func:`dropout_mask` keyed by ``words`` (two uint32), its rows counted from
    ``first_row``."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"dropout rate must be in (0, 1]; got {rate}.")
    threshold = max(1, round(rate * 2**DROPOUT_BITS))
    if threshold >= 2**DROPOUT_BITS:
        return None, 0.0
    scale = 2**DROPOUT_BITS / (2**DROPOUT_BITS - threshold)
    target = tuple(shape)
    *lead, last = target or (1,)
    if first_row + _mask_rows(target) > 2**32:
        raise ValueError(f"dropout over {target} has more than 2**32 rows; flatten it first.")
    quarter = -(-last // 4)
    packed = (*lead, quarter)
    row = jnp.full(packed, first_row, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(lead))):
        row = row + jax.lax.broadcasted_iota(jnp.uint32, packed, dim) * jnp.uint32(stride % 2**32)
        stride *= lead[dim]
    column = jax.lax.broadcasted_iota(jnp.uint32, packed, len(lead))
    hi, lo = threefry2x32_p.bind(words[0], words[1], row, column)
    low16 = jnp.uint32(0xFFFF)
    t = jnp.uint32(threshold)
    parts = [(hi >> 16) >= t, (hi & low16) >= t, (lo >> 16) >= t, (lo & low16) >= t]
    keep = jnp.concatenate(parts, axis=-1)[..., :last]
    return keep.reshape(target), scale


# Named jax.checkpoint policies for --remat: what a block keeps from its forward pass for the
# backward pass; everything else is recomputed.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # every matmul output
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def block(cls: type[nn.Module], remat: str | None, train_argnum: int) -> type[nn.Module]:
    """``cls`` itself, or with ``remat`` (a :data:`REMAT_POLICIES` name) the same block under
    ``nn.remat``: same param paths and dropout streams, activations recomputed in the backward
    pass instead of stored. ``train_argnum`` is the position of the block's ``train`` flag in
    its ``__call__`` (``self`` is 0), which must stay a Python bool.
    """
    if remat is None:
        return cls
    return nn.remat(cls, policy=remat_policy(remat), static_argnums=(train_argnum,))


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy named ``name``, or an error listing the names."""
    if name not in REMAT_POLICIES:
        raise ValueError(
            f"remat (--remat) {name!r} is not a policy; choose one of {list(REMAT_POLICIES)}."
        )
    return REMAT_POLICIES[name]


def shard_batch(x: jax.Array) -> jax.Array:
    """``x`` with its leading (batch) dimension split over the ``data`` and ``fsdp`` axes of the
    mesh the step is traced under (:func:`jaxtl.train.steps.compile_steps` sets it), the rest
    whole; unchanged when there is none (``model.apply``, evaluation outside a Trainer).

    FSDP needs this: with params split over ``fsdp`` and nothing said about activations, XLA
    prefers to keep each weight where it is and gather the *activations* of the whole batch
    to every device (3x the temporaries of the replicated step on BERT-large), where FSDP
    gathers each layer's weights and keeps every device on its own rows.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``[..., T, H * D]`` projections -> ``[..., T, H, D]`` heads for
    :func:`dot_product_attention`."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def causal_mask(
    length: int, slots: int, offset: jax.Array | int, valid: jax.Array | None
) -> jax.Array:
    """Which keys each query may attend to in causal self-attention: ``[B or 1, Tq, Tk]``.

    The ``length`` queries sit at key slots ``offset .. offset + length - 1`` of ``slots`` keys
    (training: ``offset=0`` and ``slots=length``, the lower triangle; decoding with a KV cache:
    the chunk written at ``offset``). A query sees the keys at or before its own slot that
    ``valid`` (``[B, slots]``, 1 for real tokens; ``None`` for all) marks.
    """
    mask = (jnp.arange(slots)[None, :] <= offset + jnp.arange(length)[:, None])[None]
    return mask if valid is None else mask & valid.astype(bool)[:, None, :]


def write_cache(
    cache: tuple[jax.Array, ...], new: tuple[jax.Array, ...], index: jax.Array | int
) -> tuple[jax.Array, ...]:
    """Each ``new`` chunk (``[B, T, ...]``) written into its ``cache`` (``[B, S, ...]``) at slots
    ``index .. index + T - 1``: a layer's KV cache after one prefill or decode step."""
    return tuple(
        jax.lax.dynamic_update_slice_in_dim(old, chunk.astype(old.dtype), index, axis=1)
        for old, chunk in zip(cache, new, strict=True)
    )


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float,
    deterministic: bool,
    dtype: Any,
    scale: float | None = None,
) -> jax.Array:
    """Multi-head softmax attention of ``q [B, Tq, H, D]`` over ``k, v [B, Tk, H, D]``.

    Computes transformers' eager attention: ``softmax(q k^T * scale)`` over the keys, dropout on
    the probabilities, then the weighted sum of ``v``.

    Args:
      q, k, v: queries, keys and values, split into heads (:func:`split_heads`).
      mask: ``True`` where a query may attend to a key, broadcastable to the scores
        ``[B, H, Tq, Tk]`` (e.g. ``padding[:, None, None, :]``, ``causal[:, None]``); ``None``
        attends everywhere.
      dropout_rate: attention-probability dropout (transformers' ``attention_probs_dropout_prob``
        / ``attn_pdrop``). Its :class:`Dropout` (``stream=True``) is created in the calling
        module, as that module's next ``Dropout_<n>``, the name flax's keys are folded from
        outside a :func:`dropout_stream`.
      deterministic: no dropout (inference).
      dtype: the dtype the probabilities are cast back to before meeting ``v``.
      scale: multiplies the scores; default ``D ** -0.5``.

    Returns:
      The context ``[B, Tq, H * D]``, heads merged back in order.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    # Softmax in at least float32, as transformers upcasts: bf16 exponentials lose too much.
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    if mask is not None:
        # transformers adds finfo.min to masked scores; any finite score + finfo.min rounds to
        # finfo.min, so `where` gives the same result without the overflow to -inf adding can hit.
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    probs = Dropout(dropout_rate, stream=True)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(*out.shape[:-2], out.shape[-2] * out.shape[-1])


def layer_norm(epsilon: float, name: str, dtype: Any) -> nn.LayerNorm:
    """PyTorch's ``nn.LayerNorm(eps=epsilon)`` over the last axis, params in ``dtype``."""
    # use_fast_variance=False: E[x^2]-E[x]^2 loses precision against PyTorch's two-pass variance.
    return nn.LayerNorm(
        epsilon=epsilon,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )


def bn_trains(module: nn.Module, name: str, train: bool, bn_train: tuple[str, ...]) -> bool:
    """Whether the BatchNorm child ``name`` of ``module`` normalizes with batch statistics.

    Transfer needs a per-layer answer: a frozen BatchNorm must keep using the running statistics
    it was pretrained with (a frozen backbone is a fixed function), while a BatchNorm in a trained
    block updates them. ``bn_train`` lists the "/"-joined paths (or path prefixes) of the layers
    in training mode; it is static, so each distinct set compiles once.
    """
    path = "/".join((*module.path, name))
    return train and any(is_under(path, p) for p in bn_train)


def batch_norm(
    module: nn.Module,
    name: str,
    *,
    train: bool,
    bn_train: tuple[str, ...],
    epsilon: float = 1e-5,
    torch_momentum: float = 0.1,
    dtype: Any = jnp.float32,
) -> nn.BatchNorm:
    """A PyTorch-equivalent ``nn.BatchNorm`` child in inference or training mode per
    :func:`bn_trains`. PyTorch's ``momentum`` weighs the new batch; Flax's the old average."""
    return nn.BatchNorm(
        use_running_average=not bn_trains(module, name, train, bn_train),
        momentum=1.0 - torch_momentum,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )


def check_nhwc(pixel_values: jax.Array, channels: int, size: tuple[int, int] | None = None) -> None:
    """Raises a ``ValueError`` that names the fix unless ``pixel_values`` is NHWC.

    Shapes are static, so a wrong input fails while tracing, on the host, before anything
    compiles (instead of as a kernel-shape error deep inside the first conv).

    Args:
      pixel_values: the model's input.
      channels: the channel count the model was built for.
      size: ``(height, width)`` for models that take only one size (ViT's position
        embeddings); ``None`` for models that take any.
    """
    shape = tuple(pixel_values.shape)
    if len(shape) == 4 and shape[-1] == channels and (size is None or shape[1:3] == tuple(size)):
        return
    dims = "height, width" if size is None else f"{size[0]}, {size[1]}"
    hint = ""
    if len(shape) == 4 and shape[1] == channels and shape[-1] != channels:
        hint = (
            " It looks like NCHW (PyTorch's layout): transpose it to NHWC with "
            "x.transpose(0, 2, 3, 1)."
        )
    other = (
        "load the model with in_channels= for another channel count"
        if size is None
        else "load the model with image_size= / in_channels= for other inputs"
    )
    raise ValueError(
        f"pixel_values must be NHWC [batch, {dims}, {channels}], got shape {shape}.{hint} "
        f"Preprocess images with model.extras['preprocessing'], or {other}."
    )


# Where every family keeps its segmentation head's params (its Structure.head).
SEGMENTATION_HEAD = "segmentation_head"


class SegmentationHead(nn.Module):
    """A light semantic-segmentation head: a per-pixel linear classifier (a 1x1 conv, Dense
    over channels, named ``classifier``) on a backbone's last feature map, its logits resized
    bilinearly to the input size.

    The FCN-32s decoder (Long et al. 2015) without its skip connections: a fine-tuned backbone
    carries the context, the head only reads it out, so the head is ``C * num_labels`` weights
    and its input (the feature map) is what the feature cache stores for a linear probe.
    Upsampling the logits rather than the features keeps the full-resolution tensor
    ``num_labels`` wide. Masks are as fine as the map's stride allows (32 for a 4-stage ResNet
    or ConvNeXt, the patch size for ViT): a backbone with fewer stages, or a larger input,
    gives finer ones.

    Attributes:
      num_labels: classes per pixel.
      std: the classifier kernel's normal init (the family's ``init_leaf`` decides on load).
      dtype: param and compute dtype.
    """

    num_labels: int
    std: float = 0.02
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, size: tuple[int, int]) -> jax.Array:
        """``features [B, h, w, C]`` -> logits ``[B, *size, num_labels]``."""
        logits = dense(self.num_labels, "classifier", self.dtype, std=self.std)(
            shard_batch(features)
        )
        shape = (logits.shape[0], *size, self.num_labels)
        # Half-pixel centres (align_corners=False), as torch's interpolate(mode="bilinear").
        return shard_batch(jax.image.resize(logits, shape, "bilinear"))
