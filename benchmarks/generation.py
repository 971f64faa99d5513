"""Generation speed with the KV cache vs without, on a GPT-2-small-shaped decoder.

The model is GPT-2 small's shape (12 layers, 12 heads, width 768, vocabulary 50257, 1024
positions) with random weights (``jaxtl.load(..., pretrained=False)``; speed does not depend on
the values). Both sides run :func:`jaxtl.generate` on the same prompts, greedy, with no early
stop, so each appends exactly ``--new-tokens`` tokens per row:

- ``cache``: the prompt runs once and each new token is one token's forward pass over the
  cached keys and values;
- ``no cache``: each new token re-runs the whole fixed-size buffer (prompt + new tokens), the
  jitted loop without a cache (one compile, no per-length recompiles).

Each side's first call compiles; the script times it, then ``--repeats`` more calls, alternating
the sides, and reports the median. Tokens/s counts new tokens of every row. The greedy tokens of
both sides are compared (they should agree; a near-tie of the random weights' logits can make
them part).

With ``--torch``, the same config in transformers + PyTorch (``generate`` with
``use_cache=True`` and ``False``; its uncached loop re-runs the growing prefix) is timed as
context, in its own child process so neither framework's threads meet the other's.

Run from the repository root (results and the machine they came from: benchmarks/README.md)::

    timeout 30m python benchmarks/generation.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFIG = {
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}


def _machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
    return f"CPU {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"


def _prompts(batch: int, length: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, 50256, size=(batch, length))


def _torch(args) -> dict:
    """transformers' generate with and without its cache (run in a child process)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)).eval()
    ids = torch.from_numpy(_prompts(args.batch, args.prompt))
    times: dict[str, list[float]] = {"cache": [], "no cache": []}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, use_cache in (("cache", True), ("no cache", False)):
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    use_cache=use_cache,
                    pad_token_id=0,
                )
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--new-tokens", type=int, default=256, help="tokens appended to each prompt")
    p.add_argument("--prompt", type=int, default=32, help="prompt length")
    p.add_argument("--batch", type=int, default=1, help="prompts generated together")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per side after the first")
    p.add_argument("--torch", action="store_true", help="also time transformers + PyTorch")
    p.add_argument("--child-torch", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_torch:
        print(json.dumps(_torch(a)))
        return

    import jax
    import numpy as np

    import jaxtl

    print(f"{_machine()}, jax {jax.__version__}")
    print(
        f"GPT-2 small shape, random weights; batch {a.batch}, prompt {a.prompt}, "
        f"{a.new_tokens} new tokens, greedy"
    )
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(CONFIG, f)
        model = jaxtl.load(directory, task="causal_lm", pretrained=False)
    ids = _prompts(a.batch, a.prompt)
    sides = {"cache": True, "no cache": False}
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in sides}
    tokens: dict[str, np.ndarray] = {}

    def call(use_cache: bool) -> float:
        start = time.perf_counter()
        out = jaxtl.generate(
            model, None, ids, max_new_tokens=a.new_tokens, eos_token_id=None, use_cache=use_cache
        )
        elapsed = time.perf_counter() - start
        tokens["cache" if use_cache else "no cache"] = out
        return elapsed

    for name, use_cache in sides.items():
        first[name] = call(use_cache)
    for _ in range(a.repeats):
        for name, use_cache in sides.items():
            times[name].append(call(use_cache))

    new = a.batch * a.new_tokens
    print(f"\n| side | first call (compile + run), s | run, s (median of {a.repeats}) | tokens/s |")
    print("|---|---|---|---|")
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in sides:
        print(
            f"| jaxtl, {name} | {first[name]:.2f} | {median[name]:.2f} | {new / median[name]:.1f} |"
        )
    if a.torch:
        child = subprocess.run(
            [sys.executable, __file__, "--child-torch", *(argv or sys.argv[1:])],
            check=True,
            capture_output=True,
            text=True,
        )
        theirs = json.loads(child.stdout.strip().splitlines()[-1])
        for name, seconds in theirs.items():
            print(f"| transformers + PyTorch, {name} | | {seconds:.2f} | {new / seconds:.1f} |")
    agree = float(np.mean(tokens["cache"][:, a.prompt :] == tokens["no cache"][:, a.prompt :]))
    ratio = median["no cache"] / median["cache"]
    print(f"\nnew tokens equal with and without the cache: {agree:.1%}")
    print(f"speed-up of the cache (tokens/s with / without): {ratio:.1f}x (target >= 5x)")
    if a.torch:
        print(f"transformers' own cache speed-up: {theirs['no cache'] / theirs['cache']:.1f}x")
        print(f"jaxtl cache vs transformers cache: {theirs['cache'] / median['cache']:.2f}x")


if __name__ == "__main__":
    main()
