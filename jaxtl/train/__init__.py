"""Training: state, compiled steps, the Trainer loop and its configuration."""

from jaxtl.train.config import EarlyStopping, TrainConfig
from jaxtl.train.state import TrainState
from jaxtl.train.steps import compile_steps, eval_step, pmap_steps, train_step
from jaxtl.train.trainer import FitResult, Trainer

__all__ = [
    "EarlyStopping",
    "FitResult",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "compile_steps",
    "eval_step",
    "pmap_steps",
    "train_step",
]
