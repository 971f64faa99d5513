"""The ``jaxtl`` command's flags: every subcommand's parser (:func:`build_parser`) and the
argparse types that check a flag's text as it is read."""

from __future__ import annotations

import argparse

from jaxtl.data.shifts import SHIFTS
from jaxtl.experiment import DEFAULT_LR, FULL_LR
from jaxtl.models.registry import FAMILIES
from jaxtl.ranking import SCORES


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only for options whose help does not already say its default,
    and never ``(default: None)``: an option left unset says in words what happens."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False
        if "default" in text or unset or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _add_model_args(p: argparse.ArgumentParser, surgery: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--task",
        default="classification",
        choices=[
            "classification",
            "regression",
            "causal_lm",
            "token_classification",
            "question_answering",
            "segmentation",
        ],
        help="classification head (cross-entropy), regression (num_labels=1, MSE), causal_lm "
        "(next-token LM on the text column alone; families with an LM head, e.g. GPT-2), "
        "token_classification (a tag per word, entity F1: BERT-style encoders; --data "
        "vader-tags or FILE.conll), question_answering (an answer span of the context, SQuAD "
        "exact match / F1: BERT-style encoders; --data vader-qa or squad:FILE.json), or "
        "segmentation (a class per pixel, mIoU: ResNet, ConvNeXt, ViT; --data "
        "digits-segmentation)",
    )
    g.add_argument(
        "--num-labels",
        type=int,
        help="classes of the new head (default: 2; token_classification: the data's tags, "
        "e.g. 5 for vader-tags; segmentation: the classes with background, e.g. 11 for "
        "digits-segmentation). Not for regression (one output), causal_lm (the vocabulary) "
        "or question_answering (a start and an end per token)",
    )
    g.add_argument(
        "--pooling",
        choices=["mean", "cls", "max", "attention"],
        help="text encoders: how tokens are pooled for the head (default: the checkpoint's "
        "1_Pooling/config.json, else cls through BERT's pooler); max and attention (a learned "
        "query) put a new head on the features (model surgery, jaxtl/surgery.py)",
    )
    if not surgery:
        return
    g.add_argument(
        "--tower",
        choices=["vision", "text"],
        help="CLIP only: fine-tune the vision tower on images (the default) or the text tower "
        "on texts (jaxtl.load(tower=...)); the other tower is not loaded",
    )
    g.add_argument(
        "--head",
        help="a new head on the backbone's features: 'linear' or 'mlp(WIDTH)' / "
        "'mlp([W1, W2], dropout=0.1, activation=\"gelu\")' (default: the family's own head)",
    )
    g.add_argument(
        "--drop-blocks",
        type=int,
        default=0,
        metavar="K",
        help="build the model without its top K blocks ("
        + ", ".join(name for name, family in FAMILIES.items() if family.depth)
        + "; resnet and convnext within their last stage)",
    )


