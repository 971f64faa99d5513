"""Training configuration: the knobs of :class:`jaxtl.train.Trainer`, in four sections.

- :class:`OptimConfig`: how params move (optimizer, learning rate and schedule, decay, clipping);
- :class:`~jaxtl.data.config.DataConfig`: what each step sees (batch sizes, augmentation,
  mixing, loading), defined by the data layer that reads it;
- :class:`CheckpointConfig`: when to evaluate and save, which evaluation is best, when to stop;
- :class:`ScaleConfig`: how a step is laid out over devices and memory (mesh, sharding rules,
  gradient accumulation, remat, precision).

:class:`TrainConfig` holds the four plus the run's budget, seed and BatchNorm mode. Every knob
has one home, so ``TrainConfig`` also takes the sections' fields by name and routes each to its
section: ``TrainConfig(epochs=2, learning_rate=1e-3, batch_size=16)`` is
``TrainConfig(epochs=2, optim=OptimConfig(learning_rate=1e-3), data=DataConfig(batch_size=16))``.

Example:
  >>> config = TrainConfig(epochs=2, learning_rate=1e-3, batch_size=16)
  >>> config.optim.learning_rate, config.data.batch_size, config.checkpoint.max_to_keep
  (0.001, 16, 2)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from jaxtl.data.config import FLAGS as DATA_FLAGS
from jaxtl.data.config import DataConfig, check_types
from jaxtl.sharding import MIN_SHARD_SIZE, check_axes
from jaxtl.transfer.schedules import SCHEDULES, LRSchedule

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EarlyStopping",
    "OptimConfig",
    "ScaleConfig",
    "TrainConfig",
]


# Each option's `jaxtl finetune` flag where it is not --<name with dashes>, and None for the
# options only Python sets (tests/test_cli.py checks this against the parser).
FLAGS: dict[str, str | None] = {
    **DATA_FLAGS,
    "learning_rate": "--lr",
    "early_stopping": "--patience",
    "patience": "--patience",
    "sharding_rules": "--shard-rule",
    **dict.fromkeys(
        ("optimizer_options", "warmup_steps", "learning_rate_input", "weight_decay_input",
         "checkpoint_every", "max_to_keep", "best_mode", "restore_best", "min_delta", "metric",
         "mode", "min_shard_size", "log_every", "progress", "train_bn", "precise_bn",
         "loggers"),
    ),
}  # fmt: skip


def _named(name: str) -> str:
    """``"epochs (--epochs)"``: an option by its Python name and its flag, where it has one."""
    flag = FLAGS.get(name, "--" + name.replace("_", "-"))
    return f"{name} ({flag})" if flag else name


def _checked(obj: Any, annotations: dict[str, str]) -> None:
    check_types(obj, annotations, FLAGS)


def _at_least(obj: Any, names: tuple[str, ...], low: int) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < low:
            raise ValueError(f"{_named(name)} must be >= {low}, got {value}.")


@dataclasses.dataclass
class EarlyStopping:
    """Stop when the run's improvement metric has not improved by ``min_delta`` for
    ``patience`` evaluations.

    The metric is the run's one improvement rule, shared with the best checkpoint
    (:meth:`CheckpointConfig.monitor`): ``val_accuracy`` (higher is better) for classification,
    ``val_loss`` (lower is better) for regression and causal LM, unless a metric is named here or
    as ``CheckpointConfig.best_metric`` (naming two different ones is an error).

    Attributes:
      patience: evaluations without improvement before stopping (>= 1).
      min_delta: how much better than the best so far counts as an improvement.
      restore_best: put the best evaluation's params back at the end of training.
      metric: a validation metric the task reports (e.g. ``"val_loss"``); None: the rule above.
      mode: ``"max"`` or ``"min"``; None: ``"min"`` for losses and perplexity, else ``"max"``.
    """

    patience: int = 3
    min_delta: float = 0.0
    restore_best: bool = True
    metric: str | None = None
    mode: str | None = None

    def __post_init__(self):
        _checked(self, EarlyStopping.__annotations__)
        if self.mode not in (None, "max", "min"):
            raise ValueError(f"EarlyStopping.mode must be 'max' or 'min', got {self.mode!r}.")
        if self.min_delta < 0:
            raise ValueError(
                f"EarlyStopping.min_delta must be >= 0 (an improvement by at least it counts), "
                f"got {self.min_delta}."
            )
        if self.patience < 1:
            raise ValueError(
                f"EarlyStopping.patience (--patience) must be >= 1, got {self.patience}."
            )


@dataclasses.dataclass
class OptimConfig:
    """How params move.

    Attributes:
      optimizer: an optax optimizer by name (``"adamw"``, ``"sgd"``, ``"lion"``,
        ``"adafactor"``, ...; see :func:`jaxtl.transfer.available_optimizers`).
      optimizer_options: its own keyword arguments, e.g. ``{"momentum": 0.9}`` for SGD.
      learning_rate: peak learning rate (recipes scale it per group with ``lr_mult``).
      schedule: ``"constant"``, ``"linear"`` (decay to 0, BERT's) or ``"cosine"``.
      warmup_steps: linear warmup from 0; ``warmup_ratio`` of the total when 0.
      warmup_ratio: warmup as a fraction of the total steps.
      weight_decay: decay of trainable matrices (decoupled for AdamW; see
        :mod:`jaxtl.transfer.optimizer` for the other optimizers).
      clip_norm: clip the global norm of the trainable gradients; ``None`` disables.
      l2_sp: ``(alpha, beta)``: L2-SP (Li et al. 2018), the penalty
        ``alpha / 2 * ||w - w0||^2`` toward the pretrained weights ``w0`` on the trained
        backbone and ``beta / 2 * ||w||^2`` on the head, with any recipe; ``None``: off.
      learning_rate_input: the learning-rate schedule enters the compiled train step as data
        instead of constants in its program: each trainable group keeps the peak, warmup steps
        and total steps in its optimizer state (:class:`jaxtl.transfer.optimizer.ScheduleInput`,
        set from this config and saved with the optimizer state) and computes its learning rate
        from them (:func:`jaxtl.transfer.schedules.schedule_value`), the same updates to the bit
        on CPU. Runs that differ only in the learning rate, their length (epochs, training-set
        size) and the seed then compile one program, which XLA's persistent compilation cache
        hands from one to the next (``jaxtl sweep`` of a backbone-training recipe, and the arms
        of ``jaxtl finetune``'s comparison). Not for staged recipes.
      weight_decay_input: the weight decay enters the compiled train step as an input too:
        each trainable group without its own ``weight_decay`` keeps it in its optimizer state
        (:class:`jaxtl.transfer.optimizer.WeightDecayInput`, set from this config and saved with
        the optimizer state), the same step up to float rounding. With ``learning_rate_input``,
        runs that differ only in the learning rate, the weight decay (and the seed) compile one
        program. Not for staged recipes.
    """

    optimizer: str = "adamw"
    optimizer_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    learning_rate: float = 5e-5
    schedule: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    clip_norm: float | None = 1.0
    l2_sp: tuple[float, float] | None = None
    learning_rate_input: bool = False
    weight_decay_input: bool = False

    def __post_init__(self):
        from jaxtl.transfer.optimizer import check_decay_and_clip, optimizer_factory

        _checked(self, OptimConfig.__annotations__)
        if self.l2_sp is not None:  # JSON (run.json) gives a list
            values = tuple(self.l2_sp) if isinstance(self.l2_sp, list | tuple) else ()
            if len(values) != 2 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in values
            ):
                raise ValueError(
                    f"l2_sp (--l2-sp ALPHA,BETA) must be two numbers >= 0, got {self.l2_sp!r}."
                )
            self.l2_sp = (float(values[0]), float(values[1]))
        optimizer_factory(self.optimizer)  # an unknown name fails here, listing the valid ones
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule (--schedule) must be one of {SCHEDULES}, got {self.schedule!r}."
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate (--lr) must be > 0, got {self.learning_rate}.")
        check_decay_and_clip(self.weight_decay, self.clip_norm)
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(
                f"warmup_ratio (--warmup-ratio) must be in [0, 1], got {self.warmup_ratio}."
            )
        _at_least(self, ("warmup_steps",), 0)

    def lr_schedule(self, total_steps: int) -> LRSchedule:
        """Warmup (linear from 0) then constant, linear decay to 0, or cosine decay to 0, over
        ``total_steps``: an optax schedule (:class:`jaxtl.transfer.schedules.LRSchedule`)."""
        return LRSchedule.of(
            self.schedule, self.learning_rate, total_steps, self.warmup_steps, self.warmup_ratio
        )


@dataclasses.dataclass
class CheckpointConfig:
    """When to evaluate and save, which evaluation is the best, and when to stop.

    Every evaluation saves the latest checkpoint (and the best one when it improves).

    Attributes:
      eval_every: evaluate every N steps exactly; ``None``: ``evals_per_epoch`` decides.
      evals_per_epoch: evaluations per epoch when ``eval_every`` is None, but never more often
        than every ``min_eval_interval`` steps (a tiny dataset's epoch of 4 steps is evaluated
        once, not 4 times). The last step is always evaluated.
      min_eval_interval: the fewest steps between two evaluations that ``evals_per_epoch``
        asks for (at most one epoch).
      checkpoint_every: save every N steps besides each evaluation; ``None``: at evaluations.
      max_to_keep: recent checkpoints kept for resume.
      best_metric: the validation metric that ranks evaluations (the best checkpoint,
        restore-best and early stopping); ``None``: ``val_accuracy`` for classification,
        ``val_loss`` for regression and causal LM.
      best_mode: ``"max"`` or ``"min"``; ``None``: ``"min"`` for losses and perplexity, else
        ``"max"``.
      restore_best: end training with the best-evaluated params (needs a validation split).
      early_stopping: stop early on a stalled improvement metric.
      compress_checkpoints: write checkpoints zstd-compressed; ``None``: raw on CPU,
        compressed elsewhere. On CPU a compressed save holds buffers of the state in the
        training's memory (MiniLM: 170-350 MiB at each save, about 120 MiB of the demo's peak),
        while a trained state's raw checkpoint takes about 1.6x the disk (MiniLM: 259 against
        165 MiB per step: AdamW's moments for the words a task never uses are zeros), and the
        demo's run took 3-6% longer with them (two pairs of runs). See ``jaxtl.checkpoint``
        and benchmarks/README.md.
    """

    eval_every: int | None = None
    evals_per_epoch: int = 1
    min_eval_interval: int = 20
    checkpoint_every: int | None = None
    max_to_keep: int = 2
    best_metric: str | None = None
    best_mode: str | None = None
    restore_best: bool = True
    early_stopping: EarlyStopping | None = None
    compress_checkpoints: bool | None = None

    def __post_init__(self):
        _checked(self, CheckpointConfig.__annotations__)
        if isinstance(self.early_stopping, Mapping):
            valid = [f.name for f in dataclasses.fields(EarlyStopping)]
            unknown = sorted(set(self.early_stopping) - set(valid))
            if unknown:
                raise ValueError(
                    f"early_stopping has an unknown option {unknown[0]!r}; EarlyStopping takes "
                    f"{valid}."
                )
            self.early_stopping = EarlyStopping(**self.early_stopping)
        if not (self.early_stopping is None or isinstance(self.early_stopping, EarlyStopping)):
            raise ValueError(
                "early_stopping (--patience) must be an EarlyStopping (e.g. "
                "jaxtl.EarlyStopping(patience=3)), a dict of its options, or None, got "
                f"{self.early_stopping!r}."
            )
        if self.best_mode not in (None, "max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {self.best_mode!r}.")
        _at_least(self, ("eval_every", "evals_per_epoch", "min_eval_interval"), 1)
        _at_least(self, ("checkpoint_every", "max_to_keep"), 1)

    @property
    def restores_best(self) -> bool:
        """Whether training ends with the best-evaluated params: ``restore_best``, and with early
        stopping its ``restore_best`` too (both default to True, so a False in either turns it
        off).

        Example:
          >>> CheckpointConfig(early_stopping=EarlyStopping(restore_best=False)).restores_best
          False
        """
        es = self.early_stopping
        return self.restore_best and (es is None or es.restore_best)

    def eval_interval(self, steps_per_epoch: int) -> int:
        """Steps between evaluations.

        Example:
          >>> c = CheckpointConfig(evals_per_epoch=4)
          >>> c.eval_interval(187), c.eval_interval(4)  # VADER's epoch; a 38-image folder's
          (46, 4)
        """
        if self.eval_every is not None:
            return self.eval_every
        asked = max(1, steps_per_epoch // self.evals_per_epoch)
        return max(asked, min(self.min_eval_interval, steps_per_epoch))

    def monitor(self, task: str) -> tuple[str, str]:
        """``(metric, mode)``: the one improvement rule of a run on ``task``, shared by the
        best checkpoint, restore-best and early stopping.

        Raises:
          ValueError: two different metrics named (here and in ``early_stopping``), or a
            metric the task does not report (the message lists those it does).

        Example:
          >>> CheckpointConfig().monitor("regression")
          ('val_loss', 'min')
          >>> CheckpointConfig(early_stopping=EarlyStopping(metric="val_loss")).monitor(
          ...     "classification")
          ('val_loss', 'min')
        """
        from jaxtl.train.losses import reported_metrics

        es = self.early_stopping
        named = {m for m in (self.best_metric, es.metric if es else None) if m is not None}
        if len(named) > 1:
            raise ValueError(
                f"best_metric={self.best_metric!r} (--best-metric) and early_stopping.metric="
                f"{es.metric!r} name two improvement rules; a run ranks its evaluations by one. "
                "Name one of them (or the same metric twice)."
            )
        default = "val_accuracy" if task == "classification" else "val_loss"
        metric = named.pop() if named else default
        reported = reported_metrics(task)
        if metric not in reported:
            raise ValueError(
                f"best_metric / early_stopping.metric (--best-metric) {metric!r} is not reported "
                f"for task={task!r}; its validation metrics are {list(reported)}."
            )
        modes = {m for m in (self.best_mode, es.mode if es else None) if m is not None}
        if len(modes) > 1:
            raise ValueError(
                f"best_mode={self.best_mode!r} and early_stopping.mode={es.mode!r} disagree; "
                "name one of them."
            )
        lower = metric.endswith(("loss", "perplexity"))
        mode = modes.pop() if modes else ("min" if lower else "max")
        return metric, mode


@dataclasses.dataclass
class ScaleConfig:
    """How a step is laid out over devices and memory.

    Attributes:
      mesh: axis sizes of the device mesh, ``"data=2,fsdp=4"`` or ``{"fsdp": 8}``
        (:func:`jaxtl.parallel.parse_mesh`); ``None``: every device on ``data`` (params
        replicated). ``fsdp`` shards params and optimizer state, ``tensor`` splits attention and
        MLP matrices Megatron-style; both ``data`` and ``fsdp`` split the batch. Load a model
        larger than one device straight onto the same mesh with ``jaxtl.load(path,
        mesh=..., sharding_rules=..., min_shard_size=...)`` (its params then already have
        their train-state shardings; ``jaxtl finetune`` does this when ``--mesh`` has
        ``fsdp`` or ``tensor`` above 1 or ``--shard-rule`` is given, except with
        ``--feature-cache``).
      sharding_rules: ``(path regex, spec)`` pairs tried before the family's defaults
        (:mod:`jaxtl.sharding`); a spec is a tuple of mesh axes per dimension (``("fsdp",
        None)``), ``"fsdp"`` (largest divisible dimension) or ``"replicated"``.
      min_shard_size: leaves with fewer elements stay whole under the ``"fsdp"`` rule.
      grad_accum: microbatches per optimizer step, summed inside the one jitted step (the step
        of the whole batch, ``batch_size`` rows); ``batch_size`` must divide by
        ``data x fsdp x grad_accum``.
      remat: rematerialize each transformer block (``jax.checkpoint``) under this policy:
        ``"full"`` (keep only block inputs), ``"dots_saveable"`` (keep matmul outputs),
        ``"dots_with_no_batch_dims_saveable"``; ``None``: store every activation.
      precision: ``"float32"`` or ``"bf16"`` compute (:mod:`jaxtl.train.precision`: master
        params, optimizer state, gradients, softmax, LayerNorm and loss stay float32).
      frozen_bf16: store the frozen groups' params in bfloat16 (half their memory).
      release_pretrained: hold the params once: when the first train state is built, the
        loaded model gives up its param arrays (``model.params`` keeps their shapes, as
        ``jax.ShapeDtypeStruct`` s; :meth:`jaxtl.LoadedModel.release_params`), so the state's
        copy is the only one resident. Load the model again to use its pretrained params
        afterwards. Refused for staged plans, whose later stages start from them.
        :func:`jaxtl.experiment.compare` and sequential sweeps load the model again from its
        path for each run (so changes made to it in Python are not kept). A ``feature_cache`` run
        keeps the full model, which computes the features; vmapped sweeps build no state.
        ``jaxtl finetune`` and ``jaxtl sweep`` turn it on unless a recipe is staged
        (``--no-release-pretrained`` turns it off).
    """

    mesh: str | dict[str, int] | None = None
    sharding_rules: tuple[tuple[str, Any], ...] = ()
    min_shard_size: int = MIN_SHARD_SIZE
    grad_accum: int = 1
    remat: str | None = None
    precision: str = "float32"
    frozen_bf16: bool = False
    release_pretrained: bool = False

    def __post_init__(self):
        from jaxtl.models.layers import remat_policy
        from jaxtl.train.precision import check_precision

        _checked(self, ScaleConfig.__annotations__)
        if self.remat is not None:
            remat_policy(self.remat)
        check_precision(self.precision)
        _at_least(self, ("grad_accum",), 1)
        if self.min_shard_size < 0:
            raise ValueError(f"min_shard_size must be >= 0, got {self.min_shard_size}.")
        rules = self.sharding_rules
        rules = list(rules.items() if isinstance(rules, Mapping) else rules)
        for i, rule in enumerate(rules):
            if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
                raise ValueError(
                    f"sharding_rules[{i}] is {rule!r}; expected a (path regex, spec) pair, "
                    'e.g. (".*/kernel", ("fsdp", None)).'
                )
        # Specs as plain tuples (a PartitionSpec is not JSON): run.json records and rebuilds them.
        self.sharding_rules = tuple((p, _plain_spec(v)) for p, v in rules)
        for pattern, spec in self.sharding_rules:
            check_axes(spec, f"sharding rule ({pattern!r}, {spec!r}) (--shard-rule)")


def _plain_spec(value: Any) -> Any:
    if isinstance(value, str) or value is None:
        return value
    return tuple(tuple(e) if isinstance(e, list) else e for e in value)


_SECTIONS = {
    "optim": OptimConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "scale": ScaleConfig,
}
_OWNER = {f.name: section for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}


@dataclasses.dataclass(init=False)
class TrainConfig:
    """How long, how fast and how safely to train.

    Attributes:
      epochs: passes over the training split (ignored when ``max_steps`` is set).
      max_steps: total optimizer steps; the LR schedule spans exactly these.
      seed: seeds params of new heads, dropout (``fold_in(seed key, step)``) and data order.
      log_every: steps between metric records in ``metrics.jsonl``.
      progress: show a progress bar; ``None``: only when stdout is a terminal.
      train_bn: every BatchNorm layer normalizes with batch statistics and updates its running
        averages, frozen or not. Off (the default), a BatchNorm layer trains only when the plan
        trains its scale/bias; frozen ones run in inference mode with their running statistics.
      max_bad_steps: stop with :class:`jaxtl.train.faults.NonFiniteStepsError` after this
        many steps in a row whose loss or gradient was NaN/inf. Each such step's update is
        skipped (params and optimizer state unchanged) and counted in ``metrics.jsonl``.
      precise_bn: before every evaluation, replace the training BatchNorm layers' running
        averages by their exact statistics over the first ``precise_bn`` examples of the training
        split under the current weights ("precise BN", Wu & Johnson 2021). Running averages lag
        weights that move fast; with a small momentum (EfficientNet's 0.01) and a short
        fine-tuning budget they stay near the pretrained values and evaluation suffers. 0: off.
      loggers: where the metrics also go, by name: ``"tensorboard"`` (event files in
        ``RUN_DIR/tensorboard``, ``--tensorboard``) and ``"wandb"`` (an offline Weights & Biases
        run in ``RUN_DIR/wandb``, ``--wandb``); see :mod:`jaxtl.train.loggers`.
      optim: :class:`OptimConfig`.
      data: :class:`DataConfig`.
      checkpoint: :class:`CheckpointConfig`.
      scale: :class:`ScaleConfig`.

    Any field of the four sections may also be given by name (see the module docstring);
    a section given as a dict (as :meth:`to_dict` writes it) is rebuilt.
    """

    epochs: int
    max_steps: int | None
    seed: int
    log_every: int
    progress: bool | None
    train_bn: bool
    max_bad_steps: int
    precise_bn: int
    loggers: tuple[str, ...]
    optim: OptimConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    scale: ScaleConfig

    _DEFAULTS = {
        "epochs": 3,
        "max_steps": None,
        "seed": 0,
        "log_every": 20,
        "progress": None,
        "train_bn": False,
        "max_bad_steps": 5,
        "precise_bn": 0,
        "loggers": (),
    }

    def __init__(self, **options: Any):
        routed: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for key in list(options):
            if key in _OWNER:
                routed[_OWNER[key]][key] = options.pop(key)
        for name, cls in _SECTIONS.items():
            section = options.pop(name, None)
            if isinstance(section, Mapping):
                section = cls(**section)
            section = cls() if section is None else section
            if not isinstance(section, cls):
                raise TypeError(f"TrainConfig {name}= must be a {cls.__name__}, got {section!r}.")
            setattr(self, name, dataclasses.replace(section, **routed[name]))
        unknown = sorted(set(options) - set(self._DEFAULTS))
        if unknown:
            valid = sorted([*self._DEFAULTS, *_OWNER, *_SECTIONS])
            raise TypeError(
                f"TrainConfig got an unknown option {unknown[0]!r}; valid options: {valid}."
            )
        for key, default in self._DEFAULTS.items():
            setattr(self, key, options.get(key, default))
        _checked(self, {k: TrainConfig.__annotations__[k] for k in self._DEFAULTS})
        _at_least(self, ("epochs", "log_every", "max_steps", "max_bad_steps"), 1)
        _at_least(self, ("precise_bn",), 0)
        if isinstance(self.loggers, str):
            self.loggers = (self.loggers,)
        self.loggers = tuple(self.loggers)
        unknown = [n for n in self.loggers if n not in ("tensorboard", "wandb")]
        if unknown:
            raise ValueError(
                f"TrainConfig loggers={list(self.loggers)}: unknown logger {unknown[0]!r}; jaxtl "
                "has 'tensorboard' (--tensorboard) and 'wandb' (--wandb), and "
                "Trainer(loggers=[...]) takes any object with write(record) and close()."
            )

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * steps_per_epoch

    def lr_schedule(self, total_steps: int) -> LRSchedule:
        """The optimizer's learning rate per step (see :meth:`OptimConfig.lr_schedule`)."""
        return self.optim.lr_schedule(total_steps)

    def to_dict(self) -> dict:
        """Every option under its own name, as ``run.json`` records it: the sections' fields
        side by side with the run's (names are unique across sections), so that a run directory
        reads the same whatever section an option lives in. ``TrainConfig(**d)`` rebuilds it.

        Example:
          >>> d = TrainConfig(epochs=2, learning_rate=1e-3).to_dict()
          >>> d["epochs"], d["learning_rate"], d["batch_size"], TrainConfig(**d).optim.learning_rate
          (2, 0.001, 32, 0.001)
        """
        out = {key: getattr(self, key) for key in self._DEFAULTS}
        for name in _SECTIONS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out


def as_config(config: TrainConfig | Mapping[str, Any] | None, who: str) -> TrainConfig:
    """What ``who`` (``"jaxtl.finetune"``, ``"the Trainer"``) takes as its config: ``None``
    (the defaults), a :class:`TrainConfig` or a dict of its options."""
    if isinstance(config, Mapping):
        config = TrainConfig(**config)
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise ValueError(
            f"{who}: config must be a jaxtl.TrainConfig (or a dict of its options), got "
            f"{type(config).__name__}."
        )
    return config


def as_workdir(workdir: Any) -> str | None:
    """A run directory as a string: a path-like ``workdir`` (``~`` expanded), or ``None``."""
    if workdir is None:
        return None
    if not isinstance(workdir, str | os.PathLike):
        raise ValueError(f"workdir (--out) must be a path, got {workdir!r}.")
    return os.path.expanduser(os.fspath(workdir))
