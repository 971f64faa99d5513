"""Is the input pipeline the bottleneck? Pipeline throughput vs train-step throughput, one run.

    python benchmarks/input_pipeline.py [--steps 5] [--image-size 224] [--workers 0,2]

For MiniLM-L6 on VADER text and for EfficientNet-Lite0 on images, prints examples/s of
jaxtl's training pipeline alone (grain, shuffling, the per-example work, batching; for images
with augmentation on) next to examples/s that the compiled `full` train step consumes, and
their ratio (> 1: the pipeline keeps up). Also prints the padding waste of VADER's training
batches with one padded length and with length buckets, and, with and without the feature
cache, the wall time of a 10-epoch MiniLM linear probe and the epoch time of last_n(2) after
its first epoch (MiniLM-L6 text, a 12-layer text model of MiniLM-L12's shape, EfficientNet-Lite0
images). Record results in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax

import jaxtl
from jaxtl import parallel
from jaxtl.data import augment, digits, evaluation_loader, training_loader, vader
from jaxtl.data.pipeline import ArraySource, GrainLoader
from jaxtl.data.text import bucket_lengths
from jaxtl.encoding import encode_splits
from jaxtl.train import steps as jsteps


def pipeline_rate(arrays, batch, workers, transform=None, buckets=None, batches=40) -> float:
    """Examples/s of the loader alone over ``batches`` batches (worker start-up included)."""
    loader = GrainLoader(
        ArraySource(arrays),
        batch,
        seed=0,
        transform=transform,
        workers=workers,
        length_buckets=buckets,
    )
    n, start, epoch = 0, time.perf_counter(), 0
    while n < batches:
        for _ in loader.epoch(epoch):
            n += 1
            if n >= batches:
                break
        epoch += 1
    return n * batch / (time.perf_counter() - start)


def step_rate(model, arrays, batch, steps) -> float:
    """Examples/s of the jitted `full` train step (compile and a warm-up step excluded)."""
    config = jaxtl.TrainConfig(batch_size=batch, learning_rate=1e-4, progress=False)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config)
    state = trainer.init_state(steps + 1)
    train_step, _ = jsteps.compile_steps(state, trainer.mesh)
    loader = GrainLoader(ArraySource(arrays), batch, seed=0)
    batches = [
        parallel.global_batch(b, trainer.mesh)
        for _, b in zip(range(steps + 1), loader.epoch(0), strict=False)
    ]
    state, m = train_step(state, batches[0])
    jax.block_until_ready(m)
    start = time.perf_counter()
    for b in batches[1:]:
        state, m = train_step(state, b)
    jax.block_until_ready(m)
    return (len(batches) - 1) * batch / (time.perf_counter() - start)


class _EpochClock:
    """A training loader that notes when each epoch's first batch is asked for: after the
    previous epoch's steps and validation pass."""

    def __init__(self, loader):
        self.loader, self.starts = loader, []

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def epoch(self, epoch: int, start: int = 0):
        self.starts.append(time.perf_counter())
        yield from self.loader.epoch(epoch, start)


def cache_timing(model, data, recipe: str, epochs: int, batch: int) -> dict:
    """Epoch times of ``recipe`` on ``data``, uncached and with the feature cache (an empty one:
    the cached run's first epoch includes the extraction; both first epochs compile), and the
    FLOPs of one compiled train step as XLA counts them."""
    from jaxtl import feature_cache

    arrays, _ = encode_splits(model, data)
    plan = jaxtl.make_plan(recipe, model.structure)
    out = {}
    for cache in (None, "memory"):
        feature_cache._MEMORY.clear()
        config = jaxtl.TrainConfig(
            epochs=epochs, batch_size=batch, learning_rate=1e-3, progress=False, feature_cache=cache
        )
        start = time.perf_counter()
        trained, split_arrays = model, arrays
        if cache:
            trained, split_arrays = feature_cache.cached_run(model, plan, config, arrays, False)
        trainer = jaxtl.Trainer(trained, plan, config)
        clock = _EpochClock(
            training_loader(split_arrays["train"], config.data, trained, seed=config.seed)
        )
        val = evaluation_loader(split_arrays["validation"], config.data, devices=trainer.devices)
        fit = trainer.fit(clock, val)
        ends = [start, *clock.starts[1:], time.perf_counter()]  # epoch boundaries
        test_loader = evaluation_loader(split_arrays["test"], config.data, devices=trainer.devices)
        test = trainer.evaluate(fit.state, test_loader)
        one = next(clock.loader.epoch(0))
        step, _ = jsteps.compile_steps(fit.state, trainer.mesh)
        cost = step.lower(fit.state, parallel.global_batch(one, trainer.mesh)).compile()
        cost = cost.cost_analysis()
        out[cache] = {
            "total": ends[-1] - start,
            "first": ends[1] - start,
            "later": (ends[-1] - ends[1]) / max(1, len(ends) - 2),
            "accuracy": test["accuracy"],
            "flops": (cost[0] if isinstance(cost, list) else cost)["flops"],
        }
    return out


