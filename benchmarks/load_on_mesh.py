"""What one device holds after loading a checkpoint: onto one device vs straight onto a mesh.

    python benchmarks/load_on_mesh.py [--model bert-large] [--rounds 3] [--json OUT]

Writes a randomly initialized checkpoint of a BERT-large-shaped encoder (24 layers, hidden
1024, 335M params, 1.3 GB of float32 safetensors, as transformers names them) to a temporary
directory, then loads it with ``jaxtl.load`` in fresh processes with 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), alternating the two arms:

- ``one device``: ``jaxtl.load(path)``, every param whole on the first device (what a load
  did before ``mesh=``; a train state then copies it into its shardings);
- ``fsdp=8``: ``jaxtl.load(path, mesh="fsdp=8")``, each device receiving only its pieces.

Each child reports the bytes each device holds once the load returns (from
``jax.live_arrays()``: every live array's ``addressable_shards``), the load's wall time, and the
process's peak resident set (``ru_maxrss``: the host copy of the checkpoint counts on both
sides). It prints the ratios, fsdp=8 / one device: largest per-device bytes (the quantity that
decides whether a model loads on an accelerator at all), load time, and peak RSS.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale  # noqa: E402  (the model shapes; it imports no framework itself)

DEVICES = 8
ARMS = {"one device": None, "fsdp=8": "fsdp=8"}
MODELS = {"bert-large": scale.MODELS["bert-large"]}  # scale.py's shapes


def write_checkpoint(name: str, directory: str) -> str:
    """A random checkpoint of ``MODELS[name]``, saved by transformers (its names and layouts)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(**{k: v for k, v in MODELS[name].items() if k != "model_type"})
    with torch.device("cpu"):
        model = transformers.BertModel(config)
    model.save_pretrained(directory)
    return directory


def child(path: str, mesh: str | None) -> dict:
    """One load in this process; what each device holds afterwards."""
    import jax

    import jaxtl

    assert jax.device_count() == DEVICES, jax.devices()
    start = time.perf_counter()
    model = jaxtl.load(path, task="features", **({"mesh": mesh} if mesh else {}))
    jax.block_until_ready(model.params)
    seconds = time.perf_counter() - start
    held = {d.id: 0 for d in jax.devices()}
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            held[shard.device.id] += shard.data.nbytes
    params = sum(x.nbytes for x in jax.tree.leaves(model.params))
    return {
        "seconds": seconds,
        "held_max": max(held.values()),
        "held_min": min(held.values()),
        "params_bytes": params,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _run_child(path: str, arm: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    mesh = ARMS[arm] or "-"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", path, mesh],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    if proc.returncode:
        raise RuntimeError(f"{arm} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert-large", choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=3, help="processes per arm (default 3)")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: PATH MESH
    args = parser.parse_args()
    if args.child:
        path, mesh = args.child
        print(json.dumps(child(path, None if mesh == "-" else mesh)))
        return
    print(f"machine: {scale._machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(args.model, os.path.join(tmp, args.model))
        runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for r in range(args.rounds):
            for arm in ARMS if r % 2 == 0 else reversed(ARMS):
                runs[arm].append(_run_child(path, arm))
                print(f"round {r} {arm}: {json.dumps(runs[arm][-1])}", flush=True)
    gib = 2**30

    def median(arm: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[arm])

    one, split = "one device", "fsdp=8"
    print(f"\n{args.model}: params {median(one, 'params_bytes') / gib:.2f} GiB, {args.rounds} "
          f"processes per arm, medians")  # fmt: skip
    print("| arm | largest per-device GiB | smallest per-device GiB | load s | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|")
    for arm in ARMS:
        print(
            f"| {arm} | {median(arm, 'held_max') / gib:.3f} | {median(arm, 'held_min') / gib:.3f} "
            f"| {median(arm, 'seconds'):.1f} | {median(arm, 'peak_rss') / gib:.2f} |"
        )
    ratios = {
        key: median(split, key) / median(one, key) for key in ("held_max", "seconds", "peak_rss")
    }
    print(
        f"fsdp=8 / one device: largest per-device bytes {ratios['held_max']:.3f} (1/8 = 0.125), "
        f"load time {ratios['seconds']:.2f}, peak RSS {ratios['peak_rss']:.2f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": scale._machine(), "runs": runs, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
