"""Staged recipes on a real (tiny, transformers-built) BERT and real VADER text: gradual
unfreezing compiles once per stage and unfreezes from the top, a run stopped mid-stage resumes
bit for bit, LP-FT probes and then fine-tunes with a fresh optimizer and schedule, and the
optimizer state moves between stages as documented (jaxtl/transfer/stages.py)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny import fit, make_tiny_bert, small_vader

import jaxtl
from jaxtl.encoding import encode_splits
from jaxtl.transfer import stages, trees
from jaxtl.transfer.recipes import make_plan
from jaxtl.transfer.structure import Structure


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny") / "bert"))


@pytest.fixture(scope="module")
def arrays(tiny_dir):
    model = jaxtl.load(tiny_dir, num_labels=2)
    out, _ = encode_splits(model, small_vader(n_train=160, n_val=32, n_test=32))
    return out  # 10 steps per epoch at batch 16


def _trainer(tiny_dir, recipe, workdir=None, model=None, **cfg):
    model = model or jaxtl.load(tiny_dir, num_labels=2)
    config = jaxtl.TrainConfig(
        **{"batch_size": 16, "learning_rate": 1e-3, "log_every": 1, "epochs": 2, **cfg}
    )
    return jaxtl.Trainer(model, make_plan(recipe, model.structure), config, workdir)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _counting(model, seen: list):
    """``model`` whose forward records every training trace: a jitted step traces (and so
    compiles) once per program, so ``seen`` counts the train steps compiled."""
    forward = model.forward

    def counted(params, batch_stats, batch, **kwargs):
        if kwargs.get("train"):
            seen.append(1)
        return forward(params, batch_stats, batch, **kwargs)

    return dataclasses.replace(model, forward=counted)


def _changed(before, after):
    a, b = trees.flatten(before), trees.flatten(jax.device_get(after))
    return {p for p in a if not np.array_equal(a[p], b[p])}


def test_gradual_compiles_once_per_stage_and_unfreezes_from_the_top(tiny_dir, arrays):
    seen = []
    model = _counting(jaxtl.load(tiny_dir, num_labels=2), seen)
    before = jax.device_get(model.params)
    # 2 blocks: head (+ pooler) for 5 steps, then layer_1, layer_0, then the embeddings.
    trainer = _trainer(tiny_dir, "gradual(every=5, unit='steps')", model=model, restore_best=False)
    part = fit(trainer, arrays["train"], stop_at=4)
    changed = _changed(before, part.state.params)
    assert changed and all(p.startswith(("classifier", "bert/pooler")) for p in changed)
    assert len(seen) == 1
    # Stage 1 (steps 5..9) adds the top block, and only it.
    trainer = _trainer(tiny_dir, "gradual(every=5, unit='steps')", model=model, restore_best=False)
    part = fit(trainer, arrays["train"], stop_at=9)
    changed = _changed(before, part.state.params)
    assert any(p.startswith("bert/encoder/layer_1/") for p in changed)
    assert not any(p.startswith(("bert/encoder/layer_0/", "bert/embeddings")) for p in changed)

    seen.clear()
    trainer = _trainer(tiny_dir, "gradual(every=5, unit='steps')", model=model, restore_best=False)
    res = fit(trainer, arrays["train"])
    assert res.steps == 20
    assert len(seen) == 4  # one train-step compile per stage, never per step
    changed = _changed(before, res.state.params)
    for prefix in ("classifier", "bert/encoder/layer_1", "bert/encoder/layer_0", "bert/embed"):
        assert any(p.startswith(prefix) for p in changed), prefix
    # Adam's step count per group: the head trained all 20 steps, layer_1 from step 5 (its
    # state carried through later stages), layer_0 from 10, the embeddings from 15.
    assert trainer.stage == 3
    counts = _adam_counts(res.state.opt_state)
    assert counts == {"head": 20, "neck": 20, "block_1": 15, "block_0": 10, "stem": 5}


@pytest.mark.parametrize("stop_at", [7, 10])  # mid-stage; exactly at a stage start + eval
def test_a_staged_run_stopped_mid_stage_resumes_bitwise(tiny_dir, arrays, tmp_path, stop_at):
    recipe = "gradual(every=5, unit='steps', stages=3)"
    ref = fit(
        _trainer(tiny_dir, recipe, str(tmp_path / "a")), arrays["train"], arrays["validation"]
    )
    assert ref.steps == 20
    first = _trainer(tiny_dir, recipe, str(tmp_path / "b"))
    fit(first, arrays["train"], arrays["validation"], stop_at=stop_at)
    second = _trainer(tiny_dir, recipe, str(tmp_path / "b"))  # as a new process builds it
    resumed = fit(second, arrays["train"], arrays["validation"], resume=True)
    assert resumed.steps == 20
    for a, b in zip(_leaves(ref.state.params), _leaves(resumed.state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(ref.state.opt_state), _leaves(resumed.state.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [h["val_loss"] for h in ref.history] == [h["val_loss"] for h in resumed.history]


def test_lp_ft_probes_then_fine_tunes_with_a_fresh_schedule(tiny_dir, arrays, tmp_path):
    recipe = "lp_ft(1, probe_lr=0.01)"
    model = jaxtl.load(tiny_dir, num_labels=2)
    before = jax.device_get(model.params)
    work = tmp_path / "lpft"
    cfg = dict(warmup_steps=2, restore_best=False)
    trainer = _trainer(tiny_dir, recipe, str(work), model=model, **cfg)
    probe = fit(trainer, arrays["train"], arrays["validation"], stop_at=10)
    assert all(p.startswith("classifier") for p in _changed(before, probe.state.params))
    trainer = _trainer(tiny_dir, recipe, str(work), model=model, **cfg)
    res = fit(trainer, arrays["train"], arrays["validation"], resume=True)
    changed = _changed(before, res.state.params)
    assert any(p.startswith("bert/embeddings") for p in changed)
    with open(work / "metrics.jsonl") as f:
        lr = {r["step"]: r["lr"] for r in map(json.loads, f) if r["split"] == "train"}
    # (the LR that step's update used) Each stage warms up from 0 over 2 steps to its own
    # peak, then decays linearly toward 0 at its end.
    assert lr[1] == lr[11] == 0
    assert lr[2] == pytest.approx(0.005) and lr[12] == pytest.approx(5e-4)
    assert lr[3] == pytest.approx(0.01) and lr[13] == pytest.approx(1e-3)
    assert lr[10] == pytest.approx(0.01 / 8) and lr[20] == pytest.approx(1e-3 / 8)
    # The optimizer restarted at step 10: every group's Adam state counts the 10 steps since.
    assert _adam_counts(res.state.opt_state) == {"head": 10, "body": 10}


def test_carry_state_keeps_unchanged_groups_and_starts_new_ones_fresh():
    s = Structure(blocks=("b0", "b1"), head=("head",))
    plan = make_plan("gradual(every=1)", s)
    params = {k: {"w": jnp.ones((3, 3))} for k in ("stem", "b0", "b1", "head")}
    schedule = optax.linear_schedule(1.0, 0.0, 100)
    tx0 = plan.stages[0].plan.optimizer(schedule)
    tx1 = plan.stages[1].plan.optimizer(schedule)
    state = tx0.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        _, state = tx0.update(grads, state, params)
    moved, carried = stages.carry_state(
        state, tx1.init(params), restart=False, count=jnp.asarray(3)
    )
    assert carried == ["head"]
    part = next(x for x in jax.tree.leaves(moved, is_leaf=stages._is_part) if stages._is_part(x))
    old = next(x for x in jax.tree.leaves(state, is_leaf=stages._is_part) if stages._is_part(x))
    for a, b in zip(
        jax.tree.leaves(part.inner_states["head"]),
        jax.tree.leaves(old.inner_states["head"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # block_1 is new: zero moments, Adam's bias correction from 0, the LR schedule at step 3.
    adam, sched = _states(part.inner_states["block_1"])
    assert int(adam.count) == 0 and float(jnp.abs(adam.mu["b1"]["w"]).sum()) == 0
    assert int(sched.count) == 3
    restarted, carried = stages.carry_state(
        state, tx1.init(params), restart=True, count=jnp.asarray(3)
    )
    assert carried == []
    adam, sched = _states(
        next(
            x for x in jax.tree.leaves(restarted, is_leaf=stages._is_part) if stages._is_part(x)
        ).inner_states["head"]
    )
    assert int(adam.count) == 0 and int(sched.count) == 0


def _adam_counts(opt_state) -> dict:
    part = stages._partition(jax.device_get(opt_state))
    out = {}
    for name, inner in part.inner_states.items():
        is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
        adam = [x for x in jax.tree.leaves(inner, is_leaf=is_adam) if is_adam(x)]
        if adam:
            out[name] = int(adam[0].count)
    return out


def _states(inner):
    kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState)
    nodes = [x for x in jax.tree.leaves(inner, is_leaf=lambda x: isinstance(x, kinds))]
    adam = next(x for x in nodes if isinstance(x, optax.ScaleByAdamState))
    sched = next(x for x in nodes if isinstance(x, optax.ScaleByScheduleState))
    return adam, sched


# --- bad input: clear errors, before anything compiles ---------------------------------------


def test_more_stages_than_the_model_has_parts_is_refused():
    s = Structure(blocks=("b0", "b1"), head=("head",))
    with pytest.raises(ValueError, match=r"2 blocks.*at most 4 stages"):
        make_plan("gradual(every=1, stages=5)", s)
    with pytest.raises(ValueError, match=r"every=.*> 0"):
        make_plan("gradual(every=0)", s)
    with pytest.raises(ValueError, match=r"unit must be one of"):
        make_plan("lp_ft(1, unit='minutes')", s)


def test_stages_that_fall_on_one_step_are_refused_before_compiling(tiny_dir, arrays):
    seen = []
    model = _counting(jaxtl.load(tiny_dir, num_labels=2), seen)
    trainer = _trainer(tiny_dir, "gradual(every=0.01)", model=model)
    with pytest.raises(ValueError, match=r"both start at step 0 with 10 steps per epoch"):
        fit(trainer, arrays["train"])
    assert seen == []


def test_staged_knows_a_recipe_trains_in_stages_from_its_name():
    """``recipes.staged`` (the CLI's release_pretrained default reads it) agrees with the plans
    that every registered recipe builds."""
    from jaxtl.transfer.recipes import RECIPES, staged

    structure = Structure(stem=("embeddings",), blocks=("b0", "b1", "b2"), head=("head",))
    examples = {"last_n": "last_n(1)", "layerwise_lr_decay": "llrd(0.9)", "lora": "lora(8)",
                "gradual": "gradual(every=1)", "lp_ft": "lp_ft(1)"}  # fmt: skip
    for name in set(RECIPES) - {"rules"}:  # a rules file's plan: see test_rules_file.py
        spec = examples.get(name, name)
        assert staged(spec) is bool(make_plan(spec, structure).stages), spec
    assert staged("probe") is False and staged("lp_ft(2, probe_lr=0.01)") is True
