"""Memory tools inside the step: rematerialized blocks and bf16 mixed precision.

Remat must not change the math: each family's rematerialized blocks give the gradients of the
plain step (dropout on, so the masks must be drawn the same). bf16 must keep what the precision
policy promises in float32 (master params, optimizer state, gradients) and train like float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import make_tiny_bert, small_vader

import jaxtl
from jaxtl import parallel
from jaxtl.encoding import encode_splits
from jaxtl.models.common import recompute
from jaxtl.train import precision, steps


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    import transformers

    base = tmp_path_factory.mktemp("remat-models")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=32,
            bos_token_id=None, eos_token_id=None,
        )
    )  # fmt: skip
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, num_labels=3,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        )
    )  # fmt: skip
    gpt2.save_pretrained(base / "gpt2")
    vit.save_pretrained(base / "vit")
    return {
        "bert": (make_tiny_bert(str(base / "bert"), dropout=0.1), {"num_labels": 2}),
        "gpt2": (str(base / "gpt2"), {"task": "causal_lm"}),
        "vit": (str(base / "vit"), {"num_labels": 3}),
    }


def _batch(family: str):
    rng = np.random.default_rng(0)
    if family == "vit":
        return {
            "pixel_values": rng.standard_normal((4, 32, 32, 3)).astype(np.float32),
            "label": np.array([0, 1, 2, 1], np.int32),
        }
    ids = rng.integers(1, 99, (4, 12)).astype(np.int32)
    mask = (np.arange(12)[None] < np.array([12, 9, 5, 12])[:, None]).astype(np.int32)
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if family == "bert":
        batch["token_type_ids"] = np.zeros_like(ids)
        batch["label"] = np.array([0, 1, 1, 0], np.int32)
    return batch


def _grads(model, batch):
    plan = jaxtl.make_plan("full", model.structure)
    state = jaxtl.TrainState.create(
        apply_fn=model.forward, params=model.params, tx=plan.optimizer(1e-3), task=model.task
    )
    loss, grads, _, _ = jax.jit(steps._loss_and_grads)(state, batch)
    return float(loss), grads


@pytest.mark.parametrize("family", ["bert", "gpt2", "vit"])
def test_remat_gives_the_gradients_of_the_plain_step(family, models):
    path, options = models[family]
    model = jaxtl.load(path, **options)
    batch = _batch(family)
    loss, grads = _grads(model, batch)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    for policy in ("full", "dots_saveable"):
        rematted = recompute(model, remat=policy)
        assert rematted.config.remat == policy and model.config.remat is None
        loss_r, grads_r = _grads(rematted, batch)
        # Recomputation repeats the same float32 ops; only XLA's fusion choices may differ.
        assert loss_r == pytest.approx(loss, rel=1e-6)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
            np.testing.assert_allclose(r, g, rtol=1e-5, atol=1e-7)


def _residual_bytes(model, batch) -> int:
    """Bytes the training loss's forward pass keeps for its backward pass (the leaves of
    ``jax.vjp``'s backward function): what remat decides, on any backend."""
    from jaxtl.train.losses import mean_loss

    def loss(params):
        out, _ = model.forward.traceable(params, {}, batch, train=True, rng=jax.random.PRNGKey(0))
        return mean_loss(out, batch, model.task)

    backward = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], model.params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(backward))


@pytest.mark.parametrize("family", ["bert", "gpt2", "vit"])
def test_remat_keeps_fewer_activations_for_the_backward_pass(family, models):
    path, options = models[family]
    model = jaxtl.load(path, **options)
    batch = _batch(family)
    plain = _residual_bytes(model, batch)
    full = _residual_bytes(recompute(model, remat="full"), batch)
    dots = _residual_bytes(recompute(model, remat="dots_saveable"), batch)
    # "full" keeps each block's input (and what the blocks cannot recompute: the params);
    # "dots_saveable" also keeps the matmul outputs, so it sits in between. Shapes only, so
    # exact: plain / dots / full = 507,196 / 297,044 / 155,732 bytes for BERT, 528,872 /
    # 307,216 / 178,192 for GPT-2, 604,508 / 332,452 / 173,604 for ViT (2.97-3.48x less; the
    # plain step kept 605,508, 725,496 and 674,148 before its activations were recomputed,
    # jaxtl.models.common.recomputed).
    print(family, "residual bytes: plain", plain, "dots_saveable", dots, "full", full)
    assert 2.5 * full < plain and full < dots < plain, (full, dots, plain)


