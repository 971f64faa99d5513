"""The Python API's refusals: arguments of the wrong kind or type, and labels or plans that
would train without learning, each a clear error in the user's terms before anything
compiles; and the arguments it accepts in more than one form."""

import os
import pathlib

import pytest
from _tiny import make_tiny_bert

import jaxtl
from jaxtl.cli.parser import finetune_options
from jaxtl.data import sources
from jaxtl.train.config import _OWNER, FLAGS


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny") / "bert"))


@pytest.fixture(scope="module")
def model(tiny_dir):
    return jaxtl.load(tiny_dir, num_labels=2)


TEXTS = [f"word{i}" for i in range(60)]
ONE_STEP = jaxtl.TrainConfig(max_steps=1, batch_size=8)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"epochs": "3"}, "epochs (--epochs) must be a whole number, got '3'."),
        ({"epochs": 1.5}, "epochs (--epochs) must be a whole number, got 1.5."),
        ({"max_steps": 1.5}, "max_steps (--max-steps) must be a whole number or None, got 1.5."),
        ({"learning_rate": "1e-3"}, "learning_rate (--lr) must be a finite number, got '1e-3'."),
        ({"learning_rate": float("inf")}, "learning_rate (--lr) must be a finite number, got inf."),
        ({"weight_decay": "0.1"}, "weight_decay (--weight-decay) must be a finite number"),
        ({"batch_size": 16.0}, "batch_size (--batch-size) must be a whole number, got 16.0."),
        ({"seed": True}, "seed (--seed) must be a whole number, got True."),
        ({"warmup_steps": 0.5}, "warmup_steps must be a whole number, got 0.5."),
        ({"prefetch": "2"}, "prefetch must be a whole number, got '2'."),
        # A string where a flag is asked for would read as True: the opposite of "false".
        ({"train_bn": "false"}, "train_bn must be True or False, got 'false'."),
        ({"bucket_by_length": "no"}, "bucket_by_length (--bucket-by-length) must be True or "
         "False, got 'no'."),
        ({"progress": "no"}, "progress must be True, False or None, got 'no'."),
        ({"compress_checkpoints": 1}, "compress_checkpoints (--compress-checkpoints) must be "
         "True, False or None, got 1."),
        ({"early_stopping": True}, "early_stopping (--patience) must be an EarlyStopping (e.g. "
         "jaxtl.EarlyStopping(patience=3)), a dict of its options, or None, got True."),
        ({"early_stopping": {"patiense": 3}}, "early_stopping has an unknown option 'patiense'; "
         "EarlyStopping takes ['patience', 'min_delta', 'restore_best', 'metric', 'mode']."),
        ({"early_stopping": {"min_delta": -1}}, "EarlyStopping.min_delta must be >= 0"),
    ],
)  # fmt: skip
def test_train_config_options_of_the_wrong_type_are_refused(options, message):
    with pytest.raises(ValueError) as e:
        jaxtl.TrainConfig(**options)
    assert message in str(e.value)


def test_every_flag_a_config_error_names_is_a_finetune_flag():
    """An error names an option's flag (FLAGS, else --<name>) only where jaxtl finetune has it."""
    flags = {flag for flag, _ in finetune_options().values()}
    names = [*_OWNER, *jaxtl.TrainConfig._DEFAULTS, "patience"]
    for name in names:
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        assert flag is None or flag in flags, (name, flag)


def test_early_stopping_without_restoring_is_heard_over_the_checkpoint_default():
    stop = jaxtl.EarlyStopping(patience=2, restore_best=False)
    assert not jaxtl.TrainConfig(early_stopping=stop).checkpoint.restores_best
    assert not jaxtl.TrainConfig(restore_best=False).checkpoint.restores_best
    assert jaxtl.TrainConfig(early_stopping=jaxtl.EarlyStopping()).checkpoint.restores_best


