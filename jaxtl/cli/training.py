"""The commands that train: ``finetune`` (and ``--preset digits``), ``sweep``, ``lr-find`` and
``adapt``. Each turns flags into library calls and prints their tables."""

from __future__ import annotations

import os
import sys

from jaxtl.cli.options import (
    check_data_flags,
    check_devices,
    data_options,
    data_spec,
    finetune_recipes,
    load_options,
    placement_options,
    preempted,
    train_config,
)
from jaxtl.cli.parser import finetune_options
from jaxtl.models.registry import data_modality


def finetune_command(args) -> int:
    import jaxtl
    from jaxtl import experiment, surgery
    from jaxtl.train.faults import Preempted

    if args.resume_from is not None:
        if args.resume_from < 1 or args.preset:
            raise ValueError(
                "--resume-from STEP takes a step >= 1 of one run's checkpoints"
                + (
                    " (with --preset, use --resume)."
                    if args.preset
                    else f", got {args.resume_from}."
                )
            )
        args.resume = args.resume_from
    if args.preset == "digits":
        return finetune_digits_command(args)
    if args.fail_on_negative_transfer and (args.no_scratch or args.task == "regression"):
        raise ValueError(
            "--fail-on-negative-transfer compares the pretrained arms' test accuracy with the "
            + ("scratch baseline's, which --no-scratch leaves out; drop one of the two flags."
               if args.no_scratch else "scratch baseline's, and a regression head has no "
               "accuracy; drop the flag (the table still compares their losses).")
        )  # fmt: skip
    check_devices(args)
    check_data_flags(args)
    recipes = finetune_recipes(args)
    model_path = args.model or jaxtl.default_model_dir()
    options = {**load_options(args), **placement_options(args)}
    config = train_config(args, epochs=1 if args.epochs is None else args.epochs)
    # Everything a user can get wrong is checked before the first compilation; an output
    # directory that cannot be written, before the model loads.
    out = experiment.experiment_dir(args.out, "finetune", resume=args.resume)
    # The new head is drawn with --seed (with --seeds, each pretrained run redraws it).
    model = surgery.load_model(model_path, pooling=args.pooling, seed=args.seed, **options)
    print(model.report)
    spec = data_spec(args, modality=data_modality(model))
    demo = args.data == "vader" and args.model is None
    try:
        done = experiment.compare(
            model,
            spec,
            recipes,
            config,
            out,
            load_options=options,
            scratch=not args.no_scratch,
            learning_rate=args.lr,
            resume=args.resume,
            long_texts=args.long_texts,
            demo=demo,
            seeds=args.seeds,
        )
    except Preempted as e:
        return preempted(e, args, out)
    print(f"\n{done.table}")
    if done.reference:
        print(
            "reference: transformers + PyTorch on the same split (batch 32, plain AdamW loop "
            "with constant LR, 3 epochs, final params); jaxtl's test column uses the best-"
            "validation checkpoint. See README.md for the matched comparison."
        )
    elif demo:
        ref = ", ".join(f"{k} {v}" for k, v in experiment.DEMO_REFERENCE.items())
        budget = f"{config.max_steps} step(s)" if config.max_steps else f"{config.epochs} epoch(s)"
        print(
            f"This run's budget is {budget}. Reference after 3 epochs "
            f"(transformers + PyTorch): {ref}.\nSame recipe in jaxtl: "
            "jaxtl finetune --epochs 3 --schedule constant --clip-norm 0  (results in README.md)"
        )
    print(f"\nrun directory: {os.path.abspath(out)}\n  plot: {done.plot}")
    if done.negative_transfer and args.fail_on_negative_transfer:
        names = ", ".join(c["arm"] for c in done.negative_transfer)
        print(f"negative transfer in {names}: exiting with status 3", file=sys.stderr)
        return 3
    return 0


# What --preset digits takes from jaxtl finetune's options; the flags it refuses with their own
# messages (--model, --data, --in-channels but 1, --shots, --seeds, --resume-from) are checked
# before the others.
PRESET_FLAGS = ("--epochs", "--seed", "--image-size", "--out", "--resume")
_CHECKED_FIRST = ("--preset", "--model", "--data", "--in-channels", "--shots", "--seeds",
                  "--resume-from")  # fmt: skip


