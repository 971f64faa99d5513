"""One process of a data-parallel fit of a tiny BERT; prints what it read and its results as JSON.

Usage: python _distributed_run.py MODEL_DIR OUT_DIR PROCESS_ID NUM_PROCESSES PORT WORKERS
       [MESH NAME]

MESH (e.g. ``fsdp=8``) shards params and optimizer state over the global mesh, kernels
included (``min_shard_size=256``); the model loads straight onto it
(``jaxtl.load(mesh=...)``), each process putting only its own devices' pieces. The run
checkpoints into ``OUT_DIR/NAME``; a run whose ``OUT_DIR/NAME`` already holds the final
checkpoint restores it (``resume``) and trains no further, on whatever mesh it has. Params go
to ``params_<NAME>_<PROCESS_ID>.npz`` then.

With NUM_PROCESSES > 1 the process joins a ``jax.distributed`` run through
``jaxtl.distributed.initialize()``: from SLURM's variables when the parent set them, else from
``JAXTL_COORDINATOR=127.0.0.1:PORT`` and ``JAXTL_NUM_PROCESSES`` / ``JAXTL_PROCESS_ID``, set
here from the arguments. With 1 it is a plain single-process run (the reference). The CPU device
count per process comes from the parent's ``XLA_FLAGS``. Final params go to
``OUT_DIR/params_<PROCESS_ID>of<NUM_PROCESSES>.npz``; the last stdout line is the JSON summary.

The training source tags every example with its index (``_index``), and the loader handed to
``Trainer.fit`` strips the tag from each batch and records it: ``reads[step]`` are the examples
this process actually read for that step, from whichever grain worker read them.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from jaxtl.data.pipeline import ArraySource

N_TRAIN = 26  # 3 batches of 8 per epoch, 2 examples dropped each epoch
N_VAL = 13  # eval batches of 8: the second holds 5 examples and 3 padding rows
BATCH = 8
EVAL_BATCH = 8
EPOCHS = 2


class IndexedSource(ArraySource):
    """An :class:`ArraySource` whose examples carry their own index (picklable for grain's
    worker processes: this module is importable as ``_distributed_run``)."""

    def __getitem__(self, i: int):
        example = super().__getitem__(i)
        example["_index"] = np.int64(i)
        return example


class RecordingLoader:
    """The trainer's own loader, with each batch's ``_index`` column taken off and recorded."""

    def __init__(self, loader):
        self.loader = loader
        self.reads: list[list[int]] = []

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def epoch(self, epoch: int, start: int = 0):
        for batch in self.loader.epoch(epoch, start):
            self.reads.append(batch.pop("_index").tolist())
            yield batch


def main() -> None:
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    pid, nproc, port, workers = (int(a) for a in sys.argv[3:7])
    mesh, name = (sys.argv[7], sys.argv[8]) if len(sys.argv) > 8 else (None, None)

    if nproc > 1:
        from jaxtl import distributed

        if "SLURM_JOB_ID" not in os.environ:
            os.environ.update(
                JAXTL_COORDINATOR=f"127.0.0.1:{port}",
                JAXTL_NUM_PROCESSES=str(nproc),
                JAXTL_PROCESS_ID=str(pid),
            )
        joined = distributed.initialize(timeout_s=60)
        expected = "slurm" if "SLURM_JOB_ID" in os.environ else "jaxtl"
        assert joined["source"] == expected, joined

    import jax

    assert jax.process_count() == nproc and jax.process_index() == pid

    from _distributed_run import IndexedSource  # the importable name, for grain's workers
    from _tiny import small_vader

    import jaxtl
    from jaxtl import parallel
    from jaxtl.data import evaluation_loader, training_loader
    from jaxtl.encoding import encode_splits
    from jaxtl.transfer.trees import flatten

    placed = {"mesh": mesh, "min_shard_size": 256} if mesh else {}
    model = jaxtl.load(model_dir, num_labels=2, **placed)
    loaded_held = {  # as "held" below, for the params as loaded
        k: max(s.data.size for s in v.addressable_shards) / v.size
        for k, v in flatten(model.params).items()
    }
    arrays, _ = encode_splits(model, small_vader(n_train=N_TRAIN, n_val=N_VAL, n_test=4))
    config = jaxtl.TrainConfig(
        epochs=EPOCHS,
        batch_size=BATCH,
        eval_batch_size=EVAL_BATCH,
        learning_rate=1e-3,
        restore_best=False,  # the final params are the last step's
        data_workers=workers,
        progress=False,
        **({"mesh": mesh, "min_shard_size": 256} if mesh else {}),
    )
    workdir = os.path.join(out_dir, name) if name else None
    plan = jaxtl.make_plan("full", model.structure)
    trainer = jaxtl.Trainer(model, plan, config, workdir)
    loader = training_loader(arrays["train"], config.data, model, seed=config.seed)
    assert (loader.process_index, loader.process_count) == (pid, nproc)
    loader.source = IndexedSource(arrays["train"])
    train = RecordingLoader(loader)
    initial = {k: np.array(v) for k, v in flatten(parallel.to_host(model.params)).items()}
    result = trainer.fit(
        train,
        evaluation_loader(arrays["validation"], config.data, devices=trainer.devices),
        resume=workdir is not None,
    )

    state = result.state
    params = {k: np.asarray(v) for k, v in flatten(parallel.to_host(state.params)).items()}
    moved = max(float(np.max(np.abs(params[k] - initial[k]))) for k in params)
    tag = f"{name}_{pid}" if name else f"{pid}of{nproc}"
    np.savez(os.path.join(out_dir, f"params_{tag}.npz"), **params)
    if name:  # every process takes part (its shards); process 0 writes
        exported = jaxtl.export(
            model, os.path.join(out_dir, f"export_{name}"), state.params, overwrite=True
        )
        assert exported == os.path.join(out_dir, f"export_{name}"), exported

    val = arrays["validation"]
    evaluated = trainer.evaluate(
        state, evaluation_loader(val, config.data, devices=trainer.devices)
    )
    # The same metrics computed directly: all examples at once, on this host.
    inputs = {k: v for k, v in val.items() if k != "label"}
    logits = np.asarray(model.apply(parallel.to_host(state.params), inputs))
    nll = -np.asarray(jax.nn.log_softmax(logits))[np.arange(len(val["label"])), val["label"]]
    direct = {
        "loss": float(nll.mean()),
        "accuracy": float((logits.argmax(-1) == val["label"]).mean()),
    }
    summary = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "mesh": [int(d.process_index) for d in trainer.mesh.devices.flat],
        "mesh_shape": dict(trainer.mesh.shape),
        "held": {  # the largest fraction of each param that one of this process's devices holds
            k: max(s.data.size for s in v.addressable_shards) / v.size
            for k, v in flatten(state.params).items()
        },
        "loaded_held": loaded_held,
        "steps": result.steps,
        "params_moved": moved,
        "steps_per_epoch": loader.steps_per_epoch,
        "reads": train.reads,
        "history": result.history,
        "eval": evaluated,
        "direct": direct,
    }
    print(json.dumps(summary), flush=True)
    if nproc > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
