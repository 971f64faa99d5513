"""The learning-rate schedule as data (``OptimConfig.learning_rate_input``): one compiled
program for every peak, warmup and length, whose values and updates are those of the schedule
with its numbers as program constants to the bit on CPU; and the values of optax's schedules,
the independent reference, to float32 rounding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny import small_vader

import jaxtl
from jaxtl.run import finetune
from jaxtl.transfer.optimizer import ScheduleInput, make_optimizer, set_schedule
from jaxtl.transfer.plan import Group, Plan
from jaxtl.transfer.schedules import SCHEDULES, LRSchedule, schedule_value
from jaxtl.transfer.trees import flatten
from jaxtl.weights.embedded import default_model_dir

# (peak, warmup, total): no warmup, a short and a long one, warmup over the whole run, one
# step, and lengths of the demo's and the digits preset's runs.
CASES = [(1e-3, 0, 33), (3e-3, 3, 33), (5e-5, 0, 90), (2e-5, 10, 198), (0.1, 7, 3000),
         (1e-3, 5, 5), (7e-4, 0, 1), (4e-2, 1, 2), (3e-3, 0, 3)]  # fmt: skip


def _optax(kind, peak, warmup, total):
    """The schedule from optax's own schedules (how jaxtl built it before it had its own)."""
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1))
    rest = max(total - warmup, 1)
    after = (
        optax.constant_schedule(peak)
        if kind == "constant"
        else optax.linear_schedule(peak, 0.0, rest)
    )
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedule_values_are_optaxs_and_data_gives_the_constants_values(kind):
    """Every step of each schedule (and steps past its end), the numbers as constants of a
    jitted program (LRSchedule called) against optax's schedule: equal to float32 rounding, at
    most two units in the last place of the peak (optax's own constant expressions round
    differently from one XLA program to the next), and to the bit for a scalar count (an
    optimizer step's). With the numbers as arguments of one program (schedule_value), equal
    to the constants' values to the bit, over a vector of counts and a scalar count, times a
    group's lr_mult."""
    counts = jnp.arange(max(total for _, _, total in CASES) + 3, dtype=jnp.int32)
    data = jax.jit(lambda *numbers: schedule_value(kind, *numbers))
    scalar = {m: jax.jit(lambda c, *n, m=m: -schedule_value(kind, c, *n) * m) for m in (1, 0.3)}
    for peak, warmup, total in CASES:
        schedule = LRSchedule(kind, peak, warmup, total)
        values = np.asarray(jax.jit(schedule)(counts))
        reference = np.asarray(jax.jit(_optax(kind, peak, warmup, total))(counts))
        np.testing.assert_allclose(values, reference, rtol=0, atol=2.4e-7 * peak)
        assert values.max() == np.float32(peak)
        mismatch = np.flatnonzero(np.asarray(data(counts, *schedule.numbers())) != values)
        assert mismatch.size == 0, (kind, peak, warmup, total, mismatch[:5])
        reference_schedule = _optax(kind, peak, warmup, total)
        optax_step = jax.jit(lambda c, s=reference_schedule: -s(c))
        for m, on_data in scalar.items():
            on_constants = jax.jit(lambda c, m=m, s=schedule: -s(c) * m)
            for c in range(min(total + 2, 300)):
                count = jnp.int32(c)
                value = on_constants(count)
                assert on_data(count, *schedule.numbers()) == value, (schedule, c)
                # Where a step's learning rate is the schedule's (lr_mult 1), it is the value
                # that optax's schedule gave it, to the bit: a run's numbers did not move.
                assert m != 1 or value == optax_step(count), (schedule, c)
    assert data._cache_size() == 1 and all(f._cache_size() == 1 for f in scalar.values())


def test_lr_schedule_is_the_configs_warmup_and_kind():
    config = jaxtl.TrainConfig(learning_rate=2e-3, warmup_ratio=0.1, schedule="cosine").optim
    assert config.lr_schedule(95) == LRSchedule("cosine", 2e-3, 9, 95)
    steps = dataclasses.replace(config, warmup_steps=200).lr_schedule(95)
    assert (steps.warmup, steps.total) == (95, 95)  # never longer than the run
    with pytest.raises(ValueError, match=r"schedule \(--schedule\) must be one of"):
        LRSchedule("step", 1e-3, 0, 10)
    with pytest.raises(ValueError, match=r"schedule_input=True.*LRSchedule, not 0.001"):
        make_optimizer(Plan(((".*", "all"),), [Group("all", True)]), 1e-3, schedule_input=True)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedule_input_updates_are_the_constant_schedules_to_the_bit(kind):
    """make_optimizer(schedule_input=True) with AdamW: the peak, warmup and total steps are
    data in each group's optimizer state, one compiled program serves two runs that differ in
    all three, and its params after every step are those of the constant schedule's optimizer
    to the bit, a group's lr_mult and its weight decay input included."""
    plan = Plan(
        ((r"head/.*", "head"), (r"body/.*", "body"), (".*", "frozen")),
        [Group("head", True), Group("body", True, lr_mult=0.3), Group("frozen", False)],
    )
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 32))
    params = {g: {"w": jax.random.normal(next(keys), (4, 3))} for g in ("head", "body", "other")}
    grads = [
        jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params) for _ in range(6)
    ]
    template = LRSchedule(kind, 1.0, 1, 10)  # its numbers are replaced below
    tx = make_optimizer(plan, template, schedule_input=True, weight_decay_input=True)

    def one_step(tx):  # one program per step, as in training
        def step(opt_state, params, grads):
            updates, opt_state = tx.update(grads, opt_state, params)
            return opt_state, optax.apply_updates(params, updates)

        return jax.jit(step)

    train = one_step(tx)
    start = jax.jit(lambda numbers: set_schedule(tx.init(params), numbers))
    for schedule in (LRSchedule(kind, 1e-2, 2, 5), LRSchedule(kind, 3e-3, 0, 6)):
        const = make_optimizer(plan, schedule)
        step = one_step(const)
        opt_state, mine = start(schedule.numbers()), params
        state, expected = const.init(params), params
        for i, g in enumerate(grads):
            opt_state, mine = train(opt_state, mine, g)
            state, expected = step(state, expected, g)
            for path, value in flatten(expected).items():
                got = np.asarray(flatten(mine)[path])
                assert np.array_equal(got, np.asarray(value)), (schedule, i, path)
        held = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_input) if _is_input(x)]
        assert len(held) == 2  # head and body, not the frozen group
        assert all(int(x.total) == schedule.total and int(x.warmup) == schedule.warmup
                   and float(x.peak) == np.float32(schedule.peak) for x in held)  # fmt: skip
    assert not np.array_equal(mine["body"]["w"], params["body"]["w"])
    assert np.array_equal(mine["other"]["w"], params["other"]["w"])
    assert train._cache_size() == 1 and start._cache_size() == 1


