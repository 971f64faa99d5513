"""Llama-style decoders (Llama, Mistral, Qwen2) against transformers' PyTorch models (the
independent reference): forward, loss and gradient parity, load reports, export round trips,
greedy generation with and without the KV cache, fine-tuning, and config errors."""

from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _tiny import fit, perturbed, read_json
from jax.sharding import PartitionSpec as P
from test_generation import NEW, _hf_greedy, _prompts
from test_gpt2 import PAD, causal_lm_loss, max_diff_real, random_batch, torch_inputs

import jaxtl
from jaxtl import sharding
from jaxtl.generation import generate
from jaxtl.models.common import recompute
from jaxtl.models.llama import LlamaConfig, convert_hf_checkpoint, inverse_frequencies
from jaxtl.train import Trainer
from jaxtl.transfer.trees import flatten

TOL = 1e-5  # float32 end to end; never loosened to make a test pass

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# name -> (config class, overrides): every option the family reads, on tiny sizes.
CASES = {
    "llama_gqa": ("llama", {}),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_rope_linear": (
        "llama",
        dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    ),
    # head_dim 16 (not 32 / 4): with these wavelengths llama3 keeps, smooths and divides.
    "llama_rope_llama3_head_dim": ("llama", dict(rope_parameters=LLAMA3, head_dim=16)),
    "llama_biases_mha": (
        "llama",
        dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4, attention_dropout=0.1),
    ),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_sliding": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "mistral_sliding": ("mistral", dict(sliding_window=4)),
}
CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
}
CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def tiny_config(variant: str = "llama", **overrides):
    """A small transformers config of ``variant``: 32 wide, 2 layers, 4 query heads sharing 2
    key/value heads, an MLP of 37, and no special tokens outside the vocab of 99."""
    kwargs = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=99,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    # transformers fills rope_parameters in place: each config gets its own copy.
    return CONFIGS[variant](**{**kwargs, **copy.deepcopy(overrides)})


