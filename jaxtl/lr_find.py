"""The learning-rate range test (Smith 2017; fastai's ``lr_find``): train a copy of the run for a
few hundred steps while the learning rate grows exponentially, record the loss, and suggest the
rate where the loss falls fastest.

Step ``i`` of ``n`` uses ``start_lr * (end_lr / start_lr) ** (i / (n - 1))``, with the run's
optimizer, clipping, weight decay, batch size, data order and recipe (what trains, what is
frozen) otherwise unchanged: the real :func:`jaxtl.train.steps.train_step` on a fresh state
built from the model's params. Nothing is written back: the model's params and any run
directory are left as they were.

The recorded losses are smoothed by an exponential moving average with bias correction
(``beta``, 0.98 as in fastai). The test stops early once the smoothed loss exceeds ``diverge``
times its minimum, or a step's loss is not finite. The suggestion is the "steepest" rule: the
rate with the most negative slope of the smoothed loss against log(lr), between the first
tenth of the steps (where the average is still settling) and the minimum.

The moving average lags about ``1 / (1 - beta)`` steps (50 at 0.98), which over 100 steps and 8
decades is several decades of rate: the steepest point it finds sits late on the curve, so
the suggestion leans high. On a linear probe that is harmless (tests/test_lr_find.py: it lands
among the rates that train best); for full fine-tuning of a transformer, also look at the plot
and at a tenth of the minimum's rate (``min_lr / 10``), which the CLI prints beside it. More
``--steps`` shorten the lag in decades.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from jaxtl import feature_cache
from jaxtl.data import images, sources
from jaxtl.data.pipeline import training_loader
from jaxtl.models.base import LoadedModel
from jaxtl.train import TrainConfig, steps
from jaxtl.train.state import TrainState
from jaxtl.transfer.plan import Plan
from jaxtl.transfer.recipes import make_plan

__all__ = ["LRFinding", "check_options", "lr_find", "suggest", "write"]


@dataclasses.dataclass
class LRFinding:
    """What :func:`lr_find` measured.

    Attributes:
      lrs: the learning rate of each step taken.
      losses: each step's training loss (NaN for a non-finite one).
      smoothed: the bias-corrected moving average of ``losses``.
      suggestion: the suggested peak learning rate (:func:`suggest`), or ``None`` when the
        loss never fell.
      min_lr: the rate where the smoothed loss was lowest (a common alternative: a tenth of it).
      stopped: why the test ended: ``"steps"``, ``"diverged"`` or ``"non-finite loss"``.
      seconds: wall time of the test.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    min_lr: float
    stopped: str
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def suggest(lrs, smoothed, skip: float = 0.1) -> float | None:
    """The rate of steepest descent of ``smoothed`` against log(``lrs``), searched from the
    first ``skip`` fraction of the points to the minimum; ``None`` when no slope is negative.

    Example:
      >>> lrs = [10.0**e for e in range(-6, 1)]   # a loss that falls fastest at 1e-3
      >>> suggest(lrs, [1.0, 0.99, 0.95, 0.6, 0.4, 0.38, 2.0], skip=0.0)
      0.001
    """
    lrs, smoothed = np.asarray(lrs, float), np.asarray(smoothed, float)
    finite = np.isfinite(smoothed)
    if finite.sum() < 3:
        return None
    end = int(np.nanargmin(np.where(finite, smoothed, np.nan))) + 1
    start = min(int(skip * len(lrs)), max(end - 2, 0))
    if end - start < 2:
        return None
    slope = np.gradient(smoothed[start:end], np.log(lrs[start:end]))
    best = int(np.argmin(slope))
    return float(lrs[start + best]) if slope[best] < 0 else None


def check_options(
    start_lr: float, end_lr: float, num_steps: int, diverge: float, beta: float
) -> None:
    """The range test's own options, before anything loads.

    Raises:
      ValueError: naming the argument and the flag, and what to give.
    """
    if not (0 < start_lr < end_lr) or not math.isfinite(end_lr):
        raise ValueError(
            f"start_lr={start_lr:g} and end_lr={end_lr:g} (--start-lr, --end-lr) must satisfy "
            "0 < start_lr < end_lr, e.g. 1e-7 and 10."
        )
    if num_steps < 10:
        raise ValueError(
            f"num_steps={num_steps} (--steps): the range test needs at least 10 steps to draw "
            "a curve; 100-300 is usual."
        )
    if diverge <= 1:
        raise ValueError(f"diverge={diverge:g} (--diverge) must be > 1 (e.g. 4).")
    if not 0 <= beta < 1:
        raise ValueError(f"beta={beta:g} (--smoothing) must be in [0, 1) (e.g. 0.98).")


