"""Grouped convolutions on CPU: XLA's kernel gradient against jaxtl's tap-by-tap matmuls
(``jaxtl.models.conv.conv_general_dilated``: ResNeXt's grouped 3x3 layers, wav2vec2's
positional convolution).

Two parts, each printing the ratio xla / jaxtl (above 1: jaxtl's is faster):

* **layers** (one process, the two kinds alternating per round): forward + backward (the input's
  and the kernel's gradients) of each distinct grouped layer of ResNeXt-50 (32x4d) at the given
  batch and image size, and of wav2vec2-base's positional convolution (768 channels, 16 groups,
  kernel 128) over 5 s of audio (250 frames) at batch 4; the median of ``--repeats`` calls.
* **model** (a fresh process per run, the two kinds alternating): the gradient of a
  cross-entropy loss through a whole model with random weights of the real architecture:
  ResNeXt-50 32x4d (torchvision's names and shapes, 10-class head; BatchNorm in inference mode,
  jaxtl's default) and wav2vec2-base (transformers' default config, 2 s of audio): compile
  seconds (no compilation cache) and the median step.

The xla arm is ``lax.conv_general_dilated(..., feature_group_count=G)`` differentiated by JAX,
what ``flax.linen.Conv`` runs; both arms run the same module, only the function under it
differs (forward and input gradient are the same XLA ops in both).

Usage:
  python benchmarks/grouped_conv.py [--size 112] [--batch 8] [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from depthwise_conv import alternate, time_gradient  # noqa: E402  (the same model part)
from scale import _machine  # noqa: E402  (the machine line every benchmark here prints)

KINDS = ("xla", "jaxtl")
MODELS = ("resnext50_32x4d", "wav2vec2-base")


def _use(kind: str) -> None:
    """The xla arm: the families' grouped layers run plain ``lax.conv_general_dilated``."""
    if kind == "xla":
        from jax import lax

        from jaxtl.models import resnet, wav2vec2

        resnet.conv_general_dilated = wav2vec2.conv_general_dilated = lax.conv_general_dilated


