"""The training loop: feed batches to one compiled step, evaluate, checkpoint, stop early.

Everything inside a step is in :mod:`jaxtl.train.steps`, and how a state is built (each
stage's optimizer, schedules and shardings) in :mod:`jaxtl.train.builder`; this file is
host-side bookkeeping only. The Trainer reads batches from :class:`jaxtl.data.loader.Loader`
objects that the caller builds (:func:`jaxtl.data.training_loader`,
:func:`jaxtl.data.evaluation_loader`); which evaluation is best and when to stop is
:class:`jaxtl.train.tracker.Tracker`'s; what is logged and timed is
:mod:`jaxtl.train.progress`'s. It never forces a device sync per step: step metrics are fetched
once per ``log_every`` steps.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl import parallel
from jaxtl.adabn import adapt_batch_norm
from jaxtl.checkpoint import Checkpointer, CheckpointWriteError
from jaxtl.data.loader import Loader
from jaxtl.distributed import is_primary
from jaxtl.metrics import detailed as detailed_metrics
from jaxtl.models.base import LoadedModel, check_model
from jaxtl.models.common import batch_norm_paths, recompute
from jaxtl.train import heap, precision, steps
from jaxtl.train.builder import StateBuilder
from jaxtl.train.config import TrainConfig, as_config, as_workdir
from jaxtl.train.faults import BadSteps, Preempted, StopSignals, committed_steps, writable_dir
from jaxtl.train.loggers import Logger, check_installed, open_loggers
from jaxtl.train.losses import TASKS, summarize
from jaxtl.train.progress import Clock, MetricsLog, TrainMetrics, progress_bar
from jaxtl.train.state import TrainState
from jaxtl.train.tracker import Tracker
from jaxtl.transfer import stages
from jaxtl.transfer.plan import Plan
from jaxtl.transfer.recipes import make_plan
from jaxtl.transfer.trees import flatten, unflatten

__all__ = ["FitResult", "Trainer"]


@dataclasses.dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns."""

    state: TrainState
    history: list[dict]  # one record per evaluation
    best: dict | None  # the best evaluation record (by the run's improvement metric)
    stopped_early: bool
    train_seconds: float  # wall time of the loop, first-step compilation included
    steps: int
    # Where the wall time went: {"train": s, "evaluation": s, "checkpoints": s}.
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    skipped_steps: int = 0  # steps whose NaN/inf loss or gradient left the state unchanged


