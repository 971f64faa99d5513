"""Parity of jaxtl's Flax ResNets against their independent PyTorch references.

Two references, one per source format:

* Hugging Face: transformers' PyTorch ``ResNetForImageClassification``, run live on tiny random
  configs (BatchNorm affine and running statistics randomized so BatchNorm is exercised).
* torchvision: reference outputs of the real torchvision 0.29.1 ``resnet18/34/50`` stored in
  ``tests/fixtures/torchvision/`` (see its README); the weights are rebuilt from the stored
  spec and seed with ``tests/_seeded_weights.py``, so torchvision itself is not needed here.

Inputs are 64x64: at 32x32 the last stage's feature maps are 1x1, where a 3x3 conv only ever
sees its centre tap and padding bugs would go unnoticed.
"""

from __future__ import annotations

import copy
import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from _seeded_weights import seeded_state_dict

import jaxtl
from jaxtl.models.resnet import convert_checkpoint, detect
from jaxtl.transfer.trees import flatten, unflatten
from jaxtl.weights.loading import load

TOL = 1e-4  # float32 end to end; never loosened to make a test pass
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "torchvision")
STAGE4 = "resnet/encoder/stages/3"  # HF's name for torchvision's layer4
HF_HEAD = ["classifier/1/bias", "classifier/1/kernel"]

# Tiny transformers configs: both block types, the first-stage shortcut, and the v1 variant
# (stride in the bottleneck's 1x1 conv, strided first stage, a non-ReLU hidden_act, which
# transformers applies only after the stem and the residual sums).
HF_CONFIGS = {
    "basic": dict(layer_type="basic", hidden_sizes=[8, 16, 16, 32]),
    "bottleneck": dict(layer_type="bottleneck", hidden_sizes=[16, 32, 32, 64]),
    "bottleneck-v1": dict(
        layer_type="bottleneck",
        hidden_sizes=[16, 32, 32, 64],
        downsample_in_bottleneck=True,
        downsample_in_first_stage=True,
        hidden_act="gelu",
    ),
}


def max_diff(ours, theirs) -> float:
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))


def perturbed(tree, seed: int = 1):
    """A tree as if fine-tuned: every leaf moved (scaled, so BatchNorm variances stay
    positive), so a stale or skipped tensor shows up in the outputs."""
    rng = np.random.default_rng(seed)
    flat = flatten(jax.device_get(tree))
    return unflatten(
        {
            p: (np.asarray(v) * rng.uniform(0.8, 1.2, np.shape(v))).astype(np.float32)
            for p, v in flat.items()
        }
    )


def nhwc(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"pixel_values": x.transpose(0, 2, 3, 1)}


def randomize_batch_norm(model: torch.nn.Module, seed: int) -> None:
    """Random BatchNorm affine params and running statistics (fresh ones are 1/0/0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{name: (directory, eval-mode reference)} for each tiny config, saved by transformers."""
    out = {}
    for seed, (name, kwargs) in enumerate(HF_CONFIGS.items()):
        torch.manual_seed(seed)
        config = transformers.ResNetConfig(
            embedding_size=8, depths=[1, 2, 1, 1], num_labels=3, **kwargs
        )
        reference = transformers.ResNetForImageClassification(config)
        randomize_batch_norm(reference, seed)
        directory = tmp_path_factory.mktemp(name)
        reference.eval().save_pretrained(directory)
        out[name] = (str(directory), reference)
    return out


def torchvision_fixture(arch: str, weights: bool = True) -> dict:
    """The fixture's arrays, its state dict's ``shapes`` and (rebuilt) ``state_dict``."""
    with np.load(os.path.join(FIXTURES, f"{arch}.npz")) as z:
        fixture = {k: z[k] for k in z.files}
    spec = json.loads(str(fixture["spec"]))
    fixture["shapes"] = {k: tuple(shape) for k, shape, _ in spec}
    if weights:
        fixture["state_dict"] = seeded_state_dict(spec, int(fixture["seed"]))
    return fixture


@pytest.fixture(scope="module")
def torchvision_files(tmp_path_factory):
    """{arch: (safetensors file, fixture)}: the fixtures' weights as a state-dict file."""
    out = {}
    for arch in ("resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2"):
        fixture = torchvision_fixture(arch)
        path = str(tmp_path_factory.mktemp(arch) / f"{arch}.safetensors")
        safetensors.numpy.save_file(fixture["state_dict"], path)
        out[arch] = (path, fixture)
    return out


