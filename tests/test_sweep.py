"""Sweeps (jaxtl.sweep): K heads trained at once on a frozen backbone equal K single runs of
``jaxtl.finetune`` (the real linear_probe + feature cache path), and bad grids or recipes are
refused with the argument, the flag and what to do.

The model is the real embedded MiniLM-L6 cut to one block (``drop_blocks=5``), on the first
examples of the real VADER splits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _tiny import small_vader

import jaxtl
from jaxtl import sweep
from jaxtl.data import sources
from jaxtl.run import finetune
from jaxtl.train.config import EarlyStopping
from jaxtl.train.faults import NonFiniteStepsError
from jaxtl.transfer.trees import flatten
from jaxtl.weights.embedded import default_model_dir


def _loader(task: str = "classification"):
    path = default_model_dir()
    return lambda seed: jaxtl.load(path, task=task, num_labels=2, drop_blocks=5, seed=seed)


def _single(load, data, config, cell, recipe="linear_probe"):
    """The cell's run as a user starts it: its own model (head drawn from its seed), config."""
    config = dataclasses.replace(
        config,
        seed=cell.seed,
        optim=dataclasses.replace(
            config.optim, learning_rate=cell.learning_rate, weight_decay=cell.weight_decay
        ),
        data=dataclasses.replace(config.data, feature_cache="memory"),
    )
    return finetune(load(cell.seed), recipe, data, config, verbose=False)


def _assert_same(cell, run, head="classifier"):
    mine, theirs = flatten(cell.params), flatten({head: run.params[head]})
    assert mine.keys() == theirs.keys()
    for path in mine:
        np.testing.assert_allclose(
            np.asarray(mine[path]), np.asarray(theirs[path]), rtol=1e-5, atol=1e-6, err_msg=path
        )
    assert (cell.steps, cell.stopped_early) == (run.steps, run.stopped_early)
    assert cell.validation["step"] == run.best["step"]
    for metric in ("val_loss", "val_accuracy"):
        if metric in run.best:
            assert cell.validation[metric] == pytest.approx(run.best[metric], rel=1e-5)
    assert cell.test["examples"] == run.test["examples"]
    assert cell.test["loss"] == pytest.approx(run.test["loss"], rel=1e-5)
    if "accuracy" in run.test:
        assert cell.test["accuracy"] == run.test["accuracy"]


def test_vmapped_heads_equal_single_linear_probe_runs(capsys):
    load = _loader()
    data = small_vader(n_train=96, n_val=32, n_test=48)
    # Warmup + linear decay, clipping, evaluations every 2 steps with restore-best and early
    # stopping: every part of a run the heads must reproduce.
    config = jaxtl.TrainConfig(
        epochs=3,
        batch_size=16,
        eval_every=2,
        warmup_ratio=0.1,
        progress=False,
        early_stopping=EarlyStopping(patience=2),
    )
    cells = sweep.sweep_heads(
        load, data, lrs=[1e-2, 1e-1], weight_decays=[0.0, 0.1], seeds=[0, 1], config=config
    )
    grid = [(c.learning_rate, c.weight_decay, c.seed) for c in cells]
    assert grid == [(lr, wd, s) for lr in (1e-2, 1e-1) for wd in (0.0, 0.1) for s in (0, 1)]
    assert len({c.steps for c in cells}) > 1  # heads stopped at different steps
    # Cells that differ from the first in seed, in learning rate, and in all three.
    for i in (1, 4, 7):
        _assert_same(cells[i], _single(load, data, config, cells[i]))
    table = sweep.format_table(cells)
    best = sweep.best_cell(cells)
    assert best.validation["val_accuracy"] == max(c.validation["val_accuracy"] for c in cells)
    starred = [line for line in table.splitlines() if line.startswith("| *")]
    assert len(starred) == 1 and f"| {best.learning_rate:g} " in starred[0]


