"""Transfer recipes: which params train, at what learning rate, as a :class:`Plan`.

A recipe is a function ``(Structure, *args) -> Plan``, one per recipe in this file, reachable
by name through :data:`RECIPES` and :func:`make_plan`. A :class:`~jaxtl.transfer.plan.Plan` is
an ordered rule table (:mod:`jaxtl.transfer.rules`: "/"-joined path regex -> group name) plus
the :class:`~jaxtl.transfer.plan.Group` each name stands for. From it come the label tree, the
trainable mask, a printed table, and one optax transformation
(:mod:`jaxtl.transfer.optimizer`): frozen groups get no optimizer state and no update, each
trainable group its optimizer (AdamW by default) at ``learning_rate * lr_mult``.

Example:
  >>> import numpy as np
  >>> from jaxtl.transfer.structure import Structure
  >>> block = lambda: {"kernel": np.ones((2, 2))}
  >>> params = {"enc": {"layer_0": block(), "layer_1": block()},
  ...           "classifier": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}}
  >>> structure = Structure(blocks=("enc/layer_0", "enc/layer_1"), head=("classifier",))
  >>> plan = make_plan("last_n(1)", structure)
  >>> plan.labels(params)["enc"]
  {'layer_0': {'kernel': 'frozen'}, 'layer_1': {'kernel': 'blocks'}}
  >>> tx = plan.optimizer(1e-3)  # labels are computed from the tree optax hands in
  >>> state = tx.init(params)

Where later recipes go (each is a new function plus a ``RECIPES`` entry; the Plan shape holds):

- **Layer-wise LR decay** (ELECTRA, BEiT): one group per block with ``lr_mult = decay**depth``;
  :func:`layerwise_lr_decay` below.
- **BitFit** (Ben Zaken et al. 2022): head + every ``.../bias`` trainable; :func:`bitfit` below.
- **Gradual unfreezing** (ULMFiT) and **LP-FT** (Kumar et al. 2022): :func:`gradual` and
  :func:`lp_ft` return a Plan with ``stages`` (:mod:`jaxtl.transfer.stages`) that the Trainer
  switches between: each stage recompiles the step once, groups unfrozen at a stage start with
  fresh optimizer state, and groups already training keep theirs (LP-FT restarts them all).
  The alternative, one Plan whose ``lr_mult`` becomes a step schedule that is 0 until the
  group's stage, compiles once but holds moments for every group from the start.
- **L2-SP** (Li et al. 2018): full fine-tuning plus a penalty toward the pretrained params: an
  optimizer term (``jaxtl/transfer/optimizer.py``) over the trainable groups.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

from jaxtl.transfer import lora as _lora
from jaxtl.transfer.plan import Group, Plan
from jaxtl.transfer.rules import prefix_pattern
from jaxtl.transfer.stages import UNITS, Stage
from jaxtl.transfer.structure import Structure

__all__ = [
    "RECIPES",
    "bitfit",
    "full",
    "gradual",
    "last_n",
    "layerwise_lr_decay",
    "linear_probe",
    "lora",
    "lp_ft",
    "make_plan",
    "recipe_name",
    "rules",
    "split_recipes",
]


def _patterns(prefixes: Iterable[str], group: str) -> list[tuple[str, str]]:
    return [(prefix_pattern(p), group) for p in prefixes]


def _need_head(structure: Structure, recipe: str) -> None:
    if not structure.head:
        raise ValueError(f"{recipe} trains the head, but the Structure names none (head=()).")


def linear_probe(structure: Structure) -> Plan:
    """Train the head only; everything else is frozen.

    Example:
      >>> s = Structure(blocks=("enc/layer_0",), head=("classifier",))
      >>> linear_probe(s).rules
      (('classifier(/.*)?', 'head'), ('.*', 'frozen'))
    """
    _need_head(structure, "linear_probe")
    rules = [*_patterns(structure.head, "head"), (".*", "frozen")]
    return Plan(tuple(rules), [Group("head", True), Group("frozen", False)], name="linear_probe")


def last_n(structure: Structure, n: int) -> Plan:
    """Train the head, the neck and the last ``n`` blocks; freeze the rest (stem included).

    ``last_n(s, 0)`` is a linear probe that also trains the neck (e.g. BERT's pooler).

    Example:
      >>> s = Structure(blocks=("enc/layer_0", "enc/layer_1"), head=("classifier",))
      >>> last_n(s, 1).rules
      (('classifier(/.*)?', 'head'), ('enc/layer_1(/.*)?', 'blocks'), ('.*', 'frozen'))
    """
    blocks = structure.blocks
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(blocks):
        raise ValueError(
            f"last_n: n must be an int in 0..{len(blocks)} (this model has {len(blocks)} "
            f"blocks), got {n!r}. Use full() to train the stem as well."
        )
    _need_head(structure, "last_n")
    rules = [
        *_patterns(structure.head, "head"),
        *_patterns(structure.neck, "neck"),
        *_patterns(blocks[len(blocks) - n :], "blocks"),
        (".*", "frozen"),
    ]
    groups = [Group("head", True)]
    groups += [Group("neck", True)] if structure.neck else []
    groups += [Group("blocks", True)] if n else []
    return Plan(tuple(rules), [*groups, Group("frozen", False)], name=f"last_n({n})")


def full(structure: Structure) -> Plan:
    """Train everything. The head keeps its own group so a later LR multiplier can target it.

    Example:
      >>> full(Structure(blocks=(), head=("classifier",))).rules
      (('classifier(/.*)?', 'head'), ('.*', 'body'))
    """
    rules = [*_patterns(structure.head, "head"), (".*", "body")]
    groups = ([Group("head", True)] if structure.head else []) + [Group("body", True)]
    return Plan(tuple(rules), groups, name="full")


def bitfit(structure: Structure) -> Plan:
    """BitFit (Ben Zaken et al. 2022): train the head and every bias; freeze the rest.

    Example:
      >>> bitfit(Structure(blocks=(), head=("classifier",))).rules[1]
      ('(.*/)?bias', 'bias')
    """
    _need_head(structure, "bitfit")
    rules = [*_patterns(structure.head, "head"), ("(.*/)?bias", "bias"), (".*", "frozen")]
    groups = [Group("head", True), Group("bias", True), Group("frozen", False)]
    return Plan(tuple(rules), groups, name="bitfit")


def layerwise_lr_decay(structure: Structure, decay: float) -> Plan:
    """Everything trains; block ``i`` of ``L`` gets ``lr_mult = decay**(L - i)``.

    As in ELECTRA (Clark et al. 2020): head and neck at 1, the last block at ``decay``, the
    first at ``decay**L``, and the stem (with any param the Structure does not name) at
    ``decay**(L + 1)``.

    Example:
      >>> p = layerwise_lr_decay(Structure(blocks=("b0", "b1"), head=("cls",)), 0.5)
      >>> [(g.name, g.lr_mult) for g in p.groups.values()]
      [('head', 1.0), ('block_0', 0.25), ('block_1', 0.5), ('stem', 0.125)]
    """
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay <= 1:
        raise ValueError(f"layerwise_lr_decay: decay must be a number in (0, 1], got {decay!r}.")
    n = len(structure.blocks)
    rules = [*_patterns(structure.head, "head"), *_patterns(structure.neck, "neck")]
    groups = [Group("head", True)] if structure.head else []
    groups += [Group("neck", True)] if structure.neck else []
    for i, block in enumerate(structure.blocks):
        rules.append((prefix_pattern(block), f"block_{i}"))
        groups.append(Group(f"block_{i}", True, lr_mult=float(decay) ** (n - i)))
    rules.append((".*", "stem"))
    groups.append(Group("stem", True, lr_mult=float(decay) ** (n + 1)))
    return Plan(tuple(rules), groups, name=f"layerwise_lr_decay({decay:g})")


def lora(
    structure: Structure,
    rank: int,
    alpha: float | None = None,
    targets: Iterable[str] | None = None,
    dropout: float = 0.0,
) -> Plan:
    """LoRA (Hu et al. 2021): rank-``rank`` adapters on the target kernels train with the head;
    the base model is frozen and holds no optimizer state (:mod:`jaxtl.transfer.lora`).

    Args:
      rank: the adapters' rank.
      alpha: the update is ``alpha / rank * B A``; None: ``alpha = rank``.
      targets: regexes over module paths; None: the family's defaults (query and value for
        BERT and ViT, ``c_attn`` for GPT-2, the non-depthwise convolutions of the blocks for
        CNNs).
      dropout: dropout on the adapters' inputs while training.

    Example:
      >>> s = Structure(blocks=("enc/layer_0",), head=("cls",), lora_targets=(".*/query",))
      >>> p = lora(s, 8, alpha=16)
      >>> p.name, p.rules[1]
      ('lora(8, alpha=16)', ('(.*/)?(lora_a|lora_b)', 'lora'))
    """
    _need_head(structure, "lora")
    if targets is not None and not isinstance(targets, str):
        targets = tuple(targets)
    spec = _lora.LoRA(rank, alpha, targets, dropout)
    # The name keeps only what was given: "lora(8)" re-parses to the family's default targets.
    named = _lora.plan(structure, spec)
    return dataclasses.replace(named, name=spec.describe())


def _positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{what} must be a number > 0, got {value!r}.")
    return value


def _unit(unit: Any, recipe: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"{recipe}: unit must be one of {UNITS}, got {unit!r}.")
    return unit


def gradual(
    structure: Structure, every: float = 1, stages: int | None = None, unit: str = "epochs"
) -> Plan:
    """Gradual unfreezing (ULMFiT, Howard and Ruder 2018): train the head (and neck) first, then
    unfreeze one more block from the top every ``every`` epochs (or steps), and the stem last.

    Each block trains in a group of its own, so a block keeps its optimizer state from stage to
    stage and a newly unfrozen one starts fresh (:mod:`jaxtl.transfer.stages`). All stages
    share the run's LR schedule. A run shorter than the stages reaches only the first ones.

    Args:
      every: the length of each stage, in ``unit``.
      stages: how many stages, the head-only one included; None: every block, then the stem
        (``blocks + 2``).
      unit: ``"epochs"`` or ``"steps"``.

    Example:
      >>> p = gradual(Structure(blocks=("b0", "b1", "b2"), head=("cls",)), every=1, stages=3)
      >>> p.name, [st.start for st in p.stages], sorted(p.groups)
      ('gradual(every=1, stages=3)', [0, 1, 2], ['block_1', 'block_2', 'frozen', 'head'])
    """
    _need_head(structure, "gradual")
    every = _positive(every, "gradual(every=...)")
    unit = _unit(unit, "gradual")
    blocks = structure.blocks
    most = len(blocks) + 2
    if stages is None:
        stages = most
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= most:
        raise ValueError(
            f"gradual(stages={stages!r}): this model has {len(blocks)} blocks, so gradual "
            f"unfreezing has at most {most} stages (the head, then one block at a time from the "
            f"top, then the stem); pass stages between 1 and {most}, or leave it out."
        )
    out = []
    for k in range(stages):
        unfrozen = list(range(len(blocks) - 1, len(blocks) - 1 - min(k, len(blocks)), -1))
        rules = [*_patterns(structure.head, "head"), *_patterns(structure.neck, "neck")]
        groups = [Group("head", True)] + ([Group("neck", True)] if structure.neck else [])
        for i in unfrozen:
            rules.append((prefix_pattern(blocks[i]), f"block_{i}"))
            groups.append(Group(f"block_{i}", True))
        stem = k == len(blocks) + 1
        rules.append((".*", "stem" if stem else "frozen"))
        groups.append(Group("stem", True) if stem else Group("frozen", False))
        plan = Plan(tuple(rules), groups, name=f"gradual stage {k}")
        out.append(Stage(plan, k * every, unit))
    shown = [f"every={every:g}"] + ([f"stages={stages}"] if stages != most else [])
    shown += [f"unit={unit!r}"] if unit != "epochs" else []
    last = out[-1].plan
    return Plan(last.rules, last.groups, name=f"gradual({', '.join(shown)})", stages=tuple(out))


def lp_ft(
    structure: Structure, probe_epochs: float = 1, probe_lr: float = 1e-3, unit: str = "epochs"
) -> Plan:
    """LP-FT (Kumar et al. 2022): a linear probe for ``probe_epochs`` at ``probe_lr``, then full
    fine-tuning from the probed head, in one run. The fine-tuning stage starts its optimizer
    state and LR schedule (warmup, decay) afresh at the run's learning rate. The probe's epochs
    count toward the run's ``epochs``.

    Args:
      probe_epochs: the probe stage's length, in ``unit``.
      probe_lr: the probe stage's peak learning rate.
      unit: ``"epochs"`` or ``"steps"``.

    Example:
      >>> p = lp_ft(Structure(blocks=("b0",), head=("cls",)), 2)
      >>> p.name, [(st.plan.name, st.start, st.restart) for st in p.stages]
      ('lp_ft(2)', [('linear_probe', 0, False), ('full', 2, True)])
    """
    probe_epochs = _positive(probe_epochs, "lp_ft(probe_epochs=...)")
    probe_lr = _positive(probe_lr, "lp_ft(probe_lr=...)")
    unit = _unit(unit, "lp_ft")
    probe, tune = linear_probe(structure), full(structure)
    stages = (
        Stage(probe, 0, unit, learning_rate=float(probe_lr)),
        Stage(tune, probe_epochs, unit, restart=True),
    )
    shown = [f"{probe_epochs:g}"] + ([f"probe_lr={probe_lr:g}"] if probe_lr != 1e-3 else [])
    shown += [f"unit={unit!r}"] if unit != "epochs" else []
    return Plan(tune.rules, tune.groups, name=f"lp_ft({', '.join(shown)})", stages=stages)


def rules(structure: Structure, path: str) -> Plan:
    """The plan of a TOML rules file (:mod:`jaxtl.transfer.rules_file`): its groups with their
    LR and weight-decay multipliers, and its LoRA adapters if it has a ``[lora]`` table.
    ``jaxtl finetune --rules FILE`` is this recipe plus the file's sharding rules."""
    from jaxtl.transfer.rules_file import read_rules_file

    return read_rules_file(path).plan(structure)