def twelve_layer_text_model(directory: str):
    """A 12-layer BERT of all-MiniLM-L12-v2's shape (hidden 384, FFN 1536, 12 heads) with
    random weights, saved by transformers, with MiniLM-L6's tokenizer. Only 6-layer MiniLM
    installs offline; the cache's speed-up depends on the depth, not on the weights' values."""
    import shutil

    import torch
    import transformers

    from jaxtl import default_model_dir

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    transformers.BertModel(config).save_pretrained(directory)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(default_model_dir(), name), directory)
    return jaxtl.load(directory, num_labels=2)


def cache_lines(text_model, image_model, a) -> list[str]:
    """The feature-cache targets: the whole 10-epoch linear probe; last_n(2)'s epochs after
    the first, on MiniLM-L6 text, a 12-layer text model and EfficientNet-Lite0 images."""
    deep = None
    if a.last_n_epochs:
        with tempfile.TemporaryDirectory() as directory:  # loaded into memory, then removed
            deep = twelve_layer_text_model(directory)
    runs = [
        ("linear_probe", "MiniLM-L6 on VADER", text_model, vader(), a.cache_epochs, "total"),
        ("last_n(2)", "MiniLM-L6 on VADER", text_model, vader(), a.last_n_epochs, "later"),
        (
            "last_n(2)",
            "12-layer MiniLM-L12 shape (random weights) on VADER",
            deep,
            vader(),
            a.last_n_epochs,
            "later",
        ),
        (
            "last_n(2)",
            f"EfficientNet-Lite0 {a.image_size}px on digits",
            image_model,
            digits(),
            a.last_n_epochs,
            "later",
        ),
    ]
    lines = []
    for recipe, what, model, data, epochs, key in runs:
        if not epochs:
            continue
        t = cache_timing(model, data, recipe, epochs, a.batch)
        plain, cached = t[None], t["memory"]
        lines.append(
            f"{recipe}, {what}, {epochs} epochs: uncached {plain['total']:.0f} s (first epoch "
            f"{plain['first']:.1f} s, later {plain['later']:.1f} s/epoch, test acc "
            f"{plain['accuracy']:.4f}); cached {cached['total']:.0f} s (first epoch "
            f"{cached['first']:.1f} s, later {cached['later']:.1f} s/epoch, test acc "
            f"{cached['accuracy']:.4f}): {plain[key] / cached[key]:.1f}x faster "
            f"({'whole run' if key == 'total' else 'per epoch after the first'}); train-step "
            f"FLOPs {plain['flops'] / cached['flops']:.2f}x fewer"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=5, help="timed train steps per model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", default="0,2", help="grain worker counts to time")
    p.add_argument("--augment", default="random_resized_crop(0.35),hflip")
    p.add_argument(
        "--cache-epochs", type=int, default=10, help="linear-probe epochs for the cache timing"
    )
    p.add_argument(
        "--last-n-epochs",
        type=int,
        default=3,
        help="last_n(2) epochs for the cache timings (text and images)",
    )
    a = p.parse_args()
    workers = [int(w) for w in a.workers.split(",")]
    rows = []

    from jaxtl import default_model_dir, efficientnet_lite0_path

    text_model = jaxtl.load(default_model_dir(), num_labels=2)
    text, _ = encode_splits(text_model, vader())
    buckets = bucket_lengths(text["train"]["attention_mask"].shape[1])
    plain = GrainLoader(ArraySource(text["train"]), a.batch, seed=0)
    bucketed = GrainLoader(ArraySource(text["train"]), a.batch, seed=0, length_buckets=buckets)
    print(
        f"VADER train split ({plain.num_examples} texts, padded length "
        f"{text['train']['input_ids'].shape[1]}): padding waste {100 * plain.padding_waste():.1f}% "
        f"with one length, {100 * bucketed.padding_waste():.1f}% with buckets {buckets}"
    )
    consumed = step_rate(text_model, text["train"], a.batch, a.steps)
    for w in workers:
        fed = pipeline_rate(text["train"], a.batch, w)
        rows.append(
            ["MiniLM-L6 text", w, "-", f"{fed:,.0f}", f"{consumed:,.1f}", f"{fed / consumed:,.0f}x"]
        )

    image_model = jaxtl.load(
        efficientnet_lite0_path(), num_labels=10, in_channels=1, image_size=a.image_size
    )
    images, _ = encode_splits(image_model, digits())
    consumed = step_rate(image_model, images["train"], a.batch, a.steps)
    transform = augment.parse(a.augment)
    for w in workers:
        fed = pipeline_rate(images["train"], a.batch, w, transform=transform, batches=20)
        rows.append(
            [
                f"EfficientNet-Lite0 {a.image_size}px",
                w,
                a.augment,
                f"{fed:,.0f}",
                f"{consumed:,.1f}",
                f"{fed / consumed:,.0f}x",
            ]
        )

    for line in cache_lines(text_model, image_model, a):
        print(line)

    headers = ["model", "workers", "augment", "pipeline ex/s", "train step ex/s", "pipeline / step"]
    print(jaxtl.report.format_table(headers, rows))
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s), batch {a.batch}")


if __name__ == "__main__":
    main()
