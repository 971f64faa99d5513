"""Read a single-file state dict (torchvision style) into a flat ``name -> np.ndarray`` dict.

Two formats: safetensors (preferred: it holds only tensors, and needs no torch), and PyTorch's
``.pth``/``.pt``/``.bin`` pickles. A pickle can run arbitrary code when unpickled, so pickles are
read only through ``torch.load(weights_only=True)``, which accepts tensors and plain containers and
refuses anything else. There is no fallback to full unpickling: a file that weights-only loading
rejects is refused with a message, and without torch installed no pickle is opened at all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxtl.weights.safetensors_io import read_safetensors_file

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Training scripts often save {"state_dict": ..., "epoch": ...}; these keys hold the weights.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


class UnsafeCheckpointError(ValueError):
    """A pickle that weights-only loading refused: it holds more than tensors."""


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a state dict file into ``{name: array}`` (bfloat16/half widened to float32).

    Args:
      path: a ``.safetensors`` file, or a PyTorch pickle (``.pth``, ``.pt``, ``.bin``,
        ``.ckpt``) holding a state dict, possibly wrapped as ``{"state_dict": ...}``.

    Raises:
      FileNotFoundError: no such file.
      ImportError: a pickle, and torch is not installed (nothing was unpickled).
      UnsafeCheckpointError: a pickle that ``torch.load(weights_only=True)`` refused.
      ValueError: an unknown suffix, a file that holds no tensors, or a safetensors header that
        does not describe the file (:func:`jaxtl.weights.safetensors_io.read_header`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"State dict file {path} does not exist.")
    if path.endswith(SAFETENSORS_SUFFIXES):
        raw: Mapping[str, Any] = read_safetensors_file(path)
    elif path.endswith(PICKLE_SUFFIXES):
        raw = _read_pickle(path)
    else:
        raise ValueError(
            f"{path}: unknown weight file type. jaxtl reads .safetensors files and PyTorch pickles "
            f"({', '.join(PICKLE_SUFFIXES)}), or a Hugging Face directory with config.json."
        )
    tensors = {name: _to_numpy(value) for name, value in raw.items() if _is_tensor(value)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors (keys: {list(raw)[:8]}).")
    return tensors


def _read_pickle(path: str) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path} is a PyTorch pickle; reading it safely needs torch "
            "(`pip install 'jaxtl[torch]'`), and jaxtl never unpickles without it. Or convert it "
            "once to safetensors where torch is installed: "
            "`safetensors.torch.save_file(torch.load(PATH, weights_only=True), OUT)`."
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (or RuntimeError on older versions)
        raise UnsafeCheckpointError(
            f"Refused to load {path}: torch.load(weights_only=True) rejected it ({_reason(e)}). "
            "The file "
            "holds objects other than tensors, and unpickling them could run arbitrary code, so "
            "jaxtl does not fall back to full unpickling. Get the weights as .safetensors, or, "
            "only if you trust the file's origin, re-save just its state dict yourself."
        ) from e
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping) and not _is_tensor(obj.get(key)):
                return obj[key]
        return obj
    raise ValueError(
        f"{path} holds a {type(obj).__name__}, not a state dict (a name -> tensor map)."
    )


def _reason(error: Exception) -> str:
    """torch's one informative line: the global it refused (e.g. "Unsupported global: GLOBAL
    builtins.exec ..." or "... unsupported GLOBAL posix.system whose module posix is blocked"),
    never its advice to retry with weights_only=False."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please use")[0].strip()
    for line in lines:
        if "GLOBAL" in line:
            return line.rstrip(".")
    return lines[0].split(". ")[0] if lines else type(error).__name__


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    # A torch tensor: widen the dtypes numpy lacks (bfloat16) before converting.
    if value.dtype.is_floating_point and value.dtype.itemsize < 4:
        value = value.float()
    return value.detach().cpu().numpy()