def test_remat_is_refused_for_a_family_without_it_and_for_an_unknown_policy(tmp_path):
    with pytest.raises(ValueError, match=r"remat \(--remat\) 'some' is not a policy"):
        jaxtl.TrainConfig(remat="some")
    model = jaxtl.load(jaxtl.efficientnet_lite0_path(), num_labels=2)
    with pytest.raises(ValueError, match=r"available for the transformer families"):
        jaxtl.Trainer(
            model, jaxtl.make_plan("linear_probe", model.structure), jaxtl.TrainConfig(remat="full")
        )


def _fit_losses(model, arrays, steps_: int, recipe: str = "full", **options):
    config = jaxtl.TrainConfig(batch_size=16, learning_rate=1e-3, max_steps=steps_, **options)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan(recipe, model.structure), config)
    state = trainer.init_state(steps_)
    step, _ = trainer._steps(state)
    losses = []
    for i in range(steps_):
        batch = {k: v[16 * i : 16 * (i + 1)] for k, v in arrays.items()}
        state, metrics = step(state, parallel.global_batch(batch, trainer.mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


def test_bf16_keeps_float32_masters_and_trains_like_float32(tmp_path):
    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert"), dropout=0.0), num_labels=2)
    arrays, _ = encode_splits(model, small_vader(n_train=320, n_val=8, n_test=8))
    f32, _ = _fit_losses(model, arrays["train"], 20)
    bf16, state = _fit_losses(model, arrays["train"], 20, precision="bf16")
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim}
    assert dtypes == {jnp.dtype(jnp.float32)}  # master params and Adam moments
    assert f32[0] != f32[-1] and not np.array_equal(bf16, f32)  # both trained, bf16 computed
    # bf16 keeps 8 significant bits: a relative rounding of 2**-9 (0.2%) per op, ~0.0014 at a
    # loss of 0.69. Measured on this model (AMD EPYC, AVX512-BF16): max |loss difference| over
    # the 20 steps 0.0018, typically 0.0002-0.0008, with no growth over the steps: the
    # masters, gradients and Adam's state are float32, so bf16 rounds each step's forward and
    # backward pass but nothing accumulates in bf16. The bound is ~3x the measured maximum.
    print("bf16 vs float32 loss |diff| per step:", np.abs(bf16 - f32).round(5).tolist())
    assert np.max(np.abs(bf16 - f32)) < 0.006, np.abs(bf16 - f32)


def test_frozen_bf16_halves_the_frozen_params_and_keeps_the_trained_ones_float32(tmp_path):
    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert"), dropout=0.0), num_labels=2)
    arrays, _ = encode_splits(model, small_vader(n_train=32, n_val=8, n_test=8))
    _, state = _fit_losses(
        model, arrays["train"], 2, precision="bf16", frozen_bf16=True, recipe="linear_probe"
    )
    from jaxtl.transfer.trees import flatten, tree_bytes

    flat = flatten(state.params)
    assert {str(v.dtype) for p, v in flat.items() if p.startswith("classifier")} == {"float32"}
    frozen = {p: v for p, v in flat.items() if not p.startswith("classifier")}
    assert {str(v.dtype) for v in frozen.values()} == {"bfloat16"}
    assert tree_bytes(frozen) * 2 == tree_bytes(flatten(model.params)) - tree_bytes(
        {p: v for p, v in flatten(model.params).items() if p.startswith("classifier")}
    )
    # An export writes the model's own dtype: the frozen params as float32 again (their bf16
    # values, exactly), the trained head as trained.
    out = jaxtl.export(model, tmp_path / "export", state.params)
    back = flatten(jaxtl.load(out, num_labels=2).params)
    for p, v in flat.items():
        assert back[p].dtype == np.float32, p
        np.testing.assert_array_equal(np.asarray(back[p]), np.asarray(v, np.float32), err_msg=p)


@dataclasses.dataclass
class _Device:
    """What :func:`precision.bf16_unsupported` reads of a ``jax.Device``: its platform, kind and
    CUDA compute capability (no GPU here to ask)."""

    platform: str
    device_kind: str
    compute_capability: str


def test_bf16_on_a_backend_without_it_warns_and_computes_in_float32():
    v100 = _Device("gpu", "Tesla V100-SXM2-16GB", "7.0")
    with pytest.warns(UserWarning, match=r"Tesla V100.*compute capability 7.0.*float32"):
        assert precision.compute_dtype("bf16", v100) == jnp.float32
    a100 = _Device("gpu", "NVIDIA A100-SXM4-40GB", "8.0")
    assert precision.compute_dtype("bf16", a100) == jnp.bfloat16
    assert precision.compute_dtype("bf16", jax.devices()[0]) == jnp.bfloat16  # this CPU
    with pytest.raises(ValueError, match=r"precision \(--precision\) must be one of"):
        jaxtl.TrainConfig(precision="fp8")
