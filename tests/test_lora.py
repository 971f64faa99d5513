"""LoRA: adapters in the param tree, merge, the PEFT layout both ways, and every bad input.

The references are independent of jaxtl: transformers' models and the ``peft`` library
(``PeftModel.from_pretrained`` of what jaxtl writes, and adapters that ``peft`` itself made and
saved, read by jaxtl).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxtl
import jaxtl.lora
from jaxtl.transfer import lora as tl
from jaxtl.transfer.trees import flatten, unflatten

TOL = 1e-5  # float32 end to end; never loosened to make a test pass
IDS = np.random.default_rng(0).integers(1, 99, (3, 10)).astype(np.int32)
MASK = np.array([[1] * 10, [1] * 7 + [0] * 3, [1] * 4 + [0] * 6], np.int32)
TEXT = {"input_ids": IDS, "attention_mask": MASK}
PIXELS = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)


def peft_model(base: torch.nn.Module, directory) -> torch.nn.Module:
    import peft

    return peft.PeftModel.from_pretrained(base, str(directory)).eval()


def trained(params, seed: int = 1):
    """``params`` as if trained: every adapter and head leaf random (``lora_b`` starts at zero,
    where a dropped or transposed adapter would go unnoticed)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, value in flatten(params).items():
        if path.rpartition("/")[2] in (tl.LORA_A, tl.LORA_B):
            value = rng.normal(0, 0.3, np.shape(value)).astype(np.float32)
        flat[path] = jnp.asarray(value)
    return unflatten(flat)


def with_head(params, structure, seed: int = 2):
    rng = np.random.default_rng(seed)
    flat = dict(flatten(params))
    for path in flat:
        if any(path.startswith(h) for h in structure.head):
            flat[path] = jnp.asarray(rng.normal(0, 0.3, np.shape(flat[path])).astype(np.float32))
    return unflatten(flat)


