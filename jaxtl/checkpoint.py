"""Orbax checkpoints of a run: the train state plus JSON metadata (epoch, position, history).

Two managers in one run directory, because "the latest" and "the best" are different questions:
``checkpoints/latest`` keeps the last ``max_to_keep`` steps for ``resume``; ``checkpoints/best``
keeps the single best step by the validation metric, for early stopping's restore-best and for
``jaxtl evaluate``. Saves are asynchronous; :meth:`Checkpointer.close` waits for them.

What survives a crash: orbax writes each step into a temporary directory and renames it to the
step number only when every file is written, so a process killed mid-save leaves a
``<step>.orbax-checkpoint-tmp-*`` directory that no manager counts as a step; the next
Checkpointer removes it. Old steps are deleted only after a newer one has committed. A
committed step that cannot be read back (a file truncated, zeroed, deleted or edited since)
raises :class:`CheckpointReadError`, which names the step, its directory and the steps that
remain; nothing falls back to another step silently (``resume=STEP`` / ``--resume-from STEP``
chooses one).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
from collections.abc import Collection
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of ``tree``: the restore target, so leaves come back placed."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def _own_barriers(name: str) -> ocp.options.MultiprocessingOptions:
    """Barrier keys of their own for one of a run's two managers.

    In a multi-process run both managers save the same step and finish it in background
    threads, and orbax names its barriers by step (``async_write_complete.3``) and by purpose
    (``ThreadSaveMultiHostValueHolder:set_value_start``), not by manager. Two managers sharing
    names meet at the same barrier at once, which the coordination service rejects ("Barrier ...
    is already ongoing") and the run hangs or dies: seen in CI's 2-process FSDP test, and on
    every run of 40 back-to-back latest + best saves from 2 processes. A prefix per manager is
    the fix orbax documents (``MultiprocessingOptions.barrier_sync_key_prefix``).
    """
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


def _reason(cause: BaseException, width: int = 160) -> str:
    """The gist of a storage error for a one-line message: tensorstore's name the path first
    and the OS's reason ("File too large", "No space left on device") last, so a long one
    keeps both ends; the OS's reason found anywhere in the error's chain is added when the
    text does not already show it (an error wrapped by orbax or an exception group)."""
    text = " ".join(str(cause).split())
    text = text if len(text) <= 2 * width else f"{text[:width]} ... {text[-width:]}"
    said = _os_reason(cause)
    return text if said is None or said in text else f"{text}; the system said: {said}"


_OS_CODE = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")


def _os_reason(cause: BaseException) -> str | None:
    """The OS's words for the first error number in ``cause``'s chain (its ``__cause__``,
    ``__context__`` and grouped exceptions): an ``OSError``'s ``errno``, or the
    ``os_error_code`` / ``[Errno N]`` that tensorstore and orbax print. None if none."""
    todo, seen = [cause], set()
    while todo:
        error = todo.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return os.strerror(error.errno)
        found = _OS_CODE.search(str(error))
        if found:
            return os.strerror(int(found.group(1) or found.group(2)))
        todo += [error.__cause__, error.__context__, *getattr(error, "exceptions", ())]
    return None


class CheckpointReadError(ValueError):
    """A committed checkpoint that cannot be read back: ``step`` in ``directory``, with the
    ``steps`` saved there, to resume from another (``resume=STEP`` / ``--resume-from STEP``)."""

    def __init__(self, directory: str, step: int, steps: list[int], cause: BaseException):
        self.directory, self.step, self.steps = directory, step, list(steps)
        others = [s for s in self.steps if s != step]
        fix = (
            f"resume from an earlier one with resume={others[-1]} (--resume-from {others[-1]}); "
            f"steps saved there: {others}"
            if others
            else "no other step is saved there: start the run again without --resume"
        )
        reason = _reason(cause)
        super().__init__(
            f"The checkpoint of step {step} in {os.path.join(directory, str(step))} cannot be "
            f"read ({type(cause).__name__}: {reason}). Its files were damaged or changed after "
            "it was saved, or this run's model, recipe or optimizer state (--optimizer, "
            "learning_rate_input, weight_decay_input) differ from the run that saved it; "
            f"{fix}."
        )


class CheckpointWriteError(OSError):
    """A checkpoint save failed in the background; ``steps`` are those still committed (the
    failed one is not among them: orbax renames a step into place only when it is whole)."""

    def __init__(self, directory: str, steps: list[int], cause: BaseException):
        self.directory, self.steps = directory, sorted(steps)
        reason = _reason(cause)
        if not os.path.isdir(directory):
            self.steps = []
            outcome = (
                f"{directory} no longer exists: it was deleted, moved or unmounted while the "
                "run trained. If it was moved or unmounted, put it back and continue with "
                "resume=True (--resume); if deleted, start the run again (workdir / --out)."
            )
        elif self.steps:
            outcome = (
                f"the last committed checkpoint, step {self.steps[-1]}, is intact. Free space "
                "on that disk or fix the directory's permissions, then continue with "
                "resume=True (--resume)."
            )
        else:
            outcome = (
                "no checkpoint had committed there yet. Free space on that disk or fix the "
                "directory's permissions, then start the run again."
            )
        super().__init__(
            f"Saving a checkpoint under {directory} failed ({type(cause).__name__}: {reason}); "
            f"{outcome}"
        )


def _uncompressed_state_handler(
    barriers: ocp.options.MultiprocessingOptions,
) -> ocp.StandardCheckpointHandler:
    """orbax's ``StandardCheckpointHandler`` (the same files, args and restore) writing its
    arrays without zstd compression, for :class:`Checkpointer` ``(compress=False)``.

    The handler has no option for it; the ``PyTreeCheckpointHandler`` it delegates to
    (``_impl``) does, so that one is rebuilt with the arguments the handler gives it and
    ``use_compression=False`` (its other defaults are the handler's own: orbax 0.12's
    metadata options, OCDBT). (A subclass would not do: orbax finds a handler for
    ``StandardSave`` args by its exact class.) ``tests/test_checkpoint_compression.py`` reads the
    written arrays' codec back through tensorstore, so an orbax that stops honouring this fails
    there.
    """
    handler = ocp.StandardCheckpointHandler(multiprocessing_options=barriers)
    if not isinstance(getattr(handler, "_impl", None), ocp.PyTreeCheckpointHandler):
        raise RuntimeError(
            f"orbax {ocp.__version__}'s StandardCheckpointHandler no longer delegates to a "
            "PyTreeCheckpointHandler (_impl), so jaxtl cannot write raw checkpoints with it: "
            "pass compress=True (--compress-checkpoints), or install orbax-checkpoint 0.12, "
            "which this was checked with."
        )
    handler._impl = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=96,
        restore_concurrent_gb=96,
        multiprocessing_options=barriers,
        use_ocdbt=True,
        use_compression=False,
    )
    return handler


class Checkpointer:
    """Save and restore ``(state tree, metadata)`` pairs under ``directory``.

    Args:
      directory: e.g. ``RUN_DIR/checkpoints``.
      max_to_keep: how many recent steps ``latest`` keeps.
      best_metric: the metadata key that ranks ``best`` checkpoints (e.g. ``"val_accuracy"``);
        ``None`` disables the best manager.
      best_mode: ``"max"`` or ``"min"``.
      compress: write the arrays zstd-compressed (orbax's default); ``None``: raw where the
        arrays live in host memory (the CPU backend), compressed elsewhere. Compressing holds
        buffers of the arrays in host memory while a save is written, which on CPU is the
        training's memory: a save of a MiniLM-sized state (258 MiB) to ``latest`` and ``best``
        added a median 171-348 MiB to the resident set compressed and 5-6 MiB raw, while a
        trained state's raw checkpoint is 1.57x the disk (``benchmarks/save_memory.py``).
        Either kind restores with either setting.
    """

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "max",
        compress: bool | None = None,
    ):
        if not (compress is None or isinstance(compress, bool)):
            raise ValueError(f"compress must be True, False or None, got {compress!r}.")
        if compress is None:
            compress = jax.default_backend() != "cpu"
        self.directory = os.path.abspath(directory)
        self.best_metric = best_metric
        _quiet_stray_reads()  # a failed background write prints them before anyone can look

        def handlers(name: str) -> dict:
            if compress:
                return {}
            barriers = _own_barriers(name)
            state = _uncompressed_state_handler(barriers)
            meta = ocp.JsonCheckpointHandler(multiprocessing_options=barriers)
            return {"item_handlers": {"state": state, "meta": meta}}

        self.latest = ocp.CheckpointManager(
            os.path.join(self.directory, "latest"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                cleanup_tmp_directories=True,  # what a killed save left behind
                multiprocessing_options=_own_barriers("latest"),
            ),
            **handlers("latest"),
        )
        self.best = None
        if best_metric is not None:
            if best_mode not in ("max", "min"):
                raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
            self.best = ocp.CheckpointManager(
                os.path.join(self.directory, "best"),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    best_fn=lambda m: m[best_metric],
                    best_mode=best_mode,
                    create=True,
                    cleanup_tmp_directories=True,
                    multiprocessing_options=_own_barriers("best"),
                ),
                **handlers("best"),
            )

    @staticmethod
    def _args(tree: Any, meta: dict) -> ocp.args.Composite:
        return ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, tree: Any, meta: dict, metrics: dict | None = None) -> None:
        """Save to ``latest``; also to ``best`` when ``metrics`` holds the best metric.

        Raises:
          CheckpointWriteError: this save, or the previous one still finishing, failed.
        """
        with _writing(self.latest):
            self.latest.save(step, args=self._args(tree, meta), force=True)
        if self.best is not None and metrics and self.best_metric in metrics:
            with _writing(self.best):
                self.best.save(step, args=self._args(tree, meta), metrics=metrics, force=True)

    def _restore(
        self,
        manager: ocp.CheckpointManager,
        step: int,
        like: Any,
        parts: Collection[str] | None = None,
    ) -> tuple[Any, dict]:
        return _restore(manager, step, like, parts)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def steps(self) -> list[int]:
        """The committed steps of ``latest``, oldest first."""
        return sorted(self.latest.all_steps())

    def restore_latest(self, like: Any) -> tuple[Any, dict] | None:
        """The newest checkpoint as ``(tree shaped like ``like``, meta)``, or ``None``."""
        self.latest.wait_until_finished()
        step = self.latest.latest_step()
        return None if step is None else self._restore(self.latest, step, like)

    def restore_step(self, step: int, like: Any) -> tuple[Any, dict]:
        """``step`` of ``latest``, chosen by the caller (``--resume-from``), and every later step
        of both managers deleted: they belong to the run this one replaces, and their numbers
        are about to be saved again.

        Raises:
          ValueError: ``step`` is not saved; the message lists the steps that are.
        """
        self.wait()
        if step not in self.steps():
            raise ValueError(
                f"resume_from={step} (--resume-from {step}): no checkpoint of step {step} in "
                f"{self.latest.directory}; saved steps: {self.steps() or 'none'}."
            )
        out = self._restore(self.latest, step, like)
        for manager in (self.latest, self.best):
            for later in [s for s in (manager.all_steps() if manager else []) if s > step]:
                print(f"resume from step {step}: deleting the later checkpoint {later} of "
                      f"{manager.directory}", file=sys.stderr)  # fmt: skip
                manager.delete(later)
        return out

    def best_step(self) -> int | None:
        return None if self.best is None else self.best.best_step()

    def restore_best(
        self, like: Any, parts: Collection[str] | None = None
    ) -> tuple[Any, dict] | None:
        """``(tree, meta)`` of the best step, or None when none is saved. ``parts``: read only
        these top-level entries of the tree (e.g. the params and batch statistics at the end of
        a fit, without the optimizer state beside the live one); the others come back as
        ``None``."""
        if self.best is None:
            return None
        self.best.wait_until_finished()
        step = self.best.best_step()
        if step is None:
            return None
        return self._restore(self.best, step, like, parts)

    def wait(self) -> None:
        """Block until every save has committed.

        Raises:
          CheckpointWriteError: one of them failed.
        """
        for manager in (self.latest, self.best):
            if manager is not None:
                with _writing(manager):
                    manager.wait_until_finished()

    def check(self) -> None:
        """Raise now the error of a background save that failed (a full disk, a file too
        large, a directory made read-only), instead of at the next save or at the end.

        Cheap while a save is running (a flag is read); once it has finished, joining its
        threads returns at once or raises what they raised. A checkpoint directory that no
        longer exists (deleted, moved, unmounted) is an error at once, before orbax would
        recreate it empty at the next save.

        Raises:
          CheckpointWriteError: naming the directory, the cause and the last committed step.
        """
        for manager in (self.latest, self.best):
            if manager is None:
                continue
            if not os.path.isdir(manager.directory):  # one stat: deleted or unmounted mid-run
                gone = FileNotFoundError(errno.ENOENT, "the directory disappeared mid-run")
                raise CheckpointWriteError(str(manager.directory), [], gone)
            if not manager.is_saving_in_progress():
                with _writing(manager):
                    manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the saves in flight, then release the managers (both, whatever fails).

        Raises:
          CheckpointWriteError: a save failed.
        """
        try:
            self.wait()
        finally:
            self.latest.close()
            if self.best is not None:
                self.best.close()


def _committed(manager: ocp.CheckpointManager) -> list[int]:
    """The steps on disk now: orbax's own list may already leave out a step it will delete
    once the save in flight commits, which is the one a failed save leaves as the last."""
    names = os.listdir(manager.directory) if os.path.isdir(manager.directory) else []
    return sorted(int(n) for n in names if n.isdigit())


@contextlib.contextmanager
def _writing(manager: ocp.CheckpointManager):
    """Whatever the storage raises while ``manager`` saves, as a :class:`CheckpointWriteError`
    that names the directory and the steps still committed."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except Exception as e:  # tensorstore, the filesystem and orbax raise their own types
        _quiet_stray_reads()
        _strays_possible["failed"] = True
        raise CheckpointWriteError(str(manager.directory), _committed(manager), e) from e


def restore_params(
    directory: str, like: Any, which: str = "best", parts: Collection[str] | None = None
) -> tuple[Any, dict]:
    """Restore a state tree from a finished run's ``checkpoints/{best,latest}`` (for evaluation).
    ``like``: the tree to restore into, or a function from the checkpoint's metadata to it.
    ``parts``: read only these top-level entries of the tree; the others come back as None."""
    sub = os.path.join(os.path.abspath(directory), which)
    if not os.path.isdir(sub):
        raise FileNotFoundError(f"No {which!r} checkpoints under {directory!r}.")
    manager = ocp.CheckpointManager(sub)
    try:
        step = manager.best_step() if which == "best" else manager.latest_step()
        if step is None:
            step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"The checkpoint directory {sub!r} holds no checkpoint.")
        return _restore(manager, step, like, parts)
    finally:
        manager.close()


def _restore(
    manager: ocp.CheckpointManager, step: int, like: Any, parts: Collection[str] | None = None
) -> tuple[Any, dict]:
    """``(state tree, meta)`` of ``step``. ``like``: the tree to restore into, or a function
    from the checkpoint's metadata to it (a staged run's optimizer state depends on the stage
    the checkpoint was saved in). ``parts``: read only these top-level entries of the tree; the
    others come back as ``None``.

    Raises:
      CheckpointReadError: the step's files cannot be read (truncated, zeroed, missing, not
        JSON), naming the step and the others saved.
    """
    _quiet_stray_reads()
    with _reading():  # a failed read's strays can go at once, or at any time after
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax, tensorstore and json each raise their own
            raise CheckpointReadError(str(manager.directory), step, manager.all_steps(), e) from e
        if not isinstance(meta.get("meta"), dict):
            kind = type(meta.get("meta")).__name__
            problem = ValueError(f"its metadata is {kind}, not an object")
            raise CheckpointReadError(str(manager.directory), step, manager.all_steps(), problem)
        if callable(like):
            like = like(meta["meta"])
        try:
            if parts is None:
                out = manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like)))
                )
                return out["state"], meta["meta"]
            # The manager reads a step's state whole; orbax's partial restore is the PyTree
            # handler's, on the step's state directory (the same files; neither manager sets a
            # step name format, so a step's directory is its number).
            wanted = _abstract({k: v for k, v in like.items() if k in parts})
            barriers = _own_barriers(f"{os.path.basename(str(manager.directory))}-parts")
            path = os.path.join(str(manager.directory), str(step), "state")
            with ocp.Checkpointer(
                ocp.PyTreeCheckpointHandler(), multiprocessing_options=barriers
            ) as reader:
                # A partial restore drops saved entries the template lacks and leaves the
                # template's own in place where nothing was saved: check both first, as a whole
                # restore does.
                _check_saved_shapes(reader, path, wanted)
                got = reader.restore(
                    path,
                    args=ocp.args.PyTreeRestore(
                        item=wanted,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                        partial_restore=True,
                    ),
                )
        except Exception as e:
            raise CheckpointReadError(str(manager.directory), step, manager.all_steps(), e) from e
    return {k: got.get(k) for k in like}, meta["meta"]


def _check_saved_shapes(reader: ocp.Checkpointer, path: str, wanted: dict[str, Any]) -> None:
    """Raise ValueError unless the state saved at ``path`` holds exactly the leaves of
    ``wanted``'s entries, with their shapes (dtypes may differ: a restore casts)."""
    from jaxtl.transfer.trees import path_str

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns that the state has no step metadata of its own
    try:
        meta = reader.metadata(path)
    finally:
        absl.setLevel(level)
    saved = getattr(meta, "item_metadata", meta)
    saved = getattr(saved, "tree", saved)

    def shapes(tree: Any) -> dict[str, tuple]:
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {path_str(p): tuple(getattr(x, "shape", ())) for p, x in leaves}

    for part, like in wanted.items():
        have, want = shapes(saved.get(part, {})), shapes(like)
        if have != want:
            extra = sorted(set(have) - set(want))
            missing = sorted(set(want) - set(have))
            other = sorted(k for k in set(have) & set(want) if have[k] != want[k])
            found = [f"saved but not in the model: {extra[:3]}" if extra else "",
                     f"in the model but not saved: {missing[:3]}" if missing else "",
                     f"other shapes: {[(k, have[k], want[k]) for k in other[:3]]}" if other
                     else ""]  # fmt: skip
            raise ValueError(f"its {part} differ: " + "; ".join(f for f in found if f))


