"""Per-device memory of a sharded train step, and what the collectives cost in step time.

    python benchmarks/scale.py [--models bert-large,decoder-1b] [--batch 32] [--length 128]
    python benchmarks/scale.py --step-time-only [--separate]   # --separate: one process an arm

On 8 CPU devices (the script re-runs itself with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``), for a BERT-large-shaped encoder
(24 layers, hidden 1024, 335M params) and a ~1B-param GPT-2-shaped decoder (18 layers, hidden
2048), both randomly shaped and never materialized: each arm's train step is lowered from
``Trainer.abstract_state`` (shapes and shardings, nothing allocated) and compiled, and XLA's
``compiled.memory_analysis()`` gives the bytes of one device's program:

- ``arguments``: what the step reads, per device: params + optimizer state (+ the batch share);
- ``temporaries``: the activations and other buffers the step allocates while it runs;
- ``activations kept``: what the forward pass keeps for the backward pass at one device's
  share of the batch (the leaves of ``jax.vjp``'s backward function, from ``jax.eval_shape``),
  less the leaves shaped like a param (the weights the backward matmuls read): the
  quantity remat decides, whatever a backend's compiler then does with it.

XLA:CPU removes the optimization barriers that keep a rematerialized forward pass from being
merged back into the original one (its compiled step has as many matmuls with remat as
without), so on CPU remat changes the residuals but not the compiled temporaries. The
temporaries target for remat can only be checked on a GPU or TPU.

Arms: ``replicated`` (all 8 devices on ``data``), ``fsdp=8``, ``fsdp=8 + remat`` (``full``
policy) and ``fsdp=8 + bf16`` (compute in bf16). Frozen params in bf16 are measured on the
``linear_probe`` plan (body frozen), with and without ``frozen_bf16``.

It prints the ratios the issue sets targets for: ``fsdp=8`` arguments / replicated <= 1/8 + 5%;
remat temporaries cut >= 2x; bf16 frozen params half of float32. Then, on a model small enough
to run replicated on this machine (6 layers, hidden 512), the median step time of ``fsdp=8``
over replicated, measured in alternating rounds, so that the cost of gathering params and
scattering gradients is visible.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

DEVICES = 8
MODELS = {
    "bert-large": {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": 30522,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "max_position_embeddings": 512,
    },
    "decoder-1b": {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": 50257,
        "n_embd": 2048,
        "n_layer": 18,
        "n_head": 16,
        "n_positions": 1024,
        "bos_token_id": None,
        "eos_token_id": None,
    },
    "bert-small": {  # the step-time model: 6 layers, hidden 512, 35M params
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": 30522,
        "hidden_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "intermediate_size": 2048,
        "max_position_embeddings": 512,
    },
}
ARMS = {
    "replicated": {},
    "fsdp=8": {"mesh": "fsdp=8"},
    "fsdp=8 + remat": {"mesh": "fsdp=8", "remat": "full"},
    "fsdp=8 + bf16": {"mesh": "fsdp=8", "precision": "bf16"},
}


def _machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
    return f"CPU {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"


def _scratch(prefix: str) -> str:
    """A temporary directory for a model's config.json, removed when the process exits."""
    directory = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, directory, True)
    return directory


def abstract_model(name: str):
    """A :class:`LoadedModel` whose params are ``jax.ShapeDtypeStruct`` s (nothing allocated),
    built by the family's own ``build`` from a config.json."""
    from jaxtl.models import registry
    from jaxtl.models.base import LoadedModel

    raw = MODELS[name]
    directory = _scratch(f"jaxtl-scale-{name}-")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f)
    family = registry.family_for_config(raw, source=name)
    task = "causal_lm" if raw["model_type"] == "gpt2" else "classification"
    options = {"pooling": None} if "pooling" in family.options else {}
    source = os.path.join(directory, "config.json")
    spec = family.build(directory, raw, source=source, task=task, num_labels=2, **options)
    return LoadedModel(
        family=family.name,
        config=spec.config,
        module=spec.module,
        params=spec.abstract_params,
        report=None,
        structure=spec.structure,
        task=task,
        num_labels=2,
        path=directory,
        apply=spec.apply,
        forward=spec.forward,
    )


