"""Model FLOPs utilization of a jaxtl train step on whatever backend this runs on.

    python benchmarks/mfu.py --model bert-base --precision bf16 --length 512 --batch 32
    python benchmarks/mfu.py --model vit-b16 --precision bf16 --batch 64
    python benchmarks/mfu.py --model bert-small --batch 8 --length 128   # a CPU-sized run

MFU = model FLOPs per step / step time / the backend's peak FLOP/s. Model FLOPs are counted
two ways and both are printed:

- by formula (transformers): ``6 * N * tokens`` for the matmuls of forward + backward over the
  ``N`` non-embedding params, plus ``12 * layers * hidden * T * tokens`` for attention's
  score and context matmuls (``T`` = sequence length, patches + 1 for ViT);
- by XLA: ``compiled.cost_analysis()["flops"]`` of the compiled step (what XLA will execute,
  rematerialization and the optimizer included).

The peak is the vendor's dense bf16 (or float32) figure for known accelerators (H100 / H200
SXM, A100, TPU v4 / v5e / v5p). On a CPU, or any device not in the table, it is measured: the
best of a few large float32 matmuls, which is an upper bound on what the step can reach, so a
CPU MFU is relative to that. The step time is the median of ``--steps`` steps after one
compiling step. Random weights at the real shapes: MFU does not depend on their values.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

CONFIGS = {
    "bert-base": {
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30522,
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 512,
    },
    "bert-small": {
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30522,
        "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 1024, "max_position_embeddings": 512,
    },
    "vit-b16": {
        "model_type": "vit", "architectures": ["ViTForImageClassification"],
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "num_channels": 3,
    },
}  # fmt: skip
# Dense peak FLOP/s per device, from the vendors' data sheets.
PEAKS = {
    ("H100", "bf16"): 989e12,
    ("H200", "bf16"): 989e12,
    ("H100", "float32"): 67e12,
    ("H200", "float32"): 67e12,
    ("A100", "bf16"): 312e12,
    ("A100", "float32"): 19.5e12,
    ("TPU v4", "bf16"): 275e12,
    ("TPU v5 lite", "bf16"): 197e12,
    ("TPU v5p", "bf16"): 459e12,
}


def peak_flops(device, precision: str) -> tuple[float, str]:
    """``(FLOP/s, where the figure comes from)`` for ``device`` at ``precision``."""
    for (kind, prec), flops in PEAKS.items():
        if kind in device.device_kind and prec == precision:
            return flops, f"data sheet ({kind}, {prec})"
    import jax
    import jax.numpy as jnp

    n = 2048 if device.platform == "cpu" else 8192
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, f"measured: best of 5 {n}x{n} {precision} matmuls"


def formula_flops(raw: dict, params: dict, batch: int, length: int) -> float:
    from jaxtl.transfer.trees import flatten

    embed = ("embeddings", "wte", "wpe", "position_embeddings", "cls_token")
    n = sum(
        v.size for p, v in flatten(params).items() if not any(e in p for e in embed)
    )  # non-embedding params
    layers, hidden = raw["num_hidden_layers"], raw["hidden_size"]
    tokens = batch * length
    return 6 * n * tokens + 12 * layers * hidden * length * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="bert-small")
    parser.add_argument("--precision", choices=["float32", "bf16"], default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128, help="text: tokens per row")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--remat", default=None)
    args = parser.parse_args()

    import jax
    import numpy as np

    import jaxtl
    from jaxtl import parallel

    raw = CONFIGS[args.model]
    directory = tempfile.mkdtemp(prefix="jaxtl-mfu-")
    atexit.register(shutil.rmtree, directory, True)  # it holds only the config.json
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f)
    model = jaxtl.load(directory, num_labels=2, pretrained=False)
    rng = np.random.default_rng(0)
    b = args.batch
    if raw["model_type"] == "vit":
        size = raw["image_size"]
        batch = {"pixel_values": rng.standard_normal((b, size, size, 3)).astype(np.float32)}
        length = (size // raw["patch_size"]) ** 2 + 1
    else:
        length = args.length
        batch = {
            "input_ids": rng.integers(1, raw["vocab_size"], (b, length)).astype(np.int32),
            "attention_mask": np.ones((b, length), np.int32),
            "token_type_ids": np.zeros((b, length), np.int32),
        }
    batch["label"] = rng.integers(0, 2, b).astype(np.int32)
    config = jaxtl.TrainConfig(
        batch_size=b, max_steps=10**6, precision=args.precision, remat=args.remat
    )
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config)
    state = trainer.init_state(10**6)
    step, _ = trainer._steps(state)
    placed = parallel.global_batch(batch, trainer.mesh)
    xla = step.lower(state, placed).compile().cost_analysis()
    xla_flops = float((xla[0] if isinstance(xla, list) else xla).get("flops", float("nan")))
    state, m = step(state, placed)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = step(state, placed)
        jax.block_until_ready((state.params, m))
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    device = jax.devices()[0]
    peak, source = peak_flops(device, args.precision)
    formula = formula_flops(raw, model.params, b, length)
    devices = jax.device_count()
    print(
        f"{args.model}, {args.precision}, batch {b} x {length} tokens, remat {args.remat}; "
        f"{devices} x {device.device_kind} ({device.platform}); jax {jax.__version__}"
    )
    print(f"step time: median {seconds * 1e3:.1f} ms over {args.steps} steps")
    print(f"peak: {peak / 1e12:.2f} TFLOP/s per device ({source})")
    # The formula counts the whole step; XLA's cost analysis of an SPMD program counts one
    # device's share, so the two are compared per device.
    for name, flops in (("formula", formula / devices), ("XLA cost analysis", xla_flops)):
        mfu = flops / seconds / peak
        print(f"MFU by {name}: {flops / 1e12:.3f} TFLOP per device per step -> {100 * mfu:.1f}%")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