# --- Hugging Face: against transformers' PyTorch ResNet ----------------------------------------


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_logits_and_features_match_pytorch(hf_models, pixels, name):
    directory, reference = hf_models[name]
    with torch.no_grad():
        theirs_logits = reference(torch.from_numpy(pixels)).logits
        theirs_features = reference.resnet(torch.from_numpy(pixels)).pooler_output.flatten(1)

    model = load(directory, num_labels=3)
    assert not model.report.initialized and not model.report.unexpected
    assert not model.report.mismatched
    logits = model.apply(model.params, nhwc(pixels), batch_stats=model.batch_stats)
    features_model = load(directory, task="features")
    features = features_model.apply(
        features_model.params, nhwc(pixels), batch_stats=features_model.batch_stats
    )

    assert logits.shape == (2, 3) and features.shape == (2, HF_CONFIGS[name]["hidden_sizes"][-1])
    diffs = max_diff(logits, theirs_logits), max_diff(features, theirs_features)
    print(f"HF ResNet {name}: logits max |diff| = {diffs[0]:.3g}, features {diffs[1]:.3g}")
    assert max(diffs) <= TOL


def test_hf_structure_and_extras(hf_models):
    model = load(hf_models["basic"][0], num_labels=3, image_size=96)
    assert model.structure.stem == ("resnet/embedder",)
    assert model.structure.blocks[-2:] == (
        "resnet/encoder/stages/2/layers/0",
        "resnet/encoder/stages/3/layers/0",
    )
    assert len(model.structure.blocks) == 5 and model.structure.head == ("classifier",)
    assert model.extras["stem_kernel"] == "resnet/embedder/embedder/convolution/kernel"
    assert model.extras["feature_size"] == 32
    assert model.extras["preprocessing"].size == (96, 96)  # torchvision defaults, resized
    assert set(flatten(model.batch_stats)) >= {
        "resnet/embedder/embedder/normalization/mean",
        "resnet/encoder/stages/1/layers/0/shortcut/normalization/var",
    }


def test_random_init_follows_torch_rules(hf_models):
    """pretrained=False: transformers' _init_weights rules, reproducible per seed."""
    model = load(hf_models["bottleneck"][0], num_labels=3, pretrained=False, seed=1)
    params, stats = flatten(model.params), flatten(model.batch_stats)
    assert model.report is None and model.config.arch == "resnet-bottleneck-1-2-1-1"
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): std sqrt(2 / (out * kh * kw)).
    kernel = np.asarray(params["resnet/encoder/stages/1/layers/0/layer/1/convolution/kernel"])
    assert kernel.shape == (3, 3, 8, 8)
    assert abs(kernel.std() / np.sqrt(2 / (8 * 3 * 3)) - 1) < 0.1
    # nn.Linear: U(+-1/sqrt(fan_in)); BatchNorm: scale 1, bias 0, running mean 0, var 1.
    assert np.abs(np.asarray(params["classifier/1/bias"])).max() <= 64**-0.5
    assert all(np.all(np.asarray(v) == 1) for k, v in params.items() if k.endswith("/scale"))
    assert all(np.all(np.asarray(v) == 0) for k, v in stats.items() if k.endswith("/mean"))
    assert all(np.all(np.asarray(v) == 1) for k, v in stats.items() if k.endswith("/var"))
    same = flatten(load(hf_models["bottleneck"][0], num_labels=3, pretrained=False, seed=1).params)
    assert all(np.array_equal(params[k], same[k]) for k in params)


