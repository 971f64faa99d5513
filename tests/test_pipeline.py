"""The grain training pipeline: order, augmentation randomness, worker independence, process
sharding, and a training run interrupted mid-epoch that resumes to bitwise the same params."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxtl
from jaxtl.data import ArrayLoader, augment, digits
from jaxtl.data.pipeline import ArraySource, GrainLoader
from jaxtl.run import encode_splits
from jaxtl.train import Trainer

AUGMENT = "random_resized_crop(0.5),translate(2),hflip"


def _arrays(n=40):
    rng = np.random.default_rng(0)
    return {
        "pixel_values": rng.standard_normal((n, 6, 6, 1)).astype(np.float32),
        "label": np.arange(n, dtype=np.int32),
    }


def _batches(loader, epochs=2, start=0):
    out = []
    for e in range(epochs):
        out += list(loader.epoch(e, start if e == 0 else 0))
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_grain_order_is_the_array_loaders():
    arrays = _arrays()
    plain = ArrayLoader(arrays, 8, shuffle=True, seed=3, drop_last=True)
    grain = GrainLoader(ArraySource(arrays), 8, seed=3)
    ours = _batches(grain)
    _same(ours, [{k: v for k, v in b.items() if k != "weight"} for b in _batches(plain)])
    assert ours[0]["label"].tolist() != ours[5]["label"].tolist()  # reshuffled per epoch


def test_augmentation_is_reproducible_whatever_the_workers_and_resumes_mid_epoch():
    arrays, transform = _arrays(), augment.parse(AUGMENT)
    in_process = _batches(GrainLoader(ArraySource(arrays), 8, seed=1, transform=transform))
    two_workers = GrainLoader(ArraySource(arrays), 8, seed=1, transform=transform, workers=2)
    _same(_batches(two_workers), in_process)
    # A fresh loader started at epoch 0, batch 3 yields what the full run yields from there on.
    resumed = GrainLoader(ArraySource(arrays), 8, seed=1, transform=transform)
    _same(_batches(resumed, start=3), in_process[3:])
    # The augmentation does change the inputs (labels pass through).
    plain = _batches(GrainLoader(ArraySource(arrays), 8, seed=1))
    assert not np.array_equal(plain[0]["pixel_values"], in_process[0]["pixel_values"])
    _same([{"label": b["label"]} for b in plain], [{"label": b["label"]} for b in in_process])


def test_each_process_reads_its_rows_of_every_global_batch():
    arrays, transform = _arrays(), augment.parse(AUGMENT)
    whole = _batches(GrainLoader(ArraySource(arrays), 8, seed=2, transform=transform))
    shards = [
        _batches(
            GrainLoader(
                ArraySource(arrays),
                8,
                seed=2,
                transform=transform,
                process_index=p,
                process_count=2,
            )
        )
        for p in range(2)
    ]
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*shards, strict=True)]
    _same(joined, whole)


def test_bad_augmentation_specs_are_named():
    with pytest.raises(ValueError, match=r"Unknown augmentation 'rotate\(10\)'"):
        augment.parse("hflip,rotate(10)")
    with pytest.raises(ValueError, match="arguments must be numbers"):
        augment.parse("translate(x)")
    with pytest.raises(ValueError, match="Unknown augmentation"):
        jaxtl.TrainConfig(augment="mixup")


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A tiny random ResNet (BatchNorm) saved by transformers, adapted to 1-channel 16x16."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic"
    )
    directory = tmp_path_factory.mktemp("resnet")
    transformers.ResNetModel(config).save_pretrained(directory)
    model = jaxtl.load(directory, num_labels=10, in_channels=1, image_size=16)
    arrays, _ = encode_splits(model, digits(per_class=10))
    return model, arrays


def _fit(model, arrays, workdir, **kwargs):
    config = jaxtl.TrainConfig(
        epochs=2,
        batch_size=16,
        learning_rate=3e-3,
        augment=AUGMENT,
        data_workers=2,
        progress=False,
        checkpoint_every=2,
        **kwargs.pop("config", {}),
    )
    trainer = Trainer(model, jaxtl.make_plan("full", model.structure), config, str(workdir))
    return trainer.fit(arrays["train"], arrays["validation"], **kwargs)


@pytest.mark.slow
def test_interrupted_augmented_run_with_workers_resumes_bitwise(digits_model, tmp_path):
    model, arrays = digits_model
    whole = _fit(model, arrays, tmp_path / "whole")
    assert whole.steps == 12  # 100 images, batch 16: 6 steps per epoch

    stopped = _fit(model, arrays, tmp_path / "resumed", stop_at=9)  # mid-way through epoch 2
    assert stopped.steps == 9
    resumed = _fit(model, arrays, tmp_path / "resumed", resume=True)
    assert resumed.steps == 12
    a = jax.tree.leaves(jax.device_get((whole.state.params, whole.state.batch_stats)))
    b = jax.tree.leaves(jax.device_get((resumed.state.params, resumed.state.batch_stats)))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)

    # Resuming with another data seed would not continue the same run: refused, nothing lost.
    before = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").rglob("*"))
    with pytest.raises(ValueError, match="training data changed since the checkpoint"):
        _fit(model, arrays, tmp_path / "resumed", resume=True, config={"seed": 1})
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").rglob("*")) == before


def test_augmenting_text_inputs_is_refused(tmp_path):
    from _tiny import make_tiny_bert

    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    config = jaxtl.TrainConfig(augment="hflip", progress=False)
    trainer = Trainer(model, jaxtl.make_plan("full", model.structure), config)
    text = {"input_ids": np.ones((8, 4), np.int32), "label": np.zeros(8, np.int32)}
    with pytest.raises(
        ValueError, match="transforms images, but this model reads \\['input_ids'\\]"
    ):
        trainer.train_loader(text)
