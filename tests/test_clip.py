"""Parity of jaxtl's Flax CLIP against transformers' PyTorch CLIP (the independent reference).

Every numeric check compares with ``transformers.CLIPModel`` (or the ``...WithProjection``
classes) in eval mode on a tiny random checkpoint: image and text embeddings (padded text, both
end-of-text pooling rules), zero-shot logits against ``logits_per_image``, load reports, the
export round trip, a short linear probe, and the errors of a bad ``tower``.
"""

from __future__ import annotations

import functools
import re
import shutil

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from _tiny import fit

import jaxtl
from jaxtl.models import clip
from jaxtl.train.losses import mean_loss
from jaxtl.transfer.trees import flatten

TOL = 1e-5  # float32 end to end; never loosened to make a test pass
VOCAB, EOS, SIZE = 99, 50, 32


def tiny_clip_config(**text_overrides) -> transformers.CLIPConfig:
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        eos_token_id=EOS,
        bos_token_id=1,
        pad_token_id=0,
    )
    vision = dict(
        image_size=SIZE,
        patch_size=8,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=2,
    )
    return transformers.CLIPConfig(
        text_config=text | text_overrides, vision_config=vision, projection_dim=20
    )


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Adds N(0, 0.1) to every param, so no bias sits at 0 and no LayerNorm at 1/0 where a
    dropped or swapped tensor would go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def saved(path, config=None) -> tuple[transformers.CLIPModel, str]:
    torch.manual_seed(0)
    model = perturbed(transformers.CLIPModel(config or tiny_clip_config()))
    model.save_pretrained(path)
    return model, str(path)


def load(path, tower: str | None = None, **kwargs):
    """``jaxtl.load`` with CLIP's ``tower`` option."""
    return jaxtl.load(path, tower=tower, **kwargs)


