"""LoRA on models: adapt a loaded model, merge the adapters back, and the PEFT layout both ways.

:func:`adapt` returns the model with rank-r adapters beside its target kernels (the tree layout
and the math are :mod:`jaxtl.transfer.lora`): the same Flax module, traced with an interceptor
that adds ``scale * (x A) B`` to each adapted layer's output, so the base kernels' gradients
are never formed. The ``lora(r)`` recipe does this inside :func:`jaxtl.finetune`.

:func:`merge` folds the adapters into the kernels and gives back a plain model of the base
family; :func:`jaxtl.export` of an adapted model writes that merged model in the source format.
:func:`export_adapters` writes the adapters alone in Hugging Face PEFT's layout
(``adapter_config.json`` + ``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained``
loads onto the transformers model), and :func:`load_adapters` reads such a directory back.

Example:
  >>> # model = jaxtl.load(path, task="classification", num_labels=2)
  >>> # result = jaxtl.finetune(model, "lora(8)", data)   # adapts, trains adapters + head
  >>> # merged = jaxtl.lora.merge(result.model, result.params)   # a plain model again
  >>> # jaxtl.lora.export_adapters(result.model, "adapter/", result.params)   # PEFT layout
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import safetensors.numpy

from jaxtl import parallel
from jaxtl.distributed import is_primary
from jaxtl.models.base import LoadedModel
from jaxtl.models.common import forward_functions
from jaxtl.transfer import lora as tl
from jaxtl.transfer.lora import LoRA, LoRAError
from jaxtl.transfer.plan import Plan
from jaxtl.transfer.trees import flatten, is_under, unflatten
from jaxtl.weights.exporting import source_names

__all__ = [
    "LoRA",
    "LoRAError",
    "adapt",
    "base_model",
    "export_adapters",
    "is_adapted",
    "load_adapters",
    "merge",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT's task types for jaxtl's text tasks.
_TASK_TYPES = {
    "classification": "SEQ_CLS",
    "regression": "SEQ_CLS",
    "causal_lm": "CAUSAL_LM",
    "token_classification": "TOKEN_CLS",
    "question_answering": "QUESTION_ANS",
}


def is_adapted(model: LoadedModel) -> bool:
    """Whether ``model`` carries LoRA adapters (the result of :func:`adapt`)."""
    return "lora" in model.extras


def _spec(spec: LoRA | Plan) -> LoRA:
    if isinstance(spec, Plan):
        if spec.adapters is None:
            raise ValueError(f"plan {spec.name!r} trains no LoRA adapters.")
        return spec.adapters
    if not isinstance(spec, LoRA):
        raise TypeError(f"expected jaxtl.lora.LoRA options or a LoRA Plan, got {spec!r}.")
    return spec


def _wrap(forward: Any, spec: LoRA, has_batch_stats: bool):
    """``(apply, forward)`` of the adapted model around a base ``forward``."""

    def run(params, batch_stats, inputs, train, rng, bn_train):
        adapters = tl.adapter_modules(params)
        hook = tl.interceptor(adapters, spec, train=train, rng=rng)
        with nn.intercept_methods(hook):
            out = forward.run(tl.base_params(params), batch_stats, inputs, train, rng, bn_train)
        unused = sorted(set(adapters) - hook.seen)
        if unused:
            raise LoRAError(
                f"lora: the adapters on {unused} were never applied: those kernels are not used "
                "through their layer's call (e.g. a tied embedding). Leave them out of targets."
            )
        return out

    apply, wrapped = forward_functions(run, forward.select, has_batch_stats)
    wrapped.rebuild = lambda module: _wrap(forward.rebuild(module)[1], spec, has_batch_stats)
    return apply, wrapped


def adapt(model: LoadedModel, spec: LoRA | Plan, *, seed: int = 0) -> LoadedModel:
    """``model`` with LoRA adapters on its target kernels: new params ``.../lora_a`` (drawn from
    ``seed``) and ``.../lora_b`` (zero, so its outputs equal the base model's until it trains).

    Args:
      model: from :func:`jaxtl.load`.
      spec: the LoRA options, or a plan from the ``lora(...)`` recipe (its ``adapters``).
      seed: seeds ``lora_a``'s initial values.

    Raises:
      LoRAError: bad rank, targets that match no kernel, or a model already adapted.
    """
    spec = _spec(spec).resolve(model.structure)
    if is_adapted(model):
        raise LoRAError("lora: this model is already adapted; adapt the base model once.")
    params = tl.add_adapters(model.params, spec, seed)
    apply, forward = _wrap(model.forward, spec, bool(model.batch_stats))
    export_fn = None
    if model.export_fn is not None:
        base_export = model.export_fn
        export_fn = lambda p, stats: base_export(tl.merged(p, spec), stats)  # noqa: E731
    return dataclasses.replace(
        model,
        params=params,
        apply=apply,
        forward=forward,
        export_fn=export_fn,
        extras={**model.extras, "lora": spec, "lora_base": model},
    )


def base_model(model: LoadedModel) -> LoadedModel:
    """The model :func:`adapt` started from (its own params, no adapters)."""
    if not is_adapted(model):
        raise ValueError("this model has no LoRA adapters (jaxtl.lora.adapt gives one).")
    return model.extras["lora_base"]


def merge(model: LoadedModel, params: Mapping[str, Any] | None = None) -> LoadedModel:
    """The base family's model with ``W + alpha / rank * B A`` folded into each adapted kernel:
    no adapters, the plain forward, the same outputs as the adapted model (float tolerance).

    Args:
      model: an adapted model (:func:`adapt`).
      params: the adapted params to merge, e.g. ``result.params``; default the model's own.
    """
    spec = model.extras.get("lora") if is_adapted(model) else None
    if spec is None:
        raise ValueError("merge needs an adapted model (jaxtl.lora.adapt, or a lora(r) run's).")
    params = model.own_params("jaxtl.lora.merge", takes_params=True) if params is None else params
    if set(flatten(params)) != set(flatten(model.params)):
        raise ValueError("params do not match the adapted model's tree (names differ).")
    return dataclasses.replace(base_model(model), params=tl.merged(params, spec))


# ----------------------------------------------------------------------------- PEFT layout


def _layout(model: LoadedModel, modules: list[str]) -> tuple[dict, dict]:
    """``(kernels, head)``: for each adapted module ``(source module name, base layer kind)``
    and for each head leaf ``(source key, perm)``, from the family's exporter."""
    base = base_model(model)
    head = [p for p in flatten(base.params) if any(is_under(p, h) for h in base.structure.head)]
    kernels = [f"{m}/kernel" for m in modules]
    names = source_names(base, kernels + head)
    rename = _in_memory(base)
    out = {}
    for module, kernel in zip(modules, kernels, strict=True):
        key, perm = names[kernel]
        if not key.endswith(".weight"):
            raise LoRAError(f"lora: {kernel!r} is exported as {key!r}, not a layer's .weight.")
        ndim = len(perm)
        kind = "conv" if ndim == 4 else ("conv1d" if perm == (0, 1) else "linear")
        out[module] = (rename(key.removesuffix(".weight")), kind)
    return out, {p: names[p] for p in head}


def _in_memory(model: LoadedModel):
    """Source module name -> the module's name inside the installed transformers' model, which
    PEFT adapters use (the same for every family but ViT under transformers >= 5)."""
    return model.extras.get("in_memory_name", lambda name: name)


def export_adapters(
    model: LoadedModel,
    out: str | os.PathLike,
    params: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Writes the adapters (and the trained head, as PEFT's ``modules_to_save``) of ``params``
    in Hugging Face PEFT's layout: ``OUT/adapter_config.json`` + ``adapter_model.safetensors``.
    ``peft.PeftModel.from_pretrained(<the transformers base model>, OUT)`` then gives the
    adapted model's outputs.

    Params sharded over a mesh are gathered first; in a multi-process run call this on every
    process, and process 0 writes.

    Raises:
      ValueError: ``model`` is not adapted, or its family cannot export.
      FileExistsError: ``OUT`` already holds an adapter and ``overwrite`` is False.
    """
    spec = model.extras.get("lora")
    if spec is None:
        raise ValueError(
            "export_adapters needs an adapted model: the adapters of a lora(r) run "
            "(jaxtl export RUN_DIR OUT --adapters), or jaxtl.lora.adapt(model, ...)."
        )
    out = os.path.abspath(os.fspath(out))
    target = os.path.join(out, WEIGHTS_FILE)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it.")
    params = model.own_params("export_adapters", takes_params=True) if params is None else params
    params = parallel.to_host(params)
    adapters = tl.adapter_modules(params)
    layout, head = _layout(model, list(adapters))
    kinds = {kind for _, kind in layout.values()}
    if len(kinds & {"conv1d", "linear"}) > 1:
        raise LoRAError(
            "lora: the targets mix transformers Conv1D and Linear layers, which one PEFT config "
            "(fan_in_fan_out) cannot describe; target one kind."
        )
    tensors: dict[str, np.ndarray] = {}
    for module, ad in adapters.items():
        name, kind = layout[module]
        a, b = np.asarray(ad[tl.LORA_A], np.float32), np.asarray(ad[tl.LORA_B], np.float32)
        if kind == "conv":  # lora_A: Conv2d(in, r, k) (r, in, kh, kw); lora_B: 1x1 (out, r, 1, 1)
            a, b = a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
        else:  # Linear(in, r) and Linear(r, out): (r, in), (out, r)
            a, b = a.T, b.T
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b
    flat = flatten(params)
    for path, (key, perm) in head.items():
        tensors[_PREFIX + key] = np.transpose(np.asarray(flat[path], np.float32), perm)
    base = base_model(model)
    config = {
        "peft_type": "LORA",
        # PEFT's task types are for text models; an image model's head is a plain module to
        # save (SEQ_CLS would also wrap the whole ``classifier`` of e.g. ResNet).
        "task_type": None if "preprocessing" in model.extras else _TASK_TYPES.get(model.task),
        "r": spec.rank,
        "lora_alpha": spec.rank if spec.alpha is None else spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(name for name, _ in layout.values()),
        "modules_to_save": sorted({key.rpartition(".")[0] for key, _ in head.values()}) or None,
        "fan_in_fan_out": "conv1d" in kinds,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base.path,
    }
    if not is_primary():
        return out
    os.makedirs(out, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    safetensors.numpy.save_file(tensors, target, metadata={"format": "pt"})
    with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return out


def _read_peft(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist: a PEFT LoRA adapter directory holds {CONFIG_FILE} and "
                f"{WEIGHTS_FILE} (peft's save_pretrained, or jaxtl export --adapters)."
            )
    with open(config_path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise LoRAError(f"{config_path} is not JSON: {e}.") from None
    if config.get("peft_type") != "LORA":
        raise LoRAError(f"{config_path}: peft_type is {config.get('peft_type')!r}, not 'LORA'.")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "use_rslora": bool(config.get("use_rslora")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "bias": config.get("bias", "none") != "none",
    }
    used = [k for k, v in unsupported.items() if v]
    if used:
        raise LoRAError(
            f"{config_path} uses {used}, which jaxtl's LoRA does not implement (plain LoRA: one "
            "rank and alpha, no DoRA, no rsLoRA scaling, no trained biases)."
        )
    return config, safetensors.numpy.load_file(weights_path)


def load_adapters(model: LoadedModel, directory: str | os.PathLike) -> LoadedModel:
    """``model`` (the base, from :func:`jaxtl.load`) adapted with a PEFT LoRA adapter directory:
    the adapters from ``adapter_model.safetensors`` and its saved head (``modules_to_save``)
    in place of the model's, under the directory's rank, alpha and dropout.

    Raises:
      FileNotFoundError: the directory lacks ``adapter_config.json`` or the weights.
      LoRAError: the adapter was made for another base model: a key names no layer of this
        model, or a shape differs (the message names the key and both shapes).
    """
    directory = os.fspath(directory)
    config, tensors = _read_peft(directory)
    where = os.path.join(directory, WEIGHTS_FILE)
    kernels = tl.kernels(model.params)
    head_paths = [
        p for p in flatten(model.params) if any(is_under(p, h) for h in model.structure.head)
    ]
    names = source_names(model, [f"{m}/kernel" for m in kernels] + head_paths)
    rename = _in_memory(model)
    by_name = {}
    for m in kernels:  # adapters saved under either name (made with transformers 4 or 5)
        saved = names[f"{m}/kernel"][0].removesuffix(".weight")
        by_name[saved] = by_name[rename(saved)] = m
    head_by_key = {names[p][0]: p for p in head_paths}
    adapters: dict[str, dict[str, np.ndarray]] = {}
    head: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        name = key.removeprefix(_PREFIX)
        for part in (".lora_A.weight", ".lora_B.weight"):
            if name.endswith(part):
                module_name = name.removesuffix(part)
                module = by_name.get(module_name)
                if module is None:
                    raise LoRAError(
                        f"{where}: {key} adapts {module_name!r}, which is no Dense or "
                        f"convolution layer of this {model.family} model: the adapter was made "
                        "for another base model."
                    )
                adapters.setdefault(module, {})[part[1:7]] = value
                break
        else:
            # A saved head (modules_to_save): plain names, or older peft's wrapper names.
            name = name.replace(".modules_to_save.default", "").replace(".modules_to_save", "")
            path = head_by_key.get(name)
            if path is None:
                raise LoRAError(
                    f"{where}: {key} is neither a LoRA weight nor a saved head param of this "
                    f"{model.family} model (its head: {sorted(head_by_key)})."
                )
            head[path] = value
    if not adapters:
        raise LoRAError(f"{where} holds no lora_A / lora_B weights.")
    ranks = {v.shape[0] for ad in adapters.values() for k, v in ad.items() if k == "lora_A"}
    rank = int(config.get("r", next(iter(ranks))))
    spec = LoRA(
        rank,
        float(config.get("lora_alpha", rank)),
        tuple(re.escape(m) for m in adapters),  # exactly the adapted layers
        float(config.get("lora_dropout") or 0.0),
    )
    adapted = adapt(model, spec)
    flat = dict(flatten(adapted.params))
    for module, ad in adapters.items():
        if set(ad) != {"lora_A", "lora_B"}:
            raise LoRAError(f"{where}: {module!r} has {sorted(ad)} but needs lora_A and lora_B.")
        shape = kernels[module]
        a, b = ad["lora_A"], ad["lora_B"]
        if len(shape) == 4:
            a = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a
            b = b.reshape(b.shape[0], b.shape[1]).T if b.ndim == 4 else b
        else:
            a, b = a.T, b.T
        for leaf, value in ((tl.LORA_A, a), (tl.LORA_B, b)):
            want = tuple(np.shape(flat[f"{module}/{leaf}"]))
            if tuple(value.shape) != want:
                raise LoRAError(
                    f"{where}: {module!r} {leaf} has shape {tuple(value.shape)} in jaxtl's layout "
                    f"but this model needs {want} (kernel {shape}, rank {rank}): the adapter was "
                    "made for another base model or rank."
                )
            flat[f"{module}/{leaf}"] = jax.numpy.asarray(value, np.float32)
    for path, value in head.items():
        key, perm = names[path]
        value = np.transpose(value, np.argsort(perm))
        want = tuple(np.shape(flat[path]))
        if tuple(value.shape) != want:
            raise LoRAError(
                f"{where}: {key} has shape {tuple(value.shape)} in jaxtl's layout but this "
                f"model's {path} is {want}: load the model with the adapter's head size "
                "(num_labels=...)."
            )
        flat[path] = jax.numpy.asarray(value, flat[path].dtype)
    return dataclasses.replace(adapted, params=unflatten(flat))
