"""Parity of jaxtl's Flax ConvNeXt against transformers' PyTorch ConvNeXt (the independent
reference).

Every numeric check compares with ``transformers.ConvNextModel`` /
``ConvNextForImageClassification`` in eval mode (or, for preprocessing,
``transformers.ConvNextImageProcessorPil``). One tiny random checkpoint is saved once per module;
its inputs are 32x48, so a height/width swap anywhere (kernel layouts, pooling) shows.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from _tiny import fit
from _tiny import perturbed as as_if_tuned

import jaxtl
from jaxtl import feature_cache, sharding
from jaxtl.models import convnext
from jaxtl.models.common import recompute
from jaxtl.run import with_adapters
from jaxtl.train.losses import mean_loss
from jaxtl.transfer.lora import LORA_A
from jaxtl.transfer.trees import flatten, unflatten
from jaxtl.weights.loading import load

TOL = 1e-5  # float32 end to end, as for ViT; never loosened to make a test pass
NUM_LABELS = 3
SIZE = (32, 48)
HEAD = ["classifier/bias", "classifier/kernel"]
LAYERS = [
    "convnext/encoder/stages/0/layers/0",
    "convnext/encoder/stages/0/layers/1",
    "convnext/encoder/stages/1/layers/0",
    "convnext/encoder/stages/2/layers/0",
    "convnext/encoder/stages/2/layers/1",
]


def tiny_convnext_config(**overrides) -> transformers.ConvNextConfig:
    """Three stages (two downsamplings), two blocks in the first and the last: 5 blocks."""
    kwargs = dict(
        patch_size=4,
        hidden_sizes=[8, 16, 24],
        depths=[2, 1, 2],
        num_stages=3,
        image_size=32,
        num_labels=NUM_LABELS,
    )
    kwargs.update(overrides)
    return transformers.ConvNextConfig(**kwargs)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Adds N(0, 0.1) to every param. transformers' init leaves biases at 0, LayerNorms at 1/0
    and ``layer_scale_parameter`` at 1e-6, where a block's whole branch, a swapped or a dropped
    bias would go unnoticed; after this every tensor is distinct and every block counts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def saved(path, model_class: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(tiny_convnext_config(**overrides))
    model = perturbed(model, seed)
    model.save_pretrained(path)
    return model


def images(seed: int, size=SIZE, channels: int = 3, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *size, channels)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def max_diff(ours, theirs) -> float:
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    return float(np.max(np.abs(np.asarray(ours) - theirs)))


def features(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.apply(model.params, {"pixel_values": x}))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny ConvNextForImageClassification saved with save_pretrained (safetensors)."""
    directory = tmp_path_factory.mktemp("convnext-classifier")
    return saved(directory, "ConvNextForImageClassification"), directory


@pytest.fixture(scope="module")
def classifier(reference):
    return load(reference[1], num_labels=NUM_LABELS)


