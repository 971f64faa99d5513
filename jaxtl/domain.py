"""Domain adaptation beyond AdaBN, from unlabeled target data: DANN, Deep CORAL and Tent.

The source domain has labels; the target domain (the data the model will see) has none.

- **Deep CORAL** (Sun & Saenko 2016): while the recipe trains on labeled source batches, a
  penalty ``weight * ||C_s - C_t||_F^2 / (4 d^2)`` pulls the covariance of the head's input
  features on a target batch toward the source batch's.
- **DANN** (Ganin et al. 2016): a domain classifier (a small MLP) learns to tell source
  features from target features, and its gradient reaches the model through a gradient reversal
  layer, so the features learn to make the domains indistinguishable. The reversal's scale
  ramps up as ``weight * (2 / (1 + exp(-10 p)) - 1)`` with training progress ``p``.
- **Tent** (Wang et al. 2021): after training, on the target data alone, minimize the entropy
  of the model's predictions by training only the BatchNorm scales and biases, with every
  BatchNorm layer normalizing with the target batch's statistics.
- **AdaBN** (:func:`jaxtl.adapt_batch_norm`) re-estimates the BatchNorm statistics.

:func:`adapt` trains a recipe on pairs of source and target batches, each pair concatenated
into one forward pass (so BatchNorm layers that train see both domains, as in the reference
implementations); ``method="source_only"`` is the same run without the adaptation term, the
baseline. Target labels are never read. A model with training BatchNorm layers gets exact
statistics of its final weights on the data it trained on (see :func:`_exact_statistics`).

Both :func:`adapt` and :func:`tent` run in the :class:`~jaxtl.train.Trainer`, with its plan,
optimizer and compiled step, so they take its mesh, precision, gradient accumulation,
checkpoints and exact resume: :class:`PairedLoader` feeds the paired batches (target rows
weighted out of the task loss), and the model's training forward adds the adaptation term to
the objective (:class:`jaxtl.train.losses.WithAux`, computed from the head's input features).
DANN's domain classifier is a param subtree (``domain_classifier``) in its own plan group: the
recipe's optimizer and schedule at ``discriminator_lr`` (tllib likewise trains it in the
model's optimizer and schedule), no weight decay, and outside the recipe's global-norm clipping
(``Group(clip=False)``: the adversary's gradients neither count in the model's norm nor are
scaled by it). Tent is a
plan of one trained group (the BatchNorm scales and biases) whose objective is the entropy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl import parallel
from jaxtl.data import images, sources
from jaxtl.data.loader import ArrayLoader, check_same_data
from jaxtl.data.text import token_arrays
from jaxtl.feature_cache import forward_with_input
from jaxtl.models.base import LoadedModel
from jaxtl.models.common import batch_norm_paths
from jaxtl.train import OptimConfig, TrainConfig, Trainer
from jaxtl.train.losses import WithAux
from jaxtl.transfer.plan import Group, Plan
from jaxtl.transfer.recipes import make_plan

__all__ = [
    "COMPARED",
    "METHODS",
    "Adapted",
    "DomainClassifier",
    "PairedLoader",
    "accuracy",
    "adapt",
    "adaptation_model",
    "check_methods",
    "compare",
    "coral_loss",
    "reverse_gradient",
    "table",
    "tent",
    "unlabeled",
    "write",
]

METHODS = ("source_only", "coral", "dann")
DISCRIMINATOR = "domain_classifier"  # where DANN's domain classifier sits in the params


def coral_loss(source: jax.Array, target: jax.Array) -> jax.Array:
    """Deep CORAL's loss: ``||C_s - C_t||_F^2 / (4 d^2)`` between the feature covariances
    (unbiased, ``n - 1``) of a source and a target batch ``[n, d]``."""
    rows = jnp.concatenate([jnp.ones(source.shape[0]), jnp.zeros(target.shape[0])])
    return _coral(jnp.concatenate([source, target]), rows)


def _coral(features: jax.Array, is_source: jax.Array) -> jax.Array:
    """:func:`coral_loss` between the rows of ``features [n, d]`` where ``is_source`` is 1 and
    those where it is 0, wherever they sit (a microbatch of gradient accumulation interleaves
    them)."""

    def covariance(w):
        n = jnp.sum(w)
        centred = features - (w @ features) / n
        return (centred * w[:, None]).T @ centred / (n - 1)

    d = features.shape[1]
    return jnp.sum((covariance(is_source) - covariance(1.0 - is_source)) ** 2) / (4.0 * d * d)


@jax.custom_vjp
def reverse_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
    """The identity forward; the gradient multiplied by ``-scale`` backward (DANN's gradient
    reversal layer)."""
    return x


def _reverse_fwd(x, scale):
    return x, scale


def _reverse_bwd(scale, g):
    return -scale * g, jnp.zeros_like(scale)


reverse_gradient.defvjp(_reverse_fwd, _reverse_bwd)


class DomainClassifier(nn.Module):
    """DANN's discriminator: features -> one logit (source 1, target 0)."""

    hidden: int = 256

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)[:, 0]