# ----------------------------------------------------------------------------- registry

# name -> recipe. Add an entry to make a new recipe reachable from strings (CLI, configs).
RECIPES: dict[str, Callable[..., Plan]] = {
    "full": full,
    "linear_probe": linear_probe,
    "last_n": last_n,
    "bitfit": bitfit,
    "layerwise_lr_decay": layerwise_lr_decay,
    "lora": lora,
    "gradual": gradual,
    "lp_ft": lp_ft,
    "rules": rules,
}
_ALIASES = {"probe": "linear_probe", "llrd": "layerwise_lr_decay"}
# The recipes whose plans train in stages (``Plan.stages``): their later stages start from the
# loaded model's params, so a run of one keeps them (``release_pretrained`` is refused).
STAGED = frozenset({"gradual", "lp_ft"})


def _usage() -> str:
    forms = []
    for name, fn in RECIPES.items():
        args = list(inspect.signature(fn).parameters)[1:]
        forms.append(f"{name}({', '.join(args)})" if args else name)
    aliases = ", ".join(f"{a} = {n}" for a, n in _ALIASES.items())
    return (
        f"valid recipes: {', '.join(forms)} (aliases: {aliases}; 'last_n:2' and 'last2' also work)"
    )


def _parse(spec: str) -> tuple[str, list[Any], dict[str, Any]]:
    text = spec.strip()
    if (m := re.fullmatch(r"last(\d+)", text)) is not None:
        return "last_n", [int(m.group(1))], {}
    if ":" in text and "(" not in text:
        name, _, arg = text.partition(":")
        text = f"{name.strip()}({arg})"
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ValueError(
            f"cannot parse recipe {spec!r}; expected NAME or NAME(ARGS). {_usage()}"
        ) from None
    if isinstance(node, ast.Name):
        return node.id, [], {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"cannot parse recipe {spec!r}; expected NAME or NAME(ARGS). {_usage()}")
    try:
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
    except ValueError:
        raise ValueError(
            f"recipe {spec!r}: arguments must be literals (numbers, strings), e.g. 'last_n(2)'."
        ) from None
    if len(kwargs) != len(node.keywords):
        raise ValueError(f"recipe {spec!r}: '**' arguments are not supported.")
    return node.func.id, args, kwargs


