"""Training: configuration, state (and its builder), losses, compiled steps, the Trainer loop and
its tracker."""

from jaxtl.train.config import (
    CheckpointConfig,
    DataConfig,
    EarlyStopping,
    OptimConfig,
    ScaleConfig,
    TrainConfig,
)
from jaxtl.train.faults import NonFiniteStepsError, Preempted
from jaxtl.train.state import TrainState
from jaxtl.train.steps import compile_steps, eval_step, pmap_steps, train_step
from jaxtl.train.tracker import Tracker
from jaxtl.train.trainer import FitResult, Trainer

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EarlyStopping",
    "FitResult",
    "NonFiniteStepsError",
    "OptimConfig",
    "Preempted",
    "ScaleConfig",
    "TrainConfig",
    "TrainState",
    "Tracker",
    "Trainer",
    "compile_steps",
    "eval_step",
    "pmap_steps",
    "train_step",
]
