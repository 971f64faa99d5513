"""Depthwise convolutions on CPU: XLA's grouped convolution against jaxtl's shifted multiply-adds
(``jaxtl.models.conv.DepthwiseConv``, EfficientNet's and ConvNeXt's depthwise layers).

Two parts, each printing the ratio grouped / shifted (above 1: jaxtl's is faster):

* **layers** (one process, the two kinds alternating per round): forward + backward (the input's
  and the kernel's gradients) of every depthwise layer of EfficientNet-Lite0 at the given batch
  and image size, shapes taken from jaxtl's own config of the model, and of ConvNeXt-Tiny's four
  7x7 stages at 224 px; the median of ``--repeats`` calls each.
* **model** (a fresh process per run, the two kinds alternating): the real EfficientNet-Lite0
  (ImageNet weights, 10-class head), the gradient of a cross-entropy loss in training mode
  (dropout, drop-connect, BatchNorm batch statistics) at batch 32: compile seconds (no
  compilation cache) and the median step.

The grouped arm is ``lax.conv_general_dilated(..., feature_group_count=C)``, what
``flax.linen.Conv`` runs; both arms run the same module, only the function under it differs.

Usage:
  python benchmarks/depthwise_conv.py [--sizes 32,128] [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import _machine  # noqa: E402  (the machine line every benchmark here prints)

KINDS = ("grouped", "shifted")


def _grouped(x, kernel, strides, padding):
    from jax import lax

    from jaxtl.models import conv

    pads = conv._pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )  # fmt: skip


def _use(kind: str) -> None:
    from jaxtl.models import conv

    if kind == "grouped":
        conv.depthwise_conv = _grouped


def lite0_shapes(size: int) -> list[tuple[int, int, int, int]]:
    """(spatial size, channels, kernel, stride) of each EfficientNet-Lite0 depthwise layer for
    ``size`` px inputs, from jaxtl's config of the model (the stem halves the size)."""
    from jaxtl.models.efficientnet import EfficientNetConfig

    hw, shapes = -(-size // 2), []
    for b in EfficientNetConfig(arch="efficientnet-lite0").blocks:
        shapes.append((hw, b.in_channels * b.expand_ratio, b.kernel, b.stride))
        hw = -(-hw // b.stride)
    return shapes


def layers_part(batch: int, size: int, repeats: int, rounds: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtl.models import conv

    shifted = conv.depthwise_conv
    cases = [("lite0", batch, *s) for s in lite0_shapes(size)]
    cases += [
        ("convnext-tiny", 8, hw, c, 7, 1) for hw, c in ((56, 96), (28, 192), (14, 384), (7, 768))
    ]
    rows = []
    for model, b, hw, c, k, s in cases:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((b, hw, hw, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, 1, c)), jnp.float32)
        times = {kind: [] for kind in KINDS}
        steps = {}
        for kind, fn in (("grouped", _grouped), ("shifted", shifted)):
            loss = lambda x, w, fn=fn, s=s: jnp.sum(jnp.sin(fn(x, w, (s, s), "SAME")))  # noqa: E731
            steps[kind] = jax.jit(jax.grad(loss, argnums=(0, 1)))
            jax.block_until_ready(steps[kind](x, w))
        for _ in range(rounds):
            for kind in KINDS:
                for _ in range(repeats):
                    t = time.perf_counter()
                    jax.block_until_ready(steps[kind](x, w))
                    times[kind].append(time.perf_counter() - t)
        med = {kind: statistics.median(v) * 1e3 for kind, v in times.items()}
        shape = {"model": model, "batch": b, "hw": hw, "channels": c, "kernel": k, "stride": s}
        rows.append({**shape, "grouped_ms": med["grouped"], "shifted_ms": med["shifted"]})
    return rows


def _child(kind: str, size: int, steps: int) -> None:
    _use(kind)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxtl
    from jaxtl.models.common import batch_norm_paths

    model = jaxtl.load(jaxtl.efficientnet_lite0_path(), num_labels=10, image_size=size)
    rng = np.random.default_rng(0)
    batch = {"pixel_values": jnp.asarray(rng.standard_normal((32, size, size, 3)), jnp.float32)}
    labels = jnp.asarray(rng.integers(0, 10, 32))
    bn = batch_norm_paths(model.batch_stats)

    def loss(params):
        logits, _ = model.forward(
            params, model.batch_stats, batch, train=True, rng=jax.random.key(0), bn_train=bn
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    time_gradient(loss, model.params, steps)


def time_gradient(loss, params, steps: int) -> None:
    """Print, as one JSON line, the seconds ``jax.jit(jax.grad(loss))`` takes to compile and
    the median milliseconds of ``steps`` calls after a first one (a child process's result)."""
    import jax

    t = time.perf_counter()
    step = jax.jit(jax.grad(loss)).lower(params).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(step(params))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(step(params))
        times.append(time.perf_counter() - t)
    print(json.dumps({"compile_s": compile_s, "step_ms": statistics.median(times) * 1e3}))


def alternate(script: str, args, kinds, rounds: int) -> dict:
    """Run ``script --child KIND *args`` once per kind and round, the kinds' order reversed
    every other round, each a fresh process without a compilation cache; the median of each
    :func:`time_gradient` key per kind."""
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    runs = {kind: [] for kind in kinds}
    for r in range(rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            cmd = [sys.executable, script, "--child", kind, *map(str, args)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        kind: {key: statistics.median(run[key] for run in rs) for key in ("compile_s", "step_ms")}
        for kind, rs in runs.items()
    }


def model_part(size: int, rounds: int, steps: int) -> dict:
    return alternate(__file__, ["--sizes", size, "--steps", steps], KINDS, rounds)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="32,128", help="EfficientNet image sizes, comma-separated")
    p.add_argument("--batch", type=int, default=32, help="the layers part's EfficientNet batch")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (processes per kind)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per layer and round")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model process")
    p.add_argument("--skip-layers", action="store_true", help="only the whole-model part")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.child:
        _child(a.child, sizes[0], a.steps)
        return
    print(f"machine: {_machine()}")
    result = {"machine": _machine(), "layers": [], "model": {}}
    if not a.skip_layers:
        rows = layers_part(a.batch, sizes[0], a.repeats, a.rounds)
        result["layers"] = rows
        print(f"\nforward + backward of each depthwise layer (ms, median); {sizes[0]} px for Lite0")
        print("| model | batch | input | kernel/stride | grouped | shifted | grouped / shifted |")
        print("|---|---:|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['batch']} | {r['hw']}x{r['hw']}x{r['channels']} | "
                  f"{r['kernel']}/{r['stride']} | {r['grouped_ms']:.2f} | {r['shifted_ms']:.2f} "
                  f"| {r['grouped_ms'] / r['shifted_ms']:.1f} |")  # fmt: skip
        for model in ("lite0", "convnext-tiny"):
            g = sum(r["grouped_ms"] for r in rows if r["model"] == model)
            s = sum(r["shifted_ms"] for r in rows if r["model"] == model)
            print(f"{model}: every depthwise layer, {g:.1f} ms grouped, {s:.1f} ms shifted: "
                  f"{g / s:.1f}x")  # fmt: skip
    print("\nEfficientNet-Lite0 gradient step, batch 32, own process per run (median)")
    print(
        "| size | compile s, grouped | shifted | step ms, grouped | shifted | grouped / shifted |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        m = model_part(size, a.rounds, a.steps)
        result["model"][size] = m
        g, s = m["grouped"], m["shifted"]
        print(f"| {size} | {g['compile_s']:.1f} | {s['compile_s']:.1f} | {g['step_ms']:.0f} | "
              f"{s['step_ms']:.0f} | {g['step_ms'] / s['step_ms']:.1f} |", flush=True)  # fmt: skip
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
