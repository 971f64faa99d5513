"""Where the parts of a param tree live: the vocabulary recipes are written in.

A family (``jaxtl/models/<family>.py``) declares its :class:`Structure`; a recipe
(:mod:`jaxtl.transfer.recipes`) turns it into rules, so ``last_n(2)`` means the same thing for
BERT, ResNet and GPT-2 whatever each calls its blocks.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Structure"]


@dataclasses.dataclass(frozen=True)
class Structure:
    """Where the parts of a param tree live, as "/"-joined path prefixes.

    Recipes are written against this, not against a family's names: ``last_n(2)`` trains
    ``blocks[-2:]`` + ``neck`` + ``head`` whatever the family calls them.

    Attributes:
      blocks: the repeated blocks in input-to-output order, e.g.
        ``("bert/encoder/layer_0", ..., "bert/encoder/layer_5")``.
      head: the task head(s), new for every task, e.g. ``("classifier",)``.
      neck: parts between the last block and the head that a "last n blocks" recipe also
        trains, e.g. ``("bert/pooler",)``; empty when the model has none.
      stem: parts before the first block (embeddings, stem conv).
      tensor_parallel: ``(layer path regex, "column" | "row")`` pairs naming the Dense layers
        that a ``tensor`` mesh axis splits Megatron-style (:mod:`jaxtl.sharding`): a block's
        input projections (attention q/k/v, the MLP's first layer) by output column, its output
        projections by input row. Empty: the family has no tensor-parallel layout.
      lora_targets: regexes over module paths naming the layers a LoRA recipe adapts by
        default (:mod:`jaxtl.transfer.lora`), e.g. attention query and value; empty: every
        kernel inside the blocks.
    """

    blocks: tuple[str, ...]
    head: tuple[str, ...]
    neck: tuple[str, ...] = ()
    stem: tuple[str, ...] = ()
    tensor_parallel: tuple[tuple[str, str], ...] = ()
    lora_targets: tuple[str, ...] = ()
