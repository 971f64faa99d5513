"""Semantic segmentation: the per-pixel head on ResNet, ConvNeXt and ViT, the digits-on-a-canvas
dataset with real masks, masks through the model's preprocessing, and one real fine-tune.

The references are independent of jaxtl: the backbones' feature maps come from transformers'
PyTorch models (``ResNetModel``, ``ConvNextModel``, ``ViTModel``) on tiny random checkpoints
that transformers saves, the head's upsampling from ``torch.nn.functional.interpolate``, mask
resizing from torch's ``nearest-exact`` mode, the digits from scikit-learn's own arrays, and
the fine-tune's mean IoU from ``sklearn.metrics.jaccard_score``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from sklearn.datasets import load_digits
from sklearn.metrics import jaccard_score
from test_convnext import tiny_convnext_config
from test_resnet import randomize_batch_norm
from test_vit import tiny_vit_config

import jaxtl
from jaxtl import cli, feature_cache
from jaxtl.data.images import IGNORE_LABEL, ImageSplits, digits_segmentation, encode, encode_masks
from jaxtl.models.common import recompute
from jaxtl.models.preprocessing import ImagePreprocessing
from jaxtl.train import losses
from jaxtl.transfer.trees import flatten, unflatten
from jaxtl.weights.loading import load

# float32 end to end, each family's own parity tolerance; never loosened to make a test pass.
TOL = {"resnet": 1e-4, "convnext": 1e-5, "vit": 1e-5}
NUM_LABELS = 5
HEAD = "segmentation_head"
HEAD_PARAMS = [f"{HEAD}/classifier/bias", f"{HEAD}/classifier/kernel"]
# Non-square inputs, so a height/width swap in the reshape or the upsampling shows.
SIZE = {"resnet": (64, 48), "convnext": (32, 48), "vit": (32, 48)}


def tiny_hf_model(family: str) -> torch.nn.Module:
    """A tiny random ``*ForImageClassification`` whose every tensor is distinct (so a skipped
    or swapped one shows): ResNet with two basic stages (stride 8) and random BatchNorm
    statistics, ConvNeXt's and ViT's test configs (stride 16, patch 8)."""
    torch.manual_seed(0)
    if family == "resnet":
        config = transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
        )
        model = transformers.ResNetForImageClassification(config)
        randomize_batch_norm(model, 0)
        return model.eval()
    if family == "convnext":
        model = transformers.ConvNextForImageClassification(tiny_convnext_config())
    else:
        model = transformers.ViTForImageClassification(
            tiny_vit_config(image_size=list(SIZE["vit"]))
        )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module]]:
    """{family: (directory, eval-mode reference)}, each saved by transformers."""
    out = {}
    for family in SIZE:
        directory = tmp_path_factory.mktemp(family)
        reference = tiny_hf_model(family)
        reference.save_pretrained(directory)
        out[family] = (str(directory), reference)
    return out


def pixels(family: str, seed: int = 0, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *SIZE[family], 3)).astype(np.float32)


def with_random_head(model, seed: int = 1):
    """The model's params with a head of random (non-zero) kernel and bias."""
    rng = np.random.default_rng(seed)
    flat = flatten(jax.device_get(model.params))
    for path in HEAD_PARAMS:
        flat[path] = rng.normal(0, 0.5, np.shape(flat[path])).astype(np.float32)
    return unflatten(flat)


