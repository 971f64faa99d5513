"""The transfer layer: which params train, and how, decided by rules over param paths.

One language serves every "which params does X apply to" question (freezing, LR multipliers,
LoRA targets and sharding):

- :mod:`~jaxtl.transfer.trees`: param trees as "/"-joined paths (flatten, prefixes, sizes);
- :mod:`~jaxtl.transfer.rules`: ordered ``(regex, value)`` pairs, first ``re.fullmatch`` wins;
- :mod:`~jaxtl.transfer.structure`: where stem, blocks, neck and head live in a family's tree;
- :mod:`~jaxtl.transfer.plan`: rules -> groups -> labels, trainable mask, the plan table;
- :mod:`~jaxtl.transfer.optimizer`: the plan's ``optax.partition`` optimizer (AdamW or any
  optax optimizer by name);
- :mod:`~jaxtl.transfer.schedules`: LR schedules, as optax's constants or as step data;
- :mod:`~jaxtl.transfer.recipes`: named recipes (``full``, ``linear_probe``, ``last_n(k)``,
  ``bitfit``, ``layerwise_lr_decay(d)``, ``lora(r)``, ``gradual(every)``, ``lp_ft(epochs)``)
  -> a Plan;
- :mod:`~jaxtl.transfer.stages`: staged plans (what trains changes during a run) and the
  optimizer state carried between stages;
- :mod:`~jaxtl.transfer.lora`: LoRA adapters on param trees (targets, init, merge);
- :mod:`~jaxtl.transfer.rules_file`: groups, LoRA and sharding rules from one TOML file.
"""

from jaxtl.transfer.optimizer import available_optimizers, make_optimizer
from jaxtl.transfer.plan import Group, GroupRow, Plan
from jaxtl.transfer.recipes import RECIPES, make_plan, recipe_name
from jaxtl.transfer.rules import (
    REQUIRED,
    InvalidRuleError,
    Rules,
    UnmatchedParamsError,
    match,
    matcher,
    prefix_pattern,
    tree_from_rules,
)
from jaxtl.transfer.structure import Structure
from jaxtl.transfer.trees import count_params, flatten, is_under, tree_bytes, unflatten

__all__ = [
    "RECIPES",
    "REQUIRED",
    "Group",
    "GroupRow",
    "InvalidRuleError",
    "Plan",
    "Rules",
    "Structure",
    "UnmatchedParamsError",
    "available_optimizers",
    "count_params",
    "flatten",
    "is_under",
    "make_optimizer",
    "make_plan",
    "match",
    "matcher",
    "prefix_pattern",
    "recipe_name",
    "tree_bytes",
    "tree_from_rules",
    "unflatten",
]
