"""What a run's train state is, stage by stage: the plan's optimizer over its LR schedules, the
params as the state stores them, and where every leaf lives on the mesh.

:class:`StateBuilder` is the half of :class:`jaxtl.train.Trainer` that builds states (fresh,
abstract for lowering or restoring, or moved into the next stage of a staged plan); the
Trainer's loop only feeds them to the compiled steps (:mod:`jaxtl.train.steps`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxtl import parallel, sharding
from jaxtl.models.base import LoadedModel
from jaxtl.models.common import batch_norm_paths
from jaxtl.train import precision, steps
from jaxtl.train.config import TrainConfig
from jaxtl.train.state import TrainState
from jaxtl.transfer import stages
from jaxtl.transfer.optimizer import set_schedule, set_weight_decay
from jaxtl.transfer.plan import Plan
from jaxtl.transfer.trees import flatten

__all__ = ["StateBuilder"]


class StateBuilder:
    """Builds the train states of one run of ``model`` under ``plan`` and ``config`` on ``mesh``.

    Args and checks as :class:`jaxtl.train.Trainer`'s (which makes one): ``stage_models``
    gives the forward of a stage that runs another model over the same params; ``loss`` a
    custom objective.

    Attributes:
      stage: the stage of a staged plan the last built state belongs to (0 for a plain plan).
      specs: that state's ``PartitionSpec`` tree (the compiled steps' shardings).
      schedule: the run's learning rate at a global step.
      create: ``create(params, batch_stats, ...)`` -> that stage's fresh state.

    Raises:
      ValueError: a staged plan with ``learning_rate_input``, ``weight_decay_input`` or
        ``release_pretrained``, or ``stage_models`` that are not stages of the plan over the
        model's param tree.
    """

    def __init__(
        self,
        model: LoadedModel,
        plan: Plan,
        config: TrainConfig,
        mesh: jax.sharding.Mesh,
        *,
        stage_models: Mapping[int, LoadedModel] | None = None,
        loss: Callable[..., Any] | None = None,
    ):
        if config.optim.learning_rate_input and plan.stages:
            raise ValueError(
                f"learning_rate_input keeps one schedule's numbers as a step input, but "
                f"{plan.name} changes its optimizer and schedule from stage to stage; train it "
                "with learning_rate_input=False."
            )
        if config.optim.weight_decay_input and plan.stages:
            raise ValueError(
                f"weight_decay_input keeps one optimizer's weight decay as a step input, but "
                f"{plan.name} changes its optimizer from stage to stage; train it with "
                "weight_decay_input=False."
            )
        if config.scale.release_pretrained and plan.stages:
            raise ValueError(
                f"release_pretrained (--release-pretrained) drops the loaded model's params "
                f"once training starts, but {plan.name}'s later stages start from them; train "
                "it without release_pretrained."
            )
        self.stage_models = dict(stage_models or {})
        for k, m in self.stage_models.items():
            if not 0 <= k < len(stages.plans(plan)):
                raise ValueError(f"stage_models: {plan.name} has no stage {k}.")
            if jax.tree.structure(m.params) != jax.tree.structure(model.params):
                raise ValueError(f"stage_models[{k}] does not have the model's param tree.")
        self.model, self.plan, self.config, self.mesh, self.loss = model, plan, config, mesh, loss
        self.schedules = None  # (total steps, stage start steps, each stage's LR schedule)
        self.schedule: Callable[[Any], Any] | None = None
        self.specs: Any = None
        self.create: Callable[..., TrainState] | None = None
        self.stage = 0

    @property
    def starts(self) -> list[int]:
        """The global step at which each stage starts (after :meth:`set_schedules`)."""
        return self.schedules[1]

    def init_state(self, total_steps: int, *, stage: int = 0) -> TrainState:
        """A fresh state: the model's params, and the plan's optimizer (of ``stage``, for a
        staged plan) over the LR schedule, each leaf placed on the mesh by the sharding
        rules. With ``release_pretrained`` the model then gives up its param arrays.

        Raises:
          ValueError: the model's params were released to an earlier state.
        """
        self.model.own_params("Trainer.init_state")  # released to an earlier state: an error
        stored = self.stored_params()
        shapes = self.abstract_state(total_steps, stored, stage=stage)
        placed = jax.tree.map(lambda s: s.sharding, shapes)
        params = parallel.copy_to(stored, placed.params)
        if self.config.scale.release_pretrained:  # the state's copy is the only one kept
            del stored
            self.model.release_params()
        batch_stats = parallel.copy_to(self.model.batch_stats, placed.batch_stats)
        # The optimizer state is born sharded: no device ever holds a whole copy of it.
        schedule, decay = self.inputs(stage)
        # ``params`` is this call's own copy: the state takes its buffers over (donated) rather
        # than copying them a third time while the model's and this copy are still resident.
        create = jax.jit(self.create, out_shardings=placed, donate_argnums=(0,))
        return create(params, batch_stats, schedule, decay)

    def abstract_state(self, total_steps: int, params: Any = None, *, stage: int = 0) -> TrainState:
        """The state :meth:`init_state` builds, as ``jax.ShapeDtypeStruct`` s carrying their
        shardings: nothing is allocated, so a step can be lowered and its memory measured
        (``compile_steps(...)[0].lower(state, batch).compile().memory_analysis()``) for a model
        too large for this machine. ``params``: the params as stored (default: the model's,
        ``frozen_bf16`` applied). ``stage``: which stage of a staged plan
        (:mod:`jaxtl.transfer.stages`). Makes ``stage`` the current one: sets :attr:`specs`
        and :attr:`schedule` (a Trainer compiles its steps anew for it).

        Raises:
          jaxtl.transfer.rules.UnmatchedParamsError: the plan leaves a param out.
          jaxtl.sharding.ShardingError: a sharding rule cannot place a param.
        """
        if self.schedules is None or self.schedules[0] != total_steps:
            self.set_schedules(total_steps, None)
        shapes, self.specs, self.create = self.stage_state(stage, params)
        self.stage = stage
        return shapes

    def set_schedules(self, total_steps: int, steps_per_epoch: int | None) -> None:
        """Each stage's LR schedule and :attr:`schedule` (the run's LR at a global step).
        Without ``steps_per_epoch`` (a state built only to restore a checkpoint into), the
        stages are placed one step apart: their schedules do not matter there."""
        n = len(stages.plans(self.plan))
        if steps_per_epoch is None:
            starts, total = list(range(n)), max(total_steps, n)
        else:
            starts, total = stages.starts(self.plan, steps_per_epoch), total_steps
        optim = self.config.optim

        def segment_schedule(steps: int, peak: float | None):
            config = optim if peak is None else dataclasses.replace(optim, learning_rate=peak)
            return config.lr_schedule(steps)

        per_stage, self.schedule = stages.stage_schedules(
            self.plan, starts, total, segment_schedule
        )
        self.schedules = (total_steps, starts, per_stage)

    def inputs(self, stage: int) -> tuple[Any, Any]:
        """The numbers a state of ``stage`` takes as data rather than program constants:
        ``(peak, warmup, total)`` of its LR schedule (``learning_rate_input``) and the weight
        decay (``weight_decay_input``), each None when off."""
        optim = self.config.optim
        schedule = self.schedules[2][stage].numbers() if optim.learning_rate_input else None
        decay = jnp.float32(optim.weight_decay) if optim.weight_decay_input else None
        return schedule, decay

    def stage_state(self, stage: int, params: Any = None):
        """``(abstract state, its specs, create(params, batch_stats))`` of ``stage``; it changes
        no attribute but the LR schedules, which it sets (for templates) when none are."""
        optim = self.config.optim
        if self.schedules is None:
            self.set_schedules(1, None)
        plan = stages.stage_of(self.plan, stage).plan
        plan.labels(self.model.params)  # unmatched params fail here, before compiling
        tx = plan.optimizer(
            self.schedules[2][stage],
            name=optim.optimizer,
            weight_decay=optim.weight_decay,
            clip_norm=optim.clip_norm,
            l2_sp=optim.l2_sp,
            weight_decay_input=optim.weight_decay_input,
            schedule_input=optim.learning_rate_input,
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
        # learning_rate_input / weight_decay_input: the numbers the optimizer state carries are
        # arguments of the program that builds the state, as of the step, so that no program
        # of the run holds them as constants.
        schedule, decay = self.inputs(stage)

        def make(p, b, lr=schedule, wd=decay):
            state = create(params=p, batch_stats=b)
            opt_state = state.opt_state
            if lr is not None:
                opt_state = set_schedule(opt_state, lr)
            if wd is not None:
                opt_state = set_weight_decay(opt_state, wd)
            return state.replace(opt_state=opt_state)

        params = self.stored_params() if params is None else params
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
        return self.stage_state(int(meta.get("stage", 0)))[0].checkpoint_tree()

    def enter_stage(self, state: TrainState, stage: int, total_steps: int) -> TrainState:
        """``state`` moved into ``stage``: its optimizer, with the state of unchanged groups
        carried over (:func:`jaxtl.transfer.stages.carry_state`), compiled once."""
        st = stages.stage_of(self.plan, stage)
        shapes = self.abstract_state(total_steps, stage=stage)
        placed = jax.tree.map(lambda s: s.sharding, shapes)
        # Fresh optimizer state comes from the pretrained params (L2-SP's anchors); the moments
        # are zeros whatever they are.
        pretrained = parallel.copy_to(self.stored_params(), placed.params)
        first, _ = stages.segment(self.plan, stage, self.schedules[1], total_steps)
        carried: list[str] = []

        def switch(old: TrainState, pretrained: Any) -> TrainState:
            fresh = self.create(pretrained, old.batch_stats)
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

    def stored_params(self) -> Any:
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