# jaxtl finetune's options by group: (flag, help, argparse keywords). Help that names no default
# gets argparse's "(default: X)" (see _HelpFormatter).
def seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2`` as distinct whole numbers."""
    from jaxtl.seeds import parse_seeds

    try:
        return parse_seeds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def l2_sp_pair(text: str) -> tuple[float, float]:
    """``--l2-sp ALPHA,BETA`` as two floats >= 0."""
    try:
        alpha, beta = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ALPHA,BETA (two numbers >= 0, e.g. 0.01,0.01), got {text!r}"
        ) from None
    if alpha < 0 or beta < 0:
        raise argparse.ArgumentTypeError(f"ALPHA and BETA must be >= 0, got {text!r}")
    return alpha, beta


DEFAULT_RECIPES = "full,linear_probe"  # finetune's pretrained runs without --recipe

_FINETUNE = {
    "what to run": [
        ("--preset", "a packaged experiment instead of --model/--data: 'digits' = "
         "EfficientNet-Lite0 (ImageNet) -> scikit-learn's handwritten digits, 1-channel stem, "
         "pretrained full / linear probe vs scratch at 10 images per class and on all; it "
         "takes --epochs, --seed, --image-size, --out and --resume, and refuses the others",
         dict(choices=["digits"])),
        ("--model", "Hugging Face model directory or torchvision-style state dict file "
         "(default: the embedded MiniLM-L6)", {}),
        ("--recipe", "comma-separated recipes for the pretrained model: full, linear_probe "
         "(probe), last_n(N), bitfit, layerwise_lr_decay(D), lora(RANK) with options "
         "lora(8, alpha=16, targets=['.*/query', '.*/value'], dropout=0.1) (targets: regexes "
         "over module paths; default the family's, e.g. query and value), gradual(every=1) "
         "(ULMFiT: the head, then one more block from the top every EVERY epochs; "
         "unit='steps'), lp_ft(PROBE_EPOCHS, probe_lr=1e-3) (a linear probe, then full "
         "fine-tuning with a fresh optimizer and schedule; --epochs counts both) (default: "
         f"{DEFAULT_RECIPES})", {}),
        ("--rules", "a TOML rules file in place of --recipe: [[group]] tables (name, match "
         "regexes, trainable, lr_mult, weight_decay, wd_mult), an optional [lora] table and "
         "[[shard]] sharding rules; checked for coverage and unused patterns, its plan table "
         "printed before training (format: jaxtl/transfer/rules_file.py)", {}),
        ("--no-scratch", "skip the from-scratch baseline (same architecture, random init, full)",
         dict(action="store_true")),
        ("--fail-on-negative-transfer", "exit with status 3 (after writing every result) when a "
         "pretrained arm's test accuracy is below the scratch baseline's by more than 2 standard "
         "errors of the difference (the warning is printed and in summary.json either way)",
         dict(action="store_true")),
    ],
    "data": [
        ("--data", "'vader' (embedded texts), 'digits' (scikit-learn's 8x8 images; --in-channels "
         "1), a .csv / .jsonl file (split 80/10/10, seed 0), an image "
         "folder DIR/<class>/<images> (80/10/10 per class), a prepared TFDS dataset "
         "tfds:NAME[/CONFIG][:VERSION], or a Hugging Face dataset hf:DIR saved with "
         "save_to_disk (needs pip install 'jaxtl[hf]')", dict(default="vader")),
        ("--data-dir", "tfds: the directory the dataset is prepared in (default: TFDS's, "
         "~/tensorflow_datasets); nothing is downloaded", {}),
        ("--splits", "tfds and hf: TRAIN,VALIDATION,TEST split expressions, e.g. "
         "'train[:90%%],train[90%%:],test' (default: the dataset's own, else slices of train)", {}),
        ("--text-column", "text (or image) column of --data (default 'text'; tfds / hf: the "
         "only Text feature / text or image column)", {}),
        ("--label-column", "label column of --data (default 'label'; tfds / hf: the only "
         "ClassLabel)", {}),
        ("--shots", "classification: train on K examples of each class, drawn with --seed "
         "(a larger K's subset holds a smaller one's); validation and test stay whole, so runs "
         "with different K are scored on the same examples. A class with fewer than K "
         "training examples is an error naming it", dict(type=int, metavar="K")),
        ("--image-size", "image models: the input size to build for (default: the "
         "checkpoint's; --preset digits: 32)", dict(type=int)),
        ("--in-channels", "image models: input channels when not 3 (1 sums the stem's RGB "
         "kernels)", dict(type=int)),
        ("--skip-corrupt", "image and audio folders: skip files that do not decode (counted) "
         "instead of stopping at the first", dict(action="store_true")),
        ("--long-texts", "texts longer than the model's positions: cut them (counted) or stop "
         "before training", dict(choices=["truncate", "error"], default="truncate")),
        ("--bucket-by-length", "text: batch texts of similar length, each batch padded to one of "
         "8, 16, 32, ... tokens; the run prints the padding waste", dict(action="store_true")),
        ("--augment", "image augmentation, e.g. 'random_resized_crop(0.35),hflip' (ops: hflip, "
         "random_resized_crop, translate, rand_augment(num_ops, magnitude 0..30))", {}),
        ("--mixup", "image mixup Beta alpha (e.g. 0.2; 0: off)", dict(type=float, default=0.0)),
        ("--cutmix", "image cutmix Beta alpha (e.g. 1.0; 0: off)", dict(type=float, default=0.0)),
        ("--label-smoothing", "classification training targets smoothed by this in [0, 1) (val "
         "loss stays plain)", dict(type=float, default=0.0)),
        ("--data-workers", "grain worker processes reading training batches (batches do not "
         "depend on it)", dict(type=int, default=0)),
        ("--feature-cache", "pretrained linear_probe and last_n(k) runs: compute the frozen "
         "prefix's output once, in memory or as .npy files in DIR that later runs reuse while "
         "model, params and data are unchanged; other recipes run uncached",
         dict(metavar="memory|DIR")),
    ],
    "training": [
        ("--epochs", "passes over the training split per run (default 1: the demo in under 10 "
         "minutes on 2 CPU cores; 3 is the reference recipe; --preset digits: the preset's, 30 "
         "epochs at 10 images/class and 6 on all)", dict(type=int)),
        ("--max-steps", "total steps (overrides --epochs)", dict(type=int)),
        ("--batch-size", "global training batch, split over the devices (a multiple of their "
         "count)", dict(type=int, default=32)),
        ("--lr", f"peak learning rate of every run (default: the recipe's, {FULL_LR:g}; "
         f"{DEFAULT_LR['linear_probe']:g} for linear_probe / probe, {DEFAULT_LR['lora']:g} for "
         "lora)", dict(type=float)),
        ("--optimizer", "an optax optimizer by name: adamw, sgd, lion, adafactor, lamb, ... "
         "(--weight-decay is its own decay where it has one, else L2 on the gradient as in "
         "PyTorch)", dict(default="adamw")),
        ("--schedule", "learning rate after warmup: constant, linear decay to 0, or cosine "
         "decay to 0", dict(default="linear", choices=["constant", "linear", "cosine"])),
        ("--warmup-ratio", "fraction of the steps spent warming the learning rate up from 0",
         dict(type=float, default=0.0)),
        ("--weight-decay", "decay of trainable matrices (biases and norm scales never decay)",
         dict(type=float, default=0.01)),
        ("--clip-norm", "clip the global norm of the trainable gradients; 0 disables",
         dict(type=float, default=1.0)),
        ("--l2-sp", "ALPHA,BETA: L2-SP (Li et al. 2018), with any recipe: a pull "
         "ALPHA/2*||w - w0||^2 of the trained backbone toward its pretrained weights w0, and "
         "BETA/2*||w||^2 on the head (e.g. 0.01,0.01); off by default",
         dict(type=l2_sp_pair, metavar="ALPHA,BETA")),
        ("--seed", "seed of new heads, scratch init, dropout, data order and augmentation",
         dict(type=int, default=0)),
        ("--seeds", "run every arm once per seed, e.g. 0,1,2 (in place of --seed, which still "
         "draws the --shots subset): the table, summary.json and OUT/seeds.png give each "
         "arm's mean, std and 95%% interval, and mark differences within the seed noise",
         dict(type=seed_list, metavar="S1,S2,...")),
        ("--max-bad-steps", "a step whose loss or gradient is NaN/inf is skipped (params and "
         "optimizer state unchanged) and counted in metrics.jsonl; after K such steps in a row "
         "the run stops with an error naming them", dict(type=int, default=5, metavar="K")),
    ],
    "devices and memory": [
        ("--mesh", "device mesh axis sizes, e.g. 'fsdp=8' or 'data=2,fsdp=2,tensor=2': data "
         "and fsdp split the batch, fsdp shards params and optimizer state, tensor splits "
         "attention and MLP matrices; the sizes multiply to the device count, and data takes "
         "the devices the others leave (default: every device on data, params replicated)", {}),
        ("--shard-rule", "a sharding rule PATH_REGEX=SPEC tried before the family's defaults "
         "(repeat the flag for more; first full match wins). SPEC: 'fsdp' (largest divisible "
         "dim), 'replicated', or one entry per dim, e.g. 'fsdp,tensor', 'none,fsdp', "
         "'data+fsdp,none'", dict(action="append", default=[], metavar="REGEX=SPEC")),
        ("--grad-accum", "microbatches per optimizer step, summed inside one step: the step of "
         "the whole --batch-size with the activations of one microbatch at a time "
         "(--batch-size must divide by data x fsdp x K)", dict(type=int, default=1)),
        ("--remat", "recompute each transformer block's activations in the backward pass "
         "instead of storing them: full (keep block inputs only), dots_saveable (keep matmul "
         "outputs), dots_with_no_batch_dims_saveable (default: off)",
         dict(choices=["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])),
        ("--precision", "compute dtype: bf16 runs matmuls and activations in bfloat16 while "
         "master params, optimizer state, gradients, softmax, LayerNorm and the loss stay "
         "float32 (a backend without bf16 warns and uses float32)",
         dict(choices=["float32", "bf16"], default="float32")),
        ("--frozen-bf16", "store frozen params in bfloat16 (half their memory)",
         dict(action="store_true")),
        ("--release-pretrained", "hold the params once: the train state takes over the loaded "
         "model's, and each pretrained run loads the model again (default: on, except with a "
         "staged recipe, gradual or lp_ft, whose later stages start from the loaded params, "
         "and which refuses the flag; --no-release-pretrained keeps one loaded copy beside "
         "the train state for every run)",
         dict(action=argparse.BooleanOptionalAction, default=None)),
        ("--distributed", "join a multi-process run (a TPU pod slice, SLURM srun, or the "
         "JAXTL_COORDINATOR / JAXTL_NUM_PROCESSES / JAXTL_PROCESS_ID variables) before any "
         "device is used: the mesh spans every process's devices; needs --out on a filesystem "
         "every process sees. See docs/pods.md", dict(action="store_true")),
    ],
    "evaluation and checkpoints": [
        ("--evals-per-epoch", "validation evaluations per epoch, each saving the latest "
         "checkpoint (and the best when it improves), but never more often than every "
         "--min-eval-interval steps: a tiny dataset's short epoch is evaluated once, not 4 "
         "times. The last step is always evaluated (default: 4)", dict(type=int, default=4)),
        ("--min-eval-interval", "fewest training steps between two evaluations that "
         "--evals-per-epoch asks for (at most one epoch; default: 20)",
         dict(type=int, default=20)),
        ("--eval-every", "evaluate every N steps exactly (overrides --evals-per-epoch)",
         dict(type=int)),
        ("--best-metric", "the validation metric that picks the best checkpoint and drives "
         "--patience, e.g. val_loss (default: val_accuracy for classification, val_loss "
         "otherwise)", {}),
        ("--patience", "stop after N evaluations without improvement of that metric (default: "
         "off)", dict(type=int)),
        ("--compress-checkpoints", "write checkpoints zstd-compressed (default: on, except "
         "on CPU, where a compressed save holds buffers of the state in the training's memory: "
         "the demo's peak was about 120 MiB higher, while a trained state's raw checkpoints "
         "take about 1.6x the disk and the demo's run 3-6%% longer; --no-compress-checkpoints "
         "writes raw everywhere)",
         dict(action=argparse.BooleanOptionalAction, default=None)),
        ("--out", "output directory (default: runs/finetune-TIMESTAMP)", {}),
        ("--tensorboard", "also write every run's metrics as TensorBoard event files in "
         "OUT/<run>/tensorboard (tensorboard --logdir OUT); needs tensorboardX: pip install "
         "'jaxtl[loggers]'", dict(action="store_true")),
        ("--wandb", "also log every run to Weights & Biases, offline, in OUT/<run>/wandb "
         "(upload later with wandb sync); needs pip install wandb", dict(action="store_true")),
        ("--resume", "continue an interrupted --out directory: finished runs are kept, the "
         "unfinished one resumes from its latest checkpoint. SIGTERM or Ctrl-C during training "
         "saves a checkpoint of the current step and prints this command",
         dict(action="store_true")),
        ("--resume-from", "like --resume, but from this step's checkpoint instead of the latest "
         "(when the latest cannot be read: the error lists the steps saved); later checkpoints "
         "of that run are deleted", dict(type=int, metavar="STEP")),
    ],
}  # fmt: skip


def _model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory or state dict file (default: the embedded "
                   "MiniLM-L6)")  # fmt: skip


# jaxtl finetune's flags that jaxtl sweep sets itself (the grid) or does not take.
_NOT_FOR_SWEEP = ("--lr", "--weight-decay", "--seeds", "--seed", "--resume", "--resume-from",
                  "--distributed", "--tensorboard", "--wandb")  # fmt: skip


# ... and those that jaxtl lr-find sets itself or has no use for (it evaluates nothing).
_NOT_FOR_LR_FIND = ("--lr", "--seeds", "--resume", "--resume-from", "--distributed",
                    "--tensorboard", "--wandb", "--epochs", "--max-steps", "--schedule",
                    "--warmup-ratio", "--evals-per-epoch", "--min-eval-interval", "--eval-every",
                    "--best-metric", "--patience", "--release-pretrained",
                    "--compress-checkpoints", "--max-bad-steps", "--shard-rule")  # fmt: skip


# ... and those that jaxtl adapt has no use for (it validates nothing, reads its data whole, and
# cuts texts longer than the model's positions).
_NOT_FOR_ADAPT = ("--seeds", "--resume-from", "--distributed", "--evals-per-epoch",
                  "--min-eval-interval", "--eval-every", "--best-metric", "--patience",
                  "--augment", "--mixup", "--cutmix", "--label-smoothing", "--data-workers",
                  "--feature-cache", "--bucket-by-length", "--release-pretrained",
                  "--long-texts")  # fmt: skip


# The help of finetune's flags whose text speaks of finetune alone (the demo, --preset, its
# default --out), as another verb shows them.
_ELSEWHERE = {
    "--epochs": "passes over the training split per run (default 1)",
    "--image-size": "image models: the input size to build for (default: the checkpoint's)",
    "--out": "output directory (default: runs/{verb}-TIMESTAMP)",
}


def _help_elsewhere(flag: str, text: str, verb: str) -> str:
    """``flag``'s help on ``verb``'s parser: finetune's, unless it speaks of finetune alone."""
    return _ELSEWHERE[flag].format(verb=verb) if flag in _ELSEWHERE else text