class Trainer:
    """Fine-tune a :class:`LoadedModel` under a transfer plan.

    Args:
      model: from :func:`jaxtl.load`.
      plan: a :class:`jaxtl.Plan` (what trains, at which LR multiplier).
      config: a :class:`TrainConfig`.
      workdir: run directory for ``metrics.jsonl`` and ``checkpoints/``; ``None`` keeps
        everything in memory (no resume).
      mesh: device mesh; default ``config.scale.mesh`` over every device
        (:func:`jaxtl.parallel.make_mesh`).
      stage_models: for a staged plan, ``{stage: model}`` for stages that run another forward
        over the same params (a feature-cache stage's
        :func:`jaxtl.feature_cache.tail_model`); :meth:`fit` then takes their loaders as
        ``stage_data``.
      loss: a custom objective ``loss(outputs, batch) -> [B]`` (one value per example,
        ``outputs`` the model's and ``batch`` holding ``label`` and the inputs), used in
        training and as the evaluations' ``loss``; classification still reports accuracy.
        None: the task's own (cross-entropy, squared error).

    Raises:
      ValueError: a task the Trainer cannot fit, a mesh that does not fit the devices, a batch
        size that does not split over the batch shards and microbatches, or an improvement
        metric the task does not report; all before compiling. A sharding rule that cannot
        place a param fails in :meth:`init_state`, also before compiling.
    """

    def __init__(
        self,
        model: LoadedModel,
        plan: Plan,
        config: TrainConfig,
        workdir: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
        *,
        stage_models: Mapping[int, LoadedModel] | None = None,
        loss: Callable[..., Any] | None = None,
        loggers: Sequence[Logger] = (),
    ):
        check_model(model, "the Trainer")
        if isinstance(plan, str):  # a recipe, as jaxtl.finetune takes it
            plan = make_plan(plan, model.structure)
        if not isinstance(plan, Plan):
            raise ValueError(
                f"plan must be a recipe (e.g. 'full') or a Plan from jaxtl.make_plan(recipe, "
                f"model.structure), got {type(plan).__name__}."
            )
        config, workdir = as_config(config, "the Trainer"), as_workdir(workdir)
        if model.task not in TASKS:
            raise ValueError(
                f"The Trainer fits the heads of {TASKS}; this model was loaded with "
                f"task={model.task!r}. Load it with task='classification' (or another of "
                "those its family offers: jaxtl.list_models())."
            )
        sequence_task = model.task in ("classification", "regression")
        if loss is not None and (not callable(loss) or not sequence_task):
            raise ValueError(
                "loss= must be a function loss(outputs, batch) -> one loss per example, for a "
                f"classification or regression model (this one: task={model.task!r})."
            )
        self.loss = loss
        bad = [x for x in loggers if not isinstance(x, Logger)]
        if bad:
            raise ValueError(
                f"loggers= takes objects with write(record) and close() methods "
                f"(jaxtl.train.loggers.Logger); got {bad[0]!r}."
            )
        self.loggers = list(loggers)
        if config.loggers and not workdir:
            raise ValueError(
                f"TrainConfig loggers={list(config.loggers)} (--tensorboard / --wandb) write into "
                "the run directory; give the Trainer a workdir (jaxtl finetune: --out)."
            )
        check_installed(config.loggers)
        scale = config.scale
        if mesh is not None:
            parallel.check_mesh_axes(mesh, "the Trainer places state and batches")
        self.mesh = mesh if mesh is not None else parallel.make_mesh(scale.mesh)
        dtype = precision.compute_dtype(scale.precision, self.mesh.devices.flat[0])
        if scale.remat is not None or dtype != jnp.float32:
            model = recompute(model, remat=scale.remat, dtype=dtype)
        self.model = model
        self.plan = plan
        plan.check_trains(model.params, model.family)
        _warn_unused_options(model, plan, config)
        self.builder = StateBuilder(
            model, plan, config, self.mesh, stage_models=stage_models, loss=loss
        )
        self.stage_models = self.builder.stage_models
        self.config = config
        self.workdir = workdir
        parallel.check_batch_size(
            config.data.batch_size, self.mesh, grad_accum=config.scale.grad_accum
        )
        self.monitor = config.checkpoint.monitor(model.task)
        if workdir:
            writable_dir(workdir)
        # metrics.jsonl is shared: process 0 writes it (the metrics are global in every process).
        self.log = MetricsLog(
            os.path.join(workdir, "metrics.jsonl") if workdir and is_primary() else None
        )
        self._compiled = None  # (the specs they were compiled for, (train_step, eval_step))

    @property
    def _on_cpu(self) -> bool:
        """Whether the devices are the host's CPU, whose memory the host's work shares."""
        return self.mesh.devices.flat[0].platform == "cpu"

    @property
    def devices(self) -> int:
        """The mesh's batch shards (``data`` x ``fsdp``): evaluation batches split over them."""
        return parallel.batch_shards(self.mesh)

    # --- the state (jaxtl.train.builder) ------------------------------------------------

    @property
    def stage(self) -> int:
        """The stage of a staged plan the last built state (and so the steps) belongs to."""
        return self.builder.stage

    @property
    def specs(self) -> Any:
        """The last built state's ``PartitionSpec`` tree."""
        return self.builder.specs

    @property
    def schedule(self) -> Callable[[Any], Any] | None:
        """The run's learning rate at a global step."""
        return self.builder.schedule

    def init_state(self, total_steps: int, *, stage: int = 0) -> TrainState:
        """:meth:`jaxtl.train.builder.StateBuilder.init_state`: a fresh, placed state."""
        return self.builder.init_state(total_steps, stage=stage)

    def abstract_state(self, total_steps: int, params: Any = None, *, stage: int = 0) -> TrainState:
        """:meth:`jaxtl.train.builder.StateBuilder.abstract_state`: the state as shapes with
        shardings, nothing allocated (to lower a step, or to restore into)."""
        return self.builder.abstract_state(total_steps, params, stage=stage)

    def state_specs(self, state: Any) -> Any:
        """:meth:`jaxtl.train.builder.StateBuilder.state_specs`: where each leaf lives."""
        return self.builder.state_specs(state)

    def bn_train(self, plan: Plan | None = None) -> tuple[str, ...]:
        """:meth:`jaxtl.train.builder.StateBuilder.bn_train`: the BatchNorm layers that train."""
        return self.builder.bn_train(plan)

    def checkpoint_like(self, meta: dict) -> dict:
        """:meth:`jaxtl.train.builder.StateBuilder.checkpoint_like`: the tree a checkpoint
        with ``meta`` restores into."""
        return self.builder.checkpoint_like(meta)

    def _precise_bn(self, state: TrainState, train: Loader) -> TrainState:
        """``config.precise_bn``: exact statistics of the training BatchNorm layers on the first
        training examples (a fixed, unshuffled slice, so a resumed run recomputes the same)."""
        n = min(self.config.precise_bn, train.num_examples)
        if not n or not state.bn_train:
            return state
        stats = adapt_batch_norm(
            self.model,
            train.examples(n)["pixel_values"],
            params=parallel.to_host(state.params),
            batch_stats=parallel.to_host(state.batch_stats),
            batch_size=self.config.data.eval_batch_size,
        )
        frozen = [p for p in batch_norm_paths(stats) if p not in state.bn_train]
        stats = _keep_layers(stats, jax.device_get(state.batch_stats), frozen)
        return state.replace(batch_stats=parallel.put_replicated(stats, self.mesh))

    def _steps(self, state: TrainState):
        """The steps compiled for the last built state (again after a new one is built: they
        hold its optimizer)."""
        if self._compiled is None or self._compiled[0] is not self.specs:
            compiled = steps.compile_steps(
                state, self.mesh, self.specs, grad_accum=self.config.scale.grad_accum
            )
            self._compiled = (self.specs, compiled)
        return self._compiled[1]

    # --- evaluation ----------------------------------------------------------------------

    def evaluate(
        self,
        state: TrainState,
        loader: Loader,
        *,
        details: bool = False,
        label_names: Sequence[str] | None = None,
        references: Sequence[Any] | None = None,
    ) -> dict:
        """Loss (and accuracy) over every example of ``loader`` exactly once.

        With ``details``, also the metrics of :func:`jaxtl.metrics.detailed` (macro-F1,
        per-class precision and recall, the confusion matrix and calibration; or MSE, MAE,
        R², Pearson and Spearman; entity F1, mIoU, ...), from the same pass: per-class
        entries are keyed by ``label_names`` when given. ``references``: one entry per example
        of ``loader``, in its order, that the text metrics read (question answering's
        ``(context, answer)``).
        """
        _, eval_step = self._steps(state)
        total, rows = None, []
        batches = parallel.prefetch_to_device(
            loader.epoch(0), self.mesh, self.config.data.prefetch, whole=not loader.process_local
        )
        for batch in batches:
            sums, per_example = eval_step(state, batch, rows=True)
            total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
            if details:
                rows.append(per_example)  # on the device until the end: no sync per batch
        out = summarize(jax.device_get(total), self.model.task)
        if details and rows and rows[0]:
            host = jax.device_get(rows)
            columns = {k: np.concatenate([r[k] for r in host]) for k in host[0]}
            real = columns.pop("weight") > 0
            columns = {k: v[real] for k, v in columns.items()}
            task, num_labels = self.model.task, self.model.num_labels
            out.update(detailed_metrics(task, columns, num_labels, label_names, references))
        return out

    # --- the loop ------------------------------------------------------------------------

    def fit(
        self,
        train: Loader,
        val: Loader | None = None,
        *,
        resume: bool | int = False,
        stop_at: int | None = None,
        stage_data: Mapping[int, tuple[Loader, Loader | None]] | None = None,
    ) -> FitResult:
        """Train; evaluate on ``val`` every ``config.checkpoint.eval_interval`` steps.

        Args:
          train: training batches (:func:`jaxtl.data.training_loader`).
          val: validation batches (:func:`jaxtl.data.evaluation_loader`); needed for early
            stopping and restore-best.
          resume: continue from the latest checkpoint in ``workdir`` if there is one; a step
            number continues from that step's checkpoint instead (``--resume-from``: when the
            latest cannot be read), and deletes the checkpoints after it. False: ``workdir``
            must hold no checkpoints (an earlier run's are not written over).
          stop_at: stop after this global step, checkpointed (with a ``workdir``), as if
            preempted: the LR schedule and data order still follow the full run, so a later
            ``resume`` finishes it exactly. In memory the run just stops there.
          stage_data: ``{stage: (train, val)}`` for the stages of ``stage_models``: the same
            examples in the same order, as those stages' models read them.
        """
        cfg = self.config
        if not self.workdir and resume is not False:
            given = (
                "True (--resume)" if resume is True else f"{resume!r} (--resume-from {resume!r})"
            )
            raise ValueError(
                f"resume={given} continues a run from its run directory's checkpoints, and this "
                "one trains in memory: give it a workdir (jaxtl.finetune(..., workdir=DIR); jaxtl "
                "finetune: --out DIR)."
            )
        # Before anything is built or placed (every process sees the same files: none has
        # saved yet).
        saved = committed_steps(os.path.join(self.workdir, "checkpoints")) if self.workdir else []
        if resume is False and saved:
            raise ValueError(
                f"workdir (--out) {self.workdir!r} already holds checkpoints of an earlier run "
                f"(steps {saved}), which this fit would write over. Continue it with "
                "resume=True (--resume), or choose another workdir (--out). Nothing was changed."
            )
        spe = train.steps_per_epoch
        data = dict(stage_data or {})
        if sorted(data) != sorted(self.stage_models):
            raise ValueError(
                f"stage_data covers stages {sorted(data)} but stage_models "
                f"{sorted(self.stage_models)}."
            )
        for k, (t, _) in data.items():
            if t.steps_per_epoch != spe or t.num_examples != train.num_examples:
                raise ValueError(f"stage_data[{k}] does not hold the training examples of train.")
        loaders = lambda k: data.get(k, (train, val))  # noqa: E731
        total = cfg.total_steps(spe)
        self.builder.set_schedules(total, spe)  # a staged plan's stages that collide fail here
        starts = self.builder.starts
        late = [i for i, s in enumerate(starts) if s >= total]
        if late:
            print(
                f"warning: {self.plan.name} has {len(starts)} stages but the run's {total} steps "
                f"reach only {len(starts) - len(late)}: stage {late[0]} would start at step "
                f"{starts[late[0]]}. Give it more --epochs / --max-steps, or shorter stages.",
                file=sys.stderr,
            )
        state = self.init_state(total)
        tracker = Tracker(*self.monitor, cfg.checkpoint.early_stopping if val else None)
        ckpt = self._checkpointer(state, has_val=val is not None)
        meta = {}
        if resume is not False:
            state, meta = self._resume(state, ckpt, loaders, tracker, total, resume)
        if self.workdir and resume is False:
            self.log.truncate_after(-1)
        if is_primary():  # metrics are global: one process logs them
            named = cfg.loggers if self.workdir else ()
            self.log.loggers = [*self.loggers, *open_loggers(
                named, self.workdir, start_step=int(state.step), config=cfg.to_dict())]  # fmt: skip
        run = _Run(self, loaders, tracker, ckpt, total, skipped=meta.get("skipped_steps", 0))
        step = int(state.step)
        interval = cfg.checkpoint.eval_interval(spe)
        every = cfg.checkpoint.checkpoint_every
        due = lambda: self.stage + 1 < len(starts) and step >= starts[self.stage + 1]  # noqa: E731
        run.start(step)
        try:
            with StopSignals() as signals:
                while step < total and not tracker.stopped:
                    while due():
                        state = self.builder.enter_stage(state, self.stage + 1, total)
                    train_step, _ = self._steps(state)
                    run.use(self.stage)
                    epoch, start = divmod(step, spe)
                    batches = parallel.prefetch_to_device(
                        run.train.epoch(epoch, start),
                        self.mesh,
                        cfg.data.prefetch,
                        whole=not run.train.process_local,
                    )
                    for batch in batches:
                        if due():  # the next stage: its optimizer (and data) from this step on
                            break
                        state, metrics = train_step(state, batch)
                        step += 1
                        run.add(step, metrics)
                        if ckpt is not None:
                            ckpt.check()  # a failed background save stops the run here
                        if step % cfg.log_every == 0:
                            run.flush(step)
                        if step % interval == 0 or step == total:
                            state = run.evaluate_and_save(state, step)
                        elif ckpt is not None and every and step % every == 0:
                            run.save(state, step)
                        if tracker.stopped or step >= total:
                            break
                        stop = signals.requested(step)
                        if stop or (stop_at is not None and step >= stop_at):
                            result = run.stop(state, step)
                            if stop:
                                raise Preempted(step, stop, self.workdir, result)
                            return result
                run.flush(step)
                if ckpt is not None:  # the last saves commit while a signal still means "stop"
                    ckpt.wait()
                stop = signals.requested(step)  # one that came after the last step's check
                if stop:
                    raise Preempted(step, stop, self.workdir, run.stop(state, step))
        except Preempted:
            raise
        except BaseException as e:
            run.abort(e)
            raise
        finally:
            run.close_bar()
            self.log.close_loggers()
        return run.finish(state, step, restore=val is not None and cfg.checkpoint.restores_best)

    def _checkpointer(self, state: TrainState, has_val: bool) -> Checkpointer | None:
        if not self.workdir:
            return None
        metric, mode = self.monitor
        compress = self.config.checkpoint.compress_checkpoints
        if compress is None:  # on CPU a save's buffers are the training's memory
            compress = not self._on_cpu
        return Checkpointer(
            os.path.join(self.workdir, "checkpoints"),
            max_to_keep=self.config.checkpoint.max_to_keep,
            best_metric=metric if has_val else None,
            best_mode=mode,
            compress=compress,
        )

    def _resume(self, state, ckpt, loaders, tracker: Tracker, total: int, resume: bool | int):
        """The checkpoint's state (in the stage it was saved in) and its metadata, with the
        tracker restored: the latest (``resume=True``) if ``workdir`` has one, else
        ``(state, {})``; or step ``resume``, which must exist."""
        explicit = resume is not True
        if explicit and (isinstance(resume, bool) or not isinstance(resume, int) or resume < 1):
            raise ValueError(f"resume must be True, False or a step >= 1, got {resume!r}.")
        if ckpt is None or (not explicit and ckpt.latest_step() is None):
            self.log.truncate_after(-1)
            return state, {}
        if explicit:
            tree, meta = ckpt.restore_step(resume, self.checkpoint_like)
        else:
            tree, meta = ckpt.restore_latest(self.checkpoint_like)
        stage = int(meta.get("stage", 0))
        if stage != self.stage:
            state = self.abstract_state(total, stage=stage)
        state = state.with_checkpoint_tree(tree)
        loaders(stage)[0].check_state(meta.get("data"))
        tracker.restore(meta)
        self.log.truncate_after(int(state.step))
        print(f"Resumed from step {int(state.step)} in {self.workdir}", file=sys.stderr)
        return state, meta


