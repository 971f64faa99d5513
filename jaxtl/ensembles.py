"""Weight-space ensembles of finished runs: WiSE-FT and model soups (Wortsman et al. 2022).

:func:`wise_ft` interpolates a run's pretrained and fine-tuned weights,
``theta(alpha) = (1 - alpha) * theta_0 + alpha * theta``, scores every alpha on the validation
split (and the test split, shown but never used to choose), picks the best by validation, and
writes the table, a plot of the metric against alpha, and the chosen weights as a run directory
of their own (``jaxtl evaluate`` and ``jaxtl export`` read it like any run).

:func:`soup` averages runs fine-tuned from the same pretrained model with the same recipe: the
uniform soup (all of them) and the greedy soup (by validation score, best first, each next run
kept only if the average does not score worse on validation).

What ``theta_0`` is for each kind of leaf:

* a param the run loaded from the checkpoint: its pretrained value;
* a param the run created (a new head): the fine-tuned value, since the pretrained model has no
  head for this task (so alpha moves the backbone only);
* a LoRA run's ``lora_b``: zero (and ``lora_a`` its fine-tuned value), so ``theta(alpha)`` is
  the base plus ``alpha`` times the learned update ``B A``;
* BatchNorm statistics: interpolated like the params (an approximation: the statistics of
  interpolated weights are not the interpolated statistics).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl import parallel, report
from jaxtl.distributed import is_primary
from jaxtl.transfer import lora as tl
from jaxtl.transfer.trees import flatten, unflatten

__all__ = ["DEFAULT_ALPHAS", "soup", "wise_ft"]

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
# What identifies "the same pretrained model and head" in a run.json's model record.
_SAME = (
    "path",
    "task",
    "num_labels",
    "pooling",
    "image_size",
    "in_channels",
    "head",
    "drop_blocks",
)


def _mode(metric: str) -> str:
    return "max" if metric == "accuracy" else "min"


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if _mode(metric) == "max" else a < b


class _Scorer:
    """A restored run's model, with its data encoded once, scoring any params on its splits."""

    def __init__(self, run_dir: str, which: str):
        from jaxtl.data import resolve
        from jaxtl.data.loader import evaluation_loader
        from jaxtl.encoding import encode_splits
        from jaxtl.run import restore_run

        self.run = restore_run(run_dir, which)
        info = self.run.info
        data = resolve(info["data"], num_labels=self.run.model.num_labels, task=self.run.model.task)
        arrays, _ = encode_splits(self.run.model, data)
        config = self.run.config.data
        devices = self.run.trainer.devices
        self.loaders = {s: evaluation_loader(arrays[s], config, devices=devices) for s in arrays}
        self.metric: str | None = None

    def _state(self, params: Any, batch_stats: Any) -> Any:
        """The restored state holding ``params`` and ``batch_stats`` (host trees), in the
        state's dtypes and placed where its own leaves live."""
        state = self.run.state
        cast = jax.tree.map(lambda x, like: jnp.asarray(x, like.dtype), params, state.params)
        return state.replace(
            params=parallel.put_like(cast, state.params),
            batch_stats=parallel.put_like(batch_stats, state.batch_stats),
        )

    def score(self, params: Any, batch_stats: Any, splits=("validation", "test")) -> dict:
        state = self._state(params, batch_stats)
        out = {s: self.run.trainer.evaluate(state, self.loaders[s]) for s in splits}
        if self.metric is None:
            self.metric = report.headline_metric(out[splits[0]])
        return out

    def save(self, out: str, params: Any, batch_stats: Any, record: dict) -> str:
        """``out`` as a run directory: the source's run.json (plus ``record``) and a checkpoint
        of ``params`` (the rest of the state, e.g. optimizer moments, the source run's)."""
        from jaxtl.checkpoint import Checkpointer

        os.makedirs(out, exist_ok=True)
        state = self._state(params, batch_stats)
        info = {**self.run.info, **record}
        if is_primary():
            with open(os.path.join(out, "run.json"), "w") as f:
                json.dump(info, f, indent=2, default=str)
        ckpt = Checkpointer(os.path.join(out, "checkpoints"), best_metric="score")
        try:
            # The stage of the restored run's state: a staged run's optimizer state is that
            # stage's, and a restore builds its template from this (Trainer.checkpoint_like).
            meta = {**record, "stage": self.run.trainer.stage}
            ckpt.save(int(state.step), state.checkpoint_tree(), meta, metrics={"score": 0.0})
            ckpt.wait()
        finally:
            ckpt.close()
        return out


