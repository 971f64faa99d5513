"""What every model family hands to the rest of jaxtl: a module, its params, and its shape.

A family file (e.g. ``bert.py``) builds a :class:`LoadedModel`. Everything downstream (recipes,
the trainer, the CLI) talks to that object only, so a new family plugs in without touching them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from jaxtl.transfer.structure import Structure

Params = Mapping[str, Any]
Batch = Mapping[str, jax.Array]

__all__ = ["Batch", "DecoderInfo", "LoadedModel", "Params", "Structure"]


@dataclasses.dataclass(frozen=True)
class DecoderInfo:
    """What a causal LM offers :mod:`jaxtl.generation`, as ``LoadedModel.extras["decoder"]``.

    The family's module, called with ``task="causal_lm"``, takes the decoding keywords
    ``positions`` (``[B, T]``), ``cache``, ``cache_index`` and ``logits_at`` and returns
    ``(logits, updated cache)`` (see ``jaxtl.models.gpt2.GPT2Model``).

    Attributes:
      init_cache: ``init_cache(batch, slots, dtype) -> cache``: an empty KV cache with room for
        ``slots`` tokens per row.
      max_length: the longest sequence the model can place (its position table), or ``None``.
      eos_token_id: config.json's end-of-sequence id(s), where generation stops by default.
      pad_token_id: config.json's padding id, written after a row has stopped by default.
    """

    init_cache: Callable[..., Any]
    max_length: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None


def check_model(model: Any, who: str) -> None:
    """``model`` is a :class:`LoadedModel`, else an error saying how ``who`` gets one."""
    if not isinstance(model, LoadedModel):
        raise ValueError(
            f"{who}: model must be a LoadedModel, got {type(model).__name__} {model!r:.80}; "
            "load it first with jaxtl.load(path) (--model PATH)."
        )


@dataclasses.dataclass
class LoadedModel:
    """A model ready for transfer: the result of :func:`jaxtl.load`.

    Attributes:
      family: registry name of the architecture family, e.g. ``"bert"``.
      config: the family's config dataclass.
      module: the Flax linen module for the requested task.
      params: the parameter pytree (nested dicts of arrays).
      report: what the load did (see ``jaxtl.weights.LoadReport``); ``None`` for random init.
      structure: where stem, blocks, neck and head live in ``params``.
      task: ``"classification"``, ``"regression"`` or ``"features"``.
      num_labels: output width of the head (1 for regression).
      path: the directory the model came from.
      apply: ``apply(params, batch, *, train=False, rng=None, batch_stats=None) -> outputs``;
        ``batch`` is a dict holding the family's input keys (``input_ids``, ``attention_mask``,
        ...; ``pixel_values`` as NHWC floats for vision models). BatchNorm models need
        ``batch_stats=`` and run it in inference mode.
      forward: ``forward(params, batch_stats, batch, *, train=False, rng=None, bn_train=()) ->
        (outputs, batch_stats)``: what the trainer calls. BatchNorm layers whose paths are in
        ``bn_train`` normalize with batch statistics and update their running averages.
      extras: family-specific facts (pooling, max sequence length, tokenizer, preprocessing, ...).
      batch_stats: BatchNorm running statistics (the ``"batch_stats"`` collection); empty for
        families without BatchNorm.
      export_fn: ``export_fn(params, batch_stats) -> (state_dict, config)`` in the source
        format's names and layouts; used by :func:`jaxtl.export`.
    """

    family: str
    config: Any
    module: Any
    params: Params
    report: Any
    structure: Structure
    task: str
    num_labels: int
    path: str | None
    apply: Callable[..., jax.Array]
    forward: Callable[..., Any]
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch_stats: Params = dataclasses.field(default_factory=dict)
    export_fn: Callable[..., Any] | None = None

    @property
    def released(self) -> bool:
        """Whether :meth:`release_params` dropped the param arrays (``params`` holds shapes)."""
        return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.params))

    def own_params(self, use: str, *, takes_params: bool = False) -> Params:
        """``params``, for ``use`` (e.g. ``"jaxtl.export"``) that needs their values;
        ``takes_params``: ``use`` also takes the params to use as its ``params`` argument.

        Raises:
          ValueError: they were released (:meth:`release_params`).
        """
        if self.released:
            fix = (
                "pass the params to use (params=, e.g. result.params), or " if takes_params else ""
            )
            raise ValueError(
                f"{use} needs the model's own params, but they were handed to a train state "
                f"(release_pretrained, --release-pretrained): {fix}load the model again "
                "(jaxtl.load(path)); each run with release_pretrained needs its own."
            )
        return self.params

    def release_params(self) -> None:
        """Drop the param arrays, keeping their shapes and dtypes in ``params`` (as
        ``jax.ShapeDtypeStruct`` s): what a train state that holds its own copy needs to lay
        itself out, without a second copy resident (``release_pretrained``,
        ``--release-pretrained``). The memory comes back once nothing else refers to the
        arrays. Load the model again to apply or train it afterwards. The models this one was
        built from and keeps in ``extras`` (a LoRA model's base) give theirs up too: they hold
        the same arrays."""
        self.params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.params)
        for source in self.extras.values():
            if isinstance(source, LoadedModel) and not source.released:
                source.release_params()
