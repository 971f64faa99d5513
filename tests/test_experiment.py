"""The comparison's negative-transfer guard: its rule, and where its verdict goes."""

from __future__ import annotations

import pytest

from jaxtl.experiment import NEGATIVE_TRANSFER_SE, negative_transfer


def arm(name: str, accuracy: float, examples: int = 400) -> dict:
    return {"name": name, "test": {"accuracy": accuracy, "examples": examples}}


def test_pretrained_below_scratch_beyond_the_noise_is_flagged():
    checks = negative_transfer(
        [
            arm("pretrained full", 0.70),
            arm("pretrained linear_probe", 0.79),
            arm("scratch full", 0.80),
        ]
    )
    by = {c["arm"]: c for c in checks}
    # 2 standard errors of a difference of two accuracies near 0.75 on 400 examples: ~6 points.
    se = (0.8 * 0.2 / 400 + 0.7 * 0.3 / 400) ** 0.5
    assert by["pretrained full"]["noise"] == pytest.approx(NEGATIVE_TRANSFER_SE * se)
    assert by["pretrained full"]["flagged"] is True
    assert by["pretrained linear_probe"]["flagged"] is False  # 1 point: within the noise
    assert all(c["against"] == "scratch full" for c in checks)


def test_within_noise_or_better_is_not_flagged_and_the_margin_shrinks_with_more_examples():
    small = negative_transfer([arm("pretrained full", 0.76, 200), arm("scratch full", 0.80, 200)])
    large = negative_transfer(
        [arm("pretrained full", 0.76, 20000), arm("scratch full", 0.80, 20000)]
    )
    assert small[0]["flagged"] is False and large[0]["flagged"] is True
    better = negative_transfer([arm("pretrained full", 0.9), arm("scratch full", 0.8)])
    assert better[0]["flagged"] is False


def test_no_scratch_arm_or_no_accuracy_means_no_check():
    assert negative_transfer([arm("pretrained full", 0.5)]) == []
    loss_only = [
        {"name": "pretrained full", "test": {"loss": 3.0, "examples": 10}},
        {"name": "scratch full", "test": {"loss": 1.0, "examples": 10}},
    ]
    assert negative_transfer(loss_only) == []