def split_recipes(text: str) -> list[str]:
    """A comma-separated list of recipes, split only at top-level commas (a recipe's own
    arguments may hold commas).

    Example:
      >>> split_recipes("full, lora(8, alpha=16, targets=['.*/query', '.*/value']),probe")
      ['full', "lora(8, alpha=16, targets=['.*/query', '.*/value'])", 'probe']
    """
    out, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [r.strip() for r in out if r.strip()]


def recipe_name(spec: str | Plan) -> str:
    """The registered name of a recipe spec, aliases and shorthands resolved.

    Example:
      >>> recipe_name("probe"), recipe_name("last2"), recipe_name("llrd(0.8)")
      ('linear_probe', 'last_n', 'layerwise_lr_decay')

    Raises:
      ValueError: an unparsable spec or an unknown recipe (the message lists the valid ones).
    """
    if isinstance(spec, Plan):
        return spec.name
    name, _, _ = _parse(spec)
    name = _ALIASES.get(name, name)
    if name not in RECIPES:
        raise ValueError(
            f"unknown transfer recipe {name!r} in recipe (--recipe) {spec!r}; {_usage()}"
        )
    return name


def staged(spec: str | Plan) -> bool:
    """Whether ``spec`` trains in stages (``gradual``, ``lp_ft``), known from its name alone.

    Example:
      >>> staged("lp_ft(1)"), staged("llrd(0.9)")
      (True, False)
    """
    if isinstance(spec, Plan):
        return bool(spec.stages)
    return recipe_name(spec) in STAGED


