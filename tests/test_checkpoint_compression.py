"""On CPU the Trainer writes its checkpoints without zstd compression: compressing holds buffers
of the arrays in host memory while a save is written, and on CPU that memory is the training's
(``benchmarks/save_memory.py --params``: a median 348 MiB per save of MiniLM's state, against 5
raw). What was written is read back through tensorstore, the storage layer under orbax, so the test
does not take orbax's word for it; and a compressed checkpoint (every run directory before
this change) still restores and resumes."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from _tiny import fit, make_tiny_bert, small_vader

import jaxtl
from jaxtl import checkpoint
from jaxtl.encoding import encode_splits


def compressors(state_dir: str) -> dict[str, object]:
    """Each saved array's zarr compressor (``None``: stored raw), read with tensorstore from
    the OCDBT store orbax writes under ``<step>/state``."""
    out = {}
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state_dir}"}).result()
    for key in kv.list().result():
        key = key.decode()
        if not key.endswith("/.zarray"):
            continue
        name = key[: -len("/.zarray")]
        store = {"driver": "ocdbt", "base": f"file://{state_dir}", "path": name}
        spec = ts.open({"driver": "zarr", "kvstore": store}, open=True).result().spec()
        out[name] = spec.to_json()["metadata"]["compressor"]
    return out


def _state():
    return {
        "params": {"w": jnp.arange(4096.0).reshape(64, 64), "b": jnp.ones((64,))},
        "step": jnp.asarray(3),
    }


@pytest.mark.parametrize("compress", [True, False])
def test_checkpointer_writes_compressed_or_raw_arrays_as_asked(tmp_path, compress):
    ckpt = checkpoint.Checkpointer(str(tmp_path), best_metric="score", compress=compress)
    try:
        ckpt.save(1, _state(), {"epoch": 1}, metrics={"score": 1.0})
        ckpt.wait()
    finally:
        ckpt.close()
    for kind in ("latest", "best"):
        found = compressors(str(tmp_path / kind / "1" / "state"))
        assert set(found) == {"params.w", "params.b", "step"}, found
        if compress:
            assert all(c["id"] == "zstd" for c in found.values()), found
        else:
            assert all(c is None for c in found.values()), found


@pytest.mark.parametrize(("backend", "codec"), [("cpu", None), ("tpu", "zstd"), ("gpu", "zstd")])
def test_by_default_checkpoints_are_raw_on_cpu_only(tmp_path, monkeypatch, backend, codec):
    """``compress=None`` decides by where the arrays live: host memory on the CPU backend.
    (Only the decision is faked here: the arrays are still written from the CPU.)"""
    monkeypatch.setattr(checkpoint.jax, "default_backend", lambda: backend)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    try:
        ckpt.save(1, _state(), {"epoch": 1})
        ckpt.wait()
    finally:
        ckpt.close()
    found = compressors(str(tmp_path / "latest" / "1" / "state"))
    assert found and all((c and c["id"]) == codec for c in found.values()), found
    with pytest.raises(ValueError, match="compress must be True, False or None, got 'no'"):
        checkpoint.Checkpointer(str(tmp_path / "bad"), compress="no")


@pytest.mark.parametrize(("written", "read"), [(True, False), (False, True), (False, False)])
def test_either_kind_restores_bitwise_with_either_setting(tmp_path, written, read):
    state = _state()
    ckpt = checkpoint.Checkpointer(str(tmp_path), compress=written)
    try:
        ckpt.save(1, state, {"epoch": 1})
        ckpt.wait()
    finally:
        ckpt.close()
    ckpt = checkpoint.Checkpointer(str(tmp_path), compress=read)
    try:
        restored, meta = ckpt.restore_latest(jax.tree.map(jnp.zeros_like, state))
    finally:
        ckpt.close()
    assert meta["epoch"] == 1
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_cpu_run_writes_raw_checkpoints_and_resumes_from_a_compressed_one(tmp_path):
    tiny = make_tiny_bert(str(tmp_path / "bert"))
    model = jaxtl.load(tiny, num_labels=2)
    data, _ = encode_splits(model, small_vader(n_train=64, n_val=32, n_test=32))

    def trainer(workdir):
        model = jaxtl.load(tiny, num_labels=2)
        config = jaxtl.TrainConfig(batch_size=16, learning_rate=1e-3, epochs=2, eval_every=4)
        return jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config, workdir)

    whole = fit(trainer(str(tmp_path / "whole")), data["train"], data["validation"])
    assert whole.steps == 8
    for kind, steps in (("latest", ("4", "8")), ("best", None)):
        root = tmp_path / "whole" / "checkpoints" / kind
        steps = steps or [s for s in os.listdir(root) if s.isdigit()]
        assert steps, kind
        for step in steps:
            found = compressors(str(root / step / "state"))
            assert found and all(c is None for c in found.values()), (kind, step, found)

    # A run stopped at step 4 whose checkpoint was written compressed, as jaxtl wrote them
    # on CPU before: it resumes to the same params as the uninterrupted run.
    work = tmp_path / "part"
    part = fit(trainer(str(work)), data["train"], data["validation"], stop_at=4)
    assert part.steps == 4
    reader = checkpoint.Checkpointer(str(work / "checkpoints"))
    try:
        tree, meta = reader.restore_latest(part.state.checkpoint_tree())
    finally:
        reader.close()
    shutil.rmtree(work / "checkpoints" / "latest" / "4")  # written again, compressed
    old = checkpoint.Checkpointer(str(work / "checkpoints"), best_metric=None, compress=True)
    try:
        old.save(4, tree, meta)
        old.wait()
    finally:
        old.close()
    found = compressors(str(work / "checkpoints" / "latest" / "4" / "state"))
    assert found and all(c["id"] == "zstd" for c in found.values()), found
    resumed = fit(trainer(str(work)), data["train"], data["validation"], resume=True)
    assert resumed.steps == 8
    for a, b in zip(
        jax.tree.leaves(whole.state.params), jax.tree.leaves(resumed.state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(("given", "on_cpu"), [(True, True), (None, False)])
def test_a_run_compresses_when_asked_and_off_cpu(tmp_path, monkeypatch, given, on_cpu):
    """``compress_checkpoints=True`` on CPU, and the default where the devices are not the
    host's (only the Trainer's notion of that is faked: the arrays are on the CPU)."""
    monkeypatch.setattr(jaxtl.Trainer, "_on_cpu", property(lambda self: on_cpu))
    tiny = make_tiny_bert(str(tmp_path / "bert"))
    model = jaxtl.load(tiny, num_labels=2)
    data, _ = encode_splits(model, small_vader(n_train=32, n_val=16, n_test=16))
    config = jaxtl.TrainConfig(batch_size=16, epochs=1, compress_checkpoints=given)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config, str(tmp_path))
    assert fit(trainer, data["train"], data["validation"]).steps == 2
    found = compressors(str(tmp_path / "checkpoints" / "latest" / "2" / "state"))
    assert found and all(c["id"] == "zstd" for c in found.values()), found
    with pytest.raises(ValueError, match=r"compress_checkpoints \(--compress-checkpoints\) must"):
        jaxtl.TrainConfig(checkpoint={"compress_checkpoints": "yes"})


@pytest.mark.parametrize(
    ("flags", "compress"),
    [((), None), (("--compress-checkpoints",), True), (("--no-compress-checkpoints",), False)],
)
def test_the_cli_flag_reaches_the_train_config(flags, compress):
    from jaxtl.cli.options import train_config
    from jaxtl.cli.parser import build_parser

    args = build_parser().parse_args(["finetune", *flags])
    assert train_config(args, epochs=1).checkpoint.compress_checkpoints is compress