def diff(a, b) -> float:
    """Max |a - b| relative to the outputs' scale (at least 1): float32 carries ~7 digits,
    whatever the magnitude of the logits."""
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random transformers models saved by transformers, one per layer kind LoRA meets:
    Linear (BERT, ViT), Conv1D (GPT-2) and Conv2d (ResNet)."""
    torch.manual_seed(0)
    out = {}
    specs = {
        "bert": (
            transformers.BertForSequenceClassification,
            transformers.BertConfig(
                vocab_size=99,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                max_position_embeddings=64,
                num_labels=3,
            ),
        ),
        "gpt2": (
            transformers.GPT2ForSequenceClassification,
            transformers.GPT2Config(
                n_embd=32,
                n_layer=2,
                n_head=4,
                vocab_size=99,
                n_positions=64,
                num_labels=3,
                bos_token_id=None,
                eos_token_id=None,
                pad_token_id=0,
            ),
        ),
        "vit": (
            transformers.ViTForImageClassification,
            transformers.ViTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                num_labels=3,
            ),
        ),
        "resnet": (
            transformers.ResNetForImageClassification,
            transformers.ResNetConfig(
                layer_type="basic",
                embedding_size=8,
                hidden_sizes=[8, 16, 16, 32],
                depths=[1, 1, 1, 1],
                num_labels=3,
            ),
        ),
    }
    for name, (cls, config) in specs.items():
        directory = tmp_path_factory.mktemp(name)
        cls(config).eval().save_pretrained(directory)
        out[name] = str(directory)
    return out


def inputs(name: str) -> dict:
    return {"pixel_values": PIXELS} if name in ("vit", "resnet") else TEXT


def torch_logits(model: torch.nn.Module, name: str) -> np.ndarray:
    with torch.no_grad():
        if name in ("vit", "resnet"):
            x = torch.from_numpy(np.ascontiguousarray(PIXELS.transpose(0, 3, 1, 2)))
            return model(pixel_values=x).logits.numpy()
        ids = torch.from_numpy(np.where(MASK == 1, IDS, 0).astype(np.int64))
        return model(input_ids=ids, attention_mask=torch.from_numpy(MASK.astype(np.int64))).logits


def jax_inputs(name: str) -> dict:
    if name in ("vit", "resnet"):
        return {"pixel_values": PIXELS}
    return {"input_ids": np.where(MASK == 1, IDS, 0), "attention_mask": MASK}


CLASSES = {
    "bert": transformers.BertForSequenceClassification,
    "gpt2": transformers.GPT2ForSequenceClassification,
    "vit": transformers.ViTForImageClassification,
    "resnet": transformers.ResNetForImageClassification,
}


def loaded(models, name: str, **options):
    model = jaxtl.load(models[name], num_labels=3, **options)
    return model, dict(model.batch_stats and {"batch_stats": model.batch_stats})


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "resnet"])
def test_adapted_model_starts_equal_and_merges_to_the_same_outputs(models, name):
    model, stats = loaded(models, name)
    spec = tl.LoRA(4, alpha=8).resolve(model.structure)
    adapted = jaxtl.lora.adapt(model, spec, seed=0)
    added = set(flatten(adapted.params)) - set(flatten(model.params))
    assert added and all(p.rpartition("/")[2] in (tl.LORA_A, tl.LORA_B) for p in added)
    batch = jax_inputs(name)
    base_out = np.asarray(model.apply(model.params, batch, **stats))
    # lora_b = 0: exactly the base model's outputs.
    assert np.array_equal(np.asarray(adapted.apply(adapted.params, batch, **stats)), base_out)
    params = trained(adapted.params)
    out = np.asarray(adapted.apply(params, batch, **stats))
    # The adapters change the outputs (by more than 10% of their scale)...
    assert np.max(np.abs(out - base_out)) > 0.1 * np.max(np.abs(base_out))
    merged = jaxtl.lora.merge(adapted, params)
    assert set(flatten(merged.params)) == set(flatten(model.params))
    # ... and folded into the kernels give the same ones.
    assert diff(merged.apply(merged.params, batch, **stats), out) < TOL


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "resnet"])
def test_peft_loads_the_exported_adapters_and_gives_jaxtls_logits(models, name, tmp_path):
    model, stats = loaded(models, name)
    adapted = jaxtl.lora.adapt(model, tl.LoRA(4, alpha=8), seed=0)
    params = with_head(trained(adapted.params), model.structure)
    ours = np.asarray(adapted.apply(params, jax_inputs(name), **stats))
    out = jaxtl.lora.export_adapters(adapted, tmp_path / "adapter", params)
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert config["fan_in_fan_out"] is (name == "gpt2")  # transformers' Conv1D
    theirs = peft_model(CLASSES[name].from_pretrained(models[name]).eval(), out)
    assert diff(ours, torch_logits(theirs, name)) < TOL
    # The merged model, written in the source format, loads in transformers with the same logits.
    merged_dir = jaxtl.export(adapted, tmp_path / "merged", params)
    reloaded = CLASSES[name].from_pretrained(merged_dir).eval()
    assert diff(ours, torch_logits(reloaded, name)) < TOL


def test_adapters_made_by_peft_load_into_jaxtl(models, tmp_path):
    """The reverse direction, from a directory peft itself wrote (random lora_B and head)."""
    import peft

    base = transformers.BertForSequenceClassification.from_pretrained(models["bert"])
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"])
    config.task_type = "SEQ_CLS"
    made = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    made.save_pretrained(tmp_path)
    theirs = torch_logits(made.eval(), "bert")
    model = jaxtl.load(models["bert"], num_labels=3)
    adapted = jaxtl.lora.load_adapters(model, tmp_path)
    spec = adapted.extras["lora"]
    assert (spec.rank, spec.scale) == (4, 4.0)
    assert len(tl.adapter_modules(adapted.params)) == 4  # query and value of 2 layers
    assert diff(adapted.apply(adapted.params, jax_inputs("bert")), theirs) < TOL


def test_an_adapter_for_another_base_model_is_refused_by_name(models, tmp_path):
    bert, _ = loaded(models, "bert")
    adapted = jaxtl.lora.adapt(bert, tl.LoRA(4))
    jaxtl.lora.export_adapters(adapted, tmp_path / "bert", adapted.params)
    gpt2, _ = loaded(models, "gpt2")
    with pytest.raises(tl.LoRAError, match="bert.encoder.layer.0.attention.self.query.*another"):
        jaxtl.lora.load_adapters(gpt2, tmp_path / "bert")
    # Same names, other shapes: a wider BERT.
    wide = tmp_path / "wide"
    transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=99,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            num_labels=3,
        )
    ).save_pretrained(wide)
    with pytest.raises(tl.LoRAError, match=r"query.*lora_a has shape \(32, 4\).*needs \(48, 4\)"):
        jaxtl.lora.load_adapters(jaxtl.load(wide, num_labels=3), tmp_path / "bert")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        jaxtl.lora.load_adapters(bert, tmp_path)


def test_plan_freezes_the_base_and_trains_adapters_and_head(models):
    model, _ = loaded(models, "bert")
    plan = jaxtl.make_plan("lora(4)", model.structure)
    assert plan.name == "lora(4)" and plan.adapters.targets == model.structure.lora_targets
    adapted = jaxtl.lora.adapt(model, plan)
    labels = flatten(plan.labels(adapted.params))
    assert {p for p, g in labels.items() if g == "lora"} == {
        f"bert/encoder/layer_{i}/attention/self/{m}/{leaf}"
        for i in range(2)
        for m in ("query", "value")
        for leaf in (tl.LORA_A, tl.LORA_B)
    }
    assert {g for p, g in labels.items() if p.startswith("classifier")} == {"head"}
    assert {g for p, g in labels.items() if p.startswith("bert/embeddings")} == {"frozen"}
    rows = {r.group: r for r in plan.summary(adapted.params)}
    assert rows["frozen"].opt_state_bytes == 0  # the base holds no optimizer state
    assert rows["lora"].num_params == 2 * 2 * (32 * 4 + 4 * 32)
    table = plan.table(adapted.params)
    trainable = rows["lora"].num_params + rows["head"].num_params
    full = sum(np.size(x) for x in jax.tree.leaves(model.params))
    assert f"trainable {100 * trainable / full:.2f}% of its {full:,} params" in table


def test_training_moves_only_adapters_and_head(tmp_path):
    import dataclasses

    import _tiny

    model = jaxtl.load(_tiny.make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    config = jaxtl.TrainConfig(epochs=1, batch_size=8, max_steps=3)
    config = dataclasses.replace(
        config, optim=dataclasses.replace(config.optim, learning_rate=1e-2)
    )
    data = _tiny.small_vader(24, 8, 8)
    result = jaxtl.finetune(model, "lora(2, alpha=4, dropout=0.1)", data, config, verbose=False)
    before, after = flatten(result.model.params), flatten(result.params)
    assert set(before) == set(after)
    for path, value in after.items():
        moved = not np.array_equal(np.asarray(value), np.asarray(before[path]))
        assert moved == (path.startswith("classifier") or tl.LORA_A in path or tl.LORA_B in path)


@pytest.mark.slow
def test_efficientnet_lora_adapts_its_1x1_convolutions_and_refuses_depthwise_ones():
    """The real ImageNet Lite0: the default targets are the expand/project convolutions; a
    depthwise one is refused with the reason, while tracing, before anything compiles.

    Adapted vs merged is compared in float64: with random adapters on all 16 blocks float32
    rounding grows through the BatchNorms to ~3e-4 of the logits, while in float64 the two
    agree to 1e-12, which is what shows the adapter path and the merged kernel are one map."""
    with jax.enable_x64(True):
        model = jaxtl.load(
            jaxtl.efficientnet_lite0_path(), num_labels=10, image_size=64, dtype=jnp.float64
        )
        adapted = jaxtl.lora.adapt(model, tl.LoRA(4))
        modules = tl.adapter_modules(adapted.params)
        assert modules and all(m.endswith(("expand_conv", "project_conv")) for m in modules)
        pixels = np.random.default_rng(0).standard_normal((2, 64, 64, 3))
        batch, stats = {"pixel_values": pixels}, {"batch_stats": model.batch_stats}
        params = jax.tree.map(lambda x: x.astype(jnp.float64), trained(adapted.params, seed=3))
        base = np.asarray(model.apply(model.params, batch, **stats))
        out = np.asarray(adapted.apply(params, batch, **stats))
        assert np.max(np.abs(out - base)) > 0.1 * np.max(np.abs(base))
        merged = jaxtl.lora.merge(adapted, params)
        assert diff(merged.apply(merged.params, batch, **stats), out) < 1e-10
    depthwise = jaxtl.lora.adapt(
        jaxtl.load(jaxtl.efficientnet_lite0_path(), num_labels=10, image_size=64),
        tl.LoRA(1, targets=[r"blocks/1/depthwise_conv"]),
    )
    with pytest.raises(tl.LoRAError, match="grouped .depthwise. convolution.*cannot be merged"):
        depthwise.apply(depthwise.params, {"pixel_values": np.float32(pixels)}, **stats)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(rank=2.5), "rank must be an integer >= 1"),
        (dict(rank=33), r"rank 33 is larger than the smaller dimension.*\(32, 32\).*rank <= 32"),
        (dict(rank=4, alpha=-1), "alpha must be >= 0"),
        (dict(rank=4, dropout=1.0), r"dropout must be a number in \[0, 1\)"),
        (dict(rank=4, targets=["query"]), r"(?s)'query' matches no.*try '\.\*query'.*bert/encoder"),
        (dict(rank=4, targets=[".*/typo"]), r"(?s)'\.\*/typo' matches no.*Kernels it could match"),
        (dict(rank=4, targets=["(unclosed"]), "not a valid regular expression"),
    ],
)
def test_bad_lora_options_are_refused_before_anything_runs(models, options, message):
    model, _ = loaded(models, "bert")
    with pytest.raises(ValueError, match=message):
        jaxtl.lora.adapt(model, tl.LoRA(**options))


def test_the_recipe_string_takes_lora_options_and_round_trips(models):
    model, _ = loaded(models, "bert")
    plan = jaxtl.make_plan("lora(8, alpha=16, targets=['.*/query'], dropout=0.1)", model.structure)
    assert plan.adapters == tl.LoRA(8, 16.0, (".*/query",), 0.1)
    assert jaxtl.make_plan(plan.name, model.structure).adapters == plan.adapters
    with pytest.raises(ValueError, match="rank must be an integer"):
        jaxtl.make_plan("lora(0)", model.structure)
    from jaxtl.transfer.recipes import split_recipes

    assert split_recipes("full,lora(4, targets=['a', 'b']),probe") == [
        "full",
        "lora(4, targets=['a', 'b'])",
        "probe",
    ]


def test_adapters_shard_with_their_kernels():
    """``lora_a`` splits the kernel's input dims, ``lora_b`` its output dim, the rank whole,
    whatever the kernel's rule (FSDP, Megatron column or row)."""
    from jax.sharding import PartitionSpec as P

    from jaxtl import sharding
    from jaxtl.transfer.structure import Structure

    params = {
        name: {
            "kernel": np.zeros((64, 128), np.float32),
            "lora_a": np.zeros((64, 4), np.float32),
            "lora_b": np.zeros((4, 128), np.float32),
        }
        for name in ("col", "row", "fsdp")
    }
    structure = Structure(blocks=(), head=(), tensor_parallel=(("col", "column"), ("row", "row")))
    specs = sharding.param_specs(
        params, {"data": 1, "fsdp": 2, "tensor": 2}, structure=structure, min_shard_size=16
    )
    assert specs["col"] == {"kernel": P("fsdp", "tensor"), "lora_a": P("fsdp", None),
                            "lora_b": P(None, "tensor")}  # fmt: skip
    assert specs["row"] == {"kernel": P("tensor", "fsdp"), "lora_a": P("tensor", None),
                            "lora_b": P(None, "fsdp")}  # fmt: skip
    assert specs["fsdp"] == {"kernel": P(None, "fsdp"), "lora_a": P(None, None),
                             "lora_b": P(None, "fsdp")}  # fmt: skip


