"""The commands that read a model or a finished run: ``evaluate``, ``export``, ``generate``,
``wise-ft``, ``soup``, ``rank`` and ``inspect``."""

from __future__ import annotations

import math
import os

from jaxtl.cli.options import check_data_flags, data_spec, head_labels, surgery_options


def evaluate_command(args) -> int:
    from jaxtl import report, run

    dirs = run.run_dirs(args.run_dir)
    rows, results = [], []
    for d in dirs:
        r = run.evaluate_run(d, args.checkpoint)
        results.append(r)
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
    for d, r in zip(dirs, results, strict=True):
        details = report.detail_table(r["test"])
        if details:
            print(f"\n{os.path.basename(d)}, test split:\n{details}")
    return 0


def export_command(args) -> int:
    from jaxtl import run

    written = run.export_run(
        args.run_dir,
        args.out,
        which=args.checkpoint,
        adapters=args.adapters,
        overwrite=args.overwrite,
    )
    what = "LoRA adapters (PEFT layout)" if args.adapters else "model (source format)"
    print(f"wrote the {what} of {args.run_dir} ({args.checkpoint} checkpoint) to {written}")
    return 0


def generate_command(args) -> int:
    import json

    import numpy as np

    import jaxtl
    from jaxtl import run

    # Options first: a bad one is reported before anything loads or compiles.
    sampling = jaxtl.Sampling(args.temperature, args.top_k, args.top_p)
    if sampling.greedy and args.seed is not None:
        raise ValueError(
            f"--seed {args.seed} seeds sampling, and --temperature 0 (the default) decodes "
            "greedily, the same whatever the seed; give a temperature > 0, or drop --seed."
        )
    if bool(args.prompt) == bool(args.token_ids):
        raise ValueError("generate needs prompts: --prompt TEXT or --token-ids 1,2,3 (not both).")
    if args.json:
        from jaxtl.train.faults import writable_file

        args.json = writable_file(args.json, "--json")
    if os.path.isfile(os.path.join(args.model, "run.json")):
        which = args.checkpoint or "best"
        restored = run.restore_run(args.model, which, weights_only=True)
        model, params = restored.model, restored.state.params
        where = f"{args.model} ({which} checkpoint, step {restored.step})"
    elif args.checkpoint is not None:
        raise ValueError(
            f"--checkpoint {args.checkpoint} picks one of a run's checkpoints, and {args.model} "
            "is a model directory (it has no run.json); drop --checkpoint."
        )
    else:
        model = jaxtl.load(args.model, task="causal_lm")
        params, where = model.params, args.model
    if "decoder" not in model.extras:
        raise ValueError(
            f"{args.model} is a {model.family} model for task={model.task!r}; generate needs a "
            "causal LM (a GPT-2 directory, or a run of jaxtl finetune --task causal_lm)."
        )
    tok = model.extras.get("tokenizer")
    if args.prompt:
        if tok is None:
            raise ValueError(
                f"{args.model} has no tokenizer.json: give the prompts as ids (--token-ids)."
            )
        rows = [tok.encode(text, add_special_tokens=False).ids for text in args.prompt]
    else:
        try:
            rows = [[int(x) for x in ids.split(",") if x.strip()] for ids in args.token_ids]
        except ValueError:
            raise ValueError(
                f"--token-ids takes comma-separated integers, got {args.token_ids}"
            ) from None
    if not all(rows):
        raise ValueError("A prompt is empty (no tokens); give every --prompt some text.")
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):  # left padding, as generate keeps it
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    out = jaxtl.generate(
        model,
        params,
        ids,
        mask,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed or 0,
    )
    how = "greedy" if sampling.greedy else f"sampled (seed {args.seed or 0})"
    print(f"{where}: {args.max_new_tokens} new tokens at most, {how}")
    eos = model.extras["decoder"].eos_token_id
    eos = set(np.atleast_1d(eos).tolist()) if eos is not None else set()
    results = []
    for i, row in enumerate(rows):
        new = out[i, width:].tolist()
        end = next((j for j, t in enumerate(new) if t in eos), None)
        new = new if end is None else new[: end + 1]  # the eos, not the padding after it
        text = tok.decode(new, skip_special_tokens=True) if tok is not None else None
        prompt = args.prompt[i] if args.prompt else args.token_ids[i]
        print(f"\n[{i}] {prompt}\n -> {text if text is not None else new}")
        results.append({"prompt": prompt, "prompt_ids": row, "new_ids": new, "text": text})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def wise_ft_command(args) -> int:
    from jaxtl import ensembles

    ensembles.wise_ft(args.run_dir, args.alphas, out=args.out, which=args.checkpoint)
    return 0


def soup_command(args) -> int:
    from jaxtl import ensembles

    ensembles.soup(args.run_dirs, out=args.out, which=args.checkpoint)
    return 0


def rank_command(args) -> int:
    from jaxtl import experiment, ranking

    scores = [s.strip() for s in args.scores.split(",") if s.strip()]
    candidates = [ranking.parse_candidate(m) for m in args.models.split(",")]
    ranking.check_scores(scores)  # a misspelled score first, not as "--sort-by is not among"
    if args.sort_by not in scores:
        raise ValueError(f"--sort-by {args.sort_by} is not among --scores {args.scores!r}.")
    check_data_flags(args)
    out = experiment.experiment_dir(args.out, "rank", resumable=False)
    done = ranking.rank(
        candidates,
        lambda modality: data_spec(args, modality),
        task=args.task,
        num_labels=head_labels(args),
        scores=scores,
        out=out,
        seed=args.seed,
        pooling=args.pooling,
        image_size=args.image_size,
        in_channels=args.in_channels,
    )
    print(f"\n{done.table(args.sort_by)}")
    print(
        "Higher is better. LogME and LEEP: training split; kNN and linear probe: fit on the "
        "training split, scored on validation. (#N) is the rank by that score."
    )
    print(f"\nwritten: {os.path.join(out, 'rank.json')}\n  plot: {os.path.join(out, 'rank.png')}")
    return 0


def inspect_command(args) -> int:
    import jaxtl
    from jaxtl import report, surgery
    from jaxtl.run import with_adapters

    model_dir = args.model_dir or jaxtl.default_model_dir()
    num_labels = head_labels(args)
    model = surgery.load_model(
        model_dir,
        task=args.task,
        num_labels=num_labels,
        pooling=args.pooling,
        **surgery_options(args),
    )
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
    plan = jaxtl.make_plan(args.recipe or "full", model.structure)
    model = with_adapters(model, plan, seed=0)  # a LoRA recipe's table shows its adapters
    pieces = None
    if args.mesh:
        from jaxtl import parallel, sharding

        sizes = parallel.parse_mesh(args.mesh, None)  # a mesh planned, not this machine's
        pieces = sharding.piece_counter(model.params, sizes, structure=model.structure)
        print(f"mesh: {args.mesh} = {sizes} ({math.prod(sizes.values())} devices)")
    print(plan.table(model.params, pieces=pieces))
    return 0
