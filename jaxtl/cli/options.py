"""Parsed flags -> library options: the model's load options, :class:`~jaxtl.TrainConfig`,
the data spec and sharding rules, the device checks made before anything loads, and how a
preempted command resumes."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from jaxtl.cli.parser import DEFAULT_RECIPES, build_parser


def load_options(args) -> dict:
    """--task, --num-labels, --image-size, --in-channels, --head and --drop-blocks as
    :func:`jaxtl.surgery.load_model` options (``pooling`` and ``seed`` apart)."""
    return {
        "task": args.task,
        "num_labels": head_labels(args),
        "image_size": args.image_size,
        "in_channels": args.in_channels,
        **surgery_options(args),
    }


# The tasks whose head width is fixed, and what fixes it.
_FIXED_WIDTH = {
    "regression": "one real-valued output",
    "causal_lm": "logits over the model's vocabulary",
    "question_answering": "a start and an end logit per token",
}


def head_labels(args) -> int:
    """``--num-labels`` (default 2), or the width ``--task`` fixes (1 for regression). A
    ``--num-labels`` that the task would ignore is refused rather than dropped in silence.

    Example:
      >>> head_labels(argparse.Namespace(task="regression", num_labels=None))
      1
      >>> head_labels(argparse.Namespace(task="regression", num_labels=3))
      Traceback (most recent call last):
      ...
      ValueError: --task regression has one real-valued output, so --num-labels 3 does not ...
    """
    given = getattr(args, "num_labels", None)
    task = getattr(args, "task", "classification")
    if task in _FIXED_WIDTH:
        if given is not None and not (task == "regression" and given == 1):
            raise ValueError(
                f"--task {task} has {_FIXED_WIDTH[task]}, so --num-labels {given} does not "
                "apply; drop --num-labels."
            )
        return 1 if task == "regression" else 2
    return 2 if given is None else given


def placement_options(args) -> dict:
    """--mesh and --shard-rule as load options when the train state splits params (a mesh
    with ``fsdp`` or ``tensor`` above 1, or sharding rules): the model loads straight into the
    shards its train state holds (:func:`jaxtl.load`'s ``mesh``), so no device ever holds it
    whole. Not with --feature-cache, which computes the frozen prefix's features with the
    whole model."""
    from jaxtl.sharding import load_placement

    if getattr(args, "feature_cache", None):
        return {}
    return load_placement(args.mesh, sharding_rules(args))


def surgery_options(args) -> dict:
    """--head, --drop-blocks and --tower as :func:`jaxtl.surgery.load_model` options."""
    out = {"head": args.head} if args.head else {}
    if getattr(args, "tower", None):
        out["tower"] = args.tower
    if args.drop_blocks:
        out["drop_blocks"] = args.drop_blocks
    return out


def preempted(e, args, out: str) -> int:
    """A run stopped by SIGTERM / Ctrl-C after checkpointing: say how to go on; exit 0."""
    print(f"\n{e}", file=sys.stderr)
    if e.workdir:
        print(f"resume with: {resume_command(args.argv, out)}", file=sys.stderr)
    return 0


def resume_command(argv: list[str], out: str) -> str:
    """The command line that continues ``argv``'s experiment in ``out``.

    Example:
      >>> resume_command(["finetune", "--epochs", "3", "--out", "a"], "a")
      'jaxtl finetune --epochs 3 --out a --resume'
      >>> resume_command(["finetune", "--resume", "--out=a"], "a")
      'jaxtl finetune --out a --resume'
    """
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif a != "--resume" and not a.startswith("--out="):
            kept.append(a)
    return shlex.join(["jaxtl", *kept, "--out", out, "--resume"])


def check_devices(args) -> None:
    """``--mesh``, ``--batch-size`` and ``--grad-accum`` against this machine's devices, before
    any model is read or step compiled."""
    import jax

    from jaxtl import parallel
    from jaxtl.train import ScaleConfig

    # Axis names in the rules, grad_accum >= 1, a known remat policy and precision:
    ScaleConfig(
        sharding_rules=sharding_rules(args),
        grad_accum=args.grad_accum,
        remat=args.remat,
        precision=args.precision,
    )
    sizes = parallel.parse_mesh(args.mesh, jax.device_count())
    shards = parallel.batch_shards(sizes)
    parallel.check_batch_size(args.batch_size, shards, grad_accum=args.grad_accum)
    if args.feature_cache and (args.remat or args.precision != "float32"):
        raise ValueError(
            "--feature-cache trains a tail model whose forward cannot be rebuilt for --remat "
            "or --precision; drop one of them."
        )


def finetune_recipes(args) -> list[str]:
    """The recipes ``jaxtl finetune`` runs on the pretrained model: ``--rules FILE``'s, else
    ``--recipe``'s, else :data:`DEFAULT_RECIPES`. A ``--recipe`` that names none (``""``) is
    refused rather than read as the default."""
    from jaxtl.transfer.recipes import split_recipes

    if getattr(args, "rules", None):
        return [f"rules({os.path.abspath(args.rules)!r})"]
    if args.recipe is None:
        return split_recipes(DEFAULT_RECIPES)
    recipes = split_recipes(args.recipe)
    if not recipes:
        raise ValueError(
            f"--recipe {args.recipe!r} names no recipe; give one or more, e.g. --recipe "
            f"full,lora(8), or leave the flag out for the default ({DEFAULT_RECIPES})."
        )
    return recipes


def release_pretrained(args) -> bool:
    """``--release-pretrained`` / ``--no-release-pretrained``, or by default on for the verbs
    that take the flag (``finetune``, ``sweep``: the process has no other use for the loaded
    params, and a run that needs them loads the model again), unless a recipe is staged
    (``gradual``, ``lp_ft``: their later stages start from the loaded params). ``lr-find`` and
    ``adapt`` reuse the loaded model: never."""
    from jaxtl.transfer.recipes import staged

    chosen = getattr(args, "release_pretrained", False)
    if chosen is False:
        return False
    if getattr(args, "rules", None):  # a rules file's plan has no stages
        return True
    stepped = [r for r in finetune_recipes(args) if staged(r)]
    if chosen and stepped:  # refused before anything loads, not when that arm's turn comes
        raise ValueError(
            f"--release-pretrained drops the loaded params once a run's train state holds "
            f"them, but {stepped[0]}'s later stages start from them; drop the flag (staged "
            "recipes keep them by default)."
        )
    return not stepped


def train_config(args, epochs: int):
    """The :class:`jaxtl.TrainConfig` that ``jaxtl finetune``'s flags describe (a verb that
    does not take one of them gets finetune's default)."""
    import jaxtl

    release = release_pretrained(args)
    defaults = vars(build_parser().parse_args(["finetune"]))
    args = argparse.Namespace(**{**defaults, **vars(args)})

    return jaxtl.TrainConfig(
        epochs=epochs,
        max_steps=args.max_steps,
        seed=0 if args.seed is None else args.seed,  # sweep: each cell sets its own
        max_bad_steps=args.max_bad_steps,
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        schedule=args.schedule,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm or None,
        l2_sp=args.l2_sp,
        eval_every=args.eval_every,
        evals_per_epoch=args.evals_per_epoch,
        min_eval_interval=args.min_eval_interval,
        best_metric=args.best_metric,
        early_stopping=None
        if args.patience is None
        else jaxtl.EarlyStopping(patience=args.patience),
        compress_checkpoints=args.compress_checkpoints,
        augment=args.augment,
        mixup=args.mixup,
        cutmix=args.cutmix,
        label_smoothing=args.label_smoothing,
        data_workers=args.data_workers,
        bucket_by_length=args.bucket_by_length,
        feature_cache=args.feature_cache,
        mesh=args.mesh,
        sharding_rules=sharding_rules(args),
        grad_accum=args.grad_accum,
        remat=args.remat,
        precision=args.precision,
        frozen_bf16=args.frozen_bf16,
        release_pretrained=release,
        loggers=[n for n in ("tensorboard", "wandb") if getattr(args, n, False)],
    )


def sharding_rules(args) -> list[tuple[str, object]]:
    """The ``--shard-rule`` flags, then a ``--rules`` file's ``[[shard]]`` rules."""
    rules = [shard_rule(r) for r in args.shard_rule]
    if getattr(args, "rules", None):
        from jaxtl.transfer.rules_file import read_rules_file

        if args.recipe:
            raise ValueError("give --rules FILE or --recipe, not both (the file is the recipe).")
        rules += list(read_rules_file(args.rules).sharding)
    return rules


def shard_rule(text: str) -> tuple[str, object]:
    """``--shard-rule 'REGEX=SPEC'`` -> ``(regex, spec)`` for :class:`jaxtl.ScaleConfig`.

    Example:
      >>> shard_rule(r".*/kernel=fsdp,none"), shard_rule("classifier/.*=replicated")
      (('.*/kernel', ('fsdp', None)), ('classifier/.*', 'replicated'))
      >>> shard_rule("x=data+fsdp")
      ('x', (('data', 'fsdp'),))
    """
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern or not spec:
        raise ValueError(
            f"--shard-rule {text!r} is not PATH_REGEX=SPEC, e.g. '.*/kernel=fsdp,none'."
        )
    if spec in ("fsdp", "replicated"):
        return pattern, spec
    entries: list = []
    for entry in spec.split(","):
        axes = tuple(a.strip() for a in entry.split("+") if a.strip())
        if not axes or axes == ("none",) or axes == ("None",):
            entries.append(None)
        else:
            entries.append(axes[0] if len(axes) == 1 else axes)
    return pattern, tuple(entries)


def data_spec(args, modality: str, strict: bool = True) -> dict:
    """The JSON description of ``--data`` that a run directory records (jaxtl.data.describe).
    ``strict``: refuse the data options that this source does not read."""
    from jaxtl.data import describe, with_shots

    # Flags that contradict each other or that the source does not read: a ValueError (exit 2),
    # before the data is read or anything compiles.
    spec = describe(args.data, **data_options(args), modality=modality, strict=strict)
    return with_shots(spec, args.shots, seed=args.seed)


def check_data_flags(args) -> None:
    """:func:`data_spec`'s refusals before the model loads, where they do not depend on it: a
    source that is not a directory is read the same by every model (a directory is an image or
    an audio folder by the model's modality, checked once it is known)."""
    if not os.path.isdir(args.data):
        data_spec(args, modality="text")


def data_options(args) -> dict:
    """The data flags as :func:`jaxtl.data.describe`'s arguments."""
    return {"data_dir": args.data_dir, "splits": args.splits, "input_column": args.text_column,
            "label_column": args.label_column, "skip_corrupt": args.skip_corrupt}  # fmt: skip


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
