"""Fault tests: a training process killed with SIGKILL mid-run resumes to the same result."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _tiny import make_tiny_bert, write_vader_csv

import jaxtl
from jaxtl import checkpoint


def _finetune_cmd(model_dir, data, out, *extra):
    return [
        sys.executable,
        "-m",
        "jaxtl.cli",
        "finetune",
        "--model",
        model_dir,
        "--data",
        data,
        "--text-column",
        "word",
        "--label-column",
        "sentiment",
        "--epochs",
        "6",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--no-scratch",
        "--eval-every",
        "4",
        "--out",
        out,
        *extra,
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("fault")
    model_dir = make_tiny_bert(str(base / "bert"))
    return model_dir, write_vader_csv(base / "words.csv", 150, label_names=None)


def _final_params(run_dir, model_dir):
    model = jaxtl.load(model_dir, num_labels=2)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), jaxtl.TrainConfig())
    like = trainer.init_state(1).checkpoint_tree()
    tree, _ = checkpoint.restore_params(os.path.join(run_dir, "checkpoints"), like, "latest")
    return int(tree["step"]), [np.asarray(x) for x in jax.tree.leaves(tree["params"])]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(setup, tmp_path):
    model_dir, data = setup
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        _finetune_cmd(model_dir, data, ref_out),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(
        _finetune_cmd(model_dir, data, out),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = os.path.join(out, "pretrained-full", "checkpoints", "latest")
    deadline = time.time() + 300
    # Kill once a checkpoint past the first evaluation exists: mid-run, not at the end.
    while time.time() < deadline and proc.poll() is None:
        names = [os.path.basename(p) for p in glob.glob(os.path.join(ckpts, "*"))]
        steps = [int(n) for n in names if n.isdigit()]  # not orbax's in-progress *-tmp dirs
        if any(s >= 8 for s in steps):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; lengthen it"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "pretrained-full", "results.json"))

    resumed = subprocess.run(
        _finetune_cmd(model_dir, data, out, "--resume"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed from step" in resumed.stderr

    ref_step, ref_params = _final_params(os.path.join(ref_out, "pretrained-full"), model_dir)
    step, params = _final_params(os.path.join(out, "pretrained-full"), model_dir)
    assert step == ref_step == 90  # 150 rows -> 120 train / batch 8 = 15 steps x 6 epochs
    for a, b in zip(ref_params, params, strict=True):
        np.testing.assert_array_equal(a, b)
    with open(os.path.join(ref_out, "pretrained-full", "results.json")) as f:
        ref_test = json.load(f)["test"]
    with open(os.path.join(out, "pretrained-full", "results.json")) as f:
        assert json.load(f)["test"] == ref_test
