"""Where a fit's metrics go besides ``metrics.jsonl``: TensorBoard event files, Weights & Biases
(offline), or any object with the :class:`Logger` methods.

Every record ``metrics.jsonl`` gets is handed to each logger as it is written: the train
records (``split="train"``: loss, accuracy, lr, samples per second, every ``log_every`` steps)
and the evaluations (``split="val"``: ``val_loss``, ``val_accuracy``, ...). A logger names a
value ``SPLIT/NAME`` (``train/loss``, ``val/accuracy``) at the record's step.

A resumed run redoes the steps after its checkpoint; TensorBoard is told to drop what it
logged for them (``purge_step``), as ``metrics.jsonl`` drops its lines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "LOGGERS",
    "Logger",
    "TensorBoard",
    "WandB",
    "check_installed",
    "open_loggers",
    "scalars",
]


@runtime_checkable
class Logger(Protocol):
    """What a fit calls on a logger (``Trainer(loggers=[...])`` takes any such object)."""

    def write(self, record: Mapping[str, Any]) -> None:
        """One ``metrics.jsonl`` record: ``split``, ``step``, ``epoch`` and the metrics."""

    def close(self) -> None:
        """The fit ended (finished, stopped or failed): flush and release files."""


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's numbers as ``{"SPLIT/NAME": value}`` (``val_accuracy`` -> ``val/accuracy``);
    ``step``, ``split`` and values that are not numbers (a skipped step's ``None``) left out."""
    split = record.get("split", "train")
    out = {}
    for key, value in record.items():
        if key in ("split", "step") or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            name = key.removeprefix(f"{split}_")
            out[f"{split}/{name}"] = float(value)
    return out


class TensorBoard:
    """TensorBoard event files in ``logdir`` (``RUN_DIR/tensorboard`` for ``--tensorboard``),
    written with tensorboardX (``pip install 'jaxtl[loggers]'``).

    Args:
      logdir: the directory of the event files.
      start_step: the step the fit starts from; on a resume, events past it are dropped.
    """

    def __init__(self, logdir: str, start_step: int = 0):
        check_installed(["tensorboard"])
        from tensorboardX import SummaryWriter

        self.logdir = logdir
        self.writer = SummaryWriter(logdir, purge_step=start_step + 1 if start_step else None)

    def write(self, record: Mapping[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, int(record["step"]))

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run in offline mode under ``directory`` (``RUN_DIR/wandb``), which
    ``wandb sync`` uploads later; only when ``wandb`` is installed.

    Args:
      directory: where wandb keeps its offline run.
      name: the run's name.
      config: the run's configuration (``TrainConfig.to_dict()``).
    """

    def __init__(self, directory: str, name: str, config: Mapping[str, Any] | None = None):
        check_installed(["wandb"])
        import wandb

        os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(
            dir=directory,
            name=name,
            config=dict(config or {}),
            mode="offline",
            settings=wandb.Settings(console="off", silent=True),
            reinit="create_new",
        )

    def write(self, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


LOGGERS = ("tensorboard", "wandb")


# Each logger's library and how to install it.
_LIBRARIES = {
    "tensorboard": ("tensorboardX", "pip install 'jaxtl[loggers]'"),
    "wandb": ("wandb", "pip install wandb (runs are written offline; wandb sync uploads them)"),
}


def check_installed(names: Sequence[str]) -> None:
    """Raises the ImportError :func:`open_loggers` would, before anything is computed."""
    for name in names:
        module, install = _LIBRARIES[name]
        try:
            __import__(module)
        except ImportError as e:
            raise ImportError(
                f"--{name} (TrainConfig(loggers=({name!r},))) needs the {module} package: "
                f"{install}."
            ) from e


def open_loggers(
    names: Sequence[str], workdir: str, *, start_step: int = 0, config: Mapping | None = None
) -> list[Logger]:
    """The loggers named in ``TrainConfig.loggers`` for a run directory.

    Raises:
      ValueError: an unknown name.
      ImportError: a logger whose library is not installed (the message says what to install).
    """
    out: list[Logger] = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoard(os.path.join(workdir, "tensorboard"), start_step))
        elif name == "wandb":
            out.append(WandB(os.path.join(workdir, "wandb"), os.path.basename(workdir), config))
        else:
            raise ValueError(
                f"loggers: unknown logger {name!r}; jaxtl has {', '.join(LOGGERS)} "
                "(--tensorboard, --wandb), or pass your own to Trainer(loggers=[...])."
            )
    return out
