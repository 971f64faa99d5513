"""One fine-tuning run, start to finish, and the run directory it leaves behind.

``finetune`` is the function the CLI and a notebook both call:
plan (rules -> labels -> optax) -> tokenize -> Trainer (jit on a mesh) -> test evaluation ->
``RUN_DIR/{run.json, metrics.jsonl, checkpoints/, results.json, curve.png}``.
``evaluate_run`` reopens such a directory and scores its best checkpoint again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from jaxtl import feature_cache, lora, parallel, report, sharding
from jaxtl.data.loader import evaluation_loader
from jaxtl.data.pipeline import training_loader
from jaxtl.distributed import is_primary
from jaxtl.encoding import Splits, encode_splits, references
from jaxtl.models.base import LoadedModel, check_model
from jaxtl.models.preprocessing import ImagePreprocessing
from jaxtl.train import CheckpointConfig, ScaleConfig, TrainConfig, Trainer, precision
from jaxtl.train.config import as_config, as_workdir
from jaxtl.train.faults import refuse_earlier_results, writable_dir
from jaxtl.transfer import stages
from jaxtl.transfer.plan import Plan
from jaxtl.transfer.recipes import make_plan
from jaxtl.transfer.rules_file import check_used


@dataclasses.dataclass
class RunResult:
    """The outcome of :func:`finetune`; ``to_dict`` is what ``results.json`` holds."""

    name: str
    recipe: str
    test: dict
    best: dict | None
    train_seconds: float
    steps: int
    stopped_early: bool
    workdir: str | None
    seed: int = 0  # the run's seed (config.seed): new heads, scratch init, dropout, data order
    # Wall seconds: {"train", "evaluation", "checkpoints"} of the fit, and "test" evaluation.
    seconds: dict = dataclasses.field(default_factory=dict)
    params: Any = dataclasses.field(repr=False, default=None)
    batch_stats: Any = dataclasses.field(repr=False, default=None)
    # The model that trained: for a LoRA recipe the adapted one, whose tree ``params`` has
    # (what jaxtl.export and jaxtl.lora.export_adapters take with them).
    model: LoadedModel | None = dataclasses.field(repr=False, default=None)

    def to_dict(self) -> dict:
        skip = ("params", "batch_stats", "model")
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }


def _arguments(model, data, config, workdir) -> tuple[TrainConfig, str | None]:
    """:func:`finetune`'s arguments checked for their kind, in its terms: ``(config, workdir)``
    with a dict of options made a :class:`TrainConfig` and a path-like ``workdir`` (``~``
    expanded) a string."""
    check_model(model, "jaxtl.finetune")
    if not isinstance(data, Splits):
        raise ValueError(
            f"data must be the train/validation/test splits of jaxtl.data (from_arrays(inputs, "
            f"labels), from_table(path), vader(), ...; --data), got {type(data).__name__}."
        )
    return as_config(config, "jaxtl.finetune"), as_workdir(workdir)


def finetune(
    model: LoadedModel,
    recipe: str | Plan,
    data: Splits,
    config: TrainConfig | None = None,
    workdir: str | None = None,
    *,
    name: str | None = None,
    resume: bool | int = False,
    stop_at: int | None = None,
    describe: dict | None = None,
    verbose: bool = True,
    long_texts: str = "truncate",
) -> RunResult:
    """Fine-tune ``model`` on ``data`` under ``recipe``; evaluate the result on the test split.

    Args:
      model: from :func:`jaxtl.load`.
      recipe: ``"full"``, ``"linear_probe"``, ``"last_n(2)"``, ... or a built ``Plan``.
      data: train/validation/test texts and labels (e.g. :func:`jaxtl.data.vader`).
      config: training configuration (defaults: 3 epochs, batch 32, lr 5e-5, linear decay).
      workdir: run directory; ``None`` trains in memory (no checkpoints, no resume).
      name: a label for tables (default: the recipe).
      resume: continue from ``workdir``'s latest checkpoint, or from this step's
        (``--resume-from``; see :meth:`jaxtl.Trainer.fit`).
      stop_at: stop (checkpointed) after this step, as if preempted.
      describe: JSON facts that let ``jaxtl evaluate`` rebuild the model and data later.
      verbose: print the plan table and the data summary.
      long_texts: ``"truncate"`` texts longer than the model's positions (counted in the data
        facts) or ``"error"``.

    Returns:
      A :class:`RunResult` with test metrics, the best validation record and the final params.

    Raises:
      ValueError: among others, ``workdir`` holds an earlier run and ``resume`` is False.
    """
    config, workdir = _arguments(model, data, config, workdir)
    model.own_params("jaxtl.finetune")  # released to an earlier run: a clear error now
    if workdir and resume is False:  # an earlier run's results there are not written over
        refuse_earlier_results(workdir, "workdir (--out)", "resume=True (--resume)")
    plan = make_plan(recipe, model.structure)
    name = name or plan.name
    feature_cache.check_options(config, plan)
    model = with_adapters(model, plan, config.seed)
    if plan.source is not None:  # a rules file: each of its patterns must label a param
        check_used(plan, model.params, plan.source)
    arrays, facts = encode_splits(model, data, long_texts)
    if verbose:
        shape = (
            f"image size {facts['image_size']}"
            if "image_size" in facts
            else f"padded length {facts['length']}, truncated {facts['truncated']}"
        )
        print(
            f"\n== {name}: {model.family} ({model.path}) on {data.name} {facts['sizes']}, {shape}"
        )
    plan_table = _plan_table(model, plan, config.scale)
    if verbose:
        print(plan_table)
    trained, stage_models, cached = model, {}, None
    if config.data.feature_cache and plan.stages:
        # A staged plan's first stage (LP-FT's probe) reads cached features; later stages
        # train the whole model on its inputs, from the same step counter and run directory.
        first = plan.stages[0].plan
        stage_models[0], cached = feature_cache.cached_run(model, first, config, arrays, verbose)
        facts["feature_cache"] = f"{config.data.feature_cache} (stage 0)"
    elif config.data.feature_cache:
        trained, arrays = feature_cache.cached_run(model, plan, config, arrays, verbose)
        facts["feature_cache"] = config.data.feature_cache
    trainer = Trainer(trained, plan, config, workdir, stage_models=stage_models)
    train = training_loader(arrays["train"], config.data, trained, seed=config.seed)
    waste = train.padding_waste()
    if waste is not None:
        facts["padding_waste"] = round(waste, 4)
        if verbose:
            how = "length buckets" if config.data.bucket_by_length else "one padded length"
            print(f"padding: {100 * waste:.1f}% of the training token slots ({how})")
    if workdir:
        writable_dir(workdir)
        run_info = {
            "name": name,
            "recipe": plan.name,
            "config": config.to_dict(),
            "data_facts": facts,
            "label_names": data.label_names,
            "plan_table": plan_table,
            "environment": environment(),
            **(describe or {}),
        }
        if is_primary():  # shared files: one writer (every process keeps its own stderr)
            _write_json(os.path.join(workdir, "run.json"), run_info)
    val = evaluation_loader(arrays["validation"], config.data, devices=trainer.devices)
    stage_data = {}
    if cached is not None:
        stage_data[0] = (
            training_loader(cached["train"], config.data, stage_models[0], seed=config.seed),
            evaluation_loader(cached["validation"], config.data, devices=trainer.devices),
        )
    fit = trainer.fit(train, val, resume=resume, stop_at=stop_at, stage_data=stage_data)
    # Nothing after training reads the optimizer state (twice the params under AdamW): its
    # memory goes before the test evaluation.
    fit = dataclasses.replace(fit, state=fit.state.replace(opt_state=None))
    t = time.perf_counter()
    # A run that ended inside its cached stage scores with that stage's model and features.
    test_arrays = cached if trainer.stage in stage_models else arrays
    test_loader = evaluation_loader(test_arrays["test"], config.data, devices=trainer.devices)
    test = trainer.evaluate(
        fit.state,
        test_loader,
        details=True,
        label_names=data.label_names,
        references=references(data, "test"),
    )
    seconds = {**fit.seconds, "test": round(time.perf_counter() - t, 3)}
    if verbose:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float))
        ece = test.get("calibration", {}).get("ece")
        shown += "" if ece is None else f", ece {ece:.4f}"
        print(f"test: {shown} on {test['examples']} examples ({seconds['test']:.1f} s)")
    result = RunResult(
        name=name,
        recipe=plan.name,
        test=test,
        best=fit.best,
        train_seconds=fit.train_seconds,
        steps=fit.steps,
        stopped_early=fit.stopped_early,
        workdir=workdir,
        seed=config.seed,
        seconds=seconds,
        params=fit.state.params,
        batch_stats=fit.state.batch_stats,
        model=model,
    )
    # A preempted run is not finished: no results yet. Shared files have one writer.
    if workdir and stop_at is None and is_primary():
        _write_json(os.path.join(workdir, "results.json"), result.to_dict())
        report.plot_curves([workdir], os.path.join(workdir, "curve.png"), [name])
        report.detail_plots(test, workdir, data.label_names)
    return result


def with_adapters(model: LoadedModel, plan: Plan, seed: int) -> LoadedModel:
    """``model`` with the LoRA adapters ``plan`` trains (a ``lora(r)`` recipe), drawn from
    ``seed``; ``model`` itself for every other plan, or when it already has them."""
    if plan.adapters is None:
        return model
    if lora.is_adapted(model):
        if model.extras["lora"] != plan.adapters.resolve(model.structure):
            raise ValueError(
                f"the model is adapted with {model.extras['lora'].describe()} but the recipe "
                f"is {plan.name}; pass the base model (jaxtl.lora.base_model(model))."
            )
        return model
    return lora.adapt(model, plan, seed=seed)


def _plan_table(model: LoadedModel, plan: Plan, scale: ScaleConfig) -> str:
    """The plan table of ``plan`` over the params the state will hold. A function of its own
    so that no reference to the loaded params outlives it: with ``release_pretrained`` the
    train state's copy must be the only one left resident (a local of :func:`finetune` kept a
    second copy through the whole run)."""
    stored = model.params
    if scale.frozen_bf16:  # the table shows what the state will hold
        stored = precision.cast_frozen(stored, stages.trained_anywhere(plan, stored))
    return plan.table(stored, pieces=_pieces(model, scale))


def _pieces(model: LoadedModel, scale: ScaleConfig):
    """The plan table's per-device layout when ``scale.mesh`` shards params, else None."""
    import jax

    if not parallel.splits_params(scale.mesh):
        return None
    return sharding.piece_counter(
        model.params,
        parallel.parse_mesh(scale.mesh, jax.device_count()),
        scale.sharding_rules,
        structure=model.structure,
        min_shard_size=scale.min_shard_size,
    )


