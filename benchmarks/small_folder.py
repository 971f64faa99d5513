"""A new user's first image fine-tune: 48 real photos in a folder, where the time goes.

    python benchmarks/small_folder.py [--out DIR] [-- EXTRA jaxtl finetune FLAGS]
    python benchmarks/small_folder.py --jaxtl-src OLD_CHECKOUT -- --recipe full --no-scratch

Builds an image folder of 48 crops of scikit-image's photographs (2 classes of 24: the cat
photos and the coffee / rocket photos; half JPEG, half PNG, 120-320 px) and runs, in a process
of its own,

    jaxtl finetune --model <the embedded EfficientNet-Lite0 .pth> --data DIR --epochs 3 \\
        --batch-size 8 [EXTRA]

It prints the wall time of the command and, per arm, the seconds of training, evaluation and
checkpoint saves (from each run's results.json; runs of a jaxtl without that record show only
their total). ``--jaxtl-src DIR`` runs another checkout of jaxtl (e.g. the commit before a
change, from ``git worktree add``) with this environment, for a before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def make_folder(root: str, per_class: int = 24, seed: int = 0) -> str:
    """``root/{cat,object}/`` with ``per_class`` random crops each, alternately JPEG and PNG."""
    import numpy as np
    import skimage.data
    from PIL import Image

    classes = {
        "cat": [skimage.data.chelsea(), skimage.data.cat()],
        "object": [skimage.data.coffee(), skimage.data.rocket()],
    }
    rng = np.random.default_rng(seed)
    for name, photos in classes.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            photo = photos[i % len(photos)]
            h, w = photo.shape[:2]
            size = int(rng.integers(120, min(h, w, 320) + 1))
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            crop = Image.fromarray(photo[top : top + size, left : left + size])
            crop.save(os.path.join(root, name, f"{i:02d}.{'jpg' if i % 2 else 'png'}"))
    return root


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=None, help="experiment directory (default: a temp dir)")
    p.add_argument("--jaxtl-src", default=None, help="run the jaxtl package found in this dir")
    p.add_argument("extra", nargs="*", help="more `jaxtl finetune` flags (after --)")
    a = p.parse_args()

    import jaxtl

    work = tempfile.mkdtemp(prefix="jaxtl-small-folder-")
    data = make_folder(os.path.join(work, "photos"))
    out = os.path.abspath(a.out) if a.out else os.path.join(work, "runs")
    cmd = [
        sys.executable,
        "-m",
        "jaxtl.cli",
        "finetune",
        "--model",
        jaxtl.efficientnet_lite0_path(),
    ]
    cmd += ["--data", data, "--epochs", "3", "--batch-size", "8", "--out", out, *a.extra]
    env = dict(os.environ)
    if a.jaxtl_src:
        env["PYTHONPATH"] = os.path.abspath(a.jaxtl_src) + os.pathsep + env.get("PYTHONPATH", "")
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
    print(
        f"CPU {cpu}, load average {os.getloadavg()[0]:.2f}; jaxtl from {a.jaxtl_src or 'install'}"
    )
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    # cwd: a temp dir, so that `python -m` finds jaxtl through PYTHONPATH or the install,
    # never a checkout in the current directory.
    subprocess.run(cmd, check=True, env=env, cwd=work)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "summary.json")) as f:
        results = json.load(f)["results"]
    print(f"\nwall time of the command: {wall:.0f} s (load average now {os.getloadavg()[0]:.2f})")
    print(
        f"{'arm':<26}{'steps':>6}{'fit s':>8}{'train s':>9}{'eval s':>8}{'ckpt s':>8}{'test s':>8}"
    )
    for r in results:
        s = r.get("seconds") or {}
        cells = [f"{s[k]:>{w}.1f}" if k in s else f"{'-':>{w}}" for k, w in
                 (("train", 9), ("evaluation", 8), ("checkpoints", 8), ("test", 8))]  # fmt: skip
        print(f"{r['name']:<26}{r['steps']:>6}{r['train_seconds']:>8.1f}{''.join(cells)}")


if __name__ == "__main__":
    main()
