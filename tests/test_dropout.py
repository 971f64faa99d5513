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


# ------------------------------------------------------------------ one stream per forward pass


class _ThreeSites(nn.Module):
    """Three dropout sites that read a stream: two of one shape, one of another; and one that
    does not (``stream=False``, the default)."""

    @nn.compact
    def __call__(self, x, y):
        a = Dropout(0.5, stream=True)(x, False)
        b = Dropout(0.5, stream=True)(x, False)
        c = Dropout(0.5, stream=True)(y, False)
        return a, b, c


_HASHES = ("threefry2x32", "random_bits", "random_fold_in", "random_split")


def _threefry_hashes(fn, *args) -> int:
    """How many threefry hashes the traced ``fn`` computes (nested jaxprs included): the hash
    itself, and jax.random's key operations, each one hash of a threefry key."""

    def count(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name in _HASHES
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        n += count(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        n += count(sub)
        return n

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_in_a_stream_each_site_draws_its_own_counters_of_one_key():
    from jaxtl.models.layers import _mask, dropout_stream

    x, y = jnp.ones((64, 128)), jnp.ones((8, 4, 100))
    k = jax.random.PRNGKey(5)
    with dropout_stream(k):
        a, b, c = _ThreeSites().apply({}, x, y)
    # Each mask is the hash of the key's own words over its own rows: 64, then 64, then 32,
    # from row 1 (row 0 is jax.random's own counters of the key).
    for out, first, shape in ((a, 1, x.shape), (b, 65, x.shape), (c, 129, y.shape)):
        keep, _ = _mask(k, 0.5, shape, first)
        np.testing.assert_array_equal(np.asarray(out) != 0, np.asarray(keep))
    # Two sites of one shape get independent masks (6 standard deviations of a correlation).
    ma, mb = np.asarray(a).ravel() != 0, np.asarray(b).ravel() != 0
    assert abs(np.corrcoef(ma, mb)[0, 1]) < 6 / np.sqrt(ma.size)
    # A function of the key: again the same, another key another draw.
    with dropout_stream(k):
        again = _ThreeSites().apply({}, x, y)
    with dropout_stream(jax.random.PRNGKey(6)):
        other = _ThreeSites().apply({}, x, y)
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(a))
    assert 0.4 < np.mean((np.asarray(other[0]) != 0) != ma.reshape(x.shape)) < 0.6


def test_a_stream_needs_one_hash_per_mask_where_flax_keys_need_three():
    from jaxtl.models.layers import dropout_stream

    x, y = jnp.ones((64, 128)), jnp.ones((8, 4, 100))
    k = jax.random.PRNGKey(5)

    def streamed(x, y):
        with dropout_stream(k):
            return _ThreeSites().apply({}, x, y)

    def keyed(x, y):  # outside a stream: flax's make_rng per site
        return _ThreeSites().apply({}, x, y, rngs={"dropout": k})

    assert _threefry_hashes(streamed, x, y) == 3  # the masks only
    assert _threefry_hashes(keyed, x, y) == 9  # per site: flax's fold-in, two words, the mask


def test_past_the_stream_s_counters_a_site_falls_back_to_flax_s_key(monkeypatch):
    from jaxtl.models import layers

    x, y = jnp.ones((64, 128)), jnp.ones((8, 4, 100))
    k = jax.random.PRNGKey(5)
    monkeypatch.setattr(layers, "MAX_STREAM_ROWS", 1 + 64 + 64)  # room for the first two masks
    with layers.dropout_stream(k):
        a, b, c = _ThreeSites().apply({}, x, y, rngs={"dropout": k})
    _, _, keyed_c = _ThreeSites().apply({}, x, y, rngs={"dropout": k})
    np.testing.assert_array_equal(np.asarray(c), np.asarray(keyed_c))
    keep_b, _ = layers._mask(k, 0.5, x.shape, 65)
    np.testing.assert_array_equal(np.asarray(b) != 0, np.asarray(keep_b))


def test_a_jaxtl_model_s_training_forward_hashes_once_per_dropout_site(tmp_path):
    from _tiny import make_tiny_bert

    import jaxtl

    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert"), layers=2), num_labels=2)
    batch = {
        "input_ids": jnp.ones((4, 8), jnp.int32),
        "attention_mask": jnp.ones((4, 8), jnp.int32),
        "token_type_ids": jnp.zeros((4, 8), jnp.int32),
    }
    rng = jax.random.PRNGKey(0)

    def forward(params):
        return model.forward.traceable(params, {}, batch, train=True, rng=rng)[0]

    # embeddings, 3 per layer (attention probabilities, attention output, MLP output), head
    assert _threefry_hashes(forward, model.params) == 1 + 3 * 2 + 1
    # Evaluation draws nothing; another key draws other masks.
    evaluated = model.forward.traceable(model.params, {}, batch)[0]
    assert _threefry_hashes(lambda p: model.forward.traceable(p, {}, batch)[0], model.params) == 0
    trained = np.asarray(forward(model.params))
    other = model.forward.traceable(model.params, {}, batch, train=True, rng=jax.random.PRNGKey(1))
    assert not np.allclose(trained, np.asarray(evaluated))
    assert not np.allclose(trained, np.asarray(other[0]))


def test_a_dropout_without_stream_true_keeps_flax_s_keys_inside_a_stream():
    """Modules of a user's own (the default ``stream=False``) may run under nn.scan / nn.vmap,
    where a stream read while tracing would give every iteration one mask."""
    from jaxtl.models.layers import dropout_stream

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            body = nn.scan(
                lambda mdl, c, _: (Dropout(0.5)(c, False), None),
                variable_broadcast="params",
                split_rngs={"dropout": True},
                length=3,
            )
            return body(self, x, None)[0]

    x = jnp.ones((16, 64))
    k = jax.random.PRNGKey(3)
    with dropout_stream(k):
        inside = Scanned().apply({}, x, rngs={"dropout": k})
    np.testing.assert_array_equal(inside, Scanned().apply({}, x, rngs={"dropout": k}))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_a_stream_takes_typed_keys_of_any_implementation(impl):
    from jaxtl.models.layers import _key_words, dropout_stream

    x, y = jnp.ones((64, 128)), jnp.ones((8, 4, 100))
    k = jax.random.key(5, impl=impl)
    with dropout_stream(k):
        a, _, _ = _ThreeSites().apply({}, x, y)
    with dropout_stream(k):
        again, _, _ = _ThreeSites().apply({}, x, y)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(again))
    assert 0.4 < np.mean(np.asarray(a) != 0) < 0.6
    words = _key_words(k)
    assert words.shape == (2,) and words.dtype == jnp.uint32
    if impl == "threefry2x32":  # a typed threefry key keys the hash with its own data
        np.testing.assert_array_equal(words, jax.random.key_data(k))