def environment() -> dict[str, Any]:
    """What a rerun must match to reproduce a run bit for bit: the CPU, the cores the process
    may use, the accelerator, and the versions of the numerical stack.

    On one machine, a rerun with the same of all of these is bitwise equal (tested in
    tests/test_reproducibility.py). XLA picks its CPU kernels for the CPU it runs on and splits
    reductions by thread count, so another CPU, core count or jaxlib rounds differently; runs
    that train BatchNorm networks then diverge (README.md, "Reproducibility").
    """
    import importlib.metadata
    import platform

    import jax

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), cpu)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    devices = jax.devices()
    return {
        "cpu": cpu,
        "cores": cores,
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "python": platform.python_version(),
        **versions,
    }


def run_dirs(root: str) -> list[str]:
    """``root`` if it is a run directory (it holds ``run.json``), else the run directories in it
    (an experiment's ``--out``), sorted.

    Raises:
      FileNotFoundError: ``root`` does not exist or holds no run.
    """
    if not os.path.isdir(root):
        state = "is a file, not" if os.path.exists(root) else "does not exist: give"
        raise FileNotFoundError(
            f"{root!r} {state} a run directory (one holding run.json) or an experiment "
            "directory of them (jaxtl finetune's --out)."
        )
    if os.path.exists(os.path.join(root, "run.json")):
        return [root]
    dirs = sorted(
        os.path.join(root, d)
        for d in os.listdir(root)
        if os.path.exists(os.path.join(root, d, "run.json"))
    )
    if not dirs:
        raise FileNotFoundError(
            f"{root!r} holds no jaxtl run (no run.json in it or its subdirectories)."
        )
    return dirs


