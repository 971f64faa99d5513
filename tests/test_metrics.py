"""The detailed metrics of a finished run's test split (issue 15, metrics and reports), checked
against independent implementations: the fine-tuned model is exported and run by transformers'
PyTorch class, and its logits scored by scikit-learn and torchmetrics, never by jaxtl."""

from __future__ import annotations

import os

import jax
import matplotlib.image
import numpy as np
import pytest
import torch
import transformers
from _tiny import make_tiny_bert, read_json, small_vader
from scipy import stats
from sklearn import metrics as skm
from torchmetrics.classification import MulticlassCalibrationError

import jaxtl
from jaxtl import metrics
from jaxtl.data import evaluation_loader
from jaxtl.encoding import encode_splits


def _torchmetrics_ece(probs: np.ndarray, labels: np.ndarray) -> float:
    ece = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=15, norm="l1")
    return float(ece(torch.from_numpy(probs), torch.from_numpy(labels)))


def test_calibration_error_matches_torchmetrics():
    """5 classes, 2000 examples with confidences spread over every bin, 200 of them exactly 1
    (a saturated float32 softmax: its own bin) and 100 exactly on bin edges."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.5, (2000, 5))
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    probs[:200] = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 200)]
    edge = np.linspace(0, 1, 16, dtype=np.float32)[rng.integers(4, 15, 100)]
    probs[200:300] = np.stack([edge, *[(1 - edge) / 4] * 4], axis=1)
    labels = rng.integers(0, 5, 2000)
    labels[:1200] = probs[:1200].argmax(1)  # well above chance, so calibration varies by bin
    labels[:20] = (labels[:20] + 1) % 5  # 10% of the saturated ones wrong: overconfident,
    near = (probs.max(1) >= 0.94) & (probs.max(1) < 1)  # their neighbours all right: under-
    labels[near] = probs[near].argmax(1)  # (merged into one bin, the two would cancel out)
    got = metrics.calibration(probs.max(1), probs.argmax(1) == labels)
    assert got["bins"][-1]["low"] == got["bins"][-1]["high"] == 1.0
    assert got["bins"][-1]["count"] == 200 and got["bins"][-1]["accuracy"] == 0.9
    assert len(got["bins"]) >= 12 and sum(b["count"] for b in got["bins"]) == 2000
    assert got["ece"] == pytest.approx(_torchmetrics_ece(probs, labels), abs=1e-6)


def test_a_run_s_test_metrics_equal_those_of_its_export_run_by_transformers(tmp_path):
    """jaxtl.finetune scores the test split (37 examples: the last eval batch is padded) in
    one pass; macro-F1, per-class precision/recall/support, the confusion matrix and the ECE
    in results.json equal scikit-learn's and torchmetrics' on the logits of the exported
    model run by transformers; confusion.png and reliability.png are written."""
    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert"), dropout=0.0), num_labels=2,
                       pooling="cls")  # fmt: skip
    data = small_vader(n_train=96, n_val=32, n_test=37)
    config = jaxtl.TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3, progress=False)
    workdir = str(tmp_path / "run")
    result = jaxtl.finetune(model, "full", data, config, workdir, verbose=False)
    test = read_json(os.path.join(workdir, "results.json"))["test"]

    out = jaxtl.export(model, tmp_path / "export", result.params)
    reference = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    arrays, _ = encode_splits(model, data)
    inputs = {k: torch.from_numpy(np.asarray(arrays["test"][k], np.int64))
              for k in ("input_ids", "attention_mask", "token_type_ids")}  # fmt: skip
    with torch.no_grad():
        probs = torch.softmax(reference(**inputs).logits, -1).numpy()
    labels = np.asarray(arrays["test"]["label"])
    pred = probs.argmax(1)

    assert test["examples"] == 37
    assert test["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred), abs=1e-6)
    assert test["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"), abs=1e-6)
    precision, recall, _, support = skm.precision_recall_fscore_support(
        labels, pred, labels=[0, 1], zero_division=0.0
    )
    assert list(test["per_class"]) == ["negative", "positive"]
    for c, name in enumerate(["negative", "positive"]):
        row = test["per_class"][name]
        assert row["precision"] == pytest.approx(precision[c], abs=1e-6)
        assert row["recall"] == pytest.approx(recall[c], abs=1e-6)
        assert row["support"] == support[c]
    assert test["confusion_matrix"] == skm.confusion_matrix(labels, pred).tolist()
    ece = _torchmetrics_ece(probs, labels)
    assert test["calibration"]["ece"] == pytest.approx(ece, abs=1e-5)

    for name in ("confusion.png", "reliability.png"):
        image = matplotlib.image.imread(os.path.join(workdir, name))
        assert image.ndim == 3 and min(image.shape[:2]) > 200


def test_regression_metrics_equal_scipy_and_sklearn_on_the_model_s_predictions(tmp_path):
    """Batched, padded and filtered evaluation rows give the metrics of the model's own
    predictions on the whole split in one call; correlations of a constant are undefined."""
    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert")), task="regression")
    arrays, _ = encode_splits(model, small_vader(n_train=16, n_val=16, n_test=37))
    test = dict(arrays["test"], label=np.linspace(-1.0, 2.0, 37).astype(np.float32))
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure),
                            jaxtl.TrainConfig(batch_size=16, progress=False))  # fmt: skip
    state = trainer.init_state(1)
    loader = evaluation_loader(test, trainer.config.data, devices=trainer.devices)
    got = trainer.evaluate(state, loader, details=True)

    inputs = {k: v for k, v in test.items() if k != "label"}
    pred = np.asarray(jax.device_get(model.apply(model.params, inputs)))[:, 0]
    target = test["label"]
    assert got["mse"] == pytest.approx(skm.mean_squared_error(target, pred), rel=1e-5)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(target, pred), rel=1e-5)
    assert got["r2"] == pytest.approx(skm.r2_score(target, pred), rel=1e-5, abs=1e-6)
    assert got["pearson"] == pytest.approx(stats.pearsonr(pred, target)[0], abs=1e-5)
    assert got["spearman"] == pytest.approx(stats.spearmanr(pred, target)[0], abs=1e-5)
    assert got["mse"] == pytest.approx(got["loss"], rel=1e-5)  # the loss is the squared error

    flat = metrics.regression({"pred": np.ones(4), "target": np.arange(4.0)})
    assert (
        flat["pearson"] is None and flat["spearman"] is None and flat["mse"] == 1.5
    )  # (1 + 0 + 1 + 4) / 4
