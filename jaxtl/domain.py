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

:func:`adapt` trains a recipe (the plan's optimizer: frozen groups, LR multipliers, clipping,
weight decay, the LR schedule) on pairs of source and target batches, each pair concatenated
into one forward pass (so BatchNorm layers that train see both domains, as in the reference
implementations); ``method="source_only"`` is the same loop without the adaptation term, the
baseline. Target labels are never read. A model with training BatchNorm layers gets exact
statistics of its final weights on the data it trained on (see :func:`_exact_statistics`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl.data import images, sources
from jaxtl.data.loader import ArrayLoader
from jaxtl.data.text import token_arrays
from jaxtl.feature_cache import forward_with_input
from jaxtl.models.base import LoadedModel
from jaxtl.models.common import batch_norm_paths
from jaxtl.train import TrainConfig
from jaxtl.transfer.plan import Plan
from jaxtl.transfer.recipes import make_plan
from jaxtl.transfer.trees import flatten, unflatten

__all__ = [
    "COMPARED",
    "METHODS",
    "Adapted",
    "DomainClassifier",
    "accuracy",
    "adapt",
    "check_methods",
    "compare",
    "coral_loss",
    "reverse_gradient",
    "shift_images",
    "shift_texts",
    "shifted",
    "typo",
    "table",
    "tent",
    "unlabeled",
    "write",
]

METHODS = ("source_only", "coral", "dann")


def coral_loss(source: jax.Array, target: jax.Array) -> jax.Array:
    """Deep CORAL's loss: ``||C_s - C_t||_F^2 / (4 d^2)`` between the feature covariances
    (unbiased, ``n - 1``) of a source and a target batch ``[n, d]``."""

    def covariance(x):
        x = x - x.mean(0, keepdims=True)
        return x.T @ x / (x.shape[0] - 1)

    d = source.shape[1]
    return jnp.sum((covariance(source) - covariance(target)) ** 2) / (4.0 * d * d)


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
      params, batch_stats: the trained model's.
      method: ``"source_only"``, ``"coral"`` or ``"dann"``.
      history: per logged step, ``{"step", "loss", "task_loss", "adaptation_loss"}``.
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
    from jaxtl.run import encode_splits

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
    verbose: bool = True,
) -> Adapted:
    """Trains ``recipe`` on labeled ``source`` batches paired with unlabeled ``target`` ones,
    with the ``method``'s adaptation term (see the module docstring).

    Args:
      model: a classification model from :func:`jaxtl.load`.
      recipe: what trains (``"full"``, ``"last_n(2)"``, ...; not a staged one).
      source: labeled source splits (the train split is trained on).
      target: the target domain's splits; only its train split's inputs are read.
      method: ``"coral"``, ``"dann"`` or ``"source_only"`` (the same loop, no adaptation).
      weight: the adaptation term's weight (CORAL's lambda; DANN's largest reversal scale).
      config: epochs (over the source train split), batch size (per domain), optimizer,
        learning rate and schedule, clipping, weight decay, seed.
      discriminator_lr: DANN's domain classifier's Adam learning rate.
      verbose: print the losses as training goes.

    Raises:
      ValueError: an unknown method, a negative weight, no target data, a task other than
        classification, or a staged recipe; before anything compiles.
    """
    from jaxtl.train.trainer import Trainer

    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)}.")
    if not weight >= 0:
        raise ValueError(f"weight={weight!r} must be >= 0.")
    if model.task != "classification":
        raise ValueError(
            f"adapt trains a classification head (this model: task={model.task!r}); load it "
            "with task='classification'."
        )
    config = config or TrainConfig()
    plan = make_plan(recipe, model.structure)
    if plan.stages or plan.adapters is not None:
        raise ValueError(f"adapt trains one plain recipe; {plan.name!r} is staged or adds LoRA.")
    src = _inputs(model, source, "source")["train"]
    tgt = unlabeled(model, target)
    src, tgt = _same_width(src, tgt)
    bs = config.data.batch_size
    source_loader = ArrayLoader(src, bs, shuffle=True, seed=config.seed, drop_last=True)
    target_loader = ArrayLoader(tgt, min(bs, len(next(iter(tgt.values())))), shuffle=True,
                                seed=config.seed + 1, drop_last=True)  # fmt: skip
    total = config.total_steps(source_loader.steps_per_epoch)
    optim = config.optim
    tx = plan.optimizer(
        config.lr_schedule(total),
        name=optim.optimizer,
        weight_decay=optim.weight_decay,
        clip_norm=optim.clip_norm,
        l2_sp=optim.l2_sp,
        **optim.optimizer_options,
    )
    bn_train = Trainer(model, plan, dataclasses.replace(config, loggers=())).bn_train(plan)
    forward = forward_with_input(model, model.structure.head[0])
    disc = DomainClassifier()
    feature_dim = math.prod(
        jax.eval_shape(
            lambda p, b: forward(p, model.batch_stats, b)[1],
            model.params,
            {k: v[:2] for k, v in tgt.items()},
        ).shape[1:]
    )
    key = jax.random.key(config.seed)
    disc_params = disc.init(jax.random.fold_in(key, 1), jnp.zeros((2, feature_dim)))["params"]
    disc_tx = optax.adam(discriminator_lr)

    def loss_fn(params, dparams, stats, batch_s, batch_t, step):
        n = batch_s["label"].shape[0]
        inputs = {k: jnp.concatenate([batch_s[k], batch_t[k]]) for k in batch_t}
        rng = jax.random.fold_in(key, step)
        (logits, new_stats), feats = forward(
            params, stats, inputs, train=True, rng=rng, bn_train=bn_train
        )
        task = optax.softmax_cross_entropy_with_integer_labels(
            logits[:n].astype(jnp.float32), batch_s["label"]
        ).mean()
        feats = feats.reshape(feats.shape[0], -1).astype(jnp.float32)
        if method == "coral":
            extra = coral_loss(feats[:n], feats[n:])
        elif method == "dann":
            progress = step / max(total, 1)
            scale = weight * (2.0 / (1.0 + jnp.exp(-10.0 * progress)) - 1.0)
            domain_logits = disc.apply({"params": dparams}, reverse_gradient(feats, scale))
            is_source = jnp.concatenate([jnp.ones(n), jnp.zeros(feats.shape[0] - n)])
            extra = optax.sigmoid_binary_cross_entropy(domain_logits, is_source).mean()
        else:
            extra = jnp.zeros(())
        # DANN's scale lives in the reversal: its discriminator loss enters with weight 1.
        total_loss = task + (weight * extra if method == "coral" else extra)
        return total_loss, (new_stats, task, extra)

    @jax.jit
    def train_step(params, opt_state, dparams, dopt_state, stats, batch_s, batch_t, step):
        grads, aux = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(
            params, dparams, stats, batch_s, batch_t, step
        )
        new_stats, task, extra = aux
        updates, opt_state = tx.update(grads[0], opt_state, params)
        params = optax.apply_updates(params, updates)
        dupdates, dopt_state = disc_tx.update(grads[1], dopt_state, dparams)
        dparams = optax.apply_updates(dparams, dupdates)
        return params, opt_state, dparams, dopt_state, new_stats, task, extra

    params, stats = model.params, model.batch_stats
    opt_state, dopt_state = tx.init(params), disc_tx.init(disc_params)
    history, t0, step = [], time.perf_counter(), 0
    target_epoch, target_batches = 0, iter(())
    while step < total:
        for batch_s in source_loader.epoch(step // source_loader.steps_per_epoch):
            batch_t = next(target_batches, None)
            if batch_t is None:  # the target split cycles at its own pace
                target_batches = target_loader.epoch(target_epoch)
                target_epoch += 1
                batch_t = next(target_batches)
            params, opt_state, disc_params, dopt_state, stats, task, extra = train_step(
                params, opt_state, disc_params, dopt_state, stats, batch_s, batch_t,
                jnp.int32(step),
            )  # fmt: skip
            step += 1
            if step % config.log_every == 0 or step == total:
                task, extra = float(task), float(extra)
                if not (math.isfinite(task) and math.isfinite(extra)):
                    raise ValueError(
                        f"adapt ({method}): the loss became non-finite at step {step}; lower "
                        f"the learning rate or weight={weight}."
                    )
                history.append({"step": step, "task_loss": task, "adaptation_loss": extra})
                if verbose:
                    print(f"adapt ({method}) step {step}/{total}: task loss {task:.4f}, "
                          f"adaptation loss {extra:.4f}")  # fmt: skip
            if step >= total:
                break
    if bn_train:
        stats = _exact_statistics(model, params, stats, source_loader, target_loader, method)
    return Adapted(params, stats, method, history, time.perf_counter() - t0)


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
) -> tuple[Any, Any]:
    """Tent: minimize the entropy of the predictions on the target train split's inputs,
    training only the BatchNorm scales and biases (Adam), every BatchNorm layer normalizing
    with the batch's statistics. Returns ``(params, batch_stats)``: the adapted params, and
    the BatchNorm statistics of the target data under them (:func:`jaxtl.adapt_batch_norm`),
    so that inference mode uses the target's statistics, as Tent's batch-statistics mode does.

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
    affine = {f"{p}/{leaf}" for p in layers for leaf in ("scale", "bias")}
    labels = unflatten({p: "bn" if p in affine else "frozen" for p in flatten(params)})
    tx = optax.partition({"bn": optax.adam(learning_rate), "frozen": optax.set_to_zero()}, labels)
    key = jax.random.key(seed)

    def entropy(p, stats, batch, step):
        logits, new_stats = model.forward.traceable(
            p, stats, batch, train=True, rng=jax.random.fold_in(key, step), bn_train=layers
        )
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -(jnp.exp(logp) * logp).sum(-1).mean(), new_stats

    @jax.jit
    def step_fn(p, opt_state, stats, batch, step):
        (_, stats), grads = jax.value_and_grad(entropy, has_aux=True)(p, stats, batch, step)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, stats

    n = len(next(iter(tgt.values())))
    loader = ArrayLoader(tgt, min(batch_size, n), shuffle=True, seed=seed, drop_last=True)
    opt_state, stats, step = tx.init(params), batch_stats, 0
    for epoch in range(epochs):
        for batch in loader.epoch(epoch):
            params, opt_state, stats = step_fn(params, opt_state, stats, batch, jnp.int32(step))
            step += 1
    return params, adapt_batch_norm(model, loader.epoch(0), params=params, batch_stats=stats)


IMAGE_SHIFTS = ("invert", "rotate", "noise")
TEXT_SHIFTS = ("typos",)
SHIFTS = (*IMAGE_SHIFTS, *TEXT_SHIFTS)
# Each key's neighbours on a QWERTY keyboard: the letters a slipped finger types instead.
_KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_EDITS = ("swap", "drop", "double", "neighbour")


def shifted(data, kind: str, seed: int = 0):
    """A built target domain from ``data`` (``--target-shift``): :func:`shift_images` for
    images, :func:`shift_texts` for texts.

    Raises:
      ValueError: a shift that does not apply to this data (the message lists those that do).
    """
    if isinstance(data, images.ImageSplits) and kind in IMAGE_SHIFTS:
        return shift_images(data, kind, seed)
    if isinstance(data, sources.TextSplits) and kind in TEXT_SHIFTS:
        return shift_texts(data, kind, seed)
    images_ = isinstance(data, images.ImageSplits)
    fits = IMAGE_SHIFTS if images_ else TEXT_SHIFTS
    raise ValueError(
        f"shift={kind!r} (--target-shift) does not apply to {data.name!r} "
        f"({'images' if images_ else 'texts'}); choose one of {', '.join(fits)}, or give the "
        "target domain's own data (target= / --target-data)."
    )


def typo(word: str, rng: np.random.Generator) -> str:
    """``word`` with one typing slip, drawn from ``rng``: two neighbouring letters swapped, a
    letter dropped or doubled, or a letter replaced by a keyboard neighbour. Words of fewer
    than three letters are kept (a slip would leave little of them).

    Example:
      >>> [typo("awful", np.random.default_rng(s)) for s in range(4)]
      ['awgul', 'awul', 'aqful', 'aqful']
    """
    if len(word) < 3:
        return word
    edit = _EDITS[int(rng.integers(len(_EDITS)))]
    i = int(rng.integers(1, len(word) - 1))  # an inner letter: the word stays recognisable
    if edit == "swap" and word[i] != word[i + 1]:  # swapping "tt" would change nothing
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if edit in ("drop", "swap"):
        return word[:i] + word[i + 1 :]
    if edit == "double":
        return word[:i] + word[i] + word[i:]
    for row in _KEYBOARD:
        at = row.find(word[i].lower())
        if at >= 0:
            near = [row[j] for j in (at - 1, at + 1) if 0 <= j < len(row)]
            return word[:i] + near[int(rng.integers(len(near)))] + word[i + 1 :]
    return word[:i] + word[i + 1 :]  # not a letter: drop it


def shift_texts(data: sources.TextSplits, kind: str = "typos", seed: int = 0):
    """A built target domain: every word of every text with one typing slip (:func:`typo`),
    labels kept (for scoring only), seeded. The same texts a reader still understands, but
    sub-word pieces the model rarely saw (``"awful"`` -> ``"awfl"``).

    Raises:
      ValueError: an unknown shift, or image data.
    """
    if kind not in TEXT_SHIFTS or not isinstance(data, sources.TextSplits):
        return shifted(data, kind, seed)  # raises, naming the shifts that apply
    rng = np.random.default_rng(seed)

    def apply(texts):
        return [" ".join(typo(w, rng) for w in t.split(" ")) for t in texts]

    splits = {s: (apply(getattr(data, s)[0]), getattr(data, s)[1])
              for s in ("train", "validation", "test")}  # fmt: skip
    return dataclasses.replace(data, **splits, name=f"{data.name}-{kind}")


def shift_images(data: images.ImageSplits, shift: str, seed: int = 0) -> images.ImageSplits:
    """A built target domain: every split's images shifted, labels kept (for scoring only):
    ``"invert"`` (255 - x), ``"rotate"`` (30 degrees, bilinear) or ``"noise"`` (Gaussian, std
    64 on 0..255, clipped) (``--target-shift``).

    Raises:
      ValueError: an unknown shift, or text data.
    """
    from scipy import ndimage

    if shift not in IMAGE_SHIFTS or not isinstance(data, images.ImageSplits):
        return shifted(data, shift, seed)  # raises, naming the shifts that apply
    rng = np.random.default_rng(seed)

    def apply(x):
        x = x.astype(np.float32)
        if shift == "invert":
            x = 255.0 - x
        elif shift == "rotate":
            x = ndimage.rotate(x, 30, axes=(1, 2), reshape=False, order=1)
        else:
            x = x + rng.normal(0, 64, x.shape)
        return np.clip(np.round(x), 0, 255).astype(np.uint8)

    splits = {s: (apply(getattr(data, s)[0]), getattr(data, s)[1])
              for s in ("train", "validation", "test")}  # fmt: skip
    return dataclasses.replace(data, **splits, name=f"{data.name}-{shift}")


def accuracy(model: LoadedModel, params, batch_stats, data, split: str = "test") -> float:
    """Accuracy of ``(params, batch_stats)`` on ``data``'s ``split`` (inference mode)."""
    from jaxtl.run import encode_splits

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


def compare(
    load_model,
    source,
    target,
    methods=COMPARED,
    *,
    recipe: str = "full",
    config: TrainConfig | None = None,
    weight: float = 1.0,
) -> list[dict]:
    """Each of ``methods`` (:data:`COMPARED`) from a fresh ``load_model()``: source and target
    test accuracy and seconds. ``adabn`` and ``tent`` start from the ``source_only`` model.

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
            "has none."
        )
    needed = set(methods) | ({"source_only"} if {"adabn", "tent"} & set(methods) else set())
    found = {}
    for method in [m for m in METHODS if m in needed]:
        done = adapt(load_model(), recipe, source, target, method=method, weight=weight,
                     config=config)  # fmt: skip
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
    import os

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
