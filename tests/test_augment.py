"""Image augmentation beyond crop and flip: RandAugment's ops (by hand and against PIL), mixup /
cutmix / label smoothing as soft labels from (seed, epoch, batch), the soft-label loss against an
independent formula, and an augmented, mixed run interrupted and resumed to bitwise the same
params."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

import jaxtl
from jaxtl.data import augment, mixing, randaugment
from jaxtl.data.augment import Intensity
from jaxtl.data.mixing import MixBatch
from jaxtl.data.pipeline import ArraySource, GrainLoader
from jaxtl.models.preprocessing import ImagePreprocessing
from jaxtl.train import losses

# --- RandAugment ops on hand-made images (intensities in [0, 1]) -------------------------------


def _image(values, channels=1):
    """``[H, W]`` values -> ``[H, W, channels]`` float32."""
    x = np.asarray(values, np.float32)[..., None]
    return np.repeat(x, channels, axis=-1)


def test_photometric_ops_do_what_they_say():
    x = _image([[0.1, 0.5], [0.9, 1.0]])
    np.testing.assert_array_equal(randaugment.identity(x), x)
    # Solarize inverts at and above the threshold only.
    np.testing.assert_allclose(
        randaugment.solarize(x, 0.5)[..., 0], [[0.1, 0.5], [0.1, 0.0]], atol=1e-7
    )
    # Posterize keeps the top bits of each 8-bit level: 255 -> 240, 130 -> 128, 7 -> 0 at 4 bits.
    levels = _image([[255, 130], [7, 64]]) / 255
    np.testing.assert_array_equal(
        np.rint(randaugment.posterize(levels, 4) * 255)[..., 0], [[240, 128], [0, 64]]
    )
    np.testing.assert_array_equal(randaugment.posterize(levels, 8), levels)
    np.testing.assert_array_equal(
        np.rint(randaugment.posterize(levels, 1) * 255)[..., 0], [[128, 128], [0, 0]]
    )
    # Autocontrast stretches each channel to [0, 1]; a flat channel is left alone.
    two = np.stack([[[0.2, 0.4, 0.6]], [[0.3, 0.3, 0.3]]], axis=-1).astype(np.float32)  # [1, 3, 2]
    np.testing.assert_allclose(randaugment.autocontrast(two)[..., 0], [[0.0, 0.5, 1.0]], atol=1e-6)
    np.testing.assert_array_equal(randaugment.autocontrast(two)[..., 1], two[..., 1])
    # Enhancement factors: 0 is the degenerate image, 1 the input, results stay in [0, 1].
    rgb = np.array([[[1.0, 0.0, 0.0], [0.0, 0.5, 1.0]]], np.float32)
    np.testing.assert_array_equal(randaugment.brightness(rgb, 0.0), np.zeros_like(rgb))
    np.testing.assert_array_equal(randaugment.brightness(rgb, 1.0), rgb)
    assert randaugment.brightness(rgb, 1.9).max() == 1.0
    gray = np.array([0.299, 0.587 * 0.5 + 0.114], np.float32)  # the luma of each pixel
    np.testing.assert_allclose(randaugment.color(rgb, 0.0), np.repeat(gray[None, :, None], 3, -1))
    np.testing.assert_allclose(randaugment.color(rgb, 1.0), rgb)
    np.testing.assert_allclose(randaugment.contrast(rgb, 0.0), np.full_like(rgb, gray.mean()))
    # Sharpness 0 is PIL's SMOOTH of the interior (centre weight 5 of 13); borders unchanged.
    dot = np.zeros((3, 3, 1), np.float32)
    dot[1, 1] = 1.0
    np.testing.assert_allclose(randaugment.sharpness(dot, 0.0)[1, 1, 0], 5 / 13, rtol=1e-6)
    np.testing.assert_array_equal(randaugment.sharpness(dot, 0.0)[0], dot[0])


def test_geometric_ops_move_a_known_pattern():
    x = np.arange(16, dtype=np.float32).reshape(4, 4, 1) / 16
    np.testing.assert_array_equal(randaugment.rotate(x, 90), np.rot90(x))  # counter-clockwise
    np.testing.assert_array_equal(randaugment.rotate(x, -90), np.rot90(x, -1))
    np.testing.assert_array_equal(randaugment.rotate(x, 0), x)
    # A dot right of the centre of a 5x5 image goes above it.
    dot = np.zeros((5, 5, 1), np.float32)
    dot[2, 4] = 1
    assert np.argwhere(randaugment.rotate(dot, 90)[..., 0] == 1).tolist() == [[0, 2]]
    # Translation moves whole pixels and fills with black.
    moved = randaugment.translate_x(x, 1)
    np.testing.assert_array_equal(moved[:, 1:], x[:, :-1])
    np.testing.assert_array_equal(moved[:, 0], 0)
    np.testing.assert_array_equal(randaugment.translate_y(x, -2)[:2], x[2:])
    # Shear about the top edge: row y moves left by shear * (y + 1/2), rounded (0.3: 0, 0, 1, 1).
    columns = np.tile(np.arange(1, 7, dtype=np.float32), (4, 1))[..., None]
    sheared = randaugment.shear_x(columns, 0.3)[..., 0]
    assert sheared[:, 0].tolist() == [1, 1, 2, 2]
    np.testing.assert_array_equal(
        randaugment.shear_y(columns.transpose(1, 0, 2), 0.3)[..., 0].T, sheared
    )


def _pil_reference_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    image[:, :4] = 40  # a flat patch, so that the histogram has a tall bin
    return image, Image.fromarray(image)


@pytest.mark.parametrize("channels", [3, 1])
def test_ops_match_pil(channels):
    """PIL's ImageOps / ImageEnhance / affine transforms on uint8 images are the reference
    (AutoAugment's and timm's implementation). Level ops and warps agree exactly; PIL's
    enhancers work in uint8, truncating the blend (< 1 level) after rounding the degenerate
    image (0.5 level, scaled by |1 - factor|), so they agree to that."""
    image, pil = _pil_reference_image()
    if channels == 1:
        pil = pil.convert("L")
        image = np.asarray(pil)[..., None]
    x = image.astype(np.float32) / 255

    def ours(op, *args):
        return np.asarray(op(x, *args)) * 255

    def ref(im):
        return np.asarray(im, np.float32).reshape(image.shape)

    np.testing.assert_array_equal(np.rint(ours(randaugment.equalize)), ref(ImageOps.equalize(pil)))
    np.testing.assert_array_equal(
        np.rint(ours(randaugment.posterize, 3)), ref(ImageOps.posterize(pil, 3))
    )
    np.testing.assert_allclose(
        ours(randaugment.solarize, 128 / 255), ref(ImageOps.solarize(pil, 128)), atol=1e-4
    )
    np.testing.assert_allclose(
        ours(randaugment.autocontrast), ref(ImageOps.autocontrast(pil)), atol=1.0
    )
    enhancers = {
        randaugment.color: ImageEnhance.Color,
        randaugment.contrast: ImageEnhance.Contrast,
        randaugment.brightness: ImageEnhance.Brightness,
        randaugment.sharpness: ImageEnhance.Sharpness,
    }
    for op, enhancer in enhancers.items():
        for factor in (0.1, 0.73, 1.9):
            bound = 1.0 + 0.5 * abs(1.0 - factor)
            np.testing.assert_allclose(
                ours(op, factor), ref(enhancer(pil).enhance(factor)), atol=bound, err_msg=str(op)
            )
    for degrees in (90, 30, -17, 180):
        np.testing.assert_array_equal(ours(randaugment.rotate, degrees), ref(pil.rotate(degrees)))
    # Shears chosen clear of exact rounding ties (PIL's accumulated coordinates break ties its
    # own way); translations of whole pixels.
    for s in (0.09, -0.3, 0.27):
        np.testing.assert_array_equal(
            ours(randaugment.shear_x, s),
            ref(pil.transform(pil.size, Image.AFFINE, (1, s, 0, 0, 1, 0))),
        )
        np.testing.assert_array_equal(
            ours(randaugment.shear_y, s),
            ref(pil.transform(pil.size, Image.AFFINE, (1, 0, 0, s, 1, 0))),
        )
    np.testing.assert_array_equal(
        ours(randaugment.translate_x, 3),
        ref(pil.transform(pil.size, Image.AFFINE, (1, 0, -3, 0, 1, 0))),
    )
    np.testing.assert_array_equal(
        ours(randaugment.translate_y, -2),
        ref(pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, 2))),
    )


def test_magnitudes_follow_the_randaugment_scale():
    x = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8, 1)
    # Magnitude 30: solarize everything at or above 0; posterize to 4 bits; rotate 30 degrees.
    np.testing.assert_allclose(randaugment.rand_augment_op("solarize", x, 30), 1 - x, atol=1e-7)
    np.testing.assert_array_equal(
        randaugment.rand_augment_op("posterize", x, 30), randaugment.posterize(x, 4)
    )
    np.testing.assert_array_equal(
        randaugment.rand_augment_op("rotate", x, 30), randaugment.rotate(x, 30)
    )
    np.testing.assert_array_equal(
        randaugment.rand_augment_op("rotate", x, 9, -1), randaugment.rotate(x, -9)
    )
    # Magnitude 0: every op leaves the image alone (autocontrast / equalize have no magnitude).
    for name in randaugment.RAND_AUGMENT_OPS:
        if name not in ("autocontrast", "equalize", "solarize"):
            np.testing.assert_allclose(
                randaugment.rand_augment_op(name, x, 0), x, atol=1e-7, err_msg=name
            )  # float32 rounding of blend(x, ., 1.0)
    # Translation at magnitude 30 reaches 150/331 of the side: 3 of 8 pixels.
    np.testing.assert_array_equal(
        randaugment.rand_augment_op("translate_x", x, 30), randaugment.translate_x(x, 3)
    )


def test_rand_augment_on_normalized_pixels_is_deterministic_and_keeps_shape():
    prep = ImagePreprocessing(size=(8, 8))  # ImageNet mean/std
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    pixels = prep(images)
    # The intensity map inverts the model's normalization: back to the uint8 image / 255.
    np.testing.assert_allclose(Intensity.of(prep).to_unit(pixels), images / 255, atol=1e-6)
    spec = augment.parse("rand_augment(2, 9)", prep)
    outs = []
    for seed in range(12):
        example = {"pixel_values": pixels[seed % 4].copy(), "label": np.int32(0)}
        out = spec(dict(example), np.random.default_rng([seed, 0, 3]))["pixel_values"]
        again = spec(dict(example), np.random.default_rng([seed, 0, 3]))["pixel_values"]
        np.testing.assert_array_equal(out, again)
        assert out.shape == (8, 8, 3) and out.dtype == np.float32
        # Still within the normalized image of [0, 1] intensities.
        unit = Intensity.of(prep).to_unit(out)
        assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6
        outs.append(out)
    changed = [not np.allclose(o, pixels[i % 4]) for i, o in enumerate(outs)]
    assert 6 <= sum(changed) < 12  # identity-like draws exist, most draws change the image


def test_rand_augment_specs_and_refusals():
    assert repr(augment.parse("rand_augment(2,9),hflip")) == "rand_augment(2, 9),hflip()"
    with pytest.raises(ValueError, match=r"magnitude must be in \[0, 30\], got 31"):
        augment.parse("rand_augment(2, 31)")
    with pytest.raises(ValueError, match="num_ops must be a whole number >= 1"):
        augment.parse("rand_augment(0)")
    with pytest.raises(ValueError, match="too many arguments"):
        augment.parse("rand_augment(2, 9, 1)")
    with pytest.raises(ValueError, match="Unknown augmentation 'mixup'.*TrainConfig.mixup"):
        augment.parse("mixup")
    # Without the model's normalization rand_augment cannot see intensities: refused when the
    # loader is built, not in a worker.
    arrays = {"pixel_values": np.zeros((8, 4, 4, 3), np.float32), "label": np.zeros(8, np.int32)}
    with pytest.raises(ValueError, match="needs the model's normalization"):
        GrainLoader(ArraySource(arrays), 4, transform=augment.parse("rand_augment"))
    gray = ImagePreprocessing(size=(4, 4)).with_channels(1)
    GrainLoader(ArraySource(arrays), 4, transform=augment.parse("rand_augment", gray))  # 1 -> 3 ok
    with pytest.raises(ValueError, match="normalization has 2 channels but the images have 3"):
        prep = ImagePreprocessing(size=(4, 4), mean=(0.5, 0.5), std=(0.5, 0.5))
        GrainLoader(ArraySource(arrays), 4, transform=augment.parse("rand_augment", prep))


# --- mixup / cutmix / label smoothing ----------------------------------------------------------


def _flat_batch(n=8, classes=5):
    """Row i is an image of constant value i + 1: a mixed pixel tells whose it is."""
    values = np.arange(1, n + 1, dtype=np.float32)
    pixels = np.broadcast_to(values[:, None, None, None], (n, 10, 12, 1)).copy()
    return {"pixel_values": pixels, "label": (np.arange(n) * 3 % classes).astype(np.int32)}


def _smoothed(labels, classes, eps):
    out = np.full((len(labels), classes), eps / classes)
    out[np.arange(len(labels)), labels] += 1 - eps
    return out


def test_label_smoothing_alone():
    batch = _flat_batch()
    out = MixBatch(5, label_smoothing=0.2)(dict(batch), np.random.default_rng(0))
    np.testing.assert_array_equal(out["pixel_values"], batch["pixel_values"])
    assert out["label"].dtype == np.float32 and out["label"].shape == (8, 5)
    np.testing.assert_allclose(out["label"], _smoothed(batch["label"], 5, 0.2), rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mixup_targets_are_lam_weighted_pairs(eps):
    batch, partner = _flat_batch(), np.array([1, 0, 3, 2, 5, 4, 7, 6])
    v = batch["pixel_values"][:, 0, 0, 0]
    for seed in range(5):
        out = MixBatch(5, mixup=0.4, label_smoothing=eps)(dict(batch), np.random.default_rng(seed))
        mixed = out["pixel_values"]
        # Every pixel of row i is lam * v_i + (1 - lam) * v_partner, one lam for the batch.
        lam = (mixed[:, 0, 0, 0] - v[partner]) / (v - v[partner])
        # (lam read back from float32 pixels of values up to 8: exact to ~1e-6)
        np.testing.assert_allclose(lam, lam[0], atol=1e-6)
        np.testing.assert_array_equal(mixed, np.broadcast_to(mixed[:, :1, :1], mixed.shape))
        onehot = _smoothed(batch["label"], 5, eps)
        expected = lam[0] * onehot + (1 - lam[0]) * onehot[partner]
        np.testing.assert_allclose(out["label"], expected, atol=1e-5)
        np.testing.assert_allclose(out["label"].sum(axis=1), 1.0, rtol=1e-6)


def test_cutmix_lam_is_the_pasted_area():
    batch, partner = _flat_batch(), np.array([1, 0, 3, 2, 5, 4, 7, 6])
    v = batch["pixel_values"][:, 0, 0, 0]
    seen_boxes = set()
    for seed in range(8):
        out = MixBatch(5, cutmix=1.0, label_smoothing=0.1)(dict(batch), np.random.default_rng(seed))
        pasted = out["pixel_values"][..., 0] == v[partner][:, None, None]
        own = out["pixel_values"][..., 0] == v[:, None, None]
        assert (pasted | own).all()  # pixels are copied, never blended
        area = pasted.mean(axis=(1, 2))
        np.testing.assert_array_equal(area, area[0])  # one box for the batch
        rows, cols = np.nonzero(pasted[0])
        if len(rows):  # the pasted region is a box
            box = pasted[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all() and box.sum() == pasted[0].sum()
            seen_boxes.add((rows.min(), rows.max(), cols.min(), cols.max()))
        lam = 1.0 - area[0]
        onehot = _smoothed(batch["label"], 5, 0.1)
        np.testing.assert_allclose(
            out["label"], lam * onehot + (1 - lam) * onehot[partner], atol=1e-6
        )
        np.testing.assert_allclose(out["label"].sum(axis=1), 1.0, rtol=1e-6)
    assert len(seen_boxes) > 3


def test_both_on_picks_one_per_batch_at_even_odds():
    batch = _flat_batch()
    v = batch["pixel_values"][:, 0, 0, 0]
    modes = []
    for seed in range(40):
        out = MixBatch(5, mixup=0.5, cutmix=1.0)(dict(batch), np.random.default_rng(seed))
        pixels = out["pixel_values"][..., 0]
        copied = np.isin(pixels[0], v).all()
        modes.append("cutmix" if copied else "mixup")
    assert 10 <= modes.count("cutmix") <= 30


def _arrays(n=48, classes=5):
    rng = np.random.default_rng(0)
    return {
        "pixel_values": rng.standard_normal((n, 6, 6, 3)).astype(np.float32),
        "label": (np.arange(n) % classes).astype(np.int32),
    }


def test_mixing_refusals():
    arrays = _arrays()
    text = {"input_ids": np.ones((8, 4), np.int32), "label": np.zeros(8, np.int32)}
    with pytest.raises(ValueError, match="classification only"):
        mixing.for_training(0.2, 0, 0, task="regression", num_classes=1, inputs=arrays)
    with pytest.raises(ValueError, match="label_smoothing=0.1: .* task is 'causal_lm'"):
        mixing.for_training(0, 0, 0.1, task="causal_lm", num_classes=50, inputs=text)
    with pytest.raises(ValueError, match=r"cutmix=1: mixup and cutmix mix images.*\['input_ids'\]"):
        mixing.for_training(0, 1.0, 0, task="classification", num_classes=2, inputs=text)
    smooth = mixing.for_training(0, 0, 0.1, task="classification", num_classes=2, inputs=text)
    assert smooth == MixBatch(2, label_smoothing=0.1)  # label smoothing alone suits text
    assert mixing.for_training(0, 0, 0, task="regression", num_classes=1, inputs=arrays) is None
    for bad in ({"label_smoothing": 1.0}, {"label_smoothing": -0.1}, {"mixup": -1.0}):
        with pytest.raises(
            ValueError,
            match=r"label_smoothing \(--label-smoothing\) must be in|mixup \(--mixup\) is the Beta",
        ):
            jaxtl.TrainConfig(**bad)
    # Pairs (2k, 2k+1) must not straddle processes: an odd share per process is refused.
    with pytest.raises(ValueError, match="even number of rows"):
        GrainLoader(
            ArraySource(arrays),
            6,
            process_index=0,
            process_count=2,
            batch_transform=MixBatch(5, 0.2),
        )
    with pytest.raises(ValueError, match=r"Labels must be in \[0, 3\)"):
        MixBatch(3, label_smoothing=0.1)(dict(_flat_batch()), np.random.default_rng(0))


# --- the soft-label loss -------------------------------------------------------------------------


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_soft_label_loss_and_accuracy_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, 8).astype(np.int32)
    eps = 0.1
    targets = MixBatch(5, label_smoothing=eps)({"label": labels}, rng)["label"]
    # Label smoothing: -sum((1 - eps) onehot + eps / C) * log_softmax), averaged over rows.
    expected = -(((1 - eps) * np.eye(5)[labels] + eps / 5) * _log_softmax(logits)).sum(-1).mean()
    got = losses.mean_loss(jnp.asarray(logits), {"label": jnp.asarray(targets)}, "classification")
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    # A one-hot soft label is the integer label; evaluation's integer labels give plain CE.
    plain = -_log_softmax(logits)[np.arange(8), labels].mean()
    for label in (labels, np.eye(5, dtype=np.float32)[labels]):
        got = losses.mean_loss(jnp.asarray(logits), {"label": jnp.asarray(label)}, "classification")
        np.testing.assert_allclose(float(got), plain, rtol=1e-6)
    # Accuracy counts the argmax of the target (the larger part of a mixed one).
    mixed = 0.3 * np.eye(5)[labels] + 0.7 * np.eye(5)[(labels + 1) % 5]
    sums = losses.metric_sums(jnp.asarray(logits), {"label": jnp.asarray(mixed)}, "classification")
    expected_correct = (logits.argmax(-1) == (labels + 1) % 5).sum()
    assert float(sums["correct"]) == expected_correct and float(sums["count"]) == 8
