"""What the families' ``build`` functions share: activation names, initializers, ``apply`` /
``forward``, abstract shapes, input-channel adaptation and the ``export`` wiring.

The Flax layers they share are in :mod:`jaxtl.models.layers`.
"""

from __future__ import annotations

import dataclasses
import numbers
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models.layers import SEGMENTATION_HEAD, dropout_stream


def recomputed(activation: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """``activation`` whose backward pass recomputes it from its input (``jax.checkpoint``).

    Differentiated as written, an activation built of several elementwise pieces keeps their
    forward values for its backward pass: exact GELU keeps three arrays of its input's shape
    (the input, ``erf`` and ``exp`` terms), tanh GELU five, SiLU three. Recomputed, it keeps only
    its input, and the backward pass evaluates the pieces again, which costs elementwise work
    beside the matmuls around it. In MiniLM's full fine-tune step (batch 32) that took the
    step's working memory (XLA's ``memory_analysis``) from 188 to 152 MiB at 16 tokens and from
    1,514 to 1,226 MiB at 128, with the step time unchanged within noise at 128 tokens and
    one epoch of the demo (16 tokens) 2-6% longer in two alternating pairs (benchmarks/README.md,
    "Activations recomputed"). The values and gradients are the same functions' (float
    rounding aside: XLA may fuse the recomputation differently).
    """
    return jax.checkpoint(activation)


# Hugging Face activation names -> functions. "gelu" is the exact erf form in PyTorch; the tanh
# approximation ("gelu_new", GPT-2's) differs by up to ~1e-3, far above parity tolerance. ReLU
# (the image families') and tanh are left as written: recomputing them was not measured.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": recomputed(lambda x: nn.gelu(x, approximate=False)),
    "gelu_new": recomputed(lambda x: nn.gelu(x, approximate=True)),
    "gelu_pytorch_tanh": recomputed(lambda x: nn.gelu(x, approximate=True)),
    "relu": nn.relu,
    "silu": recomputed(nn.silu),
    "swish": recomputed(nn.silu),
    "tanh": jnp.tanh,
}


def init_normal_leaf(
    path: str, leaf: jax.ShapeDtypeStruct, seed: int, std: float, family: str
) -> jax.Array:
    """transformers' ``_init_weights`` rule for one param: kernels and embeddings ~ normal(std),
    biases 0, LayerNorm scales 1; drawn from :func:`leaf_rng`."""
    name = path.rsplit("/", 1)[-1]
    if name == "bias":
        return jnp.zeros(leaf.shape, leaf.dtype)
    if name == "scale":
        return jnp.ones(leaf.shape, leaf.dtype)
    if name not in ("kernel", "embedding"):
        raise ValueError(f"No {family} initializer for param {path!r}.")
    wide = host_dtype(leaf)
    return jnp.asarray(
        leaf_rng(seed, path).standard_normal(leaf.shape, dtype=wide) * std, dtype=leaf.dtype
    )


def leaf_rng(seed: int, path: str) -> np.random.Generator:
    """The numpy stream one param draws its initial values from, seeded by
    ``(seed, crc32(path))``: every family's ``init_leaf`` uses it, so a new head's init does not
    depend on the rest of the tree, needs no per-shape XLA compilation, and is stable across
    platforms."""
    return np.random.default_rng([seed, zlib.crc32(path.encode())])


def host_dtype(leaf: jax.ShapeDtypeStruct) -> type[np.floating]:
    """The numpy dtype a param's initial values are computed in: float64 for a float64 param,
    float32 for every other (bfloat16 included)."""
    return np.float64 if jnp.dtype(leaf.dtype) == jnp.float64 else np.float32


