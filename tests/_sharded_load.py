"""Load checkpoints onto an 8-device CPU mesh and onto the default device; print the comparison.

Usage: python _sharded_load.py BERT_DIR RESNET_DIR

Runs in its own process because the CPU device count is fixed when jax starts. For each load
(BERT pretrained, BERT from scratch, a BatchNorm ResNet), on ``fsdp=8`` with
``min_shard_size=256`` and on the default device, the last stdout line (JSON) holds whether the
values are bitwise equal, each leaf's spec, shape and whether the spec splits it, and the
largest fraction of each leaf that one device holds (from ``addressable_shards``). Each
pretrained BERT load runs under JAX's host-to-device transfer guard at ``log_explicit``: JAX
logs every transfer with its shape and destination to stderr, between the lines
``== BEGIN <name>`` and ``== END <name>`` that this script writes there.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxtl  # noqa: E402
from jaxtl.transfer.trees import flatten  # noqa: E402

assert jax.device_count() == 8, jax.devices()
bert_dir, resnet_dir = sys.argv[1:3]
MESH = {"mesh": "fsdp=8", "min_shard_size": 256}


def logged(name: str, **options):
    """``jaxtl.load(bert_dir, **options)`` with every host-to-device transfer logged."""
    sys.stderr.write(f"== BEGIN {name}\n")
    sys.stderr.flush()
    with jax.transfer_guard_host_to_device("log_explicit"):
        model = jaxtl.load(bert_dir, num_labels=2, **options)
    sys.stderr.write(f"== END {name}\n")
    sys.stderr.flush()
    return model


def compare(placed, default) -> dict:
    a, b = flatten(placed), flatten(default)
    assert a.keys() == b.keys()
    return {
        "equal": all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a),
        "dtypes_equal": all(a[k].dtype == b[k].dtype for k in a),
        "specs": {k: str(x.sharding.spec) for k, x in a.items()},
        "split": {k: any(e is not None for e in x.sharding.spec) for k, x in a.items()},
        "held": {k: max(s.data.size for s in x.addressable_shards) / x.size for k, x in a.items()},
        "sizes": {k: int(x.size) for k, x in a.items()},
        "shapes": {k: list(x.shape) for k, x in a.items()},
        "devices": sorted({len(x.sharding.device_set) for x in a.values()}),
    }


bert_mesh = logged("mesh", **MESH)
bert_default = logged("default")
resnet_mesh = jaxtl.load(resnet_dir, num_labels=3, **MESH)
resnet_default = jaxtl.load(resnet_dir, num_labels=3)
summary = {
    "bert": compare(bert_mesh.params, bert_default.params),
    "report": bert_mesh.report.table(),
    "report_default": bert_default.report.table(),
    "scratch": compare(
        jaxtl.load(bert_dir, num_labels=2, pretrained=False, **MESH).params,
        jaxtl.load(bert_dir, num_labels=2, pretrained=False).params,
    ),
    "resnet": compare(resnet_mesh.params, resnet_default.params),
    "resnet_stats": compare(resnet_mesh.batch_stats, resnet_default.batch_stats),
}
# The model loaded on the mesh runs like the other (jit follows its params' shardings).
batch = {
    "input_ids": np.array([[101, 7592, 2088, 102]], np.int32),
    "attention_mask": np.ones((1, 4), np.int32),
}
summary["logits"] = [
    np.asarray(bert_mesh.apply(bert_mesh.params, batch)).tolist(),
    np.asarray(bert_default.apply(bert_default.params, batch)).tolist(),
]
print(json.dumps(summary))