def test_frozen_batch_norm_ignores_train_flag(hf_models, pixels):
    """train=True with no BatchNorm in bn_train: inference-mode BatchNorm, statistics kept."""
    model = load(hf_models["basic"][0], num_labels=3)
    eval_out, eval_stats = model.forward(model.params, model.batch_stats, nhwc(pixels))
    train_out, train_stats = model.forward(
        model.params, model.batch_stats, nhwc(pixels), train=True, rng=jax.random.key(0)
    )
    assert np.array_equal(np.asarray(eval_out), np.asarray(train_out))
    before, after = flatten(model.batch_stats), flatten(train_stats)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_bn_train_updates_only_listed_layers(hf_models, pixels):
    """bn_train=(stage 4,) vs PyTorch with only that stage in train mode.

    Outputs and running means match PyTorch. Running variances differ by design (see the
    jaxtl.models.resnet docstring): PyTorch averages in the unbiased batch variance, Flax the
    biased one, so ours equals PyTorch's update with its batch term scaled by (n - 1) / n.
    """
    directory, reference = hf_models["basic"]
    model = load(directory, num_labels=3)
    outputs, stats = model.forward(
        model.params,
        model.batch_stats,
        nhwc(pixels),
        train=True,
        rng=jax.random.key(0),
        bn_train=(STAGE4,),
    )
    torch_model = copy.deepcopy(reference).eval()
    torch_model.resnet.encoder.stages[3].train()
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(pixels)).logits
    assert max_diff(outputs, theirs) <= TOL

    torch_state = torch_model.state_dict()
    before, after = flatten(model.batch_stats), flatten(stats)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.startswith(STAGE4 + "/") for k in changed)
    assert {k.rsplit("/", 1)[0] for k in changed} == {
        k.rsplit("/", 1)[0] for k in before if k.startswith(STAGE4 + "/")
    }
    worst_mean = worst_var = 0.0
    for key in sorted(changed):
        module, stat = key.rsplit("/", 1)
        old = np.asarray(before[key], np.float64)
        torch_new = torch_state[f"{module.replace('/', '.')}.running_{stat}"].double().numpy()
        if stat == "mean":
            worst_mean = max(worst_mean, max_diff(after[key], torch_new))
            continue
        # Every BatchNorm in the 2x3x64x64 pass through stage 4 sees 2x2 maps: n = 8 per channel.
        n = 2 * 2 * 2
        unbiased = (torch_new - 0.9 * old) / 0.1
        assert max_diff(after[key], torch_new) > 10 * TOL  # the difference is real ...
        worst_var = max(worst_var, max_diff(after[key], 0.9 * old + 0.1 * unbiased * (n - 1) / n))
    print(f"bn_train running mean max |diff| = {worst_mean:.3g}, var (biased) {worst_var:.3g}")
    assert worst_mean <= TOL and worst_var <= TOL  # ... and exactly the unbiasing factor


def test_one_input_channel_sums_the_rgb_stem(hf_models, pixels):
    directory, reference = hf_models["bottleneck"]
    gray = pixels[:, :1]
    model = load(directory, num_labels=3, in_channels=1)
    assert model.extras["preprocessing"].channels == 1
    ours = model.apply(model.params, nhwc(gray), batch_stats=model.batch_stats)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(np.repeat(gray, 3, axis=1))).logits
    diff = max_diff(ours, theirs)
    print(f"in_channels=1 gray vs RGB (g, g, g) logits max |diff| = {diff:.3g}")
    assert diff <= TOL


def test_hf_export_loads_in_transformers(hf_models, pixels, tmp_path):
    """A new 5-class head and moved weights and statistics (as if fine-tuned), exported and
    read back by transformers: no stray keys, the same logits."""
    model = load(hf_models["bottleneck"][0], num_labels=5, seed=3)
    assert sorted(m.path for m in model.report.mismatched) == HF_HEAD
    params, stats = perturbed(model.params), perturbed(model.batch_stats)
    jaxtl.export(model, tmp_path, params, stats)

    exported, info = transformers.ResNetForImageClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert exported.config.num_labels == 5
    with torch.no_grad():
        theirs = exported.eval()(torch.from_numpy(pixels)).logits
    ours = model.apply(params, nhwc(pixels), batch_stats=stats)
    diff = max_diff(ours, theirs)
    print(f"HF export -> transformers logits max |diff| = {diff:.3g}")
    assert diff <= TOL


# --- torchvision: against real torchvision outputs stored as fixtures --------------------------