def trunc_normal(
    rng: np.random.Generator, shape: tuple[int, ...], std: float, bound: float = 2.0
) -> np.ndarray:
    """torch's ``trunc_normal_(std=std, a=-bound, b=bound)`` in float64: normal(0, std) draws,
    redrawn (torch's inverse-CDF sampler never lands outside, so no clipping) until all lie in
    ``[-bound, bound]``. torch's bounds are absolute values, not multiples of ``std``."""
    values = rng.standard_normal(shape) * std
    outside = np.abs(values) > bound
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum())) * std
        outside = np.abs(values) > bound
    return values


def abstract_params(module: nn.Module, max_positions: int) -> Any:
    """Param shapes and dtypes of a text ``module(input_ids, attention_mask)``, without compiling.

    ``eval_shape`` traces without compiling or allocating: measured on MiniLM-L6 (2 CPU cores),
    ``jit(module.init)`` took 7.5 s, nearly all compilation, against 0.1 s here.
    """
    ids = jax.ShapeDtypeStruct((1, min(8, max_positions)), jnp.int32)
    return jax.eval_shape(lambda r, x: module.init({"params": r}, x, x), jax.random.key(0), ids)[
        "params"
    ]


def batch_norm_paths(batch_stats: Mapping[str, Any]) -> tuple[str, ...]:
    """The "/"-joined module paths of every BatchNorm layer in a ``batch_stats`` tree."""
    paths: list[str] = []

    def walk(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        if "mean" in node and not isinstance(node["mean"], Mapping):
            paths.append("/".join(prefix))
            return
        for key, child in node.items():
            walk(child, (*prefix, key))

    walk(batch_stats, ())
    return tuple(paths)


def init_stat_leaf(path: str, leaf: jax.ShapeDtypeStruct, seed: int) -> jax.Array:
    """A fresh BatchNorm statistic: running mean 0, running variance 1 (PyTorch's reset)."""
    del seed
    fill = {"mean": 0.0, "var": 1.0}[path.rsplit("/", 1)[-1]]
    return jnp.full(leaf.shape, fill, leaf.dtype)


def make_apply(
    module: nn.Module, input_keys: tuple[str, ...], has_batch_stats: bool = False
) -> tuple[Callable[..., jax.Array], Callable[..., tuple[jax.Array, Any]]]:
    """``(apply, forward)`` for :class:`LoadedModel`.

    ``apply(params, batch, *, train=False, rng=None, batch_stats=None) -> outputs`` is the user's
    call: BatchNorm (if any) in inference mode with ``batch_stats``.
    ``forward(params, batch_stats, batch, *, train=False, rng=None, bn_train=()) ->
    (outputs, batch_stats)`` is the trainer's: BatchNorm layers under ``bn_train`` normalize with
    batch statistics and return their updated running averages.

    Only ``input_keys`` enter the jitted forward (batches also carry labels, weights, text); the
    first key is required, the others are passed as ``None`` when absent.
    """

    def _forward(params, batch_stats, inputs, train, rng, bn_train):
        # Every jaxtl Dropout of the pass draws from one stream of ``rng`` (layers.dropout_stream);
        # flax's own Dropout, in a user's head, from ``rngs``.
        with dropout_stream(rng if train else None):
            return _apply(params, batch_stats, inputs, train, rng, bn_train)

    def _apply(params, batch_stats, inputs, train, rng, bn_train):
        rngs = {"dropout": rng} if rng is not None else {}
        if not has_batch_stats:
            return module.apply({"params": params}, *inputs, train=train, rngs=rngs), batch_stats
        variables = {"params": params, "batch_stats": batch_stats}
        if train and bn_train:
            outputs, updated = module.apply(
                variables,
                *inputs,
                train=train,
                bn_train=bn_train,
                rngs=rngs,
                mutable=["batch_stats"],
            )
            return outputs, updated["batch_stats"]
        return module.apply(variables, *inputs, train=train, bn_train=(), rngs=rngs), batch_stats

    def _inputs(batch: Mapping[str, jax.Array]) -> tuple:
        first, *rest = input_keys
        if first not in batch:
            raise KeyError(f"The batch has no {first!r}; this model reads {input_keys}.")
        return (batch[first], *(batch.get(k) for k in rest))

    apply, forward = forward_functions(_forward, _inputs, has_batch_stats)
    # The same wiring around another configuration of the module (jaxtl.models.common.recompute).
    forward.rebuild = lambda other: make_apply(other, input_keys, has_batch_stats)
    return apply, forward


def recompute(model: Any, *, remat: str | None = None, dtype: Any = None) -> Any:
    """``model`` (a :class:`~jaxtl.models.base.LoadedModel`) with its blocks rematerialized under
    ``remat`` and/or its computation in ``dtype``: the same params, the same param paths, a new
    module and forward. ``None`` keeps what the model has.

    Raises:
      ValueError: the family has no per-block remat, or the model's forward cannot be rebuilt
        (a feature-cache tail model); the message names the option.
    """
    rebuild = getattr(model.forward, "rebuild", None)
    if rebuild is None:
        raise ValueError(
            "remat (--remat) and precision (--precision) rebuild the model's forward; this "
            "model's forward (e.g. a feature-cache tail model) cannot be rebuilt. Run without "
            "the feature cache, or without those options."
        )
    module, config = model.module, model.config
    if remat is not None:
        if not (dataclasses.is_dataclass(config) and hasattr(config, "remat")):
            raise ValueError(
                "remat (--remat) is available for the transformer families and ConvNeXt (bert, "
                f"roberta, distilbert, gpt2, llama, vit, convnext); {model.family!r} blocks are "
                "not rematerialized yet. Drop remat, or use grad_accum (--grad-accum) to cut "
                "activation memory."
            )
        from jaxtl.models.layers import remat_policy

        remat_policy(remat)  # an unknown policy fails here
        config = dataclasses.replace(config, remat=remat)
        module = module.clone(config=config)
    if dtype is not None:
        module = module.clone(dtype=dtype)
    apply, forward = rebuild(module)
    # The same param arrays as ``model``: keep it, so that releasing them releases its too.
    extras = {**model.extras, "recomputed_from": model}
    return dataclasses.replace(
        model, config=config, module=module, apply=apply, forward=forward, extras=extras
    )


def forward_functions(
    run: Callable[..., tuple[jax.Array, Any]],
    select: Callable[[Mapping[str, jax.Array]], Any],
    has_batch_stats: bool,
) -> tuple[Callable[..., jax.Array], Callable[..., tuple[jax.Array, Any]]]:
    """``(apply, forward)`` (see :func:`make_apply`) around ``run(params, batch_stats,
    select(batch), train, rng, bn_train) -> (outputs, batch_stats)``.

    ``forward`` is jitted (``train`` and ``bn_train`` static); ``forward.traceable`` is the same
    without its own jit, for callers that trace it inside theirs with flax method interceptors
    (a jit cache must never hold an intercepted trace). ``select`` runs outside the jit: it
    picks what enters it from a batch.
    """
    jitted = jax.jit(run, static_argnames=("train", "bn_train"))

    def forward(
        params: Mapping[str, Any],
        batch_stats: Mapping[str, Any],
        batch: Mapping[str, jax.Array],
        *,
        train: bool = False,
        rng: jax.Array | None = None,
        bn_train: tuple[str, ...] = (),
    ) -> tuple[jax.Array, Any]:
        if train and rng is None:
            raise ValueError("apply(..., train=True) needs rng= (a PRNG key for dropout).")
        return jitted(params, batch_stats, select(batch), train, rng, tuple(bn_train))

    def traceable(params, batch_stats, batch, *, train=False, rng=None, bn_train=()):
        return run(params, batch_stats, select(batch), train, rng, tuple(bn_train))

    forward.traceable = traceable
    # The pieces, for wrappers that trace the same run differently (jaxtl.lora.adapt).
    forward.run, forward.select = run, select

    def apply(
        params: Mapping[str, Any],
        batch: Mapping[str, jax.Array],
        *,
        train: bool = False,
        rng: jax.Array | None = None,
        batch_stats: Mapping[str, Any] | None = None,
    ) -> jax.Array:
        if has_batch_stats and batch_stats is None:
            raise ValueError(
                "This model has BatchNorm: pass batch_stats= (model.batch_stats for the loaded "
                "statistics, or the fine-tuned ones from the train state / FitResult)."
            )
        return forward(params, batch_stats or {}, batch, train=train, rng=rng)[0]

    return apply, forward


def abstract_variables(module: nn.Module, inputs: jax.ShapeDtypeStruct) -> Any:
    """An image module's abstract variables (``params``, and ``batch_stats`` where it has
    BatchNorm) from one trace of ``module(inputs, train=False)``, without compiling."""
    return jax.eval_shape(
        lambda r, x: module.init({"params": r}, x, train=False), jax.random.key(0), inputs
    )


def abstract_variables_in_order(module: nn.Module, inputs: jax.ShapeDtypeStruct):
    """``(variables, order)``: the module's abstract params and BatchNorm statistics from one
    trace (no compile), and the paths of the modules holding params in creation order (the
    order of a PyTorch state dict), recorded before jax re-sorts the dict keys."""
    order: list[str] = []

    def init(rng: jax.Array, x: jax.Array) -> Any:
        variables = module.init({"params": rng}, x, train=False)
        order.extend(_module_paths(variables["params"]))
        return variables

    return jax.eval_shape(init, jax.random.key(0), inputs), order


def _module_paths(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[str]:
    paths: list[str] = []
    for key, child in params.items():
        if isinstance(child, Mapping):
            paths += _module_paths(child, (*prefix, key))
        elif "/".join(prefix) not in paths:
            paths.append("/".join(prefix))
    return paths


def adapt_input_channels(kernel: np.ndarray, in_channels: int, axis: int = -2) -> np.ndarray:
    """A pretrained stem kernel for ``in_channels`` inputs instead of its own (timm's rule).

    One channel: the sum of the RGB kernels, so a gray image ``g`` gives the response the RGB
    image ``(g, g, g)`` gave. Other counts: the RGB kernels repeated cyclically and scaled by
    ``3 / in_channels``, keeping the activation scale. ``axis`` is the input-channel axis (``-2``
    for a Flax ``HWIO`` conv kernel or a patch-embedding kernel).
    """
    kernel = np.asarray(kernel)
    have = kernel.shape[axis]
    if in_channels == have:
        return kernel
    if in_channels < 1:
        raise ValueError(f"in_channels (--in-channels) must be >= 1, got {in_channels}.")
    if in_channels == 1:
        return kernel.sum(axis=axis, keepdims=True)
    reps = -(-in_channels // have)
    tiled = np.concatenate([kernel] * reps, axis=axis)
    index = [slice(None)] * kernel.ndim
    index[axis] = slice(0, in_channels)
    return tiled[tuple(index)] * (have / in_channels)


# config.json entries that describe the file read, not the one an export writes.
_SOURCE_ONLY = ("_name_or_path", "transformers_version", "torch_dtype")


def hf_export_config(
    raw_config: Mapping[str, Any],
    architecture: str,
    num_labels: int,
    task: str,
    **updates: Any,
) -> dict[str, Any]:
    """The source config.json updated for an export: ``architectures``, the head, ``updates``.

    A classification or regression head sets ``num_labels``, ``id2label`` / ``label2id`` and
    ``problem_type``. Label names are the source's when the head has the source's label count
    (its own classes, as a pretrained head keeps them), else ``LABEL_i``. ``updates`` are the
    family's own changes (e.g. a resized ViT's ``image_size``). Everything else (sizes,
    activation, token ids) is kept as the checkpoint declared it.

    Example:
      >>> hf_export_config({"id2label": {"0": "cat", "1": "dog"}}, "X", 2, "classification")[
      ...     "label2id"]
      {'cat': 0, 'dog': 1}
    """
    config = {k: v for k, v in raw_config.items() if k not in _SOURCE_ONLY}
    config.update(updates, architectures=[architecture])
    if task in ("classification", "regression", "token_classification"):
        old = raw_config.get("id2label") or {}
        keep = len(old) == num_labels
        id2label = {
            str(i): (old.get(str(i)) if keep else None) or f"LABEL_{i}" for i in range(num_labels)
        }
        config.update(
            num_labels=num_labels,
            id2label=id2label,
            label2id={name: int(i) for i, name in id2label.items()},
        )
        if task != "token_classification":
            config["problem_type"] = (
                "regression" if task == "regression" else "single_label_classification"
            )
    return config


def hf_exporter(
    state_dict: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, np.ndarray]],
    raw_config: Mapping[str, Any],
    architecture: str,
    num_labels: int,
    task: str,
    **updates: Any,
) -> Callable[..., tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """A Hugging Face family's ``ModelSpec.export``: ``export(params, batch_stats) ->
    (state_dict(params, batch_stats), config.json)``, the config from :func:`hf_export_config`."""
    raw_config = dict(raw_config)  # the config as loaded, whatever the caller does to its dict

    def export(params: Mapping[str, Any], batch_stats: Mapping[str, Any]):
        config = hf_export_config(raw_config, architecture, num_labels, task, **updates)
        return state_dict(params, batch_stats), config

    return export


def segmentation_exporter(family: str) -> Callable[..., Any]:
    """The ``ModelSpec.export`` of a ``task="segmentation"`` model: a refusal that says what to
    do instead.

    Neither transformers nor torchvision has a class for :class:`~jaxtl.models.layers.
    SegmentationHead`, so no file written in their format would load back as this model;
    writing the backbone alone under the model's name would lose the head without a word. The
    backbone's params keep the paths of ``task="features"``, so it exports through a features
    model of the same checkpoint, and the whole model lives on in its run directory.
    """

    def export(params: Mapping[str, Any], batch_stats: Mapping[str, Any]):
        del params, batch_stats
        raise ValueError(
            f"A {family!r} model for task='segmentation' has no source format to export to: "
            "neither transformers nor torchvision has a class for jaxtl's segmentation head. "
            "Export the fine-tuned backbone instead, as the source's base model: "
            "backbone = jaxtl.load(PATH, task='features') (with the same image_size= and "
            "in_channels=), then jaxtl.export(backbone, OUT, {k: v for k, v in params.items() "
            f"if k != '{SEGMENTATION_HEAD}'}}, batch_stats). The whole model, head included, "
            "stays loadable from its run directory (jaxtl.restore_run)."
        )

    return export


def state_dict_exporter(
    state_dict: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, np.ndarray]],
) -> Callable[..., tuple[dict[str, np.ndarray], None]]:
    """A state-dict family's ``ModelSpec.export``: ``export(params, batch_stats) ->
    (state_dict(params, batch_stats), None)``; a bare state dict has no config.json."""

    def export(params: Mapping[str, Any], batch_stats: Mapping[str, Any]):
        return state_dict(params, batch_stats), None

    return export


def check_in_channels(in_channels: int | None) -> int | None:
    """The ``in_channels=`` load option of an image family, checked: ``None`` or an int >= 1."""
    if in_channels is None:
        return None
    # numbers.Integral takes numpy ints too; bool is an int but never a channel count.
    integral = isinstance(in_channels, numbers.Integral) and not isinstance(in_channels, bool)
    if not integral or in_channels < 1:
        raise ValueError(
            f"in_channels (--in-channels) must be an integer >= 1, got {in_channels!r}."
        )
    return int(in_channels)


def flat_numpy(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{"/"-joined path: np.ndarray}`` of a (possibly device-resident) param tree."""
    from jaxtl.transfer.rules import flatten  # local: rules imports nothing from models, keep it so

    return {p: np.asarray(jax.device_get(v)) for p, v in flatten(tree).items()}