@dataclasses.dataclass
class RestoredRun:
    """A finished run reopened from its directory (:func:`restore_run`)."""

    run_dir: str
    info: dict
    config: TrainConfig
    model: LoadedModel
    plan: Plan
    trainer: Trainer
    state: Any
    step: int


def restore_run(run_dir: str, which: str = "best", *, weights_only: bool = False) -> RestoredRun:
    """Rebuild a run's model (with its LoRA adapters, if it trained some), plan and Trainer
    from ``run.json``, and restore a checkpoint (``"best"`` or ``"latest"``) onto this
    machine's devices, whatever mesh trained it: onto that mesh when these devices can form
    it (a model split over ``fsdp`` / ``tensor`` is then also built split, never whole on one
    device), else with every device on ``data``.

    ``weights_only``: read the step, params and BatchNorm statistics alone, for evaluation and
    export: the optimizer state (AdamW: twice the trained params) and the RNG key are neither
    read nor allocated, and stay in the state as ``jax.ShapeDtypeStruct`` s.

    Raises:
      FileNotFoundError: ``run_dir`` has no ``run.json``.
      ValueError: ``run.json`` does not record the model and data (a run made from Python
        with in-memory data).
    """
    from jaxtl import checkpoint

    info_path = os.path.join(run_dir, "run.json")
    info = read_run_info(run_dir)
    if "model" not in info or "data" not in info:
        raise ValueError(
            f"{info_path} does not record how to rebuild the run's model and data: jaxtl.finetune "
            "in Python records them only when given describe={'model': ..., 'data': DATA_SPEC} "
            "(the `jaxtl finetune` command and jaxtl.experiment.compare, which take a data spec, "
            "always do). Rebuild its model in Python and use Trainer.evaluate or jaxtl.export "
            "with its params instead."
        )
    m = info["model"]
    # The run's optimizer and data options rebuild its checkpoint's tree; how it ranked its
    # evaluations does not matter for re-scoring.
    config = TrainConfig(**info["config"])
    # Restored onto this machine's devices: on the run's own mesh where they can form it, else
    # all on data (a checkpoint restores onto any mesh); evaluation has no microbatches.
    mesh = config.scale.mesh if _fits_here(config.scale.mesh) else None
    scale = dataclasses.replace(config.scale, mesh=mesh, grad_accum=1)
    # Re-scoring writes no metrics: the run's loggers (--tensorboard) stay closed.
    config = dataclasses.replace(config, checkpoint=CheckpointConfig(), scale=scale, loggers=())
    # The checkpoint holds every param; a model split over the mesh is built split there.
    placement = sharding.load_placement(mesh, scale.sharding_rules, scale.min_shard_size)
    model = load_recorded(m, pretrained=False, **placement)
    if "preprocessing" in m:  # the run's own image recipe (e.g. a preset's plain resize)
        model.extras["preprocessing"] = ImagePreprocessing.from_dict(m["preprocessing"])
    plan = make_plan(info["recipe"], model.structure)
    model = with_adapters(model, plan, config.seed)
    # A feature-cache run trained the same params as a plain run: restored without the cache.
    trainer = Trainer(model, plan, config)
    # Restored into the state of the stage the checkpoint was saved in (a staged recipe's
    # optimizer changes from stage to stage); nothing else is allocated.
    parts = ("step", "params", "batch_stats") if weights_only else None
    tree, meta = checkpoint.restore_params(
        os.path.join(run_dir, "checkpoints"), trainer.checkpoint_like, which, parts=parts
    )
    state = trainer.abstract_state(1, stage=int(meta.get("stage", 0)))
    state = state.with_checkpoint_tree({k: v for k, v in tree.items() if v is not None})
    return RestoredRun(run_dir, info, config, model, plan, trainer, state, int(tree["step"]))