# Whether orbax's I/O may have left strays: while a read runs, and for good once a read or a
# save has failed. Outside those, an orbax coroutine "never awaited" is reported as any other.
_strays_possible = {"reading": False, "failed": False}


def _orbax_strays_possible() -> bool:
    return _strays_possible["reading"] or _strays_possible["failed"]


@contextlib.contextmanager
def _reading():
    _strays_possible["reading"] = True
    try:
        yield
    except Exception:
        _strays_possible["failed"] = True
        raise
    finally:
        _strays_possible["reading"] = False


_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}checkpoint{os.sep}"


class _StrayWrites(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        first = message.partition("\n")[0]
        stray = "exception was never retrieved" in first or "destroyed but it is pending" in first
        ours = ".orbax-checkpoint-tmp" in message or (
            _orbax_strays_possible() and _ORBAX_SOURCE in message
        )
        return not (stray and ours)


def _stray(unraisable) -> bool:
    """Whether an unraisable exception is one of a failed orbax restore's or save's strays."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    # A read that the failed restore had scheduled but never started (the loop was closed
    # first) is an orbax coroutine "never awaited": a RuntimeWarning when it is collected,
    # raised where warnings are errors (-W error, pytest's filterwarnings).
    code = getattr(unraisable.object, "cr_code", None)
    return (
        _orbax_strays_possible()
        and isinstance(error, RuntimeWarning)
        and "was never awaited" in str(error)
        and code is not None
        and _ORBAX_SOURCE in code.co_filename
    )


def _quiet_stray_reads() -> None:
    """After a failed restore or save, drop the "Event loop is closed" errors of its strays.

    When one of a restore's reads (or a save's writes) fails, orbax closes the asyncio loop
    that awaited them while tensorstore still completes the others; each then calls back into
    the closed loop and Python prints a ``RuntimeError: Event loop is closed`` traceback for
    it, around the :class:`CheckpointReadError` / :class:`CheckpointWriteError` that says what
    happened. Reads it had scheduled but not started are collected later as orbax coroutines
    "never awaited" (an error where warnings are errors). They are noise, not further damage:
    only these (:func:`_stray`) are filtered, for the rest of the process."""
    hook = sys.unraisablehook
    if getattr(hook, "_jaxtl_quiet", False):
        return
    # The writes of a failed save that were still queued fail too, each "never retrieved" by
    # the loop orbax closed; asyncio logs a traceback per tensorstore write (25 for one save of
    # a tiny BERT whose directory was deleted), and a failed restore's reads the same. Only
    # those are dropped: their message names an orbax temporary directory or orbax's source.
    logging.getLogger("asyncio").addFilter(_StrayWrites())

    def filtered(unraisable):
        if not _stray(unraisable):
            hook(unraisable)

    filtered._jaxtl_quiet = True
    sys.unraisablehook = filtered