def _run_flags(p: argparse.ArgumentParser, verb: str, skip: tuple[str, ...]) -> None:
    """jaxtl finetune's data, training, device and evaluation flags (not those of "what to
    run", nor ``skip``) and the model flags, on the parser ``p`` of ``verb``."""
    for title, options in _FINETUNE.items():
        if title == "what to run":
            continue
        group = p.add_argument_group(title)
        for flag, text, kwargs in options:
            if flag not in skip:
                group.add_argument(flag, help=_help_elsewhere(flag, text, verb), **kwargs)
    _add_model_args(p)


def finetune_options() -> dict[str, tuple[str, object]]:
    """``dest -> (flag, default)`` for each of jaxtl finetune's options (e.g. to name the
    options a user set that a packaged experiment does not take)."""
    p = argparse.ArgumentParser(add_help=False)
    for options in _FINETUNE.values():
        for flag, _, kwargs in options:
            p.add_argument(flag, **kwargs)
    _add_model_args(p)
    return {a.dest: (a.option_strings[0], a.default) for a in p._actions}


# The finetune data flags that also select jaxtl rank's data.
_RANK_DATA_FLAGS = ("--data", "--data-dir", "--splits", "--text-column", "--label-column",
                    "--shots", "--image-size", "--in-channels", "--skip-corrupt")  # fmt: skip