def finetune_digits_command(args) -> int:
    from jaxtl import experiment, presets
    from jaxtl.train.faults import Preempted

    if args.model or args.data != "vader":
        raise ValueError("--preset digits chooses its own model and data; drop --model/--data.")
    if args.in_channels not in (None, 1):
        raise ValueError("--preset digits reads 1-channel digits; drop --in-channels.")
    if args.shots is not None or args.seeds is not None:
        raise ValueError(
            "--preset digits runs its own regimes (10 images per class and all) with "
            "--seed; drop --shots / --seeds."
        )
    ignored = [
        flag
        for dest, (flag, default) in finetune_options().items()
        if flag not in PRESET_FLAGS + _CHECKED_FIRST and getattr(args, dest, default) != default
    ]
    if ignored:
        raise ValueError(
            "--preset digits runs its own recipes, data and training settings and takes "
            f"only {', '.join(PRESET_FLAGS)}; drop {', '.join(ignored)}."
        )
    out = experiment.experiment_dir(args.out, "digits", resume=args.resume)
    image_size = args.image_size or 32
    try:
        table, _ = presets.run_digits(
            out,
            image_size=image_size,
            epochs=args.epochs,
            seed=args.seed,
            resume=args.resume,
        )
    except Preempted as e:
        return preempted(e, args, out)
    print(f"\n{table}")
    print(
        "EfficientNet-Lite0 (ImageNet weights) -> scikit-learn digits, 1-channel stem, "
        f"{image_size}x{image_size} inputs; test = the same 360 held-out digits for "
        "every run, scored with the best-validation checkpoint."
    )
    print(presets.reproducibility())
    print(f"\nrun directory: {os.path.abspath(out)}\n  plot: {os.path.join(out, 'comparison.png')}")
    return 0


def sweep_command(args) -> int:
    import json

    import jaxtl
    from jaxtl import experiment, surgery, sweep
    from jaxtl.data.spec import resolve

    grid = {
        "lrs": sweep.parse_grid(args.lr, "--lr"),
        "weight_decays": sweep.parse_grid(args.weight_decays, "--weight-decay"),
        "seeds": sweep.parse_grid(args.seeds, "--seeds"),
    }
    if args.seed is not None and args.shots is None:
        raise ValueError(
            f"--seed {args.seed} draws the --shots subset, and there is none; each cell's head, "
            f"dropout and data order come from --seeds (e.g. --seeds {args.seed})."
        )
    args.seed = args.seed or 0
    check_data_flags(args)
    check_devices(args)
    out = experiment.experiment_dir(args.out, "sweep", resumable=False)
    options = load_options(args)
    path = args.model or jaxtl.default_model_dir()
    models = {}

    def load(seed: int):  # each seed draws its own new head, as jaxtl finetune --seed does
        if seed not in models or models[seed].released:  # --release-pretrained: once per cell
            models[seed] = surgery.load_model(path, pooling=args.pooling, seed=seed, **options)
        return models[seed]

    first = load(grid["seeds"][0])
    spec = data_spec(args, modality=data_modality(first))
    data = resolve(spec, num_labels=options["num_labels"], task=args.task)
    args.weight_decay = grid["weight_decays"][0]  # each cell sets its own
    config = train_config(args, epochs=1 if args.epochs is None else args.epochs)
    common = dict(config=config, long_texts=args.long_texts, **grid)
    if sweep.vmappable(first, args.recipe) and not args.sequential:
        cells = sweep.sweep_heads(load, data, recipe=args.recipe, **common)
    else:
        if not args.sequential:
            print(
                f"sweep: {args.recipe} trains more than the head, so its cells run one after "
                "another (a vmapped sweep shares one frozen backbone: linear_probe)."
            )
        from jaxtl.train.faults import Preempted

        try:
            cells = sweep.sweep_sequential(
                load, data, recipe=args.recipe, workdir=os.path.join(out, "cells"), **common
            )
        except Preempted as e:  # no --resume: say so, rather than offer one
            print(
                f"\n{e.signal}: the sweep stopped after step {e.step} of a cell. jaxtl sweep does "
                f"not resume (the cells' runs so far are in {os.path.join(out, 'cells')}): run "
                "it again with another --out, or with fewer --lr / --weight-decay / --seeds.",
                file=sys.stderr,
            )
            return 0
    print(f"\n{sweep.format_table(cells)}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({"recipe": args.recipe, "data": spec, "cells": [c.to_dict() for c in cells]},
                  f, indent=2)  # fmt: skip
    finished = [c for c in cells if c.error is None and c.validation]
    if not finished:
        raise ValueError("no cell of the sweep finished: lower --lr (see the notes above).")
    best = sweep.best_cell(finished)
    print(
        f"best (by validation): --lr {best.learning_rate:g} --weight-decay "
        f"{best.weight_decay:g} --seed {best.seed}"
    )
    plot = sweep.plot(finished, os.path.join(out, "sweep.png"))
    print(f"\nwritten: {os.path.join(out, 'sweep.json')}\n  plot: {plot}")
    return 0


