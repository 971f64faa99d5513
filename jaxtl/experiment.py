"""Experiments: several runs (arms) of one model on one dataset, compared in one table.

An :class:`Arm` is a recipe on the pretrained model or on the same architecture from random
init (the scratch baseline), at a learning rate (by default the recipe's own,
:func:`default_learning_rate`). :func:`run_arms` runs each arm into ``OUT/<arm>/`` through
:func:`jaxtl.run.finetune`, keeps the arms a resumed experiment already finished, and applies
a feature cache to the pretrained arms that have a frozen prefix. :func:`write_summary` writes
``OUT/summary.json`` and ``OUT/comparison.png``. ``jaxtl finetune``, ``--preset digits``
(:mod:`jaxtl.presets`) and ``examples/`` are all this loop with other arms and data.

Example (the demo, from Python)::

    import jaxtl
    from jaxtl import experiment

    path = jaxtl.default_model_dir()
    pretrained = jaxtl.load(path, num_labels=2)
    load = lambda arm: pretrained if arm.pretrained else jaxtl.load(path, pretrained=False)
    arms = experiment.arms(["full", "linear_probe"], scratch=True)
    config = jaxtl.TrainConfig(epochs=1, evals_per_epoch=4)
    results = experiment.run_arms("runs/demo", arms, load, jaxtl.data.vader(), config)
    table, plot = experiment.write_summary("runs/demo", results)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxtl import feature_cache, report, report_html
from jaxtl import seeds as seed_stats
from jaxtl.distributed import is_primary
from jaxtl.models.base import LoadedModel
from jaxtl.run import finetune
from jaxtl.train import TrainConfig
from jaxtl.train.faults import refuse_earlier_results, writable_dir
from jaxtl.transfer.lora import targets as lora_targets
from jaxtl.transfer.recipes import make_plan, recipe_name

__all__ = [
    "DEFAULT_LR",
    "DEMO_REFERENCE",
    "FULL_LR",
    "Arm",
    "Comparison",
    "arms",
    "default_learning_rate",
    "negative_transfer",
    "check_recipes",
    "compare",
    "demo_reference",
    "experiment_dir",
    "run_arms",
    "write_summary",
]

# Peak learning rates of the reference recipes when none is given: a head alone trains best far
# faster than a whole pretrained network.
FULL_LR = 5e-5
# Adapters and a new head start from zero or random values and train few params: a larger step.
DEFAULT_LR = {"linear_probe": 1e-3, "lora": 1e-3}

# transformers + PyTorch on the same VADER split, batch 32, AdamW, 3 epochs (issue #2).
DEMO_REFERENCE = {
    "pretrained full": "95.6%",
    "pretrained linear_probe": "88.6%",
    "scratch full": "85.2%",
}


def default_learning_rate(recipe: str) -> float:
    """The peak learning rate for ``recipe`` when the user names none, by the *parsed* recipe:
    ``"probe"`` is ``linear_probe`` and gets its 1e-3.

    Example:
      >>> default_learning_rate("probe"), default_learning_rate("last_n(2)")
      (0.001, 5e-05)
    """
    return DEFAULT_LR.get(recipe_name(recipe), FULL_LR)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One run of an experiment.

    Attributes:
      name: how tables and directories name it, e.g. ``"pretrained full"``.
      recipe: the transfer recipe (``"full"``, ``"linear_probe"``, ``"last_n(2)"``, ...).
      pretrained: the pretrained weights (True) or the same architecture from random init.
      learning_rate: peak learning rate; None: :func:`default_learning_rate` of the recipe.
      seed: this run's seed (new heads, scratch init, dropout, data order), one of several
        runs of the same arm; None: the config's.
    """

    name: str
    recipe: str
    pretrained: bool
    learning_rate: float | None = None
    seed: int | None = None  # None: the config's seed (``--seed``); else one of ``--seeds``

    @property
    def dirname(self) -> str:
        """The arm's directory name: ``"pretrained full"`` -> ``"pretrained-full"``; any
        character a path would read as a separator or quote (a rules file's path) becomes
        ``-``, and a name longer than 100 characters is cut, with a hash of the whole.

        Example:
          >>> Arm("pretrained rules('/a/b.toml')", "rules('/a/b.toml')", True).dirname
          'pretrained-rules--a-b.toml-'
        """
        name = self.name.replace(" ", "-").replace("(", "").replace(")", "")
        name = re.sub(r"[^A-Za-z0-9._=,+-]", "-", name)
        if len(name) > 100:
            name = f"{name[:90]}-{zlib.crc32(self.name.encode()):08x}"
        return name if self.seed is None else f"{name}-seed{self.seed}"


