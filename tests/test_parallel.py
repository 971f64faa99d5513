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


_KEEPS_MODEL = r"""
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
import jaxtl
from jaxtl import parallel

# copy_to on its own: a one-device array replicated over 8 devices, the result donated.
mesh = parallel.make_mesh()
x = jax.numpy.arange(512.0)
held = x.unsafe_buffer_pointer()
inspected = parallel.copy_to(x, NamedSharding(mesh, PartitionSpec()))
shared = [s.data.unsafe_buffer_pointer() == held for s in inspected.addressable_shards]
y = parallel.copy_to(x, NamedSharding(mesh, PartitionSpec()))  # shards never looked at
jax.block_until_ready(jax.jit(lambda a: a * 2, donate_argnums=0)(y))
raw = jax.device_put(x, NamedSharding(mesh, PartitionSpec()), may_alias=False)
raw_shared = [s.data.unsafe_buffer_pointer() == held for s in raw.addressable_shards]

# A Trainer on the default mesh (all 8 devices on data), trained one step, twice from one model.
model = jaxtl.load(sys.argv[1], num_labels=2)
before = [np.asarray(p) for p in jax.tree.leaves(model.params)]
rng = np.random.default_rng(0)
host = {"input_ids": rng.integers(1, 1000, (8, 8)).astype(np.int32),
        "attention_mask": np.ones((8, 8), np.int32), "token_type_ids": np.zeros((8, 8), np.int32),
        "label": rng.integers(0, 2, 8).astype(np.int32)}
for _ in range(2):
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure),
                            jaxtl.TrainConfig(batch_size=8, max_steps=1))
    state = trainer.init_state(1)
    step, _ = trainer._steps(state)
    state, m = step(state, parallel.global_batch(host, trainer.mesh))
    jax.block_until_ready(m)
after = jax.tree.leaves(model.params)
print(json.dumps({
    "devices": len(jax.devices()), "copy_shared": shared, "x_deleted": x.is_deleted(),
    "y_deleted": y.is_deleted(),
    "raw_shared": raw_shared,
    "deleted": sum(p.is_deleted() for p in after),
    "unchanged": all(np.array_equal(b, np.asarray(a)) for b, a in zip(before, after)),
}))
"""


def test_training_on_eight_devices_leaves_the_loaded_model_s_params_alive(dirs):
    """The train state is the model's params copied onto the mesh, and the step donates it.
    ``jax.device_put(..., may_alias=False)`` of a one-device array onto a replicated sharding
    reuses the array's buffer as the first device's shard (jax 0.10.2): the first step deleted
    the model's replicated params under a Python caller, and a second Trainer failed with
    "Array has been deleted" (``benchmarks/scale.py`` did). ``parallel.copy_to`` copies them."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run(
        [sys.executable, "-c", _KEEPS_MODEL, dirs["no_dropout"]],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=os.path.dirname(HERE),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["devices"] == 8
    # got["raw_shared"][0]: whether jax itself still aliases (True in jax 0.10.2); not asserted,
    # so that a jax that copies does not fail this test.
    assert not any(got["copy_shared"]) and got["y_deleted"] and not got["x_deleted"]
    assert got["deleted"] == 0 and got["unchanged"]
