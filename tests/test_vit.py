"""Parity of jaxtl's Flax ViT against transformers' PyTorch ViT (the independent reference).

Every numeric check compares with ``transformers.ViTModel`` / ``ViTForImageClassification`` in
eval mode (or, for preprocessing, ``transformers.ViTImageProcessorPil``). One tiny random
checkpoint is saved once per module; a few distinct input shapes keep XLA compiles cheap.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import jaxtl
from jaxtl.models import vit
from jaxtl.weights.loading import load

TOL = 1e-5  # float32 end to end; never loosened to make a test pass
NUM_LABELS = 3


def tiny_vit_config(**overrides) -> transformers.ViTConfig:
    kwargs = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=NUM_LABELS,
    )
    kwargs.update(overrides)
    return transformers.ViTConfig(**kwargs)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Adds N(0, 0.1) to every param. transformers' init leaves biases at 0 and LayerNorms at
    1/0, where a swapped or dropped bias would go unnoticed; after this every tensor is distinct
    and position embeddings are 5x larger, so interpolation errors show far above TOL."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def images(seed: int, size, channels: int = 3, batch: int = 2) -> np.ndarray:
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, height, width, channels)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def max_diff(ours, theirs) -> float:
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    return float(np.max(np.abs(np.asarray(ours) - theirs)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny ViTForImageClassification saved with save_pretrained (safetensors)."""
    torch.manual_seed(0)
    model = perturbed(transformers.ViTForImageClassification(tiny_vit_config()))
    directory = tmp_path_factory.mktemp("vit-classifier")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def classifier(reference):
    return load(reference[1], num_labels=NUM_LABELS)


def test_random_vit_hidden_states_and_logits_match_pytorch(reference, classifier):
    torch_model, _ = reference
    model = classifier
    assert model.family == "vit"
    assert not model.report.initialized and not model.report.unexpected
    assert not model.report.mismatched
    assert model.structure.blocks == ("vit/encoder/layer_0", "vit/encoder/layer_1")
    assert model.structure.neck == ("vit/layernorm",) and model.structure.head == ("classifier",)
    kernel = model.params["vit"]["embeddings"]["patch_embeddings"]["projection"]["kernel"]
    assert kernel.shape == (8, 8, 3, 32)  # HWIO
    x = images(0, 32)

    with torch.no_grad():
        theirs_hidden = torch_model.vit(nchw(x)).last_hidden_state
        theirs_logits = torch_model(nchw(x)).logits
    ours_hidden = vit.ViTModel(model.config).apply({"params": model.params["vit"]}, x)
    ours_logits = model.apply(model.params, {"pixel_values": x})

    assert ours_hidden.shape == tuple(theirs_hidden.shape) == (2, 17, 32)
    hidden_diff = max_diff(ours_hidden, theirs_hidden)
    logits_diff = max_diff(ours_logits, theirs_logits)
    print(f"random ViT last hidden state max |diff| = {hidden_diff:.3g}")
    print(f"random ViTForImageClassification logits max |diff| = {logits_diff:.3g}")
    assert hidden_diff <= TOL
    assert ours_logits.shape == (2, NUM_LABELS) and logits_diff <= TOL


