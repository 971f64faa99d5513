"""Transfer plans on a small real Flax model: labels, optimizer state, updates, table, parsing.

The model is our own (embed stem, three Dense blocks, pooler neck, classifier head) so these
tests do not depend on any model family.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl.train import TrainConfig
from jaxtl.transfer.plan import Group, Plan
from jaxtl.transfer.recipes import (
    RECIPES,
    bitfit,
    full,
    last_n,
    layerwise_lr_decay,
    linear_probe,
    make_plan,
)
from jaxtl.transfer.rules import UnmatchedParamsError
from jaxtl.transfer.structure import Structure
from jaxtl.transfer.trees import count_params, flatten, tree_bytes


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = nn.tanh(nn.Dense(8, name=f"layer_{i}")(x))
        return x


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(32, 8, name="embed")(ids).mean(axis=1)
        x = nn.LayerNorm(name="embed_ln")(x)
        x = Encoder(name="enc")(x)
        x = nn.tanh(nn.Dense(8, name="pooler")(x))
        return nn.Dense(3, name="classifier")(x)


STRUCTURE = Structure(
    stem=("embed", "embed_ln"),
    blocks=("enc/layer_0", "enc/layer_1", "enc/layer_2"),
    neck=("pooler",),
    head=("classifier",),
)
IDS = jax.random.randint(jax.random.key(1), (16, 5), 0, 32)
LABELS = jax.random.randint(jax.random.key(2), (16,), 0, 3)


@pytest.fixture(scope="module")
def params():
    p = Tiny().init(jax.random.key(0), IDS)["params"]
    # Non-zero biases and LayerNorm params, so "unchanged" and "decayed" are both observable.
    return jax.tree.map(lambda x: x + 0.25 if x.ndim == 1 else x, p)


def loss_fn(params):
    logits = Tiny().apply({"params": params}, IDS)
    return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _by_group(plan, tree, params):
    """{group: {path: leaf}} for `tree`, grouped by the plan's labels of `params`."""
    labels = flatten(plan.labels(params))
    out = {g: {} for g in plan.groups}
    for path, leaf in flatten(tree).items():
        out[labels[path]][path] = leaf
    return out


def _trainable_leaves(plan, params):
    mask = flatten(plan.trainable_mask(params))
    return [x for path, x in flatten(params).items() if mask[path]]


# ----------------------------------------------------------------------------- recipes


def test_recipe_labels(params):
    labels = flatten(last_n(STRUCTURE, 1).labels(params))
    assert labels["classifier/kernel"] == "head"
    assert labels["pooler/bias"] == "neck"
    assert labels["enc/layer_2/kernel"] == "blocks"
    assert labels["enc/layer_1/kernel"] == labels["embed/embedding"] == "frozen"

    probe = flatten(linear_probe(STRUCTURE).labels(params))
    assert {p for p, g in probe.items() if g == "head"} == {"classifier/kernel", "classifier/bias"}

    # n=0 is a linear probe that also trains the neck; n=len(blocks) still freezes the stem.
    zero = flatten(last_n(STRUCTURE, 0).trainable_mask(params))
    assert {p for p, t in zero.items() if t} == {
        "classifier/kernel",
        "classifier/bias",
        "pooler/kernel",
        "pooler/bias",
    }
    every = flatten(last_n(STRUCTURE, 3).trainable_mask(params))
    assert {p for p, t in every.items() if not t} == {
        "embed/embedding",
        "embed_ln/scale",
        "embed_ln/bias",
    }
    assert all(flatten(full(STRUCTURE).trainable_mask(params)).values())

    bf = flatten(bitfit(STRUCTURE).labels(params))
    assert bf["enc/layer_0/bias"] == bf["embed_ln/bias"] == "bias"
    assert bf["enc/layer_0/kernel"] == bf["embed_ln/scale"] == "frozen"


def test_last_n_rejects_bad_n():
    for bad in (4, -1, 1.0, True, "2"):
        with pytest.raises(ValueError, match=r"0\.\.3"):
            last_n(STRUCTURE, bad)