def torch_feature_map(family: str, reference: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    """What the head reads, computed by transformers: ``[B, h, w, C]``."""
    nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        if family == "resnet":
            return reference.resnet(nchw).last_hidden_state.permute(0, 2, 3, 1)
        if family == "convnext":
            hidden = reference.convnext(nchw).last_hidden_state.permute(0, 2, 3, 1)
            return reference.convnext.layernorm(hidden)  # the final norm, per pixel
        tokens = reference.vit(nchw).last_hidden_state[:, 1:]  # final LayerNorm, CLS dropped
        grid = (x.shape[1] // 8, x.shape[2] // 8)
        return tokens.reshape(x.shape[0], *grid, tokens.shape[-1])


@pytest.mark.parametrize("family", list(SIZE))
def test_logits_are_a_linear_head_on_the_pytorch_feature_map_upsampled_by_torch(
    checkpoints, family
):
    directory, reference = checkpoints[family]
    model = load(directory, task="segmentation", num_labels=NUM_LABELS)
    assert model.family == family and model.structure.head == (HEAD,)
    assert model.report.initialized == HEAD_PARAMS
    # The new head starts as the family's own heads do: torch's Linear for ResNet,
    # transformers' normal(initializer_range) kernel and zero bias for ConvNeXt and ViT.
    kernel = np.asarray(model.params[HEAD]["classifier"]["kernel"])
    bias = np.asarray(model.params[HEAD]["classifier"]["bias"])
    if family == "resnet":
        bound = 1 / np.sqrt(kernel.shape[0])
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound and bias.any()
    else:
        assert not bias.any() and 0.01 < kernel.std() < 0.03
    params, x = with_random_head(model), pixels(family)
    run = feature_cache.forward_with_input(model, HEAD)
    (logits, _), feature_map = run(params, model.batch_stats, {"pixel_values": x})
    assert logits.shape == (2, *SIZE[family], NUM_LABELS)

    expected_map = torch_feature_map(family, reference, x)
    diff = np.abs(np.asarray(feature_map) - expected_map.numpy()).max()
    print(f"{family}: feature map {tuple(expected_map.shape)}, max diff {diff:.2e}")
    assert diff < TOL[family]
    head = flatten(params)
    kernel = torch.from_numpy(np.asarray(head[f"{HEAD}/classifier/kernel"]))
    bias = torch.from_numpy(np.asarray(head[f"{HEAD}/classifier/bias"]))
    small = (expected_map @ kernel + bias).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(
        small, size=SIZE[family], mode="bilinear", align_corners=False
    ).permute(0, 2, 3, 1)
    diff = np.abs(np.asarray(logits) - expected.numpy()).max()
    print(f"{family}: logits max diff {diff:.2e}")
    assert diff < TOL[family]


@pytest.mark.parametrize("family", list(SIZE))
def test_the_backbone_loads_exactly_as_for_features(checkpoints, family):
    directory, _ = checkpoints[family]
    features = load(directory, task="features")
    model = load(directory, task="segmentation", num_labels=NUM_LABELS)
    ours, theirs = flatten(model.params), flatten(features.params)
    assert sorted(ours) == sorted([*theirs, *HEAD_PARAMS])
    for path, value in theirs.items():
        np.testing.assert_array_equal(ours[path], value, err_msg=path)
    stats, their_stats = flatten(model.batch_stats), flatten(features.batch_stats)
    assert sorted(stats) == sorted(their_stats) and bool(stats) == (family == "resnet")
    for path, value in their_stats.items():
        np.testing.assert_array_equal(stats[path], value, err_msg=path)
    # The source's classifier is left over, as it is for features.
    assert model.report.unexpected == features.report.unexpected
    assert any("classifier" in name for name in model.report.unexpected)
    assert model.structure.blocks == features.structure.blocks
    assert model.structure.stem == features.structure.stem


def torchvision_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A two-stage torchvision ResNet (basic blocks, widths 8 and 16) with a 10-class fc."""
    rng = np.random.default_rng(seed)
    shapes = {"conv1.weight": (8, 3, 7, 7), "fc.weight": (10, 16), "fc.bias": (10,)}
    bns = ["bn1"]
    for stage, (cin, cout) in enumerate([(8, 8), (8, 16)], start=1):
        block = f"layer{stage}.0"
        shapes[f"{block}.conv1.weight"] = (cout, cin, 3, 3)
        shapes[f"{block}.conv2.weight"] = (cout, cout, 3, 3)
        bns += [f"{block}.bn1", f"{block}.bn2"]
        if cin != cout or stage > 1:
            shapes[f"{block}.downsample.0.weight"] = (cout, cin, 1, 1)
            bns.append(f"{block}.downsample.1")
    out = {k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in shapes.items()}
    for bn in bns:
        width = 8 if bn in ("bn1",) or bn.startswith("layer1") else 16
        out[f"{bn}.weight"] = rng.uniform(0.5, 1.5, width).astype(np.float32)
        out[f"{bn}.bias"] = rng.normal(0, 0.1, width).astype(np.float32)
        out[f"{bn}.running_mean"] = rng.normal(0, 0.1, width).astype(np.float32)
        out[f"{bn}.running_var"] = rng.uniform(0.5, 1.5, width).astype(np.float32)
    return out


def test_a_torchvision_resnet_takes_the_head_on_its_layer4_map(tmp_path):
    path = str(tmp_path / "resnet.safetensors")
    safetensors.numpy.save_file(torchvision_state_dict(), path)
    model = load(path, task="segmentation", num_labels=NUM_LABELS)
    features = load(path, task="features")
    assert model.structure.head == (HEAD,) and model.report.initialized == HEAD_PARAMS
    assert (
        sorted(model.report.unexpected)
        == sorted(features.report.unexpected)
        == ["fc/bias", "fc/kernel"]
    )
    params, x = with_random_head(model), pixels("resnet")
    run = feature_cache.forward_with_input(model, HEAD)
    (logits, _), feature_map = run(params, model.batch_stats, {"pixel_values": x})
    assert logits.shape == (2, 64, 48, NUM_LABELS) and feature_map.shape == (2, 8, 6, 16)
    # The head reads the map that the features model pools.
    pooled = features.apply(features.params, {"pixel_values": x}, batch_stats=features.batch_stats)
    np.testing.assert_allclose(np.asarray(feature_map).mean(axis=(1, 2)), pooled, atol=1e-5)
    with pytest.raises(ValueError, match="no source format to export to"):
        jaxtl.export(model, tmp_path / "out.safetensors", params)


def test_export_refuses_and_its_backbone_recipe_loads_in_transformers(checkpoints, tmp_path):
    directory, _ = checkpoints["convnext"]
    model = load(directory, task="segmentation", num_labels=NUM_LABELS)
    rng = np.random.default_rng(2)
    tuned = unflatten(  # as if fine-tuned: every backbone tensor moved
        {
            p: np.asarray(v) + rng.normal(0, 0.05, np.shape(v)).astype(np.float32)
            for p, v in flatten(jax.device_get(model.params)).items()
        }
    )
    with pytest.raises(ValueError, match="jaxtl.load\\(PATH, task='features'\\)") as info:
        jaxtl.export(model, tmp_path / "refused", tuned)
    assert not os.path.exists(tmp_path / "refused")
    print(info.value)
    # The recipe the error gives, followed word for word.
    backbone = jaxtl.load(directory, task="features")
    out = jaxtl.export(
        backbone, tmp_path / "backbone", {k: v for k, v in tuned.items() if k != HEAD}
    )
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["ConvNextModel"]
    exported = transformers.ConvNextModel.from_pretrained(out).eval()
    x = pixels("convnext")
    run = feature_cache.forward_with_input(model, HEAD)
    _, feature_map = run(tuned, model.batch_stats, {"pixel_values": x})
    nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        hidden = exported(nchw).last_hidden_state.permute(0, 2, 3, 1)
        expected = exported.layernorm(hidden).numpy()
    assert np.abs(np.asarray(feature_map) - expected).max() < TOL["convnext"]


@pytest.mark.parametrize("family", ["convnext", "vit"])
def test_remat_and_bf16_keep_the_logits_and_a_linear_probe_caches_the_feature_map(
    checkpoints, family
):
    directory, _ = checkpoints[family]
    model = load(directory, task="segmentation", num_labels=NUM_LABELS)
    params, batch = with_random_head(model), {"pixel_values": pixels(family)}
    logits = np.asarray(model.apply(params, batch))
    remat = recompute(model, remat="full")
    # Another compiled program: equal up to float32 rounding, within the family's tolerance.
    np.testing.assert_allclose(remat.apply(params, batch), logits, rtol=0, atol=TOL[family])
    half = recompute(model, dtype=jnp.bfloat16).apply(params, batch)  # --precision bf16
    assert half.dtype == jnp.bfloat16 and half.shape == logits.shape
    # bfloat16 keeps 8 bits of mantissa: about 1% of the largest logit here.
    assert np.abs(np.asarray(half, np.float32) - logits).max() < 0.03 * np.abs(logits).max()

    plan = jaxtl.make_plan("linear_probe", model.structure)
    trainable = flatten(plan.trainable_mask(model.params))
    assert feature_cache.check_prefix(model, trainable, batch) == HEAD
    _, feature_map = feature_cache.forward_with_input(model, HEAD)(params, {}, batch)
    shape = jax.ShapeDtypeStruct(batch["pixel_values"].shape[1:], np.float32)
    tail = feature_cache.tail_model(model, HEAD, shape)
    cached = tail.apply(params, {"features": feature_map})
    np.testing.assert_allclose(cached, logits, rtol=0, atol=TOL[family])


# ---- data: digits on a canvas ----------------------------------------------------------------


@pytest.fixture(scope="module")
def canvases() -> ImageSplits:
    return digits_segmentation()


def ink_crop(ink: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The bounding box of the non-zero pixels of ``ink`` and its top-left corner."""
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], (rows[0], cols[0])


def test_each_canvas_shows_one_real_digit_and_its_mask_is_its_thresholded_ink(canvases):
    raw = load_digits()
    ink = raw.images.astype(np.int64).repeat(2, axis=1).repeat(2, axis=2)
    # Each digit's inked pixels at 2x, cut to their bounding box: where it lies on a canvas.
    by_crop: dict[bytes, list[int]] = {}
    for i, digit in enumerate(ink):
        crop, _ = ink_crop(digit)
        by_crop.setdefault(crop.shape[0].to_bytes(1, "big") + crop.tobytes(), []).append(i)
    assert canvases.label_names == ["background", *"0123456789"]
    used: dict[str, set[int]] = {}
    for split in ("train", "validation", "test"):
        images, masks = getattr(canvases, split)
        assert images.shape == (len(images), 32, 32, 1) and images.dtype == np.uint8
        assert masks.shape == images.shape[:3] and masks.dtype == np.int32
        used[split] = set()
        for image, mask in zip(images[..., 0], masks, strict=True):
            levels = np.round(image.astype(np.float64) * 16 / 255).astype(np.int64)
            crop, (top, left) = ink_crop(levels)
            matches = by_crop[crop.shape[0].to_bytes(1, "big") + crop.tobytes()]
            digit = min(i for i in matches if i not in used[split])  # duplicates: any copy
            used[split].add(digit)
            # The digit's own pixels decide the mask: stroke > 4, faint ink ignored, blank 0.
            expected = np.zeros((32, 32), np.int64)
            box = (slice(top, top + crop.shape[0]), slice(left, left + crop.shape[1]))
            expected[box] = np.where(
                crop > 4, raw.target[digit] + 1, np.where(crop > 0, IGNORE_LABEL, 0)
            )
            np.testing.assert_array_equal(mask, expected)
    # Every digit exactly once, none in two splits (identical twins aside, by index).
    assert sum(len(s) for s in used.values()) == len(raw.target)
    assert not (used["train"] & used["validation"] or used["train"] & used["test"])
    assert not used["validation"] & used["test"]
    assert set(canvases.sizes().values()) == {1078, 359, 360}


def test_the_canvases_are_seeded_and_hold_several_digits_apart():
    again, other = digits_segmentation(), digits_segmentation(seed=1)
    first = digits_segmentation()
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(first, split)[0], getattr(again, split)[0])
        np.testing.assert_array_equal(getattr(first, split)[1], getattr(again, split)[1])
        assert not np.array_equal(getattr(first, split)[1], getattr(other, split)[1])
    two = digits_segmentation(48, digits_per_canvas=2, seed=3)
    assert two.sizes() == {"train": 539, "validation": 180, "test": 180}
    assert two.train[0].shape == (539, 48, 48, 1)
    # Every digit's ink lands whole (a digit placed over another would overwrite some), and
    # no canvas names more classes than it holds digits.
    raw = load_digits()
    ink = sum(
        int(np.round(getattr(two, s)[0].astype(np.float64) * 16 / 255).sum())
        for s in ("train", "validation", "test")
    )
    assert ink == 4 * int(raw.images.sum())  # each 8x8 pixel is 2x2 on the canvas
    for mask in two.train[1]:
        assert len(set(np.unique(mask).tolist()) - {0, IGNORE_LABEL}) in (1, 2)
    with pytest.raises(ValueError, match="cannot hold 5 digit"):
        digits_segmentation(32, digits_per_canvas=5)
    with pytest.raises(ValueError, match="threshold must be below 16"):
        digits_segmentation(threshold=16)