def _is_input(x):
    return isinstance(x, ScheduleInput)


def test_a_run_with_its_schedule_an_input_is_the_run_with_constants_bitwise():
    """A Trainer with learning_rate_input: one compiled train step for runs of other peaks and
    lengths (the same program text), and AdamW training the backbone under a cosine decay ends
    with the params of the run whose schedule is constants, to the bit, with layer-wise
    learning rates (lr_mult) on the groups. (A linear decay after a warmup: the sequential
    sweep's test in tests/test_sweep.py.)"""
    load = lambda: jaxtl.load(default_model_dir(), num_labels=2)  # noqa: E731
    data = small_vader(n_train=64, n_val=16, n_test=16)
    recipe = "layerwise_lr_decay(0.5)"
    config = jaxtl.TrainConfig(
        epochs=1, batch_size=16, progress=False, learning_rate=1e-3, schedule="cosine", seed=1
    )
    given = dataclasses.replace(
        config, optim=dataclasses.replace(config.optim, learning_rate_input=True)
    )
    model = load()
    texts = []
    for lr, steps in ((1e-3, 4), (3e-4, 40)):
        optim = dataclasses.replace(given.optim, learning_rate=lr)
        trainer = jaxtl.Trainer(
            model, jaxtl.make_plan(recipe, model.structure), dataclasses.replace(given, optim=optim)
        )
        state = trainer.init_state(steps)
        held = [x for x in jax.tree.leaves(state.opt_state, is_leaf=_is_input) if _is_input(x)]
        assert held and all(int(x.total) == steps for x in held)
        batch = {k: jnp.zeros((16, 8), jnp.int32) for k in ("input_ids", "attention_mask")}
        batch["label"] = jnp.zeros((16,), jnp.int32)
        train_step, _ = jaxtl.train.steps.compile_steps(state, trainer.mesh)
        texts.append(train_step.lower(state, batch).as_text())
    assert texts[0] == texts[1]
    plain = finetune(load(), recipe, data, config, verbose=False)
    mine = finetune(load(), recipe, data, given, verbose=False)
    moved = "bert/encoder/layer_0/output/dense/kernel"
    assert not np.allclose(flatten(mine.params)[moved], flatten(model.params)[moved])
    for path, value in flatten(plain.params).items():
        assert np.array_equal(np.asarray(flatten(mine.params)[path]), np.asarray(value)), path
    assert mine.test["loss"] == plain.test["loss"]


def test_an_arm_started_with_its_schedule_as_constants_resumes_so(tmp_path, capsys, monkeypatch):
    """An experiment started by a jaxtl from before the schedule was data saved optimizer state
    without the schedule's numbers; ``--resume`` reads the arm's ``run.json`` and continues it
    with the schedule as constants (its checkpoints' layout), ending where it would have."""
    import os
    import shutil

    from _tiny import make_tiny_bert, read_json, write_vader_csv

    from jaxtl import cli, experiment

    model = make_tiny_bert(str(tmp_path / "bert"))
    csv = write_vader_csv(tmp_path / "words.csv", 100)
    out = tmp_path / "out"
    base = ["finetune", "--model", model, "--data", csv, "--text-column", "word",
            "--label-column", "sentiment", "--recipe", "full", "--no-scratch", "--lr", "1e-3",
            "--batch-size", "16", "--eval-every", "2", "--max-steps", "4",
            "--out", str(out)]  # fmt: skip
    with monkeypatch.context() as old:  # the jaxtl that started the run
        old.setattr(experiment, "_schedule_as_data", lambda *_: False)
        assert cli.main(base) == 0
    run = out / "pretrained-full"
    assert read_json(run / "run.json")["config"]["learning_rate_input"] is False
    finished = read_json(run / "results.json")
    os.remove(run / "results.json")  # as if it had been stopped after step 4
    capsys.readouterr()
    assert cli.main([*base, "--resume-from", "2"]) == 0
    assert "Resumed from step 2" in capsys.readouterr().err
    assert read_json(run / "run.json")["config"]["learning_rate_input"] is False
    assert read_json(run / "results.json")["test"] == finished["test"]  # to the bit
    # A new arm, or a run started without --resume, keeps its schedule as data.
    shutil.rmtree(out)
    assert cli.main(base) == 0
    assert read_json(run / "run.json")["config"]["learning_rate_input"] is True