def test_layerwise_lr_decay_multipliers(params):
    plan = layerwise_lr_decay(STRUCTURE, 0.5)
    mults = {name: g.lr_mult for name, g in plan.groups.items()}
    assert mults == {
        "head": 1.0,
        "neck": 1.0,
        "block_2": 0.5,
        "block_1": 0.25,
        "block_0": 0.125,
        "stem": 0.0625,
    }
    labels = flatten(plan.labels(params))
    assert labels["enc/layer_0/kernel"] == "block_0" and labels["embed/embedding"] == "stem"
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        layerwise_lr_decay(STRUCTURE, 1.5)


def test_plan_validates_rules_and_groups(params):
    with pytest.raises(ValueError, match="'missing'"):
        Plan(((".*", "missing"),), [Group("head", True)])
    with pytest.raises(ValueError, match="regular expression"):
        Plan((("(", "head"),), [Group("head", True)])
    with pytest.raises(ValueError, match="lr_mult"):
        Group("g", True, lr_mult=-1.0)
    no_catch_all = Plan((("classifier/.*", "head"),), [Group("head", True)])
    with pytest.raises(UnmatchedParamsError, match="embed/embedding"):
        no_catch_all.labels(params)
    with pytest.raises(UnmatchedParamsError):  # also at optax init, before any compile
        no_catch_all.optimizer(1e-3).init(params)


# ----------------------------------------------------------------------------- optimizer state


def _check_adam_state_bytes(plan, params, tx, counts_per_group):
    """Adam state = 2 x trainable bytes + one int32 count per trainable group (per counter)."""
    trainable = _trainable_leaves(plan, params)
    n_groups = sum(g.trainable for g in plan.groups.values())
    for state in (jax.eval_shape(tx.init, params), tx.init(params)):
        leaves = jax.tree.leaves(state)
        scalars = [x for x in leaves if x.shape == ()]
        arrays = [x for x in leaves if x.shape != ()]
        assert all(x.dtype == jnp.int32 for x in scalars)
        assert len(scalars) == counts_per_group * n_groups
        # Moments: exactly mu and nu for each trainable leaf, nothing for frozen ones.
        assert sorted(x.shape for x in arrays) == sorted(2 * [x.shape for x in trainable])
        assert tree_bytes(state) == 2 * tree_bytes(trainable) + tree_bytes(scalars)


@pytest.mark.parametrize("spec", ["linear_probe", "last_n(1)", "full", "bitfit"])
def test_adam_state_is_two_x_trainable(params, spec):
    plan = make_plan(spec, STRUCTURE)
    _check_adam_state_bytes(plan, params, plan.optimizer(1e-3), counts_per_group=1)
    # A schedule adds one step count per group (optax.scale_by_schedule), nothing else.
    schedule = optax.linear_schedule(1e-3, 0.0, 100)
    _check_adam_state_bytes(plan, params, plan.optimizer(schedule), counts_per_group=2)


# ----------------------------------------------------------------------------- updates


def _train(tx, params, steps, grad_fn=None, jit=True):
    """`steps` optimizer steps; jit=False runs the optimizer and apply_updates op by op."""
    grad_fn = jax.jit(grad_fn or jax.grad(loss_fn))

    def step(p, s):
        updates, s = tx.update(grad_fn(p), s, p)
        return optax.apply_updates(p, updates), s

    step = jax.jit(step) if jit else step
    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