# ---- masks through the model's preprocessing ----------------------------------------------


def torch_nearest_then_crop(masks: np.ndarray, resized: tuple[int, int], crop: tuple[int, int]):
    """torch's ``nearest-exact`` (PIL's NEAREST sampling: source ``floor((i + 0.5) * in / out)``)
    resize, then a center crop."""
    t = torch.from_numpy(masks.astype(np.float32))[:, None]
    out = torch.nn.functional.interpolate(t, size=resized, mode="nearest-exact")[:, 0].numpy()
    top, left = (resized[0] - crop[0]) // 2, (resized[1] - crop[1]) // 2
    return out[:, top : top + crop[0], left : left + crop[1]].astype(np.int64)


def random_masks(shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = rng.integers(0, NUM_LABELS, shape).astype(np.int32)
    masks[rng.random(shape) < 0.1] = IGNORE_LABEL
    return masks


def test_masks_are_resized_and_cropped_with_nearest_neighbour_as_the_images_move():
    # Short side 27 -> 37 (long side 33 -> 45), center crop 30x36: an upscale by non-integer
    # factors and a crop off both axes, bicubic for the images. Odd input sizes put no output
    # pixel exactly between two input pixels, where rounding alone would pick the neighbour.
    recipe = ImagePreprocessing(
        size=(30, 36), resize=37, mean=(0.5,), std=(0.5,), interpolation="bicubic"
    )
    masks = random_masks((3, 27, 33))
    images = np.zeros((3, 27, 33, 1), np.uint8)
    moved = encode_masks(recipe, images, masks)
    assert moved.dtype == np.int32 and moved.shape == (3, 30, 36)
    np.testing.assert_array_equal(moved, torch_nearest_then_crop(masks, (37, 45), (30, 36)))
    # The same geometry as the images: an image that holds the mask's ids, preprocessed with
    # nearest neighbour and no normalization, comes out as the moved mask.
    as_image = (masks + 100).astype(np.uint8)[..., None]
    plain = ImagePreprocessing(
        size=(30, 36), resize=37, mean=(0.0,), std=(1.0,), rescale=1.0, interpolation="nearest"
    )
    np.testing.assert_array_equal(np.rint(plain(as_image)[..., 0]).astype(int) - 100, moved)


def test_encode_moves_masks_with_their_images_and_checks_them(canvases):
    # 32 -> 64 (no output pixel halfway between two input ones), center crop 60.
    model_recipe = ImagePreprocessing(size=(60, 60), resize=64, mean=(0.5,), std=(0.5,))
    small = ImageSplits(
        train=(canvases.train[0][:8], canvases.train[1][:8]),
        validation=(canvases.validation[0][:4], canvases.validation[1][:4]),
        test=(canvases.test[0][:4], canvases.test[1][:4]),
        label_names=canvases.label_names,
        name="canvases",
    )
    arrays, facts = encode(model_recipe, small, task="segmentation")
    assert facts["image_size"] == [60, 60]
    labels = arrays["train"]["label"]
    assert labels.shape == (8, 60, 60) and labels.dtype == np.int32
    np.testing.assert_array_equal(
        labels, torch_nearest_then_crop(canvases.train[1][:8], (64, 64), (60, 60))
    )
    # Stroke pixels stay on ink: bright where the mask names a digit, blank where background.
    shown = arrays["train"]["pixel_values"][..., 0] * 0.5 + 0.5
    assert shown[labels > 0].mean() > 0.6 and shown[labels == 0].mean() < 0.05

    def splits(train_labels, labels_of_rest=None):
        rest = labels_of_rest if labels_of_rest is not None else small.test[1]
        return ImageSplits(
            train=(small.train[0], train_labels),
            validation=(small.test[0], rest),
            test=(small.test[0], rest),
            label_names=small.label_names,
            name="canvases",
        )

    with pytest.raises(ValueError, match=r"masks of shape \(8, 30, 32\) do not cover images"):
        encode(model_recipe, splits(small.train[1][:, :30]))
    with pytest.raises(ValueError, match="masks are float32"):
        encode(model_recipe, splits(small.train[1].astype(np.float32)))
    bad = small.train[1].copy()
    bad[0, 0, 0] = 11
    with pytest.raises(ValueError, match=r"class ids \[11\].*\[0, 11\)"):
        encode(model_recipe, splits(bad))
    with pytest.raises(ValueError, match="task='segmentation'"):
        encode(model_recipe, small, task="classification")
    per_image = np.zeros(8, np.int32), np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="needs a mask"):
        encode(model_recipe, splits(*per_image), task="segmentation")