def _host(tree: Any) -> dict[str, np.ndarray]:
    return {p: np.asarray(v, np.float32) for p, v in flatten(parallel.to_host(tree)).items()}


def _start(scorer: _Scorer) -> tuple[dict, dict]:
    """``theta_0`` (params, BatchNorm statistics) of a restored run, per the module docstring."""
    from jaxtl.run import load_recorded, with_adapters
    from jaxtl.transfer.recipes import make_plan

    m = scorer.run.info["model"]
    pretrained = load_recorded(m)
    new = set(pretrained.report.initialized) | {x.path for x in pretrained.report.mismatched}
    plan = make_plan(scorer.run.info["recipe"], pretrained.structure)
    start = with_adapters(pretrained, plan, scorer.run.config.seed)
    tuned = _host(scorer.run.state.params)
    theta0 = {}
    for path, value in _host(start.params).items():
        leaf = path.rpartition("/")[2]
        if leaf == tl.LORA_B:
            theta0[path] = np.zeros_like(tuned[path])
        elif path in new or leaf == tl.LORA_A:
            theta0[path] = tuned[path]
        else:
            theta0[path] = value
    return theta0, _host(pretrained.batch_stats)


def _mix(a: dict, b: dict, alpha: float) -> dict:
    return {p: (1 - alpha) * a[p] + alpha * b[p] for p in a}


def _plot(path: str, alphas, val, test, metric: str, chosen: float) -> None:
    from jaxtl.report import _pyplot, save_figure

    fig, ax = _pyplot().subplots(figsize=(6, 4))
    ax.plot(alphas, val, marker="o", label=f"validation {metric}")
    ax.plot(alphas, test, marker="s", label=f"test {metric}")
    ax.axvline(chosen, color="gray", linestyle="--", label=f"chosen alpha {chosen:g}")
    ax.set(xlabel="alpha (0: pretrained, 1: fine-tuned)", ylabel=metric, title="WiSE-FT")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def _check_alphas(alphas: Sequence[float]) -> list[float]:
    values = [float(a) for a in alphas]
    if not values or any(not 0 <= a <= 1 for a in values):
        raise ValueError(
            f"alphas (--alphas) must be numbers in [0, 1] (0: pretrained, 1: fine-tuned), "
            f"got {list(alphas)!r}."
        )
    return sorted(set(values))


