"""A sweep's grid and results: the ``--lr`` / ``--weight-decay`` / ``--seeds`` values checked,
one :class:`SweepCell` per run, the best cell and the table.

Example:
  >>> parse_grid("1e-4, 3e-4", "--lr"), parse_grid("0,1", "--seeds")
  ([0.0001, 0.0003], [0, 1])
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jaxtl.report import format_table as _table

__all__ = [
    "GRID_FLAGS",
    "SweepCell",
    "best_cell",
    "check_grid",
    "format_table",
    "grid_cells",
    "parse_grid",
    "plot",
]

# The Python argument of each grid and the flag of `jaxtl sweep` that sets it.
GRID_FLAGS = {"lrs": "--lr", "weight_decays": "--weight-decay", "seeds": "--seeds"}
_EXAMPLES = {"lrs": "1e-4,3e-4", "weight_decays": "0,1e-2", "seeds": "0,1,2"}


@dataclasses.dataclass
class SweepCell:
    """One cell of a sweep and the outcome of its run.

    Attributes:
      learning_rate: the peak learning rate (``--lr``).
      weight_decay: the decay of trainable matrices (``--weight-decay``).
      seed: the run's seed: its new head's init, dropout and data order.
      validation: the best validation evaluation (``{"step", "epoch", "val_loss",
        "val_accuracy", ...}``, by the run's improvement metric): the one restore-best returns.
        None when the run failed.
      test: the test split scored with the returned params (``loss``, ``accuracy`` for
        classification, ``examples``).
      steps: optimizer steps taken.
      stopped_early: early stopping ended the run.
      error: why the run failed (e.g. non-finite steps), else None.
      params: the returned params: the head's subtree for :func:`sweep_heads` (every other param
        is the loaded model's, untouched), the whole tree for :func:`sweep_sequential`.
    """

    learning_rate: float
    weight_decay: float
    seed: int
    validation: dict | None
    test: dict
    steps: int
    stopped_early: bool = False
    error: str | None = None
    params: Any = dataclasses.field(repr=False, default=None)

    def to_dict(self) -> dict:
        """Everything but the params, for JSON."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "params"
        }


def parse_grid(text: str, flag: str) -> list[float] | list[int]:
    """A grid flag of ``jaxtl sweep`` as values: ``--lr`` and ``--weight-decay`` take
    comma-separated numbers, ``--seeds`` whole numbers; each checked by :func:`check_grid`.

    Args:
      text: the flag's value, e.g. ``"1e-4,3e-4"``.
      flag: ``"--lr"``, ``"--weight-decay"`` or ``"--seeds"``.

    Raises:
      ValueError: an empty grid, a value that is not a number, or one :func:`check_grid` refuses.
    """
    names = {f: n for n, f in GRID_FLAGS.items()}
    if flag not in names:
        raise ValueError(f"parse_grid: flag must be one of {sorted(names)}, got {flag!r}.")
    name = names[flag]
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ValueError(
            f"{name} ({flag}) is empty: give at least one value, e.g. {flag} {_EXAMPLES[name]}."
        )
    if not all(parts):
        raise ValueError(f"{name} ({flag}) has an empty entry in {text!r}; e.g. {_EXAMPLES[name]}.")
    convert = int if name == "seeds" else float
    values = []
    for p in parts:
        try:
            values.append(convert(p))
        except ValueError:
            kind = "whole numbers" if name == "seeds" else "numbers"
            raise ValueError(
                f"{name} ({flag}) takes comma-separated {kind}, e.g. {_EXAMPLES[name]}; "
                f"{p!r} in {text!r} is not one."
            ) from None
    return check_grid(**{name: values})[list(GRID_FLAGS).index(name)]


def check_grid(
    lrs: Iterable[float] = (1.0,),
    weight_decays: Iterable[float] = (0.0,),
    seeds: Iterable[int] = (0,),
) -> tuple[list[float], list[float], list[int]]:
    """The three grids, checked: each non-empty and without repeats, learning rates finite and
    > 0, weight decays finite and >= 0, seeds whole numbers >= 0.

    Raises:
      ValueError: naming the argument and its flag (``lrs (--lr)``, ...) and what to give.
    """
    out = []
    for name, values in (("lrs", lrs), ("weight_decays", weight_decays), ("seeds", seeds)):
        flag = GRID_FLAGS[name]
        if isinstance(values, str):
            raise ValueError(
                f"{name} ({flag}) takes a list of numbers, not the text {values!r}; parse a "
                f"flag's text with parse_grid(text, {flag!r})."
            )
        values = list(values)
        if not values:
            raise ValueError(
                f"{name} ({flag}) is empty: give at least one value, e.g. {flag} {_EXAMPLES[name]}."
            )
        for v in values:
            integral = isinstance(v, int | np.integer) and not isinstance(v, bool)
            number = integral or isinstance(v, float | np.floating)
            if name == "seeds" and not (integral and v >= 0):
                raise ValueError(f"{name} ({flag}) takes whole numbers >= 0; got {v!r}.")
            if not number or not math.isfinite(v):
                raise ValueError(f"{name} ({flag}) takes finite numbers; got {v!r}.")
            if name == "lrs" and not v > 0:
                raise ValueError(f"{name} ({flag}): every learning rate must be > 0; got {v!r}.")
            if name == "weight_decays" and v < 0:
                raise ValueError(f"{name} ({flag}): every weight decay must be >= 0; got {v!r}.")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} ({flag}) names a value twice: {values}.")
        out.append([int(v) for v in values] if name == "seeds" else [float(v) for v in values])
    return out[0], out[1], out[2]


