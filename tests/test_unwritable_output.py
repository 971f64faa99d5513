"""Output that cannot be written (issue 14, fault 4): a read-only run directory is refused
before anything compiles; one made read-only mid-run, or deleted mid-run, stops the fit within
a step with an error that says what is kept, and never lets a save recreate it empty. (A full
disk: ``test_checkpoint_faults.py``, the save that fails mid-run.)

A directory is made read-only with ``chattr +i`` when the tests run as root (root ignores
permission bits) and with ``chmod a-w`` otherwise; either way the test first proves that a
file can no longer be created there."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _tiny import make_tiny_bert, small_vader, write_vader_csv

import jaxtl
from jaxtl import cli, report
from jaxtl.checkpoint import Checkpointer, CheckpointWriteError
from jaxtl.data import training_loader
from jaxtl.encoding import encode_splits
from jaxtl.train.faults import OutputWriteError
from jaxtl.train.progress import MetricsLog

# Each test strikes a fit in flight; a save or a wait that never returns fails it instead.
pytestmark = pytest.mark.timeout(600)


def _read_only(path: str, on: bool = True) -> None:
    """Make ``path`` and everything under it read-only (``on``) or writable again."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "+i" if on else "-i", path], check=True)
        return
    for root, _, files in os.walk(path):
        for name in [root, *(os.path.join(root, f) for f in files)]:
            mode = os.stat(name).st_mode
            write = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
            os.chmod(name, mode & ~write if on else mode | stat.S_IWUSR)


@pytest.fixture
def read_only(tmp_path):
    """``make(path)``: ``path`` read-only, proven so, and writable again after the test."""
    made = []

    def make(path: str) -> str:
        os.makedirs(path, exist_ok=True)
        _read_only(path)
        made.append(path)
        try:
            with open(os.path.join(path, "probe"), "w"):
                pass
        except OSError:
            return path
        pytest.fail(f"could not make {path} read-only on this machine (chattr/chmod)")

    yield make
    for path in made:
        if os.path.exists(path):
            _read_only(path, on=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("unwritable")
    model = jaxtl.load(make_tiny_bert(str(base / "bert")), num_labels=2)
    arrays, _ = encode_splits(model, small_vader(n_train=160, n_val=16, n_test=16))
    config = jaxtl.TrainConfig(
        epochs=2, batch_size=16, learning_rate=1e-3, progress=False, checkpoint_every=3,
        max_to_keep=1, log_every=1,
    )  # fmt: skip
    plan = jaxtl.make_plan("full", model.structure)
    loader = training_loader(arrays["train"], config.data, model)
    reference = jaxtl.Trainer(model, plan, config, str(base / "reference")).fit(loader)
    return model, plan, config, loader, _params(reference)


def _params(result) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(result.state.params))]


class StrikeAfterCommit:
    """The training loader; once checkpoint ``step`` has committed and no save is running
    (looked for as it hands out batch ``step + 3``: batches are read 2 ahead, so the fit is
    past ``step`` and the next save, at ``2 * step``, has not begun), ``strike()`` runs.
    ``after`` counts the batches handed out from then on."""

    def __init__(self, loader, workdir: str, step: int, strike):
        self.loader, self.served, self.after = loader, 0, None
        self.latest = os.path.join(workdir, "checkpoints", "latest")
        self.step, self.strike = step, strike

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def epoch(self, epoch: int, start: int = 0):
        for batch in self.loader.epoch(epoch, start):
            self.served += 1
            if self.after is not None:
                self.after += 1
            if self.served == self.step + 3:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and os.listdir(self.latest) != [str(self.step)]:
                    time.sleep(0.01)  # committed, and nothing else (a save's tmp dir) there
                self.strike()
                self.after = 0
            yield batch


