"""Pieces every Hugging Face-style family shares: activation names and the per-param initializer."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
