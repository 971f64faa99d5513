"""Non-finite steps: a batch whose loss or gradient is NaN/inf changes nothing, is counted, and
a run of them stops the fit with the steps named (issue 14, fault 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny import make_tiny_bert, small_vader, write_vader_csv

import jaxtl
from jaxtl import cli
from jaxtl.data import training_loader
from jaxtl.encoding import encode_splits
from jaxtl.train.faults import NonFiniteStepsError
from jaxtl.transfer.trees import flatten

POISON = 29999  # a token id none of the real words below starts with
BATCH, N_TRAIN = 16, 64  # 4 steps an epoch


def _poisoned_loss(outputs, batch):
    """Cross-entropy, times NaN for examples whose first word piece is ``POISON``: their loss
    and their gradient are NaN, as a corrupt example or an overflow would make them."""
    ce = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["label"])
    return ce * jnp.where(batch["input_ids"][:, 1] == POISON, jnp.nan, 1.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    model = jaxtl.load(make_tiny_bert(str(base / "bert")), num_labels=2)
    arrays, _ = encode_splits(model, small_vader(n_train=N_TRAIN, n_val=16, n_test=16))
    train = dict(arrays["train"])
    train["input_ids"] = train["input_ids"].copy()
    assert not (train["input_ids"][:, 1] == POISON).any()
    train["input_ids"][5, 1] = POISON
    return model, train, arrays["validation"]


def _trainer(model, workdir, **options):
    config = jaxtl.TrainConfig(
        epochs=2, batch_size=BATCH, learning_rate=1e-3, progress=False, log_every=1, **options
    )
    return jaxtl.Trainer(
        model, jaxtl.make_plan("full", model.structure), config, workdir, loss=_poisoned_loss
    )


def _poisoned_steps(trainer, train) -> list[int]:
    """The global steps whose batch holds the poisoned example (one per epoch)."""
    loader = training_loader(train, trainer.config.data, trainer.model, seed=trainer.config.seed)
    steps = []
    for epoch in range(trainer.config.epochs):
        for i, batch in enumerate(loader.epoch(epoch)):
            if (batch["input_ids"][:, 1] == POISON).any():
                steps.append(epoch * loader.steps_per_epoch + i + 1)
    return steps


def _fit(trainer, train, **kwargs):
    loader = training_loader(train, trainer.config.data, trainer.model, seed=trainer.config.seed)
    return trainer.fit(loader, **kwargs)


def _host(tree):
    return {k: np.asarray(v) for k, v in flatten(jax.device_get(tree)).items()}


def test_a_non_finite_step_changes_nothing_and_is_counted(setup, tmp_path):
    model, train, _ = setup
    workdir = str(tmp_path / "run")
    trainer = _trainer(model, workdir)
    first, second = _poisoned_steps(trainer, train)
    assert first <= 4 < second  # one poisoned batch in each epoch

    before = _fit(trainer, train, stop_at=first - 1).state  # checkpointed, as if preempted
    params, opt = _host(before.params), _host(before.opt_state)
    after = _fit(_trainer(model, workdir), train, resume=True, stop_at=first).state
    assert int(after.step) == first
    for name, (old, new) in {
        "params": (params, after.params),
        "opt": (opt, after.opt_state),
    }.items():
        new = _host(new)
        for k in old:
            np.testing.assert_array_equal(new[k], old[k], err_msg=f"{name} {k}")

    res = _fit(_trainer(model, workdir), train, resume=True)
    assert res.steps == 8 and res.skipped_steps == 2  # counted across the resume
    assert all(np.isfinite(v).all() for v in _host(res.state.params).values())
    records = [r for r in _read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    by_step = {r["step"]: r for r in records}
    assert by_step[first]["loss"] is None and by_step[first]["skipped_steps"] == 1
    assert by_step[second]["skipped_steps"] == 2 and "skipped_steps" not in by_step[first - 1]
    assert all(np.isfinite(r["loss"]) for r in records if r["step"] not in (first, second))


def test_max_bad_steps_in_a_row_stop_the_fit_naming_them(setup, tmp_path):
    model, train, _ = setup
    every = dict(train)
    every["input_ids"] = every["input_ids"].copy()
    every["input_ids"][:: BATCH // 2, 1] = POISON  # two examples in every batch of 16: all bad
    trainer = _trainer(model, str(tmp_path / "run"), max_bad_steps=3)
    with pytest.raises(NonFiniteStepsError, match=r"steps 1-3 \(3 in a row\)") as e:
        _fit(trainer, every)
    assert e.value.steps == [1, 2, 3]
    assert "max_bad_steps=3 (--max-bad-steps)" in str(e.value)
    assert "learning_rate= / --lr" in str(e.value)


def test_a_diverging_learning_rate_stops_the_cli_with_the_steps_named(tmp_path, capsys):
    """SGD at 1e30: the first update is finite but sends the params to ~1e29, whose squares
    overflow in LayerNorm; every later step is NaN and skipped."""
    model = make_tiny_bert(str(tmp_path / "bert"))
    csv = write_vader_csv(tmp_path / "words.csv", 120)
    out = tmp_path / "out"
    argv = ["finetune", "--model", model, "--data", csv, "--text-column", "word",
            "--label-column", "sentiment", "--recipe", "full", "--no-scratch",
            "--optimizer", "sgd", "--lr", "1e30", "--max-bad-steps", "3",
            "--batch-size", "8", "--epochs", "2", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: steps 2-4 (3 in a row) had a non-finite loss or gradient" in err, err
    assert "the params are those after step 1" in err
    assert not (out / "pretrained-full" / "results.json").exists()


def test_bad_max_bad_steps_is_refused():
    with pytest.raises(ValueError, match=r"max_bad_steps \(--max-bad-steps\) must be >= 1"):
        jaxtl.TrainConfig(max_bad_steps=0)


def _read_jsonl(path) -> list[dict]:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
