"""``jaxtl finetune --preset digits`` end to end on the real pieces: the shipped ImageNet
EfficientNet-Lite0 weights, scikit-learn's digits, the trainer with BatchNorm, and the CLI's
run directory and table. One epoch per run keeps it to a few minutes on 2 cores."""

from __future__ import annotations

import os

import numpy as np
import pytest
from _tiny import read_json

from jaxtl import cli
from jaxtl.data import digits


def test_digits_splits_are_stratified_and_fixed():
    full, low = digits(), digits(per_class=10)
    assert full.sizes() == {"train": 1078, "validation": 359, "test": 360}
    assert low.sizes()["train"] == 100
    assert np.bincount(low.train[1]).tolist() == [10] * 10
    np.testing.assert_array_equal(low.test[0], full.test[0])  # same held-out images
    assert full.train[0].dtype == np.uint8 and full.train[0].shape[1:] == (8, 8, 1)
    with pytest.raises(ValueError, match="per_class=500"):
        digits(per_class=500)


@pytest.mark.slow
def test_preset_digits_prints_its_table(tmp_path, capsys):
    out = tmp_path / "digits"
    code = cli.main(["finetune", "--preset", "digits", "--epochs", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "train set"
    runs = [r.split("|")[2].strip() for r in table[2:]]
    assert runs == ["pretrained full", "pretrained linear_probe", "scratch full"] * 2
    # What a rerun reproduces, and the facts of this machine it depends on.
    assert "Reproducibility: a rerun on the same CPU model" in printed
    assert "This machine: " in printed and "jaxlib" in printed
    summary = read_json(out / "summary.json")
    assert len(summary["results"]) == 6
    for r in summary["results"]:
        assert r["test"]["examples"] == 360
        assert 0.0 <= r["test"]["accuracy"] <= 1.0
        for name in ("run.json", "metrics.jsonl", "results.json", "curve.png", "checkpoints"):
            assert os.path.exists(os.path.join(r["workdir"], name)), name
        # Every arm's LR schedule is data (tests/test_schedules.py): the four full runs, of two
        # learning rates and two lengths, compile one train step between them.
        assert read_json(os.path.join(r["workdir"], "run.json"))["config"]["learning_rate_input"]
    # The linear probe on ImageNet features beats chance by far after one epoch on all digits.
    probe = next(r for r in summary["results"] if r["name"] == "all pretrained linear_probe")
    assert probe["test"]["accuracy"] > 0.5
    assert os.path.exists(out / "comparison.png")

    # A finished preset run re-scores from its run directory alone.
    run_dir = os.path.join(out, "all", "pretrained-linear_probe")
    assert cli.main(["evaluate", run_dir]) == 0
    rescored = capsys.readouterr().out
    assert (
        f"{100 * probe['test']['accuracy']:.1f}" in rescored
        or str(round(probe["test"]["accuracy"], 4)) in rescored
    )


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--data", "x.csv"], "chooses its own model and data; drop --model/--data"),
        (["--in-channels", "3"], "reads 1-channel digits; drop --in-channels"),
        (["--seeds", "0,1"], "drop --shots / --seeds"),
        # Nothing a user sets is silently ignored: every other option is named.
        (["--lr", "1e-4", "--recipe", "lora(8)", "--bucket-by-length"],
         "takes only --epochs, --seed, --image-size, --out, --resume; drop --recipe, "
         "--bucket-by-length, --lr."),
        (["--max-steps", "20"], "drop --max-steps."),
    ],
)  # fmt: skip
def test_preset_refuses_what_it_does_not_take(tmp_path, capsys, flags, said):
    out = tmp_path / "out"
    assert cli.main(["finetune", "--preset", "digits", *flags, "--out", str(out)]) == 2
    assert said in capsys.readouterr().err
    assert not out.exists()  # refused before anything ran
