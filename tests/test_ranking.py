"""Transferability ranking (jaxtl rank): LogME against scikit-learn's Bayesian ridge (the same
evidence maximization, written independently), LEEP against its definition's limiting cases
and a per-example loop, the source head LEEP reads, the command line and its bad input."""

from __future__ import annotations

import dataclasses
import math
import os

import matplotlib.image
import numpy as np
import pytest
from _tiny import make_tiny_bert, read_json, write_vader_csv
from sklearn.linear_model import BayesianRidge

from jaxtl import cli, ranking
from jaxtl.weights import embedded


def _evidence(features, y) -> float:
    """scikit-learn's log marginal likelihood per example at its evidence maximum (no
    intercept, flat gamma priors: the model LogME scores)."""
    fit = BayesianRidge(fit_intercept=False, compute_score=True, tol=1e-12, max_iter=100_000,
                        alpha_1=0, alpha_2=0, lambda_1=0, lambda_2=0).fit(features, y)  # fmt: skip
    return fit.scores_[-1] / len(y)


@pytest.mark.parametrize("n,d", [(200, 16), (30, 64)])  # more examples than features, and fewer
def test_logme_is_the_maximized_evidence_of_bayesian_ridge(n, d):
    rng = np.random.default_rng(n)
    f = rng.normal(size=(n, d))
    y = 0.3 * f @ rng.normal(size=d) + rng.normal(size=n)
    assert ranking.logme(f, y, regression=True) == pytest.approx(_evidence(f, y), rel=1e-7)
    labels = rng.integers(0, 3, size=n)
    per_class = [_evidence(f, (labels == c).astype(float)) for c in range(3)]
    assert ranking.logme(f, labels) == pytest.approx(np.mean(per_class), rel=1e-7)


def test_logme_prefers_features_that_explain_the_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=300)
    noise = rng.normal(size=(300, 8))
    informative = noise + 2.0 * labels[:, None]
    assert ranking.logme(informative, labels) > ranking.logme(noise, labels)


def test_leep_limits_and_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=50)
    # Each target class always predicted as its own source class: P(y | z) = 1, LEEP = 0.
    certain = np.eye(5)[labels + 2]
    assert ranking.leep(certain, labels) == pytest.approx(0.0, abs=1e-12)
    # A source head that says nothing: LEEP = sum_y p(y) log p(y), the labels' neg. entropy.
    p = np.bincount(labels) / len(labels)
    assert ranking.leep(np.full((50, 4), 0.25), labels) == pytest.approx((p * np.log(p)).sum())
    # Anything else, from the definition, one example at a time.
    theta = rng.dirichlet(np.ones(4), size=50)
    joint = {(y, z): sum(theta[i, z] for i in range(50) if labels[i] == y) / 50
             for y in range(3) for z in range(4)}  # fmt: skip
    marginal = {z: sum(joint[y, z] for y in range(3)) for z in range(4)}
    expected = np.mean([
        math.log(sum(joint[labels[i], z] / marginal[z] * theta[i, z] for z in range(4)))
        for i in range(50)
    ])  # fmt: skip
    assert ranking.leep(theta, labels) == pytest.approx(expected, rel=1e-12)


def test_parse_candidate():
    assert ranking.parse_candidate("minilm") == ranking.Candidate("minilm", "minilm")
    got = ranking.parse_candidate("/m/dir@random@drop=2")
    assert (got.path, got.pretrained, got.drop_blocks) == ("/m/dir", False, 2)
    for bad, message in [("@random", "names no model"), ("minilm@drop=0", "unknown option"),
                         ("minilm@deep", "'@deep'")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ranking.parse_candidate(bad)


@pytest.fixture(scope="module")
def digits_model():
    import jaxtl

    return jaxtl.load(
        embedded.efficientnet_lite0_path(), num_labels=10, image_size=32, in_channels=1
    )


def test_leep_reads_the_checkpoints_imagenet_head(digits_model):
    """EfficientNet's 10-class head replaced its 1000 ImageNet classes: LEEP reloads those and
    runs them on the cached features; the probabilities equal the whole ImageNet model's."""
    import jax

    import jaxtl
    from jaxtl.data import digits
    from jaxtl.encoding import encode_splits

    assert ranking.source_head_classes(digits_model) == 1000
    imagenet = jaxtl.load(embedded.efficientnet_lite0_path(), num_labels=1000, image_size=32,
                          in_channels=1)  # fmt: skip
    assert ranking.source_head_classes(imagenet) == 1000  # its head is the checkpoint's
    arrays, _ = encode_splits(digits_model, digits(5))
    inputs = {k: v for k, v in arrays["train"].items() if k != "label"}
    feats = ranking.head_features(digits_model, inputs)
    assert feats.shape == (50, 1280)
    probs = ranking._source_probs(imagenet, feats, inputs)
    logits = imagenet.apply(imagenet.params, inputs, batch_stats=imagenet.batch_stats)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits), rtol=1e-4, atol=1e-6)
    value = ranking.leep(probs, arrays["train"]["label"])
    assert -math.log(10) < value < 0  # better than knowing nothing about 10 balanced classes


