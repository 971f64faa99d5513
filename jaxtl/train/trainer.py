"""The training loop: feed batches to one compiled step, evaluate, checkpoint, stop early.

Everything inside a step is in :mod:`jaxtl.train.steps`; this file is host-side bookkeeping
only. The Trainer reads batches from :class:`jaxtl.data.loader.Loader` objects that the caller
builds (:func:`jaxtl.data.training_loader`, :func:`jaxtl.data.evaluation_loader`); which
evaluation is best and when to stop is :class:`jaxtl.train.tracker.Tracker`'s; what is logged
and timed is :mod:`jaxtl.train.progress`'s. It never forces a device sync per step: step
metrics are fetched once per ``log_every`` steps.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl import parallel, sharding
from jaxtl.adabn import adapt_batch_norm
from jaxtl.checkpoint import Checkpointer, CheckpointWriteError
from jaxtl.data.loader import Loader
from jaxtl.distributed import is_primary
from jaxtl.metrics import detailed as detailed_metrics
from jaxtl.models.base import LoadedModel
from jaxtl.models.common import batch_norm_paths, recompute
from jaxtl.train import precision, steps
from jaxtl.train.config import TrainConfig
from jaxtl.train.faults import BadSteps, Preempted, StopSignals, writable_dir
from jaxtl.train.loggers import Logger, check_installed, open_loggers
from jaxtl.train.losses import TASKS, summarize
from jaxtl.train.progress import Clock, MetricsLog, TrainMetrics, progress_bar
from jaxtl.train.state import TrainState
from jaxtl.train.tracker import Tracker
from jaxtl.transfer import stages
from jaxtl.transfer.optimizer import set_weight_decay
from jaxtl.transfer.plan import Plan
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
        if mesh is not None and tuple(mesh.axis_names) != parallel.AXES:
            raise ValueError(
                f"mesh= has axes {tuple(mesh.axis_names)}; the Trainer places state and batches "
                f"on {parallel.AXES}. Build it with jaxtl.parallel.make_mesh('data=...,fsdp=...') "
                "or pass TrainConfig(mesh=...) instead."
            )
        self.mesh = mesh if mesh is not None else parallel.make_mesh(scale.mesh)
        dtype = precision.compute_dtype(scale.precision, self.mesh.devices.flat[0])
        if scale.remat is not None or dtype != jnp.float32:
            model = recompute(model, remat=scale.remat, dtype=dtype)
        self.model = model
        self.plan = plan
        if config.optim.learning_rate_input and plan.stages:
            raise ValueError(
                f"learning_rate_input scales one schedule's updates, but {plan.name} changes "
                "its optimizer and schedule from stage to stage; train it with "
                "learning_rate_input=False."
            )
        if config.optim.weight_decay_input and plan.stages:
            raise ValueError(
                f"weight_decay_input keeps one optimizer's weight decay as a step input, but "
                f"{plan.name} changes its optimizer from stage to stage; train it with "
                "weight_decay_input=False."
            )
        self.stage_models = dict(stage_models or {})
        for k, m in self.stage_models.items():
            if not 0 <= k < len(stages.plans(plan)):
                raise ValueError(f"stage_models: {plan.name} has no stage {k}.")
            if jax.tree.structure(m.params) != jax.tree.structure(model.params):
                raise ValueError(f"stage_models[{k}] does not have the model's param tree.")
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
        self._compiled = None
        self._schedules = None  # (total steps, stage start steps, each stage's LR schedule)
        self.stage = 0  # the stage of a staged plan the steps are compiled for

    @property
    def devices(self) -> int:
        """The mesh's batch shards (``data`` x ``fsdp``): evaluation batches split over them."""
        return parallel.batch_shards(self.mesh)

    # --- setup ---------------------------------------------------------------------------

    def init_state(self, total_steps: int, *, stage: int = 0) -> TrainState:
        """A fresh state: the model's params, and the plan's optimizer (of ``stage``, for a
        staged plan) over the LR schedule, each leaf placed on the mesh by the sharding
        rules."""
        stored = self._stored_params()
        shapes = self.abstract_state(total_steps, stored, stage=stage)
        placed = jax.tree.map(lambda s: s.sharding, shapes)
        params = jax.device_put(stored, placed.params, may_alias=False)
        batch_stats = jax.device_put(self.model.batch_stats, placed.batch_stats, may_alias=False)
        # The optimizer state is born sharded: no device ever holds a whole copy of it.
        optim = self.config.optim
        peak = None if placed.learning_rate is None else jnp.float32(optim.learning_rate)
        decay = jnp.float32(optim.weight_decay) if optim.weight_decay_input else None
        return jax.jit(self._create, out_shardings=placed)(params, batch_stats, peak, decay)

    def abstract_state(self, total_steps: int, params: Any = None, *, stage: int = 0) -> TrainState:
        """The state :meth:`init_state` builds, as ``jax.ShapeDtypeStruct`` s carrying their
        shardings: nothing is allocated, so a step can be lowered and its memory measured
        (``compile_steps(...)[0].lower(state, batch).compile().memory_analysis()``) for a model
        too large for this machine. ``params``: the params as stored (default: the model's,
        ``frozen_bf16`` applied). ``stage``: which stage of a staged plan
        (:mod:`jaxtl.transfer.stages`). Makes ``stage`` the current one: sets :attr:`specs`
        and :attr:`schedule`, and the steps compile for it.

        Raises:
          jaxtl.transfer.rules.UnmatchedParamsError: the plan leaves a param out.
          jaxtl.sharding.ShardingError: a sharding rule cannot place a param.
        """
        if self._schedules is None or self._schedules[0] != total_steps:
            self._set_schedules(total_steps, None)
        shapes, self.specs, self._create = self._stage_state(stage, params)
        self.stage = stage
        self._compiled = None  # steps compiled for an earlier state hold its optimizer
        return shapes

    def _set_schedules(self, total_steps: int, steps_per_epoch: int | None) -> None:
        """Each stage's LR schedule and :attr:`schedule` (the run's LR at a global step).
        Without ``steps_per_epoch`` (a state built only to restore a checkpoint into), the
        stages are placed one step apart: their schedules do not matter there."""
        n = len(stages.plans(self.plan))
        if steps_per_epoch is None:
            starts, total = list(range(n)), max(total_steps, n)
        else:
            starts, total = stages.starts(self.plan, steps_per_epoch), total_steps
        optim = self.config.optim
        # learning_rate_input: the optimizer runs on the schedule of peak 1; the step scales
        # its updates by the peak (TrainState.learning_rate).
        unit = 1.0 if optim.learning_rate_input else None

        def segment_schedule(steps: int, peak: float | None):
            peak = unit or peak
            config = optim if peak is None else dataclasses.replace(optim, learning_rate=peak)
            return config.lr_schedule(steps)

        per_stage, schedule = stages.stage_schedules(self.plan, starts, total, segment_schedule)
        self.schedule = schedule if unit is None else lambda s: optim.learning_rate * schedule(s)
        self._schedules = (total_steps, starts, per_stage)

    def _stage_state(self, stage: int, params: Any = None):
        """``(abstract state, its specs, create(params, batch_stats))`` of ``stage``; it changes
        no attribute but the LR schedules, which it sets (for templates) when none are."""
        optim = self.config.optim
        if self._schedules is None:
            self._set_schedules(1, None)
        plan = stages.stage_of(self.plan, stage).plan
        plan.labels(self.model.params)  # unmatched params fail here, before compiling
        tx = plan.optimizer(
            self._schedules[2][stage],
            name=optim.optimizer,
            weight_decay=optim.weight_decay,
            clip_norm=optim.clip_norm,
            l2_sp=optim.l2_sp,
            weight_decay_input=optim.weight_decay_input,
            **optim.optimizer_options,
        )
        create = functools.partial(
            TrainState.create,
            apply_fn=self.stage_models.get(stage, self.model).forward,
            tx=tx,
            seed=self.config.seed,
            task=self.model.task,
            bn_train=self.bn_train(plan),
            loss=self.loss,
            trainable=plan.trainable_mask(self.model.params),
        )
        # learning_rate_input: the peak is an argument of the program that builds the state,
        # as of the step, so that no program of the run holds it as a constant.
        peak = jnp.float32(optim.learning_rate) if optim.learning_rate_input else None
        # weight_decay_input: likewise the weight decay, which the optimizer state carries.
        decay = jnp.float32(optim.weight_decay) if optim.weight_decay_input else None

        def make(p, b, lr=peak, wd=decay):
            state = create(params=p, batch_stats=b, learning_rate=lr)
            if wd is None:
                return state
            return state.replace(opt_state=set_weight_decay(state.opt_state, wd))

        params = self._stored_params() if params is None else params
        shapes = jax.eval_shape(make, params, self.model.batch_stats)
        specs = self.state_specs(shapes)  # a rule that cannot place a param fails here
        placed = steps.state_shardings(shapes, self.mesh, specs)
        shapes = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, placed
        )
        return shapes, specs, make

    def checkpoint_like(self, meta: dict) -> dict:
        """The tree a checkpoint with ``meta`` restores into (shapes with shardings): the state
        of the stage it was saved in."""
        return self._template(meta).checkpoint_tree()

    def _template(self, meta: dict) -> TrainState:
        return self._stage_state(int(meta.get("stage", 0)))[0]

    def _enter_stage(self, state: TrainState, stage: int, total_steps: int) -> TrainState:
        """``state`` moved into ``stage``: its optimizer, with the state of unchanged groups
        carried over (:func:`jaxtl.transfer.stages.carry_state`), compiled once."""
        st = stages.stage_of(self.plan, stage)
        shapes = self.abstract_state(total_steps, stage=stage)
        placed = jax.tree.map(lambda s: s.sharding, shapes)
        # Fresh optimizer state comes from the pretrained params (L2-SP's anchors); the moments
        # are zeros whatever they are.
        pretrained = jax.device_put(self._stored_params(), placed.params, may_alias=False)
        first, _ = stages.segment(self.plan, stage, self._schedules[1], total_steps)
        carried: list[str] = []

        def switch(old: TrainState, pretrained: Any) -> TrainState:
            fresh = self._create(pretrained, old.batch_stats)
            opt, names = stages.carry_state(
                old.opt_state, fresh.opt_state, restart=st.restart, count=old.step - first
            )
            carried[:] = names
            return fresh.replace(step=old.step, params=old.params, rng=old.rng, opt_state=opt)

        new = jax.jit(switch, out_shardings=placed, donate_argnums=0)(state, pretrained)
        trains = [g for g, v in st.plan.groups.items() if v.trainable]
        kept = f"; optimizer state kept for {', '.join(carried)}" if carried else ""
        print(
            f"stage {stage} of {self.plan.name} at step {int(new.step)}: trains "
            f"{', '.join(trains)}{kept}",
            file=sys.stderr,
        )
        return new

    def _stored_params(self) -> Any:
        """The model's params as the state stores them (``frozen_bf16``: the params no stage
        trains in bf16)."""
        params = self.model.params
        if self.config.scale.frozen_bf16:
            params = precision.cast_frozen(params, stages.trained_anywhere(self.plan, params))
        return params

    def state_specs(self, state: Any) -> Any:
        """Where each leaf of ``state`` (arrays or shapes) lives: ``config.scale``'s sharding
        rules, then the family's defaults (:func:`jaxtl.sharding.train_state_specs`)."""
        scale = self.config.scale
        return sharding.train_state_specs(
            state,
            self.mesh,
            scale.sharding_rules,
            structure=self.model.structure,
            min_shard_size=scale.min_shard_size,
        )

    def bn_train(self, plan: Plan | None = None) -> tuple[str, ...]:
        """The BatchNorm layers that train: those whose scale/bias ``plan`` (default: the
        current stage's) trains, or every one with ``config.train_bn``. The rest run in
        inference mode with their running statistics, so a frozen BatchNorm backbone is the
        same fixed function it was when pretrained."""
        layers = batch_norm_paths(self.model.batch_stats)
        if self.config.train_bn:
            return layers
        plan = plan or stages.stage_of(self.plan, self.stage).plan
        mask = flatten(plan.trainable_mask(self.model.params))
        return tuple(
            p for p in layers if any(mask.get(f"{p}/{leaf}", False) for leaf in ("scale", "bias"))
        )

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
        if self._compiled is None:
            self._compiled = steps.compile_steps(
                state, self.mesh, self.specs, grad_accum=self.config.scale.grad_accum
            )
        return self._compiled

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
            latest cannot be read), and deletes the checkpoints after it.
          stop_at: stop after this global step, checkpointed, as if preempted: the LR schedule
            and data order still follow the full run, so a later ``resume`` finishes it exactly.
          stage_data: ``{stage: (train, val)}`` for the stages of ``stage_models``: the same
            examples in the same order, as those stages' models read them.
        """
        cfg = self.config
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
        self._set_schedules(total, spe)  # a staged plan's stages that collide fail here
        starts = self._schedules[1]
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
        ckpt = self._checkpointer(has_val=val is not None)
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
                        state = self._enter_stage(state, self.stage + 1, total)
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
        es = cfg.checkpoint.early_stopping
        restore = val is not None and (cfg.checkpoint.restore_best or bool(es and es.restore_best))
        return run.finish(state, step, restore=restore)

    def _checkpointer(self, has_val: bool) -> Checkpointer | None:
        if not self.workdir:
            return None
        metric, mode = self.monitor
        return Checkpointer(
            os.path.join(self.workdir, "checkpoints"),
            max_to_keep=self.config.checkpoint.max_to_keep,
            best_metric=metric if has_val else None,
            best_mode=mode,
        )

    def _resume(self, state, ckpt, loaders, tracker: Tracker, total: int, resume: bool | int):
        """The checkpoint's state (in the stage it was saved in) and its metadata, with the
        tracker restored: the latest (``resume=True``) if ``workdir`` has one, else
        ``(state, {})``; or step ``resume``, which must exist."""
        explicit = resume is not True
        if explicit and (isinstance(resume, bool) or not isinstance(resume, int) or resume < 1):
            raise ValueError(f"resume must be True, False or a step >= 1, got {resume!r}.")
        if explicit and ckpt is None:
            raise ValueError(f"resume={resume} (--resume-from) needs the run's workdir (--out).")
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
            if improved and self.ckpt is None and self.cfg.checkpoint.restore_best:
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
                tree, _ = ckpt.restore_best(self.trainer.checkpoint_like)
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
