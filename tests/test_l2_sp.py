"""L2-SP (Li et al. 2018): its gradient, exactly, on every kind of param, and in a real run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtl
from jaxtl.transfer.plan import Group, Plan

ALPHA, BETA = 0.3, 0.05


def tree(seed: int):
    rng = np.random.default_rng(seed)
    draw = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {
        "stem": {"kernel": draw(3, 4)},
        "block": {"kernel": draw(4, 4), "bias": draw(4)},
        "head": {"kernel": draw(4, 2), "bias": draw(2)},
    }


PLAN = Plan(
    (("head/.*", "head"), ("block/.*", "body"), (".*", "frozen")),
    [Group("head", True), Group("body", True), Group("frozen", False)],
)


def test_the_update_is_minus_the_gradient_of_loss_plus_penalty():
    """With SGD at lr 1 (no decay, no clipping) the step is exactly ``-grad(L + Omega)`` on the
    trained leaves, where Omega is L2-SP's penalty written out here from the paper, and zero on
    frozen ones."""
    w0, w = tree(0), tree(1)  # pretrained, and where training has moved them
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 3)), jnp.float32)

    def loss(p):
        h = jnp.tanh(x @ p["stem"]["kernel"]) @ p["block"]["kernel"] + p["block"]["bias"]
        return jnp.sum((h @ p["head"]["kernel"] + p["head"]["bias"]) ** 2)

    def penalty(p):
        body = sum(jnp.sum((p["block"][k] - w0["block"][k]) ** 2) for k in ("kernel", "bias"))
        head = sum(jnp.sum(p["head"][k] ** 2) for k in ("kernel", "bias"))
        return ALPHA / 2 * body + BETA / 2 * head

    tx = PLAN.optimizer(1.0, name="sgd", weight_decay=0.0, clip_norm=None, l2_sp=(ALPHA, BETA))
    state = tx.init(w0)  # the anchor is what the params were at init: the pretrained ones
    updates, _ = tx.update(jax.grad(loss)(w), state, w)
    expected = jax.grad(lambda p: loss(p) + penalty(p))(w)
    for part in ("block", "head"):
        for k in updates[part]:
            np.testing.assert_allclose(updates[part][k], -expected[part][k], rtol=1e-6, atol=1e-7)
    assert not np.any(np.asarray(updates["stem"]["kernel"]))  # frozen: no step, no penalty
    anchors = [
        leaf
        for leaf in jax.tree.leaves(state)
        if getattr(leaf, "shape", None) in ((4, 4), (4,), (3, 4))
    ]
    # Only the regularized backbone's start is stored (block kernel and bias), not the
    # frozen stem's or the head's.
    assert sorted(a.shape for a in anchors) == [(4,), (4, 4)]


def test_without_l2_sp_the_same_optimizer_is_plain_sgd():
    w0, w = tree(0), tree(1)
    grads = jax.tree.map(jnp.ones_like, w)
    tx = PLAN.optimizer(1.0, name="sgd", weight_decay=0.0, clip_norm=None)
    updates, _ = tx.update(grads, tx.init(w0), w)
    assert np.array_equal(np.asarray(updates["block"]["kernel"]), -np.ones((4, 4)))


@pytest.mark.parametrize("bad", [(-1.0, 0.0), (0.1,), "0.1,0.1", (0.1, True)])
def test_bad_l2_sp_values_are_refused_with_the_flag(bad):
    with pytest.raises(ValueError, match=r"l2_sp \(--l2-sp ALPHA,BETA\)"):
        jaxtl.TrainConfig(l2_sp=bad)


def test_a_run_with_l2_sp_stays_closer_to_the_pretrained_weights(tmp_path):
    """Same run, same seed, with and without a strong L2-SP: the backbone moves less from w0,
    and the config survives run.json (resume rebuilds the same optimizer)."""
    import _tiny

    from jaxtl.transfer.trees import flatten

    model = jaxtl.load(_tiny.make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    data = _tiny.small_vader(32, 8, 8)
    moved = {}
    for l2 in (None, (50.0, 0.0)):
        config = jaxtl.TrainConfig(
            batch_size=8, max_steps=4, learning_rate=1e-3, l2_sp=l2, progress=False
        )
        assert jaxtl.TrainConfig(**config.to_dict()).optim.l2_sp == l2
        result = jaxtl.finetune(model, "full", data, config, verbose=False)
        before, after = flatten(model.params), flatten(result.params)
        moved[l2] = sum(
            float(np.sum((np.asarray(after[p]) - np.asarray(before[p])) ** 2))
            for p in before
            if not p.startswith("classifier")
        )
    assert moved[(50.0, 0.0)] < moved[None]


def test_the_cli_flag_names_the_expected_form(capsys):
    from jaxtl import cli
    from jaxtl.cli import parser

    with pytest.raises(SystemExit):
        cli.main(["finetune", "--l2-sp", "0.1"])
    assert "ALPHA,BETA" in capsys.readouterr().err
    assert parser.l2_sp_pair("0.01,0") == (0.01, 0.0)