def test_vmapped_regression_heads_with_one_weight_decay():
    load = _loader("regression")
    full = sources.vader()
    # The real VADER words with a real-valued target: +1 / -1 by their sentiment.
    cut = lambda s, n: (s[0][:n], np.asarray(s[1][:n], np.float32) * 2 - 1)  # noqa: E731
    data = sources.TextSplits(
        train=cut(full.train, 64), validation=cut(full.validation, 32), test=cut(full.test, 32)
    )
    config = jaxtl.TrainConfig(
        epochs=2, batch_size=16, schedule="cosine", weight_decay=0.5, progress=False
    )
    # A learning rate of 1e38 overflows the head after one step: every later step is skipped.
    cells = sweep.sweep_heads(
        load, data, lrs=[3e-2, 1e38], weight_decays=[0.05], seeds=[0, 2], config=config
    )
    assert "accuracy" not in cells[0].test and "val_loss" in cells[0].validation
    _assert_same(cells[1], _single(load, data, config, cells[1]))
    # Where the single run stops with NonFiniteStepsError, the sweep marks the cell and goes on.
    with pytest.raises(NonFiniteStepsError):
        _single(load, data, config, cells[3])
    for failed in cells[2:]:
        assert "non-finite steps in a row" in failed.error and failed.params is None
    assert sweep.best_cell(cells) is min(cells[:2], key=lambda c: c.validation["val_loss"])
    assert "non-finite steps in a row" in sweep.format_table(cells)


def test_sweep_sequential_trains_the_backbone_one_cell_at_a_time():
    load = _loader()
    data = small_vader(n_train=96, n_val=16, n_test=16)
    # full has no frozen prefix: the feature cache is left off for it, as in jaxtl.experiment.
    config = jaxtl.TrainConfig(epochs=1, batch_size=16, progress=False, feature_cache="memory")
    (cell,) = sweep.sweep_sequential(
        load,
        data,
        recipe="full",
        lrs=[1e-3],
        weight_decays=[0.0],
        seeds=[3],
        config=config,
        verbose=False,
    )
    assert (cell.learning_rate, cell.weight_decay, cell.seed, cell.steps) == (1e-3, 0.0, 3, 6)
    start = flatten(load(3).params)
    trained = flatten(cell.params)
    block = "bert/encoder/layer_0/output/dense/kernel"
    assert not np.array_equal(np.asarray(trained[block]), np.asarray(start[block]))
    assert set(cell.test) == {"loss", "accuracy", "examples"}
    # A run that stops with NonFiniteStepsError is a failed cell; the sweep goes on.
    cells = sweep.sweep_sequential(
        load,
        data,
        recipe="linear_probe",
        lrs=[1e38, 1e-2],
        weight_decays=[0.0],
        seeds=[3],
        config=config,
        verbose=False,
    )
    assert cells[0].error.startswith("steps 2-6 (5 in a row) had a non-finite loss")
    assert cells[0].params is None and sweep.best_cell(cells) is cells[1]


@pytest.mark.parametrize(
    "text, flag, message",
    [
        ("", "--lr", r"lrs \(--lr\) is empty"),
        (" , ", "--weight-decay", r"weight_decays \(--weight-decay\) is empty"),
        ("1e-4,abc", "--lr", r"lrs \(--lr\) takes comma-separated numbers.*'abc'"),
        ("1e-4,,3e-4", "--lr", r"lrs \(--lr\) has an empty entry"),
        ("-1e-4", "--lr", r"lrs \(--lr\): every learning rate must be > 0"),
        ("0", "--lr", r"lrs \(--lr\): every learning rate must be > 0"),
        ("nan", "--lr", r"lrs \(--lr\) takes finite numbers"),
        ("-0.1", "--weight-decay", r"weight_decays \(--weight-decay\): every weight decay"),
        ("1e-4,1e-4", "--lr", r"lrs \(--lr\) names a value twice"),
        ("0,x", "--seeds", r"seeds \(--seeds\) takes comma-separated whole numbers"),
        ("0.5", "--seeds", r"seeds \(--seeds\) takes comma-separated whole numbers"),
        ("-1", "--seeds", r"seeds \(--seeds\) takes whole numbers >= 0"),
        ("1e-4", "--learning-rate", r"flag must be one of"),
    ],
)
def test_bad_grids_name_the_argument_and_the_flag(text, flag, message):
    with pytest.raises(ValueError, match=message):
        sweep.parse_grid(text, flag)


def test_good_grids_parse():
    assert sweep.parse_grid("1e-4, 3e-4", "--lr") == [1e-4, 3e-4]
    assert sweep.parse_grid("0,1e-2", "--weight-decay") == [0.0, 1e-2]
    assert sweep.parse_grid("2,0,1", "--seeds") == [2, 0, 1]


