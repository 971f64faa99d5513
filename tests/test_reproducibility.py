"""Two runs on one machine are the same run, bit for bit.

The case that can drift is a network that trains convolutions with BatchNorm (reductions over
large batches of activations, and conv weight gradients): here a small ResNet saved by
transformers, fine-tuned on real digits with BatchNorm in training mode and exact BatchNorm
statistics before each evaluation, as ``--preset digits`` does. Each run is its own process:
the first compiles, the second reads the persistent XLA cache (a cache hit is the same
executable). What a rerun must share to be bitwise equal is what ``run.json`` records under
``environment`` (README.md, "Reproducibility").
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_labels=10
    )
    directory = str(tmp_path_factory.mktemp("repro") / "resnet")
    transformers.ResNetForImageClassification(config).eval().save_pretrained(directory)
    return directory


def _run(model_dir: str, out: str) -> dict[str, np.ndarray]:
    subprocess.run(
        [sys.executable, os.path.join(HERE, "_repro_run.py"), model_dir, out],
        check=True,
        cwd=HERE,
        timeout=900,
    )
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_two_runs_of_a_batchnorm_cnn_are_bitwise_equal(resnet_dir, tmp_path):
    first = _run(resnet_dir, str(tmp_path / "a.npz"))
    second = _run(resnet_dir, str(tmp_path / "b.npz"))
    assert sorted(first) == sorted(second)
    differ = [k for k in first if not np.array_equal(first[k], second[k])]
    assert differ == [], f"{len(differ)} of {len(first)} arrays differ, e.g. {differ[:5]}"
    # The runs did train: BatchNorm statistics moved off their pretrained values.
    import jaxtl
    from jaxtl.transfer.trees import flatten

    loaded = jaxtl.load(resnet_dir, num_labels=10, in_channels=1, image_size=32)
    stats = {f"stats/{k}": np.asarray(v) for k, v in flatten(loaded.batch_stats).items()}
    assert any(not np.array_equal(stats[k], first[k]) for k in stats)
