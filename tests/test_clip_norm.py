"""Global-norm clipping (jaxtl.transfer.optimizer.clip_by_global_norm): optax's rule, checked
against numpy and against optax's own transform, and the memory it was written to save,
from XLA's analysis of a jitted AdamW update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtl.transfer.optimizer import clip_by_global_norm


def _grads(scale: float) -> dict:
    rng = np.random.default_rng(0)
    return {
        "embed": (scale * rng.standard_normal((50, 8))).astype(np.float32),
        "dense": {"kernel": (scale * rng.standard_normal((8, 8))).astype(np.float32)},
        "bias": (scale * rng.standard_normal(8)).astype(np.float32),
    }


def _norm(tree: dict) -> float:
    return float(np.sqrt(sum(np.sum(np.float64(x) ** 2) for x in jax.tree.leaves(tree))))


def test_below_the_limit_the_gradients_pass_bit_for_bit():
    grads = _grads(0.01)
    assert _norm(grads) < 1.0
    out, _ = clip_by_global_norm(1.0).update(jax.tree.map(jnp.asarray, grads), optax.EmptyState())
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(grads), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("max_norm", [1.0, 0.25])
def test_above_the_limit_they_are_scaled_to_it_as_optax_does(max_norm):
    grads = _grads(3.0)
    norm = _norm(grads)
    assert norm > max_norm
    tx = clip_by_global_norm(max_norm)
    out, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(grads))
    ref, _ = optax.clip_by_global_norm(max_norm).update(
        jax.tree.map(jnp.asarray, grads), optax.EmptyState()
    )
    assert _norm(jax.tree.map(np.asarray, out)) == pytest.approx(max_norm, rel=1e-6)
    for got, want, theirs in zip(
        jax.tree.leaves(out), jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), want * (max_norm / norm), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got), np.asarray(theirs), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_norm_stays_non_finite_as_with_optax(bad):
    """The train step skips an update whose gradients are not finite; clipping must not hide
    that by turning them finite. As with optax: a NaN makes every leaf NaN; an inf makes the
    finite entries 0 and itself NaN."""
    grads = _grads(1.0)
    grads["bias"][0] = bad
    out, _ = clip_by_global_norm(1.0).update(jax.tree.map(jnp.asarray, grads), optax.EmptyState())
    ref, _ = optax.clip_by_global_norm(1.0).update(
        jax.tree.map(jnp.asarray, grads), optax.EmptyState()
    )
    for got, theirs in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(theirs))  # NaN == NaN here
    assert np.isnan(np.asarray(out["bias"])[0])
    if np.isnan(bad):
        assert all(np.isnan(np.asarray(x)).all() for x in jax.tree.leaves(out))


def test_bfloat16_leaves_keep_their_dtype_and_optax_values():
    grads = {k: jnp.asarray(v, jnp.bfloat16) for k, v in _grads(3.0).items() if k != "dense"}
    grads["f32"] = jnp.asarray(_grads(3.0)["embed"][:2])
    out, _ = clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    for got, theirs in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        assert got.dtype == theirs.dtype
        tol = 1e-2 if got.dtype == jnp.bfloat16 else 1e-6  # bfloat16 keeps 8 bits
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(theirs, np.float32), rtol=tol
        )


def _update_temp_bytes(clip: optax.GradientTransformation, grads: dict) -> int:
    tx = optax.chain(clip, optax.adamw(1e-3, weight_decay=0.01))
    params = jax.tree.map(jnp.zeros_like, grads)
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_the_update_keeps_no_clipped_copy_of_the_gradients():
    """optax's per-leaf ``(t / norm) * max_norm`` is read by both AdamW moments, and XLA keeps
    it as a copy of the gradients; the scalar factor it folds into each reader. Measured on a
    gradient of 4 MB (the largest leaf, as an embedding's is)."""
    rng = np.random.default_rng(0)
    grads = {
        "embed": jnp.asarray(rng.standard_normal((1000, 1000)), jnp.float32),
        "dense": jnp.asarray(rng.standard_normal((100, 100)), jnp.float32),
    }
    theirs = _update_temp_bytes(optax.clip_by_global_norm(1.0), grads)
    ours = _update_temp_bytes(clip_by_global_norm(1.0), grads)
    leaf = grads["embed"].nbytes
    assert theirs >= leaf  # the copy this replaces (if XLA stops making it, this test says so)
    assert ours < leaf / 4, (ours, theirs)
