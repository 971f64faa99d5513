"""What a fit does when a step or its machine fails, so that nothing saved is lost.

- **Non-finite steps.** The jitted step skips an update whose loss or trainable gradient is
  NaN/inf (params and optimizer state unchanged, :func:`jaxtl.train.steps.train_step`) and
  returns ``skipped``. :class:`BadSteps` reads those flags as they become ready, without
  stalling dispatch, and stops the run with :class:`NonFiniteStepsError` after
  ``max_bad_steps`` skips in a row.
- **Preemption.** :class:`StopSignals` turns SIGTERM (a scheduler's notice) and SIGINT (Ctrl-C)
  into a request the loop honours after the current step: it saves a checkpoint of that step,
  waits for it to commit, and raises :class:`Preempted`, which says how to resume. A second
  Ctrl-C interrupts at once. In a multi-process run every process must save the same step, so
  the step comes from jax's preemption sync point (the coordination service hears SIGTERM on
  any process and picks the first step every process can still reach).
- **Output that cannot be written.** :func:`writable_dir` refuses a read-only or otherwise
  unwritable run directory before anything loads or compiles, and :func:`earlier_results`
  finds an earlier run's results there, which a command refuses to write over unless it is
  resuming that run. Mid-run, a metrics write that
  fails is an :class:`OutputWriteError` that says whether the directory is gone (deleted,
  moved or unmounted: its checkpoints with it, unless it is put back) or only unwritable (a
  full disk, or permissions: its checkpoints are kept for ``--resume``); a failed save is a
  :class:`jaxtl.checkpoint.CheckpointWriteError`.
"""

from __future__ import annotations

import collections
import errno
import os
import signal
import sys
import tempfile
import threading
from typing import Any

import jax

__all__ = [
    "BadSteps",
    "NonFiniteStepsError",
    "OutputWriteError",
    "Preempted",
    "StopSignals",
    "committed_steps",
    "earlier_results",
    "refuse_earlier_results",
    "writable_dir",
]


def writable_dir(directory: str, what: str = "workdir (--out)", *, create: bool = True) -> str:
    """Prove a file can be written in ``directory`` before a run spends anything on loading
    or compiling; returns it. With ``create``, the directory is made; without, a missing one
    is left missing and its nearest existing parent is tried instead (a command checks its
    flags before it creates anything).

    Raises:
      ValueError: it cannot be created or written (a read-only disk, permissions, a file of
        that name), naming ``what`` (the argument and its flag) and the cause.
    """
    try:
        probe = os.path.abspath(directory)
        if create:
            os.makedirs(directory, exist_ok=True)
        else:
            while not os.path.exists(probe) and os.path.dirname(probe) != probe:
                probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise NotADirectoryError(errno.ENOTDIR, f"{probe} is a file", probe)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ValueError(
            f"{what} {directory!r} cannot be written ({e.strerror or e}): a run directory "
            "holds the checkpoints and metrics, so choose one on a writable disk or fix its "
            "permissions."
        ) from e
    return directory