@pytest.mark.parametrize(
    "spec, jit",
    [("linear_probe", True), ("last_n(1)", True), ("bitfit", True), ("last_n(1)", False)],
)
def test_frozen_bitwise_unchanged_trainable_changed(params, spec, jit):
    plan = make_plan(spec, STRUCTURE)
    # -0.0 is where optax.set_to_zero would flip bits: p + (+0.0) turns -0.0 into +0.0. (Under
    # jit XLA folds the add away, hence also a run without jit.)
    params = dict(params, embed={"embedding": params["embed"]["embedding"].at[0, 0].set(-0.0)})
    new = _train(plan.optimizer(1e-2, weight_decay=0.1), params, steps=4 if jit else 2, jit=jit)
    mask = flatten(plan.trainable_mask(params))
    old_flat, new_flat = flatten(params), flatten(new)
    assert not all(mask.values()) and any(mask.values())
    for path, trainable in mask.items():
        if trainable:
            assert not np.array_equal(old_flat[path], new_flat[path]), path
        else:
            assert _same_bits(old_flat[path], new_flat[path]), path


def test_weight_decay_only_on_trainable_matrices(params):
    plan = last_n(STRUCTURE, 1)
    lr, wd, steps = 0.1, 0.5, 3
    tx = plan.optimizer(lr, weight_decay=wd)
    zero_grads = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    new = flatten(_train(tx, params, steps, grad_fn=zero_grads))
    mask = flatten(plan.trainable_mask(params))
    for path, old in flatten(params).items():
        if mask[path] and old.ndim >= 2:
            # Zero grads give a zero Adam direction; AdamW still pulls by lr * wd * p per step.
            np.testing.assert_allclose(new[path], old * (1 - lr * wd) ** steps, rtol=1e-6)
            assert not np.array_equal(new[path], old)
        else:  # frozen leaves, and trainable biases / norm params: never decayed
            assert _same_bits(old, new[path]), path

    # A group can override the decay; weight_decay=0.0 leaves its kernels alone.
    groups = dict(plan.groups, head=Group("head", True, weight_decay=0.0))
    custom = Plan(plan.rules, groups, name="no-decay head")
    new = flatten(_train(custom.optimizer(lr, weight_decay=wd), params, steps, zero_grads))
    assert _same_bits(params["classifier"]["kernel"], new["classifier/kernel"])
    assert not np.array_equal(params["pooler"]["kernel"], new["pooler/kernel"])


def _adam_first_step(grad, lr, eps):
    # After one step with bias correction: m_hat = g, v_hat = g^2.
    g = np.asarray(grad, np.float64)
    return -lr * g / (np.sqrt(g * g) + eps)


def test_lr_mult_scales_the_step(params):
    rules = (("classifier(/.*)?", "fast"), ("enc/layer_2(/.*)?", "slow"), (".*", "frozen"))
    groups = [Group("fast", True), Group("slow", True, lr_mult=0.5), Group("frozen", False)]
    plan = Plan(rules, groups, name="two speeds")
    reference = Plan(rules, [groups[0], Group("slow", True), groups[2]])
    lr, eps = 1e-2, 1e-8
    grads = jax.grad(loss_fn)(params)

    def first_updates(p):
        tx = p.optimizer(lr, weight_decay=0.0, clip_norm=None, eps=eps)
        return _by_group(p, jax.jit(tx.update)(grads, tx.init(params), params)[0], params)

    updates, ref = first_updates(plan), first_updates(reference)
    flat_grads = flatten(grads)
    for group, mult in (("fast", 1.0), ("slow", 0.5)):
        assert updates[group]
        for path, u in updates[group].items():
            expected = _adam_first_step(flat_grads[path], lr * mult, eps)
            np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-12)
    for path, u in updates["slow"].items():
        # Halving the LR is exact in binary floating point, so the step is exactly half.
        np.testing.assert_array_equal(u, 0.5 * ref["slow"][path])
    assert all(not np.any(u) for u in updates["frozen"].values())


