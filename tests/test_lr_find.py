"""The learning-rate range test (jaxtl lr-find): its suggestion falls where training works
(found independently by training heads at a grid of rates), it leaves the model as it was, and
bad options are refused before anything loads."""

from __future__ import annotations

import math
import os
import re

import jax
import numpy as np
import pytest
from _tiny import read_json

import jaxtl
from jaxtl import cli, lr_find, sweep
from jaxtl.data import sources

GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@pytest.fixture(scope="module")
def setup():
    path = jaxtl.default_model_dir()
    load = lambda seed: jaxtl.load(path, num_labels=2, drop_blocks=5, seed=seed)  # noqa: E731
    config = jaxtl.TrainConfig(batch_size=32, feature_cache="memory", epochs=1, progress=False)
    return load, sources.vader(), config


def test_the_suggestion_trains_as_well_as_the_best_rate_of_a_grid(setup):
    load, data, config = setup
    model = load(0)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(model.params)]
    found = lr_find.lr_find(model, "linear_probe", data, config, num_steps=100, verbose=False)
    # Nothing is written back: the model is the one loaded.
    after = jax.tree.leaves(model.params)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, after, strict=True))
    assert found.stopped in ("steps", "diverged") and found.suggestion is not None
    assert found.lrs[0] == pytest.approx(1e-7) and found.lrs[-1] <= 10.0
    # Where training works: one epoch of a linear probe at each rate of the grid (all at once).
    cells = sweep.sweep_heads(load, data, lrs=GRID, weight_decays=[0.01], seeds=[0],
                              config=config, verbose=False)  # fmt: skip
    accuracy = {c.learning_rate: c.validation["val_accuracy"] for c in cells}
    best = max(accuracy.values())
    good = {lr for lr, a in accuracy.items() if a >= best - 0.02}
    assert good != set(GRID), accuracy  # the grid tells rates apart
    nearest = min(GRID, key=lambda lr: abs(math.log(lr / found.suggestion)))
    assert nearest in good, (found.suggestion, accuracy)


def test_suggest_finds_the_steepest_fall_before_the_minimum():
    lrs = np.logspace(-6, 0, 61)
    x = np.log10(lrs)
    loss = 1 - 0.5 * (1 + np.tanh(2 * (x + 3))) / 2 + np.where(x > -1, (x + 1) ** 2, 0)
    assert lr_find.suggest(lrs, loss, skip=0.0) == pytest.approx(1e-3, rel=0.3)
    assert lr_find.suggest(lrs, np.linspace(1, 2, 61)) is None  # the loss never fell


def test_cli_writes_the_curve_and_prints_the_suggestion(tmp_path, capsys):
    out = str(tmp_path / "lf")
    assert cli.main(["lr-find", "--recipe", "linear_probe", "--feature-cache", "memory",
                     "--drop-blocks", "5", "--steps", "30", "--out", out]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    got = read_json(os.path.join(out, "lr_find.json"))
    assert f"suggested learning rate: {got['suggestion']:.2e}" in printed
    assert len(got["lrs"]) == len(got["losses"]) == len(got["smoothed"]) <= 30
    assert sorted(os.listdir(out)) == ["lr_find.json", "lr_find.png"]  # no checkpoint, no run


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--start-lr", "1", "--end-lr", "0.1"], "0 < start_lr < end_lr"),
        (["--start-lr", "0"], "0 < start_lr < end_lr"),
        (["--steps", "5"], "num_steps=5 (--steps)"),
        (["--diverge", "1"], "diverge=1 (--diverge) must be > 1"),
        (["--smoothing", "1"], "beta=1 (--smoothing)"),
    ],
)
def test_cli_bad_options_exit_2_before_loading(flags, message, tmp_path, capsys):
    assert cli.main(["lr-find", "--model", str(tmp_path / "absent"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "absent" not in err


@pytest.mark.parametrize("flags", [["--max-bad-steps", "3"], ["--shard-rule", "x=fsdp"]])
def test_cli_has_no_flags_the_test_would_ignore(flags, capsys):
    # One device, and it stops at the first non-finite loss: no sharding, no skipped steps.
    with pytest.raises(SystemExit) as e:
        cli.main(["lr-find", *flags])
    assert e.value.code == 2
    assert f"unrecognized arguments: {' '.join(flags)}" in capsys.readouterr().err


def test_the_curve_is_that_of_the_runs_precision(setup):
    # jaxtl lr-find --precision bf16 / --frozen-bf16 find the rate of a bf16 run: the losses are
    # computed in bf16 (they differ from float32's), and stay close to float32's.
    load, data, _ = setup

    def losses(**scale):
        run = jaxtl.TrainConfig(batch_size=32, progress=False, **scale)
        found = lr_find.lr_find(load(0), "linear_probe", data, run, num_steps=10,
                                end_lr=1e-2, verbose=False)  # fmt: skip
        return np.array(found.losses)

    exact = losses()
    for scale in ({"precision": "bf16"}, {"frozen_bf16": True}):
        got = losses(**scale)
        assert not np.array_equal(got, exact), scale
        np.testing.assert_allclose(got, exact, atol=0.02, err_msg=str(scale))


def test_a_staged_recipe_is_refused(setup):
    load, data, config = setup
    with pytest.raises(ValueError, match="is staged"):
        lr_find.lr_find(load(0), "lp_ft(1)", data, config, verbose=False)
    # What a cached run cannot take, as jaxtl finetune refuses it (before features are cached):
    for option, message in (({"precision": "bf16"}, "trains a tail model whose forward cannot"),
                            ({}, "lora(4) puts adapters in every block")):  # fmt: skip
        cached = jaxtl.TrainConfig(feature_cache="memory", **option)
        recipe = "lora(4)" if not option else "linear_probe"
        with pytest.raises(
            ValueError, match=r"^feature_cache \(--feature-cache\) .*" + re.escape(message)
        ):
            lr_find.lr_find(load(0), recipe, data, cached, verbose=False)