def test_vit_model_checkpoint_into_new_head_reports_like_transformers(tmp_path):
    """A ViTModel checkpoint (no ``vit.`` prefix, with pooler) under a 5-class head."""
    torch.manual_seed(1)
    transformers.ViTModel(tiny_vit_config(), add_pooling_layer=True).save_pretrained(tmp_path)

    model = load(tmp_path, num_labels=5)
    assert model.report.initialized == ["classifier/bias", "classifier/kernel"]
    assert sorted(model.report.unexpected) == ["vit/pooler/dense/bias", "vit/pooler/dense/kernel"]
    assert not model.report.mismatched
    assert model.params["classifier"]["kernel"].shape == (32, 5)

    _, info = transformers.ViTForImageClassification.from_pretrained(
        tmp_path, num_labels=5, output_loading_info=True
    )
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert sorted(info["unexpected_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]


@pytest.mark.parametrize("size", [48, (40, 24)])
def test_image_size_interpolates_position_embeddings_like_pytorch(reference, size):
    torch_model, directory = reference
    model = load(directory, task="features", image_size=size)
    pair = (size, size) if isinstance(size, int) else size
    assert model.extras["image_size"] == pair
    assert model.extras["preprocessing"].size == pair
    grid = (pair[0] // 8) * (pair[1] // 8)
    assert model.params["vit"]["embeddings"]["position_embeddings"].shape == (1, 1 + grid, 32)
    x = images(1, pair)

    with torch.no_grad():
        theirs = torch_model.vit(nchw(x), interpolate_pos_encoding=True).last_hidden_state[:, 0]
    ours = model.apply(model.params, {"pixel_values": x})
    diff = max_diff(ours, theirs)
    print(f"ViT at {pair} (interpolated positions) CLS features max |diff| = {diff:.3g}")
    assert ours.shape == (2, 32) and diff <= TOL


def test_torch_bicubic_matches_torch_interpolate():
    """The position-grid resize is torch's bicubic (a=-0.75), not jax.image.resize's (a=-0.5)."""
    rng = np.random.default_rng(0)
    for grid_in, grid_out in [
        ((4, 4), (6, 6)),
        ((4, 4), (5, 3)),
        ((14, 14), (24, 24)),
        ((6, 6), (2, 4)),
    ]:
        dim = 5
        positions = rng.standard_normal((1, 1 + grid_in[0] * grid_in[1], dim))
        ours = vit.interpolate_positions(positions, grid_in, grid_out)
        grid = torch.from_numpy(positions[:, 1:]).reshape(1, *grid_in, dim).permute(0, 3, 1, 2)
        theirs = torch.nn.functional.interpolate(
            grid, size=grid_out, mode="bicubic", align_corners=False
        )
        theirs = theirs.permute(0, 2, 3, 1).reshape(1, -1, dim).numpy()
        assert np.array_equal(ours[:, :1], positions[:, :1])
        assert np.max(np.abs(ours[:, 1:] - theirs)) <= 1e-12  # float64 on both sides


def test_in_channels_1_on_gray_equals_pytorch_on_gray_rgb(reference):
    torch_model, directory = reference
    model = load(directory, task="features", in_channels=1)
    assert model.params["vit"]["embeddings"]["patch_embeddings"]["projection"]["kernel"].shape == (
        8,
        8,
        1,
        32,
    )
    assert model.extras["preprocessing"].channels == 1
    gray = images(2, 32, channels=1)

    with torch.no_grad():
        theirs = torch_model.vit(nchw(np.repeat(gray, 3, axis=-1))).last_hidden_state[:, 0]
    diff = max_diff(model.apply(model.params, {"pixel_values": gray}), theirs)
    print(f"ViT in_channels=1 on g vs RGB (g, g, g) CLS features max |diff| = {diff:.3g}")
    assert diff <= TOL


def test_export_round_trip_loads_in_transformers(classifier, tmp_path):
    model = classifier
    # Move every param (as fine-tuning would), so the export cannot pass by echoing the file.
    leaves, tree = jax.tree.flatten(model.params)
    rng = np.random.default_rng(3)
    params = jax.tree.unflatten(
        tree, [p + 0.05 * rng.standard_normal(p.shape).astype(np.float32) for p in leaves]
    )
    jaxtl.export(model, tmp_path, params)  # export_fn -> safetensors + config.json

    reloaded, info = transformers.ViTForImageClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert reloaded.config.num_labels == NUM_LABELS
    x = images(4, 32)
    with torch.no_grad():
        theirs = reloaded.eval()(nchw(x)).logits
    diff = max_diff(model.apply(params, {"pixel_values": x}), theirs)
    print(f"exported ViT logits max |diff| after transformers reload = {diff:.3g}")
    assert diff <= TOL


def test_features_export_of_resized_gray_model_loads_as_vit_model(reference, tmp_path):
    """image_size and in_channels changes travel into the exported config.json."""
    _, directory = reference
    model = load(directory, task="features", image_size=48, in_channels=1)
    jaxtl.export(model, tmp_path)

    reloaded, info = transformers.ViTModel.from_pretrained(
        tmp_path, add_pooling_layer=False, output_loading_info=True
    )
    assert not any(info.values()), info
    assert reloaded.config.image_size == 48 and reloaded.config.num_channels == 1
    x = images(5, 48, channels=1)
    with torch.no_grad():
        theirs = reloaded.eval()(nchw(x)).last_hidden_state[:, 0]  # no interpolation needed
    assert max_diff(model.apply(model.params, {"pixel_values": x}), theirs) <= TOL


def test_converter_reads_transformers_5_in_memory_names(reference):
    """``model.state_dict()`` in transformers >= 5 uses ``vit.layers.N.attention.q_proj``-style
    names; save_pretrained writes the classic ones. Both convert to the same tree."""
    torch_model, directory = reference
    on_disk = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    in_memory = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert any(".q_proj." in k for k in in_memory)  # the renamed modules exist in this version
    ours, theirs = vit.convert_hf_checkpoint(on_disk), vit.convert_hf_checkpoint(in_memory)
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_preprocessing_from_checkpoint_matches_vit_image_processor(reference, tmp_path):
    """``ViTImageProcessor`` needs torchvision (not installed); transformers falls back to its
    PIL backend, ``ViTImageProcessorPil``, which this compares against."""
    _, directory = reference
    processor = transformers.ViTImageProcessorPil(
        size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.2, 0.3, 0.4],
    )
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    processor.save_pretrained(tmp_path)

    recipe = load(tmp_path, num_labels=NUM_LABELS).extras["preprocessing"]
    assert (recipe.size, recipe.resize, recipe.interpolation) == ((32, 32), None, "bilinear")
    assert recipe.mean == (0.485, 0.456, 0.406) and recipe.std == (0.2, 0.3, 0.4)
    default = load(directory, num_labels=NUM_LABELS).extras["preprocessing"]
    assert (default.size, default.mean, default.std) == ((32, 32), (0.5,) * 3, (0.5,) * 3)

    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    theirs = processor(images=[image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    diff = max_diff(recipe(image[None]), theirs)
    print(f"ViT preprocessing at model size max |diff| = {diff:.3g}")
    assert diff <= TOL

    # With a resize: both resize the uint8 image with PIL before rescaling.
    big = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    theirs = processor(images=[big], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    diff = max_diff(recipe(big[None]), theirs)
    print(f"ViT preprocessing after resize max |diff| = {diff:.3g}")
    assert diff <= TOL


def test_random_init_follows_transformers_rule(reference):
    _, directory = reference
    model = load(directory, num_labels=NUM_LABELS, pretrained=False, seed=7)
    again = load(directory, num_labels=NUM_LABELS, pretrained=False, seed=7)
    embeddings = model.params["vit"]["embeddings"]
    layer = model.params["vit"]["encoder"]["layer_0"]
    assert np.all(np.asarray(layer["layernorm_before"]["scale"]) == 1)
    assert np.all(np.asarray(layer["attention"]["attention"]["query"]["bias"]) == 0)
    for leaf in (embeddings["position_embeddings"], layer["intermediate"]["dense"]["kernel"]):
        values = np.asarray(leaf)
        assert 0.015 < values.std() < 0.025 and np.abs(values).max() <= 2.0  # std 0.02
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params), strict=True):
        assert np.array_equal(a, b)  # deterministic per (seed, path)


@pytest.mark.parametrize(
    ("overrides", "load_options", "message"),
    [
        ({"hidden_size": 30}, {}, "not a multiple of num_attention_heads"),
        ({"hidden_act": "mystery"}, {}, "hidden_act='mystery' is not supported"),
        ({"image_size": 36}, {}, "not a whole number of (8, 8) patches"),
        ({}, {"image_size": 44}, "not a whole number of (8, 8) patches"),
        ({}, {"in_channels": 0}, "in_channels (--in-channels) must be an integer >= 1"),
    ],
)
def test_unsupported_configs_raise_clear_errors(tmp_path, overrides, load_options, message):
    config = tiny_vit_config().to_dict() | overrides
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(tmp_path, num_labels=2, pretrained=False, **load_options)


def test_export_writes_the_preprocessing_the_model_used(reference, tmp_path):
    """After ``image_size=48`` the exported ``preprocessor_config.json`` is the 48x48 recipe:
    transformers' processor built from it gives the pixels jaxtl's model was fed."""
    _, directory = reference
    source = tmp_path / "source"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        (source / name).write_bytes((directory / name).read_bytes())
    transformers.ViTImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]
    ).save_pretrained(source)
    model = load(source, num_labels=NUM_LABELS, image_size=48)
    ours = model.extras["preprocessing"]
    assert ours.size == (48, 48)
    jaxtl.export(model, tmp_path / "out")

    processor = transformers.ViTImageProcessorPil.from_pretrained(tmp_path / "out")
    image = np.random.default_rng(8).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    theirs = processor(images=[image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert theirs.shape == (1, 48, 48, 3)
    diff = max_diff(ours(image[None]), theirs)
    print(f"exported ViT preprocessor config vs jaxtl's 48x48 recipe max |diff| = {diff:.3g}")
    assert diff <= TOL
    reloaded = load(tmp_path / "out", num_labels=NUM_LABELS).extras["preprocessing"]
    assert dataclasses.replace(reloaded, source="") == dataclasses.replace(ours, source="")
