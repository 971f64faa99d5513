"""jaxtl: transfer learning in JAX.

Load a public pretrained checkpoint, declare what trains, fine-tune on a device mesh::

    import jaxtl

    model = jaxtl.load(model_dir, task="classification", num_labels=2)
    plan = jaxtl.make_plan("last_n(2)", model.structure)
    print(plan.table(model.params))
    result = jaxtl.finetune(model, plan, jaxtl.data.vader(), jaxtl.TrainConfig(epochs=1))
"""

from jaxtl import data
from jaxtl.adabn import adapt_batch_norm
from jaxtl.exporting import export
from jaxtl.loading import load
from jaxtl.models.base import LoadedModel, Structure
from jaxtl.models.registry import list_models
from jaxtl.run import RunResult, evaluate_run, finetune
from jaxtl.strategies import Group, Plan, make_plan
from jaxtl.train import EarlyStopping, FitResult, TrainConfig, Trainer, TrainState

__version__ = "0.1.0"

__all__ = [
    "EarlyStopping",
    "FitResult",
    "Group",
    "LoadedModel",
    "Plan",
    "RunResult",
    "Structure",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "adapt_batch_norm",
    "data",
    "evaluate_run",
    "export",
    "finetune",
    "list_models",
    "load",
    "make_plan",
]