@dataclasses.dataclass
class Adapted:
    """What :func:`adapt` returns.

    Attributes:
      params, batch_stats: the trained model's (without DANN's domain classifier).
      method: ``"source_only"``, ``"coral"`` or ``"dann"``.
      history: per logged train record of this call (the means over ``config.log_every``
        steps; a resumed run's earlier records are in ``workdir/metrics.jsonl``),
        ``{"step", "loss", "task_loss", "adaptation_loss"}``.
      seconds: wall time of the training.
    """

    params: Any
    batch_stats: Any
    method: str
    history: list[dict]
    seconds: float


def unlabeled(model: LoadedModel, data, what: str = "target") -> dict[str, np.ndarray]:
    """The model's inputs for ``data``'s train split, without labels (what adaptation reads).

    Raises:
      ValueError: ``data`` is None or its train split has fewer than 2 examples.
    """
    return {k: v for k, v in _inputs(model, data, what)["train"].items() if k != "label"}


def _inputs(model: LoadedModel, data, what: str) -> dict[str, dict[str, np.ndarray]]:
    from jaxtl.encoding import encode_splits

    if data is None:
        raise ValueError(
            f"{what} is missing: domain adaptation needs unlabeled target-domain inputs (the "
            "train split of target= is read, its labels never); for no adaptation use "
            "method='source_only' with target= still given, or plain jaxtl.finetune."
        )
    arrays, _ = encode_splits(model, data)
    if len(next(iter(arrays["train"].values()))) < 2:
        raise ValueError(f"{what}: the train split needs at least 2 examples.")
    return arrays


def _same_width(a: dict, b: dict) -> tuple[dict, dict]:
    """Text arrays of two encodings padded (with 0, masked) to the longer one's width."""
    keys = token_arrays(a)
    if not keys:
        return a, b
    width = max(a["attention_mask"].shape[1], b["attention_mask"].shape[1])

    def pad(x):
        return {k: np.pad(v, [(0, 0), (0, width - v.shape[1])]) if k in keys else v
                for k, v in x.items()}  # fmt: skip

    return pad(a), pad(b)