def arms(
    recipes: Sequence[str],
    *,
    scratch: bool = True,
    learning_rate: float | None = None,
    seeds: Sequence[int] | None = None,
) -> list[Arm]:
    """``pretrained <recipe>`` for each recipe, then (with ``scratch``) ``scratch full``, the
    same architecture from random init on the same budget; with ``seeds``, one run of each arm
    per seed (``--seeds``), every arm of a seed before the next seed (the pretrained model,
    its new head drawn with that seed, loads once per seed).

    Example:
      >>> [a.name for a in arms(["full", "probe"])]
      ['pretrained full', 'pretrained probe', 'scratch full']
      >>> [a.dirname for a in arms(["full"], seeds=[0, 1])]
      ['pretrained-full-seed0', 'scratch-full-seed0', 'pretrained-full-seed1', 'scratch-full-seed1']
    """
    out = [Arm(f"pretrained {r}", r, True, learning_rate) for r in recipes]
    if scratch:
        out.append(Arm("scratch full", "full", False, learning_rate))
    if seeds is None:
        return out
    return [dataclasses.replace(a, seed=s) for s in seeds for a in out]


def run_arms(
    out: str,
    arms: Sequence[Arm],
    load_model: Callable[[Arm], LoadedModel],
    data: Any,
    config: TrainConfig,
    *,
    group: str | None = None,
    resume: bool | int = False,
    describe: Callable[[Arm, LoadedModel], dict] | dict | None = None,
    long_texts: str = "truncate",
    verbose: bool = True,
) -> list[dict]:
    """Runs every arm into ``out/<arm.dirname>`` and returns their ``results.json`` dicts.

    Args:
      out: the experiment directory.
      arms: the runs, in order.
      load_model: the model of an arm (called once per arm that runs; return the same
        pretrained model for several arms to load it once).
      data: the splits (e.g. :func:`jaxtl.data.vader`).
      config: the runs' configuration; each arm sets its own learning rate (with its schedule
        as data, ``learning_rate_input``, unless the recipe is staged or a resumed arm's
        ``run.json`` says otherwise: the same updates, and the arms of a recipe share one
        compiled step), and
        ``config.data.feature_cache`` applies only to pretrained arms with a frozen prefix.
      group: a label shared by these arms (e.g. a training-set size): run names become
        ``"<group> <arm>"`` and each result records it as ``"group"``.
      resume: keep the arms that already finished (their ``results.json``) and resume the
        unfinished one from its latest checkpoint; a step number resumes it from that step's
        checkpoint (``--resume-from``), and the arms after it as usual.
      describe: JSON facts each ``run.json`` records so that ``jaxtl evaluate`` can rebuild the
        model and data, as a dict or per arm.
      long_texts: texts longer than the model's positions: ``"truncate"`` or ``"error"``.
      verbose: print plan tables and progress.

    Raises:
      ValueError: an unknown or malformed recipe, before the first arm starts.
    """
    results = []
    for arm in arms:
        name = f"{group} {arm.name}" if group else arm.name
        workdir = os.path.join(out, arm.dirname)
        done = os.path.join(workdir, "results.json")
        if resume and os.path.exists(done):
            with open(done) as f:
                results.append(_grouped(json.load(f), group))
            print(f"{name}: already finished in {workdir}, kept.")
            continue
        model = load_model(arm)
        lr = arm.learning_rate or default_learning_rate(arm.recipe)
        # The learning-rate schedule as data (the same updates to the bit on CPU): the arms of
        # a recipe that differ in learning rate, training-set size or seed (pretrained and
        # scratch full, each --train-sizes group) compile one train step, which the persistent
        # compilation cache hands on. Staged recipes keep their schedules as constants.
        staged = bool(make_plan(arm.recipe, model.structure).stages)
        optim = dataclasses.replace(
            config.optim,
            learning_rate=lr,
            learning_rate_input=_schedule_as_data(config, staged, workdir, resume),
        )
        arm_config = dataclasses.replace(
            config,
            seed=config.seed if arm.seed is None else arm.seed,
            optim=optim,
            data=dataclasses.replace(config.data, feature_cache=_cache_for(arm, model, config)),
        )
        facts = describe(arm, model) if callable(describe) else describe
        result = finetune(
            model,
            arm.recipe,
            data,
            arm_config,
            workdir,
            name=name,
            resume=resume,
            describe=facts,
            long_texts=long_texts,
            verbose=verbose,
        )
        results.append(_grouped(result.to_dict(), group))
        resume = bool(resume)  # a step to resume from belongs to the first unfinished arm
    return results


