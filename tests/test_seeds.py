"""Several seeds per arm (issue 15, ``--seeds``): statistics checked against SciPy's, the
comparison table and ``summary.json`` over seeds, differences within the seed noise marked,
and the negative-transfer rule that does not flag what the seeds cannot tell apart."""

from __future__ import annotations

import os

import jax
import matplotlib.image
import numpy as np
import pytest
from _tiny import make_tiny_bert, read_json, write_vader_csv
from scipy import stats

from jaxtl import cli, experiment, report, seeds
from jaxtl.run import restore_run
from jaxtl.transfer.trees import flatten


def test_mean_std_and_interval_equal_scipy_s():
    values = [0.912, 0.897, 0.925, 0.904]
    rs = [{"name": "a", "seed": s, "test": {"accuracy": v}} for s, v in enumerate(values)]
    got = seeds.aggregate(rs, "accuracy")["a"]
    assert got["seeds"] == [0, 1, 2, 3] and got["values"] == values and got["n"] == 4
    assert got["mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert got["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    low, high = stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values))
    assert got["ci95"] == pytest.approx([low, high], abs=1e-12)
    one = seeds.aggregate(rs[:1], "accuracy")["a"]
    assert one["std"] is None and one["ci95"] is None


def test_seed_noise_keeps_a_noisy_difference_from_being_flagged():
    """A pretrained arm whose mean is 1 point under scratch's: the test set is so large that
    its own noise (0.3 points) would flag it, but the seeds spread by 7 points; the rule
    takes the larger noise and does not flag it, and the table says it is within the noise."""
    runs = [("pretrained full", [0.80, 0.90]), ("scratch full", [0.86, 0.86])]
    results = [
        {"name": name, "seed": s, "test": {"accuracy": acc, "examples": 100_000},
         "workdir": "", "best": None, "train_seconds": 1.0, "steps": 1}
        for name, accs in runs for s, acc in enumerate(accs)
    ]  # fmt: skip
    (check,) = experiment.negative_transfer(results)
    assert check["difference"] == pytest.approx(-0.01)
    assert check["noise"] == pytest.approx(2 * np.sqrt(np.var([0.80, 0.90], ddof=1) / 2))
    assert not check["flagged"]
    headers, rows = report.seed_rows(results)
    assert headers[-1] == "vs scratch full"
    assert rows[0] == ["pretrained full", "85.00% ± 7.07%", "21.47% .. 148.53%", "0,1",
                       "-1.00 pts (within seed noise)"]  # fmt: skip
    # Scratch's seeds agree exactly, pretrained's do not: a 1-point difference, 10 of noise.
    assert seeds.difference(
        seeds.aggregate(results, "accuracy")["pretrained full"],
        seeds.aggregate(results, "accuracy")["scratch full"],
    )["within_noise"]


def test_cli_runs_each_arm_per_seed_and_summarizes_them(tmp_path, capsys):
    model = make_tiny_bert(str(tmp_path / "bert"))
    csv = write_vader_csv(tmp_path / "words.csv", 100)
    out = str(tmp_path / "out")
    argv = ["finetune", "--model", model, "--data", csv, "--text-column", "word",
            "--label-column", "sentiment", "--recipe", "linear_probe", "--batch-size", "16",
            "--epochs", "1", "--seeds", "0,1", "--out", out]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    names = ["pretrained-linear_probe-seed0", "pretrained-linear_probe-seed1",
             "scratch-full-seed0", "scratch-full-seed1"]  # fmt: skip
    assert sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))) == names
    runs = {n: read_json(os.path.join(out, n, "results.json")) for n in names}
    assert [runs[n]["seed"] for n in names] == [0, 1, 0, 1]
    assert read_json(os.path.join(out, names[1], "run.json"))["config"]["seed"] == 1
    # Each seed is its own run: another head init and data order, another result.
    assert runs[names[0]]["test"]["loss"] != runs[names[1]]["test"]["loss"]

    summary = read_json(os.path.join(out, "summary.json"))
    arms = summary["seeds"]["arms"]
    probe = [runs[n]["test"]["accuracy"] for n in names[:2]]
    assert arms["pretrained linear_probe"]["values"] == probe
    assert arms["pretrained linear_probe"]["mean"] == pytest.approx(np.mean(probe))
    assert summary["seeds"]["baseline"] == "scratch full"
    assert "test accuracy mean ± std" in printed and "vs scratch full" in printed
    image = matplotlib.image.imread(os.path.join(out, "seeds.png"))
    assert image.ndim == 3

    assert cli.main([*argv, "--resume"]) == 0  # every seed of every arm kept
    assert capsys.readouterr().out.count("already finished") == 4


def test_each_seed_draws_its_own_new_head(tmp_path):
    """With a learning rate of 1e-12 and one step the params are those the run started from:
    the pretrained backbone is the same for every seed, the new head is drawn per seed."""
    model = make_tiny_bert(str(tmp_path / "bert"))
    csv = write_vader_csv(tmp_path / "words.csv", 100)
    out = str(tmp_path / "out")
    assert cli.main(["finetune", "--model", model, "--data", csv, "--text-column", "word",
                     "--label-column", "sentiment", "--recipe", "linear_probe", "--no-scratch",
                     "--batch-size", "16", "--max-steps", "1", "--lr", "1e-12",
                     "--seeds", "0,1", "--out", out]) == 0  # fmt: skip
    params = [
        flatten(jax.device_get(restore_run(os.path.join(out, f"pretrained-linear_probe-seed{s}"),
                                           "latest").state.params))
        for s in (0, 1)
    ]  # fmt: skip
    moved = {p for p in params[0] if np.abs(params[0][p] - params[1][p]).max() > 1e-4}
    assert moved == {"classifier/kernel"}  # the new head's bias starts at 0 for every seed


def test_bad_seeds_are_refused(capsys):
    cases = [("0,0", "needs distinct seeds >= 0"), ("0,-1", "needs distinct seeds >= 0"),
             ("0,x", "comma-separated whole")]  # fmt: skip
    for bad, message in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(["finetune", "--seeds", bad])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
