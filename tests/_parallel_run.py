"""Run a few training steps on N CPU devices and print the loss curve as JSON.

Usage: python _parallel_run.py MODEL_DIR N_DEVICES {jit,pmap} STEPS
Runs in its own process because the device count is fixed when jax starts.
"""

import json
import os
import sys

model_dir, n, mode, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _tiny import small_vader  # noqa: E402

import jaxtl  # noqa: E402
from jaxtl import parallel  # noqa: E402
from jaxtl.data import ArrayLoader, evaluation_loader  # noqa: E402
from jaxtl.encoding import encode_splits  # noqa: E402
from jaxtl.train import steps as jsteps  # noqa: E402

assert jax.device_count() == n, jax.devices()
model = jaxtl.load(model_dir, num_labels=2)
arrays, _ = encode_splits(model, small_vader(n_train=16 * steps, n_val=16, n_test=16))
config = jaxtl.TrainConfig(batch_size=16, learning_rate=1e-3, max_steps=steps, eval_batch_size=8)
trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config)
state = trainer.init_state(steps)
loader = ArrayLoader(arrays["train"], 16, shuffle=True, seed=0, drop_last=True)
losses = []
if mode == "jit":
    train_step, _ = jsteps.compile_steps(state, trainer.mesh)
    for batch in loader.epoch(0):
        state, m = train_step(state, parallel.global_batch(batch, trainer.mesh))
        losses.append(float(m["loss"]))
    params = jax.device_get(state.params)
else:
    train_step, _ = jsteps.pmap_steps()
    rstate = parallel.replicate(jax.device_get(state))
    for batch in loader.epoch(0):
        rstate, m = train_step(rstate, parallel.split_for_pmap(batch, n))
        losses.append(float(m["loss"][0]))
    params = jax.device_get(parallel.unreplicate(rstate.params))
flat = [np.asarray(x).ravel() for x in jax.tree.leaves(params)]
# 13 held-out examples in eval batches of 8: the second batch is partial (5 real, 3 padding rows),
# and on 8 devices some devices hold only padding.
held_out = {k: v[:13] for k, v in arrays["test"].items()}
result = {"losses": losses, "params": np.concatenate(flat)[::97].tolist()}
if mode == "jit":
    result["eval"] = trainer.evaluate(state, evaluation_loader(held_out, config.data, devices=n))
    inputs = {k: v for k, v in held_out.items() if k != "label"}
    logits = np.asarray(model.apply(params, inputs))  # all 13 at once, on one host array
    nll = -np.asarray(jax.nn.log_softmax(logits))[np.arange(13), held_out["label"]]
    right = logits.argmax(-1) == held_out["label"]
    result["direct"] = {"loss": float(nll.mean()), "accuracy": float(right.mean())}
print(json.dumps(result))
