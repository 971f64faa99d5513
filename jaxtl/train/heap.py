"""Give the host memory that XLA's compiler freed back to the operating system before the
compiled step runs.

Compiling a train step allocates a few hundred MiB on the host heap and frees it when done.
glibc keeps freed pages in its arenas for reuse, so they stay in the process's resident set;
the step's working memory is then one large buffer that glibc maps afresh instead of carving it
from those pages. So the compiler's leftovers add to the run's peak memory. On MiniLM's full
fine-tune at batch 32 x 128 tokens on CPU that was about 200 MiB of a 2.56 GiB peak
(``benchmarks/footprint.py``, ``benchmarks/README.md``).

:func:`install` (called by :func:`jaxtl.train.steps.compile_steps`) registers a
``jax.monitoring`` listener on XLA's backend-compile event, which jax records after the
executable exists and before its first run. After each compile of at least
:data:`MIN_COMPILE_SECONDS` it calls glibc's ``malloc_trim(0)``, which returns the free pages
of every arena (10-30 ms against compiles of seconds). Where the C library has no
``malloc_trim`` (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import threading

import jax

__all__ = ["MIN_COMPILE_SECONDS", "install", "trims"]

MIN_COMPILE_SECONDS = 0.1  # smaller compiles (single ops, tiny jits) free too little to matter
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch's name
_lock = threading.Lock()
_installed = False
_count = 0


def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def install() -> bool:
    """Registers the listener once per process; returns whether this C library can trim."""
    global _installed
    trim = _malloc_trim()
    if trim is None:
        return False
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_listener(trim))
            _installed = True
    return True


def _listener(trim):
    def on_event(event: str, duration: float, **_) -> None:
        global _count
        if event == _COMPILE_EVENT and duration >= MIN_COMPILE_SECONDS:
            trim(0)
            _count += 1

    return on_event


def trims() -> int:
    """How many times this process has trimmed the heap after a compile."""
    return _count