def wise_ft(
    run_dir: str,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    out: str | None = None,
    which: str = "best",
    verbose: bool = True,
) -> dict:
    """WiSE-FT of a finished run (see the module docstring).

    Args:
      run_dir: a run directory written by ``jaxtl finetune``.
      alphas: the mixing weights to score, each in [0, 1].
      out: where the chosen model goes as a run directory; default ``RUN_DIR/wise-ft``.
      which: the run's ``"best"`` or ``"latest"`` checkpoint.
      verbose: print the table.

    Returns:
      ``{"alpha", "metric", "rows": [{"alpha", "validation", "test"}], "out", "plot"}``, also
      written to ``OUT/wise_ft.json``.
    """
    alphas = _check_alphas(alphas)
    out = _output_dir(out, os.path.join(run_dir, "wise-ft"), "WiSE-FT model")
    scorer = _Scorer(run_dir, which)
    theta0, stats0 = _start(scorer)
    tuned, stats = _host(scorer.run.state.params), _host(scorer.run.state.batch_stats)
    same = lambda a, b: all(np.array_equal(a[p], b[p]) for p in a)  # noqa: E731
    if same(theta0, tuned) and same(stats0, stats):
        raise ValueError(
            f"{run_dir} changed only what it added (recipe {scorer.run.info.get('recipe')!r}: "
            "a new head), which WiSE-FT keeps as trained at every alpha, so every alpha would "
            "score the same model. WiSE-FT mixes a fine-tuned backbone with the pretrained one: "
            "give it a run that trained the backbone (--recipe full, last_n(k), lora(r), ...)."
        )
    rows, best = [], None
    for alpha in alphas:
        scores = scorer.score(
            unflatten(_mix(theta0, tuned, alpha)), unflatten(_mix(stats0, stats, alpha))
        )
        metric = scorer.metric
        row = {"alpha": alpha, "validation": scores["validation"], "test": scores["test"]}
        rows.append(row)
        if best is None or _better(metric, row["validation"][metric], best["validation"][metric]):
            best = row
    metric = scorer.metric
    chosen = best["alpha"]
    result = {"alpha": chosen, "metric": metric, "rows": rows, "source": os.path.abspath(run_dir)}
    scorer.save(
        out,
        unflatten(_mix(theta0, tuned, chosen)),
        unflatten(_mix(stats0, stats, chosen)),
        {"wise_ft": {"source": os.path.abspath(run_dir), "alpha": chosen}},
    )
    plot = os.path.join(out, "wise_ft.png")
    if is_primary():
        _plot(plot, alphas, *([r[s][metric] for r in rows] for s in ("validation", "test")),
              metric, chosen)  # fmt: skip
        with open(os.path.join(out, "wise_ft.json"), "w") as f:
            json.dump(result, f, indent=2)
    table = report.format_table(
        ["alpha", f"val {metric}", f"test {metric}", ""],
        [
            [r["alpha"], r["validation"][metric], r["test"][metric],
             "<- chosen (best validation)" if r is best else ""]
            for r in rows
        ],
    )  # fmt: skip
    if verbose:
        print(table)
        print(f"chosen alpha {chosen:g}; model written to {out} (jaxtl export {out} DIR)")
    return {**result, "out": out, "plot": plot, "table": table}


def _output_dir(out: str | os.PathLike | None, default: str, what: str) -> str:
    """Where a mixed model goes as a run directory (``out``, ``~`` expanded, or ``default``),
    checked before anything is scored: not a model's or an earlier command's directory, and
    writable."""
    from jaxtl.train.faults import refuse_earlier_results, writable_dir

    out = os.path.abspath(os.path.expanduser(os.fspath(out)) if out else default)
    if os.path.isfile(os.path.join(out, "config.json")):
        raise ValueError(
            f"out (--out) {out!r} is a model directory (it holds config.json); the {what} goes "
            "in a directory of its own: choose another --out."
        )
    refuse_earlier_results(out, "out (--out)", None)
    return writable_dir(out, "out (--out)", create=False)


def _check_same_start(run_dirs: Sequence[str]) -> list[dict]:
    from jaxtl.run import read_run_info

    infos = [read_run_info(d) for d in run_dirs]
    first = infos[0]
    for d, info in zip(run_dirs[1:], infos[1:], strict=True):
        for key in _SAME:
            a, b = first.get("model", {}).get(key), info.get("model", {}).get(key)
            if a != b:
                what = "pretrained model" if key == "path" else f"head or input ({key})"
                raise ValueError(
                    f"soup: {d} was fine-tuned from another {what} than {run_dirs[0]} "
                    f"({key} {b!r} vs {a!r}); a soup averages runs of one pretrained model "
                    "with one head."
                )
        if info.get("recipe") != first.get("recipe"):
            raise ValueError(
                f"soup: {d} trained recipe {info.get('recipe')!r} and {run_dirs[0]} "
                f"{first.get('recipe')!r}; their param trees differ, so average runs of one "
                "recipe."
            )
    if str(first.get("recipe", "")).startswith("lora"):
        raise ValueError(
            "soup: averaging LoRA runs' A and B separately is not averaging their updates B A; "
            "soup full fine-tunes (or export the merged models and soup those from Python)."
        )
    return infos