def _schedule_as_data(config: TrainConfig, staged: bool, workdir: str, resume) -> bool:
    """Whether an arm keeps its LR schedule as data (``learning_rate_input``): yes unless its
    recipe is staged, and a resumed arm as its ``run.json`` recorded it. An arm started by a
    jaxtl from before the schedule was data (2026-12-07) saved optimizer state without the
    schedule's numbers; it resumes with the schedule as constants, as it began."""
    saved = os.path.join(workdir, "run.json")
    if resume and os.path.exists(saved):
        with open(saved) as f:
            recorded = json.load(f).get("config", {})
        return bool(recorded.get("learning_rate_input", False))
    return config.optim.learning_rate_input or not staged


def experiment_dir(
    out: str | None, prefix: str, *, resume: bool | int = False, resumable: bool = True
) -> str:
    """``out``, or ``runs/<prefix>-<timestamp>`` when None; with ``resume`` it must exist,
    and without it, it must not hold an earlier command's results (which would be written
    over). ``resumable``: whether the command has ``--resume`` (the error then offers it).

    Raises:
      ValueError: ``resume`` without an existing directory, a directory that cannot be
        written, or one that holds earlier results (checked here, before anything compiles).
    """
    if out is not None:
        out = os.path.expanduser(out)  # --out=~/x reaches here unexpanded: no shell expands it
    if out is None:
        if resume:
            raise ValueError(
                "resume (--resume) needs the experiment directory to continue (--out)."
            )
        default = os.path.join("runs", time.strftime(f"{prefix}-%Y%m%d-%H%M%S"))
        return writable_dir(default, "out (--out)", create=False)
    if resume and not os.path.isdir(out):
        raise ValueError(
            f"resume (--resume) needs an existing experiment directory (--out); {out!r} "
            "does not exist."
        )
    if not resume:
        how = "--resume (its finished runs are kept)" if resumable else None
        refuse_earlier_results(out, "out (--out)", how)
    return writable_dir(out, "out (--out)", create=False)


def check_recipes(recipes: Sequence[str], model: LoadedModel) -> None:
    """Fails on a bad recipe before any arm runs (the message lists the valid ones), and on
    a recipe listed twice, whose second run would write over the first's directory."""
    seen = set()
    for r in recipes:
        plan = make_plan(r, model.structure)
        if plan.adapters is not None:  # LoRA: its targets must name kernels of this model
            lora_targets(model.params, plan.adapters)
        if plan.name in seen:
            raise ValueError(
                f"recipes (--recipe) lists {plan.name!r} twice: each recipe runs once per seed "
                "(--seeds) in a directory of its own. List it once."
            )
        seen.add(plan.name)


def _grouped(result: dict, group: str | None) -> dict:
    return {**result, "group": group} if group else result


def _cache_for(arm: Arm, model: LoadedModel, config: TrainConfig) -> str | None:
    """The feature cache applies to pretrained arms whose recipe leaves a frozen prefix."""
    cache = config.data.feature_cache
    if not cache or not arm.pretrained:
        return None
    plan = make_plan(arm.recipe, model.structure)
    if plan.adapters is not None:
        print(f"{arm.name}: its adapters sit in every block, so --feature-cache does not apply.")
        return None
    if not feature_cache.applies(model, plan):
        print(f"{arm.name}: trains from the stem on, so --feature-cache does not apply to it.")
        return None
    return cache


def demo_reference(
    config: TrainConfig, *, demo_data: bool, learning_rate_given: bool
) -> dict | None:
    """:data:`DEMO_REFERENCE` when the run is the demo under the reference recipe (embedded
    model and data, 3 epochs, batch 32, no step limit, default learning rates), else None:
    other budgets are not comparable with it."""
    same = (config.epochs, config.data.batch_size, config.max_steps) == (3, 32, None)
    return DEMO_REFERENCE if demo_data and same and not learning_rate_given else None


