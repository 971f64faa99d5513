"""The `jaxtl` command: help, clear errors before compiling, and a small end-to-end run."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from _tiny import files_under, make_tiny_bert, minilm_dir, read_json, write_vader_csv

import jaxtl
from jaxtl import cli
from jaxtl.cli import options


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("cli") / "bert"))


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory):
    return write_vader_csv(tmp_path_factory.mktemp("data") / "words.csv", 200)


def _err(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    return err


@pytest.mark.parametrize("command", [[], ["finetune"], ["evaluate"], ["inspect"], ["export"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: jaxtl" in out


def test_the_exit_status_is_in_the_help_and_the_readme(capsys):
    from jaxtl.cli.parser import EXIT_STATUS

    for command in ([], ["finetune"]):
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        assert EXIT_STATUS in " ".join(capsys.readouterr().out.split())
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")) as f:
        said = " ".join(f.read().split())
    assert (
        "**Exit status** (`jaxtl --help` says the same): 0 when the command finished, or when "
        "SIGTERM / Ctrl-C stopped it after a checkpoint (it prints the command that resumes); 1 "
        "for a run that diverged (`--max-bad-steps`) or could not save; 2 for bad input, "
        "refused before anything trains; 3 for negative transfer under "
        "`--fail-on-negative-transfer`."
    ) in said


def _verbs() -> dict:
    import argparse

    from jaxtl.cli.parser import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


@pytest.mark.parametrize("verb", sorted(_verbs()))
def test_every_verbs_help_shows_each_options_default(verb):
    """An option that has a default says it in its --help (argparse's "(default: X)" or the
    help's own words), and speaks of its own command: sweep's --out is runs/sweep-TIMESTAMP,
    not finetune's, and only finetune's help speaks of --preset."""
    parser = _verbs()[verb]
    shown = parser.format_help()
    for action in parser._actions:
        unset = action.default in (None, False, [], "==SUPPRESS==")
        if not action.option_strings or unset or action.help is None:
            continue
        text = parser._get_formatter()._expand_help(action)
        assert "default" in text, (verb, action.option_strings, text)
    if "--out" in shown and verb in ("sweep", "lr-find", "adapt", "rank"):
        assert f"runs/{verb}-TIMESTAMP" in shown and "runs/finetune-" not in shown
    assert ("--preset" in shown) == (verb == "finetune"), verb


def test_finetune_help_names_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--model",
        "--data",
        "--recipe",
        "--epochs",
        "--batch-size",
        "--lr",
        "--out",
        "--resume",
    ):
        assert flag in out


def test_missing_model_directory(capsys, tmp_path):
    err = _err(capsys, ["finetune", "--model", str(tmp_path / "nope")])
    assert "nope" in err and "not" in err.lower()


def test_a_missing_model_directory_names_the_flag(capsys, tmp_path):
    err = _err(capsys, ["finetune", "--model", str(tmp_path / "absent"), "--out", str(tmp_path)])
    assert "does not exist. jaxtl.load(path) (--model) expects a local Hugging Face" in err


def test_unsupported_architecture(capsys, tmp_path):
    d = tmp_path / "t5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    err = _err(capsys, ["inspect", str(d)])
    assert "t5" in err and "bert" in err.lower()


def test_labels_outside_num_labels(capsys, tmp_path, tiny_dir):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"word{i},{i % 4}\n" for i in range(40)))
    err = _err(
        capsys, ["finetune", "--model", tiny_dir, "--data", str(p), "--out", str(tmp_path / "o")]
    )
    assert "[0, 2)" in err and "--num-labels 4" in err
    assert not os.path.exists(tmp_path / "o")  # failed before anything ran


def test_empty_dataset(capsys, tmp_path, tiny_dir):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n")
    assert "no rows" in _err(capsys, ["finetune", "--model", tiny_dir, "--data", str(p)])


def test_csv_without_the_named_columns(capsys, tmp_path, tiny_dir):
    p = tmp_path / "d.csv"
    p.write_text("sentence,y\nhello,1\n")
    err = _err(capsys, ["finetune", "--model", tiny_dir, "--data", str(p)])
    assert "'text'" in err and "--text-column" in err


def test_unknown_recipe(capsys, tiny_dir, csv_data):
    err = _err(
        capsys,
        [
            "finetune",
            "--model",
            tiny_dir,
            "--data",
            csv_data,
            "--text-column",
            "word",
            "--label-column",
            "sentiment",
            "--recipe",
            "everything",
        ],
    )
    assert "everything" in err and "linear_probe" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mesh", "fsdp=2"], "mesh (--mesh) fsdp=2 needs a multiple of 2 devices; there are 1"),
        (["--mesh", "model=1"], "names axis 'model'"),
        (["--batch-size", "32", "--grad-accum", "3"], "grad_accum (--grad-accum) = 3"),
        (["--shard-rule", ".*/kernel=model"], "names mesh axis 'model'"),
        (["--shard-rule", "fsdp"], "--shard-rule 'fsdp' is not PATH_REGEX=SPEC"),
        (["--feature-cache", "memory", "--remat", "full"], "--feature-cache trains a tail"),
        (["--no-scratch", "--fail-on-negative-transfer"], "which --no-scratch leaves out"),
        # Values that would train wrongly rather than fail (gradient ascent, growing weights,
        # a run other than asked for):
        (["--clip-norm", "-1"], "clip_norm (--clip-norm) must be > 0, or None to clip nothing "
         "(--clip-norm 0), got -1.0."),
        (["--weight-decay", "-1"], "weight_decay (--weight-decay) must be >= 0, got -1.0."),
        (["--epochs", "0"], "epochs (--epochs) must be >= 1, got 0."),
        (["--patience", "0"], "patience (--patience) must be >= 1, got 0."),
        (["--recipe", "linear_probe,linear_probe"], "recipes (--recipe) lists 'linear_probe' "
         "twice"),
        # Errors in the user's terms: the flag, and what it takes.
        (["--data", "no-such.csv"], "(data / --data). Pass an existing .csv or .jsonl file, an "
         "image or audio folder, tfds:NAME, hf:DIR, or an embedded set: vader,"),
        (["--recipe", "nope"], "unknown transfer recipe 'nope' in recipe (--recipe) 'nope'"),
        (["--data", "digits"], "The 'bert' model (--model) reads text, not the images of "
         "'digits' (--data): pass an image model"),
        (["--augment", "bogus"], "Unknown augmentation 'bogus' in augment (--augment)"),
        (["--label-smoothing", "1.5"], "label_smoothing (--label-smoothing) must be in [0, 1)"),
        (["--num-labels", "0"], "num_labels (--num-labels) must be an integer >= 1"),
        (["--task", "regression", "--num-labels", "1", "--fail-on-negative-transfer"],
         "a regression head has no accuracy; drop the flag"),
        # A flag the run would not use is refused, not dropped in silence:
        (["--task", "regression", "--num-labels", "2"], "--task regression has one real-valued "
         "output, so --num-labels 2 does not apply; drop --num-labels."),
        (["--task", "question_answering", "--num-labels", "3"], "--task question_answering "
         "has a start and an end logit per token, so --num-labels 3 does not apply"),
        (["--recipe", ""], "--recipe '' names no recipe; give one or more, e.g. --recipe "
         "full,lora(8), or leave the flag out for the default (full,linear_probe)."),
        (["--recipe", " , "], "--recipe ' , ' names no recipe"),
        # A flag the source would not read (after the model, before the data is read):
        (["--label-column", "y"], "label_column / --label-column applies to a .csv / .jsonl "
         "file or tfds:NAME or hf:DIR only; --data vader does not read it: drop --label-column."),
    ],
)  # fmt: skip
def test_bad_mesh_batch_and_sharding_flags_fail_before_training(
    capsys, tmp_path, tiny_dir, flags, message
):
    out = tmp_path / "o"
    err = _err(capsys, ["finetune", "--model", tiny_dir, "--out", str(out), *flags])
    assert message in err
    assert not os.path.exists(out)  # refused before any run started


@pytest.mark.parametrize("verb", [["finetune"], ["sweep"], ["lr-find"], ["rank", "--models",
                                  "absent"], ["adapt", "--target-shift", "typos"]])  # fmt: skip
def test_data_flags_are_refused_before_the_model_is_looked_for(verb, tmp_path, capsys):
    model = [] if verb[0] == "rank" else ["--model", str(tmp_path / "absent")]
    assert cli.main([*verb, *model, "--data", "digits", "--text-column", "t"]) == 2
    err = capsys.readouterr().err
    assert "--data digits does not read it: drop --text-column" in err and "absent" not in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "vader-tags", "--text-column", "t"], "input_column / --text-column applies "
         "to a .csv / .jsonl file or tfds:NAME or hf:DIR only; --data vader-tags does not"),
        (["--data", "digits", "--splits", "a,b,c"], "splits / --splits applies to tfds:NAME or "
         "hf:DIR only; --data digits does not read it: drop --splits."),
        (["--data", "words.csv", "--skip-corrupt"], "skip_corrupt / --skip-corrupt applies to an "
         "image folder or an audio folder only; --data words.csv"),
        (["--data", "digits-segmentation", "--data-dir", "d"], "data_dir / --data-dir applies "
         "to tfds:NAME only"),
    ],
)  # fmt: skip
def test_data_flags_that_the_source_does_not_read_are_refused(flags, message):
    # The same check for every verb that reads --data (finetune, sweep, lr-find, adapt, rank).
    args = cli.build_parser().parse_args(["finetune", *flags])
    with pytest.raises(ValueError, match=re.escape(message)):
        options.data_spec(args, modality="text")


def test_inspect_shows_per_device_bytes_of_a_planned_mesh(capsys):
    assert cli.main(["inspect", minilm_dir(), "--mesh", "fsdp=8,model=2"]) == 2
    assert "names axis 'model'" in capsys.readouterr().err
    assert cli.main(["inspect", minilm_dir(), "--mesh", "fsdp=8"]) == 0
    out = capsys.readouterr().out
    assert "'fsdp': 8" in out and "params/device" in out
    # MiniLM's 86 MiB of params: about 1/8 per device (biases and norms stay whole).
    assert re.search(r"per device: params 1[01]\.\d MiB", out), out


def test_inspect_prints_the_plan(capsys):
    assert cli.main(["inspect", minilm_dir(), "--recipe", "last_n(2)"]) == 0
    out = capsys.readouterr().out
    assert "bert/encoder/layer_5" in out or "layer_5" in out
    assert "frozen" in out and "trainable" in out


@pytest.mark.slow
def test_finetune_then_evaluate(capsys, tmp_path, tiny_dir, csv_data):
    out = str(tmp_path / "run")
    argv = [
        "finetune",
        "--model",
        tiny_dir,
        "--data",
        csv_data,
        "--text-column",
        "word",
        "--label-column",
        "sentiment",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--recipe",
        "full,linear_probe",
        "--out",
        out,
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "pretrained full" in printed and "scratch full" in printed and "run directory" in printed
    # The same command again, without --resume, would write over the finished runs: refused
    # before the model is loaded, every file as it was.
    saved = files_under(out)
    err = _err(capsys, argv)
    assert f"out (--out) {out!r} already holds the results of an earlier run" in err
    assert "Continue it with --resume" in err and "Nothing was changed" in err
    assert files_under(out) == saved
    # export, wise-ft and soup take one run: given the experiment, they name its runs.
    runs = "['pretrained-full', 'pretrained-linear_probe', 'scratch-full']"
    for verb in (["export", out, str(tmp_path / "exported")], ["wise-ft", out], ["soup", out, out]):
        err = _err(capsys, verb)
        assert f"is an experiment directory (--out) holding the runs {runs}: pass one" in err
    assert os.path.exists(os.path.join(out, "comparison.png"))
    summary = read_json(os.path.join(out, "summary.json"))
    assert [r["name"] for r in summary["results"]] == [
        "pretrained full",
        "pretrained linear_probe",
        "scratch full",
    ]
    # The negative-transfer guard compared each pretrained arm with scratch, by its rule.
    checks = summary["negative_transfer"]
    assert [c["arm"] for c in checks] == ["pretrained full", "pretrained linear_probe"]
    for c in checks:
        assert c["flagged"] == (c["scratch_accuracy"] - c["accuracy"] > c["noise"])
        assert ("WARNING: negative transfer: " + c["arm"] in printed) == c["flagged"]

    assert cli.main(["evaluate", out]) == 0
    table = capsys.readouterr().out
    for r in summary["results"]:
        name = os.path.basename(r["workdir"])
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
        assert f"{r['test']['accuracy']:.4f}" in row  # the best checkpoint re-scores identically
        # ... and so do its detailed metrics, printed below the table for each run.
        details = table.split(f"\n{name}, test split:\n", 1)[1]
        assert details.startswith(f"macro_f1: {r['test']['macro_f1']:.4f}\n")
        assert f"ece: {r['test']['calibration']['ece']:.4f}" in details
        header = [c.strip() for c in details.splitlines()[2].strip("|").split("|")]
        assert header == ["class", "precision", "recall", "f1", "support"], details
        names = [line.split("|")[1].strip() for line in details.splitlines()[4:6]]
        assert names == list(r["test"]["per_class"]) == ["neg", "pos"]
        assert sum(map(sum, r["test"]["confusion_matrix"])) == r["test"]["examples"]
        assert os.path.exists(os.path.join(r["workdir"], "confusion.png"))

    # Evaluation reads the weights alone: the same step, params and statistics as the whole
    # state, and no optimizer state or RNG key read or allocated.
    from jaxtl import run

    whole = run.restore_run(os.path.join(out, "pretrained-full")).state
    weights = run.restore_run(os.path.join(out, "pretrained-full"), weights_only=True).state
    assert int(weights.step) == int(whole.step) > 0
    for part in ("params", "batch_stats"):
        for a, b in zip(*(jax.tree.leaves(getattr(s, part)) for s in (whole, weights)), strict=1):
            assert isinstance(b, jax.Array) and np.array_equal(a, b)
    for part in ("opt_state", "rng"):
        assert jax.tree.leaves(getattr(whole, part))
        assert all(
            isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(getattr(weights, part))
        )
    # ... and, like a whole restore, refuses a model that does not hold exactly what was saved.
    from jaxtl import checkpoint

    rebuilt = run.restore_run(os.path.join(out, "pretrained-full"), weights_only=True).trainer
    saved_at = os.path.join(out, "pretrained-full", "checkpoints")
    weights_only = ("step", "params", "batch_stats")
    cases = [(lambda p: {k: v for k, v in p.items() if k != "classifier"},
              r"saved but not in the model: \['classifier/bias', 'classifier/k"),
             (lambda p: {**p, "more": p["classifier"]},
              r"in the model but not saved: \['more/bias', 'more/kernel'\]")]  # fmt: skip
    for change, found in cases:

        def like(meta, change=change):
            tree = rebuilt.checkpoint_like(meta)
            return {**tree, "params": change(tree["params"])}

        with pytest.raises(checkpoint.CheckpointReadError, match="its params differ: " + found):
            checkpoint.restore_params(saved_at, like, parts=weights_only)

    # --resume on a finished directory keeps every finished run.
    shutil.rmtree(os.path.join(out, "scratch-full"))
    assert cli.main([*argv, "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_finetune_help_says_each_default_once(capsys):
    # Options whose help already states the default must not get argparse's "(default: ...)"
    # appended too, and an unset option never shows "(default: None)".
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert not re.search(r"\(default[^()]*\)\s*\(default", text), text
    assert "(default: 0.01)" in text  # --weight-decay: argparse's default line, once


@pytest.mark.slow
def test_probe_alias_trains_at_the_linear_probe_learning_rate(capsys, tmp_path, tiny_dir, csv_data):
    # `probe` is linear_probe: its default peak LR is linear_probe's 1e-3, not full's 5e-5.
    out = tmp_path / "probe"
    argv = ["finetune", "--model", tiny_dir, "--data", csv_data, "--text-column", "word"]
    argv += ["--label-column", "sentiment", "--recipe", "probe", "--no-scratch"]
    argv += ["--max-steps", "2", "--schedule", "constant", "--out", str(out)]
    assert cli.main(argv) == 0
    with open(out / "pretrained-probe" / "metrics.jsonl") as f:
        lrs = {json.loads(line)["lr"] for line in f if '"train"' in line}
    assert len(lrs) == 1 and lrs.pop() == pytest.approx(1e-3, rel=1e-6)  # float32 schedule


def test_the_launch_commands_in_docs_pods_md_parse():
    """Every `jaxtl finetune` command in docs/pods.md uses flags that exist, with valid values."""
    import shlex

    path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "pods.md")
    with open(path) as f:
        text = f.read()
    commands = re.findall(r"jaxtl finetune ((?:[^\n]*\\\n)*[^\n']*)", text)
    assert len(commands) == 2
    parser = cli.build_parser()
    from jaxtl import parallel

    for command in commands:
        args = parser.parse_args(["finetune", *shlex.split(command.replace("\\\n", " "))])
        assert args.distributed and args.out and args.mesh
        # The mesh is well formed and the global batch splits over its batch axes.
        sizes = parallel.parse_mesh(args.mesh, None)
        parallel.check_batch_size(args.batch_size, sizes["data"] * sizes["fsdp"])
    # The --shard-rule examples in the text are valid rules.
    examples = re.findall(r"--shard-rule '([^']+)'", text)
    assert examples
    jaxtl.TrainConfig(sharding_rules=[options.shard_rule(r) for r in examples])


@pytest.mark.slow
def test_a_lora_run_exports_merged_and_as_peft_adapters_that_agree(capsys, tmp_path, tiny_dir):
    """`jaxtl finetune --recipe 'lora(...)'`, then `jaxtl export` both ways: transformers loads
    the merged model, peft loads the adapters onto the base, and the two give the same logits
    (and the plan table printed the adapters against full fine-tuning)."""

    import numpy as np
    import peft
    import torch
    import transformers

    out = tmp_path / "lora"
    argv = ["finetune", "--model", tiny_dir, "--recipe", "lora(2, alpha=4)", "--no-scratch"]
    argv += ["--max-steps", "2", "--batch-size", "16", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "vs full fine-tuning: trainable" in printed and "lora_a|lora_b" in printed
    (run_dir,) = [d for d in out.iterdir() if d.is_dir()]
    assert cli.main(["export", str(run_dir), str(tmp_path / "merged")]) == 0
    assert cli.main(["export", str(run_dir), str(tmp_path / "adapter"), "--adapters"]) == 0
    assert "PEFT layout" in capsys.readouterr().out
    err = _err(capsys, ["export", str(run_dir), str(tmp_path / "adapter"), "--adapters"])
    assert "exists" in err and "--overwrite" in err  # nothing saved is lost

    ids = torch.tensor([[101, 2204, 3185, 102, 0], [101, 6659, 102, 0, 0]])
    mask = (ids != 0).long()
    merged = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged")
    base = transformers.BertForSequenceClassification.from_pretrained(tiny_dir, num_labels=2)
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    with torch.no_grad():
        a = merged.eval()(input_ids=ids, attention_mask=mask).logits.numpy()
        b = adapted.eval()(input_ids=ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_export_adapters_of_a_run_without_lora_is_refused(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"recipe": "full"}))
    err = _err(capsys, ["export", str(run), str(tmp_path / "out"), "--adapters"])
    assert "no LoRA adapters" in err and "without --adapters" in err


def test_inspect_shows_a_lora_plan_against_full_fine_tuning(capsys):
    assert cli.main(["inspect", minilm_dir(), "--recipe", "lora(8)"]) == 0
    out = capsys.readouterr().out
    assert "lora_a|lora_b" in out and "vs full fine-tuning: trainable" in out


def test_negative_transfer_exits_3_after_writing_every_result(tiny_dir, tmp_path, capsys):
    # A task scratch learns at once (the label is which of two words the text is), against a
    # "pretrained" arm whose rules freeze everything: its untrained head stays at chance, far
    # more than 2 standard errors below scratch.
    rows = [("alpha", 0), ("omega", 1)] * 400
    csv = tmp_path / "two.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    rules = tmp_path / "frozen.toml"
    rules.write_text('[[group]]\nname = "frozen"\nmatch = [".*"]\ntrainable = false\n')
    out = str(tmp_path / "out")
    argv = ["finetune", "--model", tiny_dir, "--data", str(csv), "--rules", str(rules),
            "--epochs", "3", "--batch-size", "16", "--lr", "1e-3", "--out", out]  # fmt: skip
    assert cli.main(argv) == 0  # without the flag: a warning, exit 0
    assert "WARNING: negative transfer" in capsys.readouterr().out
    shutil.rmtree(out)
    code = cli.main([*argv, "--fail-on-negative-transfer"])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert "exiting with status 3" in captured.err
    summary = read_json(os.path.join(out, "summary.json"))
    assert [c["flagged"] for c in summary["negative_transfer"]] == [True]
    assert len(summary["results"]) == 2  # every result was written first


def test_version_names_jaxtl_and_its_stack(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code in (0, None)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"jaxtl {jaxtl.__version__} (jax {version('jax')}, ")
    assert "\n" not in line and "orbax-checkpoint" in line
    assert jaxtl.__version__ == version("jaxtl")  # the package's version and pyproject's agree


def test_finetune_loads_onto_the_mesh_only_when_the_train_state_splits_params():
    """``placement_options``: --shard-rule (or a mesh with fsdp / tensor above 1) makes the load
    place params as the state will (``jaxtl.load(mesh=...)``); the default mesh without rules,
    and --feature-cache, load onto one device."""
    import argparse

    import jax

    from jaxtl.cli.options import placement_options

    def args(**given):
        base = dict(mesh=None, shard_rule=[], rules=None, feature_cache=None)
        return argparse.Namespace(**{**base, **given})

    assert placement_options(args()) == {}
    assert placement_options(args(mesh=f"data={jax.device_count()}")) == {}
    rule = ".*/kernel=replicated"
    assert placement_options(args(shard_rule=[rule])) == {
        "mesh": f"data={jax.device_count()}",
        "sharding_rules": [(".*/kernel", "replicated")],
        "min_shard_size": 2**16,
    }
    assert placement_options(args(shard_rule=[rule], feature_cache="memory")) == {}


def test_a_damaged_run_json_is_named_with_what_to_do(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"name": "pretrained full", ')  # cut short
    err = _err(capsys, ["evaluate", str(run)])
    assert f"{run / 'run.json'} is not valid JSON (" in err and "edited or cut short" in err
    (tmp_path / "notes.txt").write_text("")
    err = _err(capsys, ["evaluate", str(tmp_path / "notes.txt")])
    assert "notes.txt' is a file, not a run directory (one holding run.json)" in err


def test_a_short_demo_run_states_its_budget_against_the_reference(tmp_path, capsys):
    """The demo (the embedded model and data) on a budget other than the reference's says so,
    with the reference's figures and the command that reproduces them, and has no reference
    column: a 1-step run is not comparable with 3 epochs."""
    out = tmp_path / "demo"
    argv = ["finetune", "--drop-blocks", "5", "--recipe", "linear_probe", "--no-scratch",
            "--max-steps", "1", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "This run's budget is 1 step(s). Reference after 3 epochs (transformers + PyTorch): "
        "pretrained full 95.6%, pretrained linear_probe 88.6%, scratch full 85.2%.\nSame recipe "
        "in jaxtl: jaxtl finetune --epochs 3 --schedule constant --clip-norm 0"
    ) in printed
    assert "reference: transformers + PyTorch" not in printed
    assert read_json(out / "summary.json").get("reference") is None


def test_the_demo_reference_applies_to_the_reference_budget_only():
    from jaxtl import experiment

    config = jaxtl.TrainConfig(epochs=3)
    assert experiment.demo_reference(config, demo_data=True, learning_rate_given=False) == (
        experiment.DEMO_REFERENCE
    )
    for other, kwargs in [
        (config, {"demo_data": False, "learning_rate_given": False}),
        (config, {"demo_data": True, "learning_rate_given": True}),
        (jaxtl.TrainConfig(epochs=1), {"demo_data": True, "learning_rate_given": False}),
        (
            jaxtl.TrainConfig(epochs=3, max_steps=10),
            {"demo_data": True, "learning_rate_given": False},
        ),
        (
            jaxtl.TrainConfig(epochs=3, batch_size=16),
            {"demo_data": True, "learning_rate_given": False},
        ),
    ]:
        assert experiment.demo_reference(other, **kwargs) is None


@pytest.fixture
def sigterm_at_the_third_batch(monkeypatch):
    """A scheduler's SIGTERM, sent to this process as the fit takes its third batch (the real
    signal through the real handlers: only the moment is arranged)."""
    import signal

    from jaxtl import parallel

    real, served = parallel.prefetch_to_device, [0]

    def prefetch(batches, *args, **kwargs):
        for batch in real(batches, *args, **kwargs):
            served[0] += 1
            if served[0] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(parallel, "prefetch_to_device", prefetch)


@pytest.mark.parametrize(
    "verb, said",
    [
        (["adapt", "--target-shift", "typos", "--methods", "source_only"],
         r"SIGTERM: stopped after step 3; checkpoint of step 3 saved .*\nresume with: jaxtl "
         r"adapt .* --out \S+ --resume\n"),
        (["sweep", "--recipe", "full", "--lr", "1e-3,2e-3", "--weight-decay", "0"],
         r"SIGTERM: the sweep stopped after step 3 of a cell\. jaxtl sweep does not resume .*"
         r"run it again with another --out"),
    ],
)  # fmt: skip
def test_sigterm_stops_adapt_and_sweep_with_what_to_do_and_exit_0(
    tiny_dir, csv_data, tmp_path, capsys, sigterm_at_the_third_batch, verb, said
):
    # Before: Preempted's traceback and exit 1, offering a --resume that sweep lacks.
    argv = [*verb, "--model", tiny_dir, "--data", csv_data, "--max-steps", "8"]
    argv += ["--text-column", "word", "--label-column", "sentiment", "--batch-size", "8"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert re.search(said, capsys.readouterr().err)


def test_output_paths_are_checked_before_the_work_and_tilde_is_expanded(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    from jaxtl import experiment

    monkeypatch.setenv("HOME", str(tmp_path))
    # --out=~/x reaches the program unexpanded: no shell expands ~ after "=".
    assert experiment.experiment_dir("~/x", "rank") == str(tmp_path / "x")
    err = _err(capsys, ["generate", tiny_dir, "--token-ids", "1,2", "--json", str(tmp_path)])
    assert f"error: --json {str(tmp_path)!r} is a directory; give a file name" in err
    (tmp_path / "f.csv").write_text("text,label\n")
    err = _err(capsys, ["generate", tiny_dir, "--token-ids", "1", "--json", f"{tmp_path}/f.csv/x"])
    assert f"its directory {str(tmp_path / 'f.csv')!r} is a file; give another path." in err


def test_a_run_is_not_rescored_on_changed_data_mixed_in_vain_nor_exported_over_its_model(
    tmp_path, capsys
):
    model = make_tiny_bert(str(tmp_path / "bert"))
    data = write_vader_csv(tmp_path / "words.csv", 100)
    argv = ["finetune", "--model", model, "--data", data, "--text-column", "word"]
    argv += ["--label-column", "sentiment", "--recipe", "linear_probe", "--no-scratch"]
    assert cli.main([*argv, "--max-steps", "1", "--out", str(tmp_path / "exp")]) == 0
    run = str(tmp_path / "exp" / "pretrained-linear_probe")
    # A probe leaves the backbone as it was: every WiSE-FT alpha would be the same model.
    err = _err(capsys, ["wise-ft", run, "--out", str(tmp_path / "wise")])
    assert "changed only what it added (recipe 'linear_probe': a new head)" in err
    assert not os.path.exists(tmp_path / "wise")
    before = files_under(model)
    err = _err(capsys, ["export", run, model, "--overwrite"])
    assert "is the pretrained model" in err and "would replace the weights" in err
    assert files_under(model) == before
    write_vader_csv(tmp_path / "words.csv", 60)  # the file the run read, cut down
    err = _err(capsys, ["evaluate", run])
    assert "split {'train': 80, 'validation': 10, 'test': 10}; it now splits {'train': 48" in err
    assert "The data changed since the run" in err
