"""``export``: write a (fine-tuned) model back to the format it was loaded from.

Hugging Face families become a directory that transformers loads: ``config.json`` (the source
config with the new head's size) + ``model.safetensors`` in HF names and PyTorch layouts, plus the
source's tokenizer / pooling files and, for image models, a ``preprocessor_config.json`` that
describes the preprocessing the model was used with. torchvision-style families become one
safetensors state dict in the source naming, which ``torch.nn.Module.load_state_dict`` takes after
``safetensors.torch.load_file``. Each family's inverse converter lives next to its converter.
"""

from __future__ import annotations

import itertools
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
from jaxtl.train.faults import writable_dir

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
    params = model.own_params("jaxtl.export", takes_params=True) if params is None else params
    batch_stats = model.batch_stats if batch_stats is None else batch_stats
    _check_same_tree(model.params, params)
    guess = os.path.abspath(os.fspath(out))
    if os.path.isfile(guess) and not guess.endswith(".safetensors"):
        raise FileExistsError(
            f"out (jaxtl export's OUT) {guess} is a file; an export is a directory (config.json + "
            "model.safetensors), or a .safetensors file for timm / torchvision families. Choose "
            "another path (overwrite=True, --overwrite, replaces an export, not another file)."
        )
    if not guess.endswith(".safetensors"):
        guess = os.path.join(guess, "model.safetensors")
    writable_dir(os.path.dirname(guess), "out (jaxtl export's OUT)", create=False)
    if os.path.exists(guess) and not overwrite:  # every process, before any gathering
        raise FileExistsError(f"{guess} exists; pass overwrite=True (--overwrite) to replace it.")
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
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it.")
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
    side = _SIDE_FILES
    if "audio_preprocessing" in model.extras:  # its feature extractor, as the source had it
        side = (*side, "preprocessor_config.json")
    if source and os.path.abspath(source) != directory:
        for name in side:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(directory, name))
        for name in _SIDE_DIRS:
            if os.path.isdir(os.path.join(source, name)):
                shutil.copytree(
                    os.path.join(source, name), os.path.join(directory, name), dirs_exist_ok=True
                )
    return directory


# transformers' image processor per family, for exports whose source had no config to follow.
_IMAGE_PROCESSORS = {
    "vit": "ViTImageProcessor",
    "resnet": "ConvNextImageProcessor",
    "convnext": "ConvNextImageProcessor",
}


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


def source_names(model: LoadedModel, paths: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Where params land in the source format: ``{path: (source key, perm)}`` such that the
    exported tensor is ``np.transpose(param, perm)``.

    Derived from the family's own exporter (the one source of truth for names and layouts), by
    exporting marker trees: every other leaf zero, the asked-for leaves first each a distinct
    constant (which key holds it), then each a position pattern (which axis went where).

    Raises:
      ValueError: the family cannot export, or a path's tensor is not one exported key.
    """
    if model.export_fn is None:
        raise ValueError(f"The {model.family!r} family cannot export yet.")
    from jaxtl.transfer.trees import flatten, unflatten

    flat = {p: np.shape(x) for p, x in flatten(model.params).items()}
    unknown = [p for p in paths if p not in flat]
    if unknown:
        raise ValueError(f"{unknown} are not params of this {model.family} model.")
    stats = jax.tree.map(lambda x: np.zeros(np.shape(x), np.float32), model.batch_stats)

    def exported(fill) -> dict[str, np.ndarray]:
        tree = {p: fill(p, shape) for p, shape in flat.items()}
        state, _ = model.export_fn(unflatten(tree), stats)
        return {k: np.asarray(v) for k, v in state.items()}

    marks = {p: float(i + 1) for i, p in enumerate(paths)}
    state = exported(lambda p, s: np.full(s, marks.get(p, 0.0), np.float32))
    keys: dict[str, str] = {}
    for key, value in state.items():
        if value.size and value.dtype.kind == "f":
            first = float(value.flat[0])
            for p, mark in marks.items():
                if first == mark and (value == mark).all():
                    if p in keys:
                        raise ValueError(f"{p!r} is exported under two keys, {keys[p]} and {key}.")
                    keys[p] = key
    missing = [p for p in paths if p not in keys]
    if missing:
        raise ValueError(f"cannot find the source names of {missing} in the {model.family} export.")
    # 65521 is prime and below 2**24: the pattern survives float32 and repeats no short period.
    pattern = lambda s: (np.arange(int(np.prod(s))) % 65521 + 1).reshape(s).astype(np.float32)  # noqa: E731
    wanted = set(paths)
    state = exported(lambda p, s: pattern(s) if p in wanted else np.zeros(s, np.float32))
    out = {}
    for p in paths:
        source, mine = state[keys[p]], pattern(flat[p])
        perm = next(
            (
                perm
                for perm in itertools.permutations(range(mine.ndim))
                if np.transpose(mine, perm).shape == source.shape
                and np.array_equal(np.transpose(mine, perm), source)
            ),
            None,
        )
        if perm is None:
            raise ValueError(f"{p!r} is exported as {keys[p]} in a layout that is no transpose.")
        out[p] = (keys[p], tuple(perm))
    return out
