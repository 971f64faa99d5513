"""``export``: write a (fine-tuned) model back to the format it was loaded from.

Hugging Face families become a directory that transformers loads: ``config.json`` (the source
config with the new head's size) + ``model.safetensors`` in HF names and PyTorch layouts, plus the
source's tokenizer / pooling files and, for image models, a ``preprocessor_config.json`` that
describes the preprocessing the model was used with. torchvision-style families become one
safetensors state dict in the source naming, which ``torch.nn.Module.load_state_dict`` takes after
``safetensors.torch.load_file``. Each family's inverse converter lives next to its converter.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from jaxtl import parallel
from jaxtl.distributed import is_primary
from jaxtl.models.base import LoadedModel

# Files a Hugging Face directory carries besides weights and config, copied verbatim.
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "modules.json",
    "sentence_bert_config.json",
)
_SIDE_DIRS = ("1_Pooling",)


def export(
    model: LoadedModel,
    out: str | os.PathLike,
    params: Mapping[str, Any] | None = None,
    batch_stats: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Writes ``params`` (default: the model's own) in the model's source format.

    Args:
      model: the :class:`LoadedModel` the params belong to (gives names, config and format).
      out: a directory for Hugging Face families; a ``.safetensors`` file path (or a directory,
        which then gets ``model.safetensors``) for state-dict families.
      params: the params to write, e.g. ``result.params`` after fine-tuning.
      batch_stats: BatchNorm statistics to write (default: the model's own).
      overwrite: replace existing weights at ``out``; without it an existing export is an error,
        so nothing saved is lost by accident.

    Params sharded over a mesh are gathered first; in a multi-process run call this on every
    process (each contributes its shards) and process 0 writes. Leaves stored in another dtype
    during training (``frozen_bf16``) are written in the model's own dtype.

    Returns:
      The path written (the directory, or the safetensors file).

    Raises:
      ValueError: the family cannot export, or params do not match the model's tree.
      FileExistsError: ``out`` already holds weights and ``overwrite`` is False.

    Example:
      >>> # result = jaxtl.finetune(model, "full", data)
      >>> # jaxtl.export(model, "exported/", result.params)
    """
    if model.export_fn is None:
        raise ValueError(f"The {model.family!r} family cannot export yet.")
    params = model.params if params is None else params
    batch_stats = model.batch_stats if batch_stats is None else batch_stats
    _check_same_tree(model.params, params)
    guess = os.path.abspath(os.fspath(out))
    if not guess.endswith(".safetensors"):
        guess = os.path.join(guess, "model.safetensors")
    if os.path.exists(guess) and not overwrite:  # every process, before any gathering
        raise FileExistsError(f"{guess} exists; pass overwrite=True to replace it.")
    params, batch_stats = parallel.to_host((params, batch_stats))
    params = jax.tree.map(lambda x, like: np.asarray(x).astype(like.dtype), params, model.params)
    state_dict, config = model.export_fn(params, batch_stats)
    out = os.path.abspath(os.fspath(out))
    if config is None and out.endswith(".safetensors"):
        target, directory = out, os.path.dirname(out)
    else:
        directory, target = out, os.path.join(out, "model.safetensors")
    if not is_primary():  # one writer per export
        return target if config is None else directory
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it.")
    os.makedirs(directory, exist_ok=True)
    tensors = {k: np.asarray(v, order="C") for k, v in state_dict.items()}  # keeps 0-d shapes
    safetensors.numpy.save_file(tensors, target, metadata={"format": "pt"})
    if config is None:
        return target
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    source = model.path if model.path and os.path.isdir(model.path) else None
    if "preprocessing" in model.extras:
        _write_preprocessor_config(model, source, directory)
    if source and os.path.abspath(source) != directory:
        for name in _SIDE_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(directory, name))
        for name in _SIDE_DIRS:
            if os.path.isdir(os.path.join(source, name)):
                shutil.copytree(
                    os.path.join(source, name), os.path.join(directory, name), dirs_exist_ok=True
                )
    return directory


# transformers' image processor per family, for exports whose source had no config to follow.
_IMAGE_PROCESSORS = {"vit": "ViTImageProcessor", "resnet": "ConvNextImageProcessor"}


def _write_preprocessor_config(model: LoadedModel, source: str | None, directory: str) -> None:
    """``preprocessor_config.json`` for the preprocessing the model was used with (size and
    channels may differ from the source's after ``image_size=`` / ``in_channels=``), in the
    style of the source's config where it has one."""
    template: dict[str, Any] = {}
    path = os.path.join(source, "preprocessor_config.json") if source else ""
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            template = json.load(f)
    if model.family in _IMAGE_PROCESSORS:
        template.setdefault("image_processor_type", _IMAGE_PROCESSORS[model.family])
    if template.get("image_processor_type") == "ConvNextImageProcessor":
        template.setdefault("crop_pct", 0.875)  # it crops by crop_pct, ignoring crop_size
    raw = model.extras["preprocessing"].to_hf(template)
    with open(os.path.join(directory, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2, sort_keys=True)


def _check_same_tree(expected: Any, given: Any) -> None:
    import jax

    want = jax.tree.map(lambda x: tuple(np.shape(x)), expected)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), given)
    if want != got:
        raise ValueError(
            "params do not match the model's param tree (different names or shapes); export the "
            "params of the model they were trained from."
        )
