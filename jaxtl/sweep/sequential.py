"""A sweep of any recipe, one run per cell through :func:`jaxtl.run.finetune`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from jaxtl import feature_cache
from jaxtl.data import images, sources
from jaxtl.sweep.grid import SweepCell, grid_cells
from jaxtl.sweep.heads import LoadModel
from jaxtl.train import TrainConfig
from jaxtl.transfer.plan import Plan
from jaxtl.transfer.recipes import make_plan

__all__ = ["sweep_sequential"]


def sweep_sequential(
    load_model: LoadModel,
    data: sources.TextSplits | images.ImageSplits,
    *,
    recipe: str | Plan,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    seeds: Sequence[int],
    config: TrainConfig | None = None,
    workdir: str | None = None,
    long_texts: str = "truncate",
    verbose: bool = True,
) -> list[SweepCell]:
    """Run every cell of ``lrs x weight_decays x seeds`` with :func:`jaxtl.run.finetune`, one
    after another: any recipe (those that train the backbone too).

    Each cell's learning-rate schedule and weight decay are inputs of its compiled step
    (``OptimConfig.learning_rate_input`` and ``weight_decay_input``; not for staged recipes;
    the same updates as with constants, to the bit for the schedule on CPU),
    so every cell, whatever its learning rate, weight decay and seed, compiles the same
    program: with XLA's persistent compilation cache on (``jaxtl sweep`` turns it on; from
    Python, ``jax.config.update("jax_compilation_cache_dir", DIR)``), the first cell compiles
    it and the others read it back.

    Args:
      load_model: ``seed -> model`` with its new head drawn from ``seed``; called once per seed
        (per cell with ``release_pretrained``, and each call must then load the model again).
      data: train/validation/test splits.
      recipe: any recipe (``"full"``, ``"last_n(2)"``, ...).
      lrs: peak learning rates (``--lr``), each > 0.
      weight_decays: weight decays (``--weight-decay``), each >= 0.
      seeds: seeds (``--seeds``).
      config: everything else; its learning rate, weight decay and seed are the cells'. With
        ``data.feature_cache`` on, the frozen prefix's features are computed once for all cells.
      workdir: a directory for one run directory per cell (``lr<lr>-wd<wd>-seed<s>``); None:
        in memory.
      long_texts: ``"truncate"`` or ``"error"``.
      verbose: print each run's plan and progress.

    Returns:
      One :class:`SweepCell` per cell (``params``: the whole trained tree), in the order of
      :func:`sweep_heads`.
    """
    from jaxtl.run import finetune
    from jaxtl.train.faults import NonFiniteStepsError

    cells = grid_cells(lrs, weight_decays, seeds)
    config = config or TrainConfig()
    models = {cells[0][2]: load_model(cells[0][2])}
    plan = make_plan(recipe, models[cells[0][2]].structure)  # a bad recipe fails here
    # As in jaxtl.experiment: the cache serves recipes that leave a frozen prefix; for the
    # others (full) it is off rather than an error.
    cache = config.data.feature_cache if feature_cache.applies(models[cells[0][2]], plan) else None
    out = []
    for lr, wd, s in cells:
        if s not in models or models[s].released:  # release_pretrained: one load per cell
            models[s] = load_model(s)
        # The learning rate and weight decay as step inputs: every cell compiles one program,
        # which the persistent compilation cache hands on.
        optim = dataclasses.replace(
            config.optim,
            learning_rate=lr,
            weight_decay=wd,
            learning_rate_input=not plan.stages,
            weight_decay_input=not plan.stages,
        )
        cell_config = dataclasses.replace(
            config, seed=s, optim=optim, data=dataclasses.replace(config.data, feature_cache=cache)
        )
        name = f"lr{lr:g}-wd{wd:g}-seed{s}"
        run_dir = os.path.join(workdir, name) if workdir else None
        try:
            result = finetune(
                models[s], recipe, data, cell_config, run_dir, name=name,
                long_texts=long_texts, verbose=verbose,
            )  # fmt: skip
        except NonFiniteStepsError as e:  # this cell diverged; the others still run
            out.append(SweepCell(lr, wd, s, None, {}, e.steps[-1], error=str(e)))
            continue
        test = {m: v for m, v in result.test.items() if m in ("loss", "accuracy", "examples")}
        cell = SweepCell(lr, wd, s, result.best, test, result.steps, result.stopped_early)
        out.append(dataclasses.replace(cell, params=result.params))
    return out