class PairedLoader:
    """Each labeled source batch with an unlabeled target batch, as one batch for the
    :class:`~jaxtl.train.Trainer`: the source rows first (``weight`` 1, ``domain`` 1), then the
    target rows (``weight`` 0, so no task loss or accuracy reads their placeholder ``label`` 0;
    ``domain`` 0), and every row's ``progress`` (global step / total steps, DANN's ramp).

    The target split cycles at its own pace: global step ``s`` takes target batch
    ``s mod T`` of target epoch ``s // T`` (``T`` its batches per epoch), so a resumed run pairs
    the same batches as an uninterrupted one.
    """

    process_local = False

    def __init__(self, source: ArrayLoader, target: ArrayLoader, total_steps: int):
        self.source, self.target, self.total = source, target, total_steps
        self.num_examples = source.num_examples
        self.batch_size = source.batch_size + target.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.source.steps_per_epoch

    def _targets(self, step: int) -> Iterator[dict[str, np.ndarray]]:
        epoch, start = divmod(step, self.target.steps_per_epoch)
        while True:
            yield from self.target.epoch(epoch, start)
            epoch, start = epoch + 1, 0

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        step = epoch * self.steps_per_epoch + start
        targets = self._targets(step)
        for i, batch_s in enumerate(self.source.epoch(epoch, start)):
            batch_t = next(targets)
            n_s, n_t = len(batch_s["label"]), len(next(iter(batch_t.values())))
            batch = {k: np.concatenate([batch_s[k], batch_t[k]]) for k in batch_t}
            label = batch_s["label"]
            batch["label"] = np.concatenate([label, np.zeros((n_t, *label.shape[1:]), label.dtype)])
            batch["weight"] = np.repeat(np.float32([1, 0]), [n_s, n_t])
            # Equal to weight here, but a separate column: weight says what the task loss
            # counts, domain which domain a row came from (CORAL and DANN read only this).
            batch["domain"] = batch["weight"].copy()
            progress = (step + i) / max(self.total, 1)
            batch["progress"] = np.full(n_s + n_t, progress, np.float32)
            yield batch

    def examples(self, n: int) -> dict[str, np.ndarray]:
        return self.source.examples(n)

    def state(self) -> dict[str, Any]:
        return {"kind": "paired", "source": self.source.state(), "target": self.target.state(),
                "total_steps": self.total}  # fmt: skip

    def check_state(self, saved: Mapping[str, Any] | None) -> None:
        check_same_data(saved, self.state())

    def padding_waste(self, epoch: int = 0) -> float | None:
        return self.source.padding_waste(epoch)


def adaptation_model(model: LoadedModel, method: str, weight: float) -> LoadedModel:
    """``model`` whose training forward, on a :class:`PairedLoader` batch, returns its outputs
    with the ``method``'s adaptation term (:class:`jaxtl.train.losses.WithAux`), computed from
    the head's input features; DANN's domain classifier reads ``params["domain_classifier"]``.
    Evaluation (and any batch without ``domain``) gets the plain outputs."""
    head = model.structure.head[0]
    disc = DomainClassifier()

    def wrap(base: LoadedModel):
        capture = forward_with_input(base, head)

        def forward(params, batch_stats, batch, *, train=False, rng=None, bn_train=()):
            own = {k: v for k, v in params.items() if k != DISCRIMINATOR}
            (outputs, stats), feats = capture(own, batch_stats, batch, train=train, rng=rng,
                                              bn_train=bn_train)  # fmt: skip
            if not train or "domain" not in batch:
                return outputs, stats
            feats = feats.reshape(feats.shape[0], -1).astype(jnp.float32)
            is_source = batch["domain"].astype(jnp.float32)
            if method == "coral":
                extra = weight * _coral(feats, is_source)
            elif method == "dann":
                progress = batch["progress"][0]
                scale = weight * (2.0 / (1.0 + jnp.exp(-10.0 * progress)) - 1.0)
                logits = disc.apply({"params": params[DISCRIMINATOR]},
                                    reverse_gradient(feats, scale))  # fmt: skip
                # DANN's weight lives in the reversal: the classifier's loss enters with 1.
                extra = optax.sigmoid_binary_cross_entropy(logits, is_source).mean()
            else:
                extra = jnp.zeros((), jnp.float32)
            return WithAux(outputs, extra), stats

        def rebuild(module):  # --precision / --remat rebuild the backbone underneath
            apply, fwd = base.forward.rebuild(module)
            return apply, wrap(dataclasses.replace(base, module=module, apply=apply, forward=fwd))

        forward.traceable = forward
        if getattr(base.forward, "rebuild", None) is not None:
            forward.rebuild = rebuild
        return forward

    return dataclasses.replace(model, forward=wrap(model))


