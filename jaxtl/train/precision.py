"""Mixed precision: the dtype a step computes in, and which params are stored in bfloat16.

``precision="bf16"`` (``--precision bf16``) runs the model's matmuls, convolutions and
activations in bfloat16. What stays float32: the master params and the optimizer state (the
update is applied in float32), the gradients and their accumulation over microbatches (they
are gradients of the float32 params), the attention softmax (:mod:`jaxtl.models.layers`
upcasts the scores), LayerNorm statistics (Flax reduces in float32) and the loss
(:mod:`jaxtl.train.losses` upcasts the logits). ``frozen_bf16`` also stores the frozen groups'
params in bfloat16, halving their memory. They hold no optimizer state. Their values are rounded
to bf16, so the frozen part of the forward pass uses the rounded weights even when computing in
float32, and an export writes those rounded values (as float32).

float32 is the default everywhere. A backend without bf16 arithmetic gets a warning and
float32.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp

PRECISIONS = ("float32", "bf16")


def bf16_unsupported(device: Any) -> str | None:
    """Why ``device`` cannot compute in bfloat16, or None when it can.

    TPUs and CPUs compute bf16 (XLA:CPU natively with AVX512-BF16 / AMX, otherwise through
    float32 conversions: correct, not faster). NVIDIA GPUs before Ampere (compute capability
    < 8.0) have no bf16 arithmetic.
    """
    if device.platform in ("cpu", "tpu"):
        return None
    if device.platform in ("gpu", "cuda"):
        capability = getattr(device, "compute_capability", None)
        try:
            major = int(str(capability).split(".")[0])
        except ValueError:
            return None
        if major < 8:
            return f"{device.device_kind} (compute capability {capability}) has no bf16 arithmetic"
    return None


def check_precision(precision: str) -> None:
    """Raise unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision (--precision) must be one of {PRECISIONS}, got {precision!r}.")


def compute_dtype(precision: str, device: Any) -> Any:
    """The dtype a step computes in for ``precision`` on ``device``'s backend.

    Raises:
      ValueError: ``precision`` is not one of :data:`PRECISIONS`.

    Warns:
      UserWarning: bf16 asked where it is not supported; the step computes in float32.
    """
    check_precision(precision)
    if precision == "float32":
        return jnp.float32
    why = bf16_unsupported(device)
    if why is not None:
        warnings.warn(
            f"precision='bf16' (--precision bf16) asked, but {why}; computing in float32.",
            stacklevel=2,
        )
        return jnp.float32
    return jnp.bfloat16


def cast_frozen(params: Any, trainable: Any) -> Any:
    """``params`` with every frozen floating-point leaf (``trainable`` False) in bfloat16."""

    def cast(x, trains):
        if trains or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)
        return x.astype(jnp.bfloat16)

    return jax.tree.map(cast, params, trainable)
