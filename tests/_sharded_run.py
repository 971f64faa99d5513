"""Fine-tune a tiny BERT, GPT-2, Llama or ViT on N CPU devices with a mesh; print what happened.

Usage: python _sharded_run.py FAMILY MODEL_DIR DEVICES MESH STEPS OUT [options] [:: RUN ...]
  FAMILY: bert | gpt2 | llama | vit; MODEL_DIR: a transformers checkpoint made by test_sharding.py
  MESH: e.g. 'fsdp=8', 'data=2,fsdp=2,tensor=2', or '-' for the default (all on data)
  OUT: the run directory (checkpoints, metrics.jsonl, params.npz)
  --grad-accum K --batch B --stop-at S --resume --recipe R (default full; lora(r) adapts first)
  --adam-eps E: AdamW's eps (default optax's 1e-8)
  --export: also write the fine-tuned model with jaxtl.export (from the sharded params) to
    OUT/export
  --load-on-mesh: load the model straight onto the mesh (``jaxtl.load(mesh=...)``); the
    summary then has ``loaded_held`` (what each device holds of the loaded params) and
    ``loaded_as_state`` (whether each loaded param has its train state's sharding)
  ``::`` starts another run (the same arguments, the same DEVICES) in this process, after the
    one before it has ended: each loads its model and builds its Trainer afresh.

Runs in a process of its own because the CPU device count is fixed when jax starts; runs of one
device count share one, as a notebook would run them one after another (each run's params are
bitwise those of the same run alone in a process). One stdout line of JSON per run, in order:
the loss of every step, and for every param and optimizer-state leaf the fraction of its
elements that each device actually holds (from ``addressable_shards``).
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
for name in ("family", "model_dir", "devices", "mesh", "steps", "out"):
    parser.add_argument(name)
parser.add_argument("--grad-accum", type=int, default=1)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--stop-at", type=int)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--export", action="store_true")
parser.add_argument("--recipe", default="full")
parser.add_argument("--adam-eps", type=float)
parser.add_argument("--load-on-mesh", action="store_true")
groups: list[list[str]] = [[]]
for arg in sys.argv[1:]:
    if arg == "::":
        groups.append([])
    else:
        groups[-1].append(arg)
runs = [parser.parse_args(group) for group in groups]
devices = runs[0].devices
assert all(r.devices == devices for r in runs), "runs of one process share its device count"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxtl  # noqa: E402
from jaxtl.data import training_loader  # noqa: E402
from jaxtl.transfer.trees import flatten, path_str  # noqa: E402

assert jax.device_count() == int(devices), jax.devices()
N = 64  # training examples: 4 batches of 16 per epoch


def data(model, family: str):
    rng = np.random.default_rng(0)
    if family == "vit":
        pixels = rng.standard_normal((N, 32, 32, 3)).astype(np.float32)
        return {"pixel_values": pixels, "label": rng.integers(0, 3, N).astype(np.int32)}
    ids = rng.integers(1, 128, (N, 16)).astype(np.int32)
    lengths = rng.integers(6, 17, N)
    mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if family == "bert":
        batch["token_type_ids"] = np.zeros_like(ids)
        batch["label"] = (ids[:, 0] % 2).astype(np.int32)
    return batch


def held_fractions(tree) -> dict:
    """path -> the largest fraction of the leaf's elements that any one device holds."""
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if leaf.size == 0:
            continue
        held = max(s.data.size for s in leaf.addressable_shards)
        out[path_str(keypath)] = held / leaf.size
    return out


def run(args) -> dict:
    task = {"bert": "classification", "gpt2": "causal_lm", "llama": "causal_lm"}.get(
        args.family, "classification"
    )
    mesh = None if args.mesh == "-" else args.mesh
    placed = {"mesh": mesh, "min_shard_size": 512} if args.load_on_mesh else {}
    model = jaxtl.load(
        args.model_dir, task=task, **({} if task == "causal_lm" else {"num_labels": 3}), **placed
    )
    loaded_held = held_fractions(model.params)
    loaded_shardings = {p: x.sharding for p, x in flatten(model.params).items()}
    config = jaxtl.TrainConfig(
        batch_size=args.batch,
        learning_rate=1e-3,
        max_steps=int(args.steps),
        log_every=1,
        progress=False,
        mesh=mesh,
        grad_accum=args.grad_accum,
        min_shard_size=512,  # the tiny models' kernels shard, their biases and norms stay whole
        optimizer_options={} if args.adam_eps is None else {"eps": args.adam_eps},
    )
    plan = jaxtl.make_plan(args.recipe, model.structure)
    if plan.adapters is not None:
        model = jaxtl.lora.adapt(model, plan, seed=0)
    trainer = jaxtl.Trainer(model, plan, config, args.out)
    loader = training_loader(data(model, args.family), config.data, model, seed=0)
    result = trainer.fit(loader, resume=args.resume, stop_at=args.stop_at)
    state = result.state
    params = jax.device_get(state.params)
    np.savez(os.path.join(args.out, "params.npz"), **flatten(params))
    if args.export:
        jaxtl.export(model, os.path.join(args.out, "export"), state.params)
    with open(os.path.join(args.out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r["loss"] for r in records if r.get("split") == "train"]
    summary = {
        "losses": losses,
        "steps": result.steps,
        "mesh": dict(trainer.mesh.shape),
        "params_held": held_fractions(state.params),
        "opt_held": held_fractions(state.opt_state),
        "specs": {p: str(s) for p, s in flatten(trainer.specs.params).items()},
        "sizes": {p: int(np.size(v)) for p, v in flatten(params).items()},
        "loaded_held": loaded_held,
        "loaded_as_state": {
            p: loaded_shardings[p] == x.sharding
            for p, x in flatten(state.params).items()
            if p in loaded_shardings  # LoRA's adapters are not loaded
        },
    }
    return summary


for args in runs:
    print(json.dumps(run(args)), flush=True)
