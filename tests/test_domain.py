"""Domain adaptation (jaxtl.domain): CORAL's loss against torch.cov, the gradient reversal, the
adaptation loop on a real (tiny, transformers-built) ResNet with real digits and their inverted
copy as the target, Tent, and the errors."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _tiny import make_tiny_bert

import jaxtl
from jaxtl import domain
from jaxtl.data import digits, shifts
from jaxtl.transfer.trees import flatten


def test_coral_loss_matches_torch_covariances():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(20, 6)), 2.0 * rng.normal(size=(12, 6)) + 1.0
    cs, ct = torch.cov(torch.from_numpy(s).T), torch.cov(torch.from_numpy(t).T)
    expected = float(((cs - ct) ** 2).sum() / (4 * 6**2))
    assert float(domain.coral_loss(jnp.asarray(s), jnp.asarray(t))) == pytest.approx(expected)


def test_gradient_reversal_is_identity_forward_and_negated_backward():
    x, w = jnp.arange(4.0), jnp.array([1.0, -2.0, 3.0, 0.5])
    assert np.array_equal(domain.reverse_gradient(x, jnp.float32(0.7)), x)
    grad = jax.grad(lambda x: (domain.reverse_gradient(x, jnp.float32(0.7)) * w).sum())(x)
    np.testing.assert_allclose(grad, -0.7 * w, rtol=1e-6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    path = tmp_path_factory.mktemp("resnet")
    transformers.ResNetForImageClassification(config).save_pretrained(path)
    source = digits(10, seed=0)
    flip = lambda split: (255 - split[0], split[1])  # noqa: E731
    target = dataclasses.replace(
        source, train=flip(source.train), validation=flip(source.validation),
        test=flip(source.test), name="digits-inverted",
    )  # fmt: skip
    load = lambda: jaxtl.load(path, num_labels=10, image_size=32, in_channels=1)  # noqa: E731
    config = jaxtl.TrainConfig(epochs=2, batch_size=16, learning_rate=3e-3, log_every=2)
    return load, source, target, config


def _run(setup, method, weight=1.0, config=None, **options):
    load, source, target, default = setup
    model = load()
    done = domain.adapt(model, "full", source, target, method=method, weight=weight,
                        config=config or default, verbose=False, **options)  # fmt: skip
    return model, done


def _same(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(x, y) for x, y in pairs)


def test_a_zero_weight_adaptation_is_the_source_only_run(setup):
    _, base = _run(setup, "source_only")
    # DANN's domain classifier trains too (its own plan group, outside the model's clipping),
    # but at weight 0 the reversal passes it nothing back: the model trains as source-only.
    for method in ("coral", "dann"):
        _, zero = _run(setup, method, weight=0.0)
        assert _same(zero.params, base.params), method
    _, coral = _run(setup, "coral", weight=1.0)
    assert not _same(coral.params, base.params)
    assert all(np.isfinite(h["adaptation_loss"]) and h["adaptation_loss"] > 0
               for h in coral.history)  # fmt: skip


def _target_gap(model, done, setup) -> float:
    """CORAL's distance between the source and target training features (inference mode)."""
    from jaxtl.feature_cache import forward_with_input

    _, source, target, _ = setup
    forward = forward_with_input(model, model.structure.head[0])
    feats = [
        forward(done.params, done.batch_stats, domain.unlabeled(model, d, w))[1]
        for d, w in ((source, "source"), (target, "target"))
    ]
    return float(domain.coral_loss(*(f.reshape(f.shape[0], -1) for f in feats)))


def test_coral_reads_source_and_target_rows_wherever_they_sit():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(8, 5)), rng.normal(size=(8, 5)) * 3.0
    rows, is_source = np.concatenate([s, t]), np.repeat([1.0, 0.0], 8)
    order = rng.permutation(16)  # interleaved, as in a microbatch of gradient accumulation
    mixed = domain._coral(jnp.asarray(rows[order]), jnp.asarray(is_source[order]))
    assert float(mixed) == pytest.approx(float(domain.coral_loss(jnp.asarray(s), jnp.asarray(t))))