def test_a_model_whose_feature_size_cannot_be_read_is_named(digits_model):
    from jaxtl.data import digits
    from jaxtl.encoding import encode_splits

    arrays, _ = encode_splits(digits_model, digits(2))
    inputs = {k: v for k, v in arrays["train"].items() if k != "label"}
    headless = dataclasses.replace(
        digits_model, structure=dataclasses.replace(digits_model.structure, head=())
    )
    with pytest.raises(ValueError, match="cannot read the feature size .* without a head"):
        ranking.head_features(headless, inputs)
    # A "head" at a block: it reads a feature map, not one vector per example.
    per_pixel = dataclasses.replace(
        digits_model, structure=dataclasses.replace(digits_model.structure, head=("blocks/3",))
    )
    with pytest.raises(ValueError, match=r"cannot read the feature size .* not one feature vec"):
        ranking.head_features(per_pixel, inputs)


def test_cli_ranks_candidates_and_writes_json_and_plot(tmp_path, capsys):
    model = make_tiny_bert(str(tmp_path / "bert"))
    csv = write_vader_csv(tmp_path / "words.csv", 200)
    out = str(tmp_path / "rank")
    argv = ["rank", "--models", f"{model},{model}@random,minilm@drop=5", "--data", csv,
            "--text-column", "word", "--label-column", "sentiment", "--out", out]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    got = read_json(os.path.join(out, "rank.json"))
    names = [r["name"] for r in got["candidates"]]
    assert names == [model, f"{model}@random", "minilm@drop=5"]
    for row in got["candidates"]:
        assert row["scores"]["leep"] is None  # no candidate has a source classifier
        assert all(math.isfinite(row["scores"][s]) for s in ("logme", "knn", "linear"))
        assert 0 <= row["scores"]["knn"] <= 1 and row["seconds"]["features"] > 0
    assert {r["feature_size"] for r in got["candidates"]} == {32, 384}
    logme = {r["name"]: r["scores"]["logme"] for r in got["candidates"]}
    assert sorted(logme, key=lambda n: -logme[n]) == sorted(
        got["ranks"]["logme"], key=lambda n: got["ranks"]["logme"][n]
    )
    assert "LEEP skipped: random weights" in printed
    assert "no source classification head ('classifier' is new)" in printed
    assert printed.index("| minilm@drop=5") < printed.index(f"| {model}@random")  # by LogME
    assert matplotlib.image.imread(os.path.join(out, "rank.png")).ndim == 3


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--models", "minilm@deep"], "unknown option '@deep'"),
        (["--models", "/no/such/model"], "does not exist"),
        (["--models", "minilm,minilm"], "must be distinct"),
        (["--models", "minilm", "--scores", "logme,fid"], "choose from logme, leep, knn"),
        (["--models", "minilm", "--scores", "bogus"], "choose from logme, leep, knn"),
        (["--models", "minilm", "--scores", "knn"], "--sort-by logme is not among --scores"),
        (["--models", "minilm", "--task", "causal_lm"], "scores classification or regression"),
    ],
)
def test_bad_rank_input_is_refused(extra, message, tmp_path, capsys):
    assert cli.main(["rank", "--out", str(tmp_path / "r"), *extra]) == 2
    assert message in capsys.readouterr().err