def test_clip_norm_sees_only_trainable_grads(params):
    plan = last_n(STRUCTURE, 1)
    grads = jax.grad(loss_fn)(params)
    mask = plan.trainable_mask(params)
    trainable_norm = float(
        optax.tree.norm([g for g, m in zip(*map(jax.tree.leaves, (grads, mask)), strict=True) if m])
    )
    clip = 0.25 * trainable_norm
    # A large eps makes Adam's first step proportional to the gradient, so clipping shows.
    lr, eps = 1e-2, 10.0
    tx = plan.optimizer(lr, weight_decay=0.0, clip_norm=clip, eps=eps)
    huge = jax.tree.map(lambda g, m: g if m else 1e3 + 1e6 * g, grads, mask)
    zeroed = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)

    update = jax.jit(tx.update)
    updates_huge = flatten(update(huge, tx.init(params), params)[0])
    updates_zero = flatten(update(zeroed, tx.init(params), params)[0])
    flat_grads, flat_mask = flatten(grads), flatten(mask)
    for path, trainable in flat_mask.items():
        if not trainable:
            assert not np.any(updates_huge[path])
            continue
        np.testing.assert_array_equal(updates_huge[path], updates_zero[path])
        clipped = np.asarray(flat_grads[path], np.float64) * clip / trainable_norm
        np.testing.assert_allclose(
            updates_huge[path], _adam_first_step(clipped, lr, eps), rtol=1e-5
        )


def test_a_group_outside_the_clipping_is_neither_counted_nor_scaled():
    """``Group(clip=False)`` (DANN's domain classifier): the model's gradients clip by their own
    norm, the group's pass through unscaled, and a huge one does not shrink the model's step."""
    plan = Plan(
        (("model/.*", "model"), ("aux/.*", "aux")),
        [Group("model", True), Group("aux", True, clip=False)],
    )
    params = {"model": {"w": jnp.ones((2, 2))}, "aux": {"w": jnp.ones((2, 2))}}
    grads = {"model": {"w": jnp.full((2, 2), 3.0)}, "aux": {"w": jnp.full((2, 2), 1e4)}}
    tx = plan.optimizer(1.0, name="sgd", weight_decay=0.0, clip_norm=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["model"]["w"], -np.full((2, 2), 0.5), rtol=1e-6)
    np.testing.assert_array_equal(updates["aux"]["w"], -grads["aux"]["w"])
    # Every group clipped (the default): the huge gradient dominates the shared norm.
    shared = Plan(plan.rules, [Group("model", True), Group("aux", True)])
    tx = shared.optimizer(1.0, name="sgd", weight_decay=0.0, clip_norm=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["model"]["w"]).max()) < 1e-3


# ----------------------------------------------------------------------------- summary and table


def test_summary_and_table(params):
    plan = last_n(STRUCTURE, 1)
    tx = plan.optimizer(1e-3)
    rows = plan.summary(params, tx)
    assert [r.group for r in rows] == ["head", "neck", "blocks", "frozen"]
    assert sum(r.num_params for r in rows) == count_params(params)
    assert sum(r.param_bytes for r in rows) == tree_bytes(params)
    state = jax.eval_shape(tx.init, params)
    assert sum(r.opt_state_bytes for r in rows) == tree_bytes(state)
    for r in rows:
        # Measured per group: mu + nu + an int32 count when trainable, nothing when frozen.
        assert r.opt_state_bytes == (2 * r.param_bytes + 4 if r.trainable else 0)
    blocks = next(r for r in rows if r.group == "blocks")
    assert blocks.num_params == count_params(params["enc"]["layer_2"])
    assert blocks.rules == ("enc/layer_2(/.*)?",)

    table = plan.table(params, tx)
    assert "last_n(1)" in table
    for r in rows:
        assert r.group in table and f"{r.num_params:,}" in table
    trainable = sum(r.num_params for r in rows if r.trainable)
    frozen = count_params(params) - trainable
    assert f"{trainable:,} trainable + {frozen:,} frozen = {count_params(params):,} params" in table
    assert "note" not in table
    assert plan.table(params) == table  # optimizer=None measures the plan's own optimizer