def test_bad_grids_and_backbone_recipes_are_refused_before_training():
    load = _loader()
    data = small_vader(n_train=32, n_val=16, n_test=16)
    grid = dict(lrs=[1e-3], weight_decays=[0.0], seeds=[0])
    with pytest.raises(ValueError, match=r"lrs \(--lr\) is empty"):
        sweep.sweep_heads(load, data, **{**grid, "lrs": []})
    with pytest.raises(ValueError, match=r"lrs \(--lr\).*> 0; got -0.001"):
        sweep.sweep_heads(load, data, **{**grid, "lrs": [-1e-3]})
    with pytest.raises(ValueError, match=r"weight_decays \(--weight-decay\) takes finite numbers"):
        sweep.sweep_heads(load, data, **{**grid, "weight_decays": ["0.1"]})
    with pytest.raises(ValueError, match=r"seeds \(--seeds\) is empty"):
        sweep.sweep_sequential(load, data, recipe="full", **{**grid, "seeds": []})
    with pytest.raises(TypeError, match="load_model must be a function seed -> LoadedModel"):
        sweep.sweep_heads(load(0), data, **grid)
    model = load(0)
    for recipe in ("full", "last_n(1)", "lora(4)", "lp_ft(1)"):
        assert not sweep.vmappable(model, recipe)
        with pytest.raises(ValueError, match=r"needs a frozen backbone \(linear_probe.*sweep_seq"):
            sweep.sweep_heads(load, data, recipe=recipe, **grid)
    assert sweep.vmappable(model, "linear_probe")
    with pytest.raises(ValueError, match="bucket_by_length"):
        sweep.sweep_heads(load, data, config=jaxtl.TrainConfig(bucket_by_length=True), **grid)
    # What the Trainer would apply, and float32 features computed once would not:
    for option, message in (
        ({"precision": "bf16"}, r"^precision='bf16' \(--precision\): the vmapped sweep"),
        ({"remat": "full", "frozen_bf16": True},
         r"^remat='full' \(--remat\), frozen_bf16=True \(--frozen-bf16\): .*--sequential"),
        # ... and what it has no use for: it reads cached features and writes no checkpoints.
        ({"data_workers": 2, "compress_checkpoints": False},
         r"^data_workers=2 \(--data-workers\), compress_checkpoints=False "
         r"\(--compress-checkpoints\): .*writes no checkpoints.*--sequential"),
        ({"checkpoint_every": 5}, r"^checkpoint_every=5: the vmapped sweep"),
        # Random augmentation: not blamed on a feature_cache the user never asked for.
        ({"mixup": 0.2}, r"^mixup=0.2 \(--mixup\): the vmapped sweep .* cannot see random "
         r"augmentation.*--sequential"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            sweep.sweep_heads(load, data, config=jaxtl.TrainConfig(**option), **grid)
    with pytest.raises(ValueError, match="optimizer 'sgd'.*cannot vary weight_decays"):
        sweep.sweep_heads(
            load,
            data,
            config=jaxtl.TrainConfig(optimizer="sgd"),
            **{**grid, "weight_decays": [0.0, 0.1]},
        )


def test_best_cell_skips_failed_cells_and_keeps_the_first_tie():
    cells = [
        sweep.SweepCell(1e-3, 0.0, 0, {"val_loss": 0.5, "step": 4}, {"loss": 0.6}, 4),
        sweep.SweepCell(3e-3, 0.0, 0, {"val_loss": 0.5, "step": 2}, {"loss": 0.5}, 4),
        sweep.SweepCell(1e-1, 0.0, 0, None, {}, 3, error="5 non-finite steps in a row"),
    ]
    assert sweep.best_cell(cells) is cells[0]
    assert sweep.best_cell(cells, "val_loss", "max") is cells[0]
    with pytest.raises(ValueError, match="'val_accuracy' is not a validation metric here"):
        sweep.best_cell(cells, "val_accuracy")
    with pytest.raises(ValueError, match="no cell of the sweep finished"):
        sweep.best_cell(cells[2:])
    assert "5 non-finite steps in a row" in sweep.format_table(cells)


def _cli_data(tmp_path):
    from _tiny import write_vader_csv

    csv = write_vader_csv(tmp_path / "words.csv", 120)
    return ["--model", default_model_dir(), "--drop-blocks", "5", "--data", csv,
            "--text-column", "word", "--label-column", "sentiment", "--batch-size", "16",
            "--epochs", "2"]  # fmt: skip


def test_cli_sweep_cells_equal_jaxtl_finetune_runs(tmp_path, capsys):
    """`jaxtl sweep` maps its flags as `jaxtl finetune` does: a vmapped cell scores as the
    finetune run of its --lr, --weight-decay and --seed."""
    from _tiny import read_json

    from jaxtl import cli

    common = _cli_data(tmp_path)
    out = str(tmp_path / "sweep")
    assert cli.main(["sweep", *common, "--lr", "1e-3,1e-2", "--weight-decay", "0",
                     "--seeds", "0,1", "--out", out]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    cells = read_json(f"{out}/sweep.json")["cells"]
    assert [(c["learning_rate"], c["seed"]) for c in cells] == [
        (1e-3, 0), (1e-3, 1), (1e-2, 0), (1e-2, 1)
    ]  # fmt: skip
    assert "best (by validation): --lr" in printed and "sweep: 4 heads" in printed
    import matplotlib.image

    assert matplotlib.image.imread(f"{out}/sweep.png").ndim == 3
    run = str(tmp_path / "single")
    assert cli.main(["finetune", *common, "--recipe", "linear_probe", "--no-scratch", "--lr",
                     "1e-2", "--weight-decay", "0", "--seed", "1", "--feature-cache", "memory",
                     "--out", run]) == 0  # fmt: skip
    single = read_json(f"{run}/pretrained-linear_probe/results.json")
    assert cells[3]["test"]["loss"] == pytest.approx(single["test"]["loss"], rel=1e-5)
    assert cells[3]["test"]["accuracy"] == single["test"]["accuracy"]
    assert cells[3]["validation"]["step"] == single["best"]["step"]


def test_cli_sweep_of_a_backbone_recipe_runs_cell_by_cell_and_says_so(tmp_path, capsys):
    from _tiny import read_json

    from jaxtl import cli

    out = str(tmp_path / "sweep")
    assert cli.main(["sweep", *_cli_data(tmp_path), "--recipe", "last_n(1)", "--lr", "1e-3",
                     "--weight-decay", "0", "--epochs", "1", "--out", out]) == 0  # fmt: skip
    assert "last_n(1) trains more than the head, so its cells run one after another" in (
        capsys.readouterr().out
    )
    assert read_json(f"{out}/sweep.json")["cells"][0]["steps"] == 6
    assert read_json(f"{out}/cells/lr0.001-wd0-seed0/results.json")["recipe"] == "last_n(1)"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--lr", ""], "lrs (--lr) is empty"),
        (["--lr", "1e-3,fast"], "'fast' in '1e-3,fast' is not one"),
        (["--weight-decay", "-1"], "weight_decays (--weight-decay): every weight decay must be"),
        (["--seeds", "0,0"], "seeds (--seeds) names a value twice"),
        (["--seed", "0"], "--seed 0 draws the --shots subset, and there is none"),
    ],
)
def test_cli_bad_grids_exit_2_before_loading(flags, message, tmp_path, capsys):
    from jaxtl import cli

    assert cli.main(["sweep", "--model", str(tmp_path / "absent"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "absent" not in err  # refused before the model is looked for


def test_a_sequential_cell_is_the_finetune_run_of_its_learning_rate():
    """A sequential cell's learning-rate schedule is an input of its step (its numbers in the
    optimizer state, jaxtl.transfer.schedules): with AdamW, the cell trains as jaxtl.finetune
    with that learning rate does, to the bit on CPU."""
    load = _loader()
    data = small_vader(n_train=64, n_val=16, n_test=16)
    config = jaxtl.TrainConfig(epochs=1, batch_size=16, progress=False, warmup_ratio=0.25)
    cells = sweep.sweep_sequential(
        load, data, recipe="last_n(1)", lrs=[1e-3, 4e-3], weight_decays=[0.01], seeds=[2],
        config=config, verbose=False,
    )  # fmt: skip
    single = dataclasses.replace(
        config, seed=2, optim=dataclasses.replace(config.optim, learning_rate=4e-3)
    )
    assert not single.optim.learning_rate_input
    run = finetune(load(2), "last_n(1)", data, single, verbose=False)
    mine, theirs = flatten(cells[1].params), flatten(run.params)
    moved = "bert/encoder/layer_0/output/dense/kernel"
    assert not np.allclose(np.asarray(mine[moved]), np.asarray(flatten(load(2).params)[moved]))
    for path, value in theirs.items():
        assert np.array_equal(np.asarray(mine[path]), np.asarray(value)), path
    assert cells[1].test["loss"] == run.test["loss"]
    with pytest.raises(ValueError, match="learning_rate_input=False"):
        staged = dataclasses.replace(
            config, optim=dataclasses.replace(config.optim, learning_rate_input=True)
        )
        jaxtl.Trainer(load(2), jaxtl.make_plan("lp_ft(1)", load(2).structure), staged)


@pytest.mark.parametrize("name, options", [("adamw", {}), ("lion", {}), ("adafactor", {}),
                                           ("sgd", {"momentum": 0.9}), ("adam", {})])  # fmt: skip
def test_weight_decay_input_is_the_constant_weight_decay_of_every_optimizer(name, options):
    """make_optimizer(weight_decay_input=True): the weight decay is data in the optimizer
    state, one compiled step serves every value, and its updates are those of the constant
    weight decay: decoupled (adamw, lion, adafactor) and L2 on the gradient (sgd, adam), a
    group's wd_mult applied to the input, a group's own weight_decay kept, biases and frozen
    params never decayed."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxtl.transfer.optimizer import make_optimizer, set_weight_decay
    from jaxtl.transfer.plan import Group, Plan

    plan = Plan(
        ((r"head/.*", "head"), (r"body/.*", "body"), (r"fixed/.*", "fixed"), (".*", "frozen")),
        [Group("head", True), Group("body", True, lr_mult=0.5, wd_mult=0.3),
         Group("fixed", True, weight_decay=0.2, wd_mult=2.0), Group("frozen", False)],
    )  # fmt: skip
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 32))
    normal = lambda shape: jax.random.normal(next(keys), shape)  # noqa: E731
    params = {
        g: {"w": normal((4, 3)), "b": normal((3,))} for g in ("head", "body", "fixed", "other")
    }
    grads = [
        jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params) for _ in range(3)
    ]
    schedule = optax.linear_schedule(0.1, 0.0, 5)
    inputs = make_optimizer(plan, schedule, name=name, weight_decay_input=True, **options)

    @jax.jit
    def train(tx_state, params):
        for g in grads:
            updates, tx_state = inputs.update(g, tx_state, params)
            params = optax.apply_updates(params, updates)
        return params

    start = jax.jit(lambda wd: set_weight_decay(inputs.init(params), wd))
    out = {}
    for wd in (0.0, 0.1):
        const = make_optimizer(plan, schedule, name=name, weight_decay=wd, **options)
        state, expected = const.init(params), params
        for g in grads:
            updates, state = const.update(g, state, expected)
            expected = optax.apply_updates(expected, updates)
        out[wd] = train(start(jnp.float32(wd)), params)
        # Float rounding only: a zero input still adds 0 * w (the constant path skips it), and
        # f32(wd) * f32(wd_mult) may differ from f32(wd * wd_mult) in the last bit.
        for path, value in flatten(expected).items():
            np.testing.assert_allclose(
                np.asarray(flatten(out[wd])[path]), np.asarray(value), rtol=1e-6, atol=1e-7,
                err_msg=f"{name} wd={wd} {path}",
            )  # fmt: skip
    assert train._cache_size() == 1 and start._cache_size() == 1  # one program, two decays
    for path in ("head/w", "body/w"):  # the input decays the trained matrices ...
        assert not np.allclose(flatten(out[0.0])[path], flatten(out[0.1])[path], atol=1e-5)
    for path in ("head/b", "body/b", "fixed/w", "fixed/b"):  # ... not biases, not overrides
        np.testing.assert_allclose(flatten(out[0.0])[path], flatten(out[0.1])[path], atol=1e-7)
    for path in ("other/w", "other/b"):
        assert np.array_equal(flatten(out[0.1])[path], flatten(params)[path])


def test_a_sequential_cell_is_the_finetune_run_of_its_weight_decay():
    """A sequential cell's weight decay is an input of its step (in the optimizer state): with
    SGD, whose decay is L2 on the gradient, the cell trains as jaxtl.finetune with that
    constant weight decay does, to float rounding."""
    load = _loader()
    data = small_vader(n_train=64, n_val=16, n_test=16)
    config = jaxtl.TrainConfig(
        epochs=1, batch_size=16, progress=False, warmup_ratio=0.25, optimizer="sgd"
    )
    cells = sweep.sweep_sequential(
        load, data, recipe="last_n(1)", lrs=[4e-2], weight_decays=[0.0, 0.5], seeds=[2],
        config=config, verbose=False,
    )  # fmt: skip
    single = dataclasses.replace(
        config,
        seed=2,
        optim=dataclasses.replace(config.optim, learning_rate=4e-2, weight_decay=0.5),
    )
    assert not single.optim.weight_decay_input
    run = finetune(load(2), "last_n(1)", data, single, verbose=False)
    mine, theirs, undecayed = (
        flatten(cells[1].params),
        flatten(run.params),
        flatten(cells[0].params),
    )
    moved = "bert/encoder/layer_0/output/dense/kernel"
    # The decay moved the matrices well beyond the tolerance below.
    assert not np.allclose(np.asarray(mine[moved]), np.asarray(undecayed[moved]), atol=1e-4)
    for path, value in theirs.items():
        np.testing.assert_allclose(np.asarray(mine[path]), np.asarray(value), rtol=0, atol=1e-6)
    assert cells[1].test["loss"] == pytest.approx(run.test["loss"], rel=1e-5)


def test_adamw_with_its_weight_decay_an_input_trains_as_with_a_constant():
    """AdamW (the default), the backbone trained, with only the weight decay an input: the
    decoupled decay reads the same float32 value from the optimizer state as the program
    constant, so even Adam's normalization of the key biases' float-noise gradients (BERT's
    attention key biases get no gradient beyond float noise, which Adam turns into steps of the
    learning rate's size) finds nothing to amplify: bit-identical on CPU; the tolerance leaves
    room for XLA fusing the two programs' last op differently."""
    import jax

    from jaxtl.transfer.optimizer import WeightDecayInput

    load = _loader()
    data = small_vader(n_train=64, n_val=16, n_test=16)
    config = jaxtl.TrainConfig(
        epochs=1, batch_size=16, progress=False, learning_rate=1e-3, weight_decay=0.3, seed=1
    )
    given = dataclasses.replace(
        config, optim=dataclasses.replace(config.optim, weight_decay_input=True)
    )
    is_input = lambda x: isinstance(x, WeightDecayInput)  # noqa: E731
    trainer = jaxtl.Trainer(load(1), jaxtl.make_plan("last_n(1)", load(1).structure), given)
    state = trainer.init_state(4)  # the value is data in the state, from the config
    inputs = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_input) if is_input(x)]
    assert inputs and all(float(x.weight_decay) == np.float32(0.3) for x in inputs)
    plain = finetune(load(1), "last_n(1)", data, config, verbose=False)
    mine = finetune(load(1), "last_n(1)", data, given, verbose=False)
    for path, value in flatten(plain.params).items():
        np.testing.assert_allclose(
            np.asarray(flatten(mine.params)[path]), np.asarray(value), rtol=0, atol=1e-6,
            err_msg=path,
        )  # fmt: skip
    assert mine.test["loss"] == pytest.approx(plain.test["loss"], rel=1e-5)


def test_weight_decay_input_is_refused_for_a_staged_recipe():
    load = _loader()
    config = jaxtl.TrainConfig(weight_decay_input=True)
    with pytest.raises(ValueError, match=r"weight_decay_input.*lp_ft.*weight_decay_input=False"):
        jaxtl.Trainer(load(0), jaxtl.make_plan("lp_ft(1)", load(0).structure), config)


@pytest.mark.slow
def test_sequential_cells_of_other_learning_rates_and_weight_decays_share_one_compiled_step(
    tmp_path,
):
    """With the persistent compilation cache on, a sweep of two learning rates x two weight
    decays adds no entry to the cache of a one-cell sweep of its first cell: every one of its
    cells' programs is read back, the cells of the other learning rate at the same weight decay
    as much as those of the other weight decay. (With either a constant, each value's train
    step would be a new program.)"""
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip

    def entries(lrs: str, wds: str) -> int:
        argv = [sys.executable, "-m", "jaxtl.cli", "sweep", *_cli_data(tmp_path), "--recipe",
                "last_n(1)", "--lr", lrs, "--weight-decay", wds, "--epochs", "1", "--out",
                str(tmp_path / f"out-{lrs}-{wds}")]  # fmt: skip
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return len([f for f in os.listdir(cache) if not f.endswith("-atime")])

    one = entries("1e-3", "0")
    assert one > 0
    assert entries("1e-3,3e-3", "0,0.1") == one
