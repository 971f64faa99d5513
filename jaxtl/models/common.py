"""Pieces the families share: activation names, initializers, BatchNorm modes and ``apply``."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.rules import is_under

# Hugging Face activation names -> functions. "gelu" is the exact erf form in PyTorch; the tanh
# approximation ("gelu_new", GPT-2's) differs by up to ~1e-3, far above parity tolerance.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


def init_normal_leaf(
    path: str, leaf: jax.ShapeDtypeStruct, seed: int, std: float, family: str
) -> jax.Array:
    """transformers' ``_init_weights`` rule for one param: kernels and embeddings ~ normal(std),
    biases 0, LayerNorm scales 1.

    Each param draws from its own numpy stream seeded by ``(seed, crc32(path))``: a new head's
    init does not depend on the rest of the tree, needs no per-shape XLA compilation, and is
    stable across platforms.
    """
    name = path.rsplit("/", 1)[-1]
    if name == "bias":
        return jnp.zeros(leaf.shape, leaf.dtype)
    if name == "scale":
        return jnp.ones(leaf.shape, leaf.dtype)
    if name not in ("kernel", "embedding"):
        raise ValueError(f"No {family} initializer for param {path!r}.")
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    wide = np.float64 if jnp.dtype(leaf.dtype) == jnp.float64 else np.float32
    return jnp.asarray(rng.standard_normal(leaf.shape, dtype=wide) * std, dtype=leaf.dtype)


def abstract_params(module: nn.Module, max_positions: int) -> Any:
    """Param shapes and dtypes of a text ``module(input_ids, attention_mask)``, without compiling.

    ``eval_shape`` traces without compiling or allocating: measured on MiniLM-L6 (2 CPU cores),
    ``jit(module.init)`` took 7.5 s, nearly all compilation, against 0.1 s here.
    """
    ids = jax.ShapeDtypeStruct((1, min(8, max_positions)), jnp.int32)
    return jax.eval_shape(lambda r, x: module.init({"params": r}, x, x), jax.random.key(0), ids)[
        "params"
    ]


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

    return forward_functions(_forward, _inputs, has_batch_stats)


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
        raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
    if in_channels == 1:
        return kernel.sum(axis=axis, keepdims=True)
    reps = -(-in_channels // have)
    tiled = np.concatenate([kernel] * reps, axis=axis)
    index = [slice(None)] * kernel.ndim
    index[axis] = slice(0, in_channels)
    return tiled[tuple(index)] * (have / in_channels)


def hf_export_config(
    raw_config: Mapping[str, Any], architecture: str, num_labels: int, task: str
) -> dict[str, Any]:
    """The source config.json updated for an exported head: architectures, label count, problem
    type. Everything else (sizes, activation, token ids) is kept as the checkpoint declared it."""
    config = {k: v for k, v in raw_config.items() if k not in ("id2label", "label2id")}
    config["architectures"] = [architecture]
    if task in ("classification", "regression"):
        config["num_labels"] = num_labels
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        config["problem_type"] = (
            "regression" if task == "regression" else "single_label_classification"
        )
    return config


def flat_numpy(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{"/"-joined path: np.ndarray}`` of a (possibly device-resident) param tree."""
    from jaxtl.rules import flatten  # local: rules imports nothing from models, keep it so

    return {p: np.asarray(jax.device_get(v)) for p, v in flatten(tree).items()}
