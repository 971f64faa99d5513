"""Give the host memory that XLA's compiler freed back to the operating system before the
compiled step runs.

Compiling a train step allocates a few hundred MiB on the host heap and frees it when done.
glibc keeps freed pages in its arenas for reuse, so they stay in the process's resident set;
the step's working memory is then one large buffer that glibc maps afresh instead of carving it
from those pages. So the compiler's leftovers add to the run's peak memory. On MiniLM's full
fine-tune at batch 32 x 128 tokens on CPU that was about 200 MiB of a 2.56 GiB peak
(``benchmarks/footprint.py``, ``benchmarks/README.md``).

:func:`install` (called by :func:`jaxtl.train.steps.compile_steps` and ``pmap_steps``)
registers a ``jax.monitoring`` listener on XLA's backend-compile event, which jax records after
the executable exists (compiled, or read from the persistent cache) and before its first run.
After each such event of at least :data:`MIN_COMPILE_SECONDS` it calls glibc's
``malloc_trim(0)``, which returns the free pages of every arena (12 and 28 ms measured on that
step's two compiles, against compiles of seconds).

The listener is process-wide: once installed, any compile of the process that long trims,
the user's own ``jax.jit`` code included; a trim briefly holds the allocator's arena locks.
The train loop also trims after each validation (:func:`trim`).

glibc also gives every new thread an arena of its own, up to 8 per core, and each arena keeps
the memory its thread freed. XLA's CPU runtime and orbax run many threads, so a training process
kept a few hundred MiB of freed memory spread over its arenas. :func:`limit_arenas` (called by
the ``jaxtl`` command at its start, before XLA's threads exist) caps them at one per core: the
demo's full fine-tune (``jaxtl finetune --recipe full --bucket-by-length --epochs 3``) peaked at
1,095 MiB instead of 1,244 on 2 cores, no slower (``benchmarks/README.md``). A cap the user set
(``MALLOC_ARENA_MAX``, or ``arena_max`` in ``GLIBC_TUNABLES``) is left as it is.

``JAXTL_HEAP_TRIM=off`` in the environment turns all three off. Where the C library has no
``malloc_trim`` / ``mallopt`` (macOS, Windows, musl) they do nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading

import jax

__all__ = ["MIN_COMPILE_SECONDS", "install", "limit_arenas", "trim", "trims"]

MIN_COMPILE_SECONDS = 0.1  # smaller compiles (single ops, tiny jits) free too little to matter
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch's name
_lock = threading.Lock()
_listener = None
_count = 0


def _disabled() -> bool:
    return os.environ.get("JAXTL_HEAP_TRIM", "").lower() == "off"


def _libc_function(name: str, argtypes: list, restype):
    """The C library's ``name`` with its signature set, or None where it has none."""
    try:
        fn = getattr(ctypes.CDLL(None), name, None)
    except (OSError, TypeError):  # TypeError: CDLL(None) on Windows
        return None
    if fn is not None:
        fn.argtypes, fn.restype = argtypes, restype
    return fn


_M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_arenas(count: int | None = None) -> bool:
    """Caps glibc's malloc arenas at ``count`` (default: the cores this process may run on);
    returns whether it asked glibc to (not without ``mallopt``, with ``JAXTL_HEAP_TRIM=off``,
    or when the environment already sets a cap: ``MALLOC_ARENA_MAX``, or ``arena_max`` in
    ``GLIBC_TUNABLES``).

    Call it early: glibc fixes the cap for good once it has made 8 arenas, and threads keep
    the arena they were given, so a late call may change nothing (glibc does not say). Python
    users who fine-tune in their own process can call it before their first jax computation;
    the ``jaxtl`` command does.

    Raises:
      ValueError: ``count`` < 1.
    """
    if count is not None and count < 1:
        raise ValueError(f"limit_arenas(count={count}): give at least 1 arena.")
    if _disabled():
        return False
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user's own cap
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    if mallopt is None:
        return False
    if count is None:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return mallopt(_M_ARENA_MAX, max(1, count or 1)) == 1


def _trimmer():
    """glibc's ``malloc_trim``, or None: not in this C library, or ``JAXTL_HEAP_TRIM=off``."""
    if _disabled():
        return None
    return _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)


def install() -> bool:
    """Registers the listener once per process (again if something cleared jax's listeners);
    returns whether the heap is trimmed: False without ``malloc_trim`` or with
    ``JAXTL_HEAP_TRIM=off``."""
    global _listener
    trim = _trimmer()
    if trim is None:
        return False
    with _lock:
        if _listener is None:
            _listener = _make_listener(trim)
        try:  # exactly one registration, whether or not jax's listeners were cleared since
            jax.monitoring.unregister_event_duration_listener(_listener)
        except (AssertionError, ValueError):  # not registered (now)
            pass
        jax.monitoring.register_event_duration_secs_listener(_listener)
    return True


def _make_listener(trim):
    def on_event(event: str, duration: float, **_) -> None:
        global _count
        if event == _COMPILE_EVENT and duration >= MIN_COMPILE_SECONDS:
            trim(0)
            with _lock:
                _count += 1

    return on_event


def trims() -> int:
    """How many times this process has trimmed the heap (after a compile, or :func:`trim`)."""
    return _count


def trim() -> bool:
    """Trims the heap now; returns whether it did (not without ``malloc_trim`` or with
    ``JAXTL_HEAP_TRIM=off``). The train loop calls it after each validation and its
    checkpoints: evaluation's batches, outputs and compiles and the checkpoint's host copy of
    the state are freed into glibc's arenas between training steps, and kept there the
    resident set grew with every validation. One epoch of MiniLM's demo fine-tune (4
    validations) peaked at 2,061 MiB without the trim and 1,622 MiB with it (1,396 MiB when
    each checkpoint is also written before training resumes, as on CPU; 1,285 MiB with a single
    validation and no trim; ``benchmarks/README.md``)."""
    global _count
    fn = _trimmer()
    if fn is None:
        return False
    fn(0)
    with _lock:
        _count += 1
    return True
