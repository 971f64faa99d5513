"""The grain training pipeline: order, augmentation randomness, worker independence, process
sharding, and a training run (augmented, mixed, 2 workers) interrupted mid-epoch that resumes
to bitwise the same params."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from _tiny import evaluate, fit

import jaxtl
from jaxtl.data import ArrayLoader, augment, digits, training_loader
from jaxtl.data.mixing import MIX_STREAM, MixBatch
from jaxtl.data.pipeline import ArraySource, GrainLoader
from jaxtl.encoding import encode_splits
from jaxtl.models.preprocessing import ImagePreprocessing
from jaxtl.train import Trainer

AUGMENT = "random_resized_crop(0.5),translate(2),hflip"


def _arrays(n=40, channels=1, classes=None):
    rng = np.random.default_rng(0)
    return {
        "pixel_values": rng.standard_normal((n, 6, 6, channels)).astype(np.float32),
        "label": (np.arange(n) % (classes or n)).astype(np.int32),
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


def _two_processes(arrays, **kwargs):
    """The batches processes 0 and 1 of 2 read, joined row-wise into global batches."""
    shards = [
        _batches(GrainLoader(ArraySource(arrays), 8, process_index=p, process_count=2, **kwargs))
        for p in range(2)
    ]
    return [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*shards, strict=True)]


def _first_draw(example, rng):
    return {**example, "draw": np.float64(rng.random())}


def test_each_example_draws_from_its_own_stream():
    # The epoch's permutation uses [seed, epoch]; numpy ignores trailing zero seed words, so an
    # untagged [seed, epoch, 0] would hand example 0 the permutation's own stream.
    loader = GrainLoader(ArraySource(_arrays(16)), 8, seed=3, transform=_first_draw)
    draws = {}
    for epoch in range(2):
        for batch in loader.epoch(epoch):
            draws.update(zip(batch["label"].tolist(), batch["draw"].tolist(), strict=True))
        assert np.random.default_rng([3, epoch]).random() not in set(draws.values())
    assert len(set(draws.values())) == len(draws) == 16


def test_each_process_reads_its_rows_of_every_global_batch():
    arrays, transform = _arrays(), augment.parse(AUGMENT)
    whole = _batches(GrainLoader(ArraySource(arrays), 8, seed=2, transform=transform))
    _same(_two_processes(arrays, seed=2, transform=transform), whole)


def test_bad_augmentation_specs_are_named():
    with pytest.raises(
        ValueError, match=r"Unknown augmentation 'rotate\(10\)' in augment \(--augment\)"
    ):
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
    options = {
        "epochs": 2,
        "batch_size": 16,
        "learning_rate": 3e-3,
        # rand_augment works on intensities: the Trainer hands it the model's normalization.
        "augment": "random_resized_crop(0.5),translate(2),rand_augment(2, 9),hflip",
        "mixup": 0.2,
        "cutmix": 1.0,
        "label_smoothing": 0.1,
        "data_workers": 2,
        "progress": False,
        "checkpoint_every": 2,
    }
    config = jaxtl.TrainConfig(**{**options, **kwargs.pop("config", {})})
    trainer = Trainer(model, jaxtl.make_plan("full", model.structure), config, str(workdir))
    return fit(trainer, arrays["train"], arrays["validation"], **kwargs)


@pytest.mark.slow
def test_interrupted_augmented_run_with_workers_resumes_bitwise(digits_model, tmp_path):
    # Every source of randomness on: crop, translate, RandAugment, flip, mixup or cutmix per
    # batch with smoothed targets, dropout-free BatchNorm CNN, 2 grain workers.
    model, arrays = digits_model
    whole = _fit(model, arrays, tmp_path / "whole")
    assert whole.steps == 12  # 100 images, batch 16: 6 steps per epoch
    assert np.isfinite(whole.history[-1]["val_loss"])

    stopped = _fit(model, arrays, tmp_path / "resumed", stop_at=9)  # mid-way through epoch 2
    assert stopped.steps == 9
    # Resumed with no workers instead of 2 (a smaller machine, another --data-workers): every
    # example's randomness is drawn from (seed, epoch, index), so nothing changes.
    resumed = _fit(model, arrays, tmp_path / "resumed", resume=True, config={"data_workers": 0})
    assert resumed.steps == 12
    a = jax.tree.leaves(jax.device_get((whole.state.params, whole.state.batch_stats)))
    b = jax.tree.leaves(jax.device_get((resumed.state.params, resumed.state.batch_stats)))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert [h["val_loss"] for h in whole.history] == [h["val_loss"] for h in resumed.history]

    # Resuming with another data seed or other target smoothing would not continue the same
    # run: refused, nothing lost.
    before = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").rglob("*"))
    for change in ({"seed": 1}, {"label_smoothing": 0.2}):
        with pytest.raises(ValueError, match="training data changed since the checkpoint"):
            _fit(model, arrays, tmp_path / "resumed", resume=True, config=change)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").rglob("*")) == before


def test_mixed_batches_are_a_function_of_seed_epoch_and_batch():
    arrays = _arrays(48, channels=3, classes=5)
    prep = ImagePreprocessing(size=(6, 6))
    kwargs = {
        "seed": 3,
        "transform": augment.parse("rand_augment(2, 9),hflip", prep),
        "batch_transform": MixBatch(5, mixup=0.3, cutmix=1.0, label_smoothing=0.1),
    }
    whole = _batches(GrainLoader(ArraySource(arrays), 8, **kwargs))
    assert whole[0]["label"].shape == (8, 5)
    # Each batch is the un-mixed batch mixed with default_rng([seed, epoch, batch, MIX_STREAM]).
    plain = _batches(GrainLoader(ArraySource(arrays), 8, seed=3, transform=kwargs["transform"]))
    for i, (mixed, raw) in enumerate(zip(whole, plain, strict=True)):
        epoch, b = divmod(i, 6)
        rng = np.random.default_rng([3, epoch, b, MIX_STREAM])
        _same([kwargs["batch_transform"](dict(raw), rng)], [mixed])
    # Workers, a mid-epoch restart and two processes all read the same batches.
    _same(_batches(GrainLoader(ArraySource(arrays), 8, workers=2, **kwargs)), whole)
    _same(_batches(GrainLoader(ArraySource(arrays), 8, **kwargs), start=4), whole[4:])
    halves = [
        _batches(GrainLoader(ArraySource(arrays), 8, process_index=p, process_count=2, **kwargs))
        for p in range(2)
    ]
    _same(
        [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves, strict=True)], whole
    )
    # Another seed mixes differently; the loader's state records the mixing, so resuming a run
    # with other mixing is refused.
    other = _batches(GrainLoader(ArraySource(arrays), 8, **{**kwargs, "seed": 4}))
    assert not np.array_equal(other[0]["label"], whole[0]["label"])
    loader = GrainLoader(ArraySource(arrays), 8, **kwargs)
    changed = GrainLoader(
        ArraySource(arrays), 8, **{**kwargs, "batch_transform": MixBatch(5, mixup=0.3)}
    )
    with pytest.raises(ValueError, match="training data changed.*batch_transform"):
        changed.check_state(loader.state())


def test_augmenting_text_inputs_is_refused(tmp_path):
    from _tiny import make_tiny_bert

    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    config = jaxtl.TrainConfig(augment="hflip", progress=False)
    trainer = Trainer(model, jaxtl.make_plan("full", model.structure), config)
    text = {"input_ids": np.ones((8, 4), np.int32), "label": np.zeros(8, np.int32)}
    with pytest.raises(
        ValueError, match="transforms images, but this model reads \\['input_ids'\\]"
    ):
        training_loader(text, trainer.config.data, trainer.model, seed=trainer.config.seed)


def _texts(n=100, length=40, seed=0):
    rng = np.random.default_rng(seed)
    real = np.minimum(rng.geometric(0.12, size=n) + 1, length)  # mostly short, a few long
    mask = (np.arange(length)[None, :] < real[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(5, 900, size=(n, length)), 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "label": np.arange(n, dtype=np.int32)}


def test_length_buckets_pad_each_batch_to_the_smallest_bucket_that_holds_it():
    from jaxtl.data.text import bucket_lengths

    arrays, buckets = _texts(), bucket_lengths(40)
    assert buckets == (8, 16, 32, 40)
    loader = GrainLoader(ArraySource(arrays), 8, seed=4, length_buckets=buckets)
    batches = _batches(loader)
    seen = []
    for b in batches:
        width, longest = b["input_ids"].shape[1], int(b["attention_mask"].sum(1).max())
        assert width in buckets and width >= longest
        assert width == min(x for x in buckets if x >= longest)
        # Cutting dropped padding only: the rows are the stored rows' first `width` tokens.
        np.testing.assert_array_equal(b["input_ids"], arrays["input_ids"][b["label"], :width])
        seen.append(b["label"])
    epoch0 = np.concatenate(seen[: loader.steps_per_epoch])
    assert len(set(epoch0.tolist())) == 96  # 12 batches of 8, each example at most once
    assert len({b["input_ids"].shape[1] for b in batches}) > 1
    plain = GrainLoader(ArraySource(arrays), 8, seed=4)
    print(
        f"padding waste: {plain.padding_waste():.3f} one length, {loader.padding_waste():.3f} "
        "bucketed"
    )
    assert loader.padding_waste() < plain.padding_waste() / 2

    # Same batches with workers, after a mid-epoch restart, and split over two processes.
    _same(
        _batches(GrainLoader(ArraySource(arrays), 8, seed=4, length_buckets=buckets, workers=2)),
        batches,
    )
    _same(
        _batches(GrainLoader(ArraySource(arrays), 8, seed=4, length_buckets=buckets), start=5),
        batches[5:],
    )
    _same(_two_processes(arrays, seed=4, length_buckets=buckets), batches)


def test_bucketed_evaluation_equals_one_padded_length(tmp_path):
    from _tiny import make_tiny_bert

    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert"), dropout=0.0), num_labels=2)
    arrays = _texts(n=50)
    arrays["label"] = arrays["label"] % 2
    arrays["token_type_ids"] = np.zeros_like(arrays["input_ids"])
    plan = jaxtl.make_plan("full", model.structure)
    results = {}
    for bucketed in (False, True):
        config = jaxtl.TrainConfig(eval_batch_size=16, bucket_by_length=bucketed, progress=False)
        trainer = Trainer(model, plan, config)
        results[bucketed] = evaluate(trainer, trainer.init_state(1), arrays)
    assert results[True]["examples"] == results[False]["examples"] == 50
    assert results[True]["loss"] == pytest.approx(results[False]["loss"], rel=1e-6)
    assert results[True]["accuracy"] == results[False]["accuracy"]