@pytest.mark.parametrize(
    "data, message",
    [
        (jaxtl.data.from_arrays(TEXTS, [i % 3 for i in range(60)], label_names=["a", "b", "c"]),
         "'arrays' has 3 distinct labels ['a', 'b', 'c'] but the head has 2 outputs. Pass "
         "num_labels=3 (--num-labels 3)."),
        (sources.split(TEXTS, [7] * 60), "Labels in the train split of 'data' must be in [0, 2) "
         "for a 2-way head; found [7] (example 0 holds 7). Pass num_labels=8 (--num-labels 8)"),
        (sources.split(TEXTS, [-1] * 60), "Labels in the train split of 'data' include negative "
         "class ids [-1] (example 0 holds -1); class ids are whole numbers"),
        (sources.split(TEXTS, ["neg", "pos"] * 30), "Labels in the train split of 'data' are <U3 "
         "(e.g. np.str_('neg')), not integer class ids; build the splits with "
         "jaxtl.data.from_arrays"),
        (sources.split(TEXTS, [0.5] * 60), "Labels in the train split of 'data' are float64"),
        (sources.split(TEXTS), "'data' has no labels in its train split"),
    ],
)  # fmt: skip
def test_labels_the_head_cannot_score_are_refused_before_training(model, data, message, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        jaxtl.finetune(model, "linear_probe", data, ONE_STEP, str(out), verbose=False)
    assert message in str(e.value)
    assert not out.exists()


def test_a_plan_that_trains_nothing_is_refused(model):
    other = jaxtl.load(jaxtl.efficientnet_lite0_path(), num_labels=10)
    plan = jaxtl.make_plan("linear_probe", other.structure)
    data = jaxtl.data.from_arrays(TEXTS, [i % 2 for i in range(60)])
    with pytest.raises(ValueError) as e:
        jaxtl.finetune(model, plan, data, ONE_STEP, verbose=False)
    assert str(e.value) == (
        "The plan 'linear_probe' trains no param of this 'bert' model: its trained groups' rules "
        "['fc(/.*)?'] match none of its params (a plan made for another model? build it with "
        "jaxtl.make_plan(recipe, model.structure) of this one)."
    )


@pytest.mark.parametrize(
    "which, message",
    [
        ("model", "model must be a LoadedModel, got str"),
        ("data", "data must be the train/validation/test splits of jaxtl.data"),
        ("config", "config must be a jaxtl.TrainConfig (or a dict of its options), got int."),
        ("workdir", "workdir (--out) must be a path, got 3."),
    ],
)
def test_finetune_arguments_of_the_wrong_kind_are_refused(model, tiny_dir, which, message):
    data = jaxtl.data.from_arrays(TEXTS, [i % 2 for i in range(60)])
    args = {"model": model, "data": data, "config": ONE_STEP, "workdir": None}
    args[which] = {"model": tiny_dir, "data": (TEXTS, [0] * 60), "config": 3, "workdir": 3}[which]
    with pytest.raises(ValueError) as e:
        jaxtl.finetune(args["model"], "linear_probe", args["data"], args["config"],
                       args["workdir"], verbose=False)  # fmt: skip
    assert message in str(e.value)


def test_finetune_takes_a_path_like_workdir_and_a_dict_config(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    data = jaxtl.data.from_arrays(TEXTS, [i % 2 for i in range(60)])
    config = {"max_steps": 1, "batch_size": 8}
    jaxtl.finetune(model, "linear_probe", data, config, pathlib.Path(tmp_path / "a"), verbose=False)
    jaxtl.finetune(model, "linear_probe", data, config, "~/b", verbose=False)
    for run in ("a", "b"):
        assert os.path.isfile(tmp_path / run / "results.json"), run
    # Without describe=, the run directory cannot rebuild its model and data; said so.
    with pytest.raises(ValueError, match=r"jaxtl.finetune in Python records them only when given "
                       r"describe=\{'model': ..., 'data': DATA_SPEC\}"):  # fmt: skip
        jaxtl.run.evaluate_run(str(tmp_path / "a"))


def test_the_trainer_takes_a_recipe_by_name(model):
    trainer = jaxtl.Trainer(model, "last_n(1)", ONE_STEP)
    assert trainer.plan.name == jaxtl.make_plan("last_n(1)", model.structure).name
    with pytest.raises(ValueError, match="plan must be a recipe"):
        jaxtl.Trainer(model, 3, ONE_STEP)


def test_a_data_source_refuses_a_task_it_does_not_build(tmp_path):
    """A misspelled task would read the labels as classes; a per-token task has its own data."""
    with pytest.raises(ValueError) as e:
        jaxtl.data.from_arrays(TEXTS, [0.5] * 60, task="regresion")
    assert str(e.value).startswith(
        "from_arrays: task (--task) must be one of ['classification', 'regression', "
        "'causal_lm'], got 'regresion'."
    )
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "w,0\n" * 20)
    with pytest.raises(ValueError, match=r"jaxtl.data.tagging \(--data vader-tags or FILE.conll\)"):
        sources.from_table(str(path), task="token_classification")


@pytest.mark.parametrize("dtype", ["float33", "int32"])
def test_load_refuses_a_dtype_that_is_no_float(tiny_dir, dtype):
    with pytest.raises(ValueError, match=rf"dtype must be a floating-point dtype .* got '{dtype}'"):
        jaxtl.load(tiny_dir, num_labels=2, dtype=dtype)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"seed": "x"}, "seed (--seed) must be a whole number, got 'x'."),
        ({"seed": 1.0}, "seed (--seed) must be a whole number, got 1.0."),
        ({"image_size": 0}, "image_size (--image-size) must be a side in pixels (e.g. 224) or a "
         "(height, width) pair of them, each >= 1, got 0."),
        ({"image_size": (32,)}, "or a (height, width) pair of them, each >= 1, got (32,)."),
        ({"image_size": 32.0}, "each >= 1, got 32.0."),
    ],
)  # fmt: skip
def test_load_refuses_a_seed_or_image_size_it_cannot_build_with(options, message):
    # Before: "unrecognized seed string" from numpy, a slice or padding error from deep in XLA.
    with pytest.raises(ValueError) as e:
        jaxtl.load(jaxtl.efficientnet_lite0_path(), **options)
    assert message in str(e.value)


def test_resume_without_a_workdir_is_refused_not_ignored(model):
    data = jaxtl.data.from_arrays(TEXTS, [i % 2 for i in range(60)])
    with pytest.raises(ValueError) as e:
        jaxtl.finetune(model, "linear_probe", data, ONE_STEP, verbose=False, resume=True)
    assert str(e.value).startswith(
        "resume=True (--resume) continues a run from its run directory's checkpoints, and this "
        "one trains in memory"
    )
    assert "workdir=DIR" in str(e.value) and "--out DIR" in str(e.value)


def test_options_that_change_nothing_for_the_model_or_plan_are_warned_about(model, capsys):
    data = jaxtl.data.from_arrays(TEXTS, [i % 2 for i in range(60)])
    config = jaxtl.TrainConfig(
        max_steps=1, batch_size=8, progress=False, train_bn=True, precise_bn=16, frozen_bf16=True
    )
    jaxtl.finetune(model, "full", data, config, verbose=False)
    err = capsys.readouterr().err
    assert (
        "warning: train_bn=True, precise_bn=16: the 'bert' model has no BatchNorm layers; the "
        "option changes nothing here." in err
    )
    assert "frozen_bf16=True (--frozen-bf16): the plan 'full' freezes no param" in err
    jaxtl.finetune(model, "linear_probe", data, ONE_STEP, verbose=False)
    assert "warning" not in capsys.readouterr().err
