"""The Trainer on a real (tiny, transformers-built) BERT and real VADER text: exact resume,
early stopping with restore-best, freezing under real training, and the run directory."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from _tiny import evaluate, files_under, fit, make_tiny_bert, small_vader

import jaxtl
from jaxtl import checkpoint
from jaxtl.encoding import encode_splits
from jaxtl.train.faults import earlier_results
from jaxtl.transfer import trees


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny") / "bert"))


@pytest.fixture(scope="module")
def arrays(tiny_dir):
    model = jaxtl.load(tiny_dir, num_labels=2)
    out, _ = encode_splits(model, small_vader(n_train=160, n_val=48, n_test=48))
    return out


def _trainer(tiny_dir, recipe, workdir, **cfg):
    model = jaxtl.load(tiny_dir, num_labels=2)
    config = jaxtl.TrainConfig(**{"batch_size": 16, "learning_rate": 1e-3, "log_every": 3, **cfg})
    return jaxtl.Trainer(model, jaxtl.make_plan(recipe, model.structure), config, workdir)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# 10 steps per epoch, 2 epochs. The full fine-tunes below share this config, so they share one
# compiled train step (the schedule's length is part of it).
RUN = dict(epochs=2, warmup_steps=3)


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, arrays, tmp_path_factory):
    """The run that each stopped and resumed run below must end as (dropout on, so the per-step
    RNG matters too)."""
    full = _trainer(tiny_dir, "full", str(tmp_path_factory.mktemp("uninterrupted")), **RUN)
    return fit(full, arrays["train"], arrays["validation"])


@pytest.mark.parametrize("stop_at", [13, 10])  # mid-epoch 2; exactly at the epoch-1 evaluation
def test_stopped_and_resumed_run_is_bitwise_identical(
    tiny_dir, arrays, tmp_path, stop_at, uninterrupted
):
    ref = uninterrupted
    assert ref.steps == 20

    first = _trainer(tiny_dir, "full", str(tmp_path / "b"), **RUN)
    part = fit(first, arrays["train"], arrays["validation"], stop_at=stop_at)
    assert part.steps == stop_at
    # Not resuming, a fit in that directory would write over its checkpoints: refused, and
    # nothing there changes (the resume below ends bitwise where the uninterrupted run does).
    saved = files_under(tmp_path / "b")
    # (A run stopped before writing anything else is found by its checkpoints.)
    assert earlier_results(str(tmp_path / "b")) == str(tmp_path / "b" / "checkpoints")
    again = _trainer(tiny_dir, "full", str(tmp_path / "b"), **RUN)
    with pytest.raises(ValueError, match=rf"already holds checkpoints .*\(steps \[.*{stop_at}\]\)"):
        fit(again, arrays["train"], arrays["validation"])
    assert files_under(tmp_path / "b") == saved
    # A fresh trainer and model, as a new process would build them.
    second = _trainer(tiny_dir, "full", str(tmp_path / "b"), **RUN)
    resumed = fit(second, arrays["train"], arrays["validation"], resume=True)
    assert resumed.steps == 20
    for a, b in zip(_leaves(ref.state.params), _leaves(resumed.state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(ref.state.opt_state), _leaves(resumed.state.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [h["val_loss"] for h in ref.history] == [h["val_loss"] for h in resumed.history]
    # The metrics log describes one run: no duplicated steps after the resume.
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        steps = [(r["split"], r["step"]) for r in map(json.loads, f)]
    assert len(steps) == len(set(steps))


def test_last_n_freezes_under_real_training(tiny_dir, arrays):
    trainer = _trainer(tiny_dir, "last_n(1)", None, epochs=1, restore_best=False)
    before = trees.flatten(jax.device_get(trainer.model.params))
    after = trees.flatten(jax.device_get(fit(trainer, arrays["train"]).state.params))
    frozen = [p for p in before if p.startswith(("bert/embeddings", "bert/encoder/layer_0/"))]
    trained = [p for p in before if p.startswith(("bert/encoder/layer_1/", "classifier"))]
    assert frozen and trained
    for p in frozen:
        np.testing.assert_array_equal(before[p], after[p], err_msg=p)
    for p in trained:
        assert not np.array_equal(before[p], after[p]), p


@pytest.mark.parametrize("restore", [True, False])
def test_early_stopping_restores_best_unless_told_not_to(tiny_dir, arrays, tmp_path, restore):
    """EarlyStopping(restore_best=False) is heard although CheckpointConfig's restore_best
    defaults to True: a False in either keeps the last params."""
    # A vanishing learning rate: validation accuracy cannot improve, so patience runs out.
    stop = jaxtl.EarlyStopping(metric="val_accuracy", patience=2, restore_best=restore)
    trainer = _trainer(
        tiny_dir, "linear_probe", str(tmp_path / "es"), epochs=5, learning_rate=1e-12,
        eval_every=2, early_stopping=stop,
    )  # fmt: skip
    res = fit(trainer, arrays["train"], arrays["validation"])
    assert res.stopped_early
    assert res.steps == 6  # evaluations at 2 (best), 4 and 6 (no improvement twice)
    assert res.best["step"] == 2
    ckpts, tree = str(tmp_path / "es" / "checkpoints"), res.state.checkpoint_tree()
    best, _ = checkpoint.restore_params(ckpts, tree, "best")
    last, _ = checkpoint.restore_params(ckpts, tree, "latest")
    assert (int(best["step"]), int(last["step"])) == (2, 6)
    kept, other = (best, last) if restore else (last, best)
    for a, b in zip(_leaves(kept["params"]), _leaves(res.state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(_leaves(other["params"]), _leaves(res.state.params), strict=True)
    )


def test_the_best_params_come_back_without_reading_the_optimizer_state(tmp_path):
    """The end of a fit reads the best step's params and statistics only: its optimizer state
    (twice the params under AdamW) is not read into memory beside the live one."""

    def state(step: int) -> dict:
        return {
            "step": np.int32(step),
            "params": {"w": np.full((3, 4), step, np.float32)},
            "batch_stats": {"bn": {"mean": np.full((4,), -step, np.float32)}},
            "opt_state": {"mu": np.full((3, 4), 10 * step, np.float32)},
        }

    ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), max_to_keep=3, best_metric="score")
    try:
        for step, score in ((1, 0.1), (2, 0.3), (3, 0.2)):
            ckpt.save(step, state(step), {"step": step}, metrics={"score": score})
        ckpt.wait()
        tree, meta = ckpt.restore_best(state(0), ("params", "batch_stats"))
        whole, _ = ckpt.restore_best(state(0))
    finally:
        ckpt.close()
    assert meta["step"] == 2
    assert tree["opt_state"] is None and tree["step"] is None
    np.testing.assert_array_equal(tree["params"]["w"], np.full((3, 4), 2, np.float32))
    np.testing.assert_array_equal(tree["batch_stats"]["bn"]["mean"], np.full((4,), -2.0))
    np.testing.assert_array_equal(whole["opt_state"]["mu"], np.full((3, 4), 20, np.float32))


def test_finetune_writes_a_complete_run_directory(tiny_dir, tmp_path, monkeypatch):
    model = jaxtl.load(tiny_dir, num_labels=2)
    work = str(tmp_path / "run")
    tested = []  # the states the test split is scored with
    evaluate = jaxtl.Trainer.evaluate

    def spy(self, state, loader, **kwargs):
        if kwargs.get("details"):
            tested.append(state)
        return evaluate(self, state, loader, **kwargs)

    monkeypatch.setattr(jaxtl.Trainer, "evaluate", spy)
    res = jaxtl.finetune(
        model,
        "full",
        small_vader(96, 32, 40),
        jaxtl.TrainConfig(epochs=2, batch_size=16, learning_rate=1e-3),
        work,
    )
    for name in ("run.json", "metrics.jsonl", "results.json", "curve.png"):
        assert os.path.getsize(os.path.join(work, name)) > 0, name
    assert os.listdir(os.path.join(work, "checkpoints", "best"))
    assert res.test["examples"] == 40  # every test example counted once, partial batch included
    with open(os.path.join(work, "results.json")) as f:
        assert json.load(f)["test"] == res.test
    # The optimizer state's memory went before the test evaluation; the params it scored are
    # the ones returned.
    assert len(tested) == 1 and tested[0].opt_state is None
    for a, b in zip(_leaves(tested[0].params), _leaves(res.params), strict=True):
        np.testing.assert_array_equal(a, b)

    # A second run into the finished run's directory, not resuming it, is refused before
    # anything is written or compiled: every file of the first run is as it was.
    saved = files_under(work)
    with pytest.raises(ValueError, match=r"workdir \(--out\) .* already holds the results of an "
                       r"earlier run \(.*run\.json\).*resume=True \(--resume\)"):  # fmt: skip
        jaxtl.finetune(model, "full", small_vader(96, 32, 40), None, work)
    assert files_under(work) == saved


def test_training_leaves_the_models_params_usable(tiny_dir, arrays):
    # The step donates its state; the model's own arrays must survive for the next run.
    trainer = _trainer(tiny_dir, "full", None, restore_best=False, **RUN)
    fit(trainer, arrays["train"])
    assert all(not x.is_deleted() for x in jax.tree.leaves(trainer.model.params))
    again = jaxtl.Trainer(
        trainer.model, jaxtl.make_plan("linear_probe", trainer.model.structure), trainer.config
    )
    assert fit(again, arrays["train"]).steps == 20


def test_prefetch_places_batches_ahead_in_order():
    mesh = jaxtl.parallel.make_mesh()
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield {"x": np.full((2, 3), i, np.float32)}

    seen = []
    for batch in jaxtl.parallel.prefetch_to_device(source(), mesh, size=2):
        assert isinstance(batch["x"], jax.Array) and batch["x"].sharding.mesh == mesh
        seen.append(int(batch["x"][0, 0]))
        # Batch k is handed out once batches k + 1 and k + 2 are already placed.
        assert len(pulled) == min(5, seen[-1] + 3)
    assert seen == [0, 1, 2, 3, 4]
    assert [int(b["x"][0, 0]) for b in jaxtl.parallel.prefetch_to_device(source(), mesh, 0)] == [
        0, 1, 2, 3, 4
    ]  # fmt: skip
    with pytest.raises(ValueError, match="prefetch must be >= 0"):
        jaxtl.TrainConfig(prefetch=-1)


def test_prefetch_does_not_change_the_run(tiny_dir, arrays):
    runs = [
        fit(_trainer(tiny_dir, "full", None, prefetch=n, **RUN), arrays["train"]) for n in (0, 3)
    ]
    for a, b in zip(_leaves(runs[0].state.params), _leaves(runs[1].state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_patience_works_for_regression(tiny_dir, arrays, tmp_path):
    # Regression reports val_loss (no accuracy): early stopping and the best checkpoint both
    # rank by it. A vanishing learning rate cannot improve it by min_delta, so patience runs out.
    model = jaxtl.load(tiny_dir, task="regression")
    config = jaxtl.TrainConfig(
        epochs=5,
        batch_size=16,
        learning_rate=1e-12,
        eval_every=2,
        early_stopping=jaxtl.EarlyStopping(patience=2, min_delta=1e-3),
        progress=False,
    )
    regression = {s: dict(a, label=a["label"].astype(np.float32)) for s, a in arrays.items()}
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config, str(tmp_path))
    res = fit(trainer, regression["train"], regression["validation"])
    assert res.stopped_early and res.steps == 6
    assert res.best["step"] == 2 and "val_accuracy" not in res.best
    assert trainer.monitor == ("val_loss", "min")


def test_an_early_stopping_metric_the_task_does_not_report_is_refused(tiny_dir):
    model = jaxtl.load(tiny_dir, task="regression")
    config = jaxtl.TrainConfig(early_stopping=jaxtl.EarlyStopping(metric="val_accuracy"))
    with pytest.raises(ValueError, match=r"val_accuracy.*\['val_loss', 'val_examples'\]"):
        jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config)
    with pytest.raises(ValueError, match="two improvement rules"):
        jaxtl.TrainConfig(
            best_metric="val_loss", early_stopping=jaxtl.EarlyStopping(metric="val_accuracy")
        ).checkpoint.monitor("classification")


def _counting_forward(model, seen: list):
    """``model`` whose forward records the batch rows of every program it is traced into: a
    jitted step traces once per input shape, so ``seen`` lists the shapes compiled."""
    forward = model.forward

    def counted(params, batch_stats, batch, **kwargs):
        seen.append(int(batch["input_ids"].shape[0]))
        return forward(params, batch_stats, batch, **kwargs)

    return dataclasses.replace(model, forward=counted)


def test_evaluation_computes_only_the_rows_a_small_split_needs(tiny_dir, arrays):
    # A 4-example split is one batch of 4 rows, not eval_batch_size (256) rows of padding.
    seen = []
    model = _counting_forward(jaxtl.load(tiny_dir, num_labels=2), seen)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), jaxtl.TrainConfig())
    state = trainer.init_state(1)
    four = {k: v[:4] for k, v in arrays["test"].items()}
    assert evaluate(trainer, state, four)["examples"] == 4
    assert seen == [4]

    # 21 examples in batches of at most 16: a full batch, then 5 examples padded only to 8.
    seen.clear()
    trainer.config.data.eval_batch_size = 16
    split = {k: v[:21] for k, v in arrays["validation"].items()}
    metrics = evaluate(trainer, state, split)
    assert seen == [16, 8] and metrics["examples"] == 21
    logits = np.asarray(model.apply(jax.device_get(state.params), split))
    nll = -np.asarray(jax.nn.log_softmax(logits))[np.arange(21), split["label"]]
    assert metrics["loss"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert metrics["accuracy"] == float((logits.argmax(-1) == split["label"]).mean())


def test_a_short_epoch_is_evaluated_once_and_the_time_split_is_recorded(tiny_dir, tmp_path, capsys):
    # 6 steps per epoch and 4 evaluations asked per epoch: never more often than
    # min_eval_interval steps (capped at one epoch), so once per epoch.
    model = jaxtl.load(tiny_dir, num_labels=2)
    work = str(tmp_path / "run")
    config = jaxtl.TrainConfig(epochs=2, batch_size=16, learning_rate=1e-3, evals_per_epoch=4)
    res = jaxtl.finetune(model, "linear_probe", small_vader(96, 8, 8), config, work)
    with open(os.path.join(work, "metrics.jsonl")) as f:
        evals = [json.loads(line)["step"] for line in f if '"val"' in line]
    assert evals == [6, 12]
    assert set(res.seconds) == {"train", "evaluation", "checkpoints", "test"}
    assert all(v >= 0 for v in res.seconds.values()) and res.seconds["evaluation"] > 0
    assert res.train_seconds == pytest.approx(
        res.seconds["train"] + res.seconds["evaluation"] + res.seconds["checkpoints"], abs=0.01
    )
    err = capsys.readouterr().err
    assert "time: train" in err and "evaluation" in err and "checkpoints" in err
