"""Unit tests of the rule language: paths, first-match-wins, full matching, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from jaxtl.transfer.rules import (
    REQUIRED,
    InvalidRuleError,
    UnmatchedParamsError,
    match,
    matcher,
    prefix_pattern,
    rule_usage,
    tree_from_rules,
    unused_rules,
)
from jaxtl.transfer.trees import count_params, flatten, path_str, tree_bytes


def _params():
    return {
        "embed": {"embedding": np.zeros((10, 4), np.float32)},
        "enc": {
            f"layer_{i}": {"kernel": np.zeros((4, 4), np.float32), "bias": np.zeros(4, np.float32)}
            for i in (0, 1, 10)
        },
        "classifier": {"kernel": np.zeros((4, 2), np.float32), "bias": np.zeros(2, np.float32)},
    }


def test_path_str_joins_every_key_kind():
    keypath = (DictKey("a"), GetAttrKey("b"), SequenceKey(3), FlattenedIndexKey(7))
    assert path_str(keypath) == "a/b/3/7"
    assert path_str(()) == ""


def test_flatten_is_in_tree_order_with_slash_paths():
    tree = {"b": [np.zeros(1), np.zeros(2)], "a": {"k": np.zeros(3)}}
    flat = flatten(tree)
    assert list(flat) == ["a/k", "b/0", "b/1"]
    assert [x.shape for x in flat.values()] == [x.shape for x in jax.tree.leaves(tree)]


def test_flatten_frozendict_like_dict():
    assert list(flatten(FrozenDict({"a": {"b": jnp.zeros(2)}}))) == ["a/b"]


def test_flatten_rejects_colliding_paths():
    with pytest.raises(ValueError, match="a/b"):
        flatten({"a/b": 1, "a": {"b": 2}})


def test_first_match_wins():
    rules = [(".*/bias", "bias"), ("enc/.*", "enc"), (".*", "rest")]
    labels = tree_from_rules(_params(), rules)
    assert labels["enc"]["layer_0"]["bias"] == "bias"  # both of the first two match: first wins
    assert labels["enc"]["layer_0"]["kernel"] == "enc"
    assert labels["classifier"]["kernel"] == "rest"
    reordered = tree_from_rules(_params(), [rules[1], rules[0], rules[2]])
    assert reordered["enc"]["layer_0"]["bias"] == "enc"


def test_fullmatch_not_search():
    # "layer_1" occurs inside the path but must match the whole of it.
    assert match([("layer_1", 1)], "enc/layer_1/kernel", default=0) == 0
    assert match([("enc/layer_1", 1)], "enc/layer_1/kernel", default=0) == 0
    assert match([("enc/layer_1/kernel", 1)], "enc/layer_1/kernel", default=0) == 1
    # A partial match at the start is not enough either (re.match would accept it).
    assert match([("enc", 1)], "enc/layer_1/kernel", default=0) == 0


def test_prefix_pattern_matches_subtree_only():
    pattern = prefix_pattern("enc/layer_1")
    assert pattern == re.escape("enc/layer_1") + "(/.*)?"
    assert re.fullmatch(pattern, "enc/layer_1")
    assert re.fullmatch(pattern, "enc/layer_1/kernel")
    assert not re.fullmatch(pattern, "enc/layer_10/kernel")
    assert not re.fullmatch(pattern, "xenc/layer_1/kernel")
    # Regex metacharacters in names are literal.
    assert not re.fullmatch(prefix_pattern("a.b"), "axb/c")
    assert prefix_pattern("/enc/") == prefix_pattern("enc")
    with pytest.raises(ValueError, match="non-empty"):
        prefix_pattern("")

    labels = tree_from_rules(_params(), [(pattern, True)], default=False)
    assert labels["enc"]["layer_1"] == {"bias": True, "kernel": True}
    assert labels["enc"]["layer_10"] == {"bias": False, "kernel": False}


def test_unmatched_raises_with_paths_rules_and_fix():
    rules = [(prefix_pattern("enc"), "enc"), (".*/bias", "bias")]
    with pytest.raises(UnmatchedParamsError) as info:
        tree_from_rules(_params(), rules)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.paths == ("classifier/kernel", "embed/embedding")
    msg = str(err)
    assert "classifier/kernel" in msg and "embed/embedding" in msg
    assert "classifier/bias" not in msg  # matched by ".*/bias"
    assert "'.*/bias'" in msg and "enc(/.*)?" in msg  # the rules tried
    assert '(".*", <value>)' in msg and "default=" in msg  # how to fix


def test_unmatched_lists_at_most_ten_paths():
    tree = {f"p{i:02d}": np.zeros(1) for i in range(25)}
    with pytest.raises(UnmatchedParamsError) as info:
        tree_from_rules(tree, [("nothing", 1)])
    assert len(info.value.paths) == 25
    msg = str(info.value)
    assert "p09" in msg and "p10" not in msg and "and 15 more" in msg


def test_match_unmatched_raises():
    with pytest.raises(UnmatchedParamsError, match="head/kernel"):
        match([("enc/.*", 1)], "head/kernel")


def test_default_fills_unmatched():
    labels = tree_from_rules(_params(), [("classifier/.*", "head")], default="frozen")
    assert labels["classifier"] == {"bias": "head", "kernel": "head"}
    assert labels["embed"]["embedding"] == "frozen"
    # None is a legitimate declared default, distinct from "no default".
    assert match([], "x", default=None) is None
    assert repr(REQUIRED) == "REQUIRED"


def test_result_has_input_structure_and_keeps_tuple_values():
    # Sharding rules map to PartitionSpec-like tuples: they must land as leaves, whole.
    tree = {"w": jnp.zeros((2, 3)), "b": [jnp.zeros(3)]}
    out = tree_from_rules(tree, [("w", ("data", None)), (".*", ())])
    assert out == {"w": ("data", None), "b": [()]}
    abstract = jax.eval_shape(lambda: tree)
    assert tree_from_rules(abstract, {".*": 1}) == {"w": 1, "b": [1]}  # Mapping rules too


def test_bad_regex_names_the_pattern():
    with pytest.raises(InvalidRuleError, match=r"'enc/\(unclosed'") as info:
        tree_from_rules(_params(), [("enc/(unclosed", 1), (".*", 0)])
    assert "not a valid regular expression" in str(info.value)
    assert isinstance(info.value, ValueError)
    # Checked before any leaf is looked at.
    with pytest.raises(InvalidRuleError):
        tree_from_rules({}, [("[", 1)])
    with pytest.raises(InvalidRuleError):
        match([("*", 1)], "a")
    # Options that name params without values (jaxtl.load's allow_missing) share the dialect
    # and its error, which names the option.
    with pytest.raises(InvalidRuleError, match=r"allow_missing pattern 'bert/\(' .*fullmatch"):
        matcher(["bert/("], "allow_missing")
    assert matcher("enc/.*")("enc/kernel") and not matcher("enc")("enc/kernel")


def test_malformed_rules_are_explained():
    with pytest.raises(InvalidRuleError, match="wrapped in a list"):
        tree_from_rules(_params(), ("enc/.*", 1))  # a single pair, not a list of pairs
    with pytest.raises(InvalidRuleError, match="pair"):
        tree_from_rules(_params(), [("a", 1, 2)])
    with pytest.raises(InvalidRuleError, match="string"):
        tree_from_rules(_params(), ".*")


def test_unused_rules_are_reported_not_raised():
    rules = [
        (prefix_pattern("classifier"), "head"),
        (prefix_pattern("pooler"), "neck"),  # matches nothing in this tree
        ("classifier/kernel", "never"),  # shadowed by the first rule
        (".*", "rest"),
    ]
    assert unused_rules(_params(), rules) == [
        ("pooler(/.*)?", "neck"),
        ("classifier/kernel", "never"),
    ]
    usage = rule_usage(_params(), rules)
    assert usage[0] == ["classifier/bias", "classifier/kernel"]
    assert sum(len(u) for u in usage) == len(flatten(_params()))


def test_count_params_and_bytes():
    tree = {
        "w": np.zeros((3, 4), np.float32),
        "h": jnp.zeros((5,), jnp.bfloat16),
        "s": jax.ShapeDtypeStruct((2, 2), jnp.float16),
        "count": jnp.int32(0),
    }
    assert count_params(tree) == 12 + 5 + 4 + 1
    assert tree_bytes(tree) == 12 * 4 + 5 * 2 + 4 * 2 + 4
    assert count_params({}) == 0 and tree_bytes({}) == 0
