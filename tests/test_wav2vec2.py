"""Parity of jaxtl's Flax wav2vec2 against transformers' PyTorch wav2vec2 (the reference).

Every numeric check compares with ``transformers.Wav2Vec2Model`` /
``Wav2Vec2ForSequenceClassification`` in eval mode, on tiny random checkpoints of both layouts:
``feat_extract_norm="group"`` with post-norm blocks (wav2vec2-base) and ``"layer"`` with pre-norm
blocks (``do_stable_layer_norm``, wav2vec2-large-lv60 / XLS-R).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from _tiny import fit, tiny_wav2vec2_config

import jaxtl
from jaxtl.models import wav2vec2
from jaxtl.models.common import recompute
from jaxtl.train.losses import mean_loss
from jaxtl.transfer.trees import flatten
from jaxtl.weights.loading import load

TOL = 1e-5  # float32 end to end; never loosened to make a test pass
NUM_LABELS = 3
SAMPLES = 400  # 24 frames through the tiny conv stack


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Adds N(0, 0.1) to every param, so no bias stays 0 and no norm stays 1/0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def waves(seed: int, batch: int = 2, samples: int = SAMPLES) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, samples)).astype(np.float32)


def padded(x: np.ndarray, valid: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch with its second example cut to ``valid`` samples and zero-padded after."""
    x = x.copy()
    mask = np.ones(x.shape, np.int32)
    x[1, valid:], mask[1, valid:] = 0.0, 0
    return x, mask


def max_diff(ours, theirs) -> float:
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    return float(np.max(np.abs(np.asarray(ours) - theirs)))


