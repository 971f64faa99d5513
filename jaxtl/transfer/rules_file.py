"""A TOML rules file: what trains (groups, LR and weight-decay multipliers), LoRA targets and
sharding, in the one rule syntax, for ``jaxtl finetune --rules FILE`` (or the recipe
``rules('FILE')``).

Every pattern is a regex fully matched against "/"-joined param paths, first match wins, as
everywhere in jaxtl (:mod:`jaxtl.transfer.rules`). The file::

    # Groups, in order: the first group whose pattern matches a param owns it.
    [[group]]
    name = "head"
    match = ["classifier(/.*)?"]

    [[group]]
    name = "top"
    match = ['bert/encoder/layer_(4|5)/.*', "bert/pooler(/.*)?"]
    lr_mult = 0.5        # x the learning rate
    wd_mult = 0.0        # x the weight decay (or weight_decay = 0.0 to set it)

    [[group]]
    name = "frozen"
    match = [".*"]
    trainable = false

    # Optional: LoRA adapters (their leaves get a trainable group "lora" of their own, first,
    # unless a group is named "lora").
    [lora]
    rank = 8
    alpha = 16
    targets = [".*/query", ".*/value"]

    # Optional: sharding rules (jaxtl.sharding), tried before the defaults. spec is a list with
    # one entry per dimension: a mesh axis, a list of axes, or "" for a whole dimension; or the
    # string "fsdp" or "replicated".
    [[shard]]
    match = "bert/embeddings/word_embeddings/embedding"
    spec = ["fsdp", ""]

Checked when the plan meets a model (before anything compiles): every param must match a group
(coverage), and a group pattern that labels no param is an error (a typo or a rule shadowed by
an earlier one), naming the group.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from typing import Any

from jaxtl.transfer.lora import ADAPTER_PATTERN, LoRA
from jaxtl.transfer.plan import Group, Plan
from jaxtl.transfer.rules import tree_from_rules

__all__ = ["RulesFile", "RulesFileError", "check_used", "read_rules_file"]

_GROUP_KEYS = {"name", "match", "trainable", "lr_mult", "weight_decay", "wd_mult"}
_LORA_KEYS = {"rank", "alpha", "targets", "dropout"}
_TOP_KEYS = {"group", "lora", "shard"}


class RulesFileError(ValueError):
    """A rules file that cannot be read or means nothing valid; the message names the file."""


@dataclasses.dataclass(frozen=True)
class RulesFile:
    """A parsed rules file.

    Attributes:
      path: the file, absolute.
      rules: ``(pattern, group name)`` in file order (each group's patterns in turn).
      groups: the :class:`Group` of each name.
      lora: the ``[lora]`` options, or None.
      sharding: ``(pattern, spec)`` pairs for :class:`jaxtl.ScaleConfig` ``sharding_rules``.
    """

    path: str
    rules: tuple[tuple[str, str], ...]
    groups: tuple[Group, ...]
    lora: LoRA | None
    sharding: tuple[tuple[str, Any], ...]

    def plan(self, structure: Any = None) -> Plan:
        """The Plan of the file's groups (and its LoRA adapters, targets resolved against
        ``structure`` when the file names none)."""
        rules, groups, lora = list(self.rules), list(self.groups), self.lora
        if lora is not None:
            if structure is not None:
                lora = lora.resolve(structure)
            if "lora" not in {g.name for g in groups}:
                rules.insert(0, (ADAPTER_PATTERN, "lora"))
                groups.insert(0, Group("lora", True))
        return Plan(
            tuple(rules), groups, name=f"rules({self.path!r})", adapters=lora, source=self.path
        )


def _fail(path: str, message: str) -> RulesFileError:
    return RulesFileError(f"rules file {path}: {message}")


def _number(path: str, where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, f"{where}: {key} must be a number, got {value!r}.")
    return float(value)


def _groups(path: str, raw: Any) -> tuple[list[tuple[str, str]], list[Group]]:
    if not isinstance(raw, list) or not raw:
        raise _fail(path, "needs at least one [[group]] table (name = ..., match = [...]).")
    rules, groups = [], []
    for i, g in enumerate(raw):
        where = f"[[group]] #{i + 1}"
        unknown = sorted(set(g) - _GROUP_KEYS)
        if unknown:
            raise _fail(
                path, f"{where} has unknown key(s) {unknown}; valid: {sorted(_GROUP_KEYS)}."
            )
        name = g.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(path, f'{where} needs name = "...".')
        where = f"[[group]] {name!r}"
        if name in {x.name for x in groups}:
            raise _fail(path, f"{where} is defined twice; give each group one table.")
        match = g.get("match")
        match = [match] if isinstance(match, str) else match
        if not match or not all(isinstance(m, str) for m in match):
            raise _fail(path, f'{where} needs match = ["regex", ...] (param path patterns).')
        trainable = g.get("trainable", True)
        if not isinstance(trainable, bool):
            raise _fail(path, f"{where}: trainable must be true or false, got {trainable!r}.")
        options = {
            k: _number(path, where, k, g[k])
            for k in ("lr_mult", "weight_decay", "wd_mult")
            if k in g
        }
        try:
            groups.append(Group(name, trainable, **options))
        except ValueError as e:
            raise _fail(path, f"{where}: {e}") from None
        rules += [(m, name) for m in match]
    try:
        tree_from_rules({}, rules)  # every regex compiles
    except ValueError as e:
        raise _fail(path, str(e)) from None
    return rules, groups


def _spec(path: str, i: int, value: Any) -> Any:
    if isinstance(value, str):
        return value  # "fsdp" / "replicated"; jaxtl.sharding checks it
    if not isinstance(value, list):
        raise _fail(path, f"[[shard]] #{i + 1}: spec must be a list or a string, got {value!r}.")
    out = []
    for entry in value:
        if entry == "":
            out.append(None)
        elif isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, list) and all(isinstance(a, str) for a in entry):
            out.append(tuple(entry))
        else:
            raise _fail(path, f"[[shard]] #{i + 1}: spec entry {entry!r} is not an axis name.")
    return tuple(out)


def read_rules_file(path: str | os.PathLike) -> RulesFile:
    """Parse and check a rules file (see the module docstring).

    Raises:
      FileNotFoundError: no such file.
      RulesFileError: a TOML syntax error (with its line and column), an unknown section or
        key, a bad value or regex; the message names the file and where.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rules file {path} does not exist (--rules FILE).")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise _fail(path, f"TOML syntax error: {e}") from None
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise _fail(path, f"unknown section(s) {unknown}; valid: [[group]], [lora], [[shard]].")
    rules, groups = _groups(path, raw.get("group"))
    lora = None
    if "lora" in raw:
        options = raw["lora"]
        bad = sorted(set(options) - _LORA_KEYS)
        if bad or "rank" not in options:
            raise _fail(
                path, f"[lora] takes {sorted(_LORA_KEYS)} (rank required), got {sorted(options)}."
            )
        try:
            targets = options.get("targets")
            lora = LoRA(
                options["rank"],
                options.get("alpha"),
                tuple(targets) if isinstance(targets, list) else targets,
                options.get("dropout", 0.0),
            )
        except ValueError as e:
            raise _fail(path, f"[lora]: {e}") from None
    sharding = []
    for i, rule in enumerate(raw.get("shard", [])):
        if set(rule) != {"match", "spec"} or not isinstance(rule["match"], str):
            raise _fail(path, f'[[shard]] #{i + 1} needs exactly match = "regex" and spec = [...].')
        sharding.append((rule["match"], _spec(path, i, rule["spec"])))
    return RulesFile(path, tuple(rules), tuple(groups), lora, tuple(sharding))


def check_used(plan: Plan, params: Any, path: str) -> None:
    """A file's group pattern that labels no param of ``params`` is an error naming it."""
    unused = [(p, g) for p, g in plan.unused_rules(params) if p != ADAPTER_PATTERN]
    if unused:
        listed = ", ".join(f"{p!r} (group {g!r})" for p, g in unused)
        raise _fail(
            path,
            f"pattern(s) {listed} label no param of this model: a typo, or shadowed by an "
            "earlier group's pattern (first match wins). Fix or remove them.",
        )