def test_adaptation_runs_in_the_trainer_checkpoints_and_resumes_exactly(setup, tmp_path):
    """DANN through the Trainer: a run stopped at step 5 and resumed equals the uninterrupted
    one bit for bit (the domain classifier's params and moments are in the checkpoint, the
    paired target batches follow the global step); metrics.jsonl logs the adaptation term."""
    _, whole = _run(setup, "dann", workdir=str(tmp_path / "whole"))
    _, first = _run(setup, "dann", workdir=str(tmp_path / "cut"), stop_at=5)
    assert not _same(first.params, whole.params)
    _, resumed = _run(setup, "dann", workdir=str(tmp_path / "cut"), resume=True)
    assert _same(resumed.params, whole.params)
    assert _same(resumed.batch_stats, whole.batch_stats)
    text = (tmp_path / "whole" / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert train and all(r["aux_loss"] > 0 for r in train)
    assert [h["adaptation_loss"] for h in whole.history] == [r["aux_loss"] for r in train]


def test_adaptation_with_gradient_accumulation_trains(setup):
    """grad_accum=2 cuts each paired batch into two interleaved microbatches, each holding
    source and target rows: CORAL reads them by their domain, not their position."""
    config = setup[3]
    accum = dataclasses.replace(config, scale=dataclasses.replace(config.scale, grad_accum=2))
    _, done = _run(setup, "coral", config=accum)
    assert done.history and all(np.isfinite(h["adaptation_loss"]) and h["adaptation_loss"] > 0
                                for h in done.history)  # fmt: skip


def test_coral_and_dann_bring_the_domains_features_together(setup):
    model, base = _run(setup, "source_only")
    gap = _target_gap(model, base, setup)
    # This small network's 16 features give a gap of ~1e-5 (the loss divides by 4 d^2): a
    # large weight makes it count against the task loss (~2).
    _, coral = _run(setup, "coral", weight=1e4)
    assert _target_gap(model, coral, setup) < 0.5 * gap
    _, dann = _run(setup, "dann", weight=1.0)
    assert not _same(dann.params, base.params)
    assert all(np.isfinite(h["adaptation_loss"]) for h in dann.history)


def test_tent_trains_only_batchnorm_affine_params_and_lowers_entropy(setup):
    load, _, target, _ = setup
    model, base = _run(setup, "source_only")
    x = domain.unlabeled(model, target)

    def entropy(params, stats):
        logits, _ = model.forward(params, stats, x)
        logp = jax.nn.log_softmax(logits)
        return float(-(jnp.exp(logp) * logp).sum(-1).mean())

    adabn = jaxtl.adapt_batch_norm(model, x["pixel_values"], params=base.params,
                                   batch_stats=base.batch_stats)  # fmt: skip
    params, stats = domain.tent(model, target, params=base.params, batch_stats=base.batch_stats,
                                epochs=3, batch_size=32)  # fmt: skip
    before, after = flatten(base.params), flatten(params)
    moved = {p for p in before if not np.array_equal(before[p], after[p])}
    assert moved and all(p.rsplit("/", 1)[1] in ("scale", "bias") for p in moved)
    assert all("norm" in p for p in moved), moved  # BatchNorm layers only
    assert entropy(params, stats) < entropy(base.params, adabn)


def test_errors_name_the_problem(setup, tmp_path):
    load, source, target, config = setup
    model = load()
    with pytest.raises(ValueError, match="target is missing"):
        domain.adapt(model, "full", source, None, config=config)
    with pytest.raises(ValueError, match="target is missing"):
        domain.tent(model, None)
    with pytest.raises(ValueError, match="method='mmd'"):
        domain.adapt(model, "full", source, target, method="mmd")
    with pytest.raises(ValueError, match=r"weight \(--weight\) = -1.0 must be >= 0"):
        domain.adapt(model, "full", source, target, weight=-1.0)
    with pytest.raises(ValueError, match="is staged"):
        domain.adapt(model, "lp_ft(1)", source, target)
    penalized = dataclasses.replace(
        config, optim=dataclasses.replace(config.optim, l2_sp=(0.01, 0.01))
    )
    with pytest.raises(ValueError, match=r"l2_sp \(--l2-sp\).*domain classifier starts random"):
        domain.adapt(model, "full", source, target, method="dann", config=penalized)
    with pytest.raises(ValueError, match=r"l2_sp \(--l2-sp\)"):  # before any data is read
        domain.adapt(model, "full", source, None, method="dann", config=penalized)
    tiny = dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, batch_size=2),
        scale=dataclasses.replace(config.scale, grad_accum=2),
    )
    with pytest.raises(ValueError, match=r"at least 2 source and 2 target rows per microbatch"):
        domain.adapt(model, "full", source, target, method="coral", config=tiny)
    bert = jaxtl.load(make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    with pytest.raises(ValueError, match="has none"):
        domain.tent(bert, target)
    with pytest.raises(ValueError, match=r"has none: compare the others, e.g. .*--methods "
                       r"source_only,coral,dann"):  # fmt: skip
        domain.compare(lambda: bert, source, target, ["source_only", "adabn"])
    regression = jaxtl.load(make_tiny_bert(str(tmp_path / "bert")), task="regression")
    with pytest.raises(ValueError, match="task='classification'"):
        domain.adapt(regression, "full", source, target)


def test_cli_compares_the_methods_on_a_built_shift(setup, tmp_path, capsys):
    from _tiny import read_json

    from jaxtl import cli

    load, *_ = setup
    out = str(tmp_path / "adapt")
    argv = ["adapt", "--model", load().path, "--data", "digits", "--shots", "10",
            "--image-size", "32", "--in-channels", "1", "--num-labels", "10", "--target-shift",
            "invert", "--methods", "source_only,adabn,coral", "--epochs", "1", "--batch-size",
            "16", "--lr", "3e-3", "--out", out]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    rows = read_json(os.path.join(out, "adapt.json"))["methods"]
    assert [r["method"] for r in rows] == ["source_only", "adabn", "coral"]
    assert all(0 <= r["target_test_accuracy"] <= 1 for r in rows)
    assert "digits-invert" in printed and os.path.exists(os.path.join(out, "adapt.png"))
    # Each trained method ran in the Trainer in its own run directory; --resume reads the
    # finished runs back from their last checkpoints rather than training them again.
    for method in ("source_only", "coral"):
        assert os.path.exists(os.path.join(out, method, "metrics.jsonl"))
    assert cli.main([*argv, "--resume"]) == 0
    again = read_json(os.path.join(out, "adapt.json"))["methods"]
    accuracy = lambda rs: [(r["source_test_accuracy"], r["target_test_accuracy"]) for r in rs]  # noqa: E731
    assert accuracy(again) == accuracy(rows)
    err = capsys.readouterr().err
    assert err.count("Resumed from step 6") == 2  # of 6: nothing left to train


@pytest.mark.parametrize(
    "flags,message",
    [
        ([], "give --target-data"),
        (["--target-shift", "invert", "--target-data", "digits"], "one of them"),
        (["--target-shift", "invert", "--methods", "mmd"], "(--methods): choose from"),
        (["--target-shift", "invert", "--methods", "coral,coral"], "names a method more than once"),
    ],
)
def test_cli_bad_adapt_input_exits_2_before_loading(flags, message, tmp_path, capsys):
    from jaxtl import cli

    assert cli.main(["adapt", "--model", str(tmp_path / "absent"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "absent" not in err


def test_cli_data_flags_serve_either_domain(tmp_path, capsys):
    """--text-column and the other data flags apply to --data and --target-data where each
    kind of source reads them: refused only when neither reads one (--splits: --data only)."""
    from jaxtl import cli

    out = str(tmp_path / "o")
    target = str(tmp_path / "absent.csv")
    # Read by the target (a csv): past the check, to the target's missing file.
    argv = ["adapt", "--data", "vader", "--target-data", target, "--out", out]
    assert cli.main([*argv, "--text-column", "word", "--label-column", "sentiment"]) == 2
    err = capsys.readouterr().err
    assert "absent.csv" in err and "--text-column" not in err
    # Read by neither, and --splits by the source only:
    cases = [(["--target-data", "digits", "--text-column", "word"], "input_column / "
              "--text-column applies to a .csv / .jsonl file or tfds:NAME or hf:DIR only; "
              "--data vader and --target-data digits do not read it: drop --text-column."),
             (["--target-data", "tfds:jaxtl_vader", "--splits", "a,b,c"], "splits / --splits "
              "applies to tfds:NAME or hf:DIR only; --data vader does not read it")]  # fmt: skip
    for flags, message in cases:
        assert cli.main(["adapt", "--data", "vader", "--out", out, *flags]) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(out)


def _one_slip_apart(a: str, b: str) -> bool:
    """Whether ``b`` is ``a`` with one swap of neighbours, one letter dropped, doubled or
    replaced (an edit distance of one, or one transposition)."""
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        swapped = len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
        return len(diff) == 1 or (swapped and a[diff[1]] == b[diff[0]])
    short, long_ = sorted((a, b), key=len)
    return len(long_) == len(short) + 1 and any(
        long_[:i] + long_[i + 1 :] == short for i in range(len(long_))
    )


def test_typos_shift_every_word_by_one_slip_and_keep_labels():
    source = jaxtl.data.vader()
    target = shifts.shifted(source, "typos", seed=3)
    assert shifts.shifted(source, "typos", seed=3).train == target.train  # seeded
    assert target.name == "vader-typos" and target.label_names == source.label_names
    for split in ("train", "validation", "test"):
        (before, labels), (after, kept) = getattr(source, split), getattr(target, split)
        np.testing.assert_array_equal(labels, kept)
        for a, b in zip(before, after, strict=True):
            for w, v in zip(a.split(" "), b.split(" "), strict=True):
                assert (w == v) if len(w) < 3 else (w != v and _one_slip_apart(w, v)), (w, v)
    changed = sum(a != b for a, b in zip(source.train[0], target.train[0], strict=True))
    assert changed > 0.9 * len(source.train[0])
    with pytest.raises(ValueError, match=r"'invert' \(--target-shift\) does not apply.*typos"):
        shifts.shifted(source, "invert")
    with pytest.raises(ValueError, match=r"'typos' \(--target-shift\) does not apply.*invert"):
        shifts.shifted(digits(10), "typos")


def test_cli_adapts_a_text_model_to_typos(tmp_path, capsys):
    from _tiny import read_json, write_vader_csv

    from jaxtl import cli

    data = write_vader_csv(tmp_path / "vader.csv", 200)
    out = str(tmp_path / "adapt")
    argv = ["adapt", "--model", make_tiny_bert(str(tmp_path / "bert")), "--data", data,
            "--text-column", "word", "--label-column", "sentiment", "--target-shift", "typos",
            "--methods", "source_only,coral,dann", "--epochs", "1", "--batch-size", "16",
            "--out", out]  # fmt: skip
    assert cli.main(argv) == 0
    rows = read_json(os.path.join(out, "adapt.json"))["methods"]
    assert [r["method"] for r in rows] == ["source_only", "coral", "dann"]
    assert all(0 <= r["target_test_accuracy"] <= 1 for r in rows)
    assert "-typos" in capsys.readouterr().out  # the target is named after its shift


def test_an_auxiliary_term_adds_to_every_task_loss_and_stands_alone_without_labels():
    """losses.WithAux: the term adds to a labelled loss (classification, and a causal LM whose
    batches never hold labels), and is the whole objective of an unlabeled batch (Tent)."""
    import math

    from jaxtl.train.losses import WithAux, mean_loss, metric_sums, train_metrics

    aux = jnp.float32(0.5)
    logits = jnp.zeros((2, 3))  # uniform over 3 classes
    labelled = {"label": jnp.array([0, 2])}
    assert float(mean_loss(WithAux(logits, aux), labelled, "classification")) == pytest.approx(
        math.log(3) + 0.5
    )
    lm = {"input_ids": jnp.array([[1, 2, 0]])}
    uniform = jnp.zeros((1, 3, 4))
    assert float(mean_loss(WithAux(uniform, aux), lm, "causal_lm")) == pytest.approx(
        math.log(4) + 0.5
    )
    assert float(mean_loss(WithAux(logits, aux), {"x": logits}, "classification")) == 0.5
    sums = metric_sums(WithAux(logits, aux), labelled, "classification")
    assert float(sums["loss_sum"] / sums["count"]) == pytest.approx(math.log(3) + 0.5)
    assert float(sums["aux_sum"]) == pytest.approx(1.0)
    metrics = train_metrics(jnp.float32(1.0), WithAux(logits, aux), {"x": logits}, "classification")
    assert set(metrics) == {"loss", "aux_loss"}  # no accuracy against labels that do not exist
