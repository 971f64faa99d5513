"""A fit whose checkpoint writes start failing mid-run, as on a full disk; prints a JSON summary.

Usage: python _write_fault_run.py MODEL_DIR WORKDIR

Checkpoints every 3 steps. Once step 3's has committed, this process's file-size limit
(RLIMIT_FSIZE) drops to 64 KiB, so every checkpoint file written from then on fails with EFBIG
("File too large") in the storage layer itself, as ENOSPC would on a full disk; SIGXFSZ is
ignored so that the write returns the error instead of killing the process. Then the limit is
lifted, the run resumed, and its params compared with those of a run that never failed. The
last stdout line says where the fit stopped, with what error, what was left on disk, and how
the resumed run ended.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time


class FailingWritesAfter:
    """The training loader; once checkpoint ``step`` has committed (looked for as it hands out
    batch ``step + 3``, by when that save has started: batches are read 2 ahead), files may
    grow to 64 KiB at most, so the next save fails."""

    def __init__(self, loader, checkpoints: str, step: int):
        self.loader, self.served = loader, 0
        self.committed, self.step = os.path.join(checkpoints, "latest", str(step)), step

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def epoch(self, epoch: int, start: int = 0):
        for batch in self.loader.epoch(epoch, start):
            self.served += 1
            if self.served == self.step + 3:
                deadline = time.monotonic() + 120
                while not os.path.isdir(self.committed) and time.monotonic() < deadline:
                    time.sleep(0.01)
                _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
                resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
            yield batch


def main() -> None:
    model_dir, workdir = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    import jax
    import numpy as np
    from _tiny import small_vader

    import jaxtl
    from jaxtl.checkpoint import Checkpointer
    from jaxtl.data import training_loader
    from jaxtl.encoding import encode_splits

    model = jaxtl.load(model_dir, num_labels=2)
    arrays, _ = encode_splits(model, small_vader(n_train=160, n_val=16, n_test=16))
    config = jaxtl.TrainConfig(
        epochs=2, batch_size=16, learning_rate=1e-3, progress=False, checkpoint_every=3,
        max_to_keep=1, log_every=1,
    )  # fmt: skip
    plan = jaxtl.make_plan("full", model.structure)
    checkpoints = os.path.join(workdir, "checkpoints")
    loader = training_loader(arrays["train"], config.data, model)
    summary = {}
    try:
        jaxtl.Trainer(model, plan, config, workdir).fit(FailingWritesAfter(loader, checkpoints, 3))
    except Exception as e:  # what the user sees
        summary.update(error=type(e).__name__, message=str(e))
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space again
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    summary.update(
        last_step_logged=max(r["step"] for r in records),
        left_behind=sorted(os.listdir(os.path.join(checkpoints, "latest"))),
        committed=Checkpointer(checkpoints).steps(),
    )
    resumed = jaxtl.Trainer(model, plan, config, workdir).fit(loader, resume=True)
    reference = jaxtl.Trainer(model, plan, config, workdir + "-reference").fit(loader)
    same = jax.tree.map(
        lambda a, b: bool(np.array_equal(a, b)), resumed.state.params, reference.state.params
    )
    summary.update(
        resumed_steps=resumed.steps,
        after_resume=sorted(os.listdir(os.path.join(checkpoints, "latest"))),
        same_as_uninterrupted=all(jax.tree.leaves(same)),
    )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