def test_random_convnext_hidden_states_features_and_logits_match_pytorch(reference, classifier):
    torch_model, directory = reference
    model = classifier
    assert model.family == "convnext"
    assert not model.report.initialized and not model.report.unexpected
    assert not model.report.mismatched
    s = model.structure
    assert s.stem == ("convnext/embeddings",) and s.neck == ("convnext/layernorm",)
    assert s.head == ("classifier",)
    down = [f"convnext/encoder/stages/{i}/downsampling_layer" for i in (1, 2)]
    assert s.blocks == (*LAYERS[:2], down[0], LAYERS[2], down[1], *LAYERS[3:])
    base = model.params["convnext"]
    assert base["embeddings"]["patch_embeddings"]["kernel"].shape == (4, 4, 3, 8)  # HWIO
    stage = base["encoder"]["stages"]["2"]
    assert stage["layers"]["1"]["dwconv"]["kernel"].shape == (7, 7, 1, 24)  # depthwise
    assert stage["downsampling_layer"]["1"]["kernel"].shape == (2, 2, 16, 24)
    x = images(0)

    with torch.no_grad():
        theirs = torch_model.convnext(nchw(x))
        theirs_logits = torch_model(nchw(x)).logits
    hidden, pooled = convnext.ConvNextModel(model.config).apply({"params": base}, x)
    logits = model.apply(model.params, {"pixel_values": x})
    feature_model = load(directory, task="features")
    assert sorted(feature_model.report.unexpected) == HEAD  # the checkpoint's head, unread
    assert feature_model.structure.head == ()

    assert hidden.shape == (2, 2, 3, 24) and pooled.shape == (2, 24)
    diffs = {
        "last hidden state": max_diff(hidden, theirs.last_hidden_state.permute(0, 2, 3, 1)),
        "pooled output": max_diff(pooled, theirs.pooler_output),
        "features task": max_diff(features(feature_model, x), theirs.pooler_output),
        "logits": max_diff(logits, theirs_logits),
    }
    print(f"random ConvNeXt max |diff|: {diffs}")
    assert logits.shape == (2, NUM_LABELS) and max(diffs.values()) <= TOL


def test_regression_checkpoint_of_another_layout_matches_pytorch(tmp_path):
    """A regression head on another layout: patch 2, two stages, SiLU, no layer scale (so no
    ``layer_scale_parameter``), the final LayerNorm at 1e-6."""
    overrides = dict(
        patch_size=2,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_stages=2,
        hidden_act="silu",
        layer_scale_init_value=0.0,
        layer_norm_eps=1e-6,
        num_labels=1,
        problem_type="regression",
    )
    torch_model = saved(tmp_path, "ConvNextForImageClassification", seed=1, **overrides)
    model = load(tmp_path, task="regression", num_labels=1)
    report = model.report
    assert not report.initialized and not report.unexpected and not report.mismatched
    assert not any(p.endswith(convnext.LAYER_SCALE) for p in flatten(model.params))
    x = images(1)
    with torch.no_grad():
        theirs = torch_model(nchw(x)).logits
    diff = max_diff(model.apply(model.params, {"pixel_values": x}), theirs)
    print(f"random ConvNeXt regression (patch 2, SiLU, no layer scale) max |diff| = {diff:.3g}")
    assert theirs.shape == (2, 1) and diff <= TOL


def test_convnext_model_checkpoint_loads_without_prefix_into_a_new_head(tmp_path):
    """A ConvNextModel checkpoint (no ``convnext.`` prefix) under a 5-class head: exactly the
    head is new, as transformers reports it; its features are the reference's pooled output."""
    torch_model = saved(tmp_path, "ConvNextModel", seed=2)
    names = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    assert not any(n.startswith("convnext.") for n in names)

    model = load(tmp_path, num_labels=5)
    assert sorted(model.report.initialized) == HEAD
    assert not model.report.unexpected and not model.report.mismatched
    assert model.params["classifier"]["kernel"].shape == (24, 5)
    _, info = transformers.ConvNextForImageClassification.from_pretrained(
        tmp_path, num_labels=5, output_loading_info=True
    )
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]

    x = images(2)
    with torch.no_grad():
        theirs = torch_model(nchw(x)).pooler_output
    diff = max_diff(features(load(tmp_path, task="features"), x), theirs)
    print(f"ConvNextModel (no prefix) pooled output max |diff| = {diff:.3g}")
    assert diff <= TOL