@pytest.fixture(scope="module", params=[False, True], ids=["post-norm", "stable"])
def reference(request, tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_wav2vec2_config(stable=request.param)
    model = perturbed(transformers.Wav2Vec2ForSequenceClassification(config))
    directory = tmp_path_factory.mktemp("wav2vec2-classifier")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def classifier(reference):
    return load(reference[1], num_labels=NUM_LABELS)


@pytest.mark.parametrize("valid", [None, 300], ids=["full", "padded"])
def test_hidden_states_and_logits_match_pytorch(reference, classifier, valid):
    torch_model, directory = reference
    model = classifier
    assert model.family == "wav2vec2"
    assert not model.report.initialized and not model.report.unexpected
    assert not model.report.mismatched
    x = waves(0)
    mask = None
    if valid is not None:
        x, mask = padded(x, valid)
    torch_kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
    with torch.no_grad():
        theirs_hidden = torch_model.wav2vec2(torch.from_numpy(x), **torch_kwargs).last_hidden_state
        theirs_logits = torch_model(torch.from_numpy(x), **torch_kwargs).logits
    batch = {"input_values": x} if mask is None else {"input_values": x, "attention_mask": mask}
    features = load(directory, task="features")
    ours_hidden = features.apply(features.params, batch)
    ours_logits = model.apply(model.params, batch)

    assert ours_hidden.shape == tuple(theirs_hidden.shape) == (2, 24, 32)
    if mask is not None:  # transformers' padded frames hold values nobody reads; compare the rest
        frames = np.asarray(wav2vec2.frame_mask(model.config, mask, 24))
        assert frames.sum(axis=1).tolist() == [24, 17]
        theirs_hidden = theirs_hidden.numpy()[frames]
        ours_hidden = np.asarray(ours_hidden)[frames]
    hidden_diff = max_diff(ours_hidden, theirs_hidden)
    logits_diff = max_diff(ours_logits, theirs_logits)
    print(f"wav2vec2 last hidden state max |diff| = {hidden_diff:.3g}, logits {logits_diff:.3g}")
    assert hidden_diff <= TOL
    assert ours_logits.shape == (2, NUM_LABELS) and logits_diff <= TOL


def test_structure_names_the_layout(classifier):
    s, c = classifier.structure, classifier.config
    assert s.blocks == ("wav2vec2/encoder/layers_0", "wav2vec2/encoder/layers_1")
    assert s.head == ("projector", "classifier")
    norm = "wav2vec2/encoder/layer_norm"
    # The post-norm encoder applies its LayerNorm before the blocks; the pre-norm one after.
    assert (norm in s.neck) == c.do_stable_layer_norm == (norm not in s.stem)
    kernel = classifier.params["wav2vec2"]["feature_extractor"]["conv_layers_0"]["conv"]["kernel"]
    assert kernel.shape == (8, 1, 8)  # [K, in, out]
    rules = dict(s.tensor_parallel)
    assert rules[r"wav2vec2/encoder/layers_\d+/attention/out_proj"] == "row"
    targets = [
        p
        for p in flatten(classifier.params)
        if any(re.search(t, p) for t in s.lora_targets) and p.endswith("kernel")
    ]
    assert sorted(targets) == [
        f"wav2vec2/encoder/layers_{i}/attention/{n}/kernel"
        for i in (0, 1)
        for n in ("q_proj", "v_proj")
    ]


def test_gradients_match_pytorch_with_and_without_remat(reference, classifier):
    """Every param's gradient of a loss on the logits of a padded batch equals transformers'
    (eval mode), also with every block recomputed (``remat="full"``). The reference's weight
    norm is removed first, so its positional kernel is one plain tensor with a gradient."""
    torch_model, _ = reference
    # A new instance, not a deepcopy: a copy shares the parametrized class, and removing the
    # weight norm from it would remove the reference's too.
    plain = transformers.Wav2Vec2ForSequenceClassification(torch_model.config)
    plain.load_state_dict(torch_model.state_dict())
    plain.eval()
    conv = plain.wav2vec2.encoder.pos_conv_embed.conv
    torch.nn.utils.parametrize.remove_parametrizations(conv, "weight")
    x, mask = padded(waves(7), 260)
    weights = np.random.default_rng(7).standard_normal((2, NUM_LABELS)).astype(np.float32)
    logits = plain(torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).logits
    (logits * torch.from_numpy(weights)).sum().backward()
    theirs = wav2vec2.convert_hf_checkpoint(
        {n: p.grad.numpy() for n, p in plain.named_parameters() if p.grad is not None}
    )
    batch = {"input_values": x, "attention_mask": mask}
    for model in (classifier, recompute(classifier, remat="full")):
        loss = lambda p, m=model: jnp.sum(m.apply(p, batch) * weights)  # noqa: E731
        ours = flatten(jax.grad(loss)(model.params))
        assert set(ours) == set(theirs)
        for path, value in ours.items():
            scale = max(1.0, float(np.max(np.abs(theirs[path]))))
            diff = float(np.max(np.abs(np.asarray(value) - theirs[path])))
            assert diff <= TOL * scale, (
                f"{path}: max |diff| {diff:.3g} (gradient up to {scale:.3g})"
            )


def test_dropping_the_top_block_matches_transformers_with_fewer_layers(reference):
    _, directory = reference
    model = load(directory, task="features", drop_blocks=1)
    assert model.structure.blocks == ("wav2vec2/encoder/layers_0",)
    assert any(p.startswith("wav2vec2/encoder/layers_1/") for p in model.report.unexpected)
    shorter = transformers.Wav2Vec2Model.from_pretrained(directory, num_hidden_layers=1).eval()
    x = waves(9)
    with torch.no_grad():
        theirs = shorter(torch.from_numpy(x)).last_hidden_state
    assert max_diff(model.apply(model.params, {"input_values": x}), theirs) <= TOL


def test_legacy_weight_norm_names_convert_to_the_same_kernel(reference):
    """Checkpoints saved before torch's parametrizations name the pair ``weight_g`` /
    ``weight_v``; both spellings fold to one kernel, and HF's own weight equals it."""
    torch_model, directory = reference
    on_disk = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    prefix = "wav2vec2.encoder.pos_conv_embed.conv."
    legacy = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in on_disk.items()
    }
    assert prefix + "weight_g" in legacy
    ours, theirs = wav2vec2.convert_hf_checkpoint(on_disk), wav2vec2.convert_hf_checkpoint(legacy)
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        weight = torch_model.wav2vec2.encoder.pos_conv_embed.conv.weight.numpy()
    kernel = ours["wav2vec2/encoder/pos_conv_embed/conv/kernel"]
    assert max_diff(kernel, weight.transpose(2, 1, 0)) <= 1e-6
    assert "wav2vec2.masked_spec_embed" in on_disk and not any("masked" in k for k in ours)


def test_export_round_trip_loads_in_transformers(classifier, tmp_path):
    model = classifier
    leaves, tree = jax.tree.flatten(model.params)
    rng = np.random.default_rng(3)
    params = jax.tree.unflatten(
        tree, [p + 0.05 * rng.standard_normal(p.shape).astype(np.float32) for p in leaves]
    )
    jaxtl.export(model, tmp_path, params)

    reloaded, info = transformers.Wav2Vec2ForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    # SpecAugment's fill vector is not jaxtl's to keep: transformers draws a fresh one.
    assert info["missing_keys"] <= {"wav2vec2.masked_spec_embed"}, info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    x, mask = padded(waves(4), 250)
    with torch.no_grad():
        theirs = reloaded.eval()(torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).logits
    diff = max_diff(model.apply(params, {"input_values": x, "attention_mask": mask}), theirs)
    print(f"exported wav2vec2 logits max |diff| after transformers reload = {diff:.3g}")
    assert diff <= TOL


def test_features_export_loads_as_wav2vec2_model(reference, tmp_path):
    _, directory = reference
    model = load(directory, task="features")
    jaxtl.export(model, tmp_path)
    reloaded, info = transformers.Wav2Vec2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] <= {"masked_spec_embed"}, info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = waves(5)
    with torch.no_grad():
        theirs = reloaded.eval()(torch.from_numpy(x)).last_hidden_state
    assert max_diff(model.apply(model.params, {"input_values": x}), theirs) <= TOL


