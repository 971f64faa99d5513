"""Deterministic, seed-derived weights for torch-reference parity fixtures.

The torchvision parity fixtures under ``tests/fixtures/torchvision/`` must stay small enough
to commit, yet VGG-16 alone has ~130M parameters. So the fixtures never store weights: both
the fixture generator (``scripts/make_torchvision_fixtures.py``, run once in a throwaway
torchvision venv) and the tests (run in CI without torch) rebuild the same state dict from
the seed and the state dict's ``(key, shape, dtype)`` spec with this module. Only the inputs
and the reference outputs are stored.

Each tensor comes from its own stream ``np.random.default_rng([seed, crc32(key)])``, so a
tensor depends only on the seed, its key, and its shape, never on which other keys exist or
their order. The distributions keep deep nets' activations O(1) in eval mode:

* ``*.num_batches_tracked``: int64 zeros.
* BatchNorm tensors (``P.weight``/``P.bias``/``P.running_mean``/``P.running_var`` where
  ``P.running_mean`` is in the spec): weight ~ U(0.5, 1.5), bias ~ N(0, 0.1),
  running_mean ~ N(0, 0.1), running_var ~ U(0.5, 1.5). Except the weight of the last
  BatchNorm of a residual block (the highest-numbered ``bnK`` under ``layerL.N.``): U(0.1, 0.3),
  as in "zero-init residual" training. In eval mode BatchNorm does not renormalize, so with
  U(0.5, 1.5) every block adds its branch's variance to the skip path and ResNet-50's logits
  reached ~9e3, where float32 rounding alone exceeds the 1e-4 parity tolerance.
* Other tensors with ndim >= 2 (conv / linear weights): N(0, 1) * sqrt(2 / fan_in),
  ``fan_in = prod(shape[1:])`` (He init).
* Other 1-D tensors (biases): N(0, 0.05).

Only numpy is imported here, so tests can use it without torch.
"""

from __future__ import annotations

import math
import re
import zlib

import numpy as np

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")


def _draw(
    key: str,
    shape: tuple[int, ...],
    dtype: str,
    seed: int,
    bn_prefixes: set[str],
    last_bns: set[str],
) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    if key.endswith(".num_batches_tracked") or key == "num_batches_tracked":
        return np.zeros(shape, np.int64)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    if "int64" in dtype:
        # No integer tensor other than num_batches_tracked is expected; keep it zero.
        return np.zeros(shape, np.int64)
    prefix, _, suffix = key.rpartition(".")
    if prefix in bn_prefixes and suffix in _BN_SUFFIXES:
        if suffix == "weight" and prefix in last_bns:
            out = rng.uniform(0.1, 0.3, shape)
        elif suffix in ("weight", "running_var"):
            out = rng.uniform(0.5, 1.5, shape)
        else:  # bias, running_mean
            out = rng.normal(0.0, 0.1, shape)
    elif len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        out = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
    else:
        out = rng.normal(0.0, 0.05, shape)
    return np.asarray(out, np.float32)


def seeded_state_dict(
    spec: list[tuple[str, tuple[int, ...], str]], seed: int
) -> dict[str, np.ndarray]:
    """Builds a state dict of numpy arrays from a ``(key, shape, dtype-name)`` spec.

    Args:
      spec: The state dict's keys, shapes and dtype names (e.g. ``"torch.float32"``,
        ``"int64"``) in state-dict order.
      seed: The base seed; each key gets the stream ``default_rng([seed, crc32(key)])``.

    Returns:
      A dict with the spec's keys in the spec's order: float32 arrays, or int64 for
      ``*.num_batches_tracked`` and int64 entries.
    """
    keys = {k for k, _, _ in spec}
    bn_prefixes = {k[: -len(".running_mean")] for k in keys if k.endswith(".running_mean")}
    last_bns = _last_residual_bns(bn_prefixes)
    return {
        k: _draw(k, tuple(shape), str(dtype), seed, bn_prefixes, last_bns)
        for k, shape, dtype in spec
    }


def _last_residual_bns(bn_prefixes: set[str]) -> set[str]:
    """``layerL.N.bnK`` with the largest K per residual block ``layerL.N``."""
    last: dict[str, tuple[int, str]] = {}
    for prefix in bn_prefixes:
        match = re.fullmatch(r"(layer\d+\.\d+)\.bn(\d+)", prefix)
        if match:
            block, k = match.group(1), int(match.group(2))
            if block not in last or k > last[block][0]:
                last[block] = (k, prefix)
    return {prefix for _, prefix in last.values()}