def adapt(
    model: LoadedModel,
    recipe: str | Plan,
    source: sources.TextSplits | images.ImageSplits,
    target: sources.TextSplits | images.ImageSplits | None,
    *,
    method: str = "coral",
    weight: float = 1.0,
    config: TrainConfig | None = None,
    discriminator_lr: float = 1e-3,
    workdir: str | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    verbose: bool = True,
) -> Adapted:
    """Trains ``recipe`` on labeled ``source`` batches paired with unlabeled ``target`` ones,
    with the ``method``'s adaptation term (see the module docstring), through the
    :class:`~jaxtl.train.Trainer`: its plan and optimizer, mesh, precision, gradient
    accumulation, checkpoints and exact resume, non-finite-step guard and loggers.

    Args:
      model: a classification model from :func:`jaxtl.load`.
      recipe: what trains (``"full"``, ``"last_n(2)"``, ...; not a staged one).
      source: labeled source splits (the train split is trained on).
      target: the target domain's splits; only its train split's inputs are read.
      method: ``"coral"``, ``"dann"`` or ``"source_only"`` (the same loop, no adaptation).
      weight: the adaptation term's weight (CORAL's lambda; DANN's largest reversal scale).
      config: epochs (over the source train split), batch size (per domain), optimizer,
        learning rate and schedule, clipping, weight decay, seed, mesh, precision.
      discriminator_lr: DANN's domain classifier's peak learning rate: it trains in its own
        plan group (the recipe's optimizer and schedule, no weight decay, no clipping).
      workdir: a run directory for ``metrics.jsonl`` and checkpoints; None keeps it in memory.
      resume: continue from ``workdir``'s latest checkpoint.
      stop_at: stop after this global step, checkpointed, as if preempted (``resume`` finishes
        the run exactly).
      verbose: show the Trainer's progress bar.

    Raises:
      ValueError: an unknown method, a negative weight, no target data, a task other than
        classification, a staged recipe, paired batches that do not split over the mesh and
        microbatches (or leave CORAL fewer than 2 rows of a domain), or l2_sp with DANN;
        before anything compiles.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)}.")
    if not weight >= 0:
        raise ValueError(
            f"weight (--weight) = {weight!r} must be >= 0: the adaptation loss's weight, 0 for "
            "the source-only run."
        )
    if model.task != "classification":
        raise ValueError(
            f"adapt trains a classification head (this model: task={model.task!r}); load it "
            "with task='classification'."
        )
    if not discriminator_lr > 0:
        raise ValueError(f"discriminator_lr={discriminator_lr!r} must be > 0.")
    config = config or TrainConfig()
    plan = make_plan(recipe, model.structure)
    if plan.stages or plan.adapters is not None:
        raise ValueError(f"adapt trains one plain recipe; {plan.name!r} is staged or adds LoRA.")
    if method == "dann" and config.optim.l2_sp is not None:
        raise ValueError(
            "l2_sp (--l2-sp) pulls every trained param toward its starting value, and DANN's "
            "domain classifier starts random; train DANN without l2_sp, or use coral."
        )
    src = _inputs(model, source, "source")["train"]
    tgt = unlabeled(model, target)
    src, tgt = _same_width(src, tgt)
    bs = config.data.batch_size
    source_loader = ArrayLoader(src, bs, shuffle=True, seed=config.seed, drop_last=True)
    target_loader = ArrayLoader(tgt, min(bs, len(next(iter(tgt.values())))), shuffle=True,
                                seed=config.seed + 1, drop_last=True)  # fmt: skip
    loader = PairedLoader(source_loader, target_loader,
                          config.total_steps(source_loader.steps_per_epoch))  # fmt: skip
    adapted = adaptation_model(model, method, weight)
    if method == "dann":
        forward = forward_with_input(model, model.structure.head[0])
        shape = jax.eval_shape(lambda p, b: forward(p, model.batch_stats, b)[1], model.params,
                               {k: v[:2] for k, v in tgt.items()}).shape  # fmt: skip
        init = DomainClassifier().init(jax.random.fold_in(jax.random.key(config.seed), 1),
                                       jnp.zeros((2, math.prod(shape[1:]))))  # fmt: skip
        adapted = dataclasses.replace(
            adapted, params={**model.params, DISCRIMINATOR: init["params"]}
        )
        group = Group(DISCRIMINATOR, True, lr_mult=discriminator_lr / config.optim.learning_rate,
                      weight_decay=0.0, clip=False)  # fmt: skip
        rules = ((f"{DISCRIMINATOR}/.*", DISCRIMINATOR), *plan.rules)
        plan = dataclasses.replace(plan, rules=rules, groups={**plan.groups, DISCRIMINATOR: group})
    history = _History()
    if not verbose:
        config = dataclasses.replace(config, progress=False)
    trainer = Trainer(adapted, plan, config, workdir, loggers=[history])
    accum = config.scale.grad_accum
    what = (f"adapt's paired batch ({source_loader.batch_size} source + "
            f"{target_loader.batch_size} target rows; batch_size, --batch-size)")  # fmt: skip
    parallel.check_batch_size(loader.batch_size, trainer.mesh, what=what, grad_accum=accum)
    if method == "coral" and min(source_loader.batch_size, target_loader.batch_size) < 2 * accum:
        raise ValueError(
            f"coral compares covariances of at least 2 source and 2 target rows per microbatch; "
            f"{what} over grad_accum (--grad-accum) = {accum} microbatches gives fewer. Raise "
            "batch_size or lower grad_accum."
        )
    result = trainer.fit(loader, resume=resume, stop_at=stop_at)
    params = {k: v for k, v in result.state.params.items() if k != DISCRIMINATOR}
    stats = result.state.batch_stats
    if trainer.bn_train(plan) and result.steps >= loader.total:
        stats = _exact_statistics(model, params, stats, source_loader, target_loader, method)
    return Adapted(params, stats, method, history.records, result.train_seconds)


class _History:
    """A logger that keeps :func:`adapt`'s train records (task and adaptation losses)."""

    def __init__(self):
        self.records: list[dict] = []

    def write(self, record: Mapping[str, Any]) -> None:
        if record.get("split") != "train" or record.get("loss") is None:
            return
        aux = record.get("aux_loss", 0.0)
        loss = record["loss"]
        self.records.append(
            {"step": record["step"], "loss": loss, "task_loss": loss - aux, "adaptation_loss": aux}
        )

    def close(self) -> None:
        pass