def writable_file(path: str, what: str) -> str:
    """``path`` (``~`` expanded) as a file a command can write when it is done: not a
    directory, in a directory that exists and can be written. Checked before the work, so the
    work is not lost to a mistyped path."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory; give a file name, e.g. {path}/out.json.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        state = "is a file" if os.path.exists(parent) else "does not exist"
        raise ValueError(f"{what} {path!r}: its directory {parent!r} {state}; give another path.")
    writable_dir(parent, what, create=False)
    return path


# The files jaxtl's commands write at the top of an output directory or of a run directory in
# it: one of them there means the results of an earlier command.
RESULT_FILES = (
    "run.json", "summary.json", "sweep.json", "lr_find.json", "rank.json", "adapt.json",
)  # fmt: skip


def committed_steps(checkpoints: str) -> list[int]:
    """The steps a run directory's ``checkpoints`` folder holds committed (orbax names a step's
    folder by its number once the save is whole), in ``latest`` and ``best``, oldest first."""
    steps = set()
    for manager in ("latest", "best"):
        try:
            names = os.listdir(os.path.join(checkpoints, manager))
        except OSError:  # none saved there yet
            continue
        steps.update(int(n) for n in names if n.isdigit())
    return sorted(steps)


def earlier_results(directory: str, depth: int = 3, limit: int = 10_000) -> str | None:
    """The path of the first result of an earlier jaxtl command found in ``directory`` or its
    subdirectories down to ``depth`` levels (a preset's ``OUT/all/pretrained-full``, a sweep's
    ``OUT/cells/NAME``): one of :data:`RESULT_FILES`, or a ``checkpoints`` folder with a
    committed step (a run stopped before it wrote anything else); or None. At most ``limit``
    entries are looked at, so a large unrelated tree costs little."""
    level, seen = [directory], 0
    for _ in range(depth):
        below = []
        for d in level:
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:  # missing, not a directory, or unreadable: nothing found there
                continue
            for entry in entries:  # a result file first: it says more than checkpoints
                if entry.name in RESULT_FILES and entry.is_file():
                    return entry.path
            for entry in entries:
                if entry.name == "checkpoints" and committed_steps(entry.path):
                    return entry.path
            below += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
            seen += len(entries)
            if seen > limit:
                return None
        level = below
    return None


def refuse_earlier_results(directory: str, what: str, resume_flag: str | None) -> None:
    """Raise if ``directory`` holds an earlier command's results, before anything writes there.

    Process 0 looks (it alone writes the shared files, so another process could see this
    run's own), and every process gets its answer: all of them refuse, or none does.

    Args:
      directory: the output directory about to be written.
      what: the argument and its flag, e.g. ``"out (--out)"``.
      resume_flag: how this command continues an earlier run (``"resume=True (--resume)"``),
        or None where it cannot.

    Raises:
      ValueError: naming the file found and the ways on: resume it, or another directory.
    """
    from jaxtl.distributed import is_primary, primarys

    found = earlier_results(directory) if is_primary() else None
    if not primarys(found is not None):
        return
    how = f"Continue it with {resume_flag}, or choose" if resume_flag else "Choose"
    raise ValueError(
        f"{what} {directory!r} already holds the results of an earlier run "
        f"({found or 'found by process 0'}), which writing there would replace. {how} another "
        f"{what}, or remove that directory first. Nothing was changed."
    )


class OutputWriteError(OSError):
    """Writing ``path`` in the run directory ``workdir`` failed mid-run (``cause``); the
    message says whether the directory still exists, and so whether its checkpoints do."""

    def __init__(self, path: str, workdir: str, cause: BaseException):
        self.path, self.workdir = path, workdir
        reason = getattr(cause, "strerror", None) or cause
        if os.path.isdir(workdir):
            fix = (
                "the disk is full or the directory was made read-only; the checkpoints saved "
                "there are kept, so free space or fix its permissions, then continue with "
                "resume=True (--resume)."
            )
        else:
            fix = (
                f"the run directory {workdir} no longer exists: it was deleted, moved or "
                "unmounted while the run trained. If it was moved or unmounted, put it back "
                "and continue with resume=True (--resume); if deleted, start the run again "
                "(workdir / --out)."
            )
        super().__init__(f"Writing {path} failed ({type(cause).__name__}: {reason}); {fix}")


class NonFiniteStepsError(FloatingPointError):
    """``max_bad_steps`` steps in a row had a NaN/inf loss or gradient. ``steps`` lists them
    (global step numbers, counted from 1); their updates were skipped."""

    def __init__(self, steps: list[int], limit: int):
        self.steps = list(steps)
        first, last = self.steps[0], self.steps[-1]
        span = f"step {first}" if first == last else f"steps {first}-{last}"
        super().__init__(
            f"{span} ({len(self.steps)} in a row) had a non-finite loss or gradient, so the run "
            f"stopped at max_bad_steps={limit} (--max-bad-steps). Their updates were skipped: "
            f"the params are those after step {first - 1}, and every checkpoint saved so far "
            "is intact. Lower the learning rate (learning_rate= / --lr), check the data for "
            "NaN/inf values, or allow more bad steps in a row."
        )


class BadSteps:
    """The steps a fit skipped, read from each step's ``skipped`` flag.

    :meth:`add` keeps the flag on the device and reads only flags that are already computed,
    so the host never waits on a step it just dispatched; :meth:`check` (at each metrics
    flush and at the end) reads the rest. A run of ``limit`` skips raises
    :class:`NonFiniteStepsError`.

    Example:
      >>> import jax.numpy as jnp
      >>> bad = BadSteps(limit=2)
      >>> bad.add(1, jnp.int32(1)); bad.add(2, jnp.int32(0)); bad.check()
      >>> bad.total
      1
      >>> bad.add(3, jnp.int32(1)); bad.add(4, jnp.int32(1)); bad.check()
      Traceback (most recent call last):
        ...
      jaxtl.train.faults.NonFiniteStepsError: steps 3-4 (2 in a row) had a non-finite loss ...
    """

    def __init__(self, limit: int, total: int = 0):
        self.limit = limit
        self.total = total  # skips so far in the run (a resumed run starts from its checkpoint's)
        self._pending: collections.deque[tuple[int, Any]] = collections.deque()
        self._run: list[int] = []

    def add(self, step: int, skipped: Any) -> None:
        self._pending.append((step, skipped))
        self._read(block=False)

    def check(self) -> None:
        """Read every pending flag (waits for their steps)."""
        self._read(block=True)

    def _read(self, block: bool) -> None:
        while self._pending:
            step, flag = self._pending[0]
            if not block and not flag.is_ready():
                return
            self._pending.popleft()
            if int(jax.device_get(flag)):
                self.total += 1
                self._run.append(step)
                if len(self._run) >= self.limit:
                    raise NonFiniteStepsError(self._run, self.limit)
            else:
                self._run = []


class Preempted(Exception):
    """A fit stopped by a preemption signal after saving the state of ``step``.

    Attributes:
      step: the last step trained and checkpointed.
      signal: ``"SIGTERM"`` or ``"SIGINT"``.
      workdir: the run directory that holds the checkpoint (None: trained in memory, nothing
        was saved).
      result: the :class:`jaxtl.train.FitResult` up to ``step`` (its state included).
    """

    def __init__(self, step: int, signal_name: str, workdir: str | None, result: Any = None):
        self.step, self.signal, self.workdir, self.result = step, signal_name, workdir, result
        where = (
            f"checkpoint of step {step} saved in {workdir}; resume with resume=True (--resume)"
            if workdir
            else "no workdir, so nothing was saved"
        )
        super().__init__(f"{signal_name}: stopped after step {step}; {where}.")


class StopSignals:
    """Within its ``with`` block, SIGTERM and SIGINT ask the fit to stop at a step boundary.

    Single process: this process's handlers record the signal (a second SIGINT raises
    ``KeyboardInterrupt`` at once); the previous handlers come back on exit. Several processes:
    jax's preemption sync manager (started by ``jax.distributed.initialize``) already listens
    for SIGTERM and agrees on a step with the other processes, so :meth:`requested` asks it;
    SIGINT keeps its default there (one process cannot stop the others at a shared step).
    Outside the main thread no handler can be installed, and only the multi-process sync point
    is consulted.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1

    def __enter__(self) -> StopSignals:
        if not self._multi and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        self.received = self.received or name
        print(
            f"\n{name}: finishing the current step, then saving a checkpoint "
            "(press Ctrl-C again to stop at once)",
            file=sys.stderr,
        )

    def requested(self, step: int) -> str | None:
        """The signal to stop for after ``step``, or None. Call after every step: in a
        multi-process run every process must ask at every step for the sync point to agree."""
        if self._multi:
            from jax.experimental import multihost_utils

            return "SIGTERM" if multihost_utils.reached_preemption_sync_point(step) else None
        return self.received
