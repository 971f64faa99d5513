"""Scripts that only a person runs rot silently when the library's API changes: nothing imports
them in the suite, so a renamed argument or a moved function shows up the next time someone
benchmarks or follows the README. Two of them are run here, small but for real:

- ``benchmarks/step_time.py``'s ``JaxtlSide``, jaxtl's real train step as its benchmarks time it
  (``footprint.py``, ``profile_step.py`` and ``reference_step.py`` build on it too). It is built
  through the script's own parser and batch helper, compiled and stepped; the params that move
  must be exactly those its plan says train, since the torch side freezes what
  ``trainable_paths`` leaves out, and by the learning rate the script states (5e-5).
- ``examples/finetune_text.py``, run as a user runs it, with its cheapest recipe (a linear probe,
  one epoch on VADER: 25-45 s on 2 cores).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import jaxtl
from jaxtl.transfer.trees import flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import step_time  # noqa: E402

LR, WEIGHT_DECAY = 5e-5, 0.01  # what step_time.py's docstring says both sides train with


@pytest.mark.parametrize(
    ("recipe", "release_pretrained"),
    [("full", False), ("last_n(2)", False), ("linear_probe", False), ("full", True)],
    ids=["full", "last_n(2)", "linear_probe", "full-released"],  # released: footprint.py's child
)
def test_step_time_jaxtl_side_compiles_and_moves_exactly_its_plans_trainable_params(
    recipe, release_pretrained
):
    path = jaxtl.default_model_dir()
    assert os.path.samefile(step_time.model_path(None), path)  # the script's default model
    # The script's own parser, so a renamed option fails here. 8 tokens is the shortest it
    # accepts (make_batch gives a row seq_len // 8 words or more).
    args = step_time.parse_args(["--batch-size", "2", "--seq-len", "8", "--recipes", recipe])
    args.release_pretrained = release_pretrained  # as footprint.py's jaxtl_released child sets
    batch, _ = step_time.batch_for(path, args.batch_size, args.seq_len, args.seed)
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (2, 8),
        "attention_mask": (2, 8),
        "token_type_ids": (2, 8),
        "label": (2,),
    }

    side = step_time.JaxtlSide(path, args.recipes[0], batch, args)
    assert set(side.host_params) == set(flatten(side.state.params))
    assert 0 < side.num_trainable <= side.num_params == 22_566_146  # MiniLM-L6 + a 384->2 head
    assert (side.num_trainable == side.num_params) == (recipe == "full")
    assert "classifier/kernel" in side.trainable_paths
    times = side.compile()
    assert set(times) == {"trace_lower_s", "compile_s"} and all(t > 0 for t in times.values())

    seconds, loss = side.step()
    assert seconds > 0 and math.isfinite(loss)
    assert abs(loss - math.log(2)) < 0.1  # a freshly initialized two-way head: near chance
    params = {p: np.asarray(v) for p, v in flatten(side.state.params).items()}
    moved = {p for p, v in params.items() if not np.array_equal(v, side.host_params[p])}
    # Frozen params stay bit-identical; every trainable matrix moves (weight decay alone would
    # move it). A trainable vector need not: the attention key bias's gradient is 0 but for
    # rounding.
    assert moved <= side.trainable_paths
    assert {p for p in side.trainable_paths if params[p].ndim >= 2} <= moved
    # AdamW's first step moves each element by lr * g / (|g| + eps) <= lr, plus the decay
    # lr * wd * |p| on matrices: the constant 5e-5 of the script, no warmup.
    largest = 0.0
    for p in moved:
        before, delta = side.host_params[p], np.abs(params[p] - side.host_params[p])
        bound = LR * (1 + WEIGHT_DECAY * np.abs(before)) + 4 * np.spacing(np.abs(before))
        assert np.all(delta <= bound), p
        largest = max(largest, float(delta.max()))
    assert largest > 0.9 * LR

    seconds, second_loss = side.step()  # the donated state carries over
    assert seconds > 0 and math.isfinite(second_loss) and second_loss != loss
    assert int(side.state.step) == 2


@pytest.mark.slow
def test_finetune_text_example_trains_a_linear_probe_and_reports_its_test_accuracy(tmp_path):
    out = tmp_path / "example"
    script = os.path.join(ROOT, "examples", "finetune_text.py")
    argv = [sys.executable, script, "--recipes", "linear_probe", "--epochs", "1", "--out", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    (result,) = json.loads((out / "summary.json").read_text())["results"]
    assert result["name"] == "pretrained linear_probe" and result["recipe"] == "linear_probe"
    test = result["test"]
    assert test["examples"] == len(jaxtl.data.vader().test[0])
    # The docstring says ~0.85; always answering the majority class scores 0.57.
    assert test["accuracy"] > 0.8, test
    header, _, row = (line for line in done.stdout.splitlines() if line.startswith("|"))
    assert "test accuracy" in header
    assert row.startswith("| pretrained linear_probe ")
    assert f" {100 * test['accuracy']:.1f}% " in row
    assert f"plot: {out / 'comparison.png'}" in done.stdout
    assert (out / "comparison.png").is_file()


def test_step_time_refuses_rows_too_short_for_a_word(capsys):
    with pytest.raises(SystemExit):
        step_time.parse_args(["--seq-len", "4"])
    assert "--seq-len must be >= 8" in capsys.readouterr().err