def test_converter_reads_both_prefixes_and_refuses_a_name_given_twice():
    rng = np.random.default_rng(0)
    depthwise = rng.standard_normal((8, 1, 7, 7)).astype(np.float32)
    linear = rng.standard_normal((32, 8)).astype(np.float32)
    layer = "encoder.stages.0.layers.1"
    bare = {
        f"{layer}.dwconv.weight": depthwise,
        f"{layer}.pwconv1.weight": linear,
        f"{layer}.layernorm.weight": linear[0],
        f"{layer}.layer_scale_parameter": linear[1, :8],
        "layernorm.bias": linear[2],
    }
    prefixed = {f"convnext.{k}": v for k, v in bare.items()}
    path = "convnext/encoder/stages/0/layers/1"
    for tensors in (bare, prefixed):
        out = convnext.convert_hf_checkpoint(tensors)
        # torch's depthwise [C, 1, kh, kw] -> Flax's feature_group_count layout [kh, kw, 1, C].
        np.testing.assert_array_equal(out[f"{path}/dwconv/kernel"], depthwise.transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(out[f"{path}/pwconv1/kernel"], linear.T)
        np.testing.assert_array_equal(out[f"{path}/layernorm/scale"], linear[0])
        np.testing.assert_array_equal(out[f"{path}/layer_scale_parameter"], linear[1, :8])
        assert set(out) == {
            f"{path}/dwconv/kernel",
            f"{path}/pwconv1/kernel",
            f"{path}/layernorm/scale",
            f"{path}/layer_scale_parameter",
            "convnext/layernorm/bias",
        }
    # A head, and a ConvNextBackbone's extra norms (no jaxtl param: reported unexpected).
    head = convnext.convert_hf_checkpoint(
        {"classifier.weight": linear, "hidden_states_norms.stage1.weight": linear[0]}
    )
    assert set(head) == {"classifier/kernel", "hidden_states_norms.stage1.weight"}
    with pytest.raises(ValueError, match="twice"):
        convnext.convert_hf_checkpoint({**bare, **prefixed})


def test_export_round_trip_loads_in_transformers(classifier, tmp_path):
    model = classifier
    # Move every param (as fine-tuning would), so the export cannot pass by echoing the file.
    params = as_if_tuned(model.params)
    jaxtl.export(model, tmp_path, params)

    reloaded, info = transformers.ConvNextForImageClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert reloaded.config.architectures == ["ConvNextForImageClassification"]
    assert reloaded.config.num_labels == NUM_LABELS
    x = images(4)
    with torch.no_grad():
        theirs = reloaded.eval()(nchw(x)).logits
    diff = max_diff(model.apply(params, {"pixel_values": x}), theirs)
    print(f"exported ConvNeXt logits max |diff| after transformers reload = {diff:.3g}")
    assert diff <= TOL

    again = load(tmp_path, num_labels=NUM_LABELS)
    assert not again.report.initialized and not again.report.unexpected
    for path, value in flatten(again.params).items():
        np.testing.assert_array_equal(np.asarray(value), flatten(params)[path])


def test_features_export_of_resized_gray_model_loads_as_convnext_model(reference, tmp_path):
    """in_channels=1 sums the RGB patch kernels, so a gray image gives the features the RGB
    image (g, g, g) gave; image_size and in_channels travel into the exported config.json."""
    torch_model, directory = reference
    model = load(directory, task="features", image_size=64, in_channels=1)
    assert model.params["convnext"]["embeddings"]["patch_embeddings"]["kernel"].shape == (
        4,
        4,
        1,
        8,
    )
    assert model.extras["preprocessing"].channels == 1 and model.extras["image_size"] == (64, 64)
    gray = images(5, channels=1)
    with torch.no_grad():
        rgb = torch_model.convnext(nchw(np.repeat(gray, 3, axis=-1))).pooler_output
    diff = max_diff(features(model, gray), rgb)
    print(f"ConvNeXt in_channels=1 on g vs RGB (g, g, g) pooled output max |diff| = {diff:.3g}")
    assert diff <= TOL

    jaxtl.export(model, tmp_path)
    reloaded, info = transformers.ConvNextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert reloaded.config.image_size == 64 and reloaded.config.num_channels == 1
    with torch.no_grad():
        theirs = reloaded.eval()(nchw(gray)).pooler_output
    assert max_diff(features(model, gray), theirs) <= TOL


def test_preprocessing_defaults_and_export_match_convnext_image_processor(reference, tmp_path):
    """Without a preprocessor_config.json: facebook/convnext's recipe (short side to size /
    0.875, center crop, bicubic, ImageNet mean/std), as ``ConvNextImageProcessorPil`` computes
    it; after ``image_size=48`` the export describes the scaled recipe in that processor's
    (crop_pct) form, and transformers reproduces jaxtl's pixels from it."""
    _, directory = reference
    assert convnext.default_preprocessing(convnext.ConvNextConfig()).to_dict() | {"source": ""} == {
        "size": (224, 224),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "resize": 256,
        "rescale": 1 / 255,
        "interpolation": "bicubic",
        "source": "",
    }
    recipe = load(directory, num_labels=NUM_LABELS).extras["preprocessing"]
    assert (recipe.size, recipe.resize, recipe.interpolation) == ((32, 32), 36, "bicubic")
    processor = transformers.ConvNextImageProcessorPil(
        size={"shortest_edge": 32},
        crop_pct=0.875,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    theirs = processor(images=[image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    diff = max_diff(recipe(image[None]), theirs)
    print(f"ConvNeXt default preprocessing max |diff| = {diff:.3g}")
    assert theirs.shape == (1, 32, 32, 3) and diff <= TOL

    model = load(directory, num_labels=NUM_LABELS, image_size=48)
    ours = model.extras["preprocessing"]
    assert (ours.size, ours.resize) == ((48, 48), 54)
    jaxtl.export(model, tmp_path)
    exported = transformers.ConvNextImageProcessorPil.from_pretrained(tmp_path)
    big = rng.integers(0, 256, size=(60, 75, 3), dtype=np.uint8)
    theirs = exported(images=[big], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    diff = max_diff(ours(big[None]), theirs)
    print(f"exported ConvNeXt preprocessor config vs jaxtl's 48x48 recipe max |diff| = {diff:.3g}")
    assert theirs.shape == (1, 48, 48, 3) and diff <= TOL


def test_gradients_match_pytorch_with_and_without_remat(reference, classifier):
    """Every param's gradient of a loss on the logits equals transformers' (eval mode). On CPU
    the pointwise layers run jaxtl's own Dense backward pass, and under ``remat="full"`` every
    block is recomputed; both are checked against the independent implementation."""
    torch_model, _ = reference
    x = images(7)
    weights = np.random.default_rng(7).standard_normal((2, NUM_LABELS)).astype(np.float32)
    torch_model.zero_grad()
    (torch_model(nchw(x)).logits * torch.from_numpy(weights)).sum().backward()
    theirs = convnext.convert_hf_checkpoint(
        {n: p.grad.numpy() for n, p in torch_model.named_parameters()}
    )
    torch_model.zero_grad()

    for model in (classifier, recompute(classifier, remat="full")):
        loss = lambda p, m=model: jnp.sum(m.apply(p, {"pixel_values": x}) * weights)  # noqa: E731
        ours = flatten(jax.grad(loss)(model.params))
        assert set(ours) == set(theirs)
        for path, value in ours.items():
            scale = max(1.0, float(np.max(np.abs(theirs[path]))))
            diff = float(np.max(np.abs(np.asarray(value) - theirs[path])))
            assert diff <= TOL * scale, (
                f"{path}: max |diff| {diff:.3g} (gradient up to {scale:.3g})"
            )


def test_drop_path_is_inference_identity_and_drops_whole_examples_in_training(tmp_path):
    """drop_path_rate=0.5 over two blocks: rates 0 and 0.5 (transformers' linspace). At
    inference the model is transformers' eval model; in training each example either skips the
    second block's branch or keeps it scaled by 1 / 0.5, whole: every row is one of the two."""
    overrides = dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, drop_path_rate=0.5)
    torch_model = saved(tmp_path, "ConvNextModel", seed=3, **overrides)
    model = load(tmp_path, task="features")
    assert model.config.drop_path_rates == (0.0, 0.5)
    x = np.repeat(images(8, batch=1), 8, axis=0)  # 8 copies of one image
    with torch.no_grad():
        theirs = torch_model(nchw(x)).pooler_output
    assert max_diff(features(model, x), theirs) <= TOL

    scale = "convnext/encoder/stages/1/layers/0/layer_scale_parameter"

    def with_scale(factor: float) -> np.ndarray:
        flat = flatten(model.params)
        params = unflatten({**flat, scale: flat[scale] * factor})
        return np.asarray(model.apply(params, {"pixel_values": x}))

    dropped, kept = with_scale(0.0)[0], with_scale(2.0)[0]
    assert np.max(np.abs(dropped - kept)) > 0.1
    batch = {"pixel_values": x}
    out = np.asarray(model.forward(model.params, {}, batch, train=True, rng=jax.random.key(0))[0])
    is_dropped = np.max(np.abs(out - dropped), axis=1) <= TOL
    is_kept = np.max(np.abs(out - kept), axis=1) <= TOL
    print(
        f"drop path in training: rows dropped {is_dropped.astype(int)}, kept {is_kept.astype(int)}"
    )
    assert np.all(is_dropped ^ is_kept) and is_dropped.any() and is_kept.any()


def test_dropping_the_top_block_matches_transformers_with_fewer_layers(reference):
    torch_model, directory = reference
    model = load(directory, task="features", drop_blocks=1)
    assert model.structure.blocks[-1] == LAYERS[3]
    assert any(p.startswith(f"{LAYERS[4]}/") for p in model.report.unexpected)
    shorter = transformers.ConvNextModel.from_pretrained(directory, depths=[2, 1, 1]).eval()
    x = images(9)
    with torch.no_grad():
        theirs = shorter(nchw(x)).pooler_output
    assert max_diff(features(model, x), theirs) <= TOL


def test_random_init_follows_transformers_rule(reference):
    _, directory = reference
    model = load(directory, num_labels=NUM_LABELS, pretrained=False, seed=7)
    again = load(directory, num_labels=NUM_LABELS, pretrained=False, seed=7)
    layer = model.params["convnext"]["encoder"]["stages"]["2"]["layers"]["1"]
    assert np.all(np.asarray(layer["layer_scale_parameter"]) == np.float32(1e-6))
    assert np.all(np.asarray(layer["layernorm"]["scale"]) == 1)
    assert np.all(np.asarray(layer["pwconv1"]["bias"]) == 0)
    assert np.all(np.asarray(layer["dwconv"]["bias"]) == 0)
    for leaf in (layer["pwconv1"]["kernel"], layer["pwconv2"]["kernel"], layer["dwconv"]["kernel"]):
        assert 0.017 < float(np.asarray(leaf).std()) < 0.023  # normal(initializer_range 0.02)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params), strict=True):
        assert np.array_equal(a, b)  # deterministic per (seed, path)


@pytest.mark.parametrize(
    ("overrides", "load_options", "message"),
    [
        ({"hidden_act": "mystery"}, {}, "hidden_act='mystery' is not supported"),
        ({"hidden_sizes": [8, 16]}, {}, "must agree"),
        ({"image_size": 8}, {}, "smaller than this ConvNeXt reads"),
        ({}, {"image_size": (32, 8)}, "smaller than this ConvNeXt reads"),
        ({}, {"in_channels": 0}, r"in_channels \(--in-channels\) must be an integer >= 1"),
    ],
)
def test_unsupported_configs_raise_clear_errors(tmp_path, overrides, load_options, message):
    config = tiny_convnext_config().to_dict() | overrides
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load(tmp_path, num_labels=2, pretrained=False, **load_options)


def test_inputs_below_the_smallest_size_are_refused_before_compiling(classifier):
    assert classifier.config.smallest_input == (16, 16)  # patch 4, two downsamplings by 2
    with pytest.raises(ValueError, match=r"16x8 are smaller .* at least 16x16"):
        classifier.apply(classifier.params, {"pixel_values": images(0, size=(16, 8))})
    with pytest.raises(ValueError, match="NCHW"):
        classifier.apply(classifier.params, {"pixel_values": images(0).transpose(0, 3, 1, 2)})


def test_tensor_parallel_splits_every_blocks_mlp_and_lora_targets_it(classifier):
    model = classifier
    specs = sharding.param_specs(
        model.params, {"tensor": 2}, structure=model.structure, min_shard_size=0
    )
    split = {
        p: tuple(s)
        for p, s in flatten(specs).items()
        if p.endswith("/kernel") and "tensor" in tuple(s)
    }
    want = {f"{b}/pwconv1/kernel": ("fsdp", "tensor") for b in LAYERS}
    want |= {f"{b}/pwconv2/kernel": ("tensor", "fsdp") for b in LAYERS}
    assert split == want

    plan = jaxtl.make_plan("lora(4)", model.structure)
    adapted = with_adapters(model, plan, seed=0)
    targets = {p.rsplit("/", 1)[0] for p in flatten(adapted.params) if p.endswith(LORA_A)}
    assert targets == {f"{b}/{layer}" for b in LAYERS for layer in ("pwconv1", "pwconv2")}


def test_a_downsampling_layer_trains_and_caches_as_the_block_it_is(classifier):
    """last_n(3) trains the last stage whole (its downsampling layer and two blocks), and the
    feature cache's boundary is that downsampling layer, called once on the frozen prefix's
    output."""
    model = classifier
    plan = jaxtl.make_plan("last_n(3)", model.structure)
    trainable = flatten(plan.trainable_mask(model.params))
    down = "convnext/encoder/stages/2/downsampling_layer"
    parts = (down, *LAYERS[-2:], "convnext/layernorm", "classifier")
    assert {p for p, on in trainable.items() if on} == {
        p for p in trainable if p.startswith(tuple(f"{part}/" for part in parts))
    }
    assert feature_cache.check_prefix(model, trainable, {"pixel_values": images(0)}) == down


def colored(seed: int, n: int = 64) -> dict[str, np.ndarray]:
    """Noise images whose label is their tint: red over blue (1) or blue over red (0). A tint
    changes the pattern across channels, which the patch LayerNorm keeps (a uniform brightness
    shift it would remove)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    x = rng.standard_normal((n, 32, 32, 3)).astype(np.float32)
    tint = np.where(label[:, None], 1.0, -1.0) * np.array([0.5, 0.0, -0.5])
    return {"pixel_values": x + tint[:, None, None, :].astype(np.float32), "label": label}


def test_a_short_real_finetune_of_the_last_block_lowers_the_loss(reference):
    _, directory = reference
    model = load(directory, num_labels=2, ignore_mismatched="classifier/.*")  # new head
    assert sorted(m.path for m in model.report.mismatched) == HEAD
    plan = jaxtl.make_plan("last_n(1)", model.structure)
    config = jaxtl.TrainConfig(batch_size=16, max_steps=32, learning_rate=1e-2, progress=False)
    arrays = colored(0)
    params = fit(jaxtl.Trainer(model, plan, config), arrays).state.params

    def loss(params) -> float:
        logits = model.apply(params, {"pixel_values": arrays["pixel_values"]})
        return float(mean_loss(logits, arrays, "classification"))

    before, after = loss(model.params), loss(params)
    print(f"last_n(1): training loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.15
    start, end = flatten(model.params), flatten(params)
    moved = {p.rsplit("/", 1)[0] for p in end if not np.array_equal(end[p], start[p])}
    trained = (LAYERS[-1], "convnext/layernorm", "classifier")
    assert moved and all(m.startswith(trained) for m in moved), moved
