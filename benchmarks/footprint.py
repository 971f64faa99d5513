"""Peak memory of a full fine-tune, jaxtl vs transformers + PyTorch, and jaxtl's compile times.

**Memory.** Each side trains MiniLM-L6 (all 22.6 M params, AdamW, clipping at 1.0, dropout 0.1)
for ``--steps`` steps on the same batch (32 x 128 tokens of VADER text, made once by the parent
and handed to the children as an ``.npz``), each in a fresh process that imports only its own
framework: jaxtl's real step (``step_time.JaxtlSide``), and transformers' ``AutoModel`` + mean
pooling + dropout + ``Linear`` with ``torch.optim.AdamW``. Each side holds the checkpoint's
tokenizer, as a fine-tune does (jaxtl's loaded model keeps it). jaxtl runs twice: as it does by
default (the loaded model keeps its params beside the train state's copy) and with
``release_pretrained`` (``--release-pretrained``: the state's copy is the only one, as in
PyTorch's loop). Each child reports its own peak
resident set (``getrusage(RUSAGE_SELF).ru_maxrss``: the whole process, libraries included)
and its resident set after loading, before the first step. The sides alternate over
``--rounds`` rounds.

**Compile.** For each recipe, jaxtl's train step is traced, lowered and compiled in a fresh
process twice: cold (an empty persistent compilation cache directory) and warm (the same
directory again, as a second ``jaxtl finetune`` on the same shapes finds it). Each also reports
the host memory the executable holds once compiled (glibc's bytes in use, ``mallinfo2``, after
``malloc_trim``, with the lowered program dropped: Linux only), the number of instructions
of its optimized HLO, which that memory follows, and the step's working memory (XLA's
``memory_analysis()`` temporaries: what each step allocates while it runs, beyond its
arguments and outputs).

Run from the repository root (results: benchmarks/README.md)::

    timeout 20m python benchmarks/footprint.py --json /tmp/footprint.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import step_time  # noqa: E402  (the batch, the jaxtl side; imports no framework itself)

RECIPES = ("full", "last_n(2)", "linear_probe")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------------- children


def child_jaxtl(args: argparse.Namespace, batch: dict) -> dict:
    side = step_time.JaxtlSide(step_time.model_path(args.model), args.recipe, batch, args)
    del side.host_params  # the benchmark's host copy for torch, not part of a jaxtl run
    t0 = time.perf_counter()
    times = side.compile()
    wall = time.perf_counter() - t0
    loaded = _rss_mib()
    losses = [side.step()[1] for _ in range(args.steps)]
    return {"loaded_mib": loaded, "peak_mib": _peak_mib(), "losses": losses, **times,
            "compile_wall_s": wall}  # fmt: skip


def child_jaxtl_released(args: argparse.Namespace, batch: dict) -> dict:
    args.release_pretrained = True
    return child_jaxtl(args, batch)


def child_torch(args: argparse.Namespace, batch: dict) -> dict:
    import tokenizers
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    path = step_time.model_path(args.model)
    # A fine-tune holds its tokenizer: jaxtl's loaded model does (extras["tokenizer"]), and so
    # does the PyTorch loop of time_to_accuracy.py, from this same file.
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    bert = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
    head = torch.nn.Linear(bert.config.hidden_size, 2)
    dropout = torch.nn.Dropout(bert.config.hidden_dropout_prob)
    params = list(bert.parameters()) + list(head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=5e-5,
    )
    inputs = {
        k: torch.from_numpy(batch[k].astype(np.int64))
        for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    labels = torch.from_numpy(batch["label"].astype(np.int64))
    bert.train()
    loaded = _rss_mib()
    losses = []
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        hidden = bert(**inputs).last_hidden_state
        w = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
        loss = torch.nn.functional.cross_entropy(head(dropout(pooled)), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    return {"loaded_mib": loaded, "peak_mib": _peak_mib(), "losses": losses,
            "vocabulary": tokenizer.get_vocab_size()}  # fmt: skip


def child_compile(args: argparse.Namespace, batch: dict) -> dict:
    import jax

    # Cache every executable, however quick to compile, so that warm means warm.
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    side = step_time.JaxtlSide(step_time.model_path(args.model), args.recipe, batch, args)
    t0 = time.perf_counter()
    lowered = side.train_step.lower(side.state, side.batch)
    t1 = time.perf_counter()
    before = _heap_in_use_mib()
    t2 = time.perf_counter()
    compiled = lowered.compile()  # from the persistent cache where it is warm
    t3 = time.perf_counter()
    del lowered
    after = _heap_in_use_mib()
    out = {"trace_lower_s": t1 - t0, "compile_s": t3 - t2, "compile_wall_s": t3 - t0 - (t2 - t1)}
    if before is not None:
        out["executable_heap_mib"] = after - before
    out["hlo_instructions"] = sum(" = " in line for line in compiled.as_text().splitlines())
    out["working_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    return out


def _heap_in_use_mib() -> float | None:
    """glibc's bytes in use (``mallinfo2().uordblks``) after a garbage collection and a
    ``malloc_trim``, or None without glibc."""
    import ctypes
    import gc

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]  # fmt: skip

    try:
        libc = ctypes.CDLL(None)
        mallinfo2, trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    mallinfo2.restype = MallInfo2
    gc.collect()
    trim(0)
    return mallinfo2().uordblks / 2**20


# --------------------------------------------------------------------------------- parent


def spawn(part: str, batch_file: str, args: argparse.Namespace, **extra: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", part, "--batch-file", batch_file]
    cmd += ["--steps", str(args.steps), "--seed", str(args.seed)]
    cmd += ["--model", args.model] if args.model else []
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", value]
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the compile child sets its own
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{part} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(batch_file: str, args: argparse.Namespace) -> dict:
    sides = ("jaxtl", "jaxtl_released", "torch")
    runs = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            out = spawn(side, batch_file, args, recipe="full")
            runs[side].append(out)
            print(
                f"round {r + 1}/{args.rounds} {side}: after loading {out['loaded_mib']:.0f} MiB, "
                f"peak {out['peak_mib']:.0f} MiB, mean loss {statistics.mean(out['losses']):.4f}",
                flush=True,
            )
    peak = {s: statistics.median(o["peak_mib"] for o in v) for s, v in runs.items()}
    loaded = {s: statistics.median(o["loaded_mib"] for o in v) for s, v in runs.items()}
    print(f"\npeak RSS of {args.steps} full fine-tune steps (median of {args.rounds}):")
    for side in sides:
        print(
            f"  {side:15s} peak {peak[side]:6.0f} MiB ({peak[side] / peak['torch']:.2f}x torch's; "
            f"target <= 1.00), growth from loaded to peak {peak[side] - loaded[side]:.0f} MiB",
            flush=True,
        )
    return {"runs": runs, "peak_mib": peak, "loaded_mib": loaded}


def compile_times(batch_file: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    for recipe in args.recipes:
        with tempfile.TemporaryDirectory(prefix="jaxtl-compile-cache-") as cache:
            cold = spawn("compile", batch_file, args, recipe=recipe, cache_dir=cache)
            warm = spawn("compile", batch_file, args, recipe=recipe, cache_dir=cache)
        row = {"recipe": recipe, "cold": cold, "warm": warm}
        rows.append(row)
        heap = ""
        if "executable_heap_mib" in cold:
            heap = (
                f"; executable {cold['executable_heap_mib']:.0f} MiB compiled, "
                f"{warm['executable_heap_mib']:.0f} MiB from the cache"
            )
        print(
            f"{recipe}: cold trace+lower {cold['trace_lower_s']:.1f} s + compile "
            f"{cold['compile_s']:.1f} s; warm trace+lower {warm['trace_lower_s']:.1f} s + "
            f"compile {warm['compile_s']:.1f} s; {cold['hlo_instructions']} HLO "
            f"instructions{heap}; the step's working memory {cold['working_mib']:.0f} MiB",
            flush=True,
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=5, help="train steps per memory child")
    p.add_argument("--rounds", type=int, default=2, help="processes per side for memory")
    p.add_argument("--recipes", default=",".join(RECIPES), help="recipes whose compile to time")
    p.add_argument("--part", choices=("both", "memory", "compile"), default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model directory (default: embedded MiniLM-L6)")
    p.add_argument("--json", metavar="PATH", default=None)
    for hidden in ("--child", "--batch-file", "--recipe", "--cache-dir"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1")
    # JaxtlSide reads batch_size; threads is TorchSide's
    args.batch_size, args.threads = 32, len(os.sched_getaffinity(0))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        batch = dict(np.load(args.batch_file))
        child = {
            "jaxtl": child_jaxtl,
            "jaxtl_released": child_jaxtl_released,
            "torch": child_torch,
            "compile": child_compile,
        }
        print(json.dumps(child[args.child](args, batch)), flush=True)
        return 0

    batch, _ = step_time.batch_for(step_time.model_path(args.model), 32, 128, args.seed)
    out = {"load_average_at_start": os.getloadavg()}
    print(f"load average at start: {out['load_average_at_start']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = os.path.join(tmp, "batch.npz")
        np.savez(batch_file, **batch)
        if args.part in ("both", "memory"):
            out["memory"] = memory(batch_file, args)
        if args.part in ("both", "compile"):
            out["compile"] = compile_times(batch_file, args)
    out["load_average_at_end"] = os.getloadavg()
    print(f"load average at end: {out['load_average_at_end']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