def test_table_notes_unused_rules_and_unattributed_state(params):
    structure = Structure(blocks=STRUCTURE.blocks, head=("classifier",), neck=("no_such_pooler",))
    table = last_n(structure, 1).table(params)
    assert "note: rule 'no_such_pooler(/.*)?' -> neck labels no param" in table

    plain = optax.adamw(1e-3)  # no optax.partition: bytes cannot be split by group
    rows = full(STRUCTURE).summary(params, plain)
    assert all(r.opt_state_bytes is None for r in rows)
    table = full(STRUCTURE).table(params, plain)
    assert "belong to no group" in table


def test_rules_spanning_several_prefixes_list_each_rule(params):
    table = last_n(STRUCTURE, 3).table(params)
    for block in STRUCTURE.blocks:
        assert f"{block}(/.*)?" in table


# ----------------------------------------------------------------------------- make_plan


@pytest.mark.parametrize(
    "spec, name",
    [
        ("full", "full"),
        ("linear_probe", "linear_probe"),
        ("probe", "linear_probe"),
        ("last_n(2)", "last_n(2)"),
        (" last_n( 2 ) ", "last_n(2)"),
        ("last_n(n=2)", "last_n(2)"),
        ("last_n:2", "last_n(2)"),
        ("last2", "last_n(2)"),
        ("last_n(0)", "last_n(0)"),
        ("bitfit", "bitfit"),
        ("layerwise_lr_decay(0.5)", "layerwise_lr_decay(0.5)"),
        ("llrd:0.65", "layerwise_lr_decay(0.65)"),
    ],
)
def test_make_plan_parses(spec, name):
    assert make_plan(spec, STRUCTURE).name == name


def test_make_plan_accepts_plans_and_callables():
    plan = linear_probe(STRUCTURE)
    assert make_plan(plan, STRUCTURE) is plan
    assert make_plan(lambda s: last_n(s, 1), STRUCTURE).name == "last_n(1)"
    assert make_plan(full, STRUCTURE).name == "full"
    with pytest.raises(TypeError, match="expected a Plan"):
        make_plan(lambda s: None, STRUCTURE)


def test_make_plan_unknown_name_lists_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown transfer recipe 'lats_n' in recipe \(--recipe\)"
    ) as info:
        make_plan("lats_n(2)", STRUCTURE)
    for name in RECIPES:
        assert name in str(info.value)
    assert "last_n(n)" in str(info.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("last_n(4)", r"0\.\.3"),
        ("last_n(-1)", r"0\.\.3"),
        ("last_n(1.5)", r"0\.\.3"),
        ("last_n(two)", "literals"),
        ("last_n", "missing a required argument: 'n'"),
        ("last_n(1, 2)", "too many"),
        ("last_n(m=1)", "argument"),
        ("last_n(", "cannot parse"),
        ("last_n(2)(3)", "cannot parse"),
        ("", "cannot parse"),
    ],
)
def test_make_plan_bad_arguments(spec, message):
    with pytest.raises(ValueError, match=message):
        make_plan(spec, STRUCTURE)


@pytest.mark.parametrize("spec", ["full", "probe", "last2", "bitfit", "llrd(0.65)", "llrd(1e-05)"])
def test_plan_names_round_trip(params, spec):
    # Runs store plan.name and rebuild the plan from it (jaxtl.run), so names must parse back.
    plan = make_plan(spec, STRUCTURE)
    again = make_plan(plan.name, STRUCTURE)
    assert again == plan
    assert again.labels(params) == plan.labels(params)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_norm": -1.0}, r"clip_norm \(--clip-norm\) must be > 0, or None"),
        ({"clip_norm": 0.0}, r"clip_norm \(--clip-norm\) must be > 0, or None"),
        ({"weight_decay": -0.1}, r"weight_decay \(--weight-decay\) must be >= 0"),
    ],
)
def test_values_that_would_train_wrongly_are_refused_by_every_way_in(kwargs, message):
    """A negative clipping norm flips the gradient, 0 zeroes every update, a negative decay
    grows the weights: refused by a plan's optimizer as by the run config."""
    with pytest.raises(ValueError, match=message):
        make_plan("full", STRUCTURE).optimizer(1e-3, **kwargs)
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)