def resnext_shapes(size: int) -> list[tuple[int, int, int]]:
    """(input size, channels, stride) of each distinct grouped 3x3 layer of ResNeXt-50 32x4d
    for ``size`` px inputs: the stem and its pool divide the size by 4; each stage's first
    block strides 2 (but the first stage's)."""
    hw, shapes = -(-size // 4), []
    for stage, inner in enumerate((128, 256, 512, 1024)):
        if stage:
            shapes.append((hw, inner, 2))
            hw = -(-hw // 2)
        shapes.append((hw, inner, 1))
    return shapes


def layers_part(batch: int, size: int, repeats: int, rounds: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from jaxtl.models import conv

    cases = [
        ("resnext50_32x4d", batch, (hw, hw), c, (3, 3), s, 32, (1, 1))
        for hw, c, s in resnext_shapes(size)
    ]
    cases.append(("wav2vec2-base", 4, (250,), 768, (128,), 1, 16, (64,)))  # fmt: skip
    rows = []
    for model, b, spatial, c, k, s, groups, pad in cases:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((b, *spatial, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((*k, c // groups, c)) * 0.01, jnp.float32)
        dims = ("NHWC", "HWIO", "NHWC") if len(spatial) == 2 else ("NWC", "WIO", "NWC")
        options = dict(window_strides=(s,) * len(spatial), padding=[(p, p) for p in pad],
                       dimension_numbers=dims, feature_group_count=groups)  # fmt: skip
        steps = {}
        for kind, fn in (("xla", lax.conv_general_dilated), ("jaxtl", conv.conv_general_dilated)):
            loss = lambda x, w, fn=fn, o=options: jnp.sum(jnp.sin(fn(x, w, **o)))  # noqa: E731
            steps[kind] = jax.jit(jax.grad(loss, argnums=(0, 1)))
            jax.block_until_ready(steps[kind](x, w))
        times = {kind: [] for kind in KINDS}
        for _ in range(rounds):
            for kind in KINDS:
                for _ in range(repeats):
                    t = time.perf_counter()
                    jax.block_until_ready(steps[kind](x, w))
                    times[kind].append(time.perf_counter() - t)
        med = {kind: statistics.median(v) * 1e3 for kind, v in times.items()}
        rows.append({"model": model, "batch": b, "input": "x".join(map(str, (*spatial, c))),
                     "kernel": "x".join(map(str, k)), "stride": s, "groups": groups,
                     "xla_ms": med["xla"], "jaxtl_ms": med["jaxtl"]})  # fmt: skip
    return rows


def _resnext50_file(directory: str) -> str:
    """Random weights under torchvision's ResNeXt-50 32x4d names and shapes."""
    import numpy as np
    import safetensors.numpy

    rng = np.random.default_rng(0)
    t = {}

    def conv_bn(name, bn, out, inp, k):
        fan_in = inp * k * k
        t[f"{name}.weight"] = (rng.standard_normal((out, inp, k, k)) / np.sqrt(fan_in)).astype(
            np.float32
        )
        t[f"{bn}.weight"] = np.ones(out, np.float32)
        t[f"{bn}.bias"] = np.zeros(out, np.float32)
        t[f"{bn}.running_mean"] = np.zeros(out, np.float32)
        t[f"{bn}.running_var"] = np.ones(out, np.float32)
        t[f"{bn}.num_batches_tracked"] = np.array(0, np.int64)

    conv_bn("conv1", "bn1", 64, 3, 7)
    inp = 64
    stages = zip((3, 4, 6, 3), (128, 256, 512, 1024), strict=True)  # blocks, grouped width
    for stage, (blocks, inner) in enumerate(stages, start=1):
        out = inner * 2
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            conv_bn(f"{p}.conv1", f"{p}.bn1", inner, inp, 1)
            conv_bn(f"{p}.conv2", f"{p}.bn2", inner, inner // 32, 3)
            conv_bn(f"{p}.conv3", f"{p}.bn3", out, inner, 1)
            if i == 0:
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", out, inp, 1)
            inp = out
    t["fc.weight"] = (rng.standard_normal((1000, inp)) * 0.01).astype(np.float32)
    t["fc.bias"] = np.zeros(1000, np.float32)
    path = os.path.join(directory, "resnext50_32x4d.safetensors")
    safetensors.numpy.save_file(t, path)
    return path


def _wav2vec2_base_dir(directory: str) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(num_labels=10)  # wav2vec2-base's architecture
    transformers.Wav2Vec2ForSequenceClassification(config).save_pretrained(directory)
    return directory


def _child(kind: str, model_name: str, size: int, batch: int, steps: int) -> None:
    _use(kind)
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxtl

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        if model_name == "resnext50_32x4d":
            model = jaxtl.load(_resnext50_file(tmp), num_labels=10, image_size=size)
            assert model.config.arch == "resnext50_32x4d", model.config.arch
            batch_ = {"pixel_values": rng.standard_normal((batch, size, size, 3))}
        else:
            model = jaxtl.load(_wav2vec2_base_dir(tmp), num_labels=10)
            batch_ = {"input_values": rng.standard_normal((batch, 32000))}  # 2 s at 16 kHz
    batch_ = {k: jnp.asarray(v, jnp.float32) for k, v in batch_.items()}
    labels = jnp.asarray(rng.integers(0, 10, batch))
    extra = {"batch_stats": model.batch_stats} if model.batch_stats else {}

    def loss(params):
        logits = model.apply(params, batch_, **extra)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    time_gradient(loss, model.params, steps)


def model_part(model: str, size: int, batch: int, rounds: int, steps: int) -> dict:
    args = ["--child-model", model, "--size", size, "--batch", batch, "--steps", steps]
    return alternate(__file__, args, KINDS, rounds)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=112, help="ResNeXt image size in px")
    p.add_argument("--batch", type=int, default=8, help="ResNeXt batch (wav2vec2: 4)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (processes per kind)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per layer and round")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model process")
    p.add_argument("--skip-layers", action="store_true", help="only the whole-model part")
    p.add_argument("--skip-models", action="store_true", help="only the layers part")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--child-model", choices=MODELS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a.child, a.child_model, a.size, a.batch, a.steps)
        return
    print(f"machine: {_machine()}")
    result = {"machine": _machine(), "layers": [], "models": {}}
    if not a.skip_layers:
        rows = layers_part(a.batch, a.size, a.repeats, a.rounds)
        result["layers"] = rows
        print(f"\nforward + backward of each grouped layer (ms, median); ResNeXt at {a.size} px")
        print("| model | batch | input | kernel/stride | groups | xla | jaxtl | xla / jaxtl |")
        print("|---|---:|---|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['batch']} | {r['input']} | {r['kernel']}/{r['stride']} | "
                  f"{r['groups']} | {r['xla_ms']:.1f} | {r['jaxtl_ms']:.1f} | "
                  f"{r['xla_ms'] / r['jaxtl_ms']:.1f} |", flush=True)  # fmt: skip
    if not a.skip_models:
        print("\ngradient step of the whole model, own process per run (median)")
        print("| model | input | compile s, xla | jaxtl | step ms, xla | jaxtl | xla / jaxtl |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for model in MODELS:
            batch = a.batch if model == "resnext50_32x4d" else 4
            m = model_part(model, a.size, batch, a.rounds, a.steps)
            result["models"][model] = m
            x, j = m["xla"], m["jaxtl"]
            shape = f"{batch}x{a.size}px" if model == "resnext50_32x4d" else f"{batch}x2s"
            print(f"| {model} | {shape} | {x['compile_s']:.1f} | {j['compile_s']:.1f} | "
                  f"{x['step_ms']:.0f} | {j['step_ms']:.0f} | "
                  f"{x['step_ms'] / j['step_ms']:.1f} |", flush=True)  # fmt: skip
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