def reference(variant: str, kind: str, path=None, seed: int = 0, **overrides):
    """A tiny random transformers model (``kind``: ``Model``, ``ForCausalLM``,
    ``ForSequenceClassification``) with every param moved off its init (biases and norm
    scales included, so a misplaced one shows), saved to ``path``."""
    torch.manual_seed(seed)
    config = tiny_config(variant, **overrides)
    model = getattr(transformers, CLASSES[variant] + kind)(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    if path is not None:
        model.save_pretrained(path)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_hidden_states_match_pytorch(tmp_path, case):
    variant, overrides = CASES[case]
    torch_lm = reference(variant, "ForCausalLM", tmp_path, **overrides)
    batch = random_batch(length=11)  # right-padded rows of 11, 7 and 3 tokens

    lm = jaxtl.load(tmp_path, task="causal_lm")
    assert lm.family == "llama" and lm.config.variant == variant
    assert not lm.report.initialized and not lm.report.unexpected
    with torch.no_grad():
        theirs = torch_lm(**torch_inputs(batch))
        hidden = torch_lm.model(**torch_inputs(batch)).last_hidden_state
    ours = lm.apply(lm.params, batch)
    assert ours.shape == tuple(theirs.logits.shape) == (3, 11, 99)
    diff = max_diff_real(ours, theirs.logits, batch["attention_mask"])
    print(f"{case}: logits max |diff| on real tokens = {diff:.3g}")
    assert diff <= TOL

    features = jaxtl.load(tmp_path, task="features")
    tied = overrides.get("tie_word_embeddings", False)
    assert features.report.unexpected == ([] if tied else ["lm_head/kernel"])
    ours = features.apply(features.params, batch)
    diff = max_diff_real(ours, hidden, batch["attention_mask"])
    print(f"{case}: last hidden state max |diff| on real tokens = {diff:.3g}")
    assert diff <= TOL


def test_sliding_window_masks_what_it_should():
    # The window matters here (4 < 11 tokens), so parity above covers it; check it is there.
    config = LlamaConfig.from_hf(tiny_config("mistral", sliding_window=4).to_dict())
    assert config.sliding_windows == (4, 4)
    qwen = tiny_config("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert LlamaConfig.from_hf(qwen.to_dict()).sliding_windows == (None, 4)
    assert (
        LlamaConfig.from_hf(tiny_config("qwen2", sliding_window=4).to_dict()).sliding_windows == ()
    )


@pytest.mark.parametrize("rope", [LLAMA3, {"rope_type": "linear", "factor": 3.0}])
def test_rotary_frequencies_equal_transformers_bitwise(rope):
    hf = tiny_config(rope_parameters={**rope, "rope_theta": 1000.0}, head_dim=16)
    theirs = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf).inv_freq.numpy()
    np.testing.assert_array_equal(inverse_frequencies(LlamaConfig.from_hf(hf.to_dict())), theirs)
    # transformers v4's config.json keys: rope_theta beside rope_scaling, "type" for the type.
    old = {**hf.to_dict(), "rope_theta": 1000.0}
    old["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in rope.items()}
    del old["rope_parameters"]
    np.testing.assert_array_equal(inverse_frequencies(LlamaConfig.from_hf(old)), theirs)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_causal_lm_loss_and_gradients_match_pytorch_on_a_padded_batch(tmp_path, tied):
    torch_lm = reference("llama", "ForCausalLM", tmp_path, seed=3, tie_word_embeddings=tied)
    model = jaxtl.load(tmp_path, task="causal_lm")
    batch = random_batch(seed=4)
    mask = batch["attention_mask"]

    def loss_fn(params):
        return causal_lm_loss(model.apply(params, batch), batch["input_ids"], mask)

    loss, grads = jax.value_and_grad(loss_fn)(model.params)
    labels = torch.from_numpy(np.where(mask == 1, batch["input_ids"], -100))
    their_loss = torch_lm(**torch_inputs(batch), labels=labels).loss
    their_loss.backward()
    theirs = float(their_loss.detach())
    print(f"padded causal LM loss: jaxtl {float(loss):.7f} transformers {theirs:.7f}")
    assert abs(float(loss) - theirs) <= TOL

    their_grads = convert_hf_checkpoint(
        {n: p.grad.numpy() for n, p in torch_lm.named_parameters()}, tied=tied
    )
    ours = flatten(grads)
    assert set(ours) == set(their_grads)
    assert ("lm_head/kernel" in ours) == (not tied)
    for path, value in ours.items():
        scale = max(1.0, float(np.max(np.abs(their_grads[path]))))
        diff = float(np.max(np.abs(np.asarray(value) - their_grads[path])))
        assert diff <= TOL * scale, f"{path}: max |diff| {diff:.3g} (largest gradient {scale:.3g})"


def test_sequence_classification_checkpoint_loads_with_its_head_and_matches(tmp_path):
    torch_cls = reference(
        "llama", "ForSequenceClassification", tmp_path, seed=2, num_labels=3, pad_token_id=PAD
    )
    batch = random_batch(seed=2)
    model = jaxtl.load(tmp_path, task="classification", num_labels=3)
    assert model.structure.head == ("score",)
    assert "score/kernel" in model.report.loaded
    assert not model.report.initialized and not model.report.unexpected
    assert "score/bias" not in flatten(model.params)
    with torch.no_grad():
        theirs = torch_cls(**torch_inputs(batch)).logits.numpy()
    ours = np.asarray(model.apply(model.params, batch))
    assert ours.shape == theirs.shape == (3, 3)
    diff = float(np.abs(ours - theirs).max())
    print(f"LlamaForSequenceClassification logits max |diff| = {diff:.3g}")
    assert diff <= TOL

    features = jaxtl.load(tmp_path, task="features")
    assert features.report.unexpected == ["score/kernel"] and not features.report.initialized


@pytest.mark.parametrize(
    "kind,tied,task,new,unused",
    [
        ("Model", False, "classification", ["score/kernel"], []),
        ("Model", False, "causal_lm", ["lm_head/kernel"], []),
        ("Model", True, "causal_lm", [], []),
        ("ForCausalLM", False, "classification", ["score/kernel"], ["lm_head/kernel"]),
        ("ForCausalLM", True, "classification", ["score/kernel"], []),
    ],
)
def test_checkpoints_with_and_without_a_head_report_only_what_is_new(
    tmp_path, kind, tied, task, new, unused
):
    reference("llama", kind, tmp_path, tie_word_embeddings=tied)
    model = jaxtl.load(tmp_path, task=task, num_labels=4)
    print(model.report.table())
    assert model.report.initialized == new
    assert model.report.unexpected == unused
    assert not model.report.mismatched
    assert all(any(p.startswith(h) for h in model.structure.head) for p in new)
    shape = (3, 4) if task == "classification" else (3, 11, 99)
    assert model.apply(model.params, random_batch(seed=6)).shape == shape


def test_scratch_init_follows_transformers_init_weights(tmp_path):
    reference("llama", "Model", tmp_path, pad_token_id=PAD, initializer_range=0.1)
    model = jaxtl.load(tmp_path, task="causal_lm", pretrained=False, seed=1)
    params = flatten(model.params)
    embedding = np.asarray(params["model/embed_tokens/embedding"])
    assert not embedding[PAD].any() and embedding[1:].std() == pytest.approx(0.1, rel=0.1)
    assert np.asarray(params["lm_head/kernel"]).std() == pytest.approx(0.1, rel=0.1)
    for path, value in params.items():
        if path.endswith("/scale"):
            np.testing.assert_array_equal(value, 1.0)


def test_converter_accepts_both_prefixes_and_drops_buffers_and_the_tied_head():
    linear = np.arange(12, dtype=np.float32).reshape(3, 4)  # nn.Linear (out, in): transposed
    bare = {
        "layers.0.self_attn.q_proj.weight": linear,
        "layers.0.self_attn.q_proj.bias": np.ones(3, np.float32),
        "layers.0.self_attn.rotary_emb.inv_freq": np.ones(2, np.float32),
        "layers.0.input_layernorm.weight": np.ones(4, np.float32),
        "norm.weight": np.ones(4, np.float32),
        "embed_tokens.weight": np.zeros((9, 4), np.float32),
    }
    prefixed = {f"model.{k}": v for k, v in bare.items()}
    prefixed["lm_head.weight"] = np.zeros((9, 4), np.float32)
    prefixed["score.weight"] = np.zeros((3, 4), np.float32)
    want = {
        "model/layers_0/self_attn/q_proj/kernel",
        "model/layers_0/self_attn/q_proj/bias",
        "model/layers_0/input_layernorm/scale",
        "model/norm/scale",
        "model/embed_tokens/embedding",
    }

    assert set(convert_hf_checkpoint(bare)) == want
    untied = convert_hf_checkpoint(prefixed)
    assert set(untied) == want | {"score/kernel", "lm_head/kernel"}
    np.testing.assert_array_equal(untied["model/layers_0/self_attn/q_proj/kernel"], linear.T)
    assert untied["lm_head/kernel"].shape == (4, 9) and untied["score/kernel"].shape == (4, 3)
    assert set(convert_hf_checkpoint(prefixed, tied=True)) == want | {"score/kernel"}
    with pytest.raises(ValueError, match="twice"):
        convert_hf_checkpoint({**bare, **prefixed})


@pytest.mark.parametrize(
    "task,tied,cls",
    [
        ("causal_lm", False, "LlamaForCausalLM"),
        ("causal_lm", True, "LlamaForCausalLM"),
        ("classification", False, "LlamaForSequenceClassification"),
        ("causal_lm", True, "Qwen2ForCausalLM"),
    ],
)
def test_export_round_trip_loads_in_transformers_with_the_same_logits(tmp_path, task, tied, cls):
    variant = "qwen2" if cls.startswith("Qwen2") else "llama"
    reference(variant, "Model", tmp_path / "src", tie_word_embeddings=tied, pad_token_id=PAD)
    model = jaxtl.load(tmp_path / "src", task=task, num_labels=4)
    tuned = perturbed(model.params)
    out = jaxtl.export(model, tmp_path / "out", tuned)
    assert read_json(os.path.join(out, "config.json"))["architectures"] == [cls]
    torch_model = getattr(transformers, cls).from_pretrained(out).eval()
    if tied:
        assert (
            torch_model.lm_head.weight.data_ptr()
            == torch_model.model.embed_tokens.weight.data_ptr()
        )
    batch = random_batch(seed=7)
    with torch.no_grad():
        theirs = torch_model(**torch_inputs(batch)).logits.numpy()
    ours = np.asarray(model.apply(tuned, batch))
    real = batch["attention_mask"].astype(bool) if task == "causal_lm" else slice(None)
    diff = float(np.abs(ours - theirs)[real].max())
    print(f"{cls} (tied={tied}) export round trip max |diff| = {diff:.3g}")
    assert diff <= TOL

    again = jaxtl.load(out, task=task, num_labels=4)
    assert again.report.initialized == [] and again.report.unexpected == []
    for path, value in flatten(again.params).items():
        np.testing.assert_array_equal(np.asarray(value), flatten(tuned)[path])


def _generator(path, variant="llama", eos=None, **overrides):
    """A tiny LM with weights large enough (initializer_range 0.3) that greedy text is not one
    repeated token, saved for jaxtl to load."""
    torch.manual_seed(4)
    config = tiny_config(variant, initializer_range=0.3, eos_token_id=eos, **overrides)
    model = getattr(transformers, CLASSES[variant] + "ForCausalLM")(config).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize(
    "variant,overrides,use_cache",
    [
        ("llama", {}, True),
        ("llama", {}, False),
        ("mistral", dict(sliding_window=4, tie_word_embeddings=True), True),
        ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1), True),
    ],
    ids=["llama-kv_cache", "llama-no_cache", "mistral_sliding-kv_cache", "qwen2-kv_cache"],
)
def test_greedy_tokens_equal_transformers_on_a_left_padded_batch(
    tmp_path, variant, overrides, use_cache
):
    torch_lm = _generator(tmp_path, variant, **overrides)
    ids, mask = _prompts()  # 7, 4 and 2 tokens, left-padded to 7
    theirs = _hf_greedy(torch_lm, ids, mask)
    assert len(set(theirs[0, 7:].tolist())) > 3  # the check covers more than a repeated token

    model = jaxtl.load(tmp_path, task="causal_lm")
    ours = generate(
        model, None, ids, mask, max_new_tokens=NEW, pad_token_id=PAD, use_cache=use_cache
    )
    np.testing.assert_array_equal(ours, theirs)