def test_wav2vec2_model_checkpoint_loads_into_a_new_head(tmp_path):
    torch.manual_seed(1)
    transformers.Wav2Vec2Model(tiny_wav2vec2_config()).save_pretrained(tmp_path)
    model = load(tmp_path, num_labels=5)
    assert model.report.initialized == [
        "classifier/bias",
        "classifier/kernel",
        "projector/bias",
        "projector/kernel",
    ]
    assert not model.report.unexpected and not model.report.mismatched
    assert model.params["classifier"]["kernel"].shape == (12, 5)
    assert "tokenizer" not in model.extras or model.extras["tokenizer"] is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"use_weighted_layer_sum": True}, "use_weighted_layer_sum"),
        ({"feat_extract_norm": "batch"}, "feat_extract_norm"),
        ({"conv_stride": [4, 2]}, "one entry per conv"),
    ],
)
def test_unsupported_configs_raise_clear_errors(overrides, message):
    raw = {**tiny_wav2vec2_config().to_dict(), **overrides}
    with pytest.raises(ValueError, match=message):
        wav2vec2.Wav2Vec2Config.from_hf(raw)


def test_inputs_shorter_than_one_frame_are_refused(classifier):
    with pytest.raises(ValueError, match="at least 32 samples"):
        classifier.apply(classifier.params, {"input_values": waves(0, samples=31)})


def test_random_init_follows_transformers_rule(reference):
    """``pretrained=False`` initializes every param with transformers' rule for it."""
    _, directory = reference
    model = load(directory, num_labels=2, pretrained=False)
    flat = {p: np.asarray(v) for p, v in flatten(model.params).items()}
    c = model.config
    first = flat["wav2vec2/feature_extractor/conv_layers_0/conv/kernel"]  # Kaiming, fan in 8
    second = flat["wav2vec2/feature_extractor/conv_layers_1/conv/kernel"]  # fan in 8 * 3
    assert abs(first.std() - np.sqrt(2 / 8)) < 0.15 and abs(second.std() - np.sqrt(2 / 24)) < 0.05
    pos = flat["wav2vec2/encoder/pos_conv_embed/conv/kernel"]
    assert abs(pos.std() - 2 / np.sqrt(16 * 32)) < 0.01
    projection = flat["wav2vec2/feature_projection/projection/kernel"]
    assert np.abs(projection).max() <= 1 / np.sqrt(c.conv_dim[-1])
    q = flat["wav2vec2/encoder/layers_0/attention/q_proj/kernel"]
    assert abs(q.std() - c.initializer_range) < 0.005
    assert np.all(flat["wav2vec2/encoder/layer_norm/scale"] == 1)
    assert np.all(flat["classifier/bias"] == 0)
    logits = model.apply(model.params, {"input_values": waves(1)})
    assert np.all(np.isfinite(np.asarray(logits)))


def tones(seed: int, n: int = 64) -> dict:
    """Two classes of noisy sine waves, 8 and 24 cycles per 400 samples, random phases."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    t = np.arange(SAMPLES) / SAMPLES
    cycles = np.where(label, 24.0, 8.0)[:, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    x = np.sin(2 * np.pi * cycles * t + phase) + 0.1 * rng.standard_normal((n, SAMPLES))
    return {"input_values": x.astype(np.float32), "label": label}


def test_a_short_real_finetune_of_the_last_block_lowers_the_loss(reference):
    _, directory = reference
    model = load(directory, num_labels=2, ignore_mismatched="classifier/.*")  # new 2-class head
    plan = jaxtl.make_plan("last_n(1)", model.structure)
    config = jaxtl.TrainConfig(batch_size=16, max_steps=32, learning_rate=1e-2, progress=False)
    arrays = tones(0)
    params = fit(jaxtl.Trainer(model, plan, config), arrays).state.params

    def loss(params) -> float:
        logits = model.apply(params, {"input_values": arrays["input_values"]})
        return float(mean_loss(logits, arrays, "classification"))

    before, after = loss(model.params), loss(params)
    print(f"last_n(1): training loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.15
    start, end = flatten(model.params), flatten(params)
    moved = {p.rsplit("/", 1)[0] for p in end if not np.array_equal(end[p], start[p])}
    trained = ("wav2vec2/encoder/layers_1", *model.structure.neck, "projector", "classifier")
    assert moved and all(m.startswith(trained) for m in moved), moved


def test_the_command_line_asks_an_audio_model_for_a_wav_folder(reference, capsys):
    from jaxtl import cli

    _, directory = reference
    argv = ["finetune", "--model", str(directory), "--data", "vader", "--epochs", "1"]
    assert cli.main(argv) == 2
    assert "error: --data vader: an audio model reads a folder of WAV files" in (
        capsys.readouterr().err
    )
