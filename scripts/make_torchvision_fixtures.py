"""Writes the torchvision parity fixtures in ``tests/fixtures/torchvision/``.

Runs only in a throwaway venv with the real torchvision (not a jaxtl dependency: the torch
build it needs is ~5.5 GB). To regenerate, from the repo root:

    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy
    /tmp/tvenv/bin/python scripts/make_torchvision_fixtures.py [NAME ...]

(with names: only those cases; see ``tests/fixtures/torchvision/README.md`` for the CPU-wheel
route that made ``resnext50_32x4d.npz`` and ``wide_resnet50_2.npz``).

For each case the model is built with ``weights=None``, filled (strict ``load_state_dict``)
with ``tests/_seeded_weights.seeded_state_dict(spec, seed)``, put in eval mode, and run in
float32 on ``np.random.default_rng(seed).standard_normal((2, 3, H, W), np.float32)``.
Each ``<name>.npz`` holds only what the weights cannot regenerate:

* ``input``: the NCHW float32 input.
* ``logits``: the model's float32 output.
* ``features``: the pooled, flattened pre-classifier features (the input of ``fc`` for
  ResNet / Inception, of ``classifier`` for VGG / AlexNet), float32.
* ``spec``: JSON list of ``[key, shape, dtype]`` in state-dict order.
* ``seed``: the int seed.
* ``meta``: JSON with the arch, constructor kwargs, torch / torchvision versions and this
  script's path.
* for the cases in ``GRADS``: ``grad_weights`` and ``grad__<param name>``, the gradient of
  ``sum(logits * grad_weights)`` (eval mode) with respect to each listed weight (PyTorch layout).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torchvision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests._seeded_weights import seeded_state_dict  # noqa: E402

OUT_DIR = os.path.join(REPO, "tests", "fixtures", "torchvision")
SCRIPT = "scripts/make_torchvision_fixtures.py"

# (name, arch, constructor kwargs, (H, W), seed, head attribute whose input is `features`)
CASES = [
    ("resnet18", "resnet18", {"num_classes": 10}, (64, 64), 0, "fc"),
    ("resnet34", "resnet34", {"num_classes": 10}, (64, 64), 0, "fc"),
    ("resnet50", "resnet50", {"num_classes": 10}, (64, 64), 0, "fc"),
    ("resnext50_32x4d", "resnext50_32x4d", {"num_classes": 10}, (64, 64), 0, "fc"),
    ("wide_resnet50_2", "wide_resnet50_2", {"num_classes": 10}, (64, 64), 0, "fc"),
    ("vgg16", "vgg16", {"num_classes": 10}, (64, 64), 0, "classifier"),
    ("alexnet", "alexnet", {"num_classes": 10}, (127, 127), 0, "classifier"),
    (
        "inception_v3",
        "inception_v3",
        {"num_classes": 10, "aux_logits": True, "init_weights": False, "transform_input": True},
        (139, 139),
        0,
        "fc",
    ),
]


# Cases that also store the gradient of ``sum(logits * grad_weights)`` (eval mode) with respect
# to these weights: ResNeXt's grouped convolutions, whose kernel gradient jaxtl computes its own
# way on CPU (jaxtl.models.conv). The first block of the first two stages keeps the file small.
GRADS = {"resnext50_32x4d": ("layer1.0.conv2.weight", "layer2.0.conv2.weight")}


def make_case(name, arch, kwargs, hw, seed, head):
    """Builds one fixture dict (the arrays and JSON strings for the .npz)."""
    model = getattr(torchvision.models, arch)(weights=None, **kwargs)
    spec = [
        [k, [int(s) for s in v.shape], str(v.dtype).removeprefix("torch.")]
        for k, v in model.state_dict().items()
    ]
    weights = seeded_state_dict([(k, tuple(s), d) for k, s, d in spec], seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    model.eval()

    captured = {}

    def hook(_module, args):
        captured["features"] = args[0].detach().clone()

    handle = getattr(model, head).register_forward_pre_hook(hook)
    x = np.random.default_rng(seed).standard_normal((2, 3, *hw), np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    handle.remove()
    if not isinstance(logits, torch.Tensor):  # InceptionOutputs only in training mode
        raise TypeError(f"{name}: expected a tensor in eval mode, got {type(logits)}")
    grads = {}
    if name in GRADS:
        w = np.random.default_rng(seed + 1).standard_normal(tuple(logits.shape), np.float32)
        (model(torch.from_numpy(x)) * torch.from_numpy(w)).sum().backward()
        params = dict(model.named_parameters())
        grads = {f"grad__{k}": params[k].grad.numpy().copy() for k in GRADS[name]}
        grads["grad_weights"] = w
    meta = {
        "arch": arch,
        "kwargs": {"weights": None, **kwargs},
        "input_shape": list(x.shape),
        "features_from": f"input of model.{head}",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "script": SCRIPT,
    }
    return {
        "input": x,
        "logits": logits.numpy().astype(np.float32),
        "features": captured["features"].numpy().astype(np.float32),
        "spec": np.array(json.dumps(spec)),
        "seed": np.array(seed, np.int64),
        "meta": np.array(json.dumps(meta, sort_keys=True)),
        **grads,
    }


def main():
    """Writes every case, or only those named on the command line."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(OUT_DIR, exist_ok=True)
    names = sys.argv[1:]
    unknown = sorted(set(names) - {case[0] for case in CASES})
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {[case[0] for case in CASES]}")
    for case in CASES:
        if names and case[0] not in names:
            continue
        name = case[0]
        arrays = make_case(*case)
        logits = arrays["logits"]
        if not np.all(np.isfinite(logits)):
            raise FloatingPointError(f"{name}: non-finite logits")
        path = os.path.join(OUT_DIR, f"{name}.npz")
        np.savez_compressed(path, **arrays)
        print(
            f"{name:13s} logits {tuple(logits.shape)} max|logits|={np.abs(logits).max():.4g} "
            f"features {tuple(arrays['features'].shape)} "
            f"max|features|={np.abs(arrays['features']).max():.4g} "
            f"-> {os.path.relpath(path, REPO)} ({os.path.getsize(path)} B)"
        )


if __name__ == "__main__":
    main()