def test_frozen_bf16_keeps_the_base_in_bf16_and_the_adapters_in_float32(tmp_path):
    import _tiny

    model = jaxtl.load(_tiny.make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    plan = jaxtl.make_plan("lora(2)", model.structure)
    adapted = jaxtl.lora.adapt(model, plan)
    config = jaxtl.TrainConfig(batch_size=8, max_steps=1, frozen_bf16=True, progress=False)
    trainer = jaxtl.Trainer(adapted, plan, config)
    state = trainer.init_state(1)
    dtypes = {p: x.dtype for p, x in flatten(state.params).items()}
    for path, dtype in dtypes.items():
        trains = path.startswith("classifier") or tl.LORA_A in path or tl.LORA_B in path
        assert dtype == (jnp.float32 if trains else jnp.bfloat16), path


def test_lora_trains_under_bf16_compute_and_remat(tmp_path):
    # The adapters ride on forward.rebuild: bf16 compute with remat'd blocks still adds them,
    # so they train (their gradient is not zero) while the base stays frozen.
    import _tiny

    model = jaxtl.load(_tiny.make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    config = jaxtl.TrainConfig(
        batch_size=8, max_steps=3, learning_rate=1e-2, precision="bf16", remat="full"
    )
    result = jaxtl.finetune(model, "lora(2, alpha=4)", _tiny.small_vader(24, 8, 8), config,
                            verbose=False)  # fmt: skip
    before, after = flatten(result.model.params), flatten(result.params)
    moved = {p for p in after if not np.array_equal(np.asarray(after[p]), np.asarray(before[p]))}
    assert any(tl.LORA_B in p for p in moved) and any(tl.LORA_A in p for p in moved)
    assert all(p.startswith("classifier") or tl.LORA_A in p or tl.LORA_B in p for p in moved)
    assert all(np.asarray(after[p]).dtype == np.float32 for p in moved)


def test_lora_with_the_feature_cache_is_refused_with_the_reason(tmp_path):
    import _tiny

    model = jaxtl.load(_tiny.make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    config = jaxtl.TrainConfig(max_steps=1, feature_cache="memory")
    with pytest.raises(ValueError, match=r"feature_cache \(--feature-cache\).*adapters"):
        jaxtl.finetune(model, "lora(2)", _tiny.small_vader(24, 8, 8), config, verbose=False)