def _exact_statistics(model, params, stats, source_loader, target_loader, method: str):
    """BatchNorm statistics of the trained weights over one pass of the batches they trained
    on: the source's alone for ``source_only``, source and target concatenated otherwise.
    (Running averages with EfficientNet's momentum 0.01 lag a few hundred steps of training
    far behind the weights, and would blur every comparison; AdaBN then swaps in the target's.)
    """
    from jaxtl.adabn import adapt_batch_norm

    def batches():
        targets = target_loader.epoch(0)
        for batch_s in source_loader.epoch(0):
            batch_s = {k: v for k, v in batch_s.items() if k != "label"}
            batch_t = next(targets, None) if method != "source_only" else None
            if batch_t is None:
                yield batch_s
            else:
                yield {k: np.concatenate([batch_s[k], batch_t[k]]) for k in batch_t}

    return adapt_batch_norm(model, batches(), params=params, batch_stats=stats)


def _entropy_model(model: LoadedModel) -> LoadedModel:
    """``model`` whose training forward returns its outputs with the mean entropy of their
    softmax as the objective (:class:`~jaxtl.train.losses.WithAux`; Tent's batches have no
    labels, so it is the whole loss)."""
    base = model.forward.traceable

    def forward(params, batch_stats, batch, *, train=False, rng=None, bn_train=()):
        logits, stats = base(params, batch_stats, batch, train=train, rng=rng, bn_train=bn_train)
        if not train:
            return logits, stats
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return WithAux(logits, -(jnp.exp(logp) * logp).sum(-1).mean()), stats

    forward.traceable = forward
    return dataclasses.replace(model, forward=forward)