def test_a_read_only_out_dir_is_refused_before_the_run_starts(setup, tmp_path, read_only, capsys):
    model, plan, config, _, _ = setup
    ro = read_only(str(tmp_path / "ro"))
    with pytest.raises(ValueError, match=r"workdir \(--out\) '.*/ro/run' cannot be written"):
        jaxtl.Trainer(model, plan, config, os.path.join(ro, "run"))

    bert = make_tiny_bert(str(tmp_path / "bert"))
    csv = write_vader_csv(tmp_path / "words.csv", 100)
    capsys.readouterr()
    code = cli.main(["finetune", "--model", bert, "--data", csv, "--text-column", "word",
                     "--label-column", "sentiment", "--recipe", "full", "--no-scratch",
                     "--out", os.path.join(ro, "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: out (--out) '{ro}/run' cannot be written (" in err
    assert "choose one on a writable disk or fix its permissions" in err
    assert "Traceback" not in err
    assert sorted(os.listdir(ro)) == []


def test_a_run_dir_made_read_only_mid_run_stops_it_and_keeps_its_checkpoint(
    setup, tmp_path, read_only
):
    """Made read-only once step 3 is saved: the next metrics line cannot be written, the fit
    stops on that step with an error that says the checkpoints are kept and how to go on; once
    writable again, the resumed run ends bit for bit as an uninterrupted one."""
    model, plan, config, loader, reference = setup
    workdir = str(tmp_path / "run")
    strike = StrikeAfterCommit(loader, workdir, 3, lambda: read_only(workdir))
    with pytest.raises(OutputWriteError) as e:
        jaxtl.Trainer(model, plan, config, workdir).fit(strike)
    message = str(e.value)
    assert f"Writing {workdir}/metrics.jsonl failed (PermissionError" in message
    assert "the checkpoints saved there are kept" in message and "--resume" in message
    assert strike.after <= 3  # the fit ran at most one step past the one it was on
    _read_only(workdir, on=False)
    assert Checkpointer(os.path.join(workdir, "checkpoints")).steps() == [3]

    resumed = jaxtl.Trainer(model, plan, config, workdir).fit(loader, resume=True)
    assert resumed.steps == 20
    for a, b in zip(reference, _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_run_dir_deleted_mid_run_stops_it_at_the_next_step(setup, tmp_path, capsys):
    """Deleted once step 3 is saved: the next step's check finds the checkpoint directory
    gone and stops the fit, saying the checkpoints went with it, before any save could
    recreate an empty run directory that looks resumable."""
    model, plan, config, loader, _ = setup
    workdir = str(tmp_path / "run")
    strike = StrikeAfterCommit(loader, workdir, 3, lambda: shutil.rmtree(workdir))
    with pytest.raises(CheckpointWriteError) as e:
        jaxtl.Trainer(model, plan, config, workdir).fit(strike)
    message = str(e.value)
    assert f"under {workdir}/checkpoints/latest failed (FileNotFoundError" in message
    assert "no longer exists: it was deleted, moved or unmounted" in message
    assert "if deleted, start the run again (workdir / --out)" in message
    assert e.value.steps == []
    assert strike.after <= 3
    assert not os.path.exists(workdir)
    assert "never retrieved" not in capsys.readouterr().err


def test_a_metrics_line_that_fails_to_write_is_taken_back(tmp_path):
    """A write cut short (here EFBIG from a file-size limit, as ENOSPC on a full disk) leaves
    no half line: the file is as it was, and a line already cut short elsewhere is dropped by
    the resume's truncation and skipped by the plots instead of failing them."""
    path = tmp_path / "metrics.jsonl"
    script = f"""
import resource
from jaxtl.train.faults import OutputWriteError
from jaxtl.train.progress import MetricsLog
from jaxtl.train.progress import MetricsLog
log = MetricsLog({str(path)!r})
log.write({{"step": 1, "split": "train", "loss": 0.5}})
resource.setrlimit(resource.RLIMIT_FSIZE, (60, resource.RLIM_INFINITY))
try:
    log.write({{"step": 2, "split": "train", "loss": 0.25, "pad": "x" * 100}})
except OutputWriteError as e:
    print("refused:", e)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert "refused: Writing" in done.stdout and "File too large" in done.stdout, done.stderr
    assert path.read_text() == '{"step": 1, "split": "train", "loss": 0.5}\n'

    with open(path, "a") as f:
        f.write('{"step": 2, "split": "train", "lo')  # what a killed writer could leave
    assert [r["step"] for r in report.read_metrics(str(tmp_path))] == [1]
    MetricsLog(str(path)).truncate_after(5)
    assert path.read_text() == '{"step": 1, "split": "train", "loss": 0.5}\n'
