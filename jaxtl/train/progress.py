"""What a fit writes and shows as it goes: ``metrics.jsonl``, the progress line, and where the
time went (training, evaluation, checkpoint saves).

Nothing here touches the device per step: train-step metrics stay on the device until
:meth:`TrainMetrics.flush` fetches them, once per ``log_every`` steps and before evaluations.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxtl.train.faults import OutputWriteError

__all__ = ["Clock", "MetricsLog", "TrainMetrics", "progress_bar"]


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records past the restored step are dropped
    (those steps are about to be redone), so the file always describes one run. Each record
    also goes to the attached ``loggers`` (:mod:`jaxtl.train.loggers`)."""

    def __init__(self, path: str | None):
        self.path = path
        self.loggers: list = []

    def close_loggers(self) -> None:
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()

    def truncate_after(self, step: int) -> None:
        if not self.path or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            records = [(line, _record(line)) for line in f if line.strip()]
        # A line cut short by a failed write (a full disk) is dropped with the steps after it.
        keep = [line for line, r in records if r is not None and r.get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in keep)

    def write(self, record: dict) -> None:
        """Append ``record``.

        Raises:
          OutputWriteError: the file cannot be written (its directory deleted, a full disk,
            made read-only), saying which and what is kept.
        """
        if self.path:
            size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                with contextlib.suppress(OSError):  # no half line left for --resume to read
                    os.truncate(self.path, size)
                raise OutputWriteError(self.path, os.path.dirname(self.path), e) from e
        for logger in self.loggers:
            logger.write(record)


def _record(line: str) -> dict | None:
    """One ``metrics.jsonl`` line, or None for one that a failed write cut short."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class Clock:
    """Wall seconds of a fit split into ``train`` (steps, data, compilation), ``evaluation``
    and ``checkpoints`` (the blocking part of saves: orbax writes the rest in the background).

    Example:
      >>> clock = Clock()
      >>> with clock.timing("evaluation"):
      ...     pass
      >>> sorted(clock.seconds())
      ['checkpoints', 'evaluation', 'train']
    """

    PARTS = ("evaluation", "checkpoints")

    def __init__(self):
        self.start = time.perf_counter()
        self.spent = dict.fromkeys(self.PARTS, 0.0)

    @contextlib.contextmanager
    def timing(self, part: str):
        """Adds the wall time of the ``with`` block to ``part``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.spent[part] += time.perf_counter() - t

    def seconds(self) -> dict[str, float]:
        """``{"train": s, "evaluation": s, "checkpoints": s}`` so far."""
        total = time.perf_counter() - self.start
        return {"train": total - sum(self.spent.values()), **self.spent}

    def line(self) -> str:
        """e.g. ``"time: train 20.1 s (87%), evaluation 1.2 s (5%), checkpoints 1.8 s (8%)"``."""
        seconds = self.seconds()
        total = max(sum(seconds.values()), 1e-9)
        parts = [f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in seconds.items()]
        return "time: " + ", ".join(parts)


class TrainMetrics:
    """Train-step metrics held on the device until :meth:`flush` averages them into one
    ``metrics.jsonl`` record (with the learning rate and the samples per second)."""

    def __init__(
        self,
        log: MetricsLog,
        schedule: Callable[[int], Any],
        steps_per_epoch: int,
        batch_size: int,
        bar: Any = None,
    ):
        self.log, self.schedule, self.spe = log, schedule, steps_per_epoch
        self.batch_size, self.bar = batch_size, bar
        self.pending: list[dict] = []
        self.t_last = time.perf_counter()

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, step: int, skipped: int = 0) -> None:
        """Write one record of the pending steps; ``skipped``: the run's non-finite steps so
        far (recorded when any)."""
        if not self.pending:
            return
        host = jax.device_get(self.pending)
        now = time.perf_counter()
        # Skipped (non-finite) steps changed nothing: their NaN loss stays out of the means.
        flags = [bool(m.pop("skipped", 0)) for m in host]
        kept = [m for m, bad in zip(host, flags, strict=True) if not bad]
        rec = {k: float(np.mean([m[k] for m in kept])) if kept else None for k in host[0]}
        if skipped:
            rec["skipped_steps"] = skipped
        rec.update(
            split="train",
            step=step,
            epoch=step / self.spe,
            lr=float(self.schedule(step - 1)),
            samples_per_s=len(host) * self.batch_size / max(now - self.t_last, 1e-9),
        )
        self.log.write(rec)
        if self.bar is not None and rec["loss"] is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", samples_s=f"{rec['samples_per_s']:.0f}")
        self.pending, self.t_last = [], now

    def restart_clock(self) -> None:
        """Evaluation and saving are not training: samples per second leaves them out."""
        self.t_last = time.perf_counter()


def progress_bar(total: int, initial: int, enabled: bool | None):
    """A tqdm bar over the steps, or None; ``enabled=None``: only on a terminal."""
    if enabled is None:
        enabled = sys.stdout.isatty() and sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)
