"""Fault tests: a training process killed with SIGKILL, or stopped by SIGTERM / Ctrl-C, mid-run
resumes to the result of an uninterrupted run, bit for bit (issue 14, faults 1 and 2)."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _tiny import make_tiny_bert, small_vader

import jaxtl
from jaxtl.data import evaluation_loader, training_loader
from jaxtl.encoding import encode_splits
from jaxtl.train.faults import Preempted, StopSignals

# The kill -9 benchmark's own inputs, command and checks: one copy for both.
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)
import faults  # noqa: E402


@pytest.fixture(scope="module")
def kills(tmp_path_factory):
    """``benchmarks/faults.py`` with 5 trials (seeded): each run SIGKILLed at a random moment or
    during a checkpoint write, then resumed. Its reference run serves the tests below too."""
    root = tmp_path_factory.mktemp("fault")
    report = root / "faults.json"
    done = subprocess.run(
        [sys.executable, faults.__file__, "--trials", "5", "--seed", "0", "--workdir", str(root),
         "--json", str(report)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1500,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    with open(report) as f:
        trials = json.load(f)["trials"]
    inputs = (str(root / "bert"), str(root / "words.csv"))
    return done.stdout, trials, inputs, str(root / "reference" / "pretrained-full")


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _saved_steps(run_dir) -> list[int]:
    return faults.committed(run_dir)


def _start_and_wait_for_step(cmd, run_dir, step: int) -> subprocess.Popen:
    """Start ``cmd`` and return once a checkpoint at ``step`` or later exists: mid-run."""
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any(s >= step for s in _saved_steps(run_dir)):
                return proc
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.communicate()  # closes the pipes
        raise
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"the run ended or stalled before step {step}; lengthen it\n{err[-2000:]}")


def _assert_same_as_reference(run_dir, ref_dir, model_dir):
    ref_step, ref_params = faults.final_params(ref_dir, model_dir)
    step, params = faults.final_params(run_dir, model_dir)
    assert step == ref_step == faults.STEPS
    for a, b in zip(ref_params, params, strict=True):
        np.testing.assert_array_equal(a, b)
    with open(os.path.join(ref_dir, "results.json")) as f:
        ref_test = json.load(f)["test"]
    with open(os.path.join(run_dir, "results.json")) as f:
        assert json.load(f)["test"] == ref_test


@pytest.mark.slow
def test_kill_9_at_five_random_moments_every_run_resumes_bitwise(kills):
    """Each killed run resumes from the last step that had committed when it died to the params
    of an uninterrupted run, bit for bit."""
    stdout, trials, _, _ = kills
    assert "survived 5/5" in stdout, stdout[-3000:]
    assert len(trials) == 5 and all(t["killed"] and t["survived"] for t in trials)
    assert {t["mode"] for t in trials} == {"random", "write"}


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_0_and_says_how_to_resume(kills, tmp_path):
    """A scheduler's preemption notice: the step in flight finishes, its checkpoint commits,
    the process exits 0 with the command that resumes, and that command ends bitwise where an
    uninterrupted run ends."""
    _, _, (model_dir, data), ref_dir = kills
    out = str(tmp_path / "preempted")
    run_dir = os.path.join(out, "pretrained-full")
    proc = _start_and_wait_for_step(faults.command(model_dir, data, out), run_dir, 8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    match = re.search(r"SIGTERM: stopped after step (\d+); checkpoint of step \1 saved", err)
    assert match, err[-2000:]
    step = int(match.group(1))
    assert 8 <= step < faults.STEPS and _saved_steps(run_dir)[-1] == step
    assert not os.path.exists(os.path.join(run_dir, "results.json"))
    (command,) = re.findall(r"^resume with: (.*)$", err, re.M)
    argv = shlex.split(command)
    assert argv[0] == "jaxtl" and argv[-1] == "--resume" and "--out" in argv

    resumed = subprocess.run(
        [sys.executable, "-m", "jaxtl.cli", *argv[1:]],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed from step {step}" in resumed.stderr
    _assert_same_as_reference(run_dir, ref_dir, model_dir)


class _SignalAt:
    """A training loader that sends this process ``sig`` as it hands out batch ``at`` of the
    run (a user's Ctrl-C at a known moment); otherwise the loader it wraps."""

    def __init__(self, loader, at: int, sig: int):
        self.loader, self.at, self.sig, self.served = loader, at, sig, 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def epoch(self, epoch: int, start: int = 0):
        for batch in self.loader.epoch(epoch, start):
            self.served += 1
            if self.served == self.at:
                os.kill(os.getpid(), self.sig)
            yield batch


@pytest.mark.timeout(600)
def test_ctrl_c_in_a_notebook_saves_the_step_and_resumes_bitwise(tmp_path):
    """In-process (a notebook's interrupt): SIGINT during ``fit`` raises ``Preempted`` after
    checkpointing the step in flight, the previous handler is back, and ``resume=True``
    finishes with the params of an uninterrupted fit."""
    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    arrays, _ = encode_splits(model, small_vader(n_train=64, n_val=16, n_test=16))
    config = jaxtl.TrainConfig(
        epochs=2, batch_size=16, learning_rate=1e-3, progress=False, restore_best=False
    )
    plan = jaxtl.make_plan("full", model.structure)

    def loader():
        return training_loader(arrays["train"], config.data, model, seed=config.seed)

    ref = jaxtl.Trainer(model, plan, config).fit(loader()).state
    workdir = str(tmp_path / "run")
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Preempted) as e:
        jaxtl.Trainer(model, plan, config, workdir).fit(_SignalAt(loader(), 5, signal.SIGINT))
    assert signal.getsignal(signal.SIGINT) is before
    stopped = e.value
    assert stopped.signal == "SIGINT" and 5 <= stopped.step < 8
    assert stopped.result.steps == stopped.step
    assert "resume with resume=True (--resume)" in str(stopped)
    assert _saved_steps(workdir)[-1] == stopped.step

    res = jaxtl.Trainer(model, plan, config, workdir).fit(loader(), resume=True)
    assert res.steps == 8
    want, got = jax.tree.leaves(jax.device_get(ref.params)), jax.tree.leaves(res.state.params)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _SignalOnEvaluation:
    """A validation loader that sends this process ``sig`` when an evaluation starts reading
    it; otherwise the loader it wraps."""

    def __init__(self, loader, sig: int):
        self.loader, self.sig = loader, sig

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def epoch(self, epoch: int, start: int = 0):
        os.kill(os.getpid(), self.sig)
        yield from self.loader.epoch(epoch, start)


