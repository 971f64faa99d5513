"""One device vs eight, and jit vs pmap: the same training, within float rounding.

Each configuration runs in a subprocess (the CPU device count is fixed when jax starts) with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _tiny import make_tiny_bert

HERE = os.path.dirname(__file__)
STEPS = 6


def _run(model_dir, n, mode):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "_parallel_run.py"),
            model_dir,
            str(n),
            mode,
            str(STEPS),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("par")
    return {
        # Dropout on: the jit path's masks must not depend on how the batch is sharded.
        "dropout": make_tiny_bert(str(base / "dropout"), dropout=0.1),
        # pmap draws its dropout per device, so that comparison runs without dropout.
        "no_dropout": make_tiny_bert(str(base / "nodrop"), dropout=0.0),
    }


@pytest.mark.slow
def test_eight_devices_match_one(dirs):
    one = _run(dirs["dropout"], 1, "jit")
    eight = _run(dirs["dropout"], 8, "jit")
    assert len(one["losses"]) == STEPS
    # Only the reduction order differs (per-device partial sums): float32 rounding.
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eight["params"], one["params"], rtol=1e-4, atol=1e-5)
    assert one["losses"][0] != one["losses"][-1]  # it trained

    # Evaluation counts each of 13 examples exactly once: eval batches of 8 leave a partial
    # last batch, and on 8 devices its padding rows fill whole devices.
    for run in (one, eight):
        assert run["eval"]["examples"] == 13
        assert run["eval"]["loss"] == pytest.approx(run["direct"]["loss"], rel=1e-5)
        assert run["eval"]["accuracy"] == pytest.approx(run["direct"]["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_pmap_matches_jit(dirs):
    jit = _run(dirs["no_dropout"], 4, "jit")
    pmap = _run(dirs["no_dropout"], 4, "pmap")
    np.testing.assert_allclose(pmap["losses"], jit["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pmap["params"], jit["params"], rtol=1e-4, atol=1e-5)
