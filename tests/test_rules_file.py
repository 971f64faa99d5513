"""`--rules FILE`: groups, LR and weight-decay multipliers, LoRA targets and sharding in one
TOML file, checked for coverage and unused patterns before anything compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import make_tiny_bert, read_json

import jaxtl
from jaxtl import cli
from jaxtl.transfer.rules import UnmatchedParamsError
from jaxtl.transfer.rules_file import RulesFileError, read_rules_file
from jaxtl.transfer.trees import flatten

GOOD = """
[[group]]
name = "head"
match = ["classifier(/.*)?"]

[[group]]
name = "top"
match = ['bert/encoder/layer_1/.*', "bert/pooler(/.*)?"]
lr_mult = 0.5
wd_mult = 2.0

[[group]]
name = "frozen"
match = [".*"]
trainable = false

[lora]
rank = 2
targets = ['bert/encoder/layer_0/attention/self/query']

[[shard]]
match = "bert/embeddings/word_embeddings/embedding"
spec = ["fsdp", ""]
"""


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("rules") / "bert"))


def write(tmp_path, text: str):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def test_a_rules_file_gives_groups_multipliers_adapters_and_sharding(tmp_path, bert):
    parsed = read_rules_file(write(tmp_path, GOOD))
    assert parsed.sharding == (("bert/embeddings/word_embeddings/embedding", ("fsdp", None)),)
    model = jaxtl.load(bert, num_labels=2)
    plan = jaxtl.make_plan(f"rules({str(tmp_path / 'rules.toml')!r})", model.structure)
    assert plan.adapters.rank == 2 and plan.groups["top"].lr_mult == 0.5
    adapted = jaxtl.lora.adapt(model, plan)
    labels = flatten(plan.labels(adapted.params))
    assert labels["bert/encoder/layer_0/attention/self/query/lora_a"] == "lora"
    assert labels["bert/encoder/layer_1/output/dense/kernel"] == "top"
    assert labels["bert/embeddings/word_embeddings/embedding"] == "frozen"
    assert "x2" in plan.table(adapted.params)  # the table shows the weight-decay multiplier


def test_lr_and_weight_decay_multipliers_reach_the_optimizer(tmp_path):
    """SGD (weight decay as L2 on the gradient), lr 0.1, decay 0.01: a group at lr_mult 0.5
    and wd_mult 2 steps by exactly -0.1 * 0.5 * (g + 0.02 * w)."""
    path = write(
        tmp_path,
        '[[group]]\nname = "a"\nmatch = ["a/.*"]\nlr_mult = 0.5\nwd_mult = 2.0\n'
        '[[group]]\nname = "b"\nmatch = [".*"]\n',
    )
    plan = read_rules_file(path).plan()
    w = {"a": {"w": jnp.full((2, 2), 3.0)}, "b": {"w": jnp.full((2, 2), 3.0)}}
    g = jax.tree.map(jnp.ones_like, w)
    tx = plan.optimizer(0.1, name="sgd", weight_decay=0.01, clip_norm=None)
    updates, _ = tx.update(g, tx.init(w), w)
    np.testing.assert_allclose(updates["a"]["w"], -0.1 * 0.5 * (1 + 0.02 * 3.0), rtol=1e-6)
    np.testing.assert_allclose(updates["b"]["w"], -0.1 * (1 + 0.01 * 3.0), rtol=1e-6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[group]\nname = "x"\n', r"TOML syntax error: .*line 1"),
        ('[[group]]\nname = "x"\nmatch = ["a"]\nlr = 2\n', r"unknown key\(s\) \['lr'\]"),
        ('[[group]]\nmatch = ["a"]\n', r'needs name = "..."'),
        ('[[group]]\nname = "x"\nmatch = ["(a"]\n', "not a valid regular expression"),
        ('[[group]]\nname = "x"\nmatch = [".*"]\nlr_mult = -1\n', "lr_mult must be finite"),
        ('[[group]]\nname = "x"\nmatch = [".*"]\n[lora]\nrank = 0\n', r"\[lora\]: .*rank"),
        ("[frozen]\nx = 1\n", r"unknown section\(s\) \['frozen'\]"),
        ('[[group]]\nname = "x"\nmatch = [".*"]\n[[shard]]\nmatch = "a"\n', r"\[\[shard\]\] #1"),
    ],
)
def test_a_bad_file_names_the_file_and_what_is_wrong(tmp_path, text, message):
    with pytest.raises(RulesFileError, match=message) as e:
        read_rules_file(write(tmp_path, text))
    assert str(tmp_path / "rules.toml") in str(e.value)


def test_coverage_and_unused_patterns_are_checked_before_training(tmp_path, bert):
    model = jaxtl.load(bert, num_labels=2)
    data = jaxtl.data.vader()
    uncovered = write(tmp_path, '[[group]]\nname = "head"\nmatch = ["classifier(/.*)?"]\n')
    with pytest.raises(UnmatchedParamsError, match="match no rule"):
        jaxtl.finetune(model, f"rules({str(uncovered)!r})", data, verbose=True)
    typo = write(
        tmp_path,
        '[[group]]\nname = "head"\nmatch = ["clasifier/.*"]\n'
        '[[group]]\nname = "rest"\nmatch = [".*"]\n',
    )
    with pytest.raises(RulesFileError, match=r"'clasifier/\.\*' \(group 'head'\) label no param"):
        jaxtl.finetune(model, f"rules({str(typo)!r})", data)


@pytest.mark.slow
def test_the_cli_trains_from_a_rules_file_and_the_run_reopens(tmp_path, bert, capsys):
    path = write(tmp_path, GOOD)
    out = tmp_path / "run"
    argv = ["finetune", "--model", bert, "--rules", str(path), "--no-scratch", "--max-steps", "2"]
    assert cli.main([*argv, "--batch-size", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Transfer plan rules(" in printed and "top" in printed and "lora_a|lora_b" in printed
    (run,) = [d for d in out.iterdir() if d.is_dir()]
    info = read_json(run / "run.json")
    assert info["config"]["sharding_rules"] == [
        ["bert/embeddings/word_embeddings/embedding", ["fsdp", None]]
    ]
    assert cli.main(["evaluate", str(run)]) == 0
    err = cli.main(["finetune", "--rules", str(path), "--recipe", "full"])
    assert err == 2 and "not both" in capsys.readouterr().err