def grid_cells(lrs, weight_decays, seeds) -> list[tuple[float, float, int]]:
    """The cells in table order: learning rate, then weight decay, then seed."""
    return list(itertools.product(*check_grid(lrs, weight_decays, seeds)))


def _ranking(cells: Sequence[SweepCell], metric: str | None, mode: str | None):
    """``(metric, mode)``: the one given, else the runs' default improvement rule
    (``val_accuracy`` when the cells report it, else ``val_loss``)."""
    if metric is None:
        scored = [c.validation for c in cells if c.validation]
        metric = "val_accuracy" if any("val_accuracy" in v for v in scored) else "val_loss"
    if mode is None:
        mode = "min" if metric.endswith(("loss", "perplexity")) else "max"
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
    return metric, mode


def best_cell(
    cells: Sequence[SweepCell], metric: str | None = None, mode: str | None = None
) -> SweepCell:
    """The cell with the best validation ``metric``: a validation record's name, e.g.
    ``"val_accuracy"`` (default for classification, higher is better) or ``"val_loss"``
    (default for regression, lower is better). Ties go to the first cell in grid order; failed
    cells never win.

    Raises:
      ValueError: no cell finished, or ``metric`` is not in the cells' validation records.

    Example:
      >>> cells = [SweepCell(1e-3, 0.0, 0, {"val_accuracy": 0.8}, {}, 10),
      ...          SweepCell(3e-3, 0.0, 0, {"val_accuracy": 0.9}, {}, 10)]
      >>> best_cell(cells).learning_rate
      0.003
    """
    finished = [c for c in cells if c.error is None and c.validation]
    if not finished:
        raise ValueError("best_cell: no cell of the sweep finished with a validation score.")
    metric, mode = _ranking(finished, metric, mode)
    missing = [c for c in finished if metric not in c.validation]
    if missing:
        names = sorted(k for k in missing[0].validation if k.startswith("val_"))
        raise ValueError(f"best_cell: {metric!r} is not a validation metric here; one of {names}.")
    sign = 1.0 if mode == "max" else -1.0
    return max(finished, key=lambda c: sign * c.validation[metric])  # max keeps the first tie


def format_table(
    cells: Sequence[SweepCell], metric: str | None = None, mode: str | None = None
) -> str:
    """A table of the sweep, one row per cell, the best (:func:`best_cell`) marked ``*``:
    learning rate, weight decay, seed, the best validation evaluation's metrics and step,
    and the test metrics of the returned params."""
    ok = [c for c in cells if c.error is None and c.validation]
    best = best_cell(ok, metric, mode) if ok else None
    accuracy = any("accuracy" in c.test for c in cells)
    headers = ["", "lr", "weight decay", "seed", "val loss"]
    headers += ["val acc"] if accuracy else []
    headers += ["best step", "test loss"] + (["test acc"] if accuracy else []) + ["note"]
    rows = []
    for c in cells:
        v, t = c.validation or {}, c.test
        row = ["*" if c is best else "", f"{c.learning_rate:g}", f"{c.weight_decay:g}", c.seed]
        row += [_num(v.get("val_loss"))] + ([_num(v.get("val_accuracy"))] if accuracy else [])
        row += [v.get("step"), _num(t.get("loss"))]
        row += [_num(t.get("accuracy"))] if accuracy else []
        row += [c.error or ("stopped early" if c.stopped_early else "")]
        rows.append(row)
    return _table(headers, rows)


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def plot(cells: Sequence[SweepCell], out_path: str, metric: str | None = None) -> str:
    """Validation ``metric`` against learning rate (log scale), one line per weight decay
    through the mean over seeds, each seed's cell a dot; the best cell circled."""
    from jaxtl.report import _pyplot, save_figure

    ok = [c for c in cells if c.error is None and c.validation]
    if not ok:
        raise ValueError("plot: no cell of the sweep finished with a validation score.")
    metric, _ = _ranking(ok, metric, None)
    best = best_cell(ok, metric)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, wd in enumerate(dict.fromkeys(c.weight_decay for c in ok)):
        mine = [c for c in ok if c.weight_decay == wd]
        lrs = sorted({c.learning_rate for c in mine})
        means = [
            np.mean([c.validation[metric] for c in mine if c.learning_rate == lr]) for lr in lrs
        ]
        ax.plot(lrs, means, marker="o", color=f"C{i}", label=f"weight decay {wd:g}")
        ax.plot([c.learning_rate for c in mine], [c.validation[metric] for c in mine], ".",
                color=f"C{i}", alpha=0.5)  # fmt: skip
    ax.plot([best.learning_rate], [best.validation[metric]], "o", markersize=14,
            markerfacecolor="none", color="black", label="best")  # fmt: skip
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel=metric.replace("_", " "), title="Sweep (dots: seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_path)
