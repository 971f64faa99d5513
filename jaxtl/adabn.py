"""AdaBN: re-estimate BatchNorm statistics on unlabeled target-domain data.

Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation" (2016): a network's
weights carry over to a new domain better than its BatchNorm statistics do, so recomputing only
the statistics on target images adapts the model without a single label or gradient step.

How (the same recipe as PyTorch's ``momentum=None`` + ``reset_running_stats`` + train-mode
passes): every BatchNorm layer normalizes with batch statistics while the target data streams
through, and each layer's population mean and variance are accumulated exactly over all examples
(variance by the law of total variance, not as an average of batch variances). Params are not
touched; only ``batch_stats`` come back new.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models.base import LoadedModel
from jaxtl.models.common import batch_norm_paths
from jaxtl.transfer.trees import flatten, unflatten


def adapt_batch_norm(
    model: LoadedModel,
    data: np.ndarray | Iterable[Mapping[str, np.ndarray]],
    *,
    params: Mapping[str, Any] | None = None,
    batch_stats: Mapping[str, Any] | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Returns BatchNorm statistics re-estimated on ``data`` (AdaBN); params stay as they are.

    Args:
      model: a model with BatchNorm (``model.batch_stats`` not empty).
      data: target-domain inputs, already preprocessed: an array of ``pixel_values``
        ``[N, H, W, C]``, or an iterable of batches (dicts with the model's input keys).
        Labels, if present, are ignored.
      params: the params to run (default: ``model.params``).
      batch_stats: the statistics to replace (default: ``model.batch_stats``); used only for
        their structure.
      batch_size: batch size when ``data`` is an array. Every batch should have more than one
        example: a BatchNorm layer's batch statistics are what get averaged.

    Returns:
      New ``batch_stats`` with the tree structure of the old ones.

    Raises:
      ValueError: the model has no BatchNorm, ``data`` is empty or an array of raw (integer)
        images, or ``batch_size`` < 2.

    Example:
      >>> # stats = jaxtl.adapt_batch_norm(model, target_images)
      >>> # logits = model.apply(model.params, batch, batch_stats=stats)
    """
    params = model.params if params is None else params
    batch_stats = model.batch_stats if batch_stats is None else batch_stats
    layers = batch_norm_paths(batch_stats)
    if not layers:
        raise ValueError(f"The {model.family!r} model has no BatchNorm statistics to adapt.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(
            f"batch_size must be a whole number >= 2 (each batch's statistics are what get "
            f"averaged, and one example has no variance), got {batch_size!r}."
        )
    if isinstance(data, np.ndarray | jax.Array):
        _check_pixels(data)
    batches = _batches(data, batch_size)

    # Each layer's update is ``m * old + (1 - m) * batch`` with the layer's own momentum m. From
    # an all-zeros ``old`` the update is ``(1 - m) * batch``; ``1 - m`` comes from one probe
    # with an all-ones ``old`` (update - zeros-update = m), so no family's momentum is hard-coded.
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    ones = jax.tree.map(jnp.ones_like, batch_stats)
    rng = jax.random.key(0)  # dropout is irrelevant to the statistics but needs a key

    def batch_moments(batch, start):
        _, updated = model.forward(params, start, batch, train=True, rng=rng, bn_train=layers)
        return flatten(jax.device_get(updated))

    sums: dict[str, np.ndarray] = {}
    count = 0
    scale = None
    for batch in batches:
        n = len(next(iter(batch.values())))
        if n < 2:
            raise ValueError("AdaBN needs batches of at least 2 examples.")
        moments = batch_moments(batch, zeros)
        if scale is None:
            probe = batch_moments(batch, ones)
            scale = {p: 1.0 - (probe[p] - moments[p]) for p in moments}  # 1 - momentum
        for path, value in moments.items():
            value = value.astype(np.float64) / scale[path]
            if path.endswith("/mean"):
                sums[path] = sums.get(path, 0.0) + n * value
                # E[x^2] per batch = var + mean^2 (Flax's batch variance is the biased one)
                var_path = path[: -len("mean")] + "var"
                var = moments[var_path].astype(np.float64) / scale[var_path]
                sums[var_path + "^2"] = sums.get(var_path + "^2", 0.0) + n * (var + value**2)
        count += n
    if count == 0:
        raise ValueError("AdaBN got no data: pass target-domain images or batches.")
    out = {}
    for path, leaf in flatten(batch_stats).items():
        if path.endswith("/mean"):
            out[path] = sums[path] / count
        else:
            mean = sums[path[: -len("var")] + "mean"] / count
            out[path] = np.maximum(sums[path + "^2"] / count - mean**2, 0.0)
        out[path] = jnp.asarray(out[path], dtype=jnp.asarray(leaf).dtype)
    return unflatten(out)


def _check_pixels(data: np.ndarray | jax.Array) -> None:
    """An array is the model's preprocessed ``pixel_values``: raw 0..255 images would be
    normalized by statistics of the wrong scale, and nothing downstream would say so."""
    if not jnp.issubdtype(data.dtype, jnp.floating) or data.ndim != 4:
        raise ValueError(
            f"adapt_batch_norm reads preprocessed pixel_values [N, H, W, C] of floats, got "
            f"{data.dtype} of shape {tuple(data.shape)}: preprocess the images first, "
            "model.extras['preprocessing'](images), as training does."
        )


def _batches(data, batch_size: int):
    if isinstance(data, np.ndarray | jax.Array):
        bounds = [*range(0, len(data), batch_size), len(data)]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            bounds[-2] -= 1  # never a batch of one: it has no batch variance
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            yield {"pixel_values": np.asarray(data[start:stop])}
    else:
        for batch in data:
            yield {k: v for k, v in batch.items() if k not in ("label", "weight")}