def tent(
    model: LoadedModel,
    target: sources.TextSplits | images.ImageSplits | None,
    *,
    params: Any = None,
    batch_stats: Any = None,
    epochs: int = 1,
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    workdir: str | None = None,
) -> tuple[Any, Any]:
    """Tent: minimize the entropy of the predictions on the target train split's inputs,
    training only the BatchNorm scales and biases (Adam, constant ``learning_rate``, no weight
    decay or clipping), every BatchNorm layer normalizing with the batch's statistics; through
    the :class:`~jaxtl.train.Trainer` (a plan of one trained group, ``tent``). Returns
    ``(params, batch_stats)``: the adapted params, and the BatchNorm statistics of the target
    data under them (:func:`jaxtl.adapt_batch_norm`), so that inference mode uses the target's
    statistics, as Tent's batch-statistics mode does.

    Raises:
      ValueError: no target data, or a model without BatchNorm.
    """
    from jaxtl.adabn import adapt_batch_norm

    params = model.params if params is None else params
    batch_stats = model.batch_stats if batch_stats is None else batch_stats
    layers = batch_norm_paths(batch_stats)
    if not layers:
        raise ValueError(
            f"tent trains BatchNorm scales and biases; the {model.family!r} model has none."
        )
    tgt = unlabeled(model, target)
    affine = "|".join(re.escape(p) for p in layers)
    plan = Plan(rules=((f"({affine})/(scale|bias)", "tent"), (".*", "frozen")),
                groups=[Group("tent", True), Group("frozen", False)], name="tent")  # fmt: skip
    n = len(next(iter(tgt.values())))
    shards = parallel.batch_shards(parallel.make_mesh())  # batches split over every device
    if n < shards:
        raise ValueError(f"tent: the target's {n} train examples do not fill {shards} devices.")
    batch = min(batch_size, n) // shards * shards
    loader = ArrayLoader(tgt, batch, shuffle=True, seed=seed, drop_last=True)
    config = TrainConfig(
        epochs=epochs, batch_size=loader.batch_size, seed=seed, progress=False,
        optim=OptimConfig(optimizer="adam", learning_rate=learning_rate, schedule="constant",
                          weight_decay=0.0, clip_norm=None),
    )  # fmt: skip
    entropy = _entropy_model(dataclasses.replace(model, params=params, batch_stats=batch_stats))
    state = Trainer(entropy, plan, config, workdir).fit(loader).state
    stats = adapt_batch_norm(
        model, loader.epoch(0), params=state.params, batch_stats=state.batch_stats
    )
    return state.params, stats


def accuracy(model: LoadedModel, params, batch_stats, data, split: str = "test") -> float:
    """Accuracy of ``(params, batch_stats)`` on ``data``'s ``split`` (inference mode)."""
    from jaxtl.encoding import encode_splits

    arrays, _ = encode_splits(model, data)
    arrays = arrays[split]
    labels = arrays.pop("label")
    right = 0
    for start in range(0, len(labels), 256):
        batch = {k: v[start : start + 256] for k, v in arrays.items()}
        logits, _ = model.forward(params, batch_stats, batch)
        right += int((np.asarray(logits).argmax(-1) == labels[start : start + 256]).sum())
    return right / len(labels)


# What jaxtl adapt compares: trained methods, and those applied to the source-only model.
COMPARED = ("source_only", "adabn", "tent", "coral", "dann")


def check_methods(methods) -> None:
    """Raises ValueError for an empty list or a name outside :data:`COMPARED` (``--methods``)."""
    unknown = [m for m in methods if m not in COMPARED]
    if unknown or not methods:
        raise ValueError(f"methods={list(methods)} (--methods): choose from {', '.join(COMPARED)}.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods={list(methods)} (--methods) names a method more than once.")


