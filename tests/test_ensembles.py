"""WiSE-FT and model soups of real runs (tiny BERT, a CSV of real VADER words, the CLI)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _tiny import make_tiny_bert, read_json, write_vader_csv

import jaxtl
from jaxtl import cli, ensembles
from jaxtl.transfer.trees import flatten

pytestmark = pytest.mark.slow  # three real fine-tuning runs, then their ensembles


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three finished runs of one tiny BERT: two seeds of `full`, and one `lora(2)`."""
    root = tmp_path_factory.mktemp("ensembles")
    model = make_tiny_bert(str(root / "bert"))
    csv = write_vader_csv(root / "words.csv", 160)
    out = {}
    for name, recipe, seed in (("a", "full", 0), ("b", "full", 1), ("lora", "lora(2)", 0)):
        argv = ["finetune", "--model", model, "--data", csv, "--text-column", "word"]
        argv += ["--label-column", "sentiment", "--recipe", recipe, "--no-scratch", "--lr", "1e-3"]
        argv += ["--max-steps", "4", "--batch-size", "16", "--seed", str(seed)]
        argv += ["--out", str(root / name)]
        assert cli.main(argv) == 0
        (run,) = [p for p in (root / name).iterdir() if p.is_dir()]
        out[name] = str(run)
    return out


def test_wise_ft_scores_each_alpha_and_keeps_the_best_as_a_run(runs, tmp_path, capsys):
    out = tmp_path / "wise"
    assert cli.main(["wise-ft", runs["a"], "--alphas", "0,0.5,1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chosen alpha" in printed and "<- chosen (best validation)" in printed
    result = read_json(out / "wise_ft.json")
    assert [r["alpha"] for r in result["rows"]] == [0.0, 0.5, 1.0]
    assert os.path.exists(out / "wise_ft.png")
    # alpha = 1 is the fine-tuned run itself: the same scores as jaxtl evaluate gives it.
    same = jaxtl.evaluate_run(runs["a"])
    assert result["rows"][-1]["validation"] == same["validation"]
    row = result["rows"][-1]["test"]  # evaluate adds the detailed metrics to the same scores
    assert row == {k: same["test"][k] for k in row} and "macro_f1" in same["test"]
    best = max(result["rows"], key=lambda r: r["validation"]["accuracy"])
    assert result["alpha"] == best["alpha"]
    # The chosen model is a run directory: it re-scores as its row and exports.
    again = jaxtl.evaluate_run(str(out))
    assert again["validation"] == best["validation"]
    assert cli.main(["export", str(out), str(tmp_path / "exported")]) == 0
    # An output that holds a run, an earlier result or a model is refused before any scoring.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    earlier = "already holds the results of an earlier run"
    model_dir = "is a model directory (it holds config.json)"
    for taken, said in [(out, earlier), (runs["a"], earlier), (tmp_path / "model", model_dir)]:
        assert cli.main(["wise-ft", runs["a"], "--alphas", "1", "--out", str(taken)]) == 2
        assert said in capsys.readouterr().err


def test_wise_ft_interpolates_the_backbone_and_keeps_the_new_head(runs, tmp_path):
    from jaxtl.run import restore_run

    ensembles.wise_ft(runs["a"], [0.5], out=str(tmp_path / "half"), verbose=False)
    tuned = flatten(restore_run(runs["a"]).state.params)
    half = flatten(restore_run(str(tmp_path / "half")).state.params)
    model = jaxtl.load(
        read_json(os.path.join(runs["a"], "run.json"))["model"]["path"], num_labels=2
    )
    pretrained = flatten(model.params)
    for path, value in half.items():
        want = tuned[path] if path.startswith("classifier") else (
            0.5 * np.asarray(pretrained[path]) + 0.5 * np.asarray(tuned[path])
        )  # fmt: skip
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7, err_msg=path)


def test_wise_ft_of_a_lora_run_scales_the_learned_update(runs, tmp_path):
    from jaxtl.run import restore_run

    ensembles.wise_ft(runs["lora"], [0.0, 0.25], out=str(tmp_path / "q"), verbose=False)
    tuned = flatten(restore_run(runs["lora"]).state.params)
    mixed = flatten(restore_run(str(tmp_path / "q")).state.params)
    chosen = read_json(tmp_path / "q" / "wise_ft.json")["alpha"]
    for path, value in mixed.items():
        if path.endswith("lora_b"):
            np.testing.assert_allclose(value, chosen * np.asarray(tuned[path]), rtol=1e-6)
        elif path.endswith("lora_a") or path.startswith("classifier"):
            np.testing.assert_array_equal(value, tuned[path])


def test_soups_average_runs_and_the_greedy_one_never_scores_worse(runs, tmp_path, capsys):
    from jaxtl.run import restore_run

    out = tmp_path / "soup"
    assert cli.main(["soup", runs["a"], runs["b"], "--out", str(out)]) == 0
    assert "uniform soup (2)" in capsys.readouterr().out
    result = read_json(out / "soup.json")
    best_single = max(i["validation"]["accuracy"] for i in result["ingredients"])
    assert result["greedy"]["validation"]["accuracy"] >= best_single
    soup = flatten(restore_run(str(out)).state.params)
    a, b = (flatten(restore_run(runs[k]).state.params) for k in ("a", "b"))
    kept = result["greedy"]["runs"] if result["chosen"] == "greedy" else [runs["a"], runs["b"]]
    members = [{runs["a"]: a, runs["b"]: b}[os.path.abspath(r)] for r in kept]
    for path, value in soup.items():
        want = sum(np.asarray(m[path], np.float32) for m in members) / len(members)
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7, err_msg=path)


