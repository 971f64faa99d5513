"""Metrics loggers: TensorBoard event files read back with TensorFlow's own event reader,
an offline Weights & Biases run, a user's logger, and the resume rule (steps redone are
dropped from TensorBoard as from metrics.jsonl)."""

from __future__ import annotations

import glob
import json
import os

import pytest
from _tiny import fit, make_tiny_bert, small_vader, write_vader_csv

import jaxtl
from jaxtl import cli
from jaxtl.encoding import encode_splits


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny") / "bert"))


@pytest.fixture(scope="module")
def arrays(tiny_dir):
    model = jaxtl.load(tiny_dir, num_labels=2)
    out, _ = encode_splits(model, small_vader(n_train=96, n_val=32, n_test=32))
    return out


def _trainer(tiny_dir, workdir, custom=(), **cfg):
    """A Trainer; ``custom``: logger objects, ``loggers=`` (in ``cfg``): TrainConfig's names."""
    model = jaxtl.load(tiny_dir, num_labels=2)
    config = jaxtl.TrainConfig(
        **{"batch_size": 16, "learning_rate": 1e-3, "log_every": 2, "eval_every": 3,
           "epochs": 2, **cfg}
    )  # fmt: skip
    plan = jaxtl.make_plan("full", model.structure)
    return jaxtl.Trainer(model, plan, config, workdir, loggers=custom)


def _jsonl(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _expected(records) -> dict:
    """``{(tag, step): value}`` of what a logger should have been given."""
    out = {}
    for r in records:
        for key, value in r.items():
            if key in ("split", "step") or value is None:
                continue
            name = key.removeprefix(f"{r['split']}_")
            out[f"{r['split']}/{name}", r["step"]] = float(value)
    return out


def _tensorboard(logdir) -> dict:
    """TensorFlow's reader over every event file, applying TensorBoard's purge rule: a file
    that starts with SessionLog.START at step s drops the earlier files' events at steps >= s."""
    import tensorflow as tf

    got = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                got = {k: v for k, v in got.items() if k[1] < event.step}
            for value in event.summary.value:
                got[value.tag, event.step] = value.simple_value
    return got


def test_tensorboard_holds_every_metric_of_metrics_jsonl(tiny_dir, arrays, tmp_path):
    workdir = str(tmp_path / "run")
    trainer = _trainer(tiny_dir, workdir, loggers=("tensorboard",))
    fit(trainer, arrays["train"], arrays["validation"])
    expected = _expected(_jsonl(workdir))
    assert {"train/loss", "train/lr", "val/accuracy", "val/loss"} <= {t for t, _ in expected}
    got = _tensorboard(os.path.join(workdir, "tensorboard"))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key  # float32 on disk


def test_a_resumed_run_drops_the_redone_steps_from_tensorboard(tiny_dir, arrays, tmp_path):
    workdir = str(tmp_path / "run")
    first = _trainer(tiny_dir, workdir, loggers=("tensorboard",))
    fit(first, arrays["train"], arrays["validation"], stop_at=5)  # logged 2, 4; saved at 5
    first_events = _tensorboard(os.path.join(workdir, "tensorboard"))
    second = _trainer(tiny_dir, workdir, loggers=("tensorboard",))
    fit(second, arrays["train"], arrays["validation"], resume=True)
    records = _jsonl(workdir)
    assert len({(r["split"], r["step"]) for r in records}) == len(records)
    got = _tensorboard(os.path.join(workdir, "tensorboard"))
    assert got.keys() == _expected(records).keys()
    assert len(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))) == 2
    assert {k for k in first_events if k[1] <= 5} <= got.keys()


def test_a_users_logger_gets_every_record(tiny_dir, arrays, tmp_path):
    class Collect:
        def __init__(self):
            self.records, self.closed = [], 0

        def write(self, record):
            self.records.append(dict(record))

        def close(self):
            self.closed += 1

    mine = Collect()
    workdir = str(tmp_path / "run")
    fit(_trainer(tiny_dir, workdir, custom=[mine]), arrays["train"], arrays["validation"])
    assert mine.records == _jsonl(workdir) and mine.closed == 1


def _wandb_history(path) -> dict:
    """``{(key, step): value}`` of the history records in an offline run's ``.wandb`` file,
    read with wandb's protobuf schema from its record log: a 7-byte header (``:W&B``, magic,
    version), then 32 KiB blocks of records, each with a 7-byte header (CRC, length, type: 1
    whole, 2 first, 3 middle, 4 last piece); a block's last < 7 bytes are padding."""
    import struct

    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    block, pos, piece, out = 32768, 7, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        piece += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            piece = b""
            if record.WhichOneof("record_type") == "history":
                history = record.history
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in history.item}  # fmt: skip
                step = items.get("_step", history.step.num)
                for key, value in items.items():
                    if not key.startswith("_"):
                        out[key, step] = value
    return out


def test_wandb_writes_an_offline_run(tiny_dir, arrays, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = str(tmp_path / "run")
    fit(_trainer(tiny_dir, workdir, loggers=("wandb",)), arrays["train"], arrays["validation"])
    runs = glob.glob(os.path.join(workdir, "wandb", "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1  # what `wandb sync` uploads
    expected = _expected(_jsonl(workdir))
    got = _wandb_history(runs[0])
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_bad_loggers_are_refused(tiny_dir):
    with pytest.raises(ValueError, match="unknown logger 'mlflow'.*--tensorboard"):
        jaxtl.TrainConfig(loggers=("mlflow",))
    with pytest.raises(ValueError, match="give the Trainer a workdir .*--out"):
        _trainer(tiny_dir, None, loggers=("tensorboard",))
    with pytest.raises(ValueError, match="write\\(record\\) and close\\(\\)"):
        _trainer(tiny_dir, None, custom=[print])


def test_cli_tensorboard_run_is_evaluated_and_exported_like_any_other(tiny_dir, tmp_path, capsys):
    csv = write_vader_csv(tmp_path / "words.csv", 100)
    out = str(tmp_path / "out")
    argv = ["finetune", "--model", tiny_dir, "--data", csv, "--text-column", "word",
            "--label-column", "sentiment", "--recipe", "linear_probe", "--no-scratch",
            "--batch-size", "16", "--epochs", "1", "--tensorboard", "--out", out]  # fmt: skip
    assert cli.main(argv) == 0
    run = os.path.join(out, "pretrained-linear_probe")
    got = _tensorboard(os.path.join(run, "tensorboard"))
    assert got.keys() == _expected(_jsonl(run)).keys() and got
    capsys.readouterr()
    assert cli.main(["evaluate", run]) == 0  # re-scoring opens no logger
    assert "pretrained-linear_probe" in capsys.readouterr().out