def soup(
    run_dirs: Sequence[str],
    *,
    out: str | None = None,
    which: str = "best",
    verbose: bool = True,
) -> dict:
    """Uniform and greedy soups of runs fine-tuned from one pretrained model (module docstring).

    Args:
      run_dirs: two or more run directories of the same model, head and recipe.
      out: where the better soup (by validation) goes as a run directory; default
        ``soup`` beside the first run.
      which: each run's ``"best"`` or ``"latest"`` checkpoint.

    Returns:
      ``{"metric", "ingredients": [...], "uniform": {...}, "greedy": {...}, "chosen", "out"}``,
      also written to ``OUT/soup.json``.

    Raises:
      ValueError: fewer than two runs, or runs of different models, heads or recipes (the
        message names the run and what differs).
    """
    run_dirs = [os.path.abspath(d) for d in run_dirs]
    if len(run_dirs) < 2:
        raise ValueError(
            "soup needs at least two run directories (RUN_DIR ..., e.g. the pretrained-full-seed* "
            "directories of a jaxtl finetune --seeds experiment)."
        )
    _check_same_start(run_dirs)  # (first: it names an experiment directory's runs)
    twice = sorted({d for d in run_dirs if run_dirs.count(d) > 1})
    if twice:
        raise ValueError(f"soup: {twice} given more than once; a soup averages distinct runs.")
    out = _output_dir(out, os.path.join(os.path.dirname(run_dirs[0]), "soup"), "soup")
    scorer = _Scorer(run_dirs[0], which)
    from jaxtl import checkpoint

    ingredients = []
    for d in run_dirs:
        if d == run_dirs[0]:
            tree = scorer.run.state.checkpoint_tree()
        else:
            tree, _ = checkpoint.restore_params(  # each run in the stage it was saved in
                os.path.join(d, "checkpoints"),
                scorer.run.trainer.checkpoint_like,
                which,
                parts=("params", "batch_stats"),  # the rest of the state is the first run's
            )
        params, stats = _host(tree["params"]), _host(tree["batch_stats"])
        scores = scorer.score(unflatten(params), unflatten(stats))
        ingredients.append({"run": d, "params": params, "stats": stats, "scores": scores})
    metric = scorer.metric

    def val(entry):
        return entry["scores"]["validation"][metric]

    def average(group):
        n = len(group)
        mean = lambda key: {p: sum(g[key][p] for g in group) / n for p in group[0][key]}  # noqa: E731
        return mean("params"), mean("stats")

    uniform_params, uniform_stats = average(ingredients)
    uniform = scorer.score(unflatten(uniform_params), unflatten(uniform_stats))
    ranked = sorted(ingredients, key=val, reverse=_mode(metric) == "max")
    kept = [ranked[0]]
    greedy = ranked[0]["scores"]
    for candidate in ranked[1:]:
        params, stats = average([*kept, candidate])
        trial = scorer.score(unflatten(params), unflatten(stats))
        if not _better(metric, greedy["validation"][metric], trial["validation"][metric]):
            kept.append(candidate)
            greedy = trial
    greedy_params, greedy_stats = average(kept)
    pick_greedy = not _better(metric, uniform["validation"][metric], greedy["validation"][metric])
    chosen = "greedy" if pick_greedy else "uniform"
    params, stats = (
        (greedy_params, greedy_stats) if pick_greedy else (uniform_params, uniform_stats)
    )
    record = {
        "soup": {
            "kind": chosen,
            "ingredients": [g["run"] for g in (kept if pick_greedy else ingredients)],
        }
    }
    scorer.save(out, unflatten(params), unflatten(stats), record)
    result = {
        "metric": metric,
        "ingredients": [{"run": g["run"], **g["scores"]} for g in ingredients],
        "uniform": uniform,
        "greedy": {**greedy, "runs": [g["run"] for g in kept]},
        "chosen": chosen,
    }
    if is_primary():
        with open(os.path.join(out, "soup.json"), "w") as f:
            json.dump(result, f, indent=2)
    rows = [[os.path.basename(g["run"]), val(g), g["scores"]["test"][metric]] for g in ingredients]
    rows.append([f"uniform soup ({len(ingredients)})", uniform["validation"][metric],
                 uniform["test"][metric]])  # fmt: skip
    rows.append([f"greedy soup ({len(kept)})", greedy["validation"][metric],
                 greedy["test"][metric]])  # fmt: skip
    table = report.format_table(["model", f"val {metric}", f"test {metric}"], rows)
    if verbose:
        print(table)
        print(f"chosen: the {chosen} soup (better validation); written to {out}")
    return {**result, "out": out, "table": table}