def lr_find_command(args) -> int:
    import jaxtl
    from jaxtl import experiment, lr_find, surgery
    from jaxtl.data.spec import resolve

    lr_find.check_options(args.start_lr, args.end_lr, args.steps, args.diverge, args.smoothing)
    check_devices(args)
    check_data_flags(args)
    out = experiment.experiment_dir(args.out, "lr-find", resumable=False)
    options = load_options(args)
    model = surgery.load_model(
        args.model or jaxtl.default_model_dir(), pooling=args.pooling, seed=args.seed, **options
    )
    spec = data_spec(args, modality=data_modality(model))
    data = resolve(spec, num_labels=options["num_labels"], task=args.task)
    found = lr_find.lr_find(
        model,
        args.recipe,
        data,
        train_config(args, epochs=1),
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        num_steps=args.steps,
        diverge=args.diverge,
        beta=args.smoothing,
        long_texts=args.long_texts,
    )
    path, plot = lr_find.write(found, out)
    print(f"lr_find: {len(found.lrs)} steps ({found.stopped}) in {found.seconds:.1f} s")
    if found.suggestion is None:
        print("no suggestion: the loss never fell; widen --start-lr / --end-lr or add --steps.")
    else:
        print(
            f"suggested learning rate: {found.suggestion:.2e} (steepest descent); the lowest "
            f"loss came at {found.min_lr:.2e} (a tenth of it, {found.min_lr / 10:.2e}, is the "
            f"other common choice). Use it with: jaxtl finetune --recipe {args.recipe} "
            f"--lr {found.suggestion:.2e}"
        )
    print(f"\nwritten: {path}\n  plot: {plot}")
    return 0


def adapt_command(args) -> int:
    import dataclasses

    import jaxtl
    from jaxtl import domain, experiment, surgery
    from jaxtl.data import shifts
    from jaxtl.data.spec import describe, refuse_unread, resolve

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    domain.check_methods(methods)
    if (args.target_data is None) == (args.target_shift is None):
        raise ValueError(
            "domain adaptation needs the target domain: give --target-data (its inputs are "
            "read without labels) or --target-shift (--data shifted: its images inverted, "
            "rotated or noisy, or its texts with typos), one of them."
        )
    if args.task != "classification":
        raise ValueError("jaxtl adapt trains a classification head (--task classification).")
    if args.target_shift:  # (with --target-data, the flags are checked against both sources)
        check_data_flags(args)
    out = experiment.experiment_dir(args.out, "adapt", resume=args.resume)
    options = load_options(args)
    path = args.model or jaxtl.default_model_dir()
    model = surgery.load_model(path, pooling=args.pooling, seed=args.seed, **options)
    modality = data_modality(model)
    # The data options are --data's, and --target-data's where its kind of source reads them
    # (--splits excepted): each must be read by one of the two.
    source_spec = data_spec(args, modality, strict=args.target_shift is not None)
    target_spec = None
    if args.target_data is not None:
        shared = {**data_options(args), "splits": None}
        target_spec = describe(args.target_data, **shared, modality=modality, strict=False)
        source_name = f"--data {args.data}"
        refuse_unread({"splits": args.splits}, {source_name: source_spec})
        refuse_unread(shared, {source_name: source_spec,
                               f"--target-data {args.target_data}": target_spec})  # fmt: skip
    source = resolve(source_spec, num_labels=options["num_labels"], task="classification")
    if args.target_shift:
        target = shifts.shifted(source, args.target_shift, seed=args.seed)
    else:
        target = resolve(target_spec, num_labels=options["num_labels"], task="classification")
    lr = args.lr or experiment.default_learning_rate(args.recipe)
    config = train_config(args, epochs=1 if args.epochs is None else args.epochs)
    config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, learning_rate=lr))
    load = lambda: surgery.load_model(path, pooling=args.pooling, seed=args.seed, **options)  # noqa: E731
    from jaxtl.train.faults import Preempted

    try:
        rows = domain.compare(load, source, target, methods, recipe=args.recipe, config=config,
                              weight=args.weight, workdir=out, resume=args.resume)  # fmt: skip
    except Preempted as e:
        return preempted(e, args, out)
    print(f"\n{domain.table(rows)}\nsource: {source.name}; target: {target.name} (its train "
          "split read without labels; its test labels only score)")  # fmt: skip
    facts = {"recipe": args.recipe, "learning_rate": lr, "weight": args.weight}
    written, plot = domain.write(rows, out, source.name, target.name, facts)
    print(f"\nwritten: {written}\n  plot: {plot}")
    return 0