class _Run:
    """One fit's moving parts around the loop: metrics, clock, evaluation, saving, finishing."""

    def __init__(self, trainer: Trainer, loaders, tracker, ckpt, total: int, skipped: int = 0):
        self.trainer, self.loaders = trainer, loaders
        self.train, self.val = loaders(trainer.stage)
        self.tracker, self.ckpt, self.total = tracker, ckpt, total
        self.cfg = trainer.config
        self.clock: Clock
        self.bar = None
        self.best_host = None  # the best params on the host, when there is no checkpoint dir
        self.metrics: TrainMetrics
        self.bad = BadSteps(trainer.config.max_bad_steps, total=skipped)
        self.closed = False  # the checkpointer was closed
        # Orbax writes a checkpoint from a host copy of the state in the background. On an
        # accelerator that copy lives beside the device's memory; on CPU it is the same memory
        # as the next steps' working set: on MiniLM's demo fine-tune the overlap raised the peak
        # from 1,396 to 1,622 MiB (benchmarks/README.md). There each save completes before
        # training resumes.
        self.wait_for_saves = trainer._on_cpu

    def start(self, step: int) -> None:
        self.clock = Clock()
        self.bar = progress_bar(self.total, step, self.cfg.progress)
        self.metrics = TrainMetrics(
            self.trainer.log,
            self.trainer.schedule,
            self.train.steps_per_epoch,
            self.cfg.data.batch_size,
            self.bar,
        )

    def add(self, step: int, metrics: dict) -> None:
        """One step's metrics (still on the device)."""
        self.bad.add(step, metrics["skipped"])
        self.metrics.add(metrics)

    def flush(self, step: int) -> None:
        """Write the pending steps' metrics; a run of non-finite steps raises here."""
        self.bad.check()
        self.metrics.flush(step, skipped=self.bad.total)

    def stop(self, state: TrainState, step: int) -> FitResult:
        """End the fit at ``step`` as if preempted: checkpointed, committed, not altered."""
        self.flush(step)
        if self.ckpt is not None and self.ckpt.latest_step() != step:
            self.save(state, step)
        return self.finish(state, step, restore=False)

    def abort(self, error: BaseException) -> None:
        """After ``error``: let the saves already started commit (nothing saved is lost), then
        release the checkpointer. A save failing here would hide ``error``: it is reported
        (unless ``error`` is that failure) and dropped."""
        if self.ckpt is None or self.closed:
            return
        self.closed = True
        try:
            self.ckpt.close()
        except CheckpointWriteError as e:
            if not isinstance(error, CheckpointWriteError):
                print(f"while stopping: {e}", file=sys.stderr)

    def use(self, stage: int) -> None:
        """Read ``stage``'s batches from now on (its own when its model reads other inputs)."""
        self.train, self.val = self.loaders(stage)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def meta(self) -> dict:
        return {
            **self.tracker.state(),
            "stage": self.trainer.stage,
            "skipped_steps": self.bad.total,
            "steps_per_epoch": self.train.steps_per_epoch,
            "data": self.train.state(),
        }

    def save(self, state: TrainState, step: int, metrics: dict | None = None) -> None:
        with self.clock.timing("checkpoints"):
            self.ckpt.save(step, state.checkpoint_tree(), self.meta(), metrics)
            if self.wait_for_saves:
                self.ckpt.wait()

    def evaluate_and_save(self, state: TrainState, step: int) -> TrainState:
        """Validation metrics, the tracker's verdict, and the checkpoints of this step."""
        self.flush(step)  # also waits for the step, so evaluation's clock is its own
        trainer, spe = self.trainer, self.train.steps_per_epoch
        metrics, improved = {}, False
        if self.val is not None:
            with self.clock.timing("evaluation"):
                state = trainer._precise_bn(state, self.train)
                metrics = {f"val_{k}": v for k, v in trainer.evaluate(state, self.val).items()}
            rec = {"split": "val", "step": step, "epoch": step / spe, **metrics}
            improved = self.tracker.record(rec)
            trainer.log.write(rec)
            if improved and self.ckpt is None and self.cfg.checkpoint.restores_best:
                self.best_host = parallel.to_host((state.params, state.batch_stats))
        if self.ckpt is not None:
            # Only an improvement reaches the best manager, so it holds exactly the tracker's
            # best (orbax alone would keep the newest of tied scores).
            self.save(state, step, metrics if improved else None)
        if self.val is not None and self.bar is None:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "val_examples")
            print(
                f"step {step}/{self.total} epoch {step / spe:.2f}: {shown} | {self.clock.line()}",
                file=sys.stderr,
            )
        elif self.bar is not None:
            self.bar.set_postfix_str(self.clock.line())
        heap.trim()  # what evaluating and saving freed goes back before training resumes
        self.metrics.restart_clock()
        return state

    def finish(self, state: TrainState, step: int, *, restore: bool) -> FitResult:
        """Close out a fit. With ``restore``, the best evaluation's params come back, from the
        best checkpoint or (no workdir) from the host copy; a preempted run is never altered."""
        ckpt, best = self.ckpt, self.tracker.best
        if ckpt is not None:
            with self.clock.timing("checkpoints"):
                ckpt.wait()
        if restore and best is not None and best["step"] != step:
            if ckpt is not None and ckpt.best_step() is not None:
                # The params and statistics only: not a second optimizer state beside the live
                # one at the run's peak.
                tree, _ = ckpt.restore_best(self.trainer.checkpoint_like, ("params", "batch_stats"))
                state = state.replace(params=tree["params"], batch_stats=tree["batch_stats"])
            elif self.best_host is not None:
                params, batch_stats = parallel.put_like(
                    self.best_host, (state.params, state.batch_stats)
                )
                state = state.replace(params=params, batch_stats=batch_stats)
        if ckpt is not None:
            self.closed = True
            ckpt.close()
        seconds = self.clock.seconds()
        if self.val is not None or ckpt is not None:
            print(f"fit: {step} steps, {self.clock.line()}", file=sys.stderr)
        return FitResult(
            state=state,
            history=self.tracker.history,
            best=best,
            stopped_early=self.tracker.stopped,
            train_seconds=sum(seconds.values()),
            steps=step,
            seconds={k: round(v, 3) for k, v in seconds.items()},
            skipped_steps=self.bad.total,
        )


