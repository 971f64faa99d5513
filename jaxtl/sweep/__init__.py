"""Hyperparameter sweeps: learning rate x weight decay x seed, each cell a fine-tuning run.

A frozen-backbone recipe (``linear_probe``) trains only the head, and what the head reads is a
fixed array per example (:mod:`jaxtl.feature_cache`). :func:`sweep_heads` trains the heads of
all K cells at once: one jitted step ``jax.vmap``-ed over K heads, each with its own learning
rate schedule, weight decay and seed (its new head's init, dropout, data order), on features
computed once. Each head follows exactly the run a user would start for its cell,
``jaxtl.finetune(load_model(seed), "linear_probe", data, config)`` with that learning rate,
weight decay and seed and ``feature_cache="memory"``: the same tail model, ``TrainState``,
:func:`jaxtl.train.steps.train_step`, plan optimizer (AdamW through ``optax.partition``,
clipping, biases never decayed), LR schedule, batch order, evaluations, restore-best and early
stopping (tests/test_sweep.py compares the params). Only the frozen backbone is shared.

:func:`sweep_sequential` runs any recipe, one cell after another, through
:func:`jaxtl.run.finetune`. The learning rate and weight decay are inputs of the compiled step
(not constants of its program; not for staged recipes), so every cell compiles the same program
and XLA's persistent compilation cache hands it from one cell to the next; the feature cache,
when on, is computed once and read by every later cell.

The grid, its cells and the table are in :mod:`jaxtl.sweep.grid`, the vmapped heads in
:mod:`jaxtl.sweep.heads`, the one-run-per-cell sweep in :mod:`jaxtl.sweep.sequential`.
"""

from jaxtl.sweep.grid import (
    GRID_FLAGS,
    SweepCell,
    best_cell,
    check_grid,
    format_table,
    parse_grid,
    plot,
)
from jaxtl.sweep.heads import sweep_heads, vmappable
from jaxtl.sweep.sequential import sweep_sequential

__all__ = [
    "GRID_FLAGS",
    "SweepCell",
    "best_cell",
    "check_grid",
    "format_table",
    "parse_grid",
    "plot",
    "sweep_heads",
    "sweep_sequential",
    "vmappable",
]