@pytest.mark.parametrize(
    "arch", ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2"]
)
def test_torchvision_logits_and_features_match_fixture(torchvision_files, arch):
    path, fixture = torchvision_files[arch]
    model = load(path, num_labels=10)
    assert model.config.arch == arch and model.family == "resnet"
    assert not model.report.initialized and not model.report.unexpected
    logits = model.apply(model.params, nhwc(fixture["input"]), batch_stats=model.batch_stats)
    features_model = load(path, task="features")
    features = features_model.apply(
        features_model.params, nhwc(fixture["input"]), batch_stats=features_model.batch_stats
    )
    diffs = max_diff(logits, fixture["logits"]), max_diff(features, fixture["features"])
    print(f"torchvision {arch}: logits max |diff| = {diffs[0]:.3g}, features {diffs[1]:.3g}")
    assert max(diffs) <= TOL


def test_resnext_grouped_kernel_gradients_match_torchvision(torchvision_files):
    """ResNeXt's grouped 3x3 kernels get their gradient from jaxtl's own computation on CPU
    (jaxtl.models.conv); the fixture holds torchvision's for two of them, of a loss on the
    logits in eval mode."""
    path, fixture = torchvision_files["resnext50_32x4d"]
    model = load(path, num_labels=10)
    assert model.config.groups == 32
    x, w = nhwc(fixture["input"]), fixture["grad_weights"]
    loss = lambda p: jax.numpy.sum(model.apply(p, x, batch_stats=model.batch_stats) * w)  # noqa: E731
    ours = flatten(jax.grad(loss)(model.params))
    for name in ("layer1.0.conv2.weight", "layer2.0.conv2.weight"):
        theirs = fixture[f"grad__{name}"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
        mine = np.asarray(ours[name.replace(".", "/").replace("/weight", "/kernel")])
        scale = max(1.0, float(np.max(np.abs(theirs))))
        diff = float(np.max(np.abs(mine - theirs)))
        print(f"{name}: gradient max |diff| {diff:.3g} (values up to {scale:.3g})")
        assert diff <= TOL * scale


def test_torchvision_pth_file(torchvision_files, tmp_path):
    _, fixture = torchvision_files["resnet18"]
    path = tmp_path / "resnet18.pth"
    torch.save({k: torch.from_numpy(v) for k, v in fixture["state_dict"].items()}, path)
    model = load(path, num_labels=10)
    logits = model.apply(model.params, nhwc(fixture["input"]), batch_stats=model.batch_stats)
    assert max_diff(logits, fixture["logits"]) <= TOL


def test_torchvision_new_head_report_and_structure(torchvision_files):
    path, fixture = torchvision_files["resnet18"]
    model = load(path, num_labels=5)
    report = model.report
    # The 10-class head mismatches and keeps its fresh init. LoadReport lists such params under
    # `mismatched` (merge_checkpoint does not repeat them in `initialized`): together, exactly fc.
    assert {m.path: (m.ckpt_shape, m.model_shape) for m in report.mismatched} == {
        "fc/bias": ((10,), (5,)),
        "fc/kernel": ((512, 10), (512, 5)),
    }
    fresh = set(report.initialized) | {m.path for m in report.mismatched}
    assert sorted(fresh) == ["fc/bias", "fc/kernel"]
    assert not report.unexpected  # num_batches_tracked is dropped, not unexpected
    params = [p for p in flatten(model.params) if not p.startswith("fc/")]
    stats = ["batch_stats/" + p for p in flatten(model.batch_stats)]
    assert sorted(report.loaded) == sorted(params + stats)
    assert len(stats) == 2 * sum(k.endswith("running_mean") for k in fixture["state_dict"])
    # torch.nn.Linear's default init: U(+-1/sqrt(fan_in)), drawn per path from the seed.
    kernel = np.asarray(model.params["fc"]["kernel"])
    assert kernel.shape == (512, 5) and np.abs(kernel).max() <= 512**-0.5
    again = load(path, num_labels=5)
    assert np.array_equal(kernel, np.asarray(again.params["fc"]["kernel"]))

    assert model.structure.stem == ("conv1", "bn1") and model.structure.head == ("fc",)
    assert model.structure.blocks == tuple(f"layer{s}/{i}" for s in range(1, 5) for i in (0, 1))
    assert model.extras["stem_kernel"] == "conv1/kernel" and model.extras["feature_size"] == 512
    assert model.extras["preprocessing"].size == (224, 224)


def test_torchvision_export_round_trip(torchvision_files):
    """load -> export gives back the original state dict: names (in torchvision's order),
    shapes, dtypes and values, num_batches_tracked included."""
    path, fixture = torchvision_files["resnet50"]
    original = fixture["state_dict"]
    model = load(path, num_labels=10)
    state_dict, config = model.export_fn(model.params, model.batch_stats)
    assert config is None and list(state_dict) == list(original)
    for name, value in original.items():
        ours = state_dict[name]
        assert ours.dtype == value.dtype and np.array_equal(ours, value), name


def test_jaxtl_export_keeps_scalar_tensors_scalar(torchvision_files, tmp_path):
    model = load(torchvision_files["resnet18"][0], num_labels=10)
    written = safetensors.numpy.load_file(jaxtl.export(model, tmp_path / "resnet18.safetensors"))
    assert written["bn1.num_batches_tracked"].shape == ()


def test_detect_recognises_torchvision_resnets_only():
    r18, r50 = (torchvision_fixture(a, weights=False)["shapes"] for a in ("resnet18", "resnet50"))
    assert detect(r18) == {
        "format": "torchvision",
        "arch": "resnet18",
        "block": "basic",
        "layers": [2, 2, 2, 2],
        "widths": [64, 128, 256, 512],
        "inner_widths": [64, 128, 256, 512],
        "groups": 1,
        "stem_width": 64,
        "in_channels": 3,
        "num_classes_in_checkpoint": 10,
    }
    assert detect(r50)["arch"] == "resnet50" and detect(r50)["layers"] == [3, 4, 6, 3]
    assert detect(r50)["widths"] == [256, 512, 1024, 2048]
    bert = {
        "bert.embeddings.word_embeddings.weight": (99, 32),
        "bert.encoder.layer.0.attention.self.query.weight": (32, 32),
        "classifier.weight": (2, 32),
    }
    assert detect(bert) is None
    for other in ("vgg16", "alexnet", "inception_v3"):
        assert detect(torchvision_fixture(other, weights=False)["shapes"]) is None


def test_convert_layouts():
    out = convert_checkpoint(
        {
            "conv1.weight": np.arange(2 * 3 * 7 * 7, dtype=np.float32).reshape(2, 3, 7, 7),
            "fc.weight": np.zeros((10, 2), np.float32),
            "bn1.running_var": np.ones(2, np.float32),
            "bn1.num_batches_tracked": np.zeros((), np.int64),
            "extra.thing": np.zeros(1, np.float32),
        },
        source="torchvision",
        stem_kernel="conv1/kernel",
        in_channels=1,
    )
    assert sorted(out) == ["batch_stats/bn1/var", "conv1/kernel", "extra.thing", "fc/kernel"]
    assert out["fc/kernel"].shape == (2, 10)
    # OIHW -> HWIO, then the three RGB kernels summed for one input channel.
    kernel = np.arange(2 * 3 * 7 * 7, dtype=np.float32).reshape(2, 3, 7, 7)
    assert np.array_equal(out["conv1/kernel"], kernel.sum(1, keepdims=True).transpose(2, 3, 1, 0))


def test_hf_export_writes_a_convnext_processor_for_the_adapted_size(hf_models, tmp_path):
    """A checkpoint without a processor config gets torchvision's recipe (resize 256, crop 224),
    scaled by ``image_size=160``; the export describes that recipe in transformers' ConvNext
    (crop_pct) form, and transformers' processor reproduces jaxtl's pixels from it."""
    model = load(hf_models["bottleneck"][0], num_labels=3, image_size=160)
    ours = model.extras["preprocessing"]
    assert (ours.size, ours.resize) == ((160, 160), 183)
    jaxtl.export(model, tmp_path)

    processor = transformers.ConvNextImageProcessorPil.from_pretrained(tmp_path)
    image = np.random.default_rng(9).integers(0, 256, size=(200, 260, 3), dtype=np.uint8)
    theirs = processor(images=[image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert theirs.shape == (1, 160, 160, 3)
    diff = max_diff(ours(image[None]), theirs)
    print(f"exported ResNet preprocessor config vs jaxtl's recipe max |diff| = {diff:.3g}")
    assert diff <= TOL
    reloaded = load(tmp_path, num_labels=3).extras["preprocessing"]
    assert (reloaded.size, reloaded.resize, reloaded.mean) == (ours.size, ours.resize, ours.mean)
