"""Activations whose backward pass recomputes them from their input
(``jaxtl.models.common.recomputed``): what they keep for the backward pass, and that they are
the same functions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl.models import common
from jaxtl.models.clip import _ACTIVATIONS as CLIP_ACTIVATIONS
from jaxtl.models.clip import quick_gelu

# The formulas as written (differentiated without recomputation).
PLAIN = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
    "quick_gelu": quick_gelu,
}


def _kept(fn, x, shape) -> int:
    """How many arrays of ``shape`` the backward pass of ``fn`` at ``x`` keeps."""
    _, backward = jax.vjp(fn, x)
    return sum(1 for leaf in jax.tree.leaves(backward) if getattr(leaf, "shape", None) == shape)


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_a_recomputed_activation_keeps_only_its_input_and_computes_the_same(name):
    fn = {**common.ACTIVATIONS, **CLIP_ACTIVATIONS}[name]
    x = jnp.linspace(-6.0, 6.0, 3000, dtype=jnp.float32).reshape(3, 1000)
    assert _kept(PLAIN[name], x, x.shape) >= 3  # what recomputing saves
    assert _kept(fn, x, x.shape) == 1
    np.testing.assert_allclose(jax.jit(fn)(x), jax.jit(PLAIN[name])(x), rtol=1e-6, atol=1e-7)

    def grad(f):
        return jax.jit(jax.grad(lambda x: jnp.sum(f(x) * jnp.cos(x))))(x)

    np.testing.assert_allclose(grad(fn), grad(PLAIN[name]), rtol=1e-6, atol=1e-6)


def test_a_bert_layer_keeps_two_mlp_arrays_for_the_backward_pass(tmp_path, monkeypatch):
    """In a BERT layer's MLP the backward pass keeps the GELU's input and the output Dense's
    input (the GELU's output), where the GELU differentiated as written kept four: the
    saving XLA's memory analysis of MiniLM's step shows (benchmarks/README.md)."""
    from _tiny import make_tiny_bert

    import jaxtl

    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert"), layers=2), num_labels=2)
    batch = {
        "input_ids": jnp.ones((4, 8), jnp.int32),
        "attention_mask": jnp.ones((4, 8), jnp.int32),
        "token_type_ids": jnp.zeros((4, 8), jnp.int32),
    }

    def forward(params):
        return model.forward.traceable(params, {}, batch, train=True, rng=jax.random.PRNGKey(0))[0]

    mlp = (4, 8, 4 * 32)  # batch, tokens, the tiny BERT's intermediate size
    assert _kept(forward, model.params, mlp) == 2 * 2
    monkeypatch.setitem(common.ACTIVATIONS, "gelu", PLAIN["gelu"])
    assert _kept(forward, model.params, mlp) == 4 * 2