def test_rows_stop_at_the_configs_eos_like_transformers(tmp_path):
    ids, mask = _prompts()
    free = _hf_greedy(_generator(tmp_path), ids, mask)
    eos = int(free[0, 7 + 3])  # row 0 ends at its 4th new token; the others when they meet it
    theirs = _hf_greedy(_generator(tmp_path, eos=eos), ids, mask, eos=eos)

    model = jaxtl.load(tmp_path, task="causal_lm")
    assert model.extras["decoder"].eos_token_id == eos
    ours = generate(model, None, ids, mask, max_new_tokens=NEW, pad_token_id=PAD)
    width = theirs.shape[1]  # transformers stops when every row has ended
    np.testing.assert_array_equal(ours[:, :width], theirs)
    assert (ours[:, width:] == PAD).all()
    assert (ours[0, 7 + 4 :] == PAD).all() and ours[0, 7 + 3] == eos


def _padded_set(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` rows of random ids with trailing padding of varied lengths (>= 2 real tokens)."""
    rng = np.random.default_rng(seed)
    length = 10
    real = rng.integers(2, length + 1, size=n)
    mask = (np.arange(length)[None, :] < real[:, None]).astype(np.int32)
    ids = rng.integers(1, 99, size=(n, length)).astype(np.int32)
    return {"input_ids": np.where(mask == 1, ids, PAD), "attention_mask": mask}


@pytest.mark.parametrize("recipe", ["lora(4)", "full"])
def test_fine_tuning_reduces_the_loss_and_a_lora_model_still_generates(tmp_path, recipe):
    reference("llama", "ForCausalLM", tmp_path, seed=5)
    model = jaxtl.load(tmp_path, task="causal_lm")
    data = _padded_set(8, seed=6)
    plan = jaxtl.make_plan(recipe, model.structure)
    if plan.adapters is not None:
        model = jaxtl.lora.adapt(model, plan)
        adapted = {p for p in flatten(model.params) if "lora_" in p}
        assert {p.rsplit("/", 2)[1] for p in adapted} == {"q_proj", "v_proj"}
    config = jaxtl.TrainConfig(
        max_steps=30, batch_size=4, learning_rate=1e-2, schedule="constant", progress=False
    )
    result = fit(Trainer(model, plan, config), data)

    def loss(params):
        logits = model.apply(params, data)
        return float(causal_lm_loss(logits, data["input_ids"], data["attention_mask"]))

    before, after = loss(model.params), loss(result.state.params)
    print(f"{recipe}: training-set LM loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before

    params = jax.device_get(result.state.params)
    ids, mask = _prompts()
    out = generate(model, params, ids[:1], mask[:1], max_new_tokens=6)
    # Greedy: each new token is the argmax of the (adapted) forward on the text before it;
    # generate decodes a LoRA model with its adapters merged into the kernels.
    logits = np.asarray(model.apply(params, {"input_ids": out}))[0]
    np.testing.assert_array_equal(out[0, 7:], logits[6:-1].argmax(-1))


def _write_config(path, **changes):
    reference("llama", "Model", path)
    config = read_json(os.path.join(path, "config.json"))
    config.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def test_bad_configs_are_refused_with_what_to_fix(tmp_path):
    _write_config(tmp_path, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match=r"rope_scaling type 'yarn' is not supported"):
        jaxtl.load(tmp_path, task="causal_lm")

    base = tiny_config().to_dict()
    with pytest.raises(ValueError, match=r"rope_scaling type 'dynamic' is not supported"):
        LlamaConfig.from_hf({**base, "rope_parameters": None, "rope_scaling": {"type": "dynamic"}})
    with pytest.raises(ValueError, match=r"type 'llama3' needs \['low_freq_factor'"):
        LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(
        ValueError, match="hidden_size=30 is not a multiple of num_attention_heads=4"
    ):
        LlamaConfig.from_hf({**base, "hidden_size": 30, "head_dim": None})
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of num_key_va"):
        LlamaConfig.from_hf({**base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="hidden_act='relu2' is not supported"):
        LlamaConfig.from_hf({**base, "hidden_act": "relu2"})
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5 is not supported"):
        LlamaConfig.from_hf({**base, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="sliding_window=0 must be a positive integer"):
        LlamaConfig.from_hf({**tiny_config("mistral").to_dict(), "sliding_window": 0})
    with pytest.raises(ValueError, match="head size 7 is odd"):
        LlamaConfig.from_hf({**base, "head_dim": 7})
    # head_dim given: hidden_size need not divide (q_proj maps 32 -> 4 * 12).
    assert LlamaConfig.from_hf({**base, "head_dim": 12}).head_size == 12

    lm = jaxtl.load(_generated(tmp_path / "ok"), task="causal_lm")
    with pytest.raises(ValueError, match="pooling='mean' is not supported for llama"):
        jaxtl.load(tmp_path / "ok", pooling="mean")
    features = jaxtl.load(tmp_path / "ok", task="features")
    with pytest.raises(ValueError, match="task='causal_lm'"):
        generate(features, None, [[5, 6]], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        generate(lm, None, [[5, 6]], max_new_tokens=63)


def _generated(path):
    reference("llama", "ForCausalLM", path)
    return path


def test_eos_lists_bf16_compute_and_remat(tmp_path):
    # Llama 3 lists several eos ids; the config stays hashable (generate's jit key).
    reference("llama", "ForCausalLM", tmp_path, eos_token_id=[7, 8])
    model = jaxtl.load(tmp_path, task="causal_lm")
    assert model.extras["decoder"].eos_token_id == (7, 8)
    hash(model.config)
    batch = random_batch(seed=8)
    bf16 = recompute(model, dtype=jnp.bfloat16)
    logits = np.asarray(bf16.apply(bf16.params, batch), np.float32)
    assert np.isfinite(logits).all()
    assert np.abs(logits - np.asarray(model.apply(model.params, batch))).max() < 0.1

    # Remat repeats the same float32 ops (tolerances of test_precision.py's remat check).
    def grads(m):
        return jax.grad(
            lambda p: causal_lm_loss(m.apply(p, batch), batch["input_ids"], batch["attention_mask"])
        )(m.params)

    plain, rematted = grads(model), grads(recompute(model, remat="full"))
    for g, r in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted), strict=True):
        np.testing.assert_allclose(r, g, rtol=1e-5, atol=1e-7)


def test_tensor_parallel_layout_and_dropped_blocks(tmp_path):
    reference("qwen2", "ForCausalLM", tmp_path, intermediate_size=36, **CASES["qwen2_sliding"][1])
    model = jaxtl.load(tmp_path, task="causal_lm")
    specs = flatten(sharding.param_specs(model.params, {"tensor": 2}, structure=model.structure))
    column, row = P("fsdp", "tensor"), P("tensor", "fsdp")
    layer = "model/layers_1"
    for name, spec in [("self_attn/q_proj", column), ("self_attn/k_proj", column)]:
        assert specs[f"{layer}/{name}/kernel"] == spec and specs[f"{layer}/{name}/bias"] == P(
            "tensor"
        )
    assert specs[f"{layer}/self_attn/o_proj/kernel"] == row
    assert specs[f"{layer}/mlp/gate_proj/kernel"] == specs[f"{layer}/mlp/up_proj/kernel"] == column
    assert specs[f"{layer}/mlp/down_proj/kernel"] == row

    shallow = jaxtl.load(tmp_path, task="causal_lm", drop_blocks=1)
    assert shallow.config.num_hidden_layers == 1 and shallow.config.sliding_windows == (None,)
    assert shallow.report.unexpected and all(
        p.startswith("model/layers_1/") for p in shallow.report.unexpected
    )
