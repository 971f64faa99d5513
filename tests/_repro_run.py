"""One fine-tuning run of a BatchNorm CNN on real digits, in a process of its own; writes its
final params and BatchNorm statistics to OUT.npz.

Usage: python _repro_run.py MODEL_DIR OUT
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np

import jaxtl
from jaxtl.transfer.trees import flatten


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    model = jaxtl.load(model_dir, num_labels=10, in_channels=1, image_size=32)
    # The digits preset's preprocessing: a plain resize of the 8x8 digits, no crop.
    model.extras["preprocessing"] = dataclasses.replace(
        model.extras["preprocessing"], resize=None, interpolation="bilinear"
    )
    config = jaxtl.TrainConfig(
        epochs=3, batch_size=16, learning_rate=1e-2, schedule="cosine", precise_bn=64
    )
    result = jaxtl.finetune(model, "full", jaxtl.data.digits(per_class=10), config, verbose=False)
    arrays = {
        **{f"params/{k}": v for k, v in flatten(jax.device_get(result.params)).items()},
        **{f"stats/{k}": v for k, v in flatten(jax.device_get(result.batch_stats)).items()},
    }
    np.savez(out, **{k: np.asarray(v) for k, v in arrays.items()})


if __name__ == "__main__":
    main()
