"""jaxtl's Dropout: flax.linen.Dropout's contract with a cheaper mask (four 16-bit values per
threefry hash). The statistics are checked at fixed keys, so each check is deterministic; the
bounds are 6 standard deviations of the quantity under a fair generator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl.models.layers import Dropout, dropout_mask

SHAPE = (8, 12, 64, 128)  # attention-probability shaped: [B, H, Tq, Tk]


def _mask(key=0, rate=0.1, shape=SHAPE):
    keep, scale = jax.jit(dropout_mask, static_argnums=(1, 2))(jax.random.key(key), rate, shape)
    return np.asarray(keep), scale


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_the_keep_fraction_is_the_resolved_rate_and_the_scale_its_inverse(rate):
    keep, scale = _mask(rate=rate)
    resolved = round(rate * 65536) / 65536
    p = 1 - resolved
    sd = np.sqrt(p * (1 - p) / keep.size)
    assert abs(keep.mean() - p) < 6 * sd, (keep.mean(), p)
    assert scale == pytest.approx(1 / p, rel=1e-12)
    assert abs(resolved - rate) <= 2**-17


def test_the_four_values_of_one_hash_and_neighbouring_rows_are_uncorrelated():
    keep, _ = _mask(rate=0.5)
    n = SHAPE[-1] // 4
    x = keep.reshape(-1, SHAPE[-1]).astype(np.float64)
    quarters = [x[:, i * n : (i + 1) * n].ravel() for i in range(4)]
    bound = 6 / np.sqrt(quarters[0].size)
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(np.corrcoef(quarters[i], quarters[j])[0, 1]) < bound, (i, j)
    rows = x.ravel()
    for lag in (1, SHAPE[-1]):  # next element; same column of the next row
        assert abs(np.corrcoef(rows[:-lag], rows[lag:])[0, 1]) < 6 / np.sqrt(rows.size)


def test_masks_are_a_function_of_the_key():
    a, _ = _mask(key=0)
    assert np.array_equal(a, _mask(key=0)[0])
    b, _ = _mask(key=1)
    assert 0.1 < np.mean(a != b) < 0.3  # independent masks at keep 0.9 differ in 18% of places


def test_an_odd_last_dimension_and_a_scalar_get_masks_of_their_shape():
    keep, _ = _mask(rate=0.5, shape=(3, 1001))
    assert keep.shape == (3, 1001)
    assert abs(keep.mean() - 0.5) < 6 * np.sqrt(0.25 / keep.size)
    assert _mask(shape=())[0].shape == ()


def test_the_module_scales_what_it_keeps_and_zeroes_the_rest():
    x = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE), jnp.float32)
    k = jax.random.key(3)
    y = np.asarray(Dropout(0.1).apply({}, x, False, rng=k))
    keep, scale = dropout_mask(k, 0.1, SHAPE)
    np.testing.assert_array_equal(y, np.where(keep, np.asarray(x) * np.float32(scale), 0))
    # The expectation is kept: dropout(ones) averages to 1.
    ones = np.asarray(Dropout(0.1).apply({}, jnp.ones(SHAPE), False, rng=k), np.float64)
    p = 1 - 6554 / 65536
    assert abs(ones.mean() - 1) < 6 * scale * np.sqrt(p * (1 - p) / ones.size)


def test_it_keeps_flax_dropout_names_streams_and_switches():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            a = Dropout(0.5)(x, deterministic=not train)
            b = Dropout(0.5, broadcast_dims=(0,))(x, deterministic=not train)
            return a, b

    x = jnp.ones((4, 64))
    k = jax.random.key(7)
    names = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Dropout):
            names.append(context.module.name)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        a, b = Net().apply({}, x, True, rngs={"dropout": k})
    # flax's auto-names, which its PRNG streams are folded from: a checkpointed run's dropout
    # streams do not move.
    assert names == ["Dropout_0", "Dropout_1"]
    assert not np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert np.all(np.asarray(b) == np.asarray(b)[:1])  # broadcast_dims=(0,): one row, shared
    assert set(np.unique(np.asarray(a))) <= {0.0, np.float32(1 / (1 - 32768 / 65536))}
    eval_a, eval_b = Net().apply({}, x, False)
    np.testing.assert_array_equal(eval_a, x)
    np.testing.assert_array_equal(eval_b, x)
    # An explicit rng= key gives the mask of dropout_mask(key) itself.
    y = Dropout(0.5).apply({}, x, False, rng=k)
    np.testing.assert_array_equal(np.asarray(y) != 0, np.asarray(dropout_mask(k, 0.5, x.shape)[0]))


def test_rate_one_gives_zeros_and_zero_gradients():
    x = jnp.ones((2, 8))
    k = jax.random.key(0)
    f = lambda v: Dropout(1.0).apply({}, v, False, rngs={"dropout": k}).sum()  # noqa: E731
    assert float(f(x)) == 0.0
    g = np.asarray(jax.grad(f)(x))
    assert np.all(g == 0) and np.all(np.isfinite(g))


def test_a_rate_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="dropout rate"):
        dropout_mask(jax.random.key(0), 1.5, (4,))
