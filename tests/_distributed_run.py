"""One process of a data-parallel fit of a tiny BERT; prints what it read and its results as JSON.

Usage: python _distributed_run.py MODEL_DIR OUT_DIR PROCESS_ID NUM_PROCESSES PORT WORKERS

With NUM_PROCESSES > 1 the process joins a ``jax.distributed`` run whose coordinator listens on
``127.0.0.1:PORT``; with 1 it is a plain single-process run (the reference). The CPU device
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

    import jax

    if nproc > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=nproc,
            process_id=pid,
            initialization_timeout=60,
            heartbeat_timeout_seconds=30,
        )
    assert jax.process_count() == nproc and jax.process_index() == pid

    from _distributed_run import IndexedSource  # the importable name, for grain's workers
    from _tiny import small_vader

    import jaxtl
    from jaxtl.data import evaluation_loader, training_loader
    from jaxtl.run import encode_splits
    from jaxtl.transfer.trees import flatten

    model = jaxtl.load(model_dir, num_labels=2)
    arrays, _ = encode_splits(model, small_vader(n_train=N_TRAIN, n_val=N_VAL, n_test=4))
    config = jaxtl.TrainConfig(
        epochs=EPOCHS,
        batch_size=BATCH,
        eval_batch_size=EVAL_BATCH,
        learning_rate=1e-3,
        restore_best=False,  # the final params are the last step's
        data_workers=workers,
        progress=False,
    )
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config)
    loader = training_loader(arrays["train"], config.data, model, seed=config.seed)
    assert (loader.process_index, loader.process_count) == (pid, nproc)
    loader.source = IndexedSource(arrays["train"])
    train = RecordingLoader(loader)
    initial = {k: np.array(v) for k, v in flatten(jax.device_get(model.params)).items()}
    result = trainer.fit(
        train, evaluation_loader(arrays["validation"], config.data, devices=trainer.devices)
    )

    state = result.state
    params = {k: np.asarray(v) for k, v in flatten(jax.device_get(state.params)).items()}
    moved = max(float(np.max(np.abs(params[k] - initial[k]))) for k in params)
    np.savez(os.path.join(out_dir, f"params_{pid}of{nproc}.npz"), **params)

    val = arrays["validation"]
    evaluated = trainer.evaluate(
        state, evaluation_loader(val, config.data, devices=trainer.devices)
    )
    # The same metrics computed directly: all examples at once, on this host.
    inputs = {k: v for k, v in val.items() if k != "label"}
    logits = np.asarray(model.apply(jax.device_get(state.params), inputs))
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