def lr_find(
    model: LoadedModel,
    recipe: str | Plan,
    data: sources.TextSplits | images.ImageSplits,
    config: TrainConfig | None = None,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    diverge: float = 4.0,
    beta: float = 0.98,
    long_texts: str = "truncate",
    verbose: bool = True,
) -> LRFinding:
    """The learning-rate range test of ``recipe`` on ``model`` (see the module docstring).

    Args:
      model: from :func:`jaxtl.load`; its params are read, never changed.
      recipe: what trains, as for :func:`jaxtl.finetune` (one stage: a staged recipe's
        stages have their own rates).
      data: the splits; only the training split is read.
      config: the run's options (optimizer, weight decay, clipping, batch size, seed, feature
        cache, grad_accum, precision, remat, frozen_bf16); its learning rate and schedule are
        replaced by the sweep. The test runs on one device and stops at the first non-finite
        loss: its mesh, sharding rules and max_bad_steps are not used.
      start_lr, end_lr: the first and last rates (``--start-lr``, ``--end-lr``).
      num_steps: steps of the test (``--steps``); it cycles through the training split.
      diverge: stop once the smoothed loss exceeds this multiple of its minimum (``--diverge``).
      beta: the moving average's weight of the past (``--smoothing``).
      long_texts: ``"truncate"`` or ``"error"`` (:func:`jaxtl.encoding.encode_splits`).
      verbose: print progress.

    Raises:
      ValueError: bad rates or counts (naming the argument and the flag), a staged recipe, a
        multi-device mesh, or a training split smaller than one batch; before anything compiles.
    """
    from jaxtl.encoding import encode_splits
    from jaxtl.run import with_adapters
    from jaxtl.train.trainer import Trainer

    check_options(start_lr, end_lr, num_steps, diverge, beta)
    model.own_params("lr_find")  # released to a train state: a clear error now
    config = config or TrainConfig()
    plan = make_plan(recipe, model.structure)
    if plan.stages:
        raise ValueError(
            f"recipe {plan.name!r} is staged (each stage has its own rate); find a rate for "
            "one stage's recipe instead, e.g. linear_probe or full."
        )
    if config.scale.mesh is not None and jax.device_count() > 1:
        raise ValueError("lr_find runs on one device; drop mesh (--mesh).")
    feature_cache.check_options(config, plan)
    model = with_adapters(model, plan, config.seed)
    arrays, _ = encode_splits(model, data, long_texts)
    trained = model
    if config.data.feature_cache and feature_cache.applies(model, plan):
        trained, arrays = feature_cache.cached_run(model, plan, config, arrays, verbose)
    train = training_loader(arrays["train"], config.data, trained, seed=config.seed)
    if train.steps_per_epoch < 1:
        raise ValueError(
            f"The training split has fewer examples than one batch of {config.data.batch_size}; "
            "lower batch_size (--batch-size)."
        )
    ratio = end_lr / start_lr

    def schedule(count):
        return start_lr * ratio ** (count / (num_steps - 1))

    optim = config.optim
    tx = plan.optimizer(
        schedule,
        name=optim.optimizer,
        weight_decay=optim.weight_decay,
        clip_norm=optim.clip_norm,
        l2_sp=optim.l2_sp,
        **optim.optimizer_options,
    )
    # The Trainer's model and stored params: the run's precision, remat and frozen_bf16, and
    # its BatchNorm rule (a bf16 run's rate is found in bf16).
    trainer = Trainer(trained, plan, dataclasses.replace(config, loggers=()))
    state = TrainState.create(
        apply_fn=trainer.model.forward,
        params=trainer.builder.stored_params(),
        tx=tx,
        seed=config.seed,
        task=trained.task,
        batch_stats=trained.batch_stats,
        bn_train=trainer.bn_train(plan),
        trainable=plan.trainable_mask(trained.params),
    )
    step = jax.jit(lambda s, b: steps.train_step(s, b, grad_accum=config.scale.grad_accum))
    t0 = time.perf_counter()
    lrs, losses, smoothed = [], [], []
    average, best, stopped, epoch = 0.0, math.inf, "steps", 0
    while len(lrs) < num_steps and stopped == "steps":
        for batch in train.epoch(epoch):
            state, metrics = step(state, batch)
            i = len(lrs)
            loss = float(metrics["loss"])
            lrs.append(float(schedule(i)))
            losses.append(loss if math.isfinite(loss) else math.nan)
            if not math.isfinite(loss):
                smoothed.append(math.nan)
                stopped = "non-finite loss"
                break
            average = beta * average + (1 - beta) * loss
            smoothed.append(average / (1 - beta ** (i + 1)))
            best = min(best, smoothed[-1])
            if verbose and (i + 1) % 20 == 0:
                print(f"lr_find: step {i + 1}/{num_steps}, lr {lrs[-1]:.2e}, loss {loss:.4f}")
            if i > 0 and smoothed[-1] > diverge * best:
                stopped = "diverged"
                break
            if len(lrs) == num_steps:
                break
        epoch += 1
    finite = np.where(np.isfinite(smoothed), smoothed, np.inf)
    return LRFinding(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=suggest(lrs, smoothed),
        min_lr=float(lrs[int(np.argmin(finite))]),
        stopped=stopped,
        seconds=time.perf_counter() - t0,
    )


def write(finding: LRFinding, out: str) -> tuple[str, str]:
    """``OUT/lr_find.json`` and ``OUT/lr_find.png`` (loss against learning rate, log scale,
    the suggestion marked)."""
    from jaxtl.report import _pyplot, save_figure

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "lr_find.json")
    with open(path, "w") as f:
        json.dump(finding.to_dict(), f, indent=2)
    fig, ax = _pyplot().subplots(figsize=(6.5, 4.2))
    ax.plot(finding.lrs, finding.losses, color="C0", alpha=0.3, label="loss per step")
    ax.plot(finding.lrs, finding.smoothed, color="C0", label="smoothed")
    if finding.suggestion is not None:
        ax.axvline(finding.suggestion, color="C3", linestyle="--",
                   label=f"suggestion {finding.suggestion:.2e}")  # fmt: skip
    finite = [x for x in finding.smoothed if math.isfinite(x)]
    if finite:  # the diverging tail would flatten the curve
        low, high = min(finite), max(finite[: max(len(finite) // 10, 1)] + [min(finite)])
        ax.set_ylim(low - 0.1 * (high - low or 1), max(high, low) + 0.3 * (high - low or 1))
    ax.set_xscale("log")
    ax.set(
        xlabel="learning rate", ylabel="training loss", title=f"LR range test ({finding.stopped})"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return path, save_figure(fig, os.path.join(out, "lr_find.png"))
