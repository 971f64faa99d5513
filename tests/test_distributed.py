"""Two real processes under ``jax.distributed`` on loopback vs one process with the same devices.

Each distributed process has 2 CPU devices (a 4-device global mesh), reads its rows of every
global batch through 2 grain workers, and builds global ``jax.Array`` batches with
``jax.make_array_from_process_local_data``; the reference is one process with 4 devices and no
workers. Both fit the same tiny BERT (dropout on, shuffled data, 2 epochs) with ``Trainer.fit``
and evaluate a validation split whose last batch is partial (see ``_distributed_run.py``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from _distributed_run import BATCH, EPOCHS, N_TRAIN, N_VAL
from _tiny import files_under, make_tiny_bert

from jaxtl.transfer.trees import flatten

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "_distributed_run.py")
SAVES = os.path.join(HERE, "_checkpoint_saves.py")
PREEMPT = os.path.join(HERE, "_preempt_run.py")
TIMEOUT_S = 300
PROCESSES, LOCAL_DEVICES, WORKERS = 2, 2, 2
STEPS = EPOCHS * (N_TRAIN // BATCH)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(local_devices: int) -> dict:
    # No proxy variables: jax warns that they can hang distributed.initialize on loopback.
    # No cluster variables either: a test run inside a SLURM job must not join it.
    env = {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower() and not k.startswith(("SLURM_", "JAXTL_", "TPU_"))
    }
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


class _Proc:
    """A child in its own process group (its grain workers die with it), output in files."""

    def __init__(self, name, args, env, logdir, script=SCRIPT):
        self.name = name
        self.out_path = os.path.join(logdir, f"{name}.out")
        self.err_path = os.path.join(logdir, f"{name}.err")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, script, *map(str, args)],
                stdout=out,
                stderr=err,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=30)

    def output(self) -> tuple[str, str]:
        with open(self.out_path) as out, open(self.err_path) as err:
            return out.read(), err.read()


def _run_all(procs: list[_Proc], timeout: float, parse: bool = True) -> list:
    """Wait for every process; on a failure or the timeout kill them all and show every
    process's stderr. Returns each one's JSON summary (its last stdout line), or with
    ``parse=False`` its whole stdout."""
    deadline = time.monotonic() + timeout
    problem = None
    try:
        while problem is None and any(p.popen.poll() is None for p in procs):
            failed = [p for p in procs if p.popen.poll() not in (None, 0)]
            if failed:
                problem = f"{failed[0].name} exited with {failed[0].popen.returncode}"
            elif time.monotonic() > deadline:
                problem = f"timed out after {timeout:.0f} s"
            else:
                time.sleep(0.2)
        if problem is None:
            failed = [p for p in procs if p.popen.returncode != 0]
            if failed:
                problem = f"{failed[0].name} exited with {failed[0].popen.returncode}"
    finally:
        for p in procs:
            p.kill()
    if problem is not None:
        shown = "\n".join(
            f"--- {p.name} (rc={p.popen.returncode}) stderr ---\n{p.output()[1][-4000:]}"
            for p in procs
        )
        pytest.fail(f"{problem}\n{shown}", pytrace=False)
    if not parse:
        return [p.output()[0] for p in procs]
    return [json.loads(p.output()[0].strip().splitlines()[-1]) for p in procs]


def _slurm_env(local_devices: int, job_port: int, procid: int) -> dict:
    """What ``srun --ntasks 2`` on one node sets, for jax's SLURM detection: it takes the
    coordinator from the node list and its port from the job id."""
    env = _env(local_devices)
    env.update(
        SLURM_JOB_ID=str(job_port - SLURM_PORT_BASE),
        SLURM_STEP_NODELIST="localhost",
        SLURM_NTASKS=str(PROCESSES),
        SLURM_PROCID=str(procid),
        SLURM_LOCALID=str(procid),
    )
    return env


SLURM_PORT_BASE = 65535 - 2**12 + 1  # jax's SLURM port: base + job id % 4096


def _free_slurm_port() -> int:
    """A free port that jax's SLURM rule maps a job id to."""
    for port in np.random.default_rng().permutation(np.arange(SLURM_PORT_BASE, 65536)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no free port in jax's SLURM range")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All three processes at once: the 2-process distributed run, launched as SLURM would
    launch it (``jaxtl.distributed.initialize`` reads SLURM's variables), and the 1-process
    reference."""
    base = tmp_path_factory.mktemp("dist")
    model_dir = make_tiny_bert(str(base / "bert"), layers=1, dropout=0.1)
    out = str(base)
    port = _free_slurm_port()
    procs = [
        _Proc(
            f"process{i}",
            [model_dir, out, i, PROCESSES, port, WORKERS],
            _slurm_env(LOCAL_DEVICES, port, i),
            out,
        )
        for i in range(PROCESSES)
    ]
    procs.append(
        _Proc("reference", [model_dir, out, 0, 1, 0, 0], _env(PROCESSES * LOCAL_DEVICES), out)
    )
    t0 = time.perf_counter()
    *dist, ref = _run_all(procs, TIMEOUT_S)
    print(f"distributed + reference runs: {time.perf_counter() - t0:.1f} s")

    def params(name):
        with np.load(os.path.join(out, f"params_{name}.npz")) as f:
            return {k: f[k] for k in f.files}

    return {
        "dist": dist,
        "ref": ref,
        "dist_params": [params(f"{i}of{PROCESSES}") for i in range(PROCESSES)],
        "ref_params": params("0of1"),
    }


@pytest.mark.slow
def test_topology(runs):
    for i, run in enumerate(runs["dist"]):
        assert (run["process_index"], run["process_count"]) == (i, PROCESSES)
        assert (run["devices"], run["local_devices"]) == (PROCESSES * LOCAL_DEVICES, LOCAL_DEVICES)
        # Process i's devices hold rows [i * B / 2, (i + 1) * B / 2) of every global batch.
        assert run["mesh"] == [0, 0, 1, 1]
        assert run["steps"] == STEPS
    ref = runs["ref"]
    assert (ref["process_count"], ref["devices"]) == (1, PROCESSES * LOCAL_DEVICES)
    assert ref["steps"] == STEPS


@pytest.mark.slow
def test_each_process_reads_only_its_rows(runs):
    from jaxtl.data import ArrayLoader

    ref_reads = np.array(runs["ref"]["reads"])
    reads = [np.array(run["reads"]) for run in runs["dist"]]
    local = BATCH // PROCESSES
    assert ref_reads.shape == (STEPS, BATCH)
    for r in reads:
        assert r.shape == (STEPS, local)

    # The reference reads the global batches: each epoch a permutation of the training split
    # (ArrayLoader's order), less the dropped tail.
    spe = N_TRAIN // BATCH
    order = ArrayLoader({"x": np.zeros(N_TRAIN)}, BATCH, shuffle=True, seed=0, drop_last=True)
    for e in range(EPOCHS):
        expected = order.order(e)[: spe * BATCH].reshape(spe, BATCH)
        np.testing.assert_array_equal(ref_reads[e * spe : (e + 1) * spe], expected)
    assert not np.array_equal(ref_reads[:spe], ref_reads[spe:])  # reshuffled every epoch

    for step in range(STEPS):
        batch = ref_reads[step]
        # Each process reads exactly its half of the global batch, in order...
        for i, r in enumerate(reads):
            np.testing.assert_array_equal(r[step], batch[i * local : (i + 1) * local])
        # ...so the processes' reads are disjoint and together are the batch's rows.
        assert set(reads[0][step]).isdisjoint(reads[1][step])
        assert sorted(np.concatenate([r[step] for r in reads])) == sorted(batch)
    # Over an epoch no example is read twice, by either process.
    for e in range(EPOCHS):
        epoch = np.concatenate([r[e * spe : (e + 1) * spe].ravel() for r in reads])
        assert len(set(epoch.tolist())) == spe * BATCH


@pytest.mark.slow
def test_final_params_match_across_processes_and_reference(runs):
    p0, p1 = runs["dist_params"]
    ref = runs["ref_params"]
    assert p0.keys() == p1.keys() == ref.keys()
    for run in (runs["ref"], *runs["dist"]):
        assert run["params_moved"] > 1e-3  # it trained
    for k in p0:
        # The processes hold one replicated state: bitwise equal.
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
        # Same data, same dropout masks, same steps; only the cross-process reduction differs.
        np.testing.assert_allclose(p0[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    differ = [k for k in ref if not np.array_equal(ref[k], p0[k])]
    worst = max(float(np.max(np.abs(p0[k] - ref[k]))) for k in ref)
    print(f"{len(differ)} of {len(ref)} param arrays not bitwise equal; max |diff| {worst:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "reference",
        "process0",
        "process1",
    ],
)
def test_evaluation_counts_every_example_once(runs, name):
    run = runs["ref"] if name == "reference" else runs["dist"][int(name[-1])]
    # In fit (once per epoch) and after it: 13 examples, the last batch 5 real + 3 padding rows.
    assert [h["val_examples"] for h in run["history"]] == [N_VAL] * EPOCHS
    assert run["eval"]["examples"] == N_VAL
    assert run["eval"]["loss"] == pytest.approx(run["direct"]["loss"], rel=1e-5)
    assert run["eval"]["accuracy"] == pytest.approx(run["direct"]["accuracy"], abs=1e-9)
    ref = runs["ref"]["eval"]
    assert run["eval"]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert run["eval"]["accuracy"] == ref["accuracy"]


@pytest.mark.slow
def test_fsdp_over_two_processes_matches_one_process_and_restores_on_four_devices(tmp_path):
    """2 processes x 4 devices with ``fsdp=8`` (params and optimizer state split across the
    processes) end with the params of 1 process x 8 devices on the same mesh; the checkpoint
    the 2 processes wrote (each its own shards) restores in 1 process x 4 devices on
    ``fsdp=4``."""
    model_dir = make_tiny_bert(str(tmp_path / "bert"), layers=1, dropout=0.1)
    out, port = str(tmp_path), _free_port()
    procs = [
        _Proc(f"fsdp{i}", [model_dir, out, i, 2, port, 0, "fsdp=8", "two"], _env(4), out)
        for i in range(2)
    ]
    procs.append(_Proc("fsdp-ref", [model_dir, out, 0, 1, 0, 0, "fsdp=8", "one"], _env(8), out))

    def params(tag):
        with np.load(os.path.join(out, f"params_{tag}.npz")) as f:
            return {k: f[k] for k in f.files}

    *dist, ref = _run_all(procs, TIMEOUT_S)
    p0, p1, one = params("two_0"), params("two_1"), params("one_0")
    # jaxtl.export from the 2-process run: both processes gathered the shards, process 0 wrote.
    import jaxtl

    exported = flatten(jaxtl.load(os.path.join(out, "export_two"), num_labels=2).params)
    restored = _run_all(
        [_Proc("restore", [model_dir, out, 0, 1, 0, 0, "fsdp=4", "two"], _env(4), out)], TIMEOUT_S
    )[0]
    back = params("two_0")  # written by the restoring run
    assert dist[0]["mesh_shape"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dist[0]["mesh"] == [0, 0, 0, 0, 1, 1, 1, 1]
    # The word embedding and the kernels are split 8 ways across both processes.
    embedding = "bert/embeddings/word_embeddings/embedding"
    assert dist[0]["held"][embedding] == dist[1]["held"][embedding] == 1 / 8
    kernels = [k for k in dist[0]["held"] if k.endswith("kernel") and "classifier" not in k]
    assert kernels and all(dist[0]["held"][k] == 1 / 8 for k in kernels)
    # Loaded straight onto the mesh (jaxtl.load(mesh=...)): already split as the state is.
    for run in (*dist, ref, restored):
        assert run["loaded_held"] == run["held"]
    assert restored["mesh_shape"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert restored["held"][embedding] == 1 / 4
    for run in (*dist, ref):
        assert run["steps"] == STEPS and run["params_moved"] > 1e-3
    for k in one:
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)  # one state, gathered whole
        np.testing.assert_allclose(p0[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_array_equal(back[k], p0[k], err_msg=k)  # restored exactly
    assert restored["steps"] == STEPS
    for k in one:
        np.testing.assert_array_equal(np.asarray(exported[k]), p0[k], err_msg=k)


@pytest.mark.slow
def test_the_documented_cli_launch_on_two_processes_matches_one_process(tmp_path):
    """docs/pods.md's launch: the same ``jaxtl finetune --distributed --mesh fsdp=8`` on 2
    processes x 4 CPU devices (found through the ``JAXTL_*`` variables), against the command
    without ``--distributed`` in one 8-device process. Each loads the model onto the global
    mesh (its load report says what one device holds), trains the pretrained and the scratch
    arm, and reports the same test metrics. The pretrained arm's best validation is not its last
    step, so its fit ends reading the best params back (a partial restore, without the optimizer
    state) on both meshes."""
    model_dir = make_tiny_bert(str(tmp_path / "bert"), layers=1)
    port = _free_port()
    command = ["jaxtl.cli", "finetune", "--model", model_dir, "--mesh", "fsdp=8"]
    command += ["--max-steps", "6", "--eval-every", "2", "--lr", "3e-2"]
    command += ["--batch-size", "16", "--recipe", "full"]

    def env(i: int) -> dict:
        return _env(4) | dict(
            JAXTL_COORDINATOR=f"127.0.0.1:{port}", JAXTL_NUM_PROCESSES="2", JAXTL_PROCESS_ID=str(i)
        )

    two = [*command, "--distributed", "--out", str(tmp_path / "two")]
    procs = [_Proc(f"cli{i}", two, env(i), str(tmp_path), script="-m") for i in range(2)]
    one = [*command, "--out", str(tmp_path / "one")]
    procs.append(_Proc("cli-ref", one, _env(8), str(tmp_path), script="-m"))
    outputs = _run_all(procs, TIMEOUT_S, parse=False)
    for out in outputs:
        assert "placed on   mesh data=1,fsdp=8,tensor=1: one device holds" in out
    summaries = []
    for name in ("two", "one"):
        with open(tmp_path / name / "summary.json") as f:
            summaries.append({r["name"]: r for r in json.load(f)["results"]})
    dist, ref = summaries
    assert set(dist) == set(ref) == {"pretrained full", "scratch full"}
    assert dist["pretrained full"]["best"]["step"] == ref["pretrained full"]["best"]["step"] == 2
    for arm, run in ref.items():
        assert dist[arm]["steps"] == run["steps"] == 6
        assert dist[arm]["test"]["examples"] == run["test"]["examples"]
        assert dist[arm]["test"]["accuracy"] == run["test"]["accuracy"], arm
        assert dist[arm]["test"]["loss"] == pytest.approx(run["test"]["loss"], rel=1e-5), arm
    assert "distributed (jaxtl): process 0 of 2, 4 local of 8 devices" in procs[0].output()[1]

    # The same launch again without --resume: both processes refuse (process 0 looks at the
    # shared files and tells the other), before the model loads and with every file as it was.
    saved = files_under(tmp_path / "two")
    port = _free_port()
    again = [_Proc(f"again{i}", two, env(i), str(tmp_path), script="-m") for i in range(2)]
    for proc in again:
        proc.popen.wait(timeout=TIMEOUT_S)
    errs = [proc.output()[1] for proc in again]
    assert [proc.popen.returncode for proc in again] == [2, 2], errs
    assert f"({tmp_path / 'two' / 'summary.json'}), which writing there" in errs[0]
    assert "(found by process 0), which writing there would replace" in errs[1]
    assert all("Continue it with --resume" in e for e in errs)
    assert not any("LoadReport" in proc.output()[0] for proc in again)  # refused before loading
    assert files_under(tmp_path / "two") == saved


@pytest.mark.slow
def test_latest_and_best_saved_back_to_back_from_two_processes(tmp_path):
    """Both managers save every step from 2 processes with nothing in between. Before each
    manager had barrier names of its own (``checkpoint._own_barriers``), their background
    threads met at the same orbax barrier and every such run died ("Barrier ... is already
    ongoing"); CI once lost the FSDP test above to it."""
    port, saves = _free_port(), 12
    procs = [
        _Proc(f"saver{i}", [tmp_path / "ckpt", i, port, saves], _env(2), str(tmp_path), SAVES)
        for i in range(2)
    ]
    for summary in _run_all(procs, 120):  # a regression hangs: fail sooner than TIMEOUT_S
        assert summary == {
            "latest_step": saves,
            "best_step": saves,
            "latest_equal": True,
            "best_equal": True,
        }


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_checkpointed_step(tmp_path):
    """A preemption notice reaches one host of a pod: jax's sync point has every process stop
    after the same step, which both checkpoint (each its shards) before exiting 0; one process
    then resumes it to the end."""
    model_dir = make_tiny_bert(str(tmp_path / "bert"), layers=1)
    run, port = str(tmp_path / "run"), _free_port()
    procs = [
        _Proc(f"preempt{i}", [model_dir, run, i, 2, port], _env(2), str(tmp_path), PREEMPT)
        for i in range(2)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    latest = os.path.join(run, "checkpoints", "latest")
    while time.monotonic() < deadline and all(p.popen.poll() is None for p in procs):
        if os.path.isdir(os.path.join(latest, "10")):  # mid-run: 60 steps in all
            break
        time.sleep(0.05)
    procs[1].popen.send_signal(signal.SIGTERM)
    summaries = _run_all(procs, 120)
    steps = {s["preempted"] for s in summaries}
    assert len(steps) == 1, summaries
    (step,) = steps
    assert 10 <= step < 60 and all(s["signal"] == "SIGTERM" for s in summaries)
    assert all(s["committed"][-1] == step for s in summaries)
    (resumed,) = _run_all(
        [_Proc("resume", [model_dir, run, 0, 1, 0], _env(4), str(tmp_path), PREEMPT)], TIMEOUT_S
    )
    assert resumed["finished"] == 60 and resumed["committed"][-1] == 60


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_stopped_peer_ends_the_other_process_within_the_heartbeat(tmp_path, fault):
    """One of two processes dies (SIGKILL) or hangs (SIGSTOP: its heartbeats stop too) mid-run:
    the other, blocked in the step's collectives, ends within the heartbeat timeout
    (``JAXTL_HEARTBEAT_S``) instead of waiting forever, and the checkpoints committed before
    stay whole. A hung peer keeps its sockets open, so only the coordination service can end
    the survivor: its error names the lost task. After a kill, CI once saw the collectives'
    transport (gloo) abort the survivor first ("Received data size doesn't match expected
    size"; why was not established: 14 probes of the same kill all ended by the heartbeat),
    so for SIGKILL a gloo error is accepted too."""
    model_dir = make_tiny_bert(str(tmp_path / "bert"), layers=1)
    run, port, heartbeat = str(tmp_path / "run"), _free_port(), 10
    env = {**_env(2), "JAXTL_HEARTBEAT_S": str(heartbeat)}
    procs = [
        _Proc(f"peer{i}", [model_dir, run, i, 2, port], env, str(tmp_path), PREEMPT)
        for i in range(2)
    ]
    try:
        _wait_for_checkpoint(procs, os.path.join(run, "checkpoints", "latest", "10"))
        os.kill(procs[1].popen.pid, getattr(signal, fault))
        hit = time.monotonic()
        procs[0].popen.wait(timeout=heartbeat + 60)
        ended_after = time.monotonic() - hit
    finally:
        for p in procs:
            p.kill()
    err = procs[0].output()[1]
    assert procs[0].popen.returncode != 0
    assert ended_after < heartbeat + 60
    # jax's words: "The following tasks are unhealthy (stopped sending heartbeats):\n1"
    named = re.search(r"stopped sending heartbeats\):\s*1\b", err)
    transport = fault == "SIGKILL" and re.search(
        r"gloo::(EnforceNotMet|IoException)|Connection (closed|reset) by peer", err
    )
    assert named or transport, err[-3000:]
    steps = [int(n) for n in os.listdir(os.path.join(run, "checkpoints", "latest")) if n.isdigit()]
    assert steps and max(steps) >= 10


def _wait_for_checkpoint(procs, path: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and all(p.popen.poll() is None for p in procs):
        if os.path.isdir(path):
            return
        time.sleep(0.05)
    pytest.fail(f"no checkpoint at {path} before the processes ended or {TIMEOUT_S} s passed")


def test_no_coordinator_is_an_error_that_lists_what_was_looked_for():
    from jaxtl import distributed

    with pytest.raises(ValueError) as e:
        distributed.find_cluster({}, tpu_files=())
    for name in (*distributed.EXPLICIT, *distributed.SLURM, *distributed.TPU):
        assert name in str(e.value)
    assert "docs/pods.md" in str(e.value)
    with pytest.raises(ValueError, match=r"JAXTL_PROCESS_ID not set"):
        distributed.find_cluster({"JAXTL_COORDINATOR": "h:1", "JAXTL_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match=r"'h' is not host:port"):
        distributed.find_cluster(
            {"JAXTL_COORDINATOR": "h", "JAXTL_NUM_PROCESSES": "2", "JAXTL_PROCESS_ID": "0"}
        )
    with pytest.raises(ValueError, match=r"JAXTL_PROCESS_ID=2 must be in \[0, "):
        distributed.find_cluster(
            {"JAXTL_COORDINATOR": "h:1", "JAXTL_NUM_PROCESSES": "2", "JAXTL_PROCESS_ID": "2"}
        )
    slurm = {name: "1" for name in distributed.SLURM}
    assert distributed.find_cluster(slurm) == {"source": "slurm"}


def test_cli_distributed_needs_out_and_a_coordinator(capsys, tmp_path, monkeypatch):
    from jaxtl import cli, distributed

    for name in (*distributed.EXPLICIT, *distributed.SLURM, *distributed.TPU):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "TPU_DEVICE_FILES", ())  # on a TPU host, there are some
    assert cli.main(["finetune", "--distributed"]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert cli.main(["finetune", "--distributed", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no multi-process run found" in err and "SLURM_PROCID" in err
    assert not os.path.exists(tmp_path / "o")
