"""jaxtl: transfer learning in JAX.

Load a public pretrained checkpoint, declare what trains, fine-tune on a device mesh::

    import jaxtl

    model = jaxtl.load(model_dir, task="classification", num_labels=2)
    plan = jaxtl.make_plan("last_n(2)", model.structure)
    print(plan.table(model.params))
    result = jaxtl.finetune(model, plan, jaxtl.data.vader(), jaxtl.TrainConfig(epochs=1))

The layers, bottom up (docs/architecture.md): ``transfer`` (param paths, rules, plans,
optimizers, recipes) -> ``models`` (one family per file) -> ``weights`` (read, merge, load,
export) -> ``data`` (sources, encoding, loaders) -> ``train`` (config, steps, Trainer) ->
``run`` (one fine-tuning run) -> ``experiment`` (arms compared) -> ``cli``.
"""

from jaxtl import data, lora, parallel, sharding, surgery
from jaxtl.adabn import adapt_batch_norm
from jaxtl.ensembles import soup, wise_ft
from jaxtl.generation import Sampling, generate
from jaxtl.models.base import LoadedModel
from jaxtl.models.registry import list_models
from jaxtl.ranking import rank
from jaxtl.run import RunResult, evaluate_run, export_run, finetune
from jaxtl.train import (
    CheckpointConfig,
    DataConfig,
    EarlyStopping,
    FitResult,
    OptimConfig,
    ScaleConfig,
    TrainConfig,
    Trainer,
    TrainState,
)
from jaxtl.transfer import Group, Plan, Structure, make_optimizer, make_plan
from jaxtl.weights.embedded import default_model_dir, efficientnet_lite0_path
from jaxtl.weights.exporting import export
from jaxtl.weights.loading import load

__version__ = "0.1.0"

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EarlyStopping",
    "FitResult",
    "Group",
    "LoadedModel",
    "OptimConfig",
    "Plan",
    "RunResult",
    "Sampling",
    "ScaleConfig",
    "Structure",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "adapt_batch_norm",
    "data",
    "default_model_dir",
    "efficientnet_lite0_path",
    "evaluate_run",
    "export",
    "export_run",
    "finetune",
    "generate",
    "list_models",
    "load",
    "lora",
    "make_optimizer",
    "make_plan",
    "parallel",
    "rank",
    "sharding",
    "soup",
    "surgery",
    "wise_ft",
]