def test_ignore_label_is_the_one_the_loss_and_metrics_skip():
    assert IGNORE_LABEL == losses.IGNORE


# ---- one real fine-tune ------------------------------------------------------------------------


def test_a_resnet_fine_tuned_on_the_canvases_segments_digits_as_sklearn_scores_it(
    canvases, tmp_path
):
    # Two basic stages: a stride-8 map, 4x4 on the 32x32 canvas, each cell a quarter digit.
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"
    )
    transformers.ResNetForImageClassification(config).eval().save_pretrained(tmp_path / "ckpt")
    model = jaxtl.load(
        tmp_path / "ckpt", task="segmentation", num_labels=11, in_channels=1, image_size=32
    )
    train = jaxtl.TrainConfig(
        batch_size=32, max_steps=240, learning_rate=1e-2, eval_every=120, progress=False
    )
    result = jaxtl.finetune(model, "full", canvases, train, str(tmp_path / "run"), verbose=False)
    with open(tmp_path / "run" / "results.json") as f:
        written = json.load(f)["test"]
    assert written["mean_iou"] == result.test["mean_iou"]

    # The test split's predictions again, from the returned params, scored by scikit-learn.
    arrays, _ = encode(model.extras["preprocessing"], canvases, task="segmentation")
    test = arrays["test"]
    logits = model.apply(
        result.params, {"pixel_values": test["pixel_values"]}, batch_stats=result.batch_stats
    )
    pred, label = np.asarray(logits).argmax(-1).ravel(), test["label"].ravel()
    scored = label != IGNORE_LABEL
    pred, label = pred[scored], label[scored]
    # labels=None: the classes present in the labels or the predictions, as mean_iou counts.
    expected = jaccard_score(label, pred, average="macro")
    per_class = jaccard_score(label, pred, average=None, labels=list(range(11)))
    baseline = jaccard_score(label, np.zeros_like(label), average="macro")  # all background
    print(
        f"test mean IoU {written['mean_iou']:.4f} (sklearn {expected:.4f}, all-background "
        f"{baseline:.4f}), pixel accuracy {written['pixel_accuracy']:.4f}"
    )
    assert written["mean_iou"] == pytest.approx(expected, abs=1e-9)
    names = canvases.label_names
    assert written["per_class_iou"] == pytest.approx(
        dict(zip(names, per_class, strict=True)), abs=1e-9
    )
    assert written["pixel_accuracy"] == pytest.approx(float(np.mean(pred == label)), abs=1e-9)
    assert baseline < 0.1 and written["mean_iou"] > 0.4


def test_the_command_line_segments_and_refuses_augmenting_images_without_masks(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "ckpt")
    argv = ["finetune", "--model", str(tmp_path / "ckpt"), "--task", "segmentation",
            "--num-labels", "11", "--data", "digits-segmentation", "--in-channels", "1",
            "--image-size", "32", "--recipe", "full", "--no-scratch", "--max-steps", "20",
            "--lr", "1e-2"]  # fmt: skip
    assert cli.main([*argv, "--augment", "hflip", "--out", str(tmp_path / "augmented")]) == 2
    assert "(--augment) moves pixels but not their masks" in capsys.readouterr().err
    out = str(tmp_path / "out")
    assert cli.main([*argv, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "test mean_iou" in printed  # the comparison table's column
    run = os.path.join(out, "pretrained-full")
    with open(os.path.join(run, "results.json")) as f:
        results = json.load(f)["test"]
    assert cli.main(["evaluate", run]) == 0  # the data rebuilt from run.json's spec
    assert f"mean_iou: {results['mean_iou']:.4f}" in capsys.readouterr().out