def test_a_soup_of_different_recipes_models_or_heads_is_refused_with_the_reason(
    runs, tmp_path, capsys
):
    err = cli.main(["soup", runs["a"], runs["lora"]])
    assert err == 2 and "recipe" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    info = read_json(os.path.join(runs["b"], "run.json"))
    info["model"]["num_labels"] = 3
    (other / "run.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"another head or input \(num_labels\)"):
        ensembles.soup([runs["a"], str(other)])
    with pytest.raises(ValueError, match="at least two"):
        ensembles.soup([runs["a"]])
    with pytest.raises(ValueError, match=r"given more than once; a soup averages distinct runs"):
        ensembles.soup([runs["a"], runs["a"] + "/"])  # the same run, however it is written
    with pytest.raises(ValueError, match=r"alphas \(--alphas\) must be numbers in \[0, 1\]"):
        ensembles.wise_ft(runs["a"], [1.5])


def test_a_soup_of_staged_runs_restores_each_in_its_stage_and_rescores(tmp_path, capsys):
    # lp_ft runs whose checkpoints hold the fine-tuning stage's optimizer state: the soup and
    # jaxtl evaluate of it build that stage's template from each checkpoint's metadata.
    model = make_tiny_bert(str(tmp_path / "bert"))
    csv = write_vader_csv(tmp_path / "words.csv", 160)
    dirs = []
    for seed in (0, 1):
        argv = ["finetune", "--model", model, "--data", csv, "--text-column", "word",
                "--label-column", "sentiment", "--recipe", "lp_ft(2, unit='steps')",
                "--no-scratch", "--lr", "1e-3", "--max-steps", "5", "--batch-size", "16",
                "--seed", str(seed), "--out", str(tmp_path / f"r{seed}")]  # fmt: skip
        assert cli.main(argv) == 0
        (run,) = [p for p in (tmp_path / f"r{seed}").iterdir() if p.is_dir()]
        dirs.append(str(run))
    out = tmp_path / "soup"
    assert cli.main(["soup", *dirs, "--out", str(out)]) == 0
    result = read_json(out / "soup.json")
    again = jaxtl.evaluate_run(str(out))
    assert again["validation"] == result[result["chosen"]]["validation"]