def _fits_here(mesh: Any) -> bool:
    """Whether this machine's devices form the mesh ``mesh`` (``--mesh``)."""
    import jax

    try:
        parallel.parse_mesh(mesh, jax.device_count())
    except ValueError:
        return False
    return True


def load_recorded(m: dict, *, pretrained: bool = True, **placement: Any) -> LoadedModel:
    """The model ``run.json``'s ``"model"`` facts describe, with its surgery (dropped blocks,
    a built-in head): :func:`jaxtl.surgery.load_model`. ``placement``: :func:`jaxtl.load`'s
    ``mesh``, ``sharding_rules`` and ``min_shard_size``."""
    from jaxtl.surgery import load_model

    return load_model(
        m["path"],
        task=m["task"],
        num_labels=m["num_labels"],
        pooling=m.get("pooling"),
        pretrained=pretrained,
        image_size=m.get("image_size"),
        in_channels=m.get("in_channels"),
        head=m.get("head"),
        **({"drop_blocks": m["drop_blocks"]} if m.get("drop_blocks") else {}),
        **({"tower": m["tower"]} if m.get("tower") else {}),
        **placement,
    )


def evaluate_run(run_dir: str, which: str = "best") -> dict:
    """Re-score a finished run's checkpoint on its validation and test splits.

    Needs the ``run.json`` that the CLI writes (model path, task and data source).
    """
    from jaxtl.data import resolve

    run = restore_run(run_dir, which, weights_only=True)
    data = resolve(run.info["data"], num_labels=run.model.num_labels, task=run.model.task)
    recorded = run.info.get("data_facts", {}).get("sizes")
    if recorded is not None and hasattr(data, "sizes") and data.sizes() != recorded:
        raise ValueError(
            f"{run_dir} trained on {run.info['data'].get('path', run.info['data'])!r} split "
            f"{recorded}; it now splits {data.sizes()}. The data changed since the run, so "
            "these would not be the splits it was scored on (rows it trained on could now be "
            "in test): restore the data, or fine-tune again."
        )
    arrays, _ = encode_splits(run.model, data)
    out = {"run": run_dir, "checkpoint": which, "step": run.step}
    for split in ("validation", "test"):
        loader = evaluation_loader(arrays[split], run.config.data, devices=run.trainer.devices)
        out[split] = run.trainer.evaluate(
            run.state,
            loader,
            details=split == "test",
            label_names=data.label_names,
            references=references(data, split),
        )
    return out