def make_plan(spec: str | Plan | Callable[[Structure], Plan], structure: Structure) -> Plan:
    """Turns a recipe name, a recipe function or a ready Plan into a Plan for ``structure``.

    Args:
      spec: ``"full"``, ``"linear_probe"``, ``"last_n(2)"`` (or ``"last_n:2"``, ``"last2"``),
        ``"bitfit"``, ``"layerwise_lr_decay(0.65)"``; a callable ``structure -> Plan``; or a
        Plan, returned as is.
      structure: where stem, blocks, neck and head live in the params.

    Raises:
      ValueError: unknown recipe (the message lists the valid ones) or bad arguments.

    Example:
      >>> make_plan("last_n(2)", Structure(blocks=("a", "b", "c"), head=("cls",))).name
      'last_n(2)'
    """
    if isinstance(spec, Plan):
        return spec
    if isinstance(spec, str):
        name, args, kwargs = _parse(spec)
        fn = RECIPES.get(_ALIASES.get(name, name))
        if fn is None:
            raise ValueError(
                f"unknown transfer recipe {name!r} in recipe (--recipe) {spec!r}; {_usage()}"
            )
        try:
            inspect.signature(fn).bind(structure, *args, **kwargs)
        except TypeError as e:
            raise ValueError(f"recipe {spec!r}: {e}. {_usage()}") from None
        return fn(structure, *args, **kwargs)
    if callable(spec):
        plan = spec(structure)
        if not isinstance(plan, Plan):
            raise TypeError(f"recipe {spec!r} returned {type(plan).__name__}, expected a Plan.")
        return plan
    raise TypeError(f"spec must be a recipe name, a Plan or a callable, got {type(spec).__name__}.")
