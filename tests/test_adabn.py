"""AdaBN against PyTorch's own recipe for it: BatchNorm ``momentum=None`` (a cumulative
average), ``reset_running_stats()``, and a train-mode pass over the target data, on transformers'
PyTorch ResNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import jaxtl
from jaxtl.transfer.trees import flatten


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    reference = transformers.ResNetModel(config)
    path = tmp_path_factory.mktemp("resnet")
    reference.save_pretrained(path)
    return reference, jaxtl.load(path, num_labels=3)


def target_images(n=12, seed=0):
    """A shifted, rescaled domain: the source statistics are wrong for it."""
    rng = np.random.default_rng(seed)
    return (3.0 * rng.standard_normal((n, 16, 16, 3)) + 2.0).astype(np.float32)


def torch_adabn(reference, images):
    norms = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    reference.train()
    with torch.no_grad():
        reference(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    return norms


def test_matches_pytorch_cumulative_recipe(resnet):
    reference, model = resnet
    images = target_images()
    adapted = jaxtl.adapt_batch_norm(model, images, batch_size=len(images))
    # In HF names (the export map, itself tested against transformers in test_resnet.py).
    ours, _ = model.export_fn(model.params, adapted)
    sizes = _elements_per_channel(reference, images)
    norms = torch_adabn(reference, images)
    theirs = reference.state_dict()
    checked = 0
    for name, bn in reference.named_modules():
        if not isinstance(bn, torch.nn.BatchNorm2d):
            continue
        key = f"resnet.{name}"
        n = sizes[bn]
        np.testing.assert_allclose(
            ours[f"{key}.running_mean"], theirs[f"{name}.running_mean"].numpy(), atol=1e-4
        )
        # PyTorch keeps the unbiased batch variance; AdaBN here the population (biased) one:
        # the same numbers up to n / (n - 1).
        np.testing.assert_allclose(
            ours[f"{key}.running_var"] * n / (n - 1),
            theirs[f"{name}.running_var"].numpy(),
            rtol=1e-4,
            atol=1e-5,
        )
        checked += 1
    assert checked == len(norms) > 0


def _elements_per_channel(reference, images):
    """Examples x height x width that each BatchNorm averaged over."""
    sizes = {}

    def hook(module, args):
        sizes[module] = args[0].shape[0] * args[0].shape[2] * args[0].shape[3]

    handles = [
        m.register_forward_pre_hook(hook)
        for m in reference.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        reference(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    for h in handles:
        h.remove()
    return sizes


def test_changes_statistics_and_nothing_else(resnet):
    _, model = resnet
    before_params = {p: np.asarray(v).copy() for p, v in flatten(model.params).items()}
    before_stats = {p: np.asarray(v).copy() for p, v in flatten(model.batch_stats).items()}
    adapted = flatten(jaxtl.adapt_batch_norm(model, target_images(), batch_size=5))
    assert set(adapted) == set(before_stats)
    assert all(not np.allclose(adapted[p], before_stats[p]) for p in adapted)
    for p, v in flatten(model.params).items():
        np.testing.assert_array_equal(np.asarray(v), before_params[p])
    for p, v in flatten(model.batch_stats).items():
        np.testing.assert_array_equal(np.asarray(v), before_stats[p])


def test_first_layer_statistics_do_not_depend_on_batching(resnet):
    """The first BatchNorm sees the raw images, so its population statistics are exactly the
    same whatever the batch size (12 = 5 + 5 + 2: the last partial batch is weighted right)."""
    _, model = resnet
    images = target_images()
    one = flatten(jaxtl.adapt_batch_norm(model, images, batch_size=12))
    many = flatten(jaxtl.adapt_batch_norm(model, images, batch_size=5))
    first = next(iter(flatten(model.batch_stats))).rsplit("/", 1)[0]
    for leaf in ("mean", "var"):
        np.testing.assert_allclose(many[f"{first}/{leaf}"], one[f"{first}/{leaf}"], rtol=1e-5)


def test_errors(resnet, tmp_path):
    _, model = resnet
    with pytest.raises(ValueError, match="no data"):
        jaxtl.adapt_batch_norm(model, np.zeros((0, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"batch_size must be a whole number >= 2 .* got 0\."):
        jaxtl.adapt_batch_norm(model, target_images(), batch_size=0)
    raw = np.zeros((4, 16, 16, 3), np.uint8)  # 0..255 images, not the model's pixel_values
    with pytest.raises(ValueError, match=r"got uint8 of shape \(4, 16, 16, 3\): preprocess"):
        jaxtl.adapt_batch_norm(model, raw)
    preprocessed = model.extras["preprocessing"](raw)  # what the error says to do, works
    assert set(flatten(jaxtl.adapt_batch_norm(model, preprocessed))) == set(
        flatten(model.batch_stats)
    )
    transformers.BertModel(
        transformers.BertConfig(
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            vocab_size=20,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no BatchNorm"):
        jaxtl.adapt_batch_norm(jaxtl.load(tmp_path), np.zeros((2, 4), np.int32))