def _batch(model, batch: int, length: int, mesh):
    import jax
    import jax.numpy as jnp

    from jaxtl import parallel

    sharding = parallel.batch_sharding(mesh)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding)
    out = {"input_ids": ids, "attention_mask": ids}
    if model.task == "classification":
        out["token_type_ids"] = ids
        out["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
    return out


def _trainer(model, recipe: str, batch: int, **scale):
    import jaxtl

    config = jaxtl.TrainConfig(batch_size=batch, max_steps=10, **scale)
    return jaxtl.Trainer(model, jaxtl.make_plan(recipe, model.structure), config)


def residual_bytes(model, batch: dict) -> int:
    """Bytes the forward pass of the training loss keeps for its backward pass on ``batch``,
    not counting leaves with a param's shape (one per param: the weights)."""
    import collections

    import jax
    import numpy as np

    from jaxtl.train.losses import mean_loss

    def loss(params, batch):
        out, _ = model.forward.traceable(
            params, model.batch_stats, batch, train=True, rng=jax.random.PRNGKey(0)
        )
        return mean_loss(out, batch, model.task)

    backward = jax.eval_shape(lambda p, b: jax.vjp(lambda q: loss(q, b), p)[1], model.params, batch)
    # Any dtype: under bf16 the backward pass reads bf16 copies of the weights.
    weights = collections.Counter(x.shape for x in jax.tree.leaves(model.params))
    kept = 0
    for x in jax.tree.leaves(backward):
        if weights[x.shape] > 0:
            weights[x.shape] -= 1
        else:
            kept += int(np.prod(x.shape)) * x.dtype.itemsize
    return kept


def remat_on_this_backend(layers: int = 24) -> dict:
    """A ``jax.checkpoint`` toy (``layers`` x tanh(x @ w), grad of the sum): matmuls and
    temporaries of its compiled gradient with and without remat, on this backend."""
    import jax
    import jax.numpy as jnp

    def layer(w, x):
        return jnp.tanh(jnp.tanh(x @ w) * 2.0 + 1.0)

    out = {}
    for remat in (False, True):
        f = (
            jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
            if remat
            else layer
        )

        def net(ws, x, f=f):
            for w in ws:
                x = f(w, x)
            return x.sum()

        ws = [jax.ShapeDtypeStruct((512, 512), jnp.float32)] * layers
        x = jax.ShapeDtypeStruct((4096, 512), jnp.float32)
        lowered = jax.jit(jax.grad(net)).lower(ws, x)
        compiled = lowered.compile()
        out["remat" if remat else "plain"] = {
            "matmuls lowered": lowered.as_text().count("dot_general"),
            "matmuls compiled": compiled.as_text().count(" dot("),
            "temporaries MiB": compiled.memory_analysis().temp_size_in_bytes / 2**20,
        }
    return out


def memory(name: str, batch: int, length: int) -> dict:
    """Per-device argument and temporary bytes of each arm's compiled step."""
    import jax

    from jaxtl import parallel
    from jaxtl.train import steps

    model = abstract_model(name)
    out = {}
    arms = {**{(k, "full"): v for k, v in ARMS.items()}}
    arms[("fsdp=8 probe", "linear_probe")] = {"mesh": "fsdp=8"}
    arms[("fsdp=8 probe + frozen bf16", "linear_probe")] = {"mesh": "fsdp=8", "frozen_bf16": True}
    for (arm, recipe), scale in arms.items():
        t = time.perf_counter()
        trainer = _trainer(model, recipe, batch, **scale)
        state = trainer.abstract_state(10)
        train, _ = steps.compile_steps(state, trainer.mesh, trainer.specs)
        compiled = train.lower(state, _batch(model, batch, length, trainer.mesh)).compile()
        stats = compiled.memory_analysis()
        frozen_mask = jax.tree.leaves(trainer.plan.trainable_mask(model.params))
        frozen = sum(
            leaf.size * leaf.dtype.itemsize
            for leaf, trains in zip(jax.tree.leaves(state.params), frozen_mask, strict=True)
            if not trains
        )
        share = batch // parallel.batch_shards(trainer.mesh)
        local = {
            k: jax.ShapeDtypeStruct((share, *v.shape[1:]), v.dtype)
            for k, v in _batch(model, batch, length, trainer.mesh).items()
        }
        out[arm] = {
            "arguments": int(stats.argument_size_in_bytes),
            "temporaries": int(stats.temp_size_in_bytes),
            "residuals": residual_bytes(trainer.model, local),
            "frozen_param_bytes_total": int(frozen),
            "compile_s": round(time.perf_counter() - t, 1),
        }
        print(f"  {name} {arm}: {out[arm]}", file=sys.stderr, flush=True)
    params = sum(x.size for x in jax.tree.leaves(model.params))
    return {"params": int(params), "arms": out}


def step_times(batch: int, length: int, rounds: int, arms=("replicated", "fsdp=8")) -> dict:
    """Median seconds of a real step of each of ``arms``, in alternating rounds."""
    import jax
    import numpy as np

    import jaxtl
    from jaxtl import parallel

    directory = _scratch("jaxtl-scale-small-")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(MODELS["bert-small"], f)
    model = jaxtl.load(directory, num_labels=2, pretrained=False)
    rng = np.random.default_rng(0)
    host = {
        "input_ids": rng.integers(1, 30522, (batch, length)).astype(np.int32),
        "attention_mask": np.ones((batch, length), np.int32),
        "token_type_ids": np.zeros((batch, length), np.int32),
        "label": rng.integers(0, 2, batch).astype(np.int32),
    }
    runs = {}
    for arm in arms:
        trainer = _trainer(model, "full", batch, **ARMS[arm])
        state = trainer.init_state(10**6)
        step, _ = trainer._steps(state)
        placed = parallel.global_batch(host, trainer.mesh)
        state, m = step(state, placed)  # compile
        jax.block_until_ready(m)
        runs[arm] = [trainer, state, step, placed]
    times: dict[str, list[float]] = {arm: [] for arm in runs}
    for _ in range(rounds):
        for arm, run in runs.items():
            _, state, step, placed = run
            t = time.perf_counter()
            state, m = step(state, placed)
            jax.block_until_ready((state.params, m))
            times[arm].append(time.perf_counter() - t)
            run[1] = state
    return {arm: statistics.median(ts) for arm, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert-large,decoder-1b")
    parser.add_argument("--batch", type=int, default=32, help="global batch (default 32)")
    parser.add_argument("--length", type=int, default=128, help="tokens per row (default 128)")
    parser.add_argument("--rounds", type=int, default=10, help="step-time rounds (default 10)")
    parser.add_argument("--step-time-only", action="store_true")
    parser.add_argument("--separate", action="store_true", help="time each arm in its own process")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: time one arm, print JSON
    args = parser.parse_args()
    if f"device_count={DEVICES}" not in os.environ.get("XLA_FLAGS", ""):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

    import jax

    if args.arm:
        print(json.dumps(step_times(16, args.length, args.rounds, arms=(args.arm,))))
        return
    print(f"{_machine()}; jax {jax.__version__}; {jax.device_count()} CPU devices")
    print(f"global batch {args.batch} x {args.length} tokens; bytes are per device\n")
    if not args.step_time_only:
        toy = remat_on_this_backend()
        print(f"remat on this backend, 24-layer jax.checkpoint toy: {toy}\n")
        for name in args.models.split(","):
            result = memory(name, args.batch, args.length)
            arms = result["arms"]
            rep, fsdp = arms["replicated"], arms["fsdp=8"]
            remat, bf16 = arms["fsdp=8 + remat"], arms["fsdp=8 + bf16"]
            probe, half = arms["fsdp=8 probe"], arms["fsdp=8 probe + frozen bf16"]
            print(f"{name}: {result['params'] / 1e6:.0f}M params")
            head = ("arguments", "temporaries", "activations kept")
            print(f"  {'arm':28s}" + "".join(f" {h:>12s}" for h in head))
            for arm, r in arms.items():
                mib = [r[k] / 2**20 for k in ("arguments", "temporaries", "residuals")]
                print(f"  {arm:28s}" + "".join(f" {m:8.1f} MiB" for m in mib))
            ratio = fsdp["arguments"] / rep["arguments"]
            print(f"  fsdp=8 / replicated arguments: {ratio:.4f} (target <= {1 / 8 * 1.05:.4f})")
            cut = fsdp["temporaries"] / max(remat["temporaries"], 1)
            kept = fsdp["residuals"] / max(remat["residuals"], 1)
            print(
                f"  remat cuts temporaries {cut:.2f}x (target >= 2x; see the docstring on CPU) "
                f"and activations kept {kept:.2f}x"
            )
            cut = fsdp["temporaries"] / max(bf16["temporaries"], 1)
            print(f"  bf16 cuts temporaries {cut:.2f}x")
            ratio = half["frozen_param_bytes_total"] / probe["frozen_param_bytes_total"]
            saved = (probe["arguments"] - half["arguments"]) / 2**20
            print(
                f"  frozen params bf16 / float32: {ratio:.3f} (target 0.5); "
                f"arguments per device {saved:.1f} MiB smaller\n"
            )
    if args.separate:
        times = {}
        for arm in ("replicated", "fsdp=8"):
            command = [sys.executable, __file__, "--arm", arm, "--rounds", str(args.rounds)]
            command += ["--length", str(args.length)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            times.update(json.loads(out.strip().splitlines()[-1]))
    else:
        times = step_times(16, args.length, args.rounds)
    how = "separate processes" if args.separate else "alternating rounds, one process"
    print(f"({how})")
    print(
        f"step time, bert-small (6 x 512, 35M params), batch 16 x {args.length}: replicated "
        f"{times['replicated']:.3f} s, fsdp=8 {times['fsdp=8']:.3f} s, ratio fsdp / replicated "
        f"{times['fsdp=8'] / times['replicated']:.2f}"
    )


if __name__ == "__main__":
    main()