@pytest.mark.timeout(600)
def test_sigterm_during_the_last_evaluation_still_stops_cleanly(tmp_path):
    """SIGTERM while the last step is evaluated, after the loop's last look at the signals
    (which once left it unheard: the process went on as if none had come): the final
    checkpoint commits and the fit stops as preempted at that step; resuming finishes it."""
    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    arrays, _ = encode_splits(model, small_vader(n_train=64, n_val=16, n_test=16))
    config = jaxtl.TrainConfig(
        epochs=2, batch_size=16, learning_rate=1e-3, progress=False, eval_every=8
    )  # fmt: skip  (one evaluation: the last step's)
    plan = jaxtl.make_plan("full", model.structure)
    train = training_loader(arrays["train"], config.data, model, seed=config.seed)
    trainer = jaxtl.Trainer(model, plan, config, str(tmp_path / "run"))
    val = evaluation_loader(arrays["validation"], config.data, devices=trainer.devices)
    with pytest.raises(Preempted) as e:
        trainer.fit(train, _SignalOnEvaluation(val, signal.SIGTERM))
    assert e.value.signal == "SIGTERM" and e.value.step == 8
    assert _saved_steps(str(tmp_path / "run")) == [8]
    again = jaxtl.Trainer(model, plan, config, str(tmp_path / "run")).fit(train, val, resume=True)
    assert again.steps == 8


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_interrupts_at_once():
    # What was installed before (the default, or SIG_IGN when an earlier test's library set
    # it: seen in the full suite) comes back; the handler in between is StopSignals' own.
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.requested(1) == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs in this thread, at the next bytecode
    assert signal.getsignal(signal.SIGINT) is before