def images(seed: int, batch: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, SIZE, SIZE, 3)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def texts(seed: int) -> dict[str, np.ndarray]:
    """A right-padded batch: random tokens (EOS excluded, ids up to VOCAB - 1, so the highest
    id is rarely at the end), then EOS, then pad 0."""
    rng = np.random.default_rng(seed)
    lengths = [12, 5, 8, 3]
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = rng.integers(3, VOCAB, n - 1)
        tokens[tokens == EOS] = EOS + 1
        ids[row, :n] = [*tokens, EOS]
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def max_diff(ours, theirs) -> float:
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    return float(np.max(np.abs(np.asarray(ours) - theirs)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return saved(tmp_path_factory.mktemp("clip"))


def test_image_embeds_match_pytorch_and_the_text_tower_is_reported_unexpected(reference):
    torch_model, directory = reference
    model = load(directory, task="features")
    assert model.family == "clip" and model.extras["tower"] == "vision"
    report = model.report
    assert not report.initialized and not report.mismatched
    unexpected = set(report.unexpected)
    assert "logit_scale" in unexpected
    assert all(
        p == "logit_scale" or p.startswith(("text_model/", "text_projection/")) for p in unexpected
    )
    assert unexpected >= {
        f"text_model/{p}"
        for p in flatten(load(directory, "text", task="features").params["text_model"])
    }
    x = images(0)
    with torch.no_grad():
        theirs = torch_model.get_image_features(pixel_values=nchw(x))
    theirs = getattr(theirs, "pooler_output", theirs)
    ours = model.apply(model.params, {"pixel_values": x})
    diff = max_diff(ours, theirs)
    print(f"CLIP image embeds max |diff| = {diff:.3g}")
    assert ours.shape == (3, 20) and diff <= TOL
    s = model.structure
    assert s.stem == ("vision_model/embeddings", "vision_model/pre_layrnorm")
    assert s.blocks == tuple(f"vision_model/encoder/layers_{i}" for i in range(3))
    assert s.neck == ("vision_model/post_layernorm", "visual_projection") and s.head == ()


@pytest.mark.parametrize("eos_token_id", [EOS, 2], ids=["first-eos", "legacy-argmax"])
def test_text_embeds_on_a_padded_batch_match_pytorch(tmp_path, eos_token_id):
    """Both of transformers' pooling rules: the first EOS, and with the legacy
    ``eos_token_id == 2`` the highest id (here mostly not the EOS, so the rules differ)."""
    torch_model, directory = saved(tmp_path, tiny_clip_config(eos_token_id=eos_token_id))
    batch = texts(1)
    legacy = batch["input_ids"].argmax(-1)
    first = (batch["input_ids"] == EOS).argmax(-1)
    assert np.any(legacy != first)  # the batch tells the rules apart
    model = load(directory, "text", task="features")
    assert model.extras["tower"] == "text" and "preprocessing" not in model.extras
    assert set(model.report.unexpected) >= {"logit_scale", "visual_projection/kernel"}
    assert not model.report.initialized
    with torch.no_grad():
        theirs = torch_model.get_text_features(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
        )
    theirs = getattr(theirs, "pooler_output", theirs)
    ours = model.apply(model.params, batch)
    diff = max_diff(ours, theirs)
    print(f"CLIP text embeds (eos_token_id={eos_token_id}) max |diff| = {diff:.3g}")
    assert ours.shape == (4, 20) and diff <= TOL


def test_zero_shot_logits_equal_logits_per_image(reference):
    torch_model, directory = reference
    prompts = {k: v[:3] for k, v in texts(2).items()}  # three classes
    model = clip.zero_shot_classifier(directory, prompts)
    assert model.task == "classification" and model.num_labels == 3
    x = images(3, batch=4)
    with torch.no_grad():
        theirs = torch_model(
            input_ids=torch.from_numpy(prompts["input_ids"]),
            attention_mask=torch.from_numpy(prompts["attention_mask"]),
            pixel_values=nchw(x),
        ).logits_per_image
    ours = np.asarray(model.apply(model.params, {"pixel_values": x}))
    scale = float(np.exp(torch_model.logit_scale.item()))
    diff = max_diff(ours, theirs)
    print(f"CLIP zero-shot logits max |diff| = {diff:.3g} (logit scale {scale:.3g})")
    assert ours.shape == (4, 3)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=TOL, atol=TOL)
    assert not model.extras["zero_shot"].initialized
    with pytest.raises(ValueError, match="one prompt per class"):
        clip.zero_shot_classifier(directory, {"input_ids": np.zeros((0, 4), np.int32)})


def test_classification_heads_report_only_the_classifier_as_new(reference):
    _, directory = reference
    for tower in ("vision", "text"):
        model = load(directory, tower, num_labels=5)
        assert model.report.initialized == ["classifier/bias", "classifier/kernel"]
        assert model.params["classifier"]["kernel"].shape == (20, 5)
        assert model.structure.head == ("classifier",)
    with pytest.raises(ValueError, match="has no transformers class"):
        jaxtl.export(model, directory + "-never")


def test_a_run_records_its_tower_and_rebuilds_it(reference):
    """run.json's model facts keep the tower, so evaluate/export rebuild the same model."""
    from jaxtl import surgery
    from jaxtl.run import load_recorded

    _, directory = reference
    text = load(directory, "text", num_labels=3)
    facts = {"path": directory, "task": "classification", "num_labels": 3}
    facts.update(surgery.recorded(text))
    assert facts["tower"] == "text"
    rebuilt = load_recorded(facts)
    assert rebuilt.extras["tower"] == "text"
    assert jax.tree.map(np.shape, rebuilt.params) == jax.tree.map(np.shape, text.params)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_features_export_loads_in_transformers(reference, tmp_path, tower):
    _, directory = reference
    model = load(directory, tower, task="features")
    leaves, tree = jax.tree.flatten(model.params)
    rng = np.random.default_rng(4)
    params = jax.tree.unflatten(
        tree, [p + 0.05 * rng.standard_normal(p.shape).astype(np.float32) for p in leaves]
    )
    jaxtl.export(model, tmp_path, params)
    if tower == "vision":
        cls, batch = transformers.CLIPVisionModelWithProjection, {"pixel_values": images(5)}
        inputs = {"pixel_values": nchw(batch["pixel_values"])}
    else:
        cls, batch = transformers.CLIPTextModelWithProjection, texts(6)
        inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    reloaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    with torch.no_grad():
        out = reloaded.eval()(**inputs)
    theirs = out.image_embeds if tower == "vision" else out.text_embeds
    diff = max_diff(model.apply(params, batch), theirs)
    print(f"exported CLIP {tower} embeds max |diff| after transformers reload = {diff:.3g}")
    assert diff <= TOL
    again = load(tmp_path, tower, task="features")  # and jaxtl reads its own export
    assert not again.report.unexpected and not again.report.initialized
    np.testing.assert_array_equal(again.apply(again.params, batch), model.apply(params, batch))
    # The names are CLIPModel's: it reads the tower (the other one is what it misses).
    _, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    other = "text" if tower == "vision" else "vision"
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert info["missing_keys"] and all(
        k.startswith((f"{other}_model.", clip.PROJECTION[other], "logit_scale"))
        for k in info["missing_keys"]
    )


def tinted(seed: int, n: int = 64) -> dict[str, np.ndarray]:
    """Noise images labelled by their tint (red over blue: 1, blue over red: 0)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    x = rng.standard_normal((n, SIZE, SIZE, 3)).astype(np.float32)
    tint = np.where(label[:, None], 1.0, -1.0) * np.array([0.5, 0.0, -0.5])
    return {"pixel_values": x + tint[:, None, None, :].astype(np.float32), "label": label}


def test_a_linear_probe_on_the_vision_tower_lowers_the_loss(reference):
    _, directory = reference
    model = load(directory, num_labels=2)
    plan = jaxtl.make_plan("linear_probe", model.structure)
    config = jaxtl.TrainConfig(batch_size=16, max_steps=32, learning_rate=1e-2, progress=False)
    arrays = tinted(0)
    params = fit(jaxtl.Trainer(model, plan, config), arrays).state.params

    def loss(params) -> float:
        logits = model.apply(params, {"pixel_values": arrays["pixel_values"]})
        return float(mean_loss(logits, arrays, "classification"))

    before, after = loss(model.params), loss(params)
    print(f"linear_probe: training loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.15
    start, end = flatten(model.params), flatten(params)
    moved = {p for p in end if not np.array_equal(end[p], start[p])}
    assert moved == {"classifier/bias", "classifier/kernel"}


def test_tensor_parallel_and_lora_targets_name_the_towers_layers(reference):
    _, directory = reference
    model = load(directory, "text", task="features")
    rules = dict(model.structure.tensor_parallel)
    layer = "text_model/encoder/layers_1"

    def kind(path):
        return [k for pattern, k in rules.items() if re.fullmatch(pattern, path)]

    for name in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "mlp/fc1"):
        assert kind(f"{layer}/{name}") == ["column"]
    for name in ("self_attn/out_proj", "mlp/fc2"):
        assert kind(f"{layer}/{name}") == ["row"]
    (target,) = model.structure.lora_targets
    assert re.fullmatch(target, f"{layer}/self_attn/v_proj")
    assert not re.fullmatch(target, f"{layer}/self_attn/k_proj")


@pytest.mark.parametrize("tower", ["audio", "Vision", ""])
def test_a_bad_tower_raises_a_clear_error(reference, tower):
    _, directory = reference
    with pytest.raises(ValueError, match=r"is not a CLIP tower; expected one of \('vision'"):
        load(directory, tower, task="features")


def test_random_init_follows_transformers_rule(reference):
    _, directory = reference
    model = load(directory, num_labels=2, pretrained=False, seed=3)
    layer = model.params["vision_model"]["encoder"]["layers_0"]
    assert np.all(np.asarray(layer["layer_norm1"]["scale"]) == 1)
    assert np.all(np.asarray(layer["self_attn"]["q_proj"]["bias"]) == 0)
    q = np.asarray(layer["self_attn"]["q_proj"]["kernel"])
    expected = 24**-0.5 * (2 * 3) ** -0.5
    assert 0.7 * expected < q.std() < 1.3 * expected


def test_zero_shot_prompts_as_strings_use_the_checkpoints_tokenizer(reference, tmp_path):
    """Strings go through tokenizer.json (padded per batch); they give the logits of the same
    prompts given as token ids."""
    _, directory = reference
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{directory}/{name}", tmp_path / name)
    vocab = {"<pad>": 0, "<bos>": 1, "a": 5, "b": 6, "c": 7, "<eos>": EOS}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", EOS)]
    )
    tok.save(str(tmp_path / "tokenizer.json"))

    from_strings = clip.zero_shot_classifier(tmp_path, ["a b c", "c"])
    ids = np.array([[1, 5, 6, 7, EOS], [1, 7, EOS, 0, 0]])
    from_ids = clip.zero_shot_classifier(
        tmp_path, {"input_ids": ids, "attention_mask": (np.arange(5) < [[5], [3]]).astype(int)}
    )
    x = images(7)
    ours = from_strings.apply(from_strings.params, {"pixel_values": x})
    np.testing.assert_array_equal(ours, from_ids.apply(from_ids.params, {"pixel_values": x}))
    with pytest.raises(ValueError, match="one per class, not one string"):
        clip.zero_shot_classifier(tmp_path, "a b c")


def test_remat_keeps_the_text_towers_outputs_and_gradients(reference):
    from jaxtl.models.common import recompute

    _, directory = reference
    model = load(directory, "text", num_labels=2)
    again = recompute(model, remat="full")
    batch = texts(8)

    def loss(m, params):
        return m.forward(params, {}, batch, train=True, rng=jax.random.key(0))[0].sum()

    np.testing.assert_allclose(
        again.apply(model.params, batch), model.apply(model.params, batch), rtol=0, atol=1e-6
    )
    ours, theirs = (
        flatten(jax.grad(functools.partial(loss, m))(model.params)) for m in (again, model)
    )
    assert all(np.allclose(ours[p], theirs[p], rtol=1e-5, atol=1e-6) for p in ours)


def test_default_preprocessing_matches_clip_image_processor(reference):
    """No preprocessor_config.json: CLIP's defaults at the config's image size, compared with
    transformers' PIL backend (``CLIPImageProcessor`` itself needs torchvision)."""
    _, directory = reference
    recipe = load(directory, task="features").extras["preprocessing"]
    assert recipe.size == (SIZE, SIZE) and recipe.mean == clip.CLIP_MEAN
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    )
    image = np.random.default_rng(9).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    theirs = processor(images=[image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    diff = max_diff(recipe(image[None]), theirs)
    print(f"CLIP preprocessing (resize + center crop) max |diff| = {diff:.3g}")
    assert diff <= TOL


def test_the_command_line_fine_tunes_the_text_tower_and_refuses_tower_elsewhere(
    reference, tmp_path, capsys
):
    """--tower text: the text tower trains on texts through the checkpoint's tokenizer, and
    run.json records the tower so that jaxtl evaluate rebuilds the same model."""
    import json
    import os

    from _tiny import minilm_dir, write_vader_csv

    from jaxtl import cli

    _, directory = reference
    ckpt = tmp_path / "clip"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{directory}/{name}", ckpt / name)
    words = {"<pad>": 0, "<bos>": 1, "<eos>": EOS}
    vocab = {**words, **{chr(97 + i): 3 + i for i in range(26)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")  # one token a letter
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", EOS)]
    )
    tok.save(str(ckpt / "tokenizer.json"))
    data = write_vader_csv(tmp_path / "vader.csv", 60)
    out = str(tmp_path / "out")
    argv = ["finetune", "--model", str(ckpt), "--tower", "text", "--data", data,
            "--text-column", "word", "--label-column", "sentiment",
            "--recipe", "full", "--no-scratch", "--max-steps", "3", "--batch-size", "8",
            "--out", out]  # fmt: skip
    assert cli.main(argv) == 0
    run = os.path.join(out, "pretrained-full")
    with open(os.path.join(run, "run.json")) as f:
        assert json.load(f)["model"]["tower"] == "text"
    assert cli.main(["evaluate", run]) == 0
    capsys.readouterr()
    bert = ["finetune", "--model", minilm_dir(), "--tower", "text", "--out", str(tmp_path / "b")]
    assert cli.main(bert) == 2
    assert "tower (--tower) does not apply to the 'bert' family" in capsys.readouterr().err