def write_summary(
    out: str,
    results: Sequence[dict],
    *,
    reference: Mapping[str, str] | None = None,
    table: str | None = None,
    **facts: Any,
) -> tuple[str, str]:
    """``out/summary.json`` (the results, the reference and ``facts``) and ``out/comparison.png``
    (every arm's curves). Runs of several seeds (``--seeds``) are summarized per arm: mean,
    standard deviation and 95% interval in the table, in ``summary.json`` (``seeds``) and in
    ``out/seeds.png`` (error bars), with each arm's difference from the baseline marked when
    it is within the seed noise (:mod:`jaxtl.seeds`).

    Returns:
      ``(table, plot path)``: ``table`` as given, or the comparison table of the results.
    """
    names = [r["name"] for r in results]
    seeded = len(set(names)) < len(names)  # an arm run with several seeds
    if seeded:  # one row per arm over its seeds, and where the seed noise is
        facts["seeds"] = report.seed_statistics(results)
    if table is None:
        rows = report.seed_rows(results) if seeded else report.comparison_rows(results, reference)
        table = report.format_table(*rows)
    plot = os.path.join(out, "comparison.png")
    if not is_primary():  # shared files have one writer: process 0
        return table, plot
    labels = [r["name"] + (f" seed {r.get('seed')}" if seeded else "") for r in results]
    plot = report.plot_curves([r["workdir"] for r in results], plot, labels)
    if seeded:
        report.plot_seeds(facts["seeds"], os.path.join(out, "seeds.png"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({**facts, "results": list(results), "reference": reference}, f, indent=2)
    report_html.write_html(out, [r["workdir"] for r in results if r.get("workdir")], table)
    return table, plot


# The negative-transfer rule: a pretrained arm is flagged when the from-scratch arm's test
# accuracy is higher by more than this many standard errors of the difference of two
# accuracies on n test examples, sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n) (about a 95% band).
NEGATIVE_TRANSFER_SE = 2.0


def negative_transfer(results: Sequence[dict]) -> list[dict]:
    """The pretrained arms that did worse than training from scratch, beyond the noise of the
    test set (:data:`NEGATIVE_TRANSFER_SE` standard errors of the accuracy difference).

    Returns one record per pretrained arm compared (``flagged`` True or False), or an empty
    list when there is no scratch arm or no accuracy to compare (regression, language models:
    a loss has no binomial noise estimate here, so the rule is not applied).

    Example:
      >>> rs = [{"name": "pretrained full", "test": {"accuracy": 0.70, "examples": 400}},
      ...       {"name": "scratch full", "test": {"accuracy": 0.80, "examples": 400}}]
      >>> [(r["arm"], r["flagged"]) for r in negative_transfer(rs)]
      [('pretrained full', True)]
    """
    groups = seed_stats.aggregate(results, "accuracy")  # several seeds of an arm: their mean
    scratch = [name for name in groups if name.startswith("scratch")]
    if not scratch:
        return []
    base = scratch[0]
    examples = {r["name"]: r["test"]["examples"] for r in results}
    p_s, n = groups[base]["mean"], examples[base]
    out = []
    for name, arm in groups.items():
        if not name.startswith("pretrained"):
            continue
        p = arm["mean"]
        se = (p_s * (1 - p_s) / n + p * (1 - p) / examples[name]) ** 0.5
        margin = NEGATIVE_TRANSFER_SE * se
        seed_noise = seed_stats.difference(arm, groups[base])["noise"]
        margin = margin if seed_noise is None else max(margin, seed_noise)
        out.append(
            {
                "arm": name,
                "against": base,
                "accuracy": p,
                "scratch_accuracy": p_s,
                "difference": p - p_s,
                "noise": margin,
                "flagged": p_s - p > margin,
                "rule": f"flagged when scratch - pretrained > {NEGATIVE_TRANSFER_SE:g} standard "
                "errors of the difference of two test accuracies (of the mean accuracies, and "
                "no less than the seed noise, with several seeds)",
            }
        )
    return out


@dataclasses.dataclass
class Comparison:
    """What :func:`compare` returns."""

    table: str  # the printed comparison table
    results: list[dict]  # every arm's results.json
    plot: str  # OUT/comparison.png
    reference: dict | None  # the reference numbers the table shows, if comparable
    directory: str
    # negative_transfer(results): one record per pretrained arm against scratch.
    transfer_checks: list[dict] = dataclasses.field(default_factory=list)

    @property
    def negative_transfer(self) -> list[dict]:
        """The flagged arms: pretrained worse than scratch beyond the test set's noise."""
        return [c for c in self.transfer_checks if c["flagged"]]


def compare(
    model: LoadedModel,
    data_spec: dict,
    recipes: Sequence[str],
    config: TrainConfig,
    out: str,
    *,
    load_options: Mapping[str, Any],
    scratch: bool = True,
    learning_rate: float | None = None,
    resume: bool | int = False,
    long_texts: str = "truncate",
    demo: bool = False,
    seeds: Sequence[int] | None = None,
) -> Comparison:
    """``jaxtl finetune``: each recipe on the pretrained ``model`` and (with ``scratch``) the same
    architecture from random init, on the data of ``data_spec``, compared in one table.

    Args:
      model: the pretrained model (:func:`jaxtl.load` of ``model.path`` with ``load_options``
        and ``seed=config.seed``); with ``seeds``, the pretrained runs of other seeds reload it
        with theirs, so that each draws its own new head.
      data_spec: the JSON description of the data (:func:`jaxtl.data.resolve`), recorded in
        every run directory so that ``jaxtl evaluate`` can rebuild it.
      recipes: the recipes to run on the pretrained model.
      config: the runs' configuration (each arm sets its learning rate).
      out: the experiment directory.
      load_options: the :func:`jaxtl.load` options of ``model`` (task, num_labels, pooling,
        image_size, in_channels, and ``mesh`` / ``sharding_rules`` when it was loaded onto a
        mesh); the scratch arm and reloads are loaded with the same.
      scratch: add the from-scratch baseline (``full``, random init, same budget).
      learning_rate: every arm's peak learning rate; None: each recipe's default.
      resume: keep finished arms, resume the unfinished one (from this step, for a number).
      long_texts: ``"truncate"`` or ``"error"`` for texts longer than the model's positions.
      demo: the embedded model and data, whose reference numbers the table may show.
      seeds: run every arm once per seed (``--seeds``) and report each arm's mean, spread and
        95% interval (:mod:`jaxtl.seeds`); None: one run per arm with ``config.seed``.

    Raises:
      ValueError: a bad recipe, a data source that does not fit the model, ... before any
        arm starts.
    """
    from jaxtl import surgery
    from jaxtl.data import resolve

    data = resolve(data_spec, num_labels=model.num_labels, task=model.task)
    check_recipes(recipes, model)
    describe = {
        "model": {
            "path": os.path.abspath(model.path),
            "task": model.task,
            "num_labels": model.num_labels,
            "pooling": model.extras.get("pooling"),
            "image_size": load_options.get("image_size"),
            "in_channels": load_options.get("in_channels"),
            **surgery.recorded(model),
        },
        "data": data_spec,
    }
    options = {**load_options, **surgery.recorded(model), "pooling": model.extras.get("pooling")}
    options.pop("seed", None)  # each arm's own

    loaded = {config.seed: model}  # the pretrained model, its new head drawn with that seed

    def load_model(arm: Arm) -> LoadedModel:
        seed = config.seed if arm.seed is None else arm.seed
        if not arm.pretrained:
            return surgery.load_model(model.path, **options, pretrained=False, seed=seed)
        # Another seed's head (seeds run one after another: keep one), or the params were
        # handed to the last arm's train state (release_pretrained).
        if seed not in loaded or loaded[seed].released:
            loaded.clear()
            loaded[seed] = surgery.load_model(model.path, **options, seed=seed)
        return loaded[seed]

    results = run_arms(
        out,
        arms(recipes, scratch=scratch, learning_rate=learning_rate, seeds=seeds),
        load_model,
        data,
        config,
        resume=resume,
        describe=describe,
        long_texts=long_texts,
    )
    reference = demo_reference(
        config, demo_data=demo, learning_rate_given=learning_rate is not None
    )
    checks = negative_transfer(results)
    table, plot = write_summary(out, results, reference=reference, negative_transfer=checks)
    for c in checks:
        if c["flagged"]:
            print(
                f"WARNING: negative transfer: {c['arm']} reached {100 * c['accuracy']:.1f}% "
                f"test accuracy, {100 * -c['difference']:.1f} points below {c['against']} "
                f"({100 * c['scratch_accuracy']:.1f}%), more than the test set's noise "
                f"({100 * c['noise']:.1f} points: {NEGATIVE_TRANSFER_SE:g} standard errors). "
                "The pretrained weights hurt on this task; check the data, the learning rate, "
                "or prefer training from scratch."
            )
    return Comparison(table, results, plot, reference, out, checks)
