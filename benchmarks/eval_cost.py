"""What evaluating a split costs against a plain forward pass over the same examples.

    python benchmarks/eval_cost.py [--sizes 4,100,1000] [--models minilm,lite0] [--repeats 3]
    python benchmarks/eval_cost.py --separate   # each measurement in a process of its own

For MiniLM-L6 on VADER texts and EfficientNet-Lite0 at 224 px on real photographs (scikit-image),
and for splits of 4, 100 and 1,000 examples, it times

- ``eval``: ``Trainer.evaluate`` over ``jaxtl.data.evaluation_loader`` (what every validation and
  test pass of a run does: batches of at most ``eval_batch_size`` = 256 rows, the last one padded
  only to the next of a few sizes, weighted metric sums per batch, one fetch at the end);
- ``forward``: the model's own jitted forward over exactly those examples, in chunks of 256
  with an exact-size last chunk, every output fetched (what a hand-written loop would run);
- ``padded to 256``: the evaluation jaxtl ran before (every batch padded to 256 rows), for the
  record.

and prints the ratio eval / forward (target <= 1.5 at every size). Compilation is left out: each
side runs once before it is timed, and the medians are over alternating rounds (eval, forward,
padded; then the next round), so slow phases of the machine fall on all three: ``--repeats``
rounds, or up to 50 when a pass is short. The padded side is skipped from 256 examples on,
where it computes at most 2.4% more rows than the new evaluation. ``--separate`` runs each
(model, size, side) in a fresh process instead, which also rules out one side warming caches
for the other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIDES = ("eval", "forward", "padded to 256")


def _machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
    return f"CPU {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"


def _photos(n: int):
    """``n`` real photographs (scikit-image's, cycled), as uint8 RGB arrays of varied sizes."""
    import numpy as np
    import skimage.data

    names = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")
    images = [np.asarray(getattr(skimage.data, name)())[..., :3] for name in names]
    return [images[i % len(images)] for i in range(n)]


def build(model_name: str, n: int):
    """``(model, arrays)``: the model and the model inputs of an ``n``-example split."""
    import numpy as np

    import jaxtl
    from jaxtl.encoding import encode_splits

    if model_name == "minilm":
        model = jaxtl.load(jaxtl.default_model_dir(), num_labels=2)
        arrays, _ = encode_splits(model, jaxtl.data.vader())
        return model, {k: v[:n] for k, v in arrays["train"].items()}
    if model_name == "lite0":
        model = jaxtl.load(jaxtl.efficientnet_lite0_path(), num_labels=2)
        prep = model.extras["preprocessing"]
        pixels = np.concatenate([prep(img[None]) for img in _photos(n)])
        return model, {"pixel_values": pixels, "label": np.arange(n) % 2}
    raise ValueError(f"unknown model {model_name!r}: expected minilm or lite0")


class Sides:
    """The three ways of scoring the same examples, each compiled before it is timed."""

    def __init__(self, model, arrays):
        import jax

        import jaxtl
        from jaxtl.data import ArrayLoader, evaluation_loader

        self.jax = jax
        self.model, self.arrays = model, arrays
        self.inputs = {k: v for k, v in arrays.items() if k != "label"}
        config = jaxtl.TrainConfig(progress=False)
        self.trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config)
        self.state = self.trainer.init_state(1)
        self.loader = evaluation_loader(arrays, config.data, devices=self.trainer.devices)
        self.padded = ArrayLoader(arrays, 256, shuffle=False, drop_last=False)
        self.params = jax.device_get(self.state.params)
        self.stats = jax.device_get(self.state.batch_stats)

    def run(self, side: str) -> None:
        if side == "eval":
            self.trainer.evaluate(self.state, self.loader)
        elif side == "padded to 256":
            self.trainer.evaluate(self.state, self.padded)
        else:
            n = len(self.arrays["label"])
            for start in range(0, n, 256):
                chunk = {k: v[start : start + 256] for k, v in self.inputs.items()}
                out, _ = self.model.forward(self.params, self.stats, chunk)
                self.jax.device_get(out)

    def time(self, side: str) -> float:
        t = time.perf_counter()
        self.run(side)
        return time.perf_counter() - t


def measure(model_name: str, n: int, repeats: int, sides=SIDES) -> dict[str, float]:
    """Median seconds of each side, compile excluded. ``eval`` and ``forward`` alternate round
    by round (the compared pair shares every phase of the machine); the old padded evaluation
    is timed after them, on its own, so that its large batches do not slow the small ones. Each
    gets ``repeats`` rounds, or as many as fit in about five seconds (up to 50), so that a 10 ms
    pass is not judged on a few samples."""
    s = Sides(*build(model_name, n))
    if n >= 256:  # padding to 256 adds at most 2.4% rows here: not worth the minutes at 224 px
        sides = tuple(side for side in sides if side != "padded to 256")
    for side in sides:  # compiles every shape of the side (full batches and the last one)
        s.run(side)
    out = {}
    for group in [
        [x for x in sides if x != "padded to 256"],
        [x for x in sides if x == "padded to 256"],
    ]:
        if not group:
            continue
        probe = sum(s.time(side) for side in group)
        rounds = max(repeats, min(50, int(5.0 / max(probe, 1e-3))))
        times = {side: [] for side in group}
        for _ in range(rounds):
            for side in group:
                times[side].append(s.time(side))
        out.update({side: statistics.median(t) for side, t in times.items()})
        out.setdefault("rounds", rounds)
    return out


def _separate(model_name: str, n: int, repeats: int) -> dict[str, float]:
    out = {}
    for side in SIDES:
        if side == "padded to 256" and n >= 256:
            continue
        cmd = [sys.executable, __file__, "--one", f"{model_name},{n},{side}"]
        cmd += ["--repeats", str(repeats)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        out.update(json.loads(line.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="4,100,1000", help="split sizes (examples)")
    p.add_argument("--models", default="minilm,lite0", help="minilm and/or lite0 (224 px)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per side (median)")
    p.add_argument("--separate", action="store_true", help="one process per measurement")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # MODEL,N,SIDE (for --separate)
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args()
    if a.one:
        model_name, n, side = a.one.split(",", 2)
        print(json.dumps(measure(model_name, int(n), a.repeats, sides=(side,))))
        return
    print(_machine(), "| separate processes" if a.separate else "| in-process, alternating")
    rows = []
    header = f"{'model':<8}{'examples':>9}" + "".join(f"{s + ' s':>16}" for s in SIDES)
    print(header + f"{'eval / forward':>16}{'padded / forward':>18}{'rounds':>8}")
    for model_name in a.models.split(","):
        for n in (int(x) for x in a.sizes.split(",")):
            fn = _separate if a.separate else measure
            t = fn(model_name, n, a.repeats)
            ratio = t["eval"] / t["forward"]
            before = t["padded to 256"] / t["forward"] if "padded to 256" in t else None
            rows.append({"model": model_name, "examples": n, **t, "ratio": ratio})
            cells = "".join(f"{t[s]:>16.4f}" if s in t else f"{'-':>16}" for s in SIDES)
            old = f"{before:>18.2f}" if before is not None else f"{'-':>18}"
            print(f"{model_name:<8}{n:>9}{cells}{ratio:>16.2f}{old}{t['rounds']:>8}", flush=True)
    worst = max(r["ratio"] for r in rows)
    print(
        f"worst eval / forward: {worst:.2f} (target <= 1.5: {'met' if worst <= 1.5 else 'NOT met'})"
    )
    print(_machine())
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