def compare(
    load_model,
    source,
    target,
    methods=COMPARED,
    *,
    recipe: str = "full",
    config: TrainConfig | None = None,
    weight: float = 1.0,
    workdir: str | None = None,
    resume: bool = False,
) -> list[dict]:
    """Each of ``methods`` (:data:`COMPARED`) from a fresh ``load_model()``: source and target
    test accuracy and seconds. ``adabn`` and ``tent`` start from the ``source_only`` model.
    With ``workdir``, each trained method runs in ``workdir/<method>`` (its ``metrics.jsonl``,
    checkpoints and loggers), and ``resume`` continues each from its latest checkpoint (a
    finished one is read back, not trained again).

    Raises:
      ValueError: an unknown method, or adabn / tent for a model without BatchNorm.
    """
    from jaxtl.adabn import adapt_batch_norm

    check_methods(methods)
    config = config or TrainConfig()
    model = load_model()
    if {"adabn", "tent"} & set(methods) and not model.batch_stats:
        raise ValueError(
            f"methods adabn and tent (--methods) adapt BatchNorm; the {model.family!r} model "
            "has none: compare the others, e.g. methods=['source_only', 'coral', 'dann'] "
            "(--methods source_only,coral,dann)."
        )
    needed = set(methods) | ({"source_only"} if {"adabn", "tent"} & set(methods) else set())
    found = {}
    for method in [m for m in METHODS if m in needed]:
        run_dir = None if workdir is None else os.path.join(workdir, method)
        resumed = resume and _started(run_dir)
        done = adapt(load_model(), recipe, source, target, method=method, weight=weight,
                     config=config, workdir=run_dir, resume=resumed)  # fmt: skip
        found[method] = (done.params, done.batch_stats, done.seconds)
    if "source_only" in found:
        params, stats, _ = found["source_only"]
        if "adabn" in methods:
            t0 = time.perf_counter()
            x = unlabeled(model, target)["pixel_values"]
            new = adapt_batch_norm(model, x, params=params, batch_stats=stats)
            found["adabn"] = (params, new, time.perf_counter() - t0)
        if "tent" in methods:
            t0 = time.perf_counter()
            p, st = tent(model, target, params=params, batch_stats=stats, seed=config.seed)
            found["tent"] = (p, st, time.perf_counter() - t0)
    rows = []
    for method in methods:
        params, stats, seconds = found[method]
        rows.append(
            {
                "method": method,
                "source_test_accuracy": accuracy(model, params, stats, source),
                "target_test_accuracy": accuracy(model, params, stats, target),
                "seconds": round(seconds, 1),
            }
        )
    return rows


def _started(run_dir: str | None) -> bool:
    return run_dir is not None and os.path.isdir(os.path.join(run_dir, "checkpoints"))


def table(rows: list[dict]) -> str:
    """:func:`compare`'s rows as a table."""
    from jaxtl.report import format_table

    return format_table(
        ["method", "source test accuracy", "target test accuracy", "seconds"],
        [[r["method"], f"{100 * r['source_test_accuracy']:.2f}%",
          f"{100 * r['target_test_accuracy']:.2f}%", r["seconds"]] for r in rows],
    )  # fmt: skip


def write(rows: list[dict], out: str, source: str, target: str, facts: dict) -> tuple[str, str]:
    """``OUT/adapt.json`` and ``OUT/adapt.png`` (source and target accuracy per method)."""
    import json

    from jaxtl.report import _pyplot, save_figure

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "adapt.json")
    with open(path, "w") as f:
        json.dump({"source": source, "target": target, **facts, "methods": rows}, f, indent=2)
    fig, ax = _pyplot().subplots(figsize=(1.3 * len(rows) + 3, 4))
    for i, key in enumerate(("source_test_accuracy", "target_test_accuracy")):
        ax.bar(np.arange(len(rows)) + 0.4 * i - 0.2, [r[key] for r in rows], 0.4,
               label=key.split("_")[0])  # fmt: skip
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows])
    ax.set(ylabel="test accuracy", title=f"Domain adaptation: {source} -> {target}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return path, save_figure(fig, os.path.join(out, "adapt.png"))
