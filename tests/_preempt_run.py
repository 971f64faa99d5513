"""One process of a 2-process fit that a SIGTERM may preempt; prints a JSON summary.

Usage: python _preempt_run.py MODEL_DIR WORKDIR PROCESS_ID NUM_PROCESSES PORT

A tiny BERT trains for 60 steps (``eval_every=5``) into WORKDIR. A ``Preempted`` fit reports
the step it stopped and checkpointed at; a finished one its step count. With NUM_PROCESSES 1
it is a plain process that resumes WORKDIR to the end (the continuation after a preemption).
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    model_dir, workdir = sys.argv[1], sys.argv[2]
    pid, nproc, port = (int(a) for a in sys.argv[3:6])
    if nproc > 1:
        os.environ.update(
            JAXTL_COORDINATOR=f"127.0.0.1:{port}",
            JAXTL_NUM_PROCESSES=str(nproc),
            JAXTL_PROCESS_ID=str(pid),
        )
        from jaxtl import distributed

        distributed.initialize(timeout_s=60)
    import jax
    from _tiny import small_vader

    import jaxtl
    from jaxtl.checkpoint import Checkpointer
    from jaxtl.data import evaluation_loader, training_loader
    from jaxtl.encoding import encode_splits
    from jaxtl.train import Preempted

    model = jaxtl.load(model_dir, num_labels=2)
    arrays, _ = encode_splits(model, small_vader(n_train=64, n_val=16, n_test=8))
    config = jaxtl.TrainConfig(
        max_steps=60, batch_size=16, learning_rate=1e-3, progress=False, eval_every=5
    )
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config, workdir)
    train = training_loader(arrays["train"], config.data, model, seed=config.seed)
    val = evaluation_loader(arrays["validation"], config.data, devices=trainer.devices)
    summary = {"process": jax.process_index()}
    try:
        result = trainer.fit(train, val, resume=nproc == 1)
        summary.update(finished=result.steps)
    except Preempted as e:
        summary.update(preempted=e.step, signal=e.signal)
    summary["committed"] = Checkpointer(os.path.join(workdir, "checkpoints")).steps()
    print(json.dumps(summary), flush=True)
    if nproc > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