def _keep_layers(new: Any, old: Any, layers: list[str]) -> Any:
    """``new`` statistics, except ``layers`` (frozen BatchNorms), which keep ``old``."""
    flat_new, flat_old = flatten(new), flatten(old)
    for path in flat_new:
        if path.rsplit("/", 1)[0] in layers:
            flat_new[path] = flat_old[path]
    return unflatten(flat_new)


def _warn_unused_options(model: LoadedModel, plan: Plan, config: TrainConfig) -> None:
    """A warning for each option that would change nothing for this model and plan (the run
    goes on: one config may serve several models or recipes)."""
    unused = []
    bn_options = {"train_bn": config.train_bn, "precise_bn": config.precise_bn}
    given = [f"{k}={v!r}" for k, v in bn_options.items() if v]
    if given and not batch_norm_paths(model.batch_stats):
        unused.append(f"{', '.join(given)}: the {model.family!r} model has no BatchNorm layers")
    if config.scale.frozen_bf16:
        trained = jax.tree.leaves(stages.trained_anywhere(plan, model.params))
        if all(trained):
            unused.append(
                f"frozen_bf16=True (--frozen-bf16): the plan {plan.name!r} freezes no param, so "
                "none is stored in bfloat16"
            )
    for what in unused:
        print(f"warning: {what}; the option changes nothing here.", file=sys.stderr)
