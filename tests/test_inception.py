"""Parity of jaxtl's Flax Inception-v3 against real torchvision 0.29.1 (the independent reference).

The reference outputs come from ``tests/fixtures/torchvision/inception_v3.npz``: torchvision's
``inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True,
num_classes=10)`` in eval mode, filled with ``seeded_state_dict(spec, seed)`` (see the fixtures'
README). The tests rebuild the same state dict, save it as a torchvision-style safetensors file and
load it through :func:`jaxtl.load`, which must recognise it by its names alone. At 139x139 every
Mixed block sees a map larger than 1x1 (3x3 at Mixed_7b/7c), so a wrong padding or pool shows.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from _seeded_weights import seeded_state_dict

import jaxtl
from jaxtl.models import inception
from jaxtl.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from jaxtl.transfer.trees import flatten
from jaxtl.weights.state_dict import read_state_dict

FIXTURE = "tests/fixtures/torchvision/inception_v3.npz"
TOL = 1e-4  # float32 end to end; never loosened to make a test pass
AUX = "AuxLogits."


def max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))


@pytest.fixture(scope="module")
def reference(request):
    """The fixture's arrays and its regenerated state dict (torchvision names and order)."""
    with np.load(request.config.rootpath / FIXTURE) as z:
        ref = {k: z[k] for k in z.files}
    spec = json.loads(str(ref["spec"]))
    ref["state_dict"] = seeded_state_dict(spec, int(ref["seed"]))
    ref["meta"] = json.loads(str(ref["meta"]))
    ref["pixels"] = np.ascontiguousarray(ref["input"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    return ref


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("inception") / "inception_v3.safetensors"
    safetensors.numpy.save_file(reference["state_dict"], str(path))
    return str(path)


@pytest.fixture(scope="module")
def classifier(checkpoint):
    return jaxtl.load(checkpoint, num_labels=10)


def test_fixture_is_the_configuration_tested(reference):
    kwargs = reference["meta"]["kwargs"]
    assert reference["meta"]["torchvision"].startswith("0.29.1")
    assert kwargs["transform_input"] is True and kwargs["aux_logits"] is True
    assert kwargs["num_classes"] == 10 and reference["pixels"].shape == (2, 139, 139, 3)


def test_logits_match_torchvision(classifier, reference):
    assert classifier.family == "inception"
    assert classifier.extras["transform_input"] is True
    logits = classifier.apply(
        classifier.params, {"pixel_values": reference["pixels"]}, batch_stats=classifier.batch_stats
    )
    assert logits.shape == (2, 10)
    assert max_diff(logits, reference["logits"]) <= TOL


def test_features_match_torchvision(checkpoint, reference):
    model = jaxtl.load(checkpoint, task="features")
    assert model.structure.head == () and "fc" not in model.params
    features = model.apply(
        model.params, {"pixel_values": reference["pixels"]}, batch_stats=model.batch_stats
    )
    assert features.shape == (2, inception.FEATURES) == (2, model.extras["feature_size"])
    assert max_diff(features, reference["features"]) <= TOL


def test_new_head_report(checkpoint, reference, classifier):
    model = jaxtl.load(checkpoint, num_labels=5)
    report = model.report
    # The 10-class fc does not fit 5 labels: the head is re-initialized, the rest loaded.
    mismatched = {m.path: (m.ckpt_shape, m.model_shape) for m in report.mismatched}
    assert mismatched == {"fc/bias": ((10,), (5,)), "fc/kernel": ((2048, 10), (2048, 5))}
    assert sorted({*report.initialized, *mismatched}) == ["fc/bias", "fc/kernel"]
    params = [p for p in flatten(model.params) if not p.startswith("fc/")]
    stats = ["batch_stats/" + p for p in flatten(model.batch_stats)]
    assert sorted(report.loaded) == sorted(params + stats)
    source = reference["state_dict"]
    ours = [k for k in source if not k.startswith((AUX, "fc.")) and "num_batches" not in k]
    assert len(report.loaded) == len(ours) == 470
    # The auxiliary classifier is not part of the model: all of it is reported unused.
    assert sorted(report.unexpected) == sorted(k for k in source if k.startswith(AUX))
    # The loaded values are the checkpoint's, in Flax layout.
    kernel = source["Mixed_6b.branch7x7_2.conv.weight"]  # a 1x7 conv, OIHW
    loaded = model.params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    np.testing.assert_array_equal(loaded, kernel.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        model.batch_stats["Mixed_7c"]["branch_pool"]["bn"]["var"],
        source["Mixed_7c.branch_pool.bn.running_var"],
    )
    # The new head follows torchvision's init_weights (trunc_normal std 0.1) and is seeded.
    fc = model.params["fc"]["kernel"]
    assert fc.shape == (2048, 5) and 0.09 < float(jnp.std(fc)) < 0.11
    assert float(jnp.max(jnp.abs(model.params["fc"]["bias"]))) <= 1 / np.sqrt(2048)


def test_structure_and_tree_mirror_torchvision(classifier):
    s = classifier.structure
    assert s.stem == inception.STEM and s.head == ("fc",)
    assert s.blocks == tuple(f"Mixed_{b}" for b in ("5b 5c 5d 6a 6b 6c 6d 6e 7a 7b 7c".split()))
    assert set(classifier.params) == {*s.stem, *s.blocks, "fc"}
    assert set(classifier.params["Conv2d_1a_3x3"]) == {"conv", "bn"}
    assert classifier.extras["stem_kernel"] == "Conv2d_1a_3x3/conv/kernel"
    preprocessing = classifier.extras["preprocessing"]
    assert (preprocessing.size, preprocessing.resize) == ((299, 299), 342)
    assert preprocessing.interpolation == "bilinear"
    assert (preprocessing.mean, preprocessing.std) == (IMAGENET_MEAN, IMAGENET_STD)


def without_aux(state_dict):
    return {k: v for k, v in state_dict.items() if not k.startswith(AUX)}


def test_export_is_the_state_dict_without_aux_logits(classifier, reference):
    state, config = classifier.export_fn(classifier.params, classifier.batch_stats)
    expected = without_aux(reference["state_dict"])
    assert config is None
    assert list(state) == list(expected)  # torchvision's state_dict() order
    for name, value in expected.items():
        got = state[name]
        assert got.shape == value.shape and got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)


def test_exported_file_is_the_state_dict_without_aux_logits(classifier, reference, tmp_path):
    written = jaxtl.export(classifier, tmp_path / "exported.safetensors")
    exported = read_state_dict(written)
    expected = without_aux(reference["state_dict"])
    assert set(exported) == set(expected)
    for name, value in expected.items():
        assert exported[name].shape == value.shape, name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_gray_model_matches_rgb_model_on_gray_images(checkpoint, classifier):
    """in_channels=1 sums the stem kernels and averages the transform: on a gray image, each
    model fed its own preprocessing's output gives the same logits."""
    gray = jaxtl.load(checkpoint, num_labels=10, in_channels=1)
    gray_prep = gray.extras["preprocessing"].with_size(139)
    rgb_prep = classifier.extras["preprocessing"].with_size(139)
    assert gray_prep.mean == (float(np.mean(IMAGENET_MEAN)),)
    # 159 = the resize for a 139 crop, so only the center crop changes the images.
    images = np.random.default_rng(0).integers(0, 256, (2, 159, 159), dtype=np.uint8)
    gray_pixels = gray_prep(images[..., None])
    rgb_pixels = rgb_prep(np.repeat(images[..., None], 3, axis=-1))
    assert gray_pixels.shape == (2, 139, 139, 1) and rgb_pixels.shape == (2, 139, 139, 3)
    ours = gray.apply(gray.params, {"pixel_values": gray_pixels}, batch_stats=gray.batch_stats)
    rgb = classifier.apply(
        classifier.params, {"pixel_values": rgb_pixels}, batch_stats=classifier.batch_stats
    )
    assert max_diff(ours, rgb) <= TOL


@pytest.mark.slow  # ~35 s on 2 cores: the backward pass compiles once
def test_every_param_gets_a_gradient(classifier, reference):
    """No param sits unused in the tree (the reason AuxLogits is dropped, not kept idle)."""
    # The smallest size Inception-v3 takes. Two images: with one, Mixed_7c's batch statistics
    # (over a 1x1 map) would be the value itself, and BatchNorm would pass no gradient back.
    pixels = reference["pixels"][:, :75, :75]

    def loss(params):
        logits, _ = classifier.forward(
            params,
            classifier.batch_stats,
            {"pixel_values": pixels},
            train=True,
            rng=jax.random.key(0),
            bn_train=("Mixed_7c",),
        )
        return jnp.sum(logits**2)

    grads = flatten(jax.grad(loss)(classifier.params))
    zero = [p for p, g in grads.items() if not np.any(np.asarray(g))]
    assert not zero


def test_detect(reference):
    shapes = {k: v.shape for k, v in reference["state_dict"].items()}
    assert inception.detect(shapes) == {
        "format": "torchvision",
        "arch": "inception_v3",
        "in_channels": 3,
        "num_classes_in_checkpoint": 10,
        "aux_logits": True,
        "transform_input": True,
    }
    resnet = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.weight": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "fc.weight": (10, 512),
    }
    assert inception.detect(resnet) is None
    stem_only = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3)}  # not a whole Inception3
    assert inception.detect(stem_only) is None


def test_bad_inputs_fail_with_a_fix(checkpoint, classifier):
    raw = {"format": "torchvision", "arch": "inception_v3", "transform_input": True}
    with pytest.raises(ValueError, match="in_channels=4"):
        inception.build("", raw, task="classification", num_labels=2, in_channels=4)
    with pytest.raises(ValueError, match="at least 75x75"):
        inception.build("", raw, task="classification", num_labels=2, image_size=64)
    small = np.zeros((1, 64, 64, 3), np.float32)
    with pytest.raises(ValueError, match="at least 75x75"):
        classifier.apply(classifier.params, {"pixel_values": small}, batch_stats={})
    nchw = np.zeros((1, 3, 80, 80), np.float32)
    with pytest.raises(ValueError, match="NCHW"):
        classifier.apply(classifier.params, {"pixel_values": nchw}, batch_stats={})