def _checkpoint_arg(p: argparse.ArgumentParser, default: str | None = "best") -> None:
    p.add_argument(
        "--checkpoint",
        choices=["best", "latest"],
        default=default,
        help="the best-validation checkpoint, or the last one saved"
        + ("" if default else " (a run directory only; default: best)"),
    )


class _Version(argparse.Action):
    """``--version``: the line printed as is (argparse's own action re-wraps it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def _version() -> str:
    """``jaxtl X (jax Y, flax Z, optax W)``: what a bug report needs first."""
    from importlib.metadata import PackageNotFoundError, version

    import jaxtl

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    stack = ", ".join(
        f"{name} {of(name)}" for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
    )
    return f"jaxtl {jaxtl.__version__} ({stack})"


# What every verb's exit status means (README.md, "Failures and recovery", says the same).
EXIT_STATUS = (
    "exit status: 0 done, or stopped by SIGTERM / Ctrl-C after a checkpoint (it prints the "
    "command that resumes); 1 a run that diverged (--max-bad-steps) or could not save; 2 bad "
    "input, refused before anything trains; 3 negative transfer with "
    "--fail-on-negative-transfer."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxtl", description="Transfer learning in JAX.", epilog=EXIT_STATUS
    )
    parser.add_argument(
        "--version",
        action=_Version,
        nargs=0,
        help="print the versions of jaxtl and its numerical stack, and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model and compare it with training from scratch",
        description=(
            "Fine-tune a pretrained model, evaluate it on the held-out test split, and compare "
            "it with the same architecture trained from random init on the same budget. With "
            "no options: MiniLM-L6 on the VADER sentiment lexicon (the demo). Writes "
            "OUT/<run>/{run.json,metrics.jsonl,checkpoints/,results.json,curve.png} (and "
            "confusion.png, reliability.png for classification) and "
            "OUT/{summary.json,comparison.png} (and seeds.png with --seeds)."
        ),
        epilog=EXIT_STATUS,
        formatter_class=_HelpFormatter,
    )
    for title, options in _FINETUNE.items():
        group = ft.add_argument_group(title)
        for flag, text, kwargs in options:
            group.add_argument(flag, help=text, **kwargs)
    _add_model_args(ft)

    ev = sub.add_parser(
        "evaluate",
        help="re-score a finished run's best checkpoint",
        description="Evaluate the best checkpoint of a run directory written by "
        "`jaxtl finetune` on its validation and test splits. RUN_DIR is one run, or the parent "
        "--out directory (all its runs).",
        formatter_class=_HelpFormatter,
    )
    ev.add_argument("run_dir", help="one run directory (OUT/<run> of jaxtl finetune) or its OUT")
    _checkpoint_arg(ev)

    ex = sub.add_parser(
        "export",
        help="write a finished run's model in its source format, or a LoRA run's adapters",
        description="Write the best checkpoint of a run directory written by `jaxtl finetune` "
        "to OUT in the model's source format: a Hugging Face directory that transformers "
        "loads, or a torchvision-style state dict (a LoRA run's adapters merged into the "
        "kernels). With --adapters, a LoRA run's adapters and head alone in the Hugging Face "
        "PEFT layout (adapter_config.json + adapter_model.safetensors) for "
        "peft.PeftModel.from_pretrained.",
        formatter_class=_HelpFormatter,
    )
    ex.add_argument("run_dir", help="one run directory (OUT/<run> of jaxtl finetune)")
    ex.add_argument("out", help="the directory (or .safetensors file) to write")
    ex.add_argument(
        "--adapters", action="store_true", help="a LoRA run's adapters alone, in PEFT's layout"
    )
    _checkpoint_arg(ex)
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export at OUT")

    wf = sub.add_parser(
        "wise-ft",
        help="interpolate a run's pretrained and fine-tuned weights, keep the best mix",
        description="WiSE-FT (Wortsman et al. 2022): score (1 - alpha) * pretrained + alpha * "
        "fine-tuned on the validation split for each --alphas (test shown, never used to "
        "choose), keep the best by validation, and write the table, OUT/wise_ft.png (metric "
        "against alpha) and the chosen model as a run directory OUT that `jaxtl evaluate` and "
        "`jaxtl export` read. A new head keeps its fine-tuned weights at every alpha.",
        formatter_class=_HelpFormatter,
    )
    wf.add_argument("run_dir", help="one run directory (OUT/<run> of jaxtl finetune)")
    wf.add_argument(
        "--alphas",
        type=_floats,
        default=",".join(f"{a:g}" for a in (i / 10 for i in range(11))),
        help="comma-separated mixing weights in [0, 1]",
    )
    wf.add_argument("--out", help="where the chosen model goes (default: RUN_DIR/wise-ft)")
    _checkpoint_arg(wf)

    so = sub.add_parser(
        "soup",
        help="average runs fine-tuned from one pretrained model (uniform and greedy soups)",
        description="Model soups (Wortsman et al. 2022) of runs of one pretrained model, head "
        "and recipe: the uniform soup (every run) and the greedy soup (best validation first; "
        "each next run kept only if validation does not get worse). Prints each run and both "
        "soups on validation and test, and writes the better soup (by validation) as a run "
        "directory OUT with soup.json.",
        formatter_class=_HelpFormatter,
    )
    so.add_argument("run_dirs", nargs="+", help="two or more run directories")
    so.add_argument("--out", help="where the chosen soup goes (default: soup/ beside the first)")
    _checkpoint_arg(so)

    sw = sub.add_parser(
        "sweep",
        help="train one run per learning rate x weight decay x seed; heads vmapped in one pass",
        description="A grid of --lr x --weight-decay x --seeds for one recipe. A recipe that "
        "trains only the head (linear_probe) trains every cell's head at once: one jitted step "
        "vmapped over the heads, on the frozen backbone's features computed once; each head "
        "equals the single `jaxtl finetune` run of its cell. Other recipes (full, last_n(2), "
        "...) run the cells one after another. Prints every cell's best validation and test "
        "metrics and the best configuration, and writes OUT/sweep.json and OUT/sweep.png "
        "(cell by cell, also each cell's run directory under OUT/cells/, with its checkpoints). "
        "A sweep does not resume: one stopped by SIGTERM / Ctrl-C says so and exits 0.",
        formatter_class=_HelpFormatter,
    )
    _model_flag(sw)
    sw.add_argument("--recipe", default="linear_probe",
                    help="one recipe (linear_probe is vmapped; others: cell by cell)")  # fmt: skip
    sw.add_argument("--lr", default="1e-4,3e-4,1e-3,3e-3", metavar="LR1,LR2,...",
                    help="peak learning rates")  # fmt: skip
    # dest weight_decays: the grid, not the one weight decay of finetune's TrainConfig
    sw.add_argument("--weight-decay", dest="weight_decays", default="0,1e-2",
                    metavar="WD1,WD2,...", help="weight decays of trainable matrices")  # fmt: skip
    sw.add_argument("--seeds", default="0", metavar="S1,S2,...",
                    help="seeds: each cell's new head, dropout and data order")  # fmt: skip
    sw.add_argument("--seed", type=int, help="draws the --shots subset (default: 0; the "
                    "cells' seeds are --seeds)")  # fmt: skip
    sw.add_argument("--sequential", action="store_true",
                    help="one run per cell even where the heads could be vmapped")  # fmt: skip
    _run_flags(sw, "sweep", skip=_NOT_FOR_SWEEP)

    lf = sub.add_parser(
        "lr-find",
        help="the learning-rate range test: loss against an exponentially growing LR",
        description="Train a copy of the run for --steps steps while the learning rate grows "
        "exponentially from --start-lr to --end-lr (Smith 2017, fastai's lr_find), with the "
        "run's recipe, optimizer, clipping, weight decay, batch size, data order, --grad-accum, "
        "--precision, --remat and --frozen-bf16, on one device. Stops at the first non-finite "
        "loss, or when the smoothed loss exceeds --diverge times its minimum. Prints the "
        "suggested learning rate (steepest descent of the smoothed loss before its minimum) and "
        "writes OUT/lr_find.png and OUT/lr_find.json. Nothing else is written: no checkpoint, "
        "no run directory; the model is not changed.",
        formatter_class=_HelpFormatter,
    )
    _model_flag(lf)
    lf.add_argument("--recipe", default="full", help="one recipe (not a staged one)")
    lf.add_argument("--start-lr", type=float, default=1e-7, help="the first step's rate")
    lf.add_argument("--end-lr", type=float, default=10.0, help="the last step's rate")
    lf.add_argument("--steps", type=int, default=100, help="steps of the test")
    lf.add_argument("--diverge", type=float, default=4.0,
                    help="stop once the smoothed loss is this many times its least")  # fmt: skip
    lf.add_argument("--smoothing", type=float, default=0.98,
                    help="weight of the past in the loss's moving average")  # fmt: skip
    _run_flags(lf, "lr-find", skip=_NOT_FOR_LR_FIND)
    lf.set_defaults(max_steps=None, schedule="constant", warmup_ratio=0.0, eval_every=None,
                    evals_per_epoch=4, min_eval_interval=20, best_metric=None,
                    patience=None, max_bad_steps=5, shard_rule=[])  # fmt: skip

    ad = sub.add_parser(
        "adapt",
        help="domain adaptation from unlabeled target data: AdaBN, Tent, Deep CORAL, DANN",
        description="Fine-tune on the labeled --data (the source domain) for a target domain "
        "whose train split's inputs are read without labels (--target-data, or a built shift "
        "of --data with --target-shift), with each of --methods: source_only (plain "
        "fine-tuning, the baseline), coral (Deep CORAL: the head's input covariances pulled "
        "together), dann (a domain classifier behind a gradient reversal), and from the "
        "source-only model adabn (target BatchNorm statistics) and tent (the target "
        "predictions' entropy minimized on the BatchNorm affine params). Prints each method's "
        "source and target test accuracy (the target test labels score, never train) and "
        "writes OUT/adapt.json and OUT/adapt.png; each trained method runs in the Trainer in "
        "OUT/<method> (metrics.jsonl, checkpoints: --resume continues them; --mesh, "
        "--precision, --grad-accum, --remat, --l2-sp (not with dann) and the loggers apply; "
        "tent runs in memory with its own settings: 1 epoch of Adam 1e-3). Example: "
        "jaxtl adapt --model "
        "$(python -c 'import jaxtl; print(jaxtl.efficientnet_lite0_path())') --data digits "
        "--in-channels 1 --image-size 32 --num-labels 10 --target-shift invert --lr 1e-3",
        formatter_class=_HelpFormatter,
    )
    _model_flag(ad)
    ad.add_argument("--recipe", default="full", help="what trains (one plain recipe)")
    ad.add_argument("--target-data", help="the target domain, in --data's syntax (--text-column, "
                    "--label-column, --data-dir and --skip-corrupt apply to it too, where its "
                    "kind of source reads them; --splits does not)")  # fmt: skip
    ad.add_argument("--target-shift", choices=SHIFTS,
                    help="the target is --data shifted: every image (invert, rotate, noise) "
                    "or every word of the texts (typos: one typing slip each)")  # fmt: skip
    ad.add_argument("--methods", default="source_only,adabn,tent,coral,dann",
                    help="comma-separated, from source_only, adabn, tent, coral, dann")  # fmt: skip
    ad.add_argument("--weight", type=float, default=1.0,
                    help="the adaptation term's weight (CORAL's, DANN's reversal)")  # fmt: skip
    _run_flags(ad, "adapt", skip=_NOT_FOR_ADAPT)

    rk = sub.add_parser(
        "rank",
        help="score candidate models on a task before fine-tuning any of them",
        description="Transferability ranking: extract each candidate's frozen features (its "
        "head's input) once and score them with LogME (You et al. 2021), LEEP (Nguyen et al. "
        "2020; candidates with a source classification head, e.g. EfficientNet's ImageNet "
        "classes), a kNN probe and a linear probe (scikit-learn, validation accuracy or R^2). "
        "Higher is better for every score. Prints the ranked table with each score's time and "
        "writes OUT/rank.json and OUT/rank.png. Example: jaxtl rank --models "
        "minilm,minilm@drop=4,minilm@random --data vader",
        formatter_class=_HelpFormatter,
    )
    rk.add_argument(
        "--models",
        required=True,
        help="comma-separated candidates: a model directory or state dict file, or an embedded "
        "name (minilm, efficientnet-lite0), each optionally followed by @random (the same "
        "architecture, random weights) and/or @drop=K (its top K blocks removed)",
    )
    rk.add_argument(
        "--scores",
        default=",".join(SCORES),
        help="comma-separated scores to compute, from " + ", ".join(SCORES),
    )
    rk.add_argument(
        "--sort-by", choices=SCORES, default="logme", help="the score the table is ranked by"
    )
    rk.add_argument(
        "--out", help="directory for rank.json and rank.png (default: runs/rank-TIMESTAMP)"
    )
    rk.add_argument("--seed", type=int, default=0, help="seed of random candidates and of --shots")
    for flag, text, kwargs in _FINETUNE["data"]:
        if flag in _RANK_DATA_FLAGS:
            rk.add_argument(flag, help=_help_elsewhere(flag, text, "rank"), **kwargs)
    _add_model_args(rk, surgery=False)

    ge = sub.add_parser(
        "generate",
        help="continue text prompts with a causal LM or a fine-tuned causal_lm run",
        description="Continue each --prompt with MODEL_OR_RUN: a Hugging Face causal LM "
        "directory (GPT-2), or a run directory of `jaxtl finetune --task causal_lm` (its "
        "--checkpoint; a LoRA run's adapters merged). Prompts are tokenized with the model's "
        "tokenizer.json (or given as ids with --token-ids), batched with left padding, and "
        "decoded with a KV cache: greedy by default, sampled with --temperature > 0 (and "
        "--top-k / --top-p), reproducibly from --seed. Each row stops at the model's eos token.",
        formatter_class=_HelpFormatter,
    )
    ge.add_argument("model", metavar="MODEL_OR_RUN", help="model directory or run directory")
    ge.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    ge.add_argument(
        "--token-ids",
        action="append",
        help="a prompt as comma-separated token ids, for models without a tokenizer (repeatable)",
    )
    ge.add_argument("--max-new-tokens", type=int, default=32, help="tokens to add at most")
    ge.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    ge.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    ge.add_argument("--top-p", type=float, help="sample from the nucleus of this probability")
    ge.add_argument("--seed", type=int, help="the sampling seed (default: 0)")
    ge.add_argument("--json", help="also write the prompts, token ids and texts here")
    _checkpoint_arg(ge, default=None)

    ins = sub.add_parser(
        "inspect",
        help="summarize a model's params and what a recipe freezes",
        description="Load MODEL_DIR, print the load report and the transfer plan table of "
        "--recipe (groups, trainable or frozen, params, optimizer bytes).",
        formatter_class=_HelpFormatter,
    )
    ins.add_argument("model_dir", nargs="?", help="(default: the embedded MiniLM-L6)")
    ins.add_argument("--recipe", default="full", help="recipe whose plan table to print")
    ins.add_argument("--depth", type=int, default=3, help="path depth of the param tree summary")
    ins.add_argument(
        "--mesh",
        help="also show what one device holds of each group on this mesh, e.g. 'fsdp=64' or "
        "'data=4,fsdp=8,tensor=2' (any size: the devices need not be here; data defaults to 1)",
    )
    _add_model_args(ins)
    return parser


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