def export_run(
    run_dir: str, out: str, *, which: str = "best", adapters: bool = False, overwrite: bool = False
) -> str:
    """Export a finished run's checkpoint: the model in its source format (a LoRA run's
    adapters merged into the kernels), or with ``adapters=True`` a LoRA run's adapters alone
    in the PEFT layout (:func:`jaxtl.lora.export_adapters`).

    Returns:
      The path written.

    Raises:
      ValueError: ``adapters=True`` for a run that trained no adapters.
      FileExistsError: ``out`` holds an export and ``overwrite`` is False.
    """
    if adapters:
        recipe = str(read_run_info(run_dir).get("recipe", ""))
        if not recipe.startswith("lora"):
            raise ValueError(
                f"{run_dir} trained recipe {recipe!r}, which has no LoRA adapters; "
                "export it without --adapters (the whole model in its source format)."
            )
    source = read_run_info(run_dir).get("model", {}).get("path")
    if source and os.path.abspath(os.path.expanduser(os.fspath(out))) == os.path.abspath(source):
        raise ValueError(
            f"out (jaxtl export's OUT) {out!r} is the pretrained model {run_dir} was fine-tuned "
            "from; exporting there would replace the weights it (and every run from it) starts "
            "from. Choose another directory."
        )
    run = restore_run(run_dir, which, weights_only=True)
    params, stats = run.state.params, run.state.batch_stats
    if adapters:
        return lora.export_adapters(run.model, out, params, overwrite=overwrite)
    from jaxtl.weights.exporting import export

    return export(run.model, out, params, stats, overwrite=overwrite)


def read_run_info(run_dir: str) -> dict:
    """A run directory's ``run.json``, or an error that says what a run directory is (and
    which runs an experiment directory holds, when it was given one).

    Raises:
      FileNotFoundError: no ``run.json`` in ``run_dir``.
      ValueError: a ``run.json`` that is not valid JSON.
    """
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        runs = sorted(
            name
            for name in (os.listdir(run_dir) if os.path.isdir(run_dir) else ())
            if os.path.isfile(os.path.join(run_dir, name, "run.json"))
        )
        if runs:
            raise FileNotFoundError(
                f"{run_dir!r} is an experiment directory (--out) holding the runs {runs}: pass "
                f"one of them, e.g. {os.path.join(run_dir, runs[0])!r} (only `jaxtl evaluate` "
                "takes the experiment directory, to score every run in it)."
            )
        raise FileNotFoundError(
            f"{run_dir!r} is not a jaxtl run directory (no run.json). Pass one run's directory, "
            "OUT/<run> of `jaxtl finetune`."
        )
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} is not valid JSON ({e}): it was edited or cut short. Restore it from "
                "a copy, or rerun the run into a new --out."
            ) from None


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written file


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON-serializable: {type(o)}")
