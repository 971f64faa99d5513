"""The training loop: feed batches to one compiled step, evaluate, checkpoint, stop early.

Everything inside a step is in :mod:`jaxtl.train.steps`; this file is host-side bookkeeping only
(batches, metrics, checkpoints), and it never forces a device sync per step: step metrics are
fetched once per ``log_every`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from jaxtl import parallel
from jaxtl.adabn import adapt_batch_norm
from jaxtl.checkpoint import Checkpointer
from jaxtl.data import augment, mixing
from jaxtl.data.loader import ArrayLoader
from jaxtl.data.pipeline import ArraySource, GrainLoader
from jaxtl.data.text import bucket_lengths
from jaxtl.models.base import LoadedModel
from jaxtl.models.common import batch_norm_paths
from jaxtl.rules import flatten, unflatten
from jaxtl.train import steps
from jaxtl.train.config import TrainConfig
from jaxtl.train.state import TrainState

TRAINABLE_TASKS = ("classification", "regression", "causal_lm")


@dataclasses.dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns."""

    state: TrainState
    history: list[dict]  # one record per evaluation
    best: dict | None  # the best evaluation record (by ``config.best_metric``)
    stopped_early: bool
    train_seconds: float  # wall time of the loop, first-step compilation included
    steps: int


def summarize(sums: dict) -> dict:
    """Metric sums (from ``eval_step``) -> means."""
    count = float(sums["count"])
    loss = float(sums["loss_sum"]) / count
    out = {"loss": loss, "examples": int(round(float(sums.get("examples", count))))}
    if "correct" in sums:
        out["accuracy"] = float(sums["correct"]) / count
    if "examples" in sums:  # a causal LM: per-token metrics
        out["tokens"] = int(round(count))
        out["perplexity"] = math.exp(min(loss, 700.0))
    return out


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records past the restored step are dropped
    (those steps are about to be redone), so the file always describes one run."""

    def __init__(self, path: str | None):
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Trainer:
    """Fine-tune a :class:`LoadedModel` under a transfer plan.

    Args:
      model: from :func:`jaxtl.load`.
      plan: a :class:`jaxtl.strategies.Plan` (what trains, at which LR multiplier).
      config: a :class:`TrainConfig`.
      workdir: run directory for ``metrics.jsonl`` and ``checkpoints/``; ``None`` keeps
        everything in memory (no resume).
      mesh: device mesh; default all devices on a ``data`` axis.
    """

    def __init__(
        self,
        model: LoadedModel,
        plan: Any,
        config: TrainConfig,
        workdir: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        if model.task not in TRAINABLE_TASKS:
            raise ValueError(
                f"The Trainer fits classification, regression and causal-LM heads; this model "
                f"was loaded with task={model.task!r}. Load it with task='classification' (or "
                f"'regression', or 'causal_lm' for a family with an LM head)."
            )
        self.model = model
        self.plan = plan
        self.config = config
        self.workdir = workdir
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        parallel.check_batch_size(config.batch_size, self.mesh)
        n = self.mesh.devices.size
        self.eval_batch_size = -(-config.eval_batch_size // n) * n
        if workdir:
            os.makedirs(workdir, exist_ok=True)
        self.log = MetricsLog(os.path.join(workdir, "metrics.jsonl") if workdir else None)
        self._compiled = None

    # --- setup ---------------------------------------------------------------------------

    def init_state(self, total_steps: int) -> TrainState:
        """A fresh state: the model's params, and the plan's optimizer over the LR schedule."""
        self.schedule = self.config.lr_schedule(total_steps)
        self._compiled = None  # steps compiled for an earlier state hold its optimizer
        self.plan.labels(self.model.params)  # unmatched params fail here, before compiling
        tx = self.plan.optimizer(
            self.schedule,
            weight_decay=self.config.weight_decay,
            clip_norm=self.config.clip_norm,
        )
        state = TrainState.create(
            apply_fn=self.model.forward,
            params=self.model.params,
            tx=tx,
            seed=self.config.seed,
            task=self.model.task,
            batch_stats=self.model.batch_stats,
            bn_train=self.bn_train(),
        )
        return steps.place_state(state, self.mesh)

    def bn_train(self) -> tuple[str, ...]:
        """The BatchNorm layers that train: those whose scale/bias the plan trains, or every one
        with ``config.train_bn``. The rest run in inference mode with their running statistics,
        so a frozen BatchNorm backbone is the same fixed function it was when pretrained."""
        layers = batch_norm_paths(self.model.batch_stats)
        if self.config.train_bn:
            return layers
        mask = flatten(self.plan.trainable_mask(self.model.params))
        return tuple(
            p for p in layers if any(mask.get(f"{p}/{leaf}", False) for leaf in ("scale", "bias"))
        )

    def _precise_bn(self, state: TrainState, train: GrainLoader | ArrayLoader) -> TrainState:
        """``config.precise_bn``: exact statistics of the training BatchNorm layers on the first
        training examples (a fixed, unshuffled slice, so a resumed run recomputes the same)."""
        n = min(self.config.precise_bn, train.num_examples)
        if not n or not state.bn_train:
            return state
        stats = adapt_batch_norm(
            self.model,
            train.arrays["pixel_values"][:n],
            params=jax.device_get(state.params),
            batch_stats=jax.device_get(state.batch_stats),
            batch_size=self.eval_batch_size,
        )
        frozen = [p for p in batch_norm_paths(stats) if p not in state.bn_train]
        stats = _keep_layers(stats, jax.device_get(state.batch_stats), frozen)
        return state.replace(batch_stats=parallel.put_replicated(stats, self.mesh))

    def _steps(self, state: TrainState):
        if self._compiled is None:
            self._compiled = steps.compile_steps(state, self.mesh)
        return self._compiled

    # --- evaluation ----------------------------------------------------------------------

    def evaluate(self, state: TrainState, data: ArrayLoader | dict) -> dict:
        """Loss (and accuracy) over every example of ``data`` exactly once."""
        loader = data if isinstance(data, ArrayLoader) else self.eval_loader(data)
        _, eval_step = self._steps(state)
        total = None
        # Every process holds the whole evaluation batch; each places its devices' rows.
        batches = parallel.prefetch_to_device(
            loader.epoch(0), self.mesh, self.config.prefetch, whole=True
        )
        for batch in batches:
            sums = eval_step(state, batch)
            total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
        return summarize(jax.device_get(total))

    def eval_loader(self, arrays: dict) -> ArrayLoader:
        return ArrayLoader(
            arrays,
            self.eval_batch_size,
            shuffle=False,
            drop_last=False,
            length_buckets=self._buckets(arrays),
        )

    def train_loader(self, arrays: dict) -> GrainLoader:
        """Shuffled, optionally augmented (per example) and mixed (per batch, with smoothed
        targets) training batches through grain (see :mod:`jaxtl.data.pipeline`,
        :mod:`jaxtl.data.mixing`); in a multi-process run, this process's rows of each."""
        cfg = self.config
        if cfg.augment and "pixel_values" not in arrays:
            raise ValueError(
                f"augment={cfg.augment!r} transforms images, but this model reads "
                f"{sorted(k for k in arrays if k != 'label')}; drop the augmentation."
            )
        return GrainLoader(
            ArraySource(arrays),
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            transform=augment.parse(cfg.augment, self.model.extras.get("preprocessing")),
            batch_transform=mixing.for_training(
                cfg.mixup,
                cfg.cutmix,
                cfg.label_smoothing,
                task=self.model.task,
                num_classes=self.model.num_labels,
                inputs=arrays,
            ),
            workers=cfg.data_workers,
            length_buckets=self._buckets(arrays),
        )

    def _buckets(self, arrays: dict) -> tuple[int, ...] | None:
        if not self.config.bucket_by_length or "attention_mask" not in arrays:
            return None
        return bucket_lengths(arrays["attention_mask"].shape[1])

    # --- the loop ------------------------------------------------------------------------

    def fit(
        self,
        train: GrainLoader | ArrayLoader | dict,
        val: ArrayLoader | dict | None = None,
        *,
        resume: bool = False,
        stop_at: int | None = None,
    ) -> FitResult:
        """Train; evaluate on ``val`` each epoch (or every ``eval_every`` steps).

        Args:
          train: training arrays (or a loader).
          val: validation arrays (or a loader); needed for early stopping and restore-best.
          resume: continue from the latest checkpoint in ``workdir`` if there is one.
          stop_at: stop after this global step, checkpointed, as if preempted: the LR schedule
            and data order still follow the full run, so a later ``resume`` finishes it exactly.
        """
        cfg = self.config
        train = train if hasattr(train, "epoch") else self.train_loader(train)
        if val is not None and not isinstance(val, ArrayLoader):
            val = self.eval_loader(val)
        if val is None and (cfg.early_stopping or cfg.restore_best):
            cfg = dataclasses.replace(cfg, early_stopping=None, restore_best=False)
        spe = train.steps_per_epoch
        # A GrainLoader yields this process's rows; an ArrayLoader the whole global batch.
        whole = isinstance(train, ArrayLoader)
        total = cfg.total_steps(spe)
        state = self.init_state(total)
        train_step, _ = self._steps(state)

        best_key, best_mode = cfg.best(self.model.task)
        ckpt = None
        if self.workdir:
            ckpt = Checkpointer(
                os.path.join(self.workdir, "checkpoints"),
                max_to_keep=cfg.max_to_keep,
                best_metric=best_key if val is not None else None,
                best_mode=best_mode,
            )
        history: list[dict] = []
        best: dict | None = None
        bad_evals = 0
        best_host_params = None
        if resume and ckpt is not None and ckpt.latest_step() is not None:
            tree, meta = ckpt.restore_latest(state.checkpoint_tree())
            state = state.with_checkpoint_tree(tree)
            if hasattr(train, "check_state"):
                train.check_state(meta.get("data"))
            history, best, bad_evals = meta["history"], meta["best"], meta["bad_evals"]
            self.log.truncate_after(int(state.step))
            print(f"Resumed from step {int(state.step)} in {self.workdir}", file=sys.stderr)
        elif self.workdir:
            self.log.truncate_after(-1)

        def meta() -> dict:
            return {
                "history": history,
                "best": best,
                "bad_evals": bad_evals,
                "steps_per_epoch": spe,
                "data": train.state() if hasattr(train, "state") else None,
            }

        step = int(state.step)
        stopped_early = False
        pending: list[dict] = []
        t_start = time.perf_counter()
        t_log, samples_since = t_start, 0
        bar = _progress(total, step, cfg.progress)

        def flush_train_metrics():
            nonlocal pending, t_log, samples_since
            if not pending:
                return
            host = jax.device_get(pending)
            now = time.perf_counter()
            rec = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
            rec.update(
                split="train",
                step=step,
                epoch=step / spe,
                lr=float(self.schedule(step - 1)),
                samples_per_s=samples_since / max(now - t_log, 1e-9),
            )
            self.log.write(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", samples_s=f"{rec['samples_per_s']:.0f}")
            pending, t_log, samples_since = [], now, 0

        def evaluate_and_checkpoint():
            nonlocal best, bad_evals, stopped_early, best_host_params, state
            flush_train_metrics()
            rec: dict[str, Any] = {"split": "val", "step": step, "epoch": step / spe}
            metrics = {}
            state = self._precise_bn(state, train)
            improved = False
            if val is not None:
                metrics = {f"val_{k}": v for k, v in self.evaluate(state, val).items()}
                rec.update(metrics)
                history.append(rec)
                self.log.write(rec)
                if best_key in metrics:
                    # Strict improvement: among equal scores the earliest stays best.
                    improved = best is None or (
                        metrics[best_key] > best[best_key]
                        if best_mode == "max"
                        else metrics[best_key] < best[best_key]
                    )
                    if improved:
                        best = rec
                        if ckpt is None and cfg.restore_best:
                            best_host_params = jax.device_get((state.params, state.batch_stats))
                es = cfg.early_stopping
                if es is not None and es.metric in metrics:
                    prev = [h[es.metric] for h in history[:-1]]
                    ref = None if not prev else (max(prev) if es.mode == "max" else min(prev))
                    bad_evals = 0 if es.improved(metrics[es.metric], ref) else bad_evals + 1
                    if bad_evals >= es.patience:
                        stopped_early = True
                if bar is None:
                    shown = ", ".join(
                        f"{k}={v:.4f}" for k, v in metrics.items() if k != "val_examples"
                    )
                    print(f"step {step}/{total} epoch {step / spe:.2f}: {shown}", file=sys.stderr)
            if ckpt is not None:
                # Only an improvement reaches the best manager, so it holds exactly ``best``
                # (orbax alone would keep the newest of tied scores).
                ckpt.save(step, state.checkpoint_tree(), meta(), metrics if improved else None)

        try:
            while step < total and not stopped_early:
                epoch, start = divmod(step, spe)
                batches = parallel.prefetch_to_device(
                    train.epoch(epoch, start), self.mesh, cfg.prefetch, whole=whole
                )
                for batch in batches:
                    state, m = train_step(state, batch)
                    step += 1
                    samples_since += cfg.batch_size
                    pending.append(m)
                    if bar is not None:
                        bar.update(1)
                    if step % cfg.log_every == 0:
                        flush_train_metrics()
                    end_of_epoch = step % spe == 0
                    due_eval = (cfg.eval_every and step % cfg.eval_every == 0) or (
                        cfg.eval_every is None and end_of_epoch
                    )
                    if due_eval or step == total:
                        evaluate_and_checkpoint()
                    elif (
                        ckpt is not None
                        and cfg.checkpoint_every
                        and step % cfg.checkpoint_every == 0
                    ):
                        ckpt.save(step, state.checkpoint_tree(), meta())
                    if stopped_early or step >= total:
                        break
                    if stop_at is not None and step >= stop_at:
                        flush_train_metrics()
                        if ckpt is not None and ckpt.latest_step() != step:
                            ckpt.save(step, state.checkpoint_tree(), meta())
                        return self._finish(
                            state,
                            history,
                            best,
                            False,
                            t_start,
                            step,
                            ckpt,
                            restore=False,
                            host_params=None,
                        )
        finally:
            if bar is not None:
                bar.close()
        flush_train_metrics()
        restore = cfg.restore_best or bool(cfg.early_stopping and cfg.early_stopping.restore_best)
        return self._finish(
            state,
            history,
            best,
            stopped_early,
            t_start,
            step,
            ckpt,
            restore=restore,
            host_params=best_host_params,
        )

    def _finish(
        self, state, history, best, stopped_early, t_start, step, ckpt, *, restore, host_params
    ):
        """Close out a fit. With ``restore``, the best evaluation's params come back, from the
        best checkpoint or (no workdir) from ``host_params``; a preempted run is never altered."""
        seconds = time.perf_counter() - t_start
        if ckpt is not None:
            ckpt.wait()
        if restore and best is not None and best["step"] != step:
            if ckpt is not None and ckpt.best_step() is not None:
                tree, _ = ckpt.restore_best(state.checkpoint_tree())
                state = state.replace(params=tree["params"], batch_stats=tree["batch_stats"])
            elif host_params is not None:
                params, batch_stats = parallel.put_replicated(host_params, self.mesh)
                state = state.replace(params=params, batch_stats=batch_stats)
        if ckpt is not None:
            ckpt.close()
        return FitResult(state, history, best, stopped_early, seconds, step)


def _keep_layers(new: Any, old: Any, layers: list[str]) -> Any:
    """``new`` statistics, except ``layers`` (frozen BatchNorms), which keep ``old``."""
    flat_new, flat_old = flatten(new), flatten(old)
    for path in flat_new:
        if path.rsplit("/", 1)[0] in layers:
            flat_new[path] = flat_old[path]
    return unflatten(flat_new)


def _progress(total: int, initial: int, enabled: bool | None):
    if enabled is None:
        enabled = sys.stdout.isatty() and sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)
